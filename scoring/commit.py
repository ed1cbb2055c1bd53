"""The commit protocol of the run folder (DESIGN §3): data first, marker last.

Per-shard markers (create-only), the stale-marker rule (a marker naming other prototypes counts
as missing), failure records, the prototypes' commit, the manifest's commit and the wipe of a
run. Keys come from `scoring.layout`; nothing here spells one.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import time
from typing import Any

import numpy as np

from scoring import layout
from scoring.storage import Store

log = logging.getLogger(__name__)

FORMAT_VERSION = 1


def code_version() -> str:
    try:
        from importlib.metadata import version

        return version("protoprune")
    except Exception:  # noqa: BLE001 - running from a source tree
        return "0+source"


def utc_now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def write_marker(store: Store, stage: str, index: int, payload: dict[str, Any]) -> bool:
    """Commit a shard of a stage, create-only (S3 If-None-Match, local link(2)).

    Returns False when the marker already existed: another attempt of the same shard committed
    first, and its marker stands.
    """
    return store.put_if_absent(
        layout.marker_key(stage, index), json.dumps(dict(payload, shard=index)).encode()
    )


def read_marker(store: Store, stage: str, index: int) -> dict[str, Any] | None:
    key = layout.marker_key(stage, index)
    return read_json(store, key) if store.exists(key) else None


def committed(store: Store, stage: str, threads: int = 32) -> dict[int, dict[str, Any]]:
    """All markers of a stage (one listing, then the small marker reads in parallel: at ~10 ms
    per object-store GET, 100,000 markers take minutes sequentially), by shard index."""
    from concurrent.futures import ThreadPoolExecutor

    found = []
    for key in store.list(layout.marker_dir(stage), suffix=".json"):
        i = layout.marker_shard(key)
        if i is not None:
            found.append((i, key))

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


def current(marks: dict[int, dict[str, Any]], sha: str | None) -> dict[int, dict[str, Any]]:
    """The markers that count as done: those naming the committed prototypes (sha256)."""
    return {i: m for i, m in marks.items() if sha is not None and m.get("prototypes_sha256") == sha}


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
def record_failure(store: Store, stage: str, name: str, payload: dict[str, Any]) -> None:
    """Write (or overwrite) a failure record. Best effort: a storage error here is logged."""
    doc = dict(payload, at=utc_now())
    try:
        write_json(store, layout.failure_key(stage, name), doc)
    except OSError as e:  # the run fails anyway; don't hide its real error
        log.warning("could not record failure %s/%s: %s", stage, name, e)


def failures(store: Store, stage: str) -> dict[str, dict[str, Any]]:
    """Failure records of a stage by name (one listing)."""
    out: dict[str, dict[str, Any]] = {}
    for key in store.list(layout.failure_dir(stage), suffix=".json"):
        try:
            out[key.rsplit("/", 1)[1][: -len(".json")]] = json.loads(store.get_bytes(key))
        except (ValueError, FileNotFoundError):
            continue
    return out


def clear_failure(store: Store, stage: str, name: str) -> None:
    store.delete(layout.failure_key(stage, name))


def clear_failures(store: Store, stage: str) -> None:
    for name in failures(store, stage):
        clear_failure(store, stage, name)


# -- wiping a run (--force-new) ----------------------------------------------------------------
def wipe_run(store: Store) -> list[str]:
    """Delete a run folder's protoprune content (only keys below the run's own root), in
    `layout.WIPE_ORDER`."""
    removed = []
    for key in layout.WIPE_ORDER:
        if store.exists(key):
            store.delete(key)
            removed.append(key)
    return removed


# -- prototypes --------------------------------------------------------------------------------
def save_centroids(store: Store, centroids: np.ndarray, stats: dict[str, Any]) -> str:
    """Write centroids.npy, then the _COMMITTED.json marker naming its sha256."""
    buf = io.BytesIO()
    np.save(buf, centroids.astype(np.float32), allow_pickle=False)
    data = buf.getvalue()
    sha = hashlib.sha256(data).hexdigest()
    store.put_bytes(layout.CENTROIDS, data)
    marker = dict(stats, sha256=sha, shape=list(centroids.shape))
    if not store.put_if_absent(layout.PROTOTYPES_COMMIT, json.dumps(marker, indent=1).encode()):
        log.warning("prototypes were committed by another attempt; its marker stands")
    return sha


def load_committed_marker(store: Store) -> dict[str, Any] | None:
    """The prototypes' commit marker (sha256, sample digests per shard), or None."""
    if not store.exists(layout.PROTOTYPES_COMMIT):
        return None
    return json.loads(store.get_bytes(layout.PROTOTYPES_COMMIT))


def load_committed(store: Store) -> tuple[np.ndarray, str] | None:
    """The committed centroids and their sha256, or None when not committed (or torn)."""
    if not store.exists(layout.PROTOTYPES_COMMIT):
        return None
    marker = json.loads(store.get_bytes(layout.PROTOTYPES_COMMIT))
    data = store.get_bytes(layout.CENTROIDS)
    sha = hashlib.sha256(data).hexdigest()
    if sha != marker.get("sha256"):
        log.warning("%s does not match its marker; refitting", layout.CENTROIDS)
        return None
    return np.load(io.BytesIO(data), allow_pickle=False), sha


# -- the manifest ------------------------------------------------------------------------------
def read_manifest(store: Store) -> dict[str, Any] | None:
    return read_json(store, layout.MANIFEST) if store.exists(layout.MANIFEST) else None


def commit_manifest(store: Store, doc: dict[str, Any], key: str = layout.MANIFEST) -> bool:
    """Write the manifest, create-only: the commit of the whole run. False when another driver
    committed first (its manifest stands)."""
    doc["committed_at"] = utc_now()
    if not store.put_if_absent(key, dumps(doc)):
        log.warning("%s was committed by another driver first", store.uri(key))
        return False
    return True


def fault_wait_for_manifest(store: Store) -> None:
    """Fault-injection knob for tests (PROTOPRUNE_FAULT_REDUCE_WAIT_S): before the reduce,
    wait up to that many seconds for another driver's manifest, so that this driver's reduce
    runs after that commit (tests/test_concurrent.py)."""
    wait = float(os.environ.get("PROTOPRUNE_FAULT_REDUCE_WAIT_S", "0") or 0)
    end = time.monotonic() + wait
    while wait > 0 and time.monotonic() < end and not store.exists(layout.MANIFEST):
        time.sleep(0.1)


def commit_run(folder: Store, doc: dict[str, Any], prefix: str = "") -> dict[str, Any] | None:
    """Commit a run's (or a selection's) manifest, then delete the parts of `folder`'s keep/
    that the committed manifest does not list (an interrupted reduce's, or a concurrent
    driver's that lost the commit). Returns the committed manifest: `doc`, or the one another
    driver committed first (None when that one is gone again, e.g. a concurrent --force-new).

    Safe under concurrent drivers: a committed manifest is create-only and never changes, keep
    parts are named by their content (layout.keep_key), so a part it lists is never replaced
    by other bytes, and only parts it does not list are deleted. `prefix`: the folder's path
    inside the run folder (a selection), which the manifest's paths start with."""
    won = commit_manifest(folder, doc)
    done = doc if won else read_manifest(folder)
    if done is None:
        return None
    head = f"{prefix}/" if prefix else ""
    listed = {f["path"].removeprefix(head) for f in done.get("files", [])}
    for key in folder.list(layout.KEEP):
        if key not in listed:
            folder.delete(key)
    return done
