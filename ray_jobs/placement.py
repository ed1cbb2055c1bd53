"""How many workers the cluster can actually place, node by node.

Ray places a request whole on one node, and a fractional GPU request (0 < G < 1) on one GPU
of that node: a node with `g` GPUs and `c` CPUs holds min(g · floor(1/G), floor(c / C))
workers of G GPUs and C CPUs (G >= 1: floor(g / G) by GPUs). Counting GPUs across the cluster
instead (GPUs / G) made actors that Ray could never place, and a run that fed them shards
never finished. A request no node can hold fails at once, in one line.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

from scoring.config import RunConfig
from scoring.embed.base import content_kind
from scoring.errors import BadConfig

log = logging.getLogger("protoprune")

_TOL = 1e-6  # Ray keeps resource quantities to 4 decimals


@dataclass(frozen=True)
class Node:
    cpus: float
    gpus: float


def cluster_nodes() -> list[Node]:
    """The alive nodes' total CPU and GPU resources."""
    import ray

    out = []
    for nd in ray.nodes():
        if nd.get("Alive"):
            res = nd.get("Resources", {})
            out.append(Node(float(res.get("CPU", 0)), float(res.get("GPU", 0))))
    return out


def per_node(node: Node, gpus: float, cpus: float) -> int:
    """Workers of `gpus` GPUs and `cpus` CPUs that fit on `node` at once."""
    by_cpu = math.floor(node.cpus / cpus + _TOL) if cpus > 0 else None
    if gpus <= 0:
        return by_cpu if by_cpu is not None else math.floor(node.cpus + _TOL)
    whole = math.floor(node.gpus + _TOL)  # GPU instances on the node
    if gpus < 1:
        by_gpu = whole * math.floor(1 / gpus + _TOL)
    else:
        by_gpu = math.floor(node.gpus / gpus + _TOL)
    return by_gpu if by_cpu is None else min(by_gpu, by_cpu)


def placeable(nodes: list[Node], gpus: float, cpus: float) -> int:
    """Workers the whole cluster holds at once."""
    return sum(per_node(n, gpus, cpus) for n in nodes)


def describe(nodes: list[Node]) -> str:
    """'2 nodes: 4 GPU + 8 CPU, 0 GPU + 2 CPU'"""
    parts = [f"{n.gpus:g} GPU + {n.cpus:g} CPU" for n in nodes]
    return f"{len(nodes)} node(s): " + ", ".join(parts)


def worker_resources(cfg: RunConfig, n_shards: int) -> tuple[int, dict[str, float], bool]:
    """(actors, ray resource options, use_gpu) of the ShardWorker pool.

    Default: one actor per GPU (num_gpus=1) when the cluster has GPUs, else one per CPU.
    --gpus-per-worker G (fractions allowed up to 1, whole numbers above) and --cpus-per-worker
    C size each actor; the count is what the nodes hold at once (module docstring).
    --workers caps it."""
    nodes = cluster_nodes()
    gpus = sum(n.gpus for n in nodes)
    g = cfg.gpus_per_worker if cfg.gpus_per_worker is not None else (1.0 if gpus else 0.0)
    c = cfg.cpus_per_worker if cfg.cpus_per_worker is not None else 1.0
    if g > 0 and gpus == 0:
        raise BadConfig(f"gpus_per_worker = {g} but the Ray cluster has no GPU")
    if g > 1 and abs(g - round(g)) > _TOL:
        raise BadConfig(
            f"gpus_per_worker = {g}: Ray takes fractions of one GPU or a whole number of GPUs"
        )
    n = placeable(nodes, g, c)
    if n < 1:
        raise BadConfig(
            f"gpus_per_worker = {g:g}, cpus_per_worker = {c:g}: no node can hold one worker "
            f"(the cluster has {describe(nodes)})"
        )
    if cfg.workers and cfg.workers > n:
        # An actor that cannot be placed never starts; shards sent to it would wait forever.
        log.warning("--workers %d > %d worker slots in the cluster; using %d", cfg.workers, n, n)
    n = max(1, min(cfg.workers or n, n, n_shards))
    if g == 0 and cfg.cpus_per_worker is None and content_kind(cfg) == "embedding":
        c = widest(nodes, n)
    return n, {"num_gpus": g, "num_cpus": c}, g > 0


def widest(nodes: list[Node], n: int) -> float:
    """The most whole CPUs per worker with which the CPU-only cluster still holds `n` workers
    at once (1 when it holds no more than n one-CPU workers).

    A pool smaller than the cluster (an update that scores one new shard, a run of a few big
    shards) then uses every core: Ray sets each actor's OMP_NUM_THREADS to its CPUs, which
    the search's GEMM and top-m, and Arrow's decode, follow. Only for precomputed embeddings,
    whose scores are the same bytes for any thread count (kernels.canonical); a model's
    embeddings may round differently with another thread count, so model runs keep 1 CPU."""
    c = 1
    while placeable(nodes, 0.0, c + 1) >= n:
        c += 1
    return float(c)


def gpu_task_share(nodes: list[Node] | None = None) -> float:
    """The GPU fraction of a one-CPU task that lets every CPU of a GPU node run one at once:
    1 / the most CPUs per GPU of any GPU node (rounded down to Ray's 4 decimals). 0 without
    GPUs."""
    nodes = cluster_nodes() if nodes is None else nodes
    ratios = [n.cpus / math.floor(n.gpus + _TOL) for n in nodes if n.gpus >= 1 and n.cpus >= 1]
    if not ratios:
        return 0.0
    per_gpu = max(1, math.ceil(max(ratios) - _TOL))
    return math.floor(10_000 / per_gpu) / 10_000
