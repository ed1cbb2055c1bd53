"""Layout-independent results: the same files under other `--shard-rows` and worker counts give
byte-identical prototypes and identical keep lists (issue 17), on a real local Ray.

The k-means sample is drawn over the input's row groups (kernels.sampling): the reference
below rebuilds it from the whole data set, one row group at a time, with no shard in sight, and
fits k-means on it in this process.
"""

from __future__ import annotations

import hashlib
import io

import numpy as np
import pyarrow.parquet as pq
import pytest

from ray_jobs.driver import run
from scoring import commit
from scoring.config import RunConfig
from scoring.kernels.devices import normalize
from scoring.kernels.kmeans import fit_kmeans
from scoring.kernels.sampling import sample_plan, unit_rows
from scoring.storage import Store
from tests.helpers import clustered, read_all, reference_keep, write_dataset

N, D, K, SAMPLE, GROUP = 4000, 16, 8, 150, 200
LAYOUTS = [(400, 1), (1500, 2), (400, 2), (1500, 1)]  # (--shard-rows, --workers)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Three files of 200-row row groups (the last of each shorter); a tenth of the rows are
    exact copies of others (tied distances, dedup at eps 0.01)."""
    root = tmp_path_factory.mktemp("layout")
    rng = np.random.default_rng(7)
    x = clustered(N, D, K, seed=7)
    dup = rng.random(N) < 0.1
    x[dup] = x[rng.integers(0, N, size=int(dup.sum()))]
    ids = (rng.permutation(N).astype(np.int64) * 7 + 3).tolist()
    inp = Store(str(root / "in"))
    keys = write_dataset(inp, x, ids, files=3, row_group_rows=GROUP)
    return root, x, ids, keys


def run_layout(data, strategy: str, shard_rows: int, workers: int) -> Store:
    root, _, _, _ = data
    cfg = RunConfig(
        input=str(root / "in"),
        output=str(root / "out"),
        run_id=f"{strategy}-{shard_rows}-{workers}",
        k=K,
        kmeans_iters=8,
        sample_size=SAMPLE,
        shard_rows=shard_rows,
        workers=workers,
        strategy=strategy,
        keep_fraction=0.4,
    )
    run(cfg, quiet=True)
    return Store(cfg.output).child(cfg.run_id)


def reference_sample(data) -> np.ndarray:
    """The sample rows in canonical (file, row group, row) order, from the whole data set."""
    root, x, _, keys = data
    inp = Store(str(root / "in"))
    units, starts, o = [], [], 0  # rows of each row group, and its first row in x
    for key in keys:
        md = pq.ParquetFile(io.BytesIO(inp.get_bytes(key))).metadata
        for g in range(md.num_row_groups):
            units.append(md.row_group(g).num_rows)
            starts.append(o)
            o += units[-1]
    assert o == N and len(units) > 3 * len(keys)  # several row groups per file
    counts = sample_plan(units, SAMPLE, seed=0)
    picked = np.flatnonzero(counts)
    assert 1 < len(picked) < len(units) // 2  # reads a few row groups, in several files
    rows = [starts[u] + unit_rows(units[u], int(counts[u]), 0, int(u)) for u in picked]
    return normalize(x[np.concatenate(rows)])


def scores_by_id(store: Store) -> dict:
    t = read_all(store, "scores/")
    return dict(zip(t["id"].to_pylist(), zip(t["cluster"].to_pylist(), t["distance"].to_pylist())))


def keep_list(store: Store) -> list:
    return sorted(read_all(store, "keep/")["id"].to_pylist())


@pytest.mark.parametrize("strategy", ["auto", "hard"])
def test_same_prototypes_and_keep_list_under_any_layout(ray_local, data, strategy):
    layouts = LAYOUTS if strategy == "auto" else LAYOUTS[:2]
    stores = [run_layout(data, strategy, *lay) for lay in layouts]
    plans = [len(commit.read_json(s, "run.json")["shards"]) for s in stores]
    assert len(set(plans[:2])) == 2  # the shard plans really differ
    blobs = [s.get_bytes("prototypes/centroids.npy") for s in stores]
    shas = {hashlib.sha256(b).hexdigest() for b in blobs}
    assert len(shas) == 1, shas  # byte-identical centroids
    # the committed centroids are k-means on the reference sample, fitted here
    sample = reference_sample(data)
    marker = commit.read_json(stores[0], "prototypes/_COMMITTED.json")
    assert marker["sample_rows"] == len(sample) == SAMPLE
    # with the backend the run resolved (auto: torch bf16 on a CPU with native bf16)
    assert marker["requested_backend"] == "auto" and marker["iterations"] == 8
    want, _, _ = fit_kmeans(sample, K, 8, "cosine", 0, backend=marker["backend"])
    got = np.load(io.BytesIO(blobs[0]))
    np.testing.assert_allclose(got, want, atol=1e-5)
    # every row's cluster and distance, bit for bit (float32 values compared exactly)
    scores = [scores_by_id(s) for s in stores]
    assert len(scores[0]) == N and all(sc == scores[0] for sc in scores[1:])
    keeps = [keep_list(s) for s in stores]
    assert all(k == keeps[0] for k in keeps[1:])
    assert len(keeps[0]) == int(0.4 * N)
    if strategy == "hard":  # and it is the single-process pick over the written scores
        sc = scores[0]
        ids = list(sc)
        cl = np.array([sc[i][0] for i in ids])
        dist = np.array([sc[i][1] for i in ids], np.float32)
        assert set(keeps[0]) == reference_keep(ids, cl, dist, "hard", int(0.4 * N))
