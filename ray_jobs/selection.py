"""`protoprune select`: a new selection from a committed run's scores, without re-scoring.

The selection is the run's reduce (ray_jobs.reduce) with other settings (strategy, keep
fraction or count, eps, DBP temperature), reading the run folder and writing to
`<run>/selections/<NAME>/`: keep/ parts, then `_MANIFEST.json` (last: the commit), then the
report. Its keep list is exactly what a fresh `protoprune run` with those settings and the same
prototypes keeps.

Passes: stats over the score files, then one pass over the run's committed annotated parts
(`stages.reselect`: survivors for the new eps, re-deciding from the saved embeddings only the
rows whose stored similarity is within the rounding bound of the new threshold), then the
quotas or the radix select, then the keep pass. A run without dedup evidence that is asked for
an eps gets a new range pass (annotated/ in the selection folder) from its saved embeddings;
without embeddings that is refused. `selection.json` (create-only) records the settings: a
rerun with the same settings resumes (the passes are redone; nothing is committed before the
manifest), other settings under an existing NAME are refused.
"""

from __future__ import annotations

import logging
import re
import time
from typing import Any

from ray_jobs import scheduler as sch
from ray_jobs.reduce import Reuse, reduce
from scoring import commit, layout
from scoring.config import FIELDS, make_config
from scoring.errors import BadConfig, BadInput, NotFound
from scoring.inputs.parquet import Shard
from scoring.stages.keep import DedupView
from scoring.storage import Store

log = logging.getLogger("protoprune")

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
SETTINGS = ("strategy", "keep_fraction", "keep_count", "dedup_eps", "dbp_temperature")
UNSET: Any = object()  # "the run's value"


class SelectionRun:
    """What the reduce needs of a run (driver.Run's attributes), read from a committed run."""

    def __init__(self, cfg, store: Store, run_doc: dict[str, Any], quiet: bool):
        self.cfg, self.store, self.quiet = cfg, store, quiet
        self.shards = [Shard.from_json(s) for s in run_doc["shards"]]
        self.n_rows = sum(s.rows for s in self.shards)
        self.in_store = Store(cfg.input, cfg.storage_options)

    def where(self, i: int) -> str:
        return self.in_store.uri(self.shards[i].file)


def open_run(run_url: str, storage_options: dict[str, Any] | None = None):
    """(store, run.json, manifest) of a committed run; NotFound naming what is missing."""
    store = Store(run_url, storage_options)
    if not store.exists(layout.RUN_JSON):
        raise NotFound(f"{store.uri()}: not a protoprune run folder (no {layout.RUN_JSON})")
    man = commit.read_manifest(store)
    if man is None:
        raise NotFound(
            f"run {store.uri()} is not committed (no {layout.MANIFEST}): finish it first "
            "(rerun it with the same --run-id)"
        )
    return store, commit.read_json(store, layout.RUN_JSON), man


def read_selection(store: Store, name: str) -> dict[str, Any]:
    """The committed manifest of selection `name` of a run; NotFound when there is none."""
    key = f"{layout.selection_prefix(name)}/{layout.MANIFEST}"
    if not NAME_RE.match(name or "") or not store.exists(key):
        have = sorted(
            {k.split("/")[1] for k in store.list(layout.SELECTIONS) if k.endswith(layout.MANIFEST)}
        )
        raise NotFound(
            f"run {store.uri()}: no committed selection {name!r} "
            f"(committed: {', '.join(have) or 'none'})"
        )
    return commit.read_json(store, key)


def select(
    run_url: str,
    name: str,
    strategy: str | None = None,
    keep_fraction: float | None = None,
    keep_count: int | None = None,
    dedup_eps: Any = UNSET,
    dbp_temperature: float | None = None,
    label_column: Any = UNSET,
    storage_options: dict[str, Any] | None = None,
    quiet: bool = True,
    address: str | None = None,
) -> dict[str, Any]:
    """Write (or resume) selection `name` of the committed run at `run_url`; returns its
    manifest. Unset settings are the run's; `dedup_eps=None` (or "off") selects without
    dedup, also for a rule that deduplicates by default (auto)."""
    from scoring.report.background import write_logged

    if not isinstance(name, str) or not NAME_RE.match(name) or ".." in name:
        raise BadConfig(
            f"--name {name!r}: use letters, digits, '.', '_' and '-' only (at most 128)"
        )
    store, run_doc, man = open_run(run_url, storage_options)
    base = {k: v for k, v in run_doc["config"].items() if k in FIELDS}
    base["storage_options"] = dict(storage_options or {})
    settings = dict(base, force_new=False, quiet=quiet)
    if strategy is not None:
        settings["strategy"] = strategy
    if keep_fraction is not None or keep_count is not None:
        settings["keep_fraction"], settings["keep_count"] = keep_fraction, keep_count
    if dedup_eps is not UNSET:  # None: no dedup, as "off" (a rule's default eps does not apply)
        settings["dedup_eps"] = "off" if dedup_eps is None else dedup_eps
    if dbp_temperature is not None:
        settings["dbp_temperature"] = dbp_temperature
    if label_column is not UNSET and label_column != base.get("label_column"):
        raise BadConfig(
            f"--label-column {label_column!r}: run {store.uri()} stored the label column "
            f"{base.get('label_column')!r} with its scores; another one needs a new run"
        )
    cfg = make_config(settings, source="select")
    chosen = {k: getattr(cfg, k) for k in SETTINGS}
    prefix = layout.selection_prefix(name)
    sel = store.child(prefix)
    record = {"name": name, "run_id": run_doc["run_id"], "settings": chosen}
    if not sel.put_if_absent(layout.SELECTION_JSON, commit.dumps(record)):
        old = commit.read_json(sel, layout.SELECTION_JSON)
        if old.get("settings") != chosen:
            diff = ", ".join(
                f"{k}={old.get('settings', {}).get(k)!r} (now {v!r})"
                for k, v in chosen.items()
                if old.get("settings", {}).get(k) != v
            )
            raise BadConfig(
                f"selection {name!r} of run {store.uri()} exists with other settings: {diff}; "
                "choose another --name"
            )
    done = commit.read_manifest(sel)
    if done is not None:
        log.info("selection %s is already committed", sel.uri())
        return done
    reuse = plan_reuse(store, run_doc, man, cfg)
    got = commit.load_committed(store)
    if got is None:
        raise BadInput(f"run {store.uri()}: its prototypes' commit is missing or torn")
    centroids, sha = got
    sch.ensure_ray(address)
    t0 = time.perf_counter()
    doc = reduce(SelectionRun(cfg, store, run_doc, quiet), centroids, sha, prefix, reuse)
    doc["selection"] = {
        "name": name,
        "run": store.uri(),
        "run_committed_at": man.get("committed_at"),
        "settings": chosen,
        "from_annotated": reuse is not None,
    }
    doc["timings_seconds"] = {"select": round(time.perf_counter() - t0, 3)}
    doc = commit.commit_run(sel, doc, prefix) or doc
    write_logged(store, name)
    return doc


def plan_reuse(store: Store, run_doc: dict[str, Any], man: dict[str, Any], cfg):
    """Reuse (the run's annotated parts) when they can answer `cfg`, else None (a new range
    pass over the saved embeddings); refuses an eps nothing stored can answer."""
    parts = man.get("cluster_ranges")
    annotated = tuple(man.get("annotated") or ())
    has_evidence = isinstance(man.get("dedup"), dict)
    eps = cfg.effective_dedup_eps  # --dedup-eps, the rule's default (auto's), or None (off)
    if eps is None or has_evidence:
        if parts is not None:
            same = has_evidence and eps == man["dedup"].get("eps")
            return Reuse(int(parts), DedupView(eps, same=same), annotated)
    saved = len(store.list(layout.EMBEDDINGS, suffix=".parquet")) == len(run_doc["shards"])
    if not saved:
        why = f"--dedup-eps {cfg.dedup_eps}" if cfg.dedup_eps is not None else (
            f"strategy {cfg.strategy} deduplicates (eps {eps}; --dedup-eps none selects without)"
        )  # fmt: skip
        raise BadInput(
            f"{why}: run {store.uri()} has no duplicate evidence and no saved embeddings "
            "(run it with --dedup-eps or --save-embeddings)"
        )
    return None
