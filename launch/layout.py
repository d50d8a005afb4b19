"""The job's layout: WORLD = tp x pp x dp, from the job's size (GPU jobs: nodes x GPUs per node,
one rank per GPU) or from the cores asked for (CPU jobs, which spawn gloo ranks on one node).
See `common.py` for how the launchers use it."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Layout:
    """How a job's ranks split up, and where its rollout engines run."""

    tp: int
    pp: int
    dp: int
    world: int
    engines: int  # rollout engines on the trainer's GPUs: dp (colocated), 1 (rank0), 0 (remote)
    placement: str
    where: str  # how the world size came about, e.g. "2 nodes x 8 GPUs"
    rollout: str  # the engines in words

    def line(self) -> str:
        return (f"layout tp={self.tp} pp={self.pp} dp={self.dp} ({self.world} ranks = {self.where}), "
                f"engines={self.engines} ({self.rollout})")


def plan_layout(cfg, world: int, where: str, *, keys: str = "", gpus_per_node: int | None = None,
                nodes: int = 1) -> Layout:
    """The layout of `world` ranks under cfg, or SystemExit naming the keys to change.

    where: how the world size came about ("2 nodes x 8 GPUs", "--nproc 4"); keys: the settings
    behind it, named in the errors. gpus_per_node (GPU jobs): a colocated SGLang engine lives on
    one node, so a TP group must not straddle two."""
    p, r = cfg.parallel, cfg.rollout
    src = f"{where}{'; ' + keys if keys else ''}"
    mp = p.tp * p.pp
    if world < 1 or world % mp:
        raise SystemExit(f"error: parallel.tp={p.tp} x parallel.pp={p.pp} = {mp} does not divide the job's {world} "
                         f"rank(s) ({src}); change parallel.tp / parallel.pp or the job size")
    dp = world // mp
    if p.dp is not None and p.dp != dp:
        raise SystemExit(f"error: parallel.dp={p.dp} disagrees with the job: {world} rank(s) ({src}) at "
                         f"parallel.tp={p.tp} x parallel.pp={p.pp} give dp={dp}; set parallel.dp=null to derive it "
                         f"(or parallel.dp={dp})")
    if cfg.train.mode == "train_only":
        engines, rollout = 0, "train.mode=train_only: no rollouts"
    elif r.placement == "colocated":
        engines = dp
        rollout = f"colocated {r.engine}, one per DP replica"
        if r.engine == "sglang":
            rollout += f", tp_size={p.tp}, mem_fraction_static={r.mem_fraction_static:g}"
            if gpus_per_node and nodes > 1 and gpus_per_node % p.tp:
                raise SystemExit(f"error: parallel.tp={p.tp} does not divide cluster.gpus_per_node={gpus_per_node}: "
                                 "some TP groups straddle two nodes, and a colocated SGLang engine "
                                 "(rollout.placement=colocated) runs on one node's GPUs; change parallel.tp or "
                                 "cluster.gpus_per_node, or use rollout.placement=remote")
    elif r.placement == "rank0":
        engines, rollout = 1, f"rank0 {r.engine} (debugging)"
    elif cfg.cluster.rollout_nodes:
        c = cfg.cluster
        from megatron_trace.fleet.job import servers_per_node

        gpu = bool(c.gpus_per_node) and p.device != "cpu"
        n = servers_per_node(cfg, not gpu) * (c.rollout_nodes if gpu else 1)
        servers = (f"{n} server(s) of {r.server_tp} GPU(s) on the job's first {c.rollout_nodes} node(s)" if gpu
                   else f"{n} server(s) on the job's node, one core each")
        engines = 0
        rollout = f"remote: a fleet in the job, {servers}" + (", behind sglang-router" if n > 1 else "")
    else:
        servers = f"router {r.remote.router_url}" if r.remote.router_url else f"{len(r.remote.urls)} server(s)"
        engines, rollout = 0, f"remote: {servers}"
    return Layout(p.tp, p.pp, dp, world, engines, r.placement, where, rollout)


def cluster_layout(cfg) -> Layout:
    """The layout of a Slurm GPU job of cfg.cluster.nodes x cfg.cluster.gpus_per_node GPUs (less
    the cluster.rollout_nodes that run the fleet)."""
    c = cfg.cluster
    nodes = c.nodes - c.rollout_nodes
    if nodes < 1:
        raise SystemExit(f"error: cluster.rollout_nodes={c.rollout_nodes} (--rollout-nodes) leaves no node to train on "
                         f"(cluster.nodes={c.nodes})")
    fleet = f" (+{c.rollout_nodes} rollout node{'s' * (c.rollout_nodes > 1)})" if c.rollout_nodes else ""
    return plan_layout(cfg, nodes * c.gpus_per_node, f"{nodes} node{'s' * (nodes > 1)} x {c.gpus_per_node} GPUs{fleet}",
                       keys=f"cluster.nodes={c.nodes} - cluster.rollout_nodes={c.rollout_nodes} x "
                            f"cluster.gpus_per_node={c.gpus_per_node}" if c.rollout_nodes else
                       f"cluster.nodes={c.nodes} x cluster.gpus_per_node={c.gpus_per_node}",
                       gpus_per_node=c.gpus_per_node, nodes=nodes)


def is_cpu_job(cfg) -> bool:
    """cluster.gpus_per_node=0 or parallel.device=cpu: a CPU job (refused with cuda + 0 GPUs)."""
    c, p = cfg.cluster, cfg.parallel
    if c.gpus_per_node == 0 and p.device == "cuda":
        raise SystemExit("error: cluster.gpus_per_node=0 (--gpus-per-node 0) asks for a CPU partition, but "
                         "parallel.device=cuda; set parallel.device=cpu (or auto), or ask for GPUs")
    return c.gpus_per_node == 0 or p.device == "cpu"


def job_layout(cfg) -> tuple[Layout, bool]:
    """(layout, CPU job) of the Slurm job cfg asks for. A CPU job's layout is fixed in cfg
    (parallel.device=cpu, parallel.dp set): the job spawns exactly those ranks."""
    if not is_cpu_job(cfg):
        return cluster_layout(cfg), False
    c, p = cfg.cluster, cfg.parallel
    if c.nodes > 1:
        raise SystemExit(f"error: a CPU job runs on one node (megatron-trace spawns its gloo ranks there), but "
                         f"cluster.nodes={c.nodes}; set --nodes 1 (cluster.nodes=1) and ask for cores with "
                         "--cpus-per-node (cluster.cpus_per_node)")
    if c.cpus_per_node:
        world, where, keys = c.cpus_per_node, f"{c.cpus_per_node} cores on 1 node", \
            f"cluster.cpus_per_node={c.cpus_per_node}"
    else:
        world = p.tp * p.pp * (p.dp or 1)
        where, keys = f"{world} core{'s' * (world > 1)} on 1 node", "cluster.cpus_per_node=null: tp x pp x dp cores"
    lay = plan_layout(cfg, world, where, keys=keys)
    p.device, p.dp = "cpu", lay.dp
    return lay, True
