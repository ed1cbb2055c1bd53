"""Text: sentence-transformers models, and a text column as Python strings."""

from __future__ import annotations

import os

import numpy as np
import pyarrow as pa

from scoring.embed.base import default_batch, row_label, single_array
from scoring.embed.precision import autocast, autocast_dtype
from scoring.errors import BadConfig, BadInput, first_line


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
            raise BadConfig(
                f"model '{spec}': not a sentence-transformers model folder nor a model in the "
                f"local Hugging Face cache (nothing is downloaded): {first_line(e)}"
            ) from None
        self.model.eval()
        self.column = column
        self.device = device
        self.dtype = autocast_dtype(device)
        self.batch_size = batch_size or default_batch("text", device)
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

        with torch.inference_mode(), autocast(self.device, self.dtype):
            x = self.model.encode(
                texts,
                batch_size=self.batch_size,
                convert_to_numpy=True,
                show_progress_bar=False,
            )
        return np.ascontiguousarray(x, dtype=np.float32)


def check_sentence_transformer(spec: str) -> None:
    """The driver's check (nothing loaded or downloaded): `spec` is a local folder, or a model
    in the local Hugging Face cache (as given, or under sentence-transformers/)."""
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
    raise BadConfig(
        f"model '{spec}': not a local folder nor a model in the local Hugging Face cache "
        "(nothing is downloaded; give a folder, open_clip:/timm:/torchvision: or module:factory)"
    )


def text_list(values, ids, where: str, column: str) -> list[str]:
    """The column as Python strings; nulls and non-string columns are user errors."""
    values = single_array(values)
    t = values.type
    if not (pa.types.is_string(t) or pa.types.is_large_string(t)):
        raise BadInput(f"{where}: column '{column}' must hold text (string), found {t}")
    if values.null_count:
        row = int(np.nonzero(values.is_null().to_numpy(zero_copy_only=False))[0][0])
        raise BadInput(f"{where}: column '{column}' has a null text at {row_label(ids, row)}")
    return values.to_pylist()


def _no_sentence_transformers(spec: str) -> BadConfig:
    return BadConfig(
        f"model '{spec}': sentence-transformers is not installed "
        "(pip install sentence-transformers, or protoprune[text])"
    )
