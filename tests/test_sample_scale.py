"""The k-means sample at scale: few row groups per shard, a memory cap, the torch k-means."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from scoring.config import RunConfig
from scoring.inputs.parquet import plan_shards
from scoring.kernels.devices import normalize
from scoring.kernels.kmeans import fit_kmeans, fit_kmeans_torch
from scoring.kernels.sampling import sample_groups, sample_size_rule
from scoring.stages.sample import sample_shard, sample_subshard
from scoring.storage import Store
from tests.helpers import clustered, emb_array


def test_sample_groups_reads_few_groups_and_is_deterministic():
    groups = [1000] * 50
    picked, rows = sample_groups(groups, 100, seed=3, shard_index=7)
    assert sum(groups[i] for i in picked) >= 800  # 8x the share
    assert len(picked) == 1  # one group of 1000 holds 8 x 100
    assert len(rows) == 100 and len(set(rows.tolist())) == 100
    assert rows.min() >= 0 and rows.max() < 1000 * len(picked)
    again = sample_groups(groups, 100, seed=3, shard_index=7)
    assert again[0] == picked and np.array_equal(again[1], rows)
    other = sample_groups(groups, 100, seed=3, shard_index=8)
    assert (other[0], other[1].tolist()) != (picked, rows.tolist())
    # a large share takes several groups; sorted; empty groups never picked
    groups2 = [300, 0, 500, 200, 0, 400]
    p2, r2 = sample_groups(groups2, 120, seed=0, shard_index=0)
    assert p2 == sorted(p2) and all(groups2[i] for i in p2)
    assert sum(groups2[i] for i in p2) >= min(1400, 960)
    # the share is the whole shard: everything
    p3, r3 = sample_groups(groups2, 1400, seed=0, shard_index=0)
    assert p3 == [0, 2, 3, 5] and np.array_equal(r3, np.arange(1400))


def test_sample_size_rule_caps_memory_but_never_below_k():
    assert sample_size_rule(256_000, 10**9, 1000, 768) == 256_000
    assert sample_size_rule(256_000, 10_000, 1000, 768) == 10_000
    cap = sample_size_rule(12_800_000, 10**9, 50_000, 768, max_bytes=8 << 30)
    assert cap == (8 << 30) // (4 * 768)
    assert sample_size_rule(10**6, 10**9, 5000, 768, max_bytes=1000) == 5000
    assert sample_size_rule(10**6, 10**9, 5000, None) == 10**6


def test_sample_shard_reads_the_picked_row_groups_only(tmp_path):
    store = Store(str(tmp_path / "in"))
    x = clustered(4000, 8, 5, seed=1)
    ids = np.arange(4000) * 3
    t = pa.table({"id": pa.array(ids), "embedding": emb_array(x)})
    (tmp_path / "in").mkdir()
    pq.write_table(t, str(tmp_path / "in" / "a.parquet"), row_group_size=250)
    _, shards, _ = plan_shards(store, 2000)
    assert len(shards) == 2
    cfg = RunConfig(input=str(tmp_path / "in"), output=str(tmp_path / "out"), metric="l2", k=2)
    sh = shards[1]
    sub, rows = sample_subshard(store.parquet_file(sh.file), sh, 50, cfg.seed)
    assert len(sub.row_groups) == 2  # 2 x 250 rows >= 8 x 50
    assert set(sub.row_groups) <= set(sh.row_groups)
    got = sample_shard(cfg, store, sh, 50)
    # the expected rows, computed from the full table independently of the reader
    starts = {g: g * 250 for g in range(16)}
    global_rows = np.concatenate([np.arange(starts[g], starts[g] + 250) for g in sub.row_groups])
    np.testing.assert_array_equal(got, x[global_rows[rows]])


def test_torch_kmeans_matches_faiss_quality_on_cpu():
    x = normalize(clustered(6000, 16, 12, seed=2))
    c_t, inertia_t, st = fit_kmeans_torch(x, 12, 10, "cosine", seed=0, device="cpu")
    c_f, inertia_f, _ = fit_kmeans(x, 12, 10, "cosine", seed=0)
    assert c_t.shape == (12, 16) and st["iterations"] == 10 and st["backend"] == "torch"
    np.testing.assert_allclose(np.linalg.norm(c_t, axis=1), 1.0, atol=1e-5)
    # mean similarity to the nearest centroid, evaluated independently of either fit
    q_t = (x @ c_t.T).max(1).mean()
    q_f = (x @ c_f.T).max(1).mean()
    assert q_t >= q_f - 0.02
    assert inertia_t == pytest.approx((x @ c_t.T).max(1).sum(), rel=0.05)
    cl, il2, _ = fit_kmeans_torch(clustered(3000, 8, 6), 6, 8, "l2", seed=1, device="cpu")
    assert cl.shape == (6, 8) and np.isfinite(il2)


def test_committed_reads_many_markers_in_parallel_and_skips_torn_ones(tmp_path):
    from scoring import commit, layout

    st = Store(str(tmp_path / "run"))
    for i in range(200):
        commit.write_marker(st, "scores", i, {"rows": i, "prototypes_sha256": "p"})
    st.put_bytes(layout.marker_key("scores", 200), b'{"rows": ')  # torn
    st.put_bytes("_commits/scores/notes.json", b"{}")  # not a marker
    got = commit.committed(st, "scores")
    assert sorted(got) == list(range(200))
    assert all(got[i]["rows"] == i and got[i]["shard"] == i for i in got)
    assert commit.committed(st, "scores", threads=1) == got
