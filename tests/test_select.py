"""scoring.kernels (radix select, quotas) against brute-force references: exact keep sets with many ties."""

from __future__ import annotations

from fractions import Fraction

import numpy as np
import pyarrow as pa
import pytest

from scoring import strategies
from scoring.kernels.quotas import balanced_quotas, plan_cluster_ranges, select_per_cluster
from scoring.kernels.radix import (
    ThresholdSearch,
    float_key,
    gather_candidates,
    keep_mask,
    key_histogram,
    random_key,
    rank_order,
)
from tests.helpers import ref_hash, reference_keep


def rule_key(strategy, distance, ids, seed):
    return strategies.get(strategy).key(distance, ids, seed)


def key_bits(strategy):
    return strategies.get(strategy).key_bits


STRATEGIES = ["hard", "easy", "random"]


def make_rows(n: int, id_kind: str, seed: int = 0, k: int = 6):
    """Ids (shuffled), clusters, and distances drawn from a handful of values (many ties)."""
    rng = np.random.default_rng(seed)
    if id_kind == "int":
        ids = rng.permutation(np.arange(-n // 2, n - n // 2, dtype=np.int64) * 7919).tolist()
    else:
        alphabet = ["a", "ab", "b", "B", "é", "z", "aa", "ä", "0", "日"]
        ids = [f"{alphabet[i % len(alphabet)]}{i * 37 % 1000}-{i}" for i in range(n)]
        ids = [ids[i] for i in rng.permutation(n)]
    values = np.array([-0.0, 0.0, 0.125, 0.25, 0.5, 0.75, 1.5, -1e-7], np.float32)
    dist = values[rng.integers(0, len(values), size=n)]
    cluster = rng.integers(0, k, size=n).astype(np.int32)
    return ids, cluster, dist


def split(n: int, parts: int, seed: int) -> list[np.ndarray]:
    """Uneven random split of row positions into shards (some may be empty)."""
    rng = np.random.default_rng(seed)
    cuts = np.sort(rng.integers(0, n + 1, size=parts - 1))
    perm = rng.permutation(n)
    return np.split(perm, cuts)


def distributed_keep(ids, dist, strategy, n_keep, shards, seed=0, gather_cap=2_000_000):
    """Drive ThresholdSearch over shards exactly as ray_jobs.reduce does."""
    id_arr = pa.array(ids)
    parts = []
    for pos in shards:
        sid = id_arr.take(pa.array(pos, pa.int64()))
        parts.append((rule_key(strategy, dist[pos], sid, seed), sid))
    search = ThresholdSearch(n_keep, len(ids), key_bits(strategy), gather_cap=gather_cap)
    while (req := search.request()) is not None:
        mode, prefix, bits, limit = req
        tot = key_bits(strategy)
        for keys, sid in parts:
            if mode == "hist":
                search.add_histogram(key_histogram(keys, prefix, bits, tot))
            else:
                search.add_candidates(gather_candidates(keys, sid, prefix, bits, tot, limit))
        search.advance()
    kept = []
    for keys, sid in parts:
        m = keep_mask(keys, sid, search.result)
        kept.extend(sid.filter(pa.array(m)).to_pylist())
    return kept, search


@pytest.mark.parametrize("id_kind", ["int", "str"])
@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("gather_cap", [2_000_000, 3, 0])
def test_global_rules_exact_with_ties(id_kind, strategy, gather_cap):
    n = 600
    ids, _, dist = make_rows(n, id_kind, seed=len(strategy) + gather_cap)
    shards = split(n, 5, seed=gather_cap)
    for n_keep in [0, 1, 2, 17, n // 3, n // 2, n - 1, n]:
        kept, search = distributed_keep(ids, dist, strategy, n_keep, shards, 7, gather_cap)
        assert len(kept) == len(set(kept)) == n_keep
        assert set(kept) == reference_keep(ids, np.zeros(n, np.int32), dist, strategy, n_keep, 7)
        if gather_cap == 0 and 0 < n_keep < n:
            # every digit is refined before the exact boundary pass
            assert search.passes == key_bits(strategy) // 16 + 1


def test_multi_pass_refinement_is_used_with_small_cap():
    ids, _, dist = make_rows(500, "int", seed=3)
    _, s_big = distributed_keep(ids, dist, "hard", 250, split(500, 4, 1))
    _, s_small = distributed_keep(ids, dist, "hard", 250, split(500, 4, 1), gather_cap=3)
    assert s_big.passes == 2  # one histogram, one gather
    assert s_small.passes == 3  # two histograms (32-bit key), one gather


def test_all_rows_tied_sharding_independent():
    n = 300
    ids = list(range(n, 0, -1))
    dist = np.full(n, 0.5, np.float32)
    for seed in range(3):
        kept, _ = distributed_keep(ids, dist, "hard", 100, split(n, 7, seed), gather_cap=5)
        assert sorted(kept) == list(range(1, 101))


def test_float_key_order_matches_float_order():
    v = np.array([-np.inf, -2.0, -1e-30, -0.0, 0.0, 1e-30, 0.5, 2.0, np.inf], np.float32)
    k = float_key(v)
    assert k[3] == k[4]  # -0.0 and 0.0 tie
    assert (np.diff(k.astype(np.int64)) >= 0).all()
    assert (np.diff(k.astype(np.int64))[np.diff(v) > 0] > 0).all()


def test_random_key_matches_reference_hash():
    ints = [0, 1, -1, 2**62, -(2**63), 123456789]
    got = random_key(pa.array(ints, pa.int64()), 42)
    assert got.tolist() == [ref_hash(i, 42) for i in ints]
    strs = ["", "a", "é日", "id-17"]
    got = random_key(pa.array(strs), 42)
    assert got.tolist() == [ref_hash(s, 42) for s in strs]
    # read from the Arrow buffers: every string layout, slices and chunks give the same keys
    want = [ref_hash(s, 42) for s in strs]
    for typ in (pa.string(), pa.large_string(), pa.binary(), pa.large_binary()):
        arr = pa.array([s.encode() if "binary" in str(typ) else s for s in strs], typ)
        assert random_key(arr, 42).tolist() == want
        assert random_key(arr.slice(1, 2), 42).tolist() == want[1:3]
        assert random_key(pa.chunked_array([arr.slice(0, 1), arr.slice(1)]), 42).tolist() == want
    assert random_key(pa.array([], pa.string()), 42).tolist() == []
    assert random_key(pa.array(["", ""]), 42).tolist() == [ref_hash("", 42)] * 2
    # the key depends on the seed and not on the integer type width
    assert random_key(pa.array([5], pa.int32()), 1)[0] == random_key(pa.array([5]), 1)[0]
    assert random_key(pa.array([5]), 1)[0] != random_key(pa.array([5]), 2)[0]


def test_threshold_search_rejects_bad_n_keep():
    with pytest.raises(ValueError, match="n_keep"):
        ThresholdSearch(11, 10, 32)
    with pytest.raises(ValueError, match="n_keep"):
        ThresholdSearch(-1, 10, 32)


# -- balanced ---------------------------------------------------------------------------------
def ref_quotas(counts: list[int], n_keep: int) -> list[int]:
    """Direct reference with exact rationals: floor + largest remainders, ties to lower j."""
    m = sum(counts)
    exact = [Fraction(n_keep * c, m) for c in counts]
    q = [int(e) for e in exact]  # floor (non-negative)
    frac = [e - int(e) for e in exact]
    left = n_keep - sum(q)
    best = sorted(range(len(counts)), key=lambda j: (-frac[j], j))
    for j in best[:left]:
        q[j] += 1
    return q


@pytest.mark.parametrize("seed", range(6))
def test_balanced_quotas_match_reference(seed):
    rng = np.random.default_rng(seed)
    k = int(rng.integers(1, 30))
    counts = rng.integers(0, 50, size=k)
    counts[rng.random(k) < 0.2] = 0
    if counts.sum() == 0:
        counts[0] = 3
    m = int(counts.sum())
    for n_keep in sorted({0, 1, m // 3, m // 2, m - 1, m}):
        q = balanced_quotas(counts, n_keep)
        assert q.tolist() == ref_quotas(counts.tolist(), n_keep)
        assert int(q.sum()) == n_keep
        assert (q <= counts).all() and (q >= 0).all()


def test_balanced_quotas_ties_go_to_lower_index():
    # 3 equal clusters, keep 2: remainders all equal, the two lowest indices get the extra row
    assert balanced_quotas(np.array([5, 5, 5]), 2).tolist() == [1, 1, 0]
    # remainders 2/10·... : counts 3,3,4 of 10, keep 5 -> 1.5, 1.5, 2.0 -> +1 to cluster 0
    assert balanced_quotas(np.array([3, 3, 4]), 5).tolist() == [2, 1, 2]
    assert balanced_quotas(np.array([0, 0]), 0).tolist() == [0, 0]


def test_plan_cluster_ranges_cover_contiguously():
    counts = np.array([5, 0, 3, 9, 1, 1, 0, 20, 2])
    for max_rows in [1, 4, 6, 10, 100]:
        ranges = plan_cluster_ranges(counts, max_rows)
        assert ranges[0][0] == 0 and ranges[-1][1] == len(counts)
        assert all(a < b for a, b in ranges)
        assert all(ranges[i][1] == ranges[i + 1][0] for i in range(len(ranges) - 1))
        for a, b in ranges:
            # a range exceeds max_rows only when it holds a single non-empty cluster
            assert (counts[a:b] > 0).sum() <= 1 or counts[a:b].sum() <= max_rows


def scores_shards(ids, cluster, dist, shards):
    id_arr = pa.array(ids)
    out = []
    for pos in shards:
        t = pa.table(
            {
                "id": id_arr.take(pa.array(pos, pa.int64())),
                "cluster": pa.array(cluster[pos], pa.int32()),
                "distance": pa.array(dist[pos], pa.float32()),
            }
        )
        out.append(t)
    return out


@pytest.mark.parametrize("id_kind", ["int", "str"])
@pytest.mark.parametrize("max_rows", [1, 60, 10_000])
def test_balanced_exact_over_cluster_ranges(id_kind, max_rows):
    n, k = 500, 9
    ids, cluster, dist = make_rows(n, id_kind, seed=11, k=k)
    tables = scores_shards(ids, cluster, dist, split(n, 4, seed=2))
    counts = np.bincount(cluster, minlength=k)
    for n_keep in [0, 1, 123, n - 1, n]:
        quotas = balanced_quotas(counts, n_keep)
        kept = []
        for lo, hi in plan_cluster_ranges(counts, max_rows):
            part = pa.concat_tables(
                [
                    t.filter(
                        pa.array((t["cluster"].to_numpy() >= lo) & (t["cluster"].to_numpy() < hi))
                    )
                    for t in tables
                ]
            )
            sel = select_per_cluster(part, quotas)
            assert np.bincount(sel["cluster"].to_numpy(), minlength=k)[lo:hi].tolist() == (
                quotas[lo:hi].tolist()
            )
            kept.extend(sel["id"].to_pylist())
        assert len(kept) == len(set(kept)) == n_keep
        assert set(kept) == reference_keep(ids, cluster, dist, "balanced", n_keep)


@pytest.mark.parametrize("id_kind", ["int", "str"])
def test_rank_order_is_cluster_then_hardest_then_id(id_kind):
    """radix.rank_order (a packed-key argsort plus an id sort inside equal keys) against
    Python's sort of (cluster, -distance, id), with many exact ties, -0.0 equal to 0.0, and
    clusters in runs as concatenated shards give them."""
    rng = np.random.default_rng(5)
    n = 5000
    cluster = np.concatenate(
        [np.sort(rng.integers(0, 40, n // 2)), np.sort(rng.integers(0, 40, n - n // 2))]
    )
    distance = rng.choice(np.array([0.0, -0.0, 0.25, 0.5, 1.0, 1.5, 2.0], np.float32), n)
    distance[::7] = rng.random(len(distance[::7]), dtype=np.float32)
    raw = rng.permutation(n)
    ids = [f"id-{i:05d}" for i in raw] if id_kind == "str" else raw.tolist()
    t = pa.table({"id": ids, "cluster": pa.array(cluster, pa.int32()), "distance": distance})
    got = rank_order(t)
    want = sorted(range(n), key=lambda i: (int(cluster[i]), -float(distance[i]), ids[i]))
    assert got.tolist() == want
    assert rank_order(t.slice(0, 0)).tolist() == []
