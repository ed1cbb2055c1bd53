"""The dedup evidence of a finished run, read from its annotated parts (DESIGN §4).

The reduce writes `duplicate`, `max_similarity` and `duplicate_of` to annotated/ only (the
committed score files are never rewritten), in rank order inside each cluster. Here: the
number of flagged rows (the `duplicate` column of every part, one row group at a time: exact)
and a few flagged rows, drawn from an evenly spaced subset of the parts beyond `max_rows`, each
with the earlier-ranked row it duplicates and their similarity. When the page shows content,
the rows' input shards are looked up in the score files already chosen for the figures (their row groups
of the rows' clusters, the id column only), and examples whose two rows were both found are
shown first.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from scoring import layout
from scoring.errors import NotFound
from scoring.inputs.parquet import prefetch_groups, read_groups
from scoring.report.data import Duplicate, Example, ReportData
from scoring.report.tables import CLUSTER, DISTANCE, ID, groups_with_clusters, subset
from scoring.storage import Store

N_DUPLICATES = 8  # examples shown
N_CANDIDATES = 64  # flagged rows read to choose them from
EVIDENCE = [ID, CLUSTER, DISTANCE, layout.MAX_SIMILARITY, layout.DUPLICATE_OF]


def collect_duplicates(
    store: Store,
    data: ReportData,
    man: dict[str, Any],
    score_files: list[tuple[str, int]],
    max_rows: int,
    locate: bool,
) -> None:
    """Fill data.duplicates (flagged rows) and data.duplicate_examples for a dedup run."""
    if not isinstance(man.get("dedup"), dict):
        return
    keys = [k for k in man.get("annotated") or [] if isinstance(k, str)]
    pfs = {}
    for key in keys:
        try:
            pfs[key] = store.parquet_file(key)
        except NotFound:
            data.notes.append(f"{store.uri(key)} is missing: duplicates are counted without it.")
    if not pfs:
        data.notes.append("The manifest lists no annotated parts: no duplicate evidence to show.")
        return
    if any(layout.DUPLICATE not in pf.schema_arrow.names for pf in pfs.values()):
        data.notes.append(
            f"The annotated parts have no '{layout.DUPLICATE}' column: no duplicate evidence."
        )
        return
    parts = [(key, pf.metadata.num_rows) for key, pf in pfs.items()]
    dd = man["dedup"]
    eps = dd.get("eps")
    # a selection over the run's parts with another eps: its flags follow from max_similarity
    by_sim = bool((man.get("selection") or {}).get("from_annotated")) and eps is not None
    # examples from an evenly spaced subset of the parts beyond max_rows; the count from the
    # (tiny, run-length encoded) flag column of every part, so it is always exact
    chosen = {key for key, _ in subset(parts, max_rows)}
    groups = sum(pfs[key].metadata.num_row_groups for key in chosen)
    per_group = max(1, math.ceil(N_CANDIDATES / max(groups, 1)))
    flagged = 0
    found: list[Duplicate] = []
    for key, _ in parts:
        pf = pfs[key]
        examples = key in chosen and set(EVIDENCE) <= set(pf.schema_arrow.names)
        n_groups = pf.metadata.num_row_groups
        prefetch_groups(pf, range(n_groups), [layout.DUPLICATE])
        rows: list[dict[str, Any]] = []
        for g in range(n_groups):
            if by_sim:
                sim = pf.read_row_group(g, columns=[layout.MAX_SIMILARITY])[layout.MAX_SIMILARITY]
                flag = pc.greater_equal(sim, 1.0 - float(eps)).fill_null(False)
            else:
                flag = pf.read_row_group(g, columns=[layout.DUPLICATE])[layout.DUPLICATE]
                flag = flag.fill_null(False)
            n = int(pc.sum(flag).as_py() or 0)
            flagged += n
            want = min(n, per_group, N_CANDIDATES - len(found) - len(rows)) if examples else 0
            if want > 0:
                t = read_groups(pf, [g], EVIDENCE).filter(flag)
                take = np.unique(np.linspace(0, n - 1, want).round().astype(np.int64))
                rows += t.take(pa.array(take)).to_pylist()
        found += _with_originals(pf, rows)
    data.duplicates = int(dd.get("removed", flagged)) if by_sim else flagged
    data.duplicates_exact = len(parts) == len(keys)
    if eps is not None and len(chosen):
        data.near_eps = near_threshold(pfs, sorted(chosen), 1.0 - float(eps))
    if len(chosen) < len(parts):
        data.notes.append(
            f"Duplicate examples are drawn from {len(chosen)} of {len(parts)} annotated parts "
            "(evenly spaced); the count is over all parts."
        )
    if locate and found:
        _locate(store, score_files, [e for d in found for e in (d.row, d.of)])
        both = [d.row.shard is not None and d.of.shard is not None for d in found]
        found = [d for d, b in zip(found, both) if b] + [d for d, b in zip(found, both) if not b]
    data.duplicate_examples = found[:N_DUPLICATES]


def _with_originals(pf, rows: list[dict[str, Any]]) -> list[Duplicate]:
    """The flagged rows with the earlier-ranked rows they duplicate (same part, same cluster:
    read from the row groups of those clusters, id and distance only)."""
    if not rows:
        return []
    wanted = [r[layout.DUPLICATE_OF] for r in rows if r[layout.DUPLICATE_OF] is not None]
    dist: dict[Any, float] = {}
    if wanted:
        id_type = pf.schema_arrow.field(ID).type
        values = pa.array(wanted, id_type)
        for g in groups_with_clusters(pf, {r[CLUSTER] for r in rows}):
            t = read_groups(pf, [g], [ID, DISTANCE])
            t = t.filter(pc.is_in(t[ID], value_set=values))
            dist.update(zip(t[ID].to_pylist(), t[DISTANCE].to_pylist()))
    out = []
    for r in rows:
        j, of = int(r[CLUSTER]), r[layout.DUPLICATE_OF]
        sim = r[layout.MAX_SIMILARITY]
        out.append(
            Duplicate(
                row=Example(r[ID], j, float(r[DISTANCE]), None),
                of=Example(of, j, float(dist.get(of, float("nan"))), None),
                similarity=float("nan") if sim is None else float(sim),
            )
        )
    return out


def _locate(store: Store, score_files: list[tuple[str, int]], items: list[Example]) -> None:
    """Set each example's input shard from the score files that hold its id (ids are unique
    in a run), reading the id column of the row groups of the examples' clusters only."""
    missing = {e.id for e in items if e.id is not None}
    clusters = {e.cluster for e in items}
    shard_of: dict[Any, int] = {}
    for key, shard in score_files:
        if not missing:
            break
        pf = store.parquet_file(key)
        values = pa.array(list(missing), pf.schema_arrow.field(ID).type)
        for g in groups_with_clusters(pf, clusters):
            ids = read_groups(pf, [g], [ID])[ID]
            for i in ids.filter(pc.is_in(ids, value_set=values)).to_pylist():
                shard_of[i] = shard
                missing.discard(i)
    for e in items:
        e.shard = shard_of.get(e.id)


def near_threshold(pfs: dict[str, Any], keys: list[str], thr: float, n: int = N_DUPLICATES // 2):
    """The n rows whose max_similarity is nearest above `thr` (removed) and the n nearest
    below it (kept), from the parts `keys`, with the rows they are compared to. One read of
    the similarity column per row group, then the few chosen rows."""
    above: list[tuple[float, str, int, int]] = []
    below: list[tuple[float, str, int, int]] = []
    for key in keys:
        pf = pfs[key]
        if layout.MAX_SIMILARITY not in pf.schema_arrow.names:
            continue
        for g in range(pf.metadata.num_row_groups):
            col = pf.read_row_group(g, columns=[layout.MAX_SIMILARITY])[layout.MAX_SIMILARITY]
            gap = col.to_numpy(zero_copy_only=False).astype(np.float64) - thr
            for side, sel in ((above, gap >= 0), (below, gap < 0)):
                idx = np.flatnonzero(sel & np.isfinite(gap))
                idx = idx[np.argsort(np.abs(gap[idx]), kind="stable")[:n]]
                side.extend((abs(float(gap[i])), key, g, int(i)) for i in idx)
                side.sort()
                del side[n:]
    out = []
    for verdict, side in (("removed", above), ("kept", below)):
        for _, key, g, i in side:
            rows = read_groups(pfs[key], [g], EVIDENCE).slice(i, 1).to_pylist()
            out += [(d, verdict) for d in _with_originals(pfs[key], rows)]
    return out
