"""A small synthetic dataset for the quick start: clustered embeddings in a few Parquet files."""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from scoring.errors import BadConfig
from scoring.storage import Store


def make_demo(
    out: str,
    rows: int = 200_000,
    dim: int = 64,
    clusters: int = 40,
    files: int = 4,
    row_group_rows: int = 10_000,
    seed: int = 0,
    storage_options=None,
) -> list[str]:
    """Write `files` Parquet files of (id int64, embedding fixed_size_list<float32>, label).

    Rows come from `clusters` Gaussian blobs of different spreads and sizes, so the prototype
    distance varies between and inside clusters; ~1% are exact near-duplicates of another row.
    """
    if rows < 1 or files < 1 or dim < 2 or clusters < 1:
        raise BadConfig(
            f"demo: rows, files, dim and clusters must be positive (rows={rows}, "
            f"files={files}, dim={dim}, clusters={clusters})"
        )
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(clusters, dim)).astype(np.float32)
    centers /= np.linalg.norm(centers, axis=1, keepdims=True)
    weights = rng.dirichlet(np.full(clusters, 2.0))
    spread = rng.uniform(0.05, 0.35, size=clusters).astype(np.float32)
    label = rng.integers(0, 10, size=clusters)
    store = Store(out, storage_options)
    keys = []
    bounds = np.linspace(0, rows, files + 1).astype(np.int64)
    for f in range(files):
        n = int(bounds[f + 1] - bounds[f])
        c = rng.choice(clusters, size=n, p=weights)
        x = centers[c] + rng.normal(size=(n, dim)).astype(np.float32) * spread[c, None]
        dup = rng.random(n) < 0.01
        if n > 1:
            src = rng.integers(0, n, size=int(dup.sum()))
            x[dup] = x[src] + rng.normal(size=(int(dup.sum()), dim)).astype(np.float32) * 1e-4
        ids = np.arange(bounds[f], bounds[f + 1], dtype=np.int64)
        emb = pa.FixedSizeListArray.from_arrays(pa.array(x.reshape(-1), pa.float32()), dim)
        table = pa.table(
            {
                "id": ids,
                "embedding": emb,
                "label": pa.array(label[c], pa.int32()),
                "text": pa.array(
                    [f"demo item {i} from topic {t}" for i, t in zip(ids.tolist(), c.tolist())]
                ),
            }
        )
        key = f"part-{f:05d}.parquet"
        store.write_parquet(key, table, row_group_size=row_group_rows)
        keys.append(store.uri(key))
    return keys
