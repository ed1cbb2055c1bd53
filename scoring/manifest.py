"""The run folder's bookkeeping: run.json, per-shard commit markers, _MANIFEST.json, status.

Protocol (DESIGN §3): data first, marker last; a marker alone means "done". _MANIFEST.json is
written last of all and exists only for a finished run.
"""

from __future__ import annotations

import json
import re
from typing import Any

from scoring.storage import Store

RUN_JSON = "run.json"
MANIFEST = "_MANIFEST.json"
FORMAT_VERSION = 1


def code_version() -> str:
    try:
        from importlib.metadata import version

        return version("protoprune")
    except Exception:  # noqa: BLE001 - running from a source tree
        return "0+source"


def marker_key(stage: str, index: int) -> str:
    return f"_commits/{stage}/shard-{index:06d}.json"


def write_marker(store: Store, stage: str, index: int, payload: dict[str, Any]) -> None:
    """Commit a shard of a stage. A retry of the same shard writes the same key."""
    store.put_bytes(marker_key(stage, index), json.dumps(dict(payload, shard=index)).encode())


_MARKER_RE = re.compile(r"shard-(\d+)\.json$")


def committed(store: Store, stage: str, threads: int = 32) -> dict[int, dict[str, Any]]:
    """All markers of a stage (one listing, then the small marker reads in parallel: at ~10 ms
    per object-store GET, 100,000 markers take minutes sequentially), by shard index."""
    from concurrent.futures import ThreadPoolExecutor

    found = []
    for key in store.list(f"_commits/{stage}/", suffix=".json"):
        m = _MARKER_RE.search(key)
        if m:
            found.append((int(m.group(1)), key))

    def _read(key: str) -> dict[str, Any] | None:
        try:
            return json.loads(store.get_bytes(key))
        except (ValueError, FileNotFoundError):
            return None  # a torn or vanished marker counts as missing

    if len(found) <= 1 or threads <= 1:
        docs = [_read(k) for _, k in found]
    else:
        with ThreadPoolExecutor(max_workers=min(threads, len(found))) as ex:
            docs = list(ex.map(_read, [k for _, k in found]))
    return {i: d for (i, _), d in zip(found, docs) if d is not None}


COMPACT_ABOVE = 10_000  # list items above which a document is written without indentation


def write_json(store: Store, key: str, obj: Any) -> None:
    """Indented JSON for people; compact for documents with huge lists (100,000 shards),
    where json's indenting encoder (pure Python) is ~10x slower than the C one."""
    big = isinstance(obj, dict) and any(
        isinstance(v, list) and len(v) > COMPACT_ABOVE for v in obj.values()
    )
    indent = None if big else 1
    store.put_bytes(key, json.dumps(obj, indent=indent, sort_keys=False, default=_default).encode())


def read_json(store: Store, key: str) -> Any:
    return json.loads(store.get_bytes(key))


def _default(o: Any) -> Any:
    import numpy as np

    if isinstance(o, np.integer):
        return int(o)
    if isinstance(o, np.floating):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    return str(o)
