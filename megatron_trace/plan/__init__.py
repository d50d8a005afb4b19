"""Per-GPU memory plan of a training config, from the config alone (`megatron-trace plan`).

No model is built and no process group is started. Two phases of a colocated step peak
separately (docs/rollout.md): *rollout* (the engine's weights + KV cache next to what the
trainer keeps resident) and *train* (weights, gradients, optimizer, teacher, activations).
Everything is per GPU, for the GPU of a replica that needs most: each pipeline stage, and on
stage 0 the engine owner (TP rank 0) apart from the other TP ranks (see "GPUs of a replica").
Modules: params.py (parameters, gradients, optimizer), activations.py, engine.py (SGLang's
memory outside its pool), runtime.py (CUDA contexts, NCCL), planner.py (`plan_memory`,
`check_fits`), report.py (`MemoryPlan`, its table, the suggestions).

Notation: h hidden, L layers, a query heads, g KV heads, d head_dim, q = a*d, kv = g*d, f the
SwiGLU intermediate size, V the vocabulary padded as Megatron pads it (`models/builder.py`),
tp / pp / dp the layout (dp = cluster GPUs / (tp*pp), or `parallel.dp`), B bytes per weight and
activation element (2 bf16, 4 fp32).

**Parameters** of one TP rank of a stage (exact; `tests/unit/test_plan.py` checks them against
the tensors Megatron allocates):
    per layer    (h(q + 2kv) + q h + 3 h f) / tp + 2h + 2d     QKV, proj, fc1 [gate; up], fc2; two
                                                               RMSNorms; q/k norms (replicated)
    first stage  + V h / tp                                    embedding
    last stage   + h, + V h / tp                               final norm; LM head, unless tied at
                                                               pp = 1 (tied at pp > 1: a copy)
The local spec's RMSNorm weights (2h + 2d per layer, h final) are fp32 whatever the model
dtype, so they have no master copy; TE's follow the model dtype.
Per parameter N: weights B, gradients 4 (Megatron DDP `main_grad` buffer, grad_reduce_in_fp32),
Adam 12 (fp32 master copy + m + v; 8 without the copy when the weights are fp32), SGD 8 / 4
(Megatron's momentum 0.9). The distributed optimizer keeps 1/dp of the optimizer bytes of the
DDP buffer (padded as Megatron pads it: each parameter to 64 elements, the buffer to
lcm(dp, 128)); gradients stay whole. Snapshot teacher: another N*B, except with
`teacher.offload`, where it is on the GPU only during the teacher pass.

**Activations** after Korthikanti et al. 2022 ("Reducing Activation Recomputation in Large
Transformer Models": 34sbh + 5as^2b bytes per layer, fp16, GPT), re-derived for Qwen3 (RMSNorm,
GQA, q/k norm, SwiGLU, no dropout). Elements kept for backward, per token and layer:
    r = 4h                     the two norm inputs, the QKV input, the fc1 input   (/tp under SP)
    t = (q + kv) + c + q + 4f  q/k-norm inputs, core-attention inputs c, proj input, SwiGLU (fc1
                               output 2f, silu output f, fc2 input f)              (/tp)
    c = 3q                     unfused attention without recompute (the local spec repeats K and V
                               to the query heads); q + 2kv otherwise (fused attention keeps q, k, v;
                               selective recompute checkpoints them)
    scores = (a/tp) s (4 + B)  bytes, unfused attention without recompute: the fp32 softmax output
                               and the probabilities in B (4 only in fp32); s the attention row
    per layer = T (B (r + t) + scores)   for a micro-batch of T tokens
recompute: none keeps every layer; selective drops the scores (c = q + 2kv); full uniform k keeps
the input of each chunk of k layers (T h B, /tp under SP) plus one chunk's full activations while
it is recomputed; full block n keeps n layer inputs, the other layers whole, and one layer for the
recompute. Attention is *fused* with TransformerEngine (`model.use_te` true, or null on
`parallel.device` cuda/auto, where the TE spec is picked when installed); `train` passes what it
actually built. 1F1B: stage i holds min(pp - i, M) micro-batches in flight (M per mini-batch and
rank). The last stage adds the final norm (2h per token) and the LM head at the response
positions only (the span-sparse head): T_resp V/tp elements, twice (logits and their gradient).

**Micro-batches.** Every sequence is assumed to reach the longest: s = prompt + max_new_tokens,
with the prompt `PROMPT_TOKENS` (a math problem under the chat template; `plan --prompt-tokens`).
T = optim.max_tokens_per_micro_batch when set (at least one sequence), else micro_batch_size
rows of s. Packed rows on the unfused (local) spec attend over the whole row (s = T).

**Teacher** (lambda0 > 0 and a routed variant): privileged sequences `TEACHER_SEQ_FACTOR` x
longer; forward only, so one layer's working set at the teacher micro-batch, plus its logits at
the routed and probe positions of the update chunk that reads them (train/step.py runs the
teacher right before each chunk of micro-batches whose positions fit
teacher.max_resident_tokens, at least one micro-batch): min(this rank's mini-batch, max(that
budget, one micro-batch)) positions x V/tp x B on the last stage, with (max_new_tokens x routed
share + probe_tokens) positions per rollout; the routed share is annotate.coverage_cap for
annotated and random masks, 1 for all-token and inverted masks.

**Passes.** The train phase peaks in the largest of its passes, each next to what stays
resident: the teacher pass (its logits), the update (the chunk's teacher logits stay next to
it) and, with optim.mini_batches > 1, the old-log-prob pass (forward only, one micro-batch's
response logits at a time).

**Fused LM head** (loss.fused_head; loss/fused_head.py): no `[tokens, V/tp]` logits exist. The
teacher keeps its final hidden states at those positions (x h x B instead of x V/tp x B); the
old-log-prob pass holds one chunk's fp32 temporaries, `_BUFFERS_PER_CHUNK` x 4 x min(c, T_resp)
x V/tp bytes, with c = loss.head_chunk_tokens or `auto_chunk_tokens(V/tp)`; the update holds
those plus the response positions' final hidden states and their gradient (T_resp h B, twice)
and the weight's gradient, which the fused head forms in the forward and holds until the
micro-batch's backward (V/tp h B), instead of its logits. `plan_memory` plans every config both ways and reports both train peaks
(`MemoryPlan.lm_head`, the train phase's "LM head" note).

**Rollout engine** (colocated and rank0 placements, on stage 0's GPUs). SGLang 0.5.6 sizes its
static pool (weights + KV cache) once, when it starts during setup: rollout.mem_fraction_static
of the memory free *then* on the least free GPU of its TP group (`model_runner.py:702-707`,
`:1442-1447`), i.e. after the trainer's weights, gradient buffers, fp32 master copy and snapshot
teacher (Adam's moments come at the first step), two CUDA contexts (the trainer's, the
scheduler's), the engine's pynccl communicator and its custom all-reduce buffers. Its weights are
B per HF parameter / engine TP (parallel.tp when colocated, 1 for rank0); the KV cache is the
rest of the pool. Meanwhile the trainer keeps its weights, the snapshot teacher (unless
teacher.offload), and gradients and optimizer state (unless train.offload_during_rollout). The
`hf` engine's weights (one whole HF model in the owner's process) are counted, its dynamic KV
cache is not.

**Engine memory outside its pool** (engine.py has each figure's formula and place in the SGLang
0.5.6 source): the CUDA graphs' private pool (estimate: SGLang's 2 MiB per unit of
cuda_graph_max_bs), the graph input buffers and attention metadata, the scheduler's activations
and sampling buffers (rollout only; estimate) and the custom all-reduce buffers. While the engine
sleeps (train phase) its weights, KV cache and PyTorch cache are released but the rest stays:
the graph buffers, the custom all-reduce buffers and the CUDA graphs themselves, unless
SGLANG_MEMORY_SAVER_CUDA_GRAPH=1 (read from the planning process's environment; the engine
inherits the trainer's), with which the graphs are captured under torch_memory_saver and
released too.

**Runtime** (runtime.py; estimates): `CUDA_CONTEXT_GB` per process with a context on the GPU,
and NCCL's default buffers (Simple 4 MiB + LL128 4.69 MiB + LL 0.5 MiB per channel and ring
peer, at `NCCL_CHANNELS` channels) per communicator: the trainer's default, TP, DP, PP and
embedding groups (each with more than one rank) and the engine's two TP communicators.

**GPUs of a replica.** Every GPU of stage 0's TP group runs one engine TP rank (a scheduler
process with its shard of weights and KV cache, its graphs and buffers) next to its trainer rank,
so each holds the engine's memory, not just the owner's (two CUDA contexts each: no scheduler
opens another GPU's memory, since weight updates follow SGLang's SPMD path, runtime.py). Stages > 0 hold no engine; under rank0 only
global rank 0's GPU does. The plan reports each phase on its worst GPU and lists every kind of
GPU's peak in the notes (`MemoryPlan.gpus`). Caching-allocator fragmentation is not counted.

Lines whose name ends in "(est.)" are estimates rather than byte counts; so are the activations
and logits lines (the formulas above). Weights, gradients, optimizer state, the engine's graph
input buffers and custom all-reduce buffers follow the allocations; the engine's pool follows
SGLang's sizing rule, from a free memory that includes the estimated contexts and NCCL buffers.
"""

from .engine import MEMORY_SAVER_CUDA_GRAPH_ENV
from .params import GB, param_numels, static_bytes
from .planner import PROMPT_TOKENS, TEACHER_SEQ_FACTOR, check_fits, plan_memory
from .report import MemoryPlan, Phase, suggestions
from .runtime import CUDA_CONTEXT_GB, NCCL_CHANNELS

__all__ = [
    "CUDA_CONTEXT_GB",
    "GB",
    "MEMORY_SAVER_CUDA_GRAPH_ENV",
    "NCCL_CHANNELS",
    "PROMPT_TOKENS",
    "TEACHER_SEQ_FACTOR",
    "MemoryPlan",
    "Phase",
    "check_fits",
    "param_numels",
    "plan_memory",
    "static_bytes",
    "suggestions",
]
