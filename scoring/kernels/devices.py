"""Row normalisation and the one place that probes devices (CUDA, faiss-gpu, native bf16)."""

from __future__ import annotations

import contextlib
import functools
import threading

import numpy as np


def normalize(x: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """L2-normalised float32 copy of the rows (zero rows stay zero); `out=x` normalises a
    float32 array in place (the same bytes, no n x d allocation).

    One read pass for the squared norms (einsum, no n x d temporary) and one fused
    multiply into the output: about 3x faster than norm-then-divide on large shards.
    """
    x = np.asarray(x, dtype=np.float32)
    if x.ndim != 2 or x.size == 0:
        return x.astype(np.float32, copy=True)
    sq = np.einsum("ij,ij->i", x, x)
    bad = ~np.isfinite(sq)
    if bad.any():  # float32 overflow of huge (finite) values: redo those rows in float64
        sq = sq.astype(np.float64)
        sq[bad] = np.einsum("ij,ij->i", x[bad].astype(np.float64), x[bad].astype(np.float64))
    norms = np.sqrt(sq)
    norms[norms == 0] = 1.0
    out = np.empty_like(x) if out is None else out
    np.multiply(x, (1.0 / norms).astype(np.float32)[:, None], out=out)
    return out


def row_norms(x: np.ndarray) -> np.ndarray:
    """‖x_i‖ as float32, one pass without an n × d temporary."""
    return np.sqrt(np.einsum("ij,ij->i", x, x)).astype(np.float32)


def torch_cuda() -> bool:
    """True when torch is installed and sees a CUDA device."""
    try:
        import torch

        return bool(torch.cuda.is_available())
    except Exception:  # noqa: BLE001 - no torch, or a broken CUDA install
        return False


def has_faiss_gpu() -> bool:
    """True when the faiss module is a GPU build and sees a GPU."""
    try:
        import faiss

        return hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0
    except Exception:  # noqa: BLE001
        return False


def device_for(use_gpu: bool) -> str:
    """ "cuda" when asked for and present, else "cpu"."""
    return "cuda" if use_gpu and torch_cuda() else "cpu"


def torch_device():
    """The torch device for block products: CUDA when present, else CPU."""
    import torch

    return torch.device("cuda" if torch_cuda() else "cpu")


@functools.lru_cache(maxsize=1)
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags (/proc/cpuinfo; empty where there is none)."""
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="ignore") as f:
            for line in f:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def cpu_has_bf16() -> bool:
    """True when the CPU has native bf16 dot products (AVX512_BF16 or AMX)."""
    return bool({"avx512_bf16", "amx_bf16"} & cpu_flags())


def cpu_has_amx() -> bool:
    """True when the CPU exposes AMX tiles for bf16 (amx_bf16)."""
    return "amx_bf16" in cpu_flags()


def product_precision(device: str) -> str:
    """The precision of the large matrix products (k-means assignment, search candidates)
    on `device`: "bf16" on CUDA (tensor cores) and on CPUs with AMX, "fp32" elsewhere.

    AVX512_BF16 alone is not enough: on a Sapphire Rapids VM that exposes it but not AMX,
    torch's bf16 matmul (oneDNN brg_matmul:avx512_core_bf16) ran 119-146 GFLOP/s on 2 cores
    against 243-267 for fp32 (MKL), while hosts with the tile units measured bf16 at ~3.5x
    fp32. A flag rule, not a timing: the k-means centroids depend on the precision, and the
    same machine must pick the same one on every run (the search's result does not: it is
    canonical)."""
    if str(device).startswith("cuda"):
        return "bf16"
    return "bf16" if cpu_has_amx() else "fp32"


_COUNT_LOCK = threading.Lock()


def count(stats: dict, **add: int) -> None:
    """stats[key] += n for each key, safely from several threads (a search cut into row
    ranges counts from each)."""
    with _COUNT_LOCK:
        for key, n in add.items():
            stats[key] = stats.get(key, 0) + n


@contextlib.contextmanager
def torch_threads(n: int):
    """torch's intra-op threads set to n inside (threads started inside take n too), the
    previous count back after."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@contextlib.contextmanager
def exact_fp32():
    """fp32 matmuls in full fp32 inside (no TF32, no bf16 passes) and fp32 accumulation in
    bf16/fp16 GEMMs, whatever the process set before (a model factory's
    `torch.set_float32_matmul_precision("high")`, say); the previous settings come back after.
    Entered on every search call: an exactness proof must not rest on a global flag."""
    import torch

    mm = torch.backends.cuda.matmul
    reductions = (
        mm.allow_bf16_reduced_precision_reduction,
        mm.allow_fp16_reduced_precision_reduction,
    )
    try:
        before = torch.get_float32_matmul_precision()
        per_backend = None
    except RuntimeError:  # the process mixed the old and the per-backend precision API
        before, per_backend = None, _per_backend_precision(torch)
    torch.set_float32_matmul_precision("highest")
    mm.allow_bf16_reduced_precision_reduction = False
    mm.allow_fp16_reduced_precision_reduction = False
    try:
        yield
    finally:
        if before is not None:
            torch.set_float32_matmul_precision(before)
        else:
            for obj, value in per_backend:
                obj.fp32_precision = value
        mm.allow_bf16_reduced_precision_reduction, mm.allow_fp16_reduced_precision_reduction = (
            reductions
        )


def _per_backend_precision(torch) -> list[tuple[object, str]]:
    """(backend, fp32_precision) of torch >= 2.9's per-backend API, the global one first."""
    b = torch.backends
    objs = [b, b.cuda.matmul, b.mkldnn.matmul, b.cudnn.conv, b.mkldnn.conv]
    return [(o, o.fp32_precision) for o in objs if hasattr(o, "fp32_precision")]


def search_chunk_rows(k: int, d: int, free_bytes: int | None) -> int:
    """Rows per chunk of the torch search: a quarter of the device's free memory (CUDA), for
    the [rows, k] score matrix and the per-row work (8 bytes per score: bf16 scores, fp32 l2
    scores and the fp32 re-check; 32 per dimension); rows · k < 2^31 (int32 indexing); a
    multiple of 256. `free_bytes` None (CPU): a 32 MB score matrix that stays in cache."""
    k = max(k, 1)
    if free_bytes is None:
        return max(256, min(65536, (32 << 20) // (4 * k)))
    rows = (free_bytes // 4) // (8 * k + 32 * d)
    rows = min(rows, ((1 << 31) - 1) // k, 1 << 20)
    return max(256, rows // 256 * 256)


def free_cuda_bytes(device) -> int:
    """Free memory of a CUDA device, in bytes."""
    import torch

    return int(torch.cuda.mem_get_info(device)[0])
