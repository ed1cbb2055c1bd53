"""Stage `recount` of a selection (`protoprune select`), per annotated part of the run.

A selection reuses the run's committed annotated parts: the percentile does not depend on the
rule, and `max_similarity` is the largest cosine to ANY earlier-ranked row of the cluster, so a
new eps needs no new products except for the rows whose stored similarity lies within the
rounding bound (`kernels.dedup.stored_bound`) of the new threshold 1 - eps. Those are
re-decided in float64 against all earlier rows of their cluster, from the embeddings the score
stage saved, exactly as a fresh run's range pass decides them; their flags are written to
layout.redecided_key(part) in the selection folder (none when no row is that close). The task
then returns the same counts as the range pass (`annotate.summarize`), and, for a per-cluster
rule whose quotas are known before, writes the part's keep file.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from scoring import layout
from scoring.kernels.dedup import exact_flags, stored_bound
from scoring.kernels.radix import rank_order
from scoring.stages.annotate import RangeResult, read_range, summarize
from scoring.stages.keep import DedupView, read_part, survivors
from scoring.storage import Store
from scoring.strategies import GlobalRule


@dataclass(frozen=True)
class RecountTask:
    store: Store  # the run folder (annotated parts, scores, embeddings)
    out: Store  # the selection folder
    shards: list[int]
    part: int
    k: int
    view: DedupView
    dim: int
    quotas: np.ndarray | None = None
    rule: GlobalRule | None = None
    seed: int = 0
    within: str = "hardest"  # with quotas: the rule's order inside clusters


def recount_part(task: RecountTask) -> RangeResult:
    t = read_part(task.store, task.part)
    if t is None or t.num_rows == 0:
        return RangeResult.empty(task.k)
    view = task.view
    if view.eps is not None and not view.same:
        view = redecide(task, t)
    live = survivors(t, view, task.part)
    return summarize(
        t, live, task.k, task.rule, task.seed, task.quotas, task.out, task.part, task.within
    )


def redecide(task: RecountTask, t: pa.Table) -> DedupView:
    """Re-decide the part's rows near the new threshold; the view that reads their flags."""
    view = task.view
    thr = 1.0 - float(view.eps)
    sim = t[layout.MAX_SIMILARITY].to_numpy(zero_copy_only=False)
    with np.errstate(invalid="ignore"):
        unsure = np.flatnonzero(
            np.abs(np.nan_to_num(sim, nan=-np.inf) - thr) <= stored_bound(task.dim)
        )
    task.out.delete(layout.redecided_key(task.part))
    if len(unsure) == 0:
        return view
    cl = t["cluster"].to_numpy()
    lo, hi = int(cl[unsure].min()), int(cl[unsure].max()) + 1
    src, x = read_range(task.store, task.shards, lo, hi, True)
    idx = rank_order(src)
    src_cl, x = src["cluster"].to_numpy()[idx], x[idx]
    flags = np.zeros(len(unsure), bool)
    for j in np.unique(cl[unsure]):
        rows = np.flatnonzero(cl == j)  # the cluster's rows of the part, in rank order
        members = np.flatnonzero(src_cl == j)
        assert len(members) == len(rows), f"cluster {j}: embeddings do not match its rows"
        sel = cl[unsure] == j
        flags[sel] = exact_flags(x[members], unsure[sel] - rows[0], view.eps)
    got = pa.table({"row": pa.array(unsure, pa.int64()), layout.DUPLICATE: pa.array(flags)})
    task.out.write_parquet(layout.redecided_key(task.part), got, **layout.encoding(got))
    return DedupView(view.eps, task.out, view.redecided | {task.part})
