"""The reduce: committed score shards -> one exact global keep list and the manifest.

Passes, each a bounded map over Ray tasks of `scoring.stages` functions:
duplicate ids (by id-hash range) and stats (groups of shards), one map -> percentile refinement ->
annotate (cluster ranges: percentile, dedup evidence; a per-cluster rule without dedup keeps
here too) -> quotas (per-cluster rules) or the radix select (global rules) -> keep (per part).
Memory is bounded by the largest cluster range, never by N (DESIGN §5).
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any

import numpy as np

from ray_jobs import scheduler as sch
from ray_jobs.placement import gpu_task_share
from scoring import commit, layout, strategies
from scoring.errors import RunFailed
from scoring.kernels.dedup import EPS_GRID
from scoring.kernels.percentile import PercentileBins
from scoring.kernels.quotas import plan_cluster_ranges
from scoring.kernels.radix import ThresholdSearch
from scoring.stages import annotate, keep, reselect, stats
from scoring.stages.keep import DedupView
from scoring.strategies import GlobalRule, QuotaInput

log = logging.getLogger("protoprune")


def reduce(
    run, centroids: np.ndarray, sha: str, prefix: str = "", reuse: Reuse | None = None
) -> dict[str, Any]:
    """The manifest document of `run` (a driver.Run whose shards are all scored).

    A selection (`protoprune select`, ray_jobs.selection) passes `prefix`, its folder inside
    the run folder, where annotated/ (when it needs new evidence) and keep/ go, and `reuse`
    when it selects from the run's committed annotated parts instead of a new range pass."""
    cfg, store, k = run.cfg, run.store, run.cfg.k
    out = store.child(prefix) if prefix else store
    rule = strategies.get(cfg.strategy)
    idx = [s.index for s in run.shards]
    par = 2 * sch.cluster_cpus()
    quiet = run.quiet
    # keep/ is never emptied here: another driver's committed manifest may list its parts
    # (docs/architecture.md, "Concurrent drivers"); parts no committed manifest lists go
    # after the commit (commit.commit_run)
    clock = _Clock()
    # one map over the duplicate-id ranges (a selection's run has passed that check) and the
    # stats groups: neither pass waits for the other's last task
    dup_tasks = duplicate_id_tasks(run, idx, par) if reuse is None else []
    groups = stats.shard_groups(idx, 2 * par)
    tasks = [*dup_tasks, *(stats.StatsTask(store, g, k) for g in groups)]
    st, dups = stats.Stats.zero(k), []
    for got in sch.map_tasks(stats.first_pass, tasks, par, "reduce: stats", quiet):
        if isinstance(got, stats.DuplicateIds):
            dups.append(got)
        else:
            st = st + got
    if reuse is None:
        check_duplicate_ids(run, dups)
    clock("duplicate ids + stats")
    n = int(st.counts.sum())
    assert n == run.n_rows, f"scores hold {n} rows, the input {run.n_rows}"
    n_keep = cfg.n_keep(n)
    bins = PercentileBins(st.hist)
    while (req := bins.refine_request()) is not None:
        prefixes, low_bits = req
        tasks = [stats.RefineTask(store, g, prefixes, low_bits) for g in groups]
        bins.apply_refinement(
            prefixes, low_bits, sum(sch.map_tasks(stats.group_refine, tasks, par))
        )
    extra: dict[str, Any] = {"percentile": bins.info()}
    clock("stats")

    dedup = cfg.effective_dedup_eps is not None
    dim = int(centroids.shape[1])
    memory = annotate.DEDUP_MEMORY_FLOATS  # read here: the tasks get it as an argument
    # at least `par` ranges when the data allows: one range per task in flight, none waiting
    # for a last large one
    max_rows = min(annotate.range_rows(dedup, dim, memory), max(1, -(-n // par)))
    ranges = plan_cluster_ranges(st.counts, max_rows)
    if reuse is not None:
        ranges = [None] * reuse.parts  # the run's parts
    extra["cluster_ranges"] = len(ranges)

    def quotas_of(counts, dist_sum, n):
        """The per-cluster rule's quotas and its order inside clusters."""
        qi = QuotaInput(counts, dist_sum, n, cfg, centroids)
        q, info = rule.quotas(qi)
        extra.update(info)
        return q, rule.within(qi)

    quotas_now, within = (
        quotas_of(st.counts, st.dist_sum, n_keep)
        if rule.per_cluster and not dedup
        else (None, "hardest")
    )
    global_rule = rule if isinstance(rule, GlobalRule) else None
    view = reuse.view if reuse is not None else None
    ann = store if reuse is not None else out  # where the annotated parts are read
    if reuse is not None:
        fn = reselect.recount_part
        tasks = [
            reselect.RecountTask(
                store, out, idx, part, k, view, dim, quotas_now, global_rule, cfg.seed,
                within=within,
            )
            for part in range(reuse.parts)
        ]  # fmt: skip
    else:
        fn = annotate.annotate_range
        tasks = [
            annotate.RangeTask(
                store, idx, part, lo, hi, k, bins, cfg.effective_dedup_eps, quotas_now,
                global_rule, cfg.seed,
                stream_dim=annotate.stream_dim(st.counts, lo, hi, dedup, dim, memory),
                memory=memory, out=out, within=within,
            )
            for part, (lo, hi) in enumerate(ranges)
        ]  # fmt: skip
    # dedup's block products run on a GPU when the cluster has one: each range task asks for
    # a share of one GPU so that every CPU of a GPU node runs one at once (a whole GPU each
    # ran as many as there are GPUs), and keeps its process for the next (scheduler.Tasks:
    # max_calls=0, where Ray's default for GPU tasks is a fresh process per call). Ray 2.60
    # no longer hides GPUs from tasks that ask for none, so the request is what places them.
    # A selection's recount re-decides few rows: no GPU.
    share = gpu_task_share() if dedup and reuse is None else 0.0
    surv = np.zeros(k, np.int64)
    surv_dist = np.zeros(k, np.float64)
    removed = np.zeros(k, np.int64)
    labels_in: Counter = Counter()
    labels_surv: Counter = Counter()
    kept_parts: list[keep.KeepResult] = []
    annotated: list[str] = []
    first_hist = None
    curve = None
    for res in sch.map_tasks(fn, tasks, par, "reduce: ranges", quiet, 1, share):
        surv += res.survivors
        surv_dist += res.survivor_dist_sum
        removed += res.removed
        labels_in.update(res.labels)
        labels_surv.update(res.survivor_labels)
        if res.annotated:
            annotated.append(res.annotated)
        if res.key_hist is not None:
            first_hist = res.key_hist + (0 if first_hist is None else first_hist)
        if res.keep is not None:
            kept_parts.append(res.keep)
        if res.curve is not None:
            curve = res.curve + (0 if curve is None else curve)
    m = int(surv.sum())
    clock("annotate")
    parts = list(range(len(ranges)))
    if view is not None and view.eps is not None and not view.same:  # parts re-decided
        got = [layout.key_part(f) for f in out.list(layout.REDECIDED)]
        view = DedupView(view.eps, out, frozenset(p for p in got if p is not None))
        extra["redecided_parts"] = len(view.redecided)
    kw = dict(out=out, view=view)
    if rule.per_cluster and dedup:
        q, within = quotas_of(surv, surv_dist, min(n_keep, m))
        tasks = [
            keep.KeepTask(ann, p, k, quotas=q, within=within, seed=cfg.seed, **kw) for p in parts
        ]
        kept_parts += sch.map_tasks(keep.keep_part, tasks, par, "reduce: keep", quiet)
    elif global_rule is not None:
        th, passes = global_threshold(
            run, global_rule, parts, min(n_keep, m), m, par, first_hist, ann, view
        )
        extra["threshold"] = th.to_json()
        extra["select_passes"] = passes
        tasks = [
            keep.KeepTask(ann, p, k, rule=global_rule, seed=cfg.seed, threshold=th, **kw)
            for p in parts
        ]
        kept_parts += sch.map_tasks(keep.keep_part, tasks, par, "reduce: keep", quiet)
    kept = sum((r.kept for r in kept_parts), np.zeros(k, np.int64))
    clock("keep")
    extra["reduce_seconds"] = clock.seconds
    labels_kept: Counter = Counter()
    for r in kept_parts:
        labels_kept.update(r.labels)
    files = sorted((r.entry for r in kept_parts if r.entry), key=lambda f: f["path"])
    if prefix:  # paths in a selection's manifest are relative to the run folder
        files = [dict(f, path=f"{prefix}/{f['path']}") for f in files]
        annotated = list(reuse.annotated) if reuse else [f"{prefix}/{a}" for a in annotated]
    expect = min(n_keep, m)
    assert int(kept.sum()) == expect, f"kept {int(kept.sum())} rows, expected {expect}"
    if dedup:
        extra["dedup"] = {
            "eps": cfg.effective_dedup_eps,
            "removed": int(removed.sum()),
            "survivors": m,
            "removed_per_cluster": removed.tolist(),
        }
        if curve is not None:  # from the stored similarities (see kernels.dedup.removal_curve)
            extra["dedup"]["curve"] = {"eps": list(EPS_GRID), "removed": curve.tolist()}
    if cfg.label_column:
        extra["labels"] = {
            "column": cfg.label_column,
            "before": dict(sorted(labels_in.items())),
            "after_dedup": dict(sorted(labels_surv.items())) if dedup else None,
            "after": {key: labels_kept.get(key, 0) for key in sorted(labels_in)},
        }
    mean_dist = np.divide(st.dist_sum, np.maximum(st.counts, 1))
    return {
        "format_version": commit.FORMAT_VERSION,
        "run_id": cfg.run_id,
        "config_hash": cfg.config_hash(),
        "code_version": commit.code_version(),
        "strategy": cfg.strategy,
        "metric": cfg.metric,
        "k": k,
        "rows_in": n,
        "rows_kept": int(kept.sum()),
        "n_keep": n_keep,
        "prototypes_sha256": sha,
        "clusters": {
            "rows": st.counts.tolist(),
            "kept": kept.tolist(),
            "mean_distance": [round(float(x), 6) for x in mean_dist],
        },
        "files": files,
        "annotated": sorted(annotated),
        **extra,
    }


@dataclass(frozen=True)
class Reuse:
    """A selection over the run's `parts` committed annotated parts, with dedup `view`."""

    parts: int
    view: DedupView
    annotated: tuple[str, ...]  # their keys in the run folder


class _Clock:
    """Seconds of each pass of the reduce, logged and kept for the manifest."""

    def __init__(self):
        self.seconds: dict[str, float] = {}
        self.t = time.perf_counter()

    def __call__(self, name: str) -> None:
        now = time.perf_counter()
        self.seconds[name] = round(now - self.t, 3)
        log.info("reduce: %s %.2fs", name, now - self.t)
        self.t = now


def global_threshold(
    run, rule: GlobalRule, parts: list[int], n_keep: int, m: int, par: int, first_hist,
    ann=None, view: DedupView | None = None,
):  # fmt: skip
    """The exact (key, id) threshold of a global rule over the survivors of all parts.
    `first_hist`: the first digit's histogram, summed from the range pass (no read).
    `ann`: the store of the annotated parts (default the run folder), `view`: a selection's
    dedup over them."""
    search = ThresholdSearch(n_keep, m, rule.key_bits)
    if first_hist is not None and search.request() == ("hist", 0, 0, n_keep):
        search.add_histogram(first_hist)
        search.advance()
    while (req := search.request()) is not None:
        mode, prefix, bits, limit = req
        lim = None if mode == "hist" else limit
        tasks = [
            keep.SelectTask(ann or run.store, p, rule, run.cfg.seed, prefix, bits, lim, view)
            for p in parts
        ]
        for got in sch.map_tasks(keep.select_pass, tasks, par):
            if mode == "hist":
                search.add_histogram(got)
            elif got is not None:
                search.add_candidates(got)
        search.advance()
    return search.result, search.passes


def duplicate_id_tasks(run, idx: list[int], par: int) -> list[stats.DuplicateIdsTask]:
    """The duplicate-id check by hash range: each task reads one range of the per-shard sorted
    id hashes (ids/shard-N.parquet) from every shard, so memory is bounded by the range, not
    by N; like the cluster ranges, at least one range per task in flight."""
    ranges = stats.hash_ranges(run.n_rows, min(annotate.RANGE_ROWS, max(1, -(-run.n_rows // par))))
    return [stats.DuplicateIdsTask(run.store, idx, lo, hi) for lo, hi in ranges]


def check_duplicate_ids(run, results: list[stats.DuplicateIds]) -> None:
    """Fail the run naming the ids that occur more than once and where they occur."""
    total = 0
    examples: list[dict[str, Any]] = []
    for got in results:
        total += got.count
        examples.extend(got.examples)
    if not total:
        commit.clear_failures(run.store, layout.REDUCE)
        return
    examples.sort(key=lambda d: (d["where"][0], str(d["id"])))
    shards = run.shards
    file_start: dict[str, int] = {}
    for sh in shards:
        file_start.setdefault(sh.file, sh.row_offset)

    def where(w: list[list[int]]) -> str:
        return " and ".join(
            f"{run.where(s)} row {shards[s].row_offset - file_start[shards[s].file] + r} "
            f"(shard {s})"
            for s, r in w
        )

    shown = "; ".join(f"id {d['id']!r} in {where(d['where'])}" for d in examples[:3])
    more = f" (and {total - 3} more)" if total > 3 else ""
    msg = f"column '{run.cfg.id_column}' has {total} duplicate id(s): {shown}{more}"
    files = sorted({run.where(s) for d in examples for s, _ in d["where"]})
    commit.record_failure(
        run.store,
        layout.REDUCE,
        "duplicate-ids",
        {"error": msg, "file": ", ".join(files), "examples": examples[:100]},
    )
    raise RunFailed(f"reduce failed, no manifest committed: {msg}")
