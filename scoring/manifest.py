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


def write_marker(store: Store, stage: str, index: int, payload: dict[str, Any]) -> bool:
    """Commit a shard of a stage, create-only (S3 If-None-Match, local link(2)).

    Returns False when the marker already existed: another attempt of the same shard committed
    first, and its marker stands.
    """
    return store.put_if_absent(
        marker_key(stage, index), json.dumps(dict(payload, shard=index)).encode()
    )


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


def dumps(obj: Any) -> bytes:
    """Indented JSON for people; compact for documents with huge lists (100,000 shards),
    where json's indenting encoder (pure Python) is ~10x slower than the C one."""
    big = isinstance(obj, dict) and any(
        isinstance(v, list) and len(v) > COMPACT_ABOVE for v in obj.values()
    )
    return json.dumps(obj, indent=None if big else 1, sort_keys=False, default=_default).encode()


def write_json(store: Store, key: str, obj: Any) -> None:
    store.put_bytes(key, dumps(obj))


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


# -- failure records ---------------------------------------------------------------------------
def failure_key(stage: str, name: str) -> str:
    """`_failures/<stage>/<name>.json`: why a shard (or a reduce check) failed, for status."""
    return f"_failures/{stage}/{name}.json"


def record_failure(store: Store, stage: str, name: str, payload: dict[str, Any]) -> None:
    """Write (or overwrite) a failure record. Best effort: a storage error here is logged."""
    import logging
    import time

    doc = dict(payload, at=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
    try:
        write_json(store, failure_key(stage, name), doc)
    except OSError as e:  # the run fails anyway; don't hide its real error
        logging.getLogger(__name__).warning("could not record failure %s/%s: %s", stage, name, e)


def failures(store: Store, stage: str) -> dict[str, dict[str, Any]]:
    """Failure records of a stage by name (one listing)."""
    out: dict[str, dict[str, Any]] = {}
    for key in store.list(f"_failures/{stage}/", suffix=".json"):
        try:
            out[key.rsplit("/", 1)[1][: -len(".json")]] = json.loads(store.get_bytes(key))
        except (ValueError, FileNotFoundError):
            continue
    return out


def clear_failure(store: Store, stage: str, name: str) -> None:
    store.delete(failure_key(stage, name))


def shard_name(index: int) -> str:
    return f"shard-{index:06d}"


# -- input fingerprint -------------------------------------------------------------------------
def diff_fingerprint(old: list[dict[str, Any]], new: list[dict[str, Any]]) -> dict[str, list]:
    """Files added, removed and changed (size or etag/mtime) between two fingerprints."""
    a = {f["path"]: f for f in old}
    b = {f["path"]: f for f in new}
    return {
        "added": sorted(set(b) - set(a)),
        "removed": sorted(set(a) - set(b)),
        "changed": sorted(p for p in set(a) & set(b) if a[p] != b[p]),
    }


# -- wiping a run (--force-new) ----------------------------------------------------------------
# Deleted in this order: the manifest first (no reader may trust a half-deleted run), then the
# markers (nothing half-deleted counts as done), then the data, run.json last.
WIPE_ORDER = (
    MANIFEST,
    "_commits",
    "prototypes/_COMMITTED.json",
    "_failures",
    "keep",
    "scores",
    "ids",
    "prototypes",
    "embeddings",
    "report",
    RUN_JSON,
)


def wipe_run(store: Store) -> list[str]:
    """Delete a run folder's protoprune content (only keys below the run's own root)."""
    removed = []
    for key in WIPE_ORDER:
        if store.exists(key):
            store.delete(key)
            removed.append(key)
    return removed


# -- status ------------------------------------------------------------------------------------
STAGES = ("prototypes", "scores", "reduce")


def _one_unit(done: bool, failures: list[dict[str, Any]]) -> dict[str, Any]:
    """Status counts of a stage that is one unit of work (prototypes, reduce)."""
    return {
        "units": 1,
        "done": int(done),
        "failed": int(bool(failures)),
        "pending": 0 if (done or failures) else 1,
        "failures": failures,
    }


def run_status(store: Store) -> dict[str, Any]:
    """What a run folder says about its progress: a pure read, safe on a running or dead run.

    Returns {"run", "run_id", "committed", "rows", "shards", "stages": {prototypes, scores,
    reduce}}; each stage has done / pending / failed counts and a "failures" list with
    {"shard", "file", "error"}. Needs only run.json, the markers and the failure records.
    """
    from scoring.prototypes import COMMIT_KEY

    if not store.exists(RUN_JSON):
        raise FileNotFoundError(f"{store.uri()}: no run.json (not a protoprune run folder)")
    run = read_json(store, RUN_JSON)
    shards = run.get("shards", [])
    files = {s["index"]: s["file"] for s in shards}
    n_shards = len(shards)
    committed_manifest = store.exists(MANIFEST)
    doc = read_json(store, MANIFEST) if committed_manifest else None

    def fail_list(stage: str) -> list[dict[str, Any]]:
        out = []
        for name, rec in sorted(failures(store, stage).items()):
            out.append(
                {
                    "shard": rec.get("shard"),
                    "name": name,
                    "file": rec.get("file")
                    or (files.get(rec["shard"]) if rec.get("shard") is not None else None),
                    "error": rec.get("error", ""),
                    "attempts": rec.get("attempts"),
                    "at": rec.get("at"),
                }
            )
        return out

    # prototypes: one unit
    proto_marker = read_json(store, COMMIT_KEY) if store.exists(COMMIT_KEY) else None
    proto_fail = [] if proto_marker else fail_list("prototypes")
    proto = {
        **_one_unit(proto_marker is not None, proto_fail),
        "sha256": proto_marker.get("sha256") if proto_marker else None,
        "sample_rows": proto_marker.get("sample_rows") if proto_marker else None,
    }
    # scores: one unit per shard; a marker naming other prototypes counts as missing
    sha = proto["sha256"]
    marks = committed(store, "scores")
    done = {i: m for i, m in marks.items() if sha is not None and m.get("prototypes_sha256") == sha}
    score_fail = [f for f in fail_list("scores") if f["shard"] not in done]
    failed_idx = {f["shard"] for f in score_fail}
    scores = {
        "units": n_shards,
        "done": len(done),
        "failed": len(failed_idx),
        "pending": n_shards - len(done) - len(failed_idx - set(done)),
        "rows_done": int(sum(m.get("rows", 0) for m in done.values())),
        "failures": score_fail,
    }
    red_fail = [] if committed_manifest else fail_list("reduce")
    reduce = _one_unit(committed_manifest, red_fail)
    if proto_fail or score_fail or red_fail:
        state = "failed"
    elif committed_manifest:
        state = "committed"
    else:
        state = "incomplete"
    return {
        "run": store.uri(),
        "run_id": run.get("run_id"),
        "state": state,
        "committed": committed_manifest,
        "created_at": run.get("created_at"),
        "input": run.get("input", {}).get("url"),
        "rows": run.get("input", {}).get("rows"),
        "rows_kept": doc.get("rows_kept") if doc else None,
        "shards": n_shards,
        "stages": {"prototypes": proto, "scores": scores, "reduce": reduce},
    }
