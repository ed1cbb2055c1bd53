"""Growing datasets: frozen prototypes from another run, and its committed scores reused.

`load_prototypes` reads the centroids of a committed run (or a bare centroids.npy file);
`commit_prototypes` commits the same bytes (same sha256) into the new run, naming the source.
`plan_reuse` matches the new run's shards to the old run's: a shard is reused when its input
file is unchanged (same URL, size and etag/mtime, same row-group slice), its old marker names
the same prototypes and holds what this run needs (embeddings for dedup). `reuse_shard` copies
its files (server-side on object stores, a hard link locally) and writes its own marker.
"""

from __future__ import annotations

import io
import json
import os
from dataclasses import dataclass
from typing import Any

import numpy as np

from scoring import commit, layout
from scoring.config import RunConfig
from scoring.errors import BadConfig, BadInput
from scoring.inputs.parquet import Shard
from scoring.stages.score import ShardSummary
from scoring.storage import Store

# Settings whose change changes a shard's score file: a run that differs in one refuses reuse.
SCORING_SETTINGS = (
    "id_column", "embedding_column", "text_column", "image_column", "model", "metric",
    "label_column",
)  # fmt: skip
RAW_SCORING_SETTINGS = ("embed_batch_size",)  # padding in a batch can move a model's output
DRIFT_WARN = 1.25  # new rows' mean distance / reused rows': above it the report warns


@dataclass(frozen=True)
class PrototypeSource:
    url: str
    data: bytes  # the centroids.npy bytes
    centroids: np.ndarray
    sha256: str
    metric: str | None  # None for a bare .npy file


def _split_file(url: str) -> tuple[str, str]:
    if "://" in url:
        folder, _, name = url.rstrip("/").rpartition("/")
        return folder, name
    folder, name = os.path.split(os.path.abspath(url))
    return folder, name


def load_prototypes(url: str, storage_options=None) -> PrototypeSource:
    """The centroids of a committed run folder (checked against its marker) or a .npy file."""
    import hashlib

    metric = None
    if url.rstrip("/").endswith(".npy"):
        folder, name = _split_file(url)
        data = Store(folder, storage_options).get_bytes(name)
    else:
        src = Store(url, storage_options)
        marker = commit.load_committed_marker(src)
        if marker is None:
            raise BadInput(f"--prototypes-from {url}: no committed prototypes there")
        data = src.get_bytes(layout.CENTROIDS)
        if hashlib.sha256(data).hexdigest() != marker.get("sha256"):
            raise BadInput(f"--prototypes-from {url}: {layout.CENTROIDS} does not match its marker")
        if src.exists(layout.RUN_JSON):
            metric = commit.read_json(src, layout.RUN_JSON).get("config", {}).get("metric")
    try:
        c = np.load(io.BytesIO(data), allow_pickle=False)
    except Exception as e:  # noqa: BLE001 - not a .npy array
        raise BadInput(f"--prototypes-from {url}: not a NumPy .npy array ({e})") from None
    if c.ndim != 2 or c.dtype != np.float32 or not len(c) or not np.isfinite(c).all():
        raise BadInput(
            f"--prototypes-from {url}: expected finite float32 [k, d] centroids, found "
            f"{c.dtype} {list(c.shape)}"
        )
    return PrototypeSource(url, data, c, hashlib.sha256(data).hexdigest(), metric)


def check_source(cfg: RunConfig, src: PrototypeSource, width: int | None) -> None:
    """The run's k, metric and embedding width against the prototypes'; one line naming both."""
    k, d = src.centroids.shape
    if src.metric is not None and src.metric != cfg.metric:
        raise BadConfig(
            f"metric {cfg.metric} but the prototypes from {src.url} were fitted with metric "
            f"{src.metric}"
        )
    if src.metric is None and cfg.metric == "cosine":
        norms = np.linalg.norm(src.centroids.astype(np.float64), axis=1)
        if not np.allclose(norms, 1.0, atol=1e-4):
            raise BadInput(
                f"metric cosine needs unit centroids, but the rows of {src.url} have norms "
                f"{norms.min():.4g} to {norms.max():.4g} (use --metric l2?)"
            )
    if cfg.k != k:
        raise BadConfig(f"k = {cfg.k} but the prototypes from {src.url} have k = {k}")
    if width is not None and width != d:
        raise BadInput(
            f"the input embeddings have width {width}, the prototypes from {src.url} {d}"
        )


def commit_prototypes(store: Store, src: PrototypeSource) -> str:
    """layout.CENTROIDS = the source's bytes, then the marker naming the source."""
    store.put_bytes(layout.CENTROIDS, src.data)
    marker = {
        "sha256": src.sha256,
        "shape": list(src.centroids.shape),
        "dim": int(src.centroids.shape[1]),
        "k": int(src.centroids.shape[0]),
        "sample_rows": 0,
        "iterations": 0,
        "source": src.url,
    }
    store.put_if_absent(layout.PROTOTYPES_COMMIT, json.dumps(marker, indent=1).encode())
    return src.sha256


@dataclass(frozen=True)
class ReuseTask:
    old: Store  # the old run folder
    new: Store  # this run's folder
    old_shard: int
    new_shard: Shard
    embeddings: bool  # copy embeddings/ too
    source: str  # the old run's URL, for the marker


def plan_reuse(
    cfg: RunConfig, old: Store, shards: list[Shard], in_store: Store, fingerprint, sha: str
) -> dict[int, int]:
    """{new shard index: old shard index} of the shards whose committed scores can be reused;
    refuses (BadConfig, naming the setting) an old run scored with other settings or
    prototypes."""
    url = old.uri()
    if not old.exists(layout.RUN_JSON):
        raise BadInput(f"--reuse-scores-from {url}: not a protoprune run folder (no run.json)")
    doc = commit.read_json(old, layout.RUN_JSON)
    oldc = doc.get("config", {})
    names = SCORING_SETTINGS + (RAW_SCORING_SETTINGS if cfg.text_column or cfg.image_column else ())
    for key in names:
        if oldc.get(key) != getattr(cfg, key):
            raise BadConfig(
                f"--reuse-scores-from {url}: it was scored with {key} = {oldc.get(key)!r}, "
                f"this run has {getattr(cfg, key)!r}; its scores cannot be reused"
            )
    marker = commit.load_committed_marker(old)
    if marker is None or marker.get("sha256") != sha:
        raise BadConfig(
            f"--reuse-scores-from {url}: its prototypes (sha256 "
            f"{str((marker or {}).get('sha256'))[:12]}) are not this run's ({sha[:12]}); "
            f"add --prototypes-from {url}"
        )
    old_in = Store(doc["input"]["url"], cfg.storage_options)
    old_files = {old_in.uri(f["path"]): (f["size"], f["version"]) for f in doc["input"]["files"]}
    new_files = {in_store.uri(f["path"]): (f["size"], f["version"]) for f in fingerprint}
    marks = commit.current(commit.committed(old, layout.SCORES), sha)
    need_emb = cfg.save_embeddings or cfg.effective_dedup_eps is not None
    by_slice: dict[tuple, int] = {}
    for s in doc.get("shards", []):
        by_slice[(old_in.uri(s["file"]), tuple(s["row_groups"]), s["rows"])] = s["index"]
    out = {}
    for s in shards:
        uri = in_store.uri(s.file)
        j = by_slice.get((uri, tuple(s.to_json()["row_groups"]), s.rows))
        if j is None or old_files.get(uri) != new_files.get(uri) or j not in marks:
            continue
        if need_emb and not marks[j].get("embeddings_sha256"):
            continue
        out[s.index] = j
    return out


def reuse_shard(t: ReuseTask) -> ShardSummary:
    """Copy one committed shard's files from the old run, data first, then its own marker."""
    i = t.new_shard.index
    now = commit.read_marker(t.new, layout.SCORES, i)
    old = commit.read_marker(t.old, layout.SCORES, t.old_shard)
    assert old is not None, f"shard {t.old_shard} of {t.source} lost its marker"
    if now is not None and now.get("prototypes_sha256") == old.get("prototypes_sha256"):
        return ShardSummary(i, int(now.get("rows", 0)), 0.0, now.get("sha256", ""))
    keys = [(layout.score_key, True), (layout.ids_key, True), (layout.embeddings_key, t.embeddings)]
    for key, wanted in keys:
        if wanted:
            t.old.copy_to(key(t.old_shard), t.new, key(i))
    payload: dict[str, Any] = {k: v for k, v in old.items() if k != "shard"}
    if payload.get("distance_sum") is None:
        d = t.new.read_parquet(layout.score_key(i), ["distance"])["distance"].to_numpy()
        payload["distance_sum"] = float(d.astype(np.float64).sum())
    if not t.embeddings:
        payload["embeddings_sha256"] = None
    payload.update(input=t.new_shard.file, reused_from=t.source, reused_shard=t.old_shard)
    commit.write_marker(t.new, layout.SCORES, i, payload)
    return ShardSummary(i, int(payload.get("rows", 0)), 0.0, payload.get("sha256", ""))


def drift(marks: dict[int, dict[str, Any]]) -> dict[str, Any]:
    """Mean nearest-prototype distance of the reused and of the newly scored rows."""
    rows = {True: 0, False: 0}
    dsum = {True: 0.0, False: 0.0}
    shards = {True: 0, False: 0}
    for m in marks.values():
        r = bool(m.get("reused_from"))
        rows[r] += int(m.get("rows", 0))
        dsum[r] += float(m.get("distance_sum") or 0.0)
        shards[r] += 1
    mean = {r: (dsum[r] / rows[r] if rows[r] else None) for r in (True, False)}
    ratio = mean[False] / mean[True] if mean[True] and mean[False] is not None else None
    return {
        "shards_reused": shards[True],
        "shards_scored": shards[False],
        "rows_reused": rows[True],
        "rows_new": rows[False],
        "mean_distance_reused": mean[True],
        "mean_distance_new": mean[False],
        "drift_ratio": ratio,
        "drift_warning": bool(ratio is not None and ratio > DRIFT_WARN),
    }


def update_record(cfg: RunConfig, store: Store, sha: str) -> dict[str, Any]:
    """The manifest's `prototypes_from` and `reuse` of an update (nothing for other runs); logs
    the drift warning."""
    import logging

    out: dict[str, Any] = {}
    if cfg.prototypes_from:
        out["prototypes_from"] = {"url": cfg.prototypes_from, "sha256": sha}
    if cfg.reuse_scores_from:
        marks = commit.current(commit.committed(store, layout.SCORES), sha)
        out["reuse"] = r = {"from": cfg.reuse_scores_from, **drift(marks)}
        if r["drift_warning"]:
            logging.getLogger("protoprune").warning(
                "the new rows sit %.2fx farther from the prototypes than the reused ones; the "
                "prototypes may no longer fit the data: consider a refit (a run without "
                "--prototypes-from)",
                r["drift_ratio"],
            )
    return out
