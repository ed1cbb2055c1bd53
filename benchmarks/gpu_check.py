"""GPU check for one H100/H200-class GPU: what production runs, nothing downloaded, under 8
minutes. Prints one table:

1. bf16 GEMM peak (torch, 8192^3, best of several): the scale for the rows below;
2. GPU k-means as the fit stage runs it (`fit_kmeans(use_gpu=True)`: faiss-gpu when installed,
   else the torch k-means) on a 500,000 x 768 sample, k = 50,000, 10 iterations, with a decaying
   spectrum (like real embeddings, unlike isotropic noise), fitted twice: the same bytes;
3. nearest-prototype search as a score worker runs it: `NearestPrototype(use_gpu=True)` (the
   `auto` backend), `search(x)` on a host array of raw rows of the same
   distribution, default chunking (sized from the free GPU memory): rows/s, the share of
   rows re-checked in fp32, exactness against fp64 on a subset;
4. SemDeDup evidence (`dedup.duplicate_flags`) on ~20,000 rows on the GPU against the CPU
   and the float64 brute force;
5. the embedder as a worker runs it: `TorchEmbedder` (autocast bf16 on CUDA) over a MiniLM-L6-
   shaped BERT with random weights (same cost per row; the real weights are not on the GPU
   machine), texts tokenised by a hash of their words.

Runs with what the GPU machine has: torch, numpy, pyarrow, transformers; no faiss, no Ray
(faiss-gpu is measured only when installed).

    bash benchmarks/gpu_check.sh          # or: python benchmarks/gpu_check.py --quick
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

ROWS: list[tuple[str, str, str]] = []
DEV = "cuda"  # --cpu-smoke runs the same code on the CPU at tiny sizes (logic check only)


def row(check: str, value: str, note: str = "") -> None:
    ROWS.append((check, value, note))
    print(f"  {check}: {value} {note}", flush=True)


def sync():
    import torch

    if DEV == "cuda":
        torch.cuda.synchronize()


def gemm_peak(n: int = 8192, reps: int = 10) -> float:
    import torch

    a = torch.randn(n, n, device=DEV, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=DEV, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    sync()
    best = 1e-9
    for _ in range(reps):
        t = time.perf_counter()
        for _ in range(5):
            a @ b
        sync()
        best = max(best, 5 * 2 * n**3 / (time.perf_counter() - t))
    return best / 1e12


class Spectrum:
    """Rows near random centres, both with a decaying spectrum (variance of component i
    ~ 1 / (i + 1)), generated on the device, returned raw (not normalised)."""

    def __init__(self, d: int, centres: int, seed: int):
        import torch

        self.gen = torch.Generator(device=DEV).manual_seed(seed)
        self.scale = torch.arange(1, d + 1, device=DEV, dtype=torch.float32) ** -0.5
        self.c = torch.randn(centres, d, device=DEV, generator=self.gen) * self.scale
        self.d = d

    def rows(self, n: int):
        import torch

        j = torch.randint(0, self.c.shape[0], (n,), device=DEV, generator=self.gen)
        noise = torch.randn(n, self.d, device=DEV, generator=self.gen) * self.scale
        return (self.c[j] + 0.5 * noise) * 3.0

    def host(self, n: int, step: int = 1 << 18) -> np.ndarray:
        out = np.empty((n, self.d), np.float32)
        for a in range(0, n, step):
            b = min(n, a + step)
            out[a:b] = self.rows(b - a).cpu().numpy()
        return out


def kmeans_check(data: Spectrum, n: int, k: int, iters: int):
    from scoring.kernels.kmeans import fit_kmeans, fit_kmeans_torch

    x = data.host(n)
    fit = fit_kmeans if DEV == "cuda" else _cpu_fit(fit_kmeans_torch)
    t0 = time.perf_counter()
    c1, inertia, st = fit(x, k, iters, "cosine", 0, use_gpu=True)
    secs = time.perf_counter() - t0
    c2, _, _ = fit(x, k, iters, "cosine", 0, use_gpu=True)
    same = c1.tobytes() == c2.tobytes()
    row(
        f"k-means {n:,} x {x.shape[1]}, k={k:,}, {iters} iters "
        f"({st.get('backend', 'torch')} {st.get('precision', '')}), fitted twice",
        f"{secs:.1f} s",
        f"{'same bytes' if same else 'DIFFERENT BYTES'} in both fits; "
        f"{st['iterations']} iterations, inertia {inertia:.4g}",
    )
    return c1


def _cpu_fit(fit_torch):
    def fit(x, k, iters, metric, seed, use_gpu):
        from scoring.kernels.devices import normalize

        return fit_torch(normalize(x), k, iters, metric, seed, device="cpu")

    return fit


def search_check(data: Spectrum, centroids: np.ndarray, n: int, peak: float) -> None:
    import torch

    from scoring.kernels.assign import NearestPrototype

    k, d = centroids.shape
    x = data.host(n)
    if DEV == "cuda":
        s = NearestPrototype(centroids, "cosine", use_gpu=True, backend="auto")
    else:  # the smoke test runs the GPU's backend on the CPU
        s = NearestPrototype(centroids, "cosine", backend="torch")
    s.search(x[: min(n, 65536)])  # warm-up
    if s._torch is not None:
        s._torch.stats = dict.fromkeys(s._torch.stats, 0)
    s.canonical.stats = dict.fromkeys(s.canonical.stats, 0)
    sync()
    t0 = time.perf_counter()
    cl, dist, _ = s.search(x)
    secs = time.perf_counter() - t0
    st = s.stats
    # exactness against fp64 on a subset (on the device)
    m = min(n, 4096)
    sub = torch.from_numpy(x[:m]).to(DEV).double()
    sub = sub / sub.norm(dim=1, keepdim=True)
    top2 = (sub @ torch.from_numpy(centroids).to(DEV).double().T).topk(2, dim=1)
    clear = ((top2.values[:, 0] - top2.values[:, 1]) > 1e-6).cpu().numpy()
    want = top2.indices[:, 0].cpu().numpy()
    wrong = int(((cl[:m] != want) & clear).sum())
    derr = float(np.abs(dist[:m].astype(np.float64) - (1 - top2.values[:, 0].cpu().numpy())).max())
    flops = 2.0 * n * k * d
    chunk = s._torch.chunk_rows if s._torch is not None else "faiss default"
    rows = max(st["canonical_rows"], 1)
    re = f"re-checked in fp32: {st['rechecked'] / rows:.2%} of rows; " if "rechecked" in st else ""
    re += f"closed among the candidates: {st['canonical_closed'] / rows:.2%}; "
    re += f"searched again in float64: {st['canonical_full'] / rows:.2%}; "
    row(
        f"search N={n:,} d={d} k={k:,}, host rows, NearestPrototype(use_gpu={DEV == 'cuda'}) "
        f"backend {s.backend}",
        f"{n / secs:,.0f} rows/s",
        f"{flops / secs / 1e12:.0f} TFLOP/s = {flops / secs / 1e12 / peak:.0%} of bf16 peak; "
        f"{re}chunk {chunk} rows; vs fp64 on {m} rows: {wrong} wrong clusters, "
        f"max |distance error| {derr:.1e}",
    )


def dedup_check(data: Spectrum, n: int) -> None:
    import torch

    from scoring.kernels.dedup import duplicate_flags, reference_flags

    gen = torch.Generator(device="cpu").manual_seed(5)
    x = data.host(n)
    src = torch.randint(0, n // 2, (n // 5,), generator=gen).numpy()
    dst = n // 2 + torch.randperm(n - n // 2, generator=gen)[: n // 5].numpy()
    x[dst] = x[src] * 1.01 + 0.002 * torch.randn(len(dst), x.shape[1], generator=gen).numpy()
    eps = 0.01
    t0 = time.perf_counter()
    gpu = duplicate_flags(x, eps, device=torch.device(DEV))
    secs = time.perf_counter() - t0
    cpu = duplicate_flags(x, eps, device=torch.device("cpu"))
    ref = reference_flags(x, eps)
    row(
        f"dedup evidence {n:,} x {x.shape[1]} on {DEV}",
        f"{secs:.2f} s",
        f"{int(gpu.sum())} duplicates; differs from the CPU in {int((gpu != cpu).sum())} rows, "
        f"from the float64 brute force in {int((gpu != ref).sum())} rows",
    )


def embed_check(rows: int, seq: int, batch: int) -> None:
    import pyarrow as pa
    import torch

    from scoring.embed.torch_embedder import TorchEmbedder

    try:
        from transformers import BertConfig, BertModel
    except ImportError:
        row("MiniLM-L6 embedding", "skipped", "transformers is not installed")
        return
    cfg = BertConfig(
        vocab_size=30522,
        hidden_size=384,
        num_hidden_layers=6,
        num_attention_heads=12,
        intermediate_size=1536,
        max_position_embeddings=512,
    )
    torch.manual_seed(2)
    model = BertModel(cfg)

    def preprocess(texts: list[str]) -> dict:
        """Word hashes as token ids, padded to `seq` (a tokenizer's cost is not measured)."""
        ids = torch.zeros(len(texts), seq, dtype=torch.long)
        for i, t in enumerate(texts):
            w = [1000 + hash(v) % 29000 for v in t.split()][:seq]
            ids[i, : len(w)] = torch.tensor(w)
        return {"input_ids": ids, "attention_mask": (ids > 0).long()}

    def forward(input_ids, attention_mask):
        h = model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        m = attention_mask.unsqueeze(2).to(h.dtype)
        return torch.nn.functional.normalize((h * m).sum(1) / m.sum(1), dim=1)

    emb = TorchEmbedder(
        model, preprocess, "text", "text", DEV, batch, "minilm-shape", forward=forward
    )
    words = "the quick brown fox jumps over a lazy dog near the river bank".split()
    texts = [" ".join(words[(i + j) % len(words)] for j in range(seq)) for i in range(rows)]
    emb.embed(pa.array(texts[:batch]))  # warm-up
    sync()
    t0 = time.perf_counter()
    out = emb.embed(pa.array(texts))
    sync()
    secs = time.perf_counter() - t0
    row(
        f"MiniLM-L6 embedding (TorchEmbedder, autocast {emb.dtype}, random weights, "
        f"{seq} tokens, batch {emb.batch_size})",
        f"{rows / secs:,.0f} rows/s",
        f"output {out.shape}, preprocessing included",
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="10x smaller sizes (a smoke test)")
    ap.add_argument("--cpu-smoke", action="store_true", help="tiny sizes on the CPU (logic only)")
    ap.add_argument("--no-real-model", action="store_true", help="kept for old command lines")
    args = ap.parse_args()
    import torch

    global DEV
    if args.cpu_smoke:
        DEV = "cpu"
    elif not torch.cuda.is_available():
        print("gpu_check: no CUDA device visible to torch; nothing to measure")
        sys.exit(2)
    q = 200 if args.cpu_smoke else (10 if args.quick else 1)
    name = torch.cuda.get_device_name(0) if DEV == "cuda" else "CPU smoke test"
    print(f"# gpu_check on {name}, torch {torch.__version__}", flush=True)
    t_all = time.perf_counter()
    peak = gemm_peak(8192 if DEV == "cuda" else 512, 10 if DEV == "cuda" else 2)
    row("bf16 GEMM peak (8192^3, torch)", f"{peak:.0f} TFLOP/s", name)
    data = Spectrum(768 if DEV == "cuda" else 64, 100_000 // q, seed=1)
    got: dict = {}
    steps = (
        ("k-means", lambda: got.update(c=kmeans_check(data, 500_000 // q, 50_000 // q, 10))),
        ("search", lambda: search_check(data, got["c"], 2_000_000 // q, peak)),
        ("dedup", lambda: dedup_check(data, 20_000 if DEV == "cuda" else 2_000)),
        (
            "embedding",
            lambda: embed_check(
                100_000 // q if DEV == "cuda" else 64,
                128 if DEV == "cuda" else 16,
                512 if DEV == "cuda" else 32,
            ),
        ),
    )
    for label, fn in steps:
        t0 = time.perf_counter()
        try:
            fn()
        except Exception as e:  # noqa: BLE001 - one failed row must not hide the others
            row(label, "FAILED", f"{type(e).__name__}: {str(e).splitlines()[0][:200]}")
        print(f"  ({label}: {time.perf_counter() - t0:.0f}s)", flush=True)
        if DEV == "cuda":
            torch.cuda.empty_cache()
    print()
    print(f"| check ({name}) | result | note |")
    print("|---|---|---|")
    for c, v, note in ROWS:
        print(f"| {c} | {v} | {note} |")
    print(f"total {time.perf_counter() - t_all:.0f}s")


if __name__ == "__main__":
    main()
