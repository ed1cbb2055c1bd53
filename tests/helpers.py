"""Test data builders and single-process brute-force references."""

from __future__ import annotations

import hashlib

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from scoring.storage import Store


def init_local_ray(temp_dir: str) -> None:
    """The tests' embedded local Ray: 2 CPUs, no dashboard, its session logs in temp_dir."""
    import ray

    ray.init(
        num_cpus=2,
        include_dashboard=False,
        _temp_dir=temp_dir,
        logging_level="WARNING",
        log_to_driver=False,
    )


def clustered(n: int, d: int, c: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(c, d)).astype(np.float32)
    lab = rng.integers(0, c, size=n)
    return (centers[lab] + 0.3 * rng.normal(size=(n, d))).astype(np.float32)


def emb_array(x: np.ndarray, kind: str = "fixed", dtype=pa.float32()) -> pa.Array:
    n, d = x.shape
    values = pa.array(x.reshape(-1).astype(dtype.to_pandas_dtype()), dtype)
    if kind == "fixed":
        return pa.FixedSizeListArray.from_arrays(values, d)
    offsets = pa.array(np.arange(0, n * d + 1, d, dtype=np.int32))
    if kind == "large":
        return pa.LargeListArray.from_arrays(pa.array(offsets.to_numpy().astype(np.int64)), values)
    return pa.ListArray.from_arrays(offsets, values)


def write_dataset(
    store: Store,
    x: np.ndarray,
    ids,
    files: int = 3,
    row_group_rows=None,
    kind: str = "fixed",
    dtype=pa.float32(),
    prefix: str = "data",
) -> list[str]:
    """Split rows over `files` Parquet files, each with row groups of uneven sizes."""
    n = len(x)
    bounds = np.linspace(0, n, files + 1).astype(int)
    keys = []
    for f in range(files):
        a, b = bounds[f], bounds[f + 1]
        t = pa.table({"id": pa.array(ids[a:b]), "embedding": emb_array(x[a:b], kind, dtype)})
        key = f"{prefix}/part-{f:03d}.parquet"
        import io

        buf = io.BytesIO()
        rg = row_group_rows or max(1, (b - a) // 3 + f * 7 + 1)
        pq.write_table(t, buf, row_group_size=rg)
        store.put_bytes(key, buf.getvalue())
        keys.append(key)
    return keys


def read_all(store: Store, prefix: str) -> pa.Table:
    keys = store.list(prefix, suffix=".parquet")
    return pa.concat_tables([store.read_parquet(k) for k in keys])


def reference_keep(
    ids: list, cluster: np.ndarray, dist: np.ndarray, strategy: str, n_keep: int, seed: int = 0
) -> set:
    """What one process picks by sorting all N rows (DESIGN §5), written independently."""
    rows = list(zip(ids, cluster.tolist(), dist.astype(np.float32).tolist()))
    if strategy == "hard":
        rows.sort(key=lambda r: (-r[2], r[0]))
        return {r[0] for r in rows[:n_keep]}
    if strategy == "easy":
        rows.sort(key=lambda r: (r[2], r[0]))
        return {r[0] for r in rows[:n_keep]}
    if strategy == "random":
        rows.sort(key=lambda r: (ref_hash(r[0], seed), r[0]))
        return {r[0] for r in rows[:n_keep]}
    if strategy == "balanced":
        return reference_per_cluster(rows, cluster, n_keep, "hardest", seed)
    if strategy == "auto":  # after its dedup: a stratified random sample (README "Strategies")
        return reference_per_cluster(rows, cluster, n_keep, "random", seed)
    raise ValueError(strategy)


def reference_per_cluster(rows: list, cluster: np.ndarray, n_keep: int, within: str, seed: int):
    """Largest-remainder quotas, then the first q_j rows of each cluster in `within` order."""
    m = len(rows)
    k = int(cluster.max()) + 1 if len(cluster) else 0
    nj = [0] * k
    for r in rows:
        nj[r[1]] += 1
    q = [n_keep * c // m for c in nj] if m else []
    rem = [n_keep * c % m for c in nj] if m else []
    for j in sorted(range(k), key=lambda j: (-rem[j], j))[: n_keep - sum(q)]:
        q[j] += 1
    order = {
        "hardest": lambda r: (-r[2], r[0]),
        "easiest": lambda r: (r[2], r[0]),
        "random": lambda r: (ref_hash(r[0], seed), r[0]),
    }[within]
    out = set()
    for j in range(k):
        members = sorted((r for r in rows if r[1] == j), key=order)
        out |= {r[0] for r in members[: q[j]]}
    return out


def ref_hash(i, seed: int) -> int:
    """Independent scalar implementation of the documented random key."""
    M = (1 << 64) - 1

    def sm(z: int) -> int:
        z = (z + 0x9E3779B97F4A7C15) & M
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & M
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & M
        return z ^ (z >> 31)

    if isinstance(i, int):
        return sm((i & M) ^ sm(seed & M))
    key = (seed & M).to_bytes(8, "little")
    return int.from_bytes(hashlib.blake2b(str(i).encode(), digest_size=8, key=key).digest(), "big")
