"""Planning a run: the input's files and shards, checked from the footers, and run.json.

`plan_input` is a pure function of the input listing and footers. `run_doc` is what run.json
records; `check_resume` compares it with the run.json of an existing run id and refuses, naming
what differs, a resume whose config or input changed (DESIGN §3).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from scoring import commit
from scoring.config import RunConfig
from scoring.embed import check_model_spec, content_column
from scoring.errors import BadConfig, BadInput
from scoring.inputs.parquet import Shard, check_schemas, fixed_width, plan_groups
from scoring.kernels.sampling import Pick, plan_digest, sample_plan, sample_size_rule
from scoring.storage import Store

log = logging.getLogger("protoprune")

RESUME_HINT = "rerun with --force-new to start this run id over, or use a new --run-id"


@dataclass
class RunPlan:
    shards: list[Shard]
    fingerprint: list[dict[str, Any]]  # {"path", "size", "version"} per input file
    n_rows: int
    embedding_width: int | None  # known from the footers (fixed_size_list), else None
    group_rows: list[tuple[str, list[int]]]  # (file key, rows per row group), planning order

    def sample_picks(self, cfg: RunConfig) -> tuple[dict[int, tuple[Pick, ...]], str]:
        """Each shard's part of the k-means sample (shard index -> its picks; shards with no
        sample row are absent) and the sha256 of the whole plan. The plan is drawn over the
        input's row groups (kernels.sampling), so it never depends on the shard plan: the fit
        and the resume check of a changed file must agree on it."""
        size = sample_size_rule(cfg.effective_sample_size, self.n_rows, cfg.k, self.embedding_width)
        units = [r for _, rg in self.group_rows for r in rg]
        counts = sample_plan(units, size, cfg.seed)
        return shard_picks(self.shards, self.group_rows, counts), plan_digest(counts, units)


def check_sample_plan(
    cfg: RunConfig, plan: RunPlan, marker: dict[str, Any], changed: Sequence[Shard], where: str
) -> tuple[dict[int, tuple[Pick, ...]], list[int]]:
    """Resume over changed files: refuse when the sample plan moved (other row groups or counts
    than the committed prototypes were fitted on). Returns the picks and the changed shards that
    gave rows to the committed sample but give none now (their digests no longer match)."""
    picks, plan_sha = plan.sample_picks(cfg)
    was = marker.get("sample_plan_sha256")
    if was is not None and was != plan_sha:
        files = ", ".join(sorted({s.file for s in changed}))
        raise BadInput(
            f"run {where}: input file(s) {files} changed the row groups the committed "
            f"prototypes' sample was drawn from; rerun with --force-new or use a new --run-id"
        )
    digests = marker.get("sample_sha256") or {}
    return picks, [s.index for s in changed if str(s.index) in digests and s.index not in picks]


def shard_picks(
    shards: Sequence[Shard], group_rows: list[tuple[str, list[int]]], counts: np.ndarray
) -> dict[int, tuple[Pick, ...]]:
    """Split a sample plan (rows per canonical unit) into the shards' picks: (row group in the
    file, unit, rows) for each picked row group of the shard, ascending.

    Shards must be indexed in canonical (file, row group) order: the fit gathers the parts in
    shard order, which then is the canonical row order for any `--shard-rows`. Checked here."""
    first: dict[str, int] = {}
    u = 0
    for key, rg in group_rows:
        first[key] = u
        u += len(rg)
    cut = [s for s in shards if s.row_groups]
    starts = np.array([first[s.file] + s.row_groups[0] for s in cut], dtype=np.int64)
    if len(starts) > 1 and not (np.diff(starts) > 0).all():
        raise ValueError("shards are not indexed in file then row-group order")
    nz = np.flatnonzero(counts)
    at = np.searchsorted(starts, nz, side="right") - 1
    out: dict[int, list[Pick]] = {}
    for unit, j in zip(nz.tolist(), at.tolist()):
        s = cut[j] if j >= 0 else None
        g = unit - first[s.file] if s is not None else -1
        if s is None or g not in s.row_groups:
            raise ValueError(f"sample unit {unit} lies in no shard")
        out.setdefault(s.index, []).append((g, unit, int(counts[unit])))
    return {i: tuple(p) for i, p in out.items()}


def plan_input(cfg: RunConfig, in_store: Store) -> RunPlan:
    """List and plan the input, checking every file's schema from its footer."""
    files, shards, schemas, groups = plan_groups(in_store, cfg.shard_rows)
    raw = bool(cfg.text_column or cfg.image_column)
    cols = [cfg.id_column, content_column(cfg), *filter(None, [cfg.label_column])]
    check_schemas(in_store, schemas, cfg.id_column, cols, None if raw else cfg.embedding_column)
    check_model_spec(cfg)
    n_rows = sum(s.rows for s in shards)
    if n_rows == 0:
        raise BadInput(f"input {in_store.uri()}: the Parquet files hold zero rows")
    if cfg.k > n_rows:
        raise BadConfig(f"k = {cfg.k} is larger than the {n_rows} input rows")
    fingerprint = [{"path": f["key"], "size": f["size"], "version": f["version"]} for f in files]
    width = None if raw else fixed_width(schemas.values(), cfg.embedding_column)
    return RunPlan(shards, fingerprint, n_rows, width, groups)


def run_doc(cfg: RunConfig, plan: RunPlan, in_store: Store) -> dict[str, Any]:
    return {
        "format_version": commit.FORMAT_VERSION,
        "run_id": cfg.run_id,
        "config": cfg.redacted(),
        "config_hash": cfg.config_hash(),
        "code_version": commit.code_version(),
        "input": {"url": in_store.uri(), "files": plan.fingerprint, "rows": plan.n_rows},
        "shards": [s.to_json() for s in plan.shards],
        "created_at": commit.utc_now(),
    }


def diff_fingerprint(old: list[dict[str, Any]], new: list[dict[str, Any]]) -> dict[str, list]:
    """Files added, removed and changed (size or etag/mtime) between two fingerprints."""
    a = {f["path"]: f for f in old}
    b = {f["path"]: f for f in new}
    return {
        "added": sorted(set(b) - set(a)),
        "removed": sorted(set(a) - set(b)),
        "changed": sorted(p for p in set(a) & set(b) if a[p] != b[p]),
    }


def check_resume(
    cfg: RunConfig, where: str, old: dict[str, Any], doc: dict[str, Any], committed: bool
) -> list[str]:
    """Refuse a resume whose config or input differs, saying exactly what differs; return the
    input files that changed in place (accepted, see `Run.accept_changed_inputs`).

    A changed input file (size or etag/mtime) is accepted when its footer-derived shard plan is
    unchanged and the run is not committed: its shards are redone. Added or removed files, or a
    changed shard plan, are refused.
    """
    where = f"run {where} exists"
    if old.get("config_hash") != doc["config_hash"]:
        oldc = old.get("config", {})
        diffs = [
            f"{k}: {oldc.get(k)!r} -> {v!r}"
            for k, v in cfg.hashed_settings().items()
            if oldc.get(k) != v
        ]
        raise BadConfig(
            f"{where} with a different config ({'; '.join(diffs) or 'config hash differs'}); "
            f"{RESUME_HINT}"
        )
    new_files = doc["input"]["files"]
    d = diff_fingerprint(old.get("input", {}).get("files", []), new_files)
    what = [f"added {p}" for p in d["added"]] + [f"removed {p}" for p in d["removed"]]
    if what:
        raise BadInput(f"{where} but its input changed ({'; '.join(what)}); {RESUME_HINT}")
    if not d["changed"]:
        return []
    olds = {f["path"]: f for f in old["input"]["files"]}
    news = {f["path"]: f for f in new_files}
    detail = "; ".join(
        f"{p} (size {olds[p]['size']} -> {news[p]['size']}, "
        f"version {olds[p]['version']} -> {news[p]['version']})"
        for p in d["changed"]
    )
    if committed:
        raise BadInput(f"{where}, is committed, and its input changed: {detail}; {RESUME_HINT}")
    if old.get("shards") != doc["shards"]:
        olds_j = {json.dumps(x, sort_keys=True) for x in old.get("shards", [])}
        news_j = {json.dumps(x, sort_keys=True) for x in doc["shards"]}
        bad = sorted({json.loads(x)["file"] for x in olds_j ^ news_j})
        raise BadInput(
            f"{where} but the row groups of input file(s) changed "
            f"({', '.join(bad) or detail}), so the shard plan differs; {RESUME_HINT}"
        )
    log.warning("input file(s) changed since the run started: %s", detail)
    return d["changed"]
