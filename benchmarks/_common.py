"""Shared helpers of the scale benchmarks: synthetic data, GEMM peaks, process-tree memory,
a private local Ray and a local S3 server. Linux only (memory is read from /proc)."""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
import threading
import time
import uuid

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
os.environ["PYTHONPATH"] = os.pathsep.join(
    [ROOT] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
)
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, os.path.join(ROOT, "tests"))
from s3server import S3Server  # noqa: E402 - the tests' loopback S3 server


# -- data ------------------------------------------------------------------------------------
def clustered_chunk(rng, centers: np.ndarray, n: int, noise: float) -> np.ndarray:
    lab = rng.integers(0, len(centers), size=n)
    x = centers[lab] + noise * rng.standard_normal((n, centers.shape[1]), dtype=np.float32)
    return x.astype(np.float32, copy=False)


def write_embeddings(
    root: str,
    n: int,
    d: int,
    files: int = 10,
    row_group_rows: int = 50_000,
    clusters: int = 2000,
    noise: float = 0.6,
    seed: int = 0,
    chunk: int = 250_000,
) -> list[str]:
    """n rows of clustered d-dim float32 embeddings (fixed_size_list) and int64 ids, in
    `files` Parquet files under root, generated and written chunk by chunk (bounded memory).
    Returns the file paths. Skips the work when the files already exist with the same shape."""
    os.makedirs(root, exist_ok=True)
    tag = os.path.join(root, f"_DONE-{n}-{d}-{files}-{row_group_rows}-{seed}")
    paths = [os.path.join(root, f"part-{f:04d}.parquet") for f in range(files)]
    if os.path.exists(tag):
        return paths
    rng = np.random.default_rng(seed)
    centers = rng.standard_normal((clusters, d), dtype=np.float32)
    bounds = np.linspace(0, n, files + 1).astype(np.int64)
    schema = pa.schema([("id", pa.int64()), ("embedding", pa.list_(pa.float32(), d))])
    for f in range(files):
        with pq.ParquetWriter(paths[f], schema) as w:
            for a in range(int(bounds[f]), int(bounds[f + 1]), chunk):
                b = min(int(bounds[f + 1]), a + chunk)
                x = clustered_chunk(rng, centers, b - a, noise)
                emb = pa.FixedSizeListArray.from_arrays(pa.array(x.reshape(-1)), d)
                t = pa.table({"id": pa.array(np.arange(a, b, dtype=np.int64)), "embedding": emb})
                w.write_table(t, row_group_size=row_group_rows)
    open(tag, "w").close()
    return paths


def bench_dir(name: str, base: str | None = None) -> str:
    base = base or os.environ.get("PP_BENCH_DIR") or os.path.join(tempfile.gettempdir(), "pp-bench")
    p = os.path.join(base, name)
    os.makedirs(p, exist_ok=True)
    return p


# -- peaks -----------------------------------------------------------------------------------
def blas_kernels() -> str:
    """Which kernels each loaded BLAS runs (threadpoolctl), faiss's own OpenBLAS included:
    faiss-cpu wheels bundle an older OpenBLAS that may not know a recent CPU and fall back to
    SSE3 kernels ("Prescott"), ~4x slower than its AVX-512 ones (OPENBLAS_CORETYPE=SkylakeX
    forces those); numpy's OpenBLAS is a separate, newer library."""
    try:
        import faiss  # noqa: F401 - loads its BLAS
        import threadpoolctl
    except ImportError:
        return "unknown (threadpoolctl or faiss missing)"
    libs = [
        f"{os.path.basename(i['filepath']).split('-')[0]} {i.get('version')}: {i.get('architecture')}"
        for i in threadpoolctl.threadpool_info()
        if i.get("internal_api") == "openblas"
    ]
    return "; ".join(libs) or "no OpenBLAS loaded"


def gemm_peak_fp32(n: int = 2048, reps: int = 5) -> float:
    """GFLOP/s of a square fp32 matmul through numpy's BLAS (faiss-cpu bundles its own:
    `blas_kernels`), best of reps."""
    a = np.random.default_rng(0).standard_normal((n, n), dtype=np.float32)
    b = a.copy()
    a @ b
    best = 0.0
    for _ in range(reps):
        t = time.perf_counter()
        a @ b
        best = max(best, 2 * n**3 / (time.perf_counter() - t) / 1e9)
    return best


def gemm_peak_torch(dtype: str = "bf16", n: int = 2048, reps: int = 5, device: str = "cpu"):
    import torch

    dt = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[dtype]
    a = torch.randn(n, n, device=device).to(dt)
    b = torch.randn(n, n, device=device).to(dt)
    a @ b
    best = 0.0
    for _ in range(reps):
        if device != "cpu":
            torch.cuda.synchronize()
        t = time.perf_counter()
        a @ b
        if device != "cpu":
            torch.cuda.synchronize()
        best = max(best, 2 * n**3 / (time.perf_counter() - t) / 1e9)
    return best


def loadavg() -> float:
    return os.getloadavg()[0]


# -- process-tree memory ---------------------------------------------------------------------
def _children(pid: int) -> list[int]:
    out = []
    try:
        for tid in os.listdir(f"/proc/{pid}/task"):
            try:
                with open(f"/proc/{pid}/task/{tid}/children") as f:
                    out += [int(c) for c in f.read().split()]
            except OSError:
                pass
    except OSError:
        pass
    return out


def tree(pid: int) -> list[int]:
    seen, todo = [], [pid]
    while todo:
        p = todo.pop()
        seen.append(p)
        todo += _children(p)
    return seen


def _mem(pid: int) -> tuple[int, int]:
    """(RSS, PSS) in bytes; PSS splits shared pages (Ray's object store) among processes."""
    rss = pss = 0
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Rss:"):
                    rss = int(line.split()[1]) * 1024
                elif line.startswith("Pss:"):
                    pss = int(line.split()[1]) * 1024
    except OSError:
        pass
    return rss, pss


class TreeMemory:
    """Samples the summed RSS and PSS of a process and all its descendants (driver, Ray's
    GCS, raylet, workers) every `interval` seconds in a thread; keeps the peaks."""

    def __init__(self, pid: int | None = None, interval: float = 0.25):
        self.pid = pid or os.getpid()
        self.interval = interval
        self.peak_rss = self.peak_pss = 0
        self.peak_procs = 0
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(self.interval)

    def sample(self) -> tuple[int, int]:
        pids = tree(self.pid)
        rss = pss = 0
        for p in pids:
            r, s = _mem(p)
            rss += r
            pss += s
        self.peak_rss = max(self.peak_rss, rss)
        self.peak_pss = max(self.peak_pss, pss)
        self.peak_procs = max(self.peak_procs, len(pids))
        return rss, pss

    def reset(self) -> None:
        self.peak_rss = self.peak_pss = 0

    def __enter__(self) -> TreeMemory:
        self._t.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._t.join()
        self.sample()


def gib(b: float) -> str:
    return f"{b / 2**30:.2f} GiB"


# -- Ray and S3 ------------------------------------------------------------------------------
def init_ray(num_cpus: int | None = None, object_store_bytes: int | None = None) -> str:
    """A private embedded Ray (own temp dir, no dashboard). Returns the temp dir."""
    import ray

    tmp = tempfile.mkdtemp(prefix="pp-bench-ray-")
    kw = {}
    if object_store_bytes:
        kw["object_store_memory"] = object_store_bytes
    ray.init(
        num_cpus=num_cpus or os.cpu_count(),
        include_dashboard=False,
        _temp_dir=tmp,
        logging_level="WARNING",
        log_to_driver=False,
        **kw,
    )
    return tmp


def shutdown_ray(tmp: str) -> None:
    import ray

    ray.shutdown()
    shutil.rmtree(tmp, ignore_errors=True)


class LocalS3(S3Server):
    """The tests' moto_server on 127.0.0.1 at a free port; also sets the AWS environment for
    this process and the Ray workers started after it."""

    def __init__(self) -> None:
        super().__init__()
        os.environ.update(self.env())

    def new_bucket(self) -> str:
        import boto3

        name = f"pp-bench-{uuid.uuid4().hex[:10]}"
        boto3.client("s3", endpoint_url=self.endpoint).create_bucket(Bucket=name)
        return name

    def upload(self, paths: list[str], bucket: str, prefix: str) -> str:
        import boto3

        c = boto3.client("s3", endpoint_url=self.endpoint)
        for p in paths:
            c.upload_file(p, bucket, f"{prefix}/{os.path.basename(p)}")
        return f"s3://{bucket}/{prefix}"


def header(title: str) -> None:
    print(f"# {title}")
    print(
        f"# host: {os.cpu_count()} CPUs, load average {loadavg():.1f} at start "
        f"({time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())})"
    )
