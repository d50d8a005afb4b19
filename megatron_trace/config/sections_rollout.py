"""Config sections of the sampling side of a step: rollout engines and placement, rewards,
annotation and evaluation (see `schema.py` for the rules every section follows)."""

from __future__ import annotations

from dataclasses import dataclass, field

from .checks import check as _check
from .checks import one_of as _one_of

__all__ = ["AnnotateConfig", "ApiAnnotatorSection", "AsyncRolloutSection", "EvalConfig", "RemoteRolloutSection",
           "RewardConfig", "RolloutConfig"]

PAUSE_MODES = ("retract", "in_place", "abort")  # SGLang 0.5.6 /pause_generation modes


@dataclass
class RemoteRolloutSection:
    """rollout.placement=remote: SGLang servers that the trainer only sends requests to."""

    urls: list[str] = field(default_factory=list)  # http://host:port of each `sglang.launch_server`
    router_url: str | None = None  # or one sglang-router in front of them (then urls are optional)
    weight_sync: str = "distributed"  # distributed (NCCL/gloo broadcast from rank 0) | none
    master_address: str | None = None  # rank 0's address as the servers reach it (default: its hostname)
    master_port: int = 0  # 0 = a free port
    backend: str = "auto"  # nccl | gloo | auto (nccl on CUDA)
    health_timeout_s: float = 5.0  # seconds one /health probe of a server may take
    # The NAME of the environment variable that holds the servers' API key (SGLang's --api-key);
    # the key itself never goes in a config. null = the servers take no key.
    api_key_env: str | None = None

    def __post_init__(self) -> None:
        _check(self.api_key_env is None or (isinstance(self.api_key_env, str) and self.api_key_env.isidentifier()),
               "rollout.remote.api_key_env", self.api_key_env, "null or the name of an environment variable")
        for i, u in enumerate(self.urls):
            _check(u.startswith(("http://", "https://")), f"rollout.remote.urls[{i}]", u, "an http(s):// URL")
        _check(self.router_url is None or self.router_url.startswith(("http://", "https://")),
               "rollout.remote.router_url", self.router_url, "null or an http(s):// URL")
        _one_of("rollout.remote.weight_sync", self.weight_sync, {"distributed", "none"})
        _one_of("rollout.remote.backend", self.backend, {"auto", "nccl", "gloo"})
        _check(0 <= self.master_port < 65536, "rollout.remote.master_port", self.master_port, "0 or a TCP port")


@dataclass
class AsyncRolloutSection:
    """rollout.async (written `async` in YAML and overrides; `async_` in Python, a keyword):
    the fleet generates ahead of the trainer (`train/async_rollout.py`). Remote placement only."""

    # How many optimizer steps older than the trainer a batch's oldest token may be: 0 = the
    # synchronous loop; 1 = one-step-off (batch k+1 is generated from w_k while step k trains).
    # An older batch is dropped, regenerated and counted in async/dropped.
    max_age: int = 0
    update_every: int = 1  # push the weights to the fleet every N steps (async only)
    # SGLang's /pause_generation mode around a weight update: retract (running requests go back
    # to the queue and resume under the new weights, their KV recomputed), in_place (they resume
    # with the KV cache of the old weights; the cache is then not flushed), abort (they end and
    # are regenerated).
    pause_mode: str = "retract"

    def __post_init__(self) -> None:
        _check(isinstance(self.max_age, int) and self.max_age >= 0, "rollout.async.max_age", self.max_age,
               "an integer >= 0 (0 = synchronous)")
        _check(self.update_every >= 1, "rollout.async.update_every", self.update_every, "an integer >= 1")
        _one_of("rollout.async.pause_mode", self.pause_mode, set(PAUSE_MODES))


@dataclass
class RolloutConfig:
    engine: str = "hf"  # hf | sglang
    # colocated: one engine per DP replica on that replica's GPUs (its first TP group);
    # remote: SGLang servers (rollout.remote.*), the trainer ranks do not generate;
    # rank0: one engine on global rank 0 (debugging)
    placement: str = "colocated"
    mem_fraction_static: float = 0.5  # colocated SGLang: share of each GPU for its weights + KV cache
    max_retries: int = 2  # a failed request is retried on another engine this many times, then counted
    request_timeout_s: float = 1800.0  # one generate request (remote); a slower one counts as failed
    chunk_prompts: int = 0  # remote: prompts per request (0 = split evenly over the live servers)
    # hf engine: prompts per forward batch, or auto (as few batches as hf_max_batch_tokens allows,
    # shortest prompts first). Samples do not depend on it (per-row counter-based sampling): the
    # same tokens, log-probs to float rounding (~1e-7).
    hf_batch_prompts: int | str = "auto"
    # hf engine, auto batches: the most rows x (longest prompt + max_new_tokens) per batch, which
    # is what its KV cache holds (2 x layers x kv_heads x head_dim x dtype bytes per position).
    hf_max_batch_tokens: int = 32768
    # After every weight sync (once the engine's KV cache is back), probe every engine against the
    # actor and raise above verify_sync_tol: the max |logit| gap (hf engine) or |log-prob| gap of
    # greedy samples (SGLang). The default is bf16-scale; a lost or mis-mapped tensor gives whole
    # nats. fp32 runs can use 1e-3.
    verify_sync: bool = False
    verify_sync_tol: float = 0.5  # the largest gap verify_sync accepts (see verify_sync)
    remote: RemoteRolloutSection = field(default_factory=RemoteRolloutSection)
    server_tp: int = 1  # GPUs per server of a fleet started in the job (cluster.rollout_nodes)
    async_: AsyncRolloutSection = field(default_factory=AsyncRolloutSection)  # the key `rollout.async`
    prompts_per_step: int = 8  # prompts per RL step (the global batch is prompts_per_step x n)
    n: int = 8  # samples per prompt (GRPO group size)
    temperature: float = 1.0  # rollout sampling temperature
    top_p: float = 1.0  # rollout nucleus sampling (1.0 = off)
    top_k: int = -1  # rollout top-k sampling (-1 = off)
    max_new_tokens: int = 64  # longest response; a longer one is truncated (rollout/truncated_frac)

    def __post_init__(self) -> None:
        _one_of("rollout.engine", self.engine, {"hf", "sglang"})
        _one_of("rollout.placement", self.placement, {"colocated", "remote", "rank0"})
        _check(0 < self.mem_fraction_static < 1, "rollout.mem_fraction_static", self.mem_fraction_static,
               "a float in (0, 1)")
        _check(self.max_retries >= 0, "rollout.max_retries", self.max_retries, "an integer >= 0")
        _check(self.request_timeout_s > 0, "rollout.request_timeout_s", self.request_timeout_s, "a float > 0")
        _check(self.chunk_prompts >= 0, "rollout.chunk_prompts", self.chunk_prompts, "an integer >= 0")
        if isinstance(self.hf_batch_prompts, str) and self.hf_batch_prompts.strip().isdigit():
            self.hf_batch_prompts = int(self.hf_batch_prompts)  # a command-line override arrives as text
        _check(self.hf_batch_prompts == "auto" or (isinstance(self.hf_batch_prompts, int) and self.hf_batch_prompts >= 1),
               "rollout.hf_batch_prompts", self.hf_batch_prompts, "auto or an integer >= 1")
        _check(self.hf_max_batch_tokens >= 1, "rollout.hf_max_batch_tokens", self.hf_max_batch_tokens,
               "an integer >= 1")
        _check(self.verify_sync_tol > 0, "rollout.verify_sync_tol", self.verify_sync_tol, "a float > 0")
        _check(self.async_.max_age == 0 or self.placement == "remote", "rollout.async.max_age", self.async_.max_age,
               "0 unless rollout.placement=remote: colocated engines share the trainer's GPUs, so generation "
               "and training cannot overlap there (rank0 is for debugging)")
        a = self.async_
        _check(a.update_every == 1 or a.max_age > 0, "rollout.async.update_every", a.update_every,
               "1 while rollout.async.max_age=0 (the synchronous loop syncs every step)")
        # The fleet's weights lag the trainer's by up to update_every - 1 steps: a batch made from
        # them must still be young enough, or every regeneration would be dropped again.
        _check(a.update_every <= a.max_age + 1, "rollout.async.update_every", a.update_every,
               f"at most rollout.async.max_age + 1 = {a.max_age + 1}")
        _check(a.max_age == 0 or self.remote.weight_sync == "distributed", "rollout.async.max_age", a.max_age,
               "0 with rollout.remote.weight_sync=none (the servers' weights never change, so every batch "
               "would grow older than max_age)")
        _check(self.server_tp >= 1, "rollout.server_tp", self.server_tp, "an integer >= 1")
        _check(self.prompts_per_step >= 1, "rollout.prompts_per_step", self.prompts_per_step, "an integer >= 1")
        _check(self.n >= 2, "rollout.n", self.n, "an integer >= 2 (GRPO needs a group)")
        _check(self.temperature > 0, "rollout.temperature", self.temperature, "a float > 0")
        _check(0 < self.top_p <= 1, "rollout.top_p", self.top_p, "a float in (0, 1]")
        _check(self.top_k == -1 or self.top_k >= 1, "rollout.top_k", self.top_k, "-1 (off) or an integer >= 1")
        _check(self.max_new_tokens >= 1, "rollout.max_new_tokens", self.max_new_tokens, "an integer >= 1")


@dataclass
class RewardConfig:
    timeout_s: float = 5.0  # hard time limit of one math-verify grading (a hung worker is killed)
    workers: int = 2  # grading worker processes
    advantage_std: bool = True  # False: Dr. GRPO (no std normalisation)

    def __post_init__(self) -> None:
        _check(self.timeout_s > 0, "reward.timeout_s", self.timeout_s, "a float > 0")
        _check(self.workers >= 1, "reward.workers", self.workers, "an integer >= 1")


@dataclass
class ApiAnnotatorSection:
    # Any OpenAI-compatible Chat Completions server. Switching to a self-hosted model is this one
    # key: the model then defaults to the one the server lists (GET {base_url}/models) and no key
    # is sent. The default annotator (OpenAI, gpt-4o-mini) is a cost choice: the paper shows that
    # annotator strength matters (docs/concepts.md, "Annotator").
    base_url: str = "https://api.openai.com/v1"
    model: str | None = None  # null: gpt-4o-mini on OpenAI's URL, else the server's first model
    # The NAME of the variable holding the key (keys never go in configs); null: OPENAI_API_KEY on
    # OpenAI's URL, else no key. A name given here must be set.
    api_key_env: str | None = None
    max_concurrency: int = 8  # annotation requests in flight at once
    timeout_s: float = 60.0  # seconds per annotation request
    max_retries: int = 3  # retries of a failed annotation request (with backoff); then no spans


@dataclass
class AnnotateConfig:
    kind: str = "oracle"  # oracle | api | self
    coverage_cap: float = 0.25  # largest share of a response's tokens its spans may cover (lowest priority dropped first)
    segment_mode: str = "line"  # how a response is cut into the numbered segments the annotator marks
    max_segment_chars: int = 300  # a longer segment is split at a sentence end or space
    cache_dir: str | None = None  # default: <run.dir>/annotator_cache
    api: ApiAnnotatorSection = field(default_factory=ApiAnnotatorSection)

    def __post_init__(self) -> None:
        _one_of("annotate.kind", self.kind, {"oracle", "api", "self"})
        _check(0 < self.coverage_cap <= 1, "annotate.coverage_cap", self.coverage_cap, "a float in (0, 1]")
        _one_of("annotate.segment_mode", self.segment_mode, {"line", "paragraph"})
        _check(self.max_segment_chars >= 1, "annotate.max_segment_chars", self.max_segment_chars, "an integer >= 1")


@dataclass
class EvalConfig:
    every: int = 0  # in-loop evaluation every N steps; 0 = off
    # final benchmarks of `megatron-trace eval` (and in-loop ones without in_loop_source)
    benchmarks: list[str] = field(default_factory=lambda: ["math500", "aime24", "aime25", "amc23", "gpqa_diamond"])
    k: int = 8  # samples per problem (avg@k)
    temperature: float = 0.6  # the paper's decoding
    top_p: float = 0.95  # evaluation nucleus sampling (the paper's)
    top_k: int = 20  # evaluation top-k sampling (the paper's)
    max_new_tokens: int = 32768  # longest evaluated response
    thinking: bool = True  # Qwen3 thinking mode
    limit: int | None = None  # first N problems per benchmark (in-loop subsets); null = all
    arith_n: int = 200  # size of the synthetic held-out set
    bootstrap_samples: int = 2000  # resamples of the bootstrap CI over problems
    batch_prompts: int = 16  # problems per generation batch (k samples each)
    gpqa_csv: str | None = None  # the official GPQA-Diamond CSV (never bundled), or env MT_GPQA_CSV
    # A .jsonl/.parquet of problem/answer rows (the validation split of tools/prepare_data.py) that
    # the in-loop evaluation runs as the benchmark "val" instead of eval.benchmarks (first
    # eval.limit problems); `megatron-trace eval` keeps eval.benchmarks, where "val" may then be
    # listed to reproduce the in-loop numbers. null = the in-loop evaluation uses the benchmarks.
    in_loop_source: str | None = None

    def __post_init__(self) -> None:
        from ..data.problems import BENCHMARKS

        _check(self.every >= 0, "eval.every", self.every, "an integer >= 0 (0 = off)")
        _check(self.k >= 1, "eval.k", self.k, "an integer >= 1")
        _check(self.temperature >= 0, "eval.temperature", self.temperature, "a float >= 0 (0 = greedy)")
        _check(0 < self.top_p <= 1, "eval.top_p", self.top_p, "a float in (0, 1]")
        _check(self.top_k == -1 or self.top_k >= 1, "eval.top_k", self.top_k, "-1 (off) or an integer >= 1")
        _check(self.max_new_tokens >= 1, "eval.max_new_tokens", self.max_new_tokens, "an integer >= 1")
        _check(self.limit is None or self.limit >= 1, "eval.limit", self.limit, "null or an integer >= 1")
        _check(self.arith_n >= 1, "eval.arith_n", self.arith_n, "an integer >= 1")
        _check(self.bootstrap_samples >= 100, "eval.bootstrap_samples", self.bootstrap_samples, "an integer >= 100")
        _check(self.batch_prompts >= 1, "eval.batch_prompts", self.batch_prompts, "an integer >= 1")
        _check(len(self.benchmarks) > 0, "eval.benchmarks", self.benchmarks, "a non-empty list")
        for i, b in enumerate(self.benchmarks):  # "val": the in-loop split, for `megatron-trace eval` too
            _one_of(f"eval.benchmarks[{i}]", b, set(BENCHMARKS) | ({"val"} if self.in_loop_source else set()))
