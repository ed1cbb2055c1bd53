"""Embedders: turn a shard's content column into a float32 [n, d] matrix, on the worker.

An `Embedder` maps one Arrow column (precomputed embeddings, text, or images) to float32
embeddings. `ShardEmbedder` wraps one for a run: it reads a shard's id and content columns
through `Store` (`read`, IO only, so a worker can prefetch the next shard) and embeds them
(`embed`, compute). Normalisation for the cosine metric happens where the spine always did it
(`score_shard`, `sample_shard`), so every embedder's output is treated the same way.

Model specs (`--model`):

- ``DIR`` or ``NAME``: a sentence-transformers model (text), from a local folder or the
  Hugging Face cache; loaded with ``local_files_only=True`` (nothing is downloaded).
- ``open_clip:ARCH`` or ``open_clip:ARCH@WEIGHTS``: an open_clip model (images or text);
  WEIGHTS is a local checkpoint file or a pretrained tag already in the user's cache.
- ``timm:NAME`` or ``timm:NAME@FILE``: a timm model with its classifier removed
  (``num_classes=0``); weights from FILE, else from the user's cache.
- ``torchvision:NAME`` or ``torchvision:NAME@WEIGHTS``: a torchvision model with its head
  replaced by identity; WEIGHTS is a local state-dict file or a weights enum name
  (``IMAGENET1K_V1``) whose file is in the torch hub cache. Without WEIGHTS: random weights.
- ``module:factory``: ``factory()`` (no arguments) returns ``(model, preprocess)``; see
  `load_factory` for the exact contract.
"""

from __future__ import annotations

import importlib
import io
import logging
import os
import re
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Protocol

import numpy as np
import pyarrow as pa

from scoring.config import RunConfig
from scoring.shards import Shard, embedding_matrix, read_shard_columns
from scoring.storage import Store

log = logging.getLogger(__name__)

FACTORY_RE = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")
PREFIXES = ("open_clip:", "timm:", "torchvision:")
# Starting batch sizes when --embed-batch-size is not given; on CUDA a batch that runs out of
# memory is split in halves (and the smaller size kept), so the batch settles to what fits.
DEFAULT_BATCH = {("text", "cpu"): 128, ("text", "cuda"): 1024}
DEFAULT_BATCH.update({("image", "cpu"): 32, ("image", "cuda"): 256})
LOOKAHEAD_BATCHES = 2  # image batches decoded ahead of the model


class Embedder(Protocol):
    """Maps a column of one shard to float32 [n, dim] embeddings (not normalised)."""

    kind: str  # "embedding", "text" or "image"
    dim: int | None  # None until known (precomputed columns)

    def embed(
        self, values: pa.Array | pa.ChunkedArray, ids: pa.Array | None = None, where: str = ""
    ) -> np.ndarray: ...


def content_column(cfg: RunConfig) -> str:
    """The input column a run embeds: text, image, or the precomputed embedding column."""
    return cfg.text_column or cfg.image_column or cfg.embedding_column


def content_kind(cfg: RunConfig) -> str:
    return "text" if cfg.text_column else "image" if cfg.image_column else "embedding"


# -- precision ---------------------------------------------------------------------------------
def cpu_has_bf16() -> bool:
    """True when the CPU has native bf16 dot products (AVX512_BF16 or AMX)."""
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="ignore") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    return bool({"avx512_bf16", "amx_bf16"} & flags)
    except OSError:
        pass
    return False


def autocast_dtype(device: str):
    """The autocast dtype for inference on `device` (None = fp32).

    CUDA: bf16 where supported, else fp16. CPU: bf16 only with native bf16 instructions, where
    it measured 2.7x faster than fp32 for all-MiniLM-L6-v2 with 1 - cos <= 3e-5
    (benchmarks/README.md); elsewhere bf16 is emulated and slower, so fp32.
    PROTOPRUNE_PRECISION=fp32|bf16|fp16 overrides the choice.
    """
    import torch

    forced = os.environ.get("PROTOPRUNE_PRECISION", "").lower()
    if forced:
        table = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
        if forced not in table:
            raise ValueError(f"PROTOPRUNE_PRECISION={forced!r}: expected one of fp32, bf16, fp16")
        return table[forced]
    if device.startswith("cuda"):
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if cpu_has_bf16() else None


def _autocast(device: str, dtype):
    import contextlib

    import torch

    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast("cuda" if device.startswith("cuda") else "cpu", dtype=dtype)


# -- precomputed -------------------------------------------------------------------------------
class PrecomputedEmbedder:
    """The spine's path: a list<float> / fixed_size_list<float> column, validated."""

    kind = "embedding"

    def __init__(self, column: str):
        self.column = column
        self.dim: int | None = None

    def embed(self, values, ids=None, where: str = "") -> np.ndarray:
        x = embedding_matrix(values, where, self.column)
        self.dim = x.shape[1]
        return x


# -- sentence-transformers ---------------------------------------------------------------------
class SentenceTransformerEmbedder:
    """Text through `SentenceTransformer.encode` (length-sorted batches) under autocast."""

    kind = "text"

    def __init__(self, spec: str, column: str, device: str, batch_size: int | None):
        try:
            from sentence_transformers import SentenceTransformer
        except ImportError:
            raise _no_sentence_transformers(spec) from None
        try:
            self.model = SentenceTransformer(str(spec), device=device, local_files_only=True)
        except Exception as e:  # noqa: BLE001 - any load failure is a bad model spec
            raise ValueError(
                f"model '{spec}': not a sentence-transformers model folder nor a model in the "
                f"local Hugging Face cache (nothing is downloaded): {_first_line(e)}"
            ) from None
        self.model.eval()
        self.column = column
        self.device = device
        self.dtype = autocast_dtype(device)
        self.batch_size = batch_size or DEFAULT_BATCH[("text", _dev(device))]
        get_dim = (
            getattr(self.model, "get_embedding_dimension", None)
            or self.model.get_sentence_embedding_dimension
        )
        self.dim = int(get_dim())

    def embed(self, values, ids=None, where: str = "") -> np.ndarray:
        texts = text_list(values, ids, where, self.column)
        if not texts:
            return np.zeros((0, self.dim), np.float32)
        import torch

        with torch.inference_mode(), _autocast(self.device, self.dtype):
            x = self.model.encode(
                texts,
                batch_size=self.batch_size,
                convert_to_numpy=True,
                show_progress_bar=False,
            )
        return np.ascontiguousarray(x, dtype=np.float32)


def text_list(values, ids, where: str, column: str) -> list[str]:
    """The column as Python strings; nulls and non-string columns are user errors."""
    if isinstance(values, pa.ChunkedArray):
        values = values.combine_chunks() if values.num_chunks != 1 else values.chunk(0)
    t = values.type
    if not (pa.types.is_string(t) or pa.types.is_large_string(t)):
        raise ValueError(f"{where}: column '{column}' must hold text (string), found {t}")
    if values.null_count:
        row = int(np.nonzero(values.is_null().to_numpy(zero_copy_only=False))[0][0])
        raise ValueError(f"{where}: column '{column}' has a null text at {_id(ids, row)}")
    return values.to_pylist()


# -- torch modules (module:factory, open_clip, timm, torchvision) ------------------------------
class TorchEmbedder:
    """A torch module plus its preprocessing, batched, autocast, on one device.

    Images: `preprocess(PIL.Image in RGB) -> Tensor[C, H, W]`, decoded on a thread pool with
    LOOKAHEAD_BATCHES batches in flight ahead of the model. Text: `preprocess(list[str])`
    returns a Tensor or a mapping of Tensors (passed as keyword arguments). The module returns
    a Tensor [B, d] (or a tuple/list whose first element is one).
    """

    def __init__(
        self,
        model,
        preprocess: Callable,
        kind: str,
        column: str,
        device: str,
        batch_size: int | None,
        name: str,
        store: Store | None = None,
        threads: int | None = None,
        forward: Callable | None = None,
    ):
        import torch

        if not isinstance(model, torch.nn.Module):
            raise TypeError(
                f"model '{name}': the factory must return (torch.nn.Module, preprocess), "
                f"got a {type(model).__name__} as the module"
            )
        if not callable(preprocess):
            raise TypeError(f"model '{name}': preprocess must be callable")
        self.model = model.to(device).eval()
        self.forward = forward or self.model
        self.preprocess = preprocess
        self.kind, self.column, self.device, self.name = kind, column, device, name
        self.store = store
        self.dtype = autocast_dtype(device)
        self.batch_size = batch_size or DEFAULT_BATCH[(kind, _dev(device))]
        self.threads = threads or min(16, os.cpu_count() or 1)
        self._pool: ThreadPoolExecutor | None = None
        self.dim = self._probe()

    @property
    def pool(self) -> ThreadPoolExecutor:
        if self._pool is None:
            self._pool = ThreadPoolExecutor(self.threads, thread_name_prefix="decode")
        return self._pool

    def _probe(self) -> int:
        """Run one sample through preprocess + model: checks the contract, finds d."""
        if self.kind == "image":
            from PIL import Image

            batch = self._stack([self.preprocess(Image.new("RGB", (224, 224), (127, 127, 127)))])
        else:
            batch = self.preprocess(["probe"])
        try:
            out = self._run(batch)
        except Exception as e:  # noqa: BLE001
            raise TypeError(
                f"model '{self.name}': calling the module on a preprocessed sample failed: "
                f"{_first_line(e)}"
            ) from None
        return out.shape[1]

    def _stack(self, tensors: Sequence[Any]):
        import torch

        for t in tensors:
            if not isinstance(t, torch.Tensor):
                raise TypeError(
                    f"model '{self.name}': preprocess must return a torch.Tensor per image, "
                    f"got {type(t).__name__}"
                )
        return torch.stack(list(tensors))

    def _run(self, batch) -> np.ndarray:
        import torch

        with torch.inference_mode(), _autocast(self.device, self.dtype):
            if isinstance(batch, Mapping):
                out = self.forward(**{k: v.to(self.device) for k, v in batch.items()})
            else:
                out = self.forward(batch.to(self.device, non_blocking=True))
        if isinstance(out, (tuple, list)):
            out = out[0]
        if not isinstance(out, torch.Tensor) or out.ndim != 2:
            got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
            raise TypeError(
                f"model '{self.name}': the module must return a [batch, d] tensor, got {got}"
            )
        return out.float().cpu().numpy()

    def _run_fitting(self, batch, n: int) -> np.ndarray:
        """Run a batch; on CUDA out-of-memory split it in halves and keep the smaller size."""
        import torch

        try:
            return self._run(batch)
        except torch.cuda.OutOfMemoryError:
            if n <= 1:
                raise
            torch.cuda.empty_cache()
            half = n // 2
            self.batch_size = max(1, half)
            log.warning("%s: out of GPU memory at batch %d; using %d", self.name, n, half)
            if isinstance(batch, Mapping):
                a = {k: v[:half] for k, v in batch.items()}
                b = {k: v[half:] for k, v in batch.items()}
            else:
                a, b = batch[:half], batch[half:]
            return np.concatenate([self._run_fitting(a, half), self._run_fitting(b, n - half)])

    def embed(self, values, ids=None, where: str = "") -> np.ndarray:
        if isinstance(values, pa.ChunkedArray):
            values = values.combine_chunks() if values.num_chunks != 1 else values.chunk(0)
        n = len(values)
        if n == 0:
            return np.zeros((0, self.dim), np.float32)
        if self.kind == "text":
            texts = text_list(values, ids, where, self.column)
            parts = []
            for s in range(0, n, self.batch_size):
                chunk = texts[s : s + self.batch_size]
                parts.append(self._run_fitting(self.preprocess(chunk), len(chunk)))
            return np.concatenate(parts).astype(np.float32, copy=False)
        get = image_getter(values, ids, where, self.column, self.store)
        bs = self.batch_size
        starts = list(range(0, n, bs))
        pending: deque = deque()
        parts = []

        def load(i: int):
            return self.preprocess(decode_image(*get(i)))

        for s in starts:
            pending.append(self.pool.map(load, range(s, min(s + bs, n))))
            if len(pending) > LOOKAHEAD_BATCHES:
                batch = self._stack(list(pending.popleft()))
                parts.append(self._run_fitting(batch, len(batch)))
        while pending:
            batch = self._stack(list(pending.popleft()))
            parts.append(self._run_fitting(batch, len(batch)))
        return np.concatenate(parts).astype(np.float32, copy=False)


# -- images --------------------------------------------------------------------------------------
def image_getter(values: pa.Array, ids, where: str, column: str, store: Store | None):
    """A function row -> (bytes, label for errors): bytes columns, path/URL columns read
    through the input Store, or Hugging Face `{bytes, path}` structs."""
    t = values.type
    if pa.types.is_binary(t) or pa.types.is_large_binary(t):
        kind = "bytes"
    elif pa.types.is_string(t) or pa.types.is_large_string(t):
        kind = "path"
    elif pa.types.is_struct(t) and t.get_field_index("bytes") >= 0:
        kind = "struct"
    else:
        raise ValueError(
            f"{where}: column '{column}' must hold image bytes (binary) or paths (string), "
            f"found {t}"
        )

    def label(i: int, path: str | None = None) -> str:
        return f"{where}: column '{column}' {_id(ids, i)}" + (f" file {path}" if path else "")

    def from_path(i: int, p: str) -> tuple[bytes, str]:
        if store is None:
            raise ValueError(f"{label(i, p)}: image paths need an input store")
        try:
            key = store.key_of(p) if ("://" in p or p.startswith("/")) else p
        except ValueError:
            raise ValueError(
                f"{label(i, p)}: image path is not inside the input {store.uri()}"
            ) from None
        try:
            return store.get_bytes(key), label(i, store.uri(key))
        except FileNotFoundError:
            raise ValueError(f"{label(i, store.uri(key))}: image file not found") from None

    def get(i: int) -> tuple[bytes, str]:
        v = values[i]
        if not v.is_valid:
            raise ValueError(f"{label(i)}: null image")
        if kind == "bytes":
            return v.as_py(), label(i)
        if kind == "path":
            return from_path(i, v.as_py())
        d = v.as_py()
        if d.get("bytes"):
            return d["bytes"], label(i, d.get("path"))
        if d.get("path"):
            return from_path(i, d["path"])
        raise ValueError(f"{label(i)}: image struct has neither bytes nor path")

    return get


def decode_image(data: bytes, label: str):
    """PIL image in RGB; a ValueError naming the row (and file) when it cannot be decoded."""
    from PIL import Image, UnidentifiedImageError

    try:
        img = Image.open(io.BytesIO(data))
        img.load()
        return img.convert("RGB")
    except (
        UnidentifiedImageError,
        Image.DecompressionBombError,
        OSError,
        SyntaxError,
        ValueError,
    ) as e:
        raise ValueError(f"{label}: cannot decode image ({_first_line(e)})") from None


# -- loaders -----------------------------------------------------------------------------------
def load_embedder(
    cfg: RunConfig, in_store: Store | None = None, device: str = "cpu", threads: int | None = None
) -> Embedder:
    """The embedder a run's config asks for, loaded on `device` ("cpu" or "cuda")."""
    kind = content_kind(cfg)
    column = content_column(cfg)
    if kind == "embedding":
        return PrecomputedEmbedder(column)
    spec = str(cfg.model)
    bs = cfg.embed_batch_size
    if spec.startswith(PREFIXES):
        scheme, rest = spec.split(":", 1)
        name, _, weights = rest.partition("@")
        if not name:
            raise ValueError(f"model '{spec}': expected {scheme}:NAME[@WEIGHTS]")
        loader = {"open_clip": _open_clip, "timm": _timm, "torchvision": _torchvision}[scheme]
        model, pre, fwd = loader(spec, name, weights or None, kind)
        return TorchEmbedder(model, pre, kind, column, device, bs, spec, in_store, threads, fwd)
    if FACTORY_RE.match(spec) and not os.path.exists(spec):
        model, pre = load_factory(spec)
        return TorchEmbedder(model, pre, kind, column, device, bs, spec, in_store, threads)
    if kind == "image":
        raise ValueError(
            f"model '{spec}': unknown image model spec; use open_clip:ARCH[@WEIGHTS], "
            "timm:NAME[@FILE], torchvision:NAME[@WEIGHTS] or module:factory"
        )
    return SentenceTransformerEmbedder(spec, column, device, bs)


def _no_sentence_transformers(spec: str) -> ValueError:
    return ValueError(
        f"model '{spec}': sentence-transformers is not installed "
        "(pip install sentence-transformers, or protoprune[text])"
    )


class ModelLoadError(ValueError):
    """The model could not be loaded on a worker: a user error, the same for every shard."""


def check_model_spec(cfg: RunConfig) -> None:
    """Cheap checks on the driver, before any actor starts (no weights are loaded): the
    package of a prefixed spec is installed, a module:factory imports and names a callable, a
    sentence-transformers spec is a local folder or a cached model. Raises ValueError."""
    kind = content_kind(cfg)
    if kind == "embedding":
        return
    spec = str(cfg.model)
    if spec.startswith(PREFIXES):
        scheme = spec.split(":", 1)[0]
        _need(scheme, spec, {"open_clip": "open_clip_torch"}.get(scheme))
        return
    if FACTORY_RE.match(spec) and not os.path.exists(spec):
        mod_name, fn_name = spec.split(":", 1)
        try:
            mod = importlib.import_module(mod_name)
        except ImportError as e:
            raise ValueError(f"model '{spec}': cannot import module '{mod_name}' ({e})") from None
        if not callable(getattr(mod, fn_name, None)):
            raise ValueError(f"model '{spec}': module '{mod_name}' has no callable '{fn_name}'")
        return
    if kind == "image":
        raise ValueError(
            f"model '{spec}': unknown image model spec; use open_clip:ARCH[@WEIGHTS], "
            "timm:NAME[@FILE], torchvision:NAME[@WEIGHTS] or module:factory"
        )
    if os.path.isdir(spec):
        return
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise _no_sentence_transformers(spec) from None
    for repo in [spec] + ([f"sentence-transformers/{spec}"] if "/" not in spec else []):
        try:
            snapshot_download(repo, local_files_only=True)
            return
        except Exception:  # noqa: BLE001 - not cached (or not a repo id)
            continue
    raise ValueError(
        f"model '{spec}': not a local folder nor a model in the local Hugging Face cache "
        "(nothing is downloaded; give a folder, open_clip:/timm:/torchvision: or module:factory)"
    )


def load_factory(spec: str):
    """`module:factory` -> (model, preprocess).

    Contract: `module` is importable on every worker (installed, or on PYTHONPATH);
    `factory()` is called once per worker with no arguments and returns a 2-tuple
    `(model, preprocess)`: `model` a `torch.nn.Module` (moved to the worker's device and put in
    eval mode here) whose output for a batch is a float Tensor [batch, d] (or a tuple whose
    first element is one); `preprocess` for images takes one PIL image (RGB) and returns a
    Tensor [C, H, W] of a fixed shape; for text it takes a list of strings and returns a
    Tensor, or a mapping of Tensors passed to the model as keyword arguments.
    """
    mod_name, fn_name = spec.split(":", 1)
    try:
        mod = importlib.import_module(mod_name)
    except ImportError as e:
        raise ValueError(f"model '{spec}': cannot import module '{mod_name}' ({e})") from None
    fn = getattr(mod, fn_name, None)
    if not callable(fn):
        raise ValueError(f"model '{spec}': module '{mod_name}' has no callable '{fn_name}'")
    got = fn()
    if not (isinstance(got, tuple) and len(got) == 2):
        raise TypeError(
            f"model '{spec}': the factory must return a tuple (torch.nn.Module, preprocess), "
            f"got {type(got).__name__}"
        )
    return got


def _need(package: str, spec: str, pip_name: str | None = None):
    try:
        return importlib.import_module(package)
    except ImportError:
        raise ValueError(
            f"model '{spec}': the package '{package}' is not installed "
            f"(pip install {pip_name or package})"
        ) from None


def _open_clip(spec: str, name: str, weights: str | None, kind: str):
    oc = _need("open_clip", spec, "open_clip_torch")
    try:
        model, _, pre = oc.create_model_and_transforms(name, pretrained=weights)
    except Exception as e:  # noqa: BLE001
        raise ValueError(f"model '{spec}': open_clip could not load it: {_first_line(e)}") from None
    if kind == "image":
        return model, pre, model.encode_image
    tok = oc.get_tokenizer(name)
    return model, tok, model.encode_text


def _timm(spec: str, name: str, weights: str | None, kind: str):
    timm = _need("timm", spec)
    if kind != "image":
        raise ValueError(f"model '{spec}': timm models embed images, not text")
    try:
        if weights:
            model = timm.create_model(
                name, pretrained=True, num_classes=0, pretrained_cfg_overlay={"file": weights}
            )
        else:
            model = timm.create_model(name, pretrained=True, num_classes=0)
    except Exception as e:  # noqa: BLE001
        raise ValueError(f"model '{spec}': timm could not load it: {_first_line(e)}") from None
    cfg = timm.data.resolve_data_config({}, model=model)
    return model, timm.data.create_transform(**cfg), None


def _torchvision(spec: str, name: str, weights: str | None, kind: str):
    tv = _need("torchvision", spec)
    import torch

    if kind != "image":
        raise ValueError(f"model '{spec}': torchvision models embed images, not text")
    try:
        model = tv.models.get_model(name, weights=None)
    except Exception as e:  # noqa: BLE001
        raise ValueError(f"model '{spec}': torchvision has no model '{name}' ({e})") from None
    pre = None
    if weights and os.path.exists(weights):
        model.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
    elif weights:
        try:
            w = tv.models.get_model_weights(name)[weights]
        except KeyError:
            raise ValueError(f"model '{spec}': unknown weights '{weights}' for {name}") from None
        cached = os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(w.url))
        if not os.path.exists(cached):
            raise ValueError(
                f"model '{spec}': weights file {cached} is not in the torch hub cache "
                "(nothing is downloaded; give a local file as @PATH)"
            )
        model.load_state_dict(torch.load(cached, map_location="cpu", weights_only=True))
        pre = w.transforms()
    for head in ("fc", "classifier", "heads", "head"):
        if hasattr(model, head):
            setattr(model, head, torch.nn.Identity())
            break
    if pre is None:
        from torchvision import transforms as T

        pre = T.Compose(
            [
                T.Resize(256),
                T.CenterCrop(224),
                T.ToTensor(),
                T.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225]),
            ]
        )
    return model, pre, None


# -- the per-run wrapper -----------------------------------------------------------------------
class ShardEmbedder:
    """Reads and embeds the shards of one run; loads its model once (one per actor)."""

    def __init__(
        self, cfg: RunConfig, in_store: Store, device: str = "cpu", threads: int | None = None
    ):
        self.cfg, self.in_store, self.device = cfg, in_store, device
        self.column = content_column(cfg)
        self.embedder = load_embedder(cfg, in_store, device, threads)

    def where(self, shard: Shard) -> str:
        return f"{self.in_store.uri(shard.file)} (shard {shard.index})"

    def read(self, shard: Shard, columns: list[str] | None = None, pf=None) -> pa.Table:
        """The shard's id and content columns (IO only), validated. `pf`: the shard file's
        opened ParquetFile, if the caller has it (one footer read)."""
        where = self.where(shard)
        cols = columns or [self.cfg.id_column, self.column]
        table = read_shard_columns(self.in_store, shard, cols, where, pf)
        ids = table[self.cfg.id_column]
        if ids.null_count:
            raise ValueError(
                f"{where}: column '{self.cfg.id_column}' has {ids.null_count} null id(s)"
            )
        return table

    def embed(
        self, shard: Shard, table: pa.Table | None = None, rows: np.ndarray | None = None
    ) -> tuple[pa.Array, np.ndarray]:
        """(ids, float32 [n, d]) of the shard, or of its `rows` only (positions in the shard)."""
        where = self.where(shard)
        table = table if table is not None else self.read(shard)
        if rows is not None and len(rows) < table.num_rows:
            table = table.take(pa.array(rows))
        ids = table[self.cfg.id_column].combine_chunks()
        x = self.embedder.embed(table[self.column], ids, where)
        if x.size and not np.isfinite(x).all():
            row = int(np.nonzero(~np.isfinite(x).all(axis=1))[0][0])
            raise ValueError(
                f"{where}: column '{self.column}' has NaN or inf in the embedding of "
                f"{_id(ids, row)}"
            )
        return ids, x

    def __call__(self, shard: Shard) -> tuple[pa.Array, np.ndarray]:
        return self.embed(shard)


def device_for(use_gpu: bool) -> str:
    if not use_gpu:
        return "cpu"
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _dev(device: str) -> str:
    return "cuda" if device.startswith("cuda") else "cpu"


def _id(ids, row: int) -> str:
    if ids is None:
        return f"row {row}"
    return f"id {ids[row].as_py()!r}"


def _first_line(e: BaseException) -> str:
    s = str(e).strip()
    return s.splitlines()[0] if s else type(e).__name__


__all__ = [
    "Embedder",
    "ModelLoadError",
    "PrecomputedEmbedder",
    "SentenceTransformerEmbedder",
    "ShardEmbedder",
    "TorchEmbedder",
    "autocast_dtype",
    "content_column",
    "load_embedder",
    "load_factory",
]
