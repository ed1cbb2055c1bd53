"""The content of example rows (text, or image thumbnails), read from their input shards."""

from __future__ import annotations

import base64
import io
import logging
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from scoring.inputs.parquet import Shard, read_groups
from scoring.report.data import Example, ReportData
from scoring.storage import Store

log = logging.getLogger(__name__)

THUMB_PX = 96
MAX_TEXT = 300


def attach_content(
    store: Store,
    data: ReportData,
    run: dict[str, Any],
    column: str,
    shards: list[Shard],
    items: list[Example],
) -> None:
    """Read `column` of the examples' ids from their input shards (shard N of the plan); an
    example whose shard is not known keeps no content. A missing column is not fatal: the
    page says which column and file."""
    cfg = run.get("config", {})
    id_col = cfg.get("id_column", "id")  # the input's id column (a setting, not a layout name)
    url = run.get("input", {}).get("url")
    if not url:
        return
    in_store = Store(url, store.storage_options)
    wanted: dict[int, set] = {}
    for e in items:
        if e.shard is not None:
            wanted.setdefault(e.shard, set()).add(e.id)
    found: dict[Any, Any] = {}
    by_index = {s.index: s for s in shards}
    try:
        for idx, ids in sorted(wanted.items()):
            shard = by_index[idx]
            pf = in_store.parquet_file(shard.file)
            if column not in pf.schema_arrow.names:
                raise ValueError(
                    f"{in_store.uri(shard.file)}: column '{column}' not found "
                    f"(columns: {', '.join(pf.schema_arrow.names)})"
                )
            for g in shard.row_groups:
                t = read_groups(pf, [g], [id_col, column])
                m = pc.is_in(t[id_col], value_set=pa.array(list(ids), t[id_col].type))
                for r in t.filter(m).to_pylist():
                    found[r[id_col]] = r[column]
    except (ValueError, KeyError, OSError) as e:
        data.example_note = f"could not read column '{column}': {e}"
        log.warning("report: %s", data.example_note)
        return
    data.example_column = column
    image = bool(cfg.get("image_column")) and column == cfg.get("image_column")
    for e in items:
        if e.shard is not None:
            e.content, e.is_image = render_value(found.get(e.id), image, in_store)


def render_value(v: Any, image: bool, in_store: Store) -> tuple[str | None, bool]:
    """(text or thumbnail data: URL, is_image) for one cell of the content column."""
    if v is None:
        return None, False
    raw: bytes | None = None
    if isinstance(v, dict):  # {"bytes": ..., "path": ...} (Hugging Face image struct)
        raw = v.get("bytes")
        v = raw if raw is not None else v.get("path")
    if isinstance(v, (bytes, bytearray)):
        raw = bytes(v)
    elif image and isinstance(v, str):
        try:
            raw = (Store(v) if "://" in v else in_store).get_bytes(v if "://" not in v else "")
        except (OSError, ValueError):
            return v[:MAX_TEXT], False
    if raw is not None:
        thumb = thumbnail(raw)
        if thumb:
            return thumb, True
        return f"<{len(raw)} bytes>", False
    s = str(v)
    return (s if len(s) <= MAX_TEXT else s[:MAX_TEXT] + "…"), False


def thumbnail(raw: bytes) -> str | None:
    try:
        from PIL import Image

        im = Image.open(io.BytesIO(raw))
        im.thumbnail((THUMB_PX, THUMB_PX))
        buf = io.BytesIO()
        im.convert("RGB").save(buf, format="PNG", optimize=True)
        return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
    except Exception:  # noqa: BLE001 - a bad image shows as bytes, not as a failed report
        return None
