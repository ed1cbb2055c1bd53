"""Images: a column's rows as bytes (inline, by path through the input Store, or Hugging Face
`{bytes, path}` structs), decoded to RGB."""

from __future__ import annotations

import io

import pyarrow as pa

from scoring.embed.base import row_label
from scoring.errors import BadInput, first_line
from scoring.storage import Store


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
        raise BadInput(
            f"{where}: column '{column}' must hold image bytes (binary) or paths (string), "
            f"found {t}"
        )

    def label(i: int, path: str | None = None) -> str:
        return f"{where}: column '{column}' {row_label(ids, i)}" + (f" file {path}" if path else "")

    def from_path(i: int, p: str) -> tuple[bytes, str]:
        if store is None:
            raise BadInput(f"{label(i, p)}: image paths need an input store")
        try:
            key = store.key_of(p) if ("://" in p or p.startswith("/")) else p
        except ValueError:
            raise BadInput(
                f"{label(i, p)}: image path is not inside the input {store.uri()}"
            ) from None
        try:
            return store.get_bytes(key), label(i, store.uri(key))
        except FileNotFoundError:
            raise BadInput(f"{label(i, store.uri(key))}: image file not found") from None

    def get(i: int) -> tuple[bytes, str]:
        v = values[i]
        if not v.is_valid:
            raise BadInput(f"{label(i)}: null image")
        if kind == "bytes":
            return v.as_py(), label(i)
        if kind == "path":
            return from_path(i, v.as_py())
        d = v.as_py()
        if d.get("bytes"):
            return d["bytes"], label(i, d.get("path"))
        if d.get("path"):
            return from_path(i, d["path"])
        raise BadInput(f"{label(i)}: image struct has neither bytes nor path")

    return get


def decode_image(data: bytes, label: str):
    """PIL image in RGB; a BadInput naming the row (and file) when it cannot be decoded."""
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
        raise BadInput(f"{label}: cannot decode image ({first_line(e)})") from None
