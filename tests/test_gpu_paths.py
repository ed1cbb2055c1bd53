"""The GPU code paths, run on this CPU machine (issue 18): the out-of-memory fallback of the
embedder, deterministic torch k-means, the fp32 re-check kept in full fp32 whatever the global
matmul precision, and the search's chunk size."""

from __future__ import annotations

import weakref

import numpy as np
import pytest
import torch

from scoring.embed.torch_embedder import TorchEmbedder


class OomAbove(torch.nn.Module):
    """A model that raises torch's CUDA out-of-memory error above `limit` rows, or while the
    work tensor of an earlier pass is still alive (memory a failed pass still holds, as on a
    GPU where that pass's tensors stay allocated until its traceback goes)."""

    def __init__(self, limit: int):
        super().__init__()
        self.lin = torch.nn.Linear(4, 6)
        self.limit = limit
        self.calls: list[tuple[int, bool]] = []
        self.held: list[weakref.ref] = []

    def forward(self, x):
        n = x.shape[0]
        work = torch.empty(n, 1024)  # this pass's activations
        if any(r() is not None for r in self.held):
            self.calls.append((n, False))
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (a failed pass's memory)")
        self.held.append(weakref.ref(work))
        if n > self.limit:
            self.calls.append((n, False))
            raise torch.cuda.OutOfMemoryError(f"CUDA out of memory at {n} rows")
        self.calls.append((n, True))
        return self.lin(x)


def features(texts: list[str]) -> dict:
    """preprocess: a mapping of tensors (passed as keyword arguments)."""
    rows = [[len(t), sum(map(ord, t)) % 97, t.count("a"), ord(t[-1]) % 13] for t in texts]
    return {"x": torch.tensor(rows, dtype=torch.float32)}


def test_out_of_memory_halves_once_then_keeps_the_size(monkeypatch):
    import pyarrow as pa

    monkeypatch.setenv("PROTOPRUNE_PRECISION", "fp32")
    torch.manual_seed(0)
    model = OomAbove(limit=8)
    emb = TorchEmbedder(model, features, "text", "text", "cpu", 64, "oom-model")
    texts = [f"row {i} " + "a" * (i % 7) + chr(98 + i % 20) for i in range(200)]
    model.calls.clear()
    got = emb.embed(pa.array(texts))
    failed = [n for n, ok in model.calls if not ok]
    ran = [n for n, ok in model.calls if ok]
    # 64, 32 and 16 fail once each; every later batch runs at 8 (the text loop's step follows)
    assert failed == [64, 32, 16], model.calls
    assert max(ran) == 8 and sum(ran) == 200
    assert emb.batch_size == 8
    with torch.no_grad():
        want = model.lin(features(texts)["x"]).numpy()
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
    model.calls.clear()
    again = emb.embed(pa.array(texts[:50]))
    assert all(ok for _, ok in model.calls) and max(n for n, _ in model.calls) == 8
    np.testing.assert_allclose(again, want[:50], rtol=1e-6, atol=1e-6)


def test_out_of_memory_at_one_row_is_raised(monkeypatch):
    import pyarrow as pa

    monkeypatch.setenv("PROTOPRUNE_PRECISION", "fp32")
    model = OomAbove(limit=1)
    emb = TorchEmbedder(model, features, "text", "text", "cpu", 4, "oom-model")
    model.limit = 0  # now even one row does not fit
    with pytest.raises(torch.cuda.OutOfMemoryError):
        emb.embed(pa.array(["abc", "abd"]))


# -- k-means -----------------------------------------------------------------------------------
def test_segment_sum_matches_float64_reference():
    from scoring.kernels.kmeans import segment_sum

    rng = np.random.default_rng(4)
    x = rng.normal(size=(5000, 16)).astype(np.float32)
    j = rng.integers(0, 37, size=5000)
    out = torch.zeros(40, 16, dtype=torch.float64)
    segment_sum(out, torch.from_numpy(j), torch.from_numpy(x))
    want = np.zeros((40, 16))
    np.add.at(want, j, x.astype(np.float64))
    np.testing.assert_allclose(out.numpy(), want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("metric, k, data_seed, seed", [("cosine", 4, 5, 4), ("l2", 6, 9, 15)])
def test_torch_kmeans_same_bytes_and_lloyd_means(metric, k, data_seed, seed):
    """Two fits give the same bytes; one iteration's centroids are the float64 means of the
    rows nearest each seeded start row (data and seed picked so that no row is within 0.05
    of a tie: the bf16 assignment is the exact one)."""
    from helpers import clustered

    from scoring.kernels.devices import normalize
    from scoring.kernels.kmeans import fit_kmeans_torch

    x = clustered(3000, 12, k, seed=data_seed)
    x = normalize(x) if metric == "cosine" else x
    a = fit_kmeans_torch(x, k, 6, metric, seed=seed, device="cpu")[0]
    b = fit_kmeans_torch(x, k, 6, metric, seed=seed, device="cpu")[0]
    assert a.tobytes() == b.tobytes()
    one = fit_kmeans_torch(x, k, 1, metric, seed=seed, device="cpu")[0]
    gen = torch.Generator(device="cpu").manual_seed(seed)
    start = x[torch.randperm(len(x), generator=gen)[:k].numpy()].astype(np.float64)
    x64 = x.astype(np.float64)
    if metric == "cosine":
        score = x64 @ start.T
    else:
        score = -((x64[:, None, :] - start[None]) ** 2).sum(2)
    top2 = np.sort(score, 1)[:, -2:]
    assert (top2[:, 1] - top2[:, 0]).min() > 0.05  # the precondition
    lab = score.argmax(1)
    want = np.stack([x64[lab == c].mean(0) for c in range(k)])
    if metric == "cosine":
        want /= np.linalg.norm(want, axis=1, keepdims=True)
    np.testing.assert_allclose(one, want, rtol=1e-5, atol=1e-5)


# -- the fp32 re-check -------------------------------------------------------------------------
def test_search_stays_full_fp32_after_a_global_precision_change():
    """torch.set_float32_matmul_precision("medium") lets oneDNN run fp32 matmuls in bf16 on
    CPUs with bf16 instructions (TF32 on CUDA for "high"); the search's results keep their
    bytes, and the process's setting is back afterwards."""
    from scoring.kernels.assign import NearestPrototype
    from scoring.kernels.devices import exact_fp32, normalize

    rng = np.random.default_rng(0)
    c = normalize(rng.normal(size=(300, 64)).astype(np.float32))
    x = normalize(
        (c[rng.integers(0, 300, 5000)] + 0.3 * rng.normal(size=(5000, 64))).astype(np.float32)
    )
    want = NearestPrototype(c, "cosine", backend="torch").search(x)
    seen = []
    try:
        for p in ("high", "medium"):
            torch.set_float32_matmul_precision(p)
            got = NearestPrototype(c, "cosine", backend="torch").search(x)
            for u, v in zip(want, got):
                assert u.tobytes() == v.tobytes(), p
            assert torch.get_float32_matmul_precision() == p
            with exact_fp32():
                seen.append(torch.get_float32_matmul_precision())
                assert not torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction
            assert torch.get_float32_matmul_precision() == p
    finally:
        torch.set_float32_matmul_precision("highest")
    assert seen == ["highest", "highest"]


# -- chunk size --------------------------------------------------------------------------------
def test_search_chunk_rows_from_free_memory():
    from scoring.kernels.devices import search_chunk_rows

    gib = 1 << 30
    big = search_chunk_rows(50_000, 768, 120 * gib)  # an H200, mostly free
    assert big * 50_000 < 2**31 and big >= 40_000  # was ~1,300 rows from a 256 MB budget
    small = search_chunk_rows(50_000, 768, 4 * gib)
    assert 256 <= small < big and small % 256 == 0
    assert small * (8 * 50_000 + 32 * 768) <= gib  # a quarter of the free memory
    assert search_chunk_rows(100, 768, 120 * gib) == 1 << 20
    assert search_chunk_rows(1000, 64, None) == (32 << 20) // 4000  # CPU: cache-sized
