"""Reading a run folder into `ReportData`: what the page shows, with bounded memory.

Everything is read through `Store`: run.json (settings, shard plan), the score markers, the
score and keep files, the annotated parts (dedup evidence) and `_MANIFEST.json` when the run
has finished. Files are read one row group and a few columns at a time into fixed-bin
histograms; when a run holds more than `max_rows` rows only an evenly spaced subset of the files
is read (the page says so). Keys and column names come from `scoring.layout`; what a strategy
means for the figures (a global threshold, per-cluster cuts) comes from its registered rule.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from scoring import commit, layout, strategies
from scoring.errors import NotFound
from scoring.inputs.parquet import Shard, read_groups
from scoring.report import content, duplicates
from scoring.report.data import Example, ReportData
from scoring.report.tables import (
    CLUSTER,
    DISTANCE,
    ID,
    distance_range,
    groups_with_clusters,
    iter_row_groups,
    read_json_or_none,
    subset,
)
from scoring.storage import Store

log = logging.getLogger(__name__)

MAX_ROWS = 20_000_000  # rows of score (and of keep) files read for the figures; beyond: subset
N_BINS = 80
TOP_CLUSTERS = 4
N_EXAMPLES = 3


def float_from_key(key: int, hardest_first: bool) -> float:
    """Inverse of `scoring.kernels.radix.distance_key` for one uint32 key."""
    fk = (~key & 0xFFFFFFFF) if hardest_first else key
    u = (fk & 0x7FFFFFFF) if fk & 0x80000000 else (~fk & 0xFFFFFFFF)
    return float(np.array([u], dtype=np.uint32).view(np.float32)[0])


def _use_rule(data: ReportData, name: str) -> None:
    """What the figures may draw for this strategy, from its registered rule."""
    data.strategy = name
    rule = strategies.REGISTRY.get(name)
    if rule is None:
        data.rule_known = False
        data.notes.append(
            f"Strategy '{name}' is not registered in this process (a plug-in rule?): no "
            "threshold or per-cluster cut is drawn."
        )
        return
    data.per_cluster = bool(rule.per_cluster)
    data.hardest_first = rule.hardest_first
    data.rule_summary = rule.summary


def _threshold(data: ReportData, man: dict[str, Any]) -> tuple[float | None, str]:
    """The distance cut of a global rule that orders by distance (hard, easy), if any."""
    th = man.get("threshold")
    if data.per_cluster or data.hardest_first is None or not isinstance(th, dict):
        return None, ""
    if th.get("keep_all") or th.get("keep_none"):
        return None, ""
    if th.get("distance") is not None:
        d = float(th["distance"])
    elif th.get("key") is not None:
        d = float_from_key(int(th["key"]), data.hardest_first)
    else:
        return None, ""
    op = "≥" if data.hardest_first else "≤"
    return d, f"keep distance {op} {d:.4g}"


def collect(
    store: Store,
    example_column: str | None = None,
    max_rows: int = MAX_ROWS,
    n_bins: int = N_BINS,
    selection: str | None = None,
    manifest: dict | None = None,
) -> ReportData:
    """Read what the run folder holds into a ReportData (bounded memory, Store IO only); with
    `selection`, that committed selection's manifest and keep files instead of the run's;
    `manifest`: that manifest as given (not yet committed) instead of the stored one."""
    run = read_json_or_none(store, layout.RUN_JSON)
    if run is None:
        raise NotFound(f"{store.uri()}: not a protoprune run folder (no {layout.RUN_JSON})")
    man_key = layout.MANIFEST
    if selection:
        man_key = f"{layout.selection_prefix(selection)}/{layout.MANIFEST}"
        if not store.exists(man_key):
            raise NotFound(
                f"{store.uri(man_key)}: not found (no committed selection {selection!r})"
            )
    man = manifest if manifest is not None else read_json_or_none(store, man_key)
    cfg = run.get("config", {})
    shards = [Shard.from_json(s) for s in run.get("shards", [])]
    proto = read_json_or_none(store, layout.PROTOTYPES_COMMIT)
    proto_sha = (proto or {}).get("sha256")
    marks = commit.committed(store, layout.SCORES)
    markers = commit.current(marks, proto_sha) if proto_sha is not None else marks
    data = ReportData(
        uri=store.uri(layout.selection_prefix(selection) if selection else ""),
        run=run,
        manifest=man,
        shards_total=len(shards),
        shards_done=len(markers),
        rows_done=sum(int(m.get("rows", 0)) for m in markers.values()),
        prototypes_committed=proto is not None,
        marker_seconds=sum(float(m.get("seconds", 0.0)) for m in markers.values()),
    )
    _use_rule(data, str((man or {}).get("strategy") or cfg.get("strategy", "")))
    col = example_column or cfg.get("text_column") or cfg.get("image_column")
    metric = (man or {}).get("metric") or cfg.get("metric", "cosine")
    k = int((man or {}).get("k") or cfg.get("k") or 0)
    score_files = [(layout.score_key(i), int(m.get("rows", 0))) for i, m in sorted(markers.items())]
    if not score_files:
        data.notes.append("No shard is scored yet: nothing to plot.")
        return data
    chosen = subset(score_files, max_rows)
    data.scanned_shards = len(chosen)
    if len(chosen) < len(score_files):
        data.notes.append(
            f"Distances and examples are read from {len(chosen)} of {len(score_files)} score "
            f"files (evenly spaced); histogram counts are scaled to all rows."
        )
    shard_of = {layout.score_key(i): i for i in markers}
    files = [(key, shard_of[key]) for key, _ in chosen]
    lo, hi = distance_range(store, [key for key, _ in files], metric)
    edges = np.linspace(lo, hi, n_bins + 1)
    data.bin_edges = edges
    hist = np.zeros(n_bins, np.int64)
    counts = np.zeros(max(k, 1), np.int64)
    for key, _ in files:
        for t in iter_row_groups(store, key, [CLUSTER, DISTANCE]):
            hist += np.histogram(t[DISTANCE].to_numpy(zero_copy_only=False), bins=edges)[0]
            cl = t[CLUSTER].to_numpy(zero_copy_only=False)
            if len(cl) and cl.max() >= len(counts):
                counts = np.concatenate([counts, np.zeros(int(cl.max()) + 1 - len(counts), int)])
            counts += np.bincount(cl, minlength=len(counts))
    data.scanned_rows = int(hist.sum())
    data.hist_all = hist * (data.rows_done / max(data.scanned_rows, 1))

    if man is not None:
        cl = man.get("clusters", {})
        data.cluster_rows = np.asarray(cl.get("rows", counts), np.int64)
        if cl.get("kept") is not None:
            data.cluster_kept = np.asarray(cl["kept"], np.int64)
        if cl.get("mean_distance") is not None:
            data.cluster_mean = np.asarray(cl["mean_distance"], np.float64)
        data.threshold, data.threshold_label = _threshold(data, man)
        _collect_kept(store, data, man, max_rows)
        duplicates.collect_duplicates(store, data, man, files, max_rows, locate=bool(col))
    else:
        data.cluster_rows = counts
        data.notes.append(
            "Cluster sizes count the scored shards only; nothing is kept before the run commits."
        )
    top = [int(j) for j in np.argsort(-data.cluster_rows, kind="stable")[:TOP_CLUSTERS]]
    top = [j for j in top if data.cluster_rows[j] > 0]
    data.examples = _cluster_examples(store, files, top)
    if col:
        items = [e for ex in data.examples.values() for lst in ex.values() for e in lst]
        items += [e for d in data.duplicate_examples for e in (d.row, d.of)]
        content.attach_content(store, data, run, col, shards, items)
    return data


def _collect_kept(store: Store, data: ReportData, man: dict[str, Any], max_rows: int) -> None:
    files = [(f["path"], int(f.get("rows", 0))) for f in man.get("files", [])]
    data.kept_total_files = len(files)
    if not files or data.bin_edges is None:
        data.hist_kept = np.zeros(len(data.bin_edges) - 1 if data.bin_edges is not None else 0)
        return
    chosen = subset(files, max_rows)
    data.kept_scanned_files = len(chosen)
    edges = data.bin_edges
    hist = np.zeros(len(edges) - 1, np.int64)
    k = len(data.cluster_rows) if data.cluster_rows is not None else 0
    cut = np.full(k, np.inf)
    read = 0
    for key, _ in chosen:
        for t in iter_row_groups(store, key, [CLUSTER, DISTANCE]):
            d = t[DISTANCE].to_numpy(zero_copy_only=False)
            # out-of-range values (sampled score files) go to the edge bins
            hist += np.histogram(np.clip(d, edges[0], edges[-1]), bins=edges)[0]
            read += len(d)
            if k:  # same dtypes as `cut`: ufunc.at's casting loop was 7x slower (0.38 s)
                cl = t[CLUSTER].to_numpy(zero_copy_only=False).astype(np.intp)
                np.minimum.at(cut, cl, d.astype(np.float64))
    rows_kept = int(man.get("rows_kept", read))
    data.hist_kept = hist * (rows_kept / max(read, 1))
    # a rule that keeps the hardest rows of each cluster has a per-cluster cut: the smallest
    # kept distance (global rules ordering otherwise, or by hash, have none)
    if len(chosen) == len(files) and data.hardest_first is True:
        data.cluster_cut = np.where(np.isfinite(cut), cut, np.nan)
    if len(chosen) < len(files):
        data.notes.append(
            f"The kept-rows histogram is read from {len(chosen)} of {len(files)} keep files."
        )


def _cluster_examples(
    store: Store, files: list[tuple[str, int]], top: list[int]
) -> dict[int, dict[str, list[Example]]]:
    """The N_EXAMPLES easiest and hardest rows of each top cluster (ties by id)."""
    if not top:
        return {}
    parts: dict[int, list[pa.Table]] = {j: [] for j in top}
    for key, shard in files:
        pf = store.parquet_file(key)
        for g in groups_with_clusters(pf, top):
            t = read_groups(pf, [g], [ID, CLUSTER, DISTANCE])
            for j in top:
                sub = t.filter(pc.equal(t[CLUSTER], j))
                if sub.num_rows:
                    sub = sub.append_column("_shard", pa.array([shard] * sub.num_rows, pa.int32()))
                    parts[j].append(_extremes(sub))
            for j in top:  # keep memory bounded: reduce as we go
                if len(parts[j]) > 8:
                    parts[j] = [_extremes(pa.concat_tables(parts[j]))]
    out: dict[int, dict[str, list[Example]]] = {}
    for j in top:
        if not parts[j]:
            continue
        rows = pa.concat_tables(parts[j]).to_pylist()
        easy = sorted(rows, key=lambda r: (r[DISTANCE], r[ID]))[:N_EXAMPLES]
        hard = sorted(rows, key=lambda r: (-r[DISTANCE], r[ID]))[:N_EXAMPLES]

        def ex(r: dict[str, Any], j: int = j) -> Example:
            return Example(r[ID], j, float(r[DISTANCE]), int(r["_shard"]))

        out[j] = {"prototypical": [ex(r) for r in easy], "hardest": [ex(r) for r in hard]}
    return out


def _extremes(t: pa.Table) -> pa.Table:
    if t.num_rows <= 2 * N_EXAMPLES:
        return t
    asc = pc.sort_indices(t, sort_keys=[(DISTANCE, "ascending"), (ID, "ascending")])
    desc = pc.sort_indices(t, sort_keys=[(DISTANCE, "descending"), (ID, "ascending")])
    idx = np.unique(np.concatenate([asc[:N_EXAMPLES].to_numpy(), desc[:N_EXAMPLES].to_numpy()]))
    return t.take(pa.array(idx))
