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
