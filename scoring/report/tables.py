"""Bounded reads of the run folder's tables: one row group and a few columns at a time."""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow.compute as pc

from scoring import commit, layout
from scoring.inputs.parquet import groups_matching, prefetch_groups
from scoring.storage import Store

ID, CLUSTER, DISTANCE = layout.SCORE_COLUMNS[:3]


def read_json_or_none(store: Store, key: str) -> Any | None:
    if not store.exists(key):
        return None
    try:
        return commit.read_json(store, key)
    except ValueError:
        return None


def subset(items: list[tuple[str, int]], max_rows: int) -> list[tuple[str, int]]:
    """An evenly spaced subset of (key, rows) whose rows stay within max_rows (at least one)."""
    total = sum(r for _, r in items)
    if total <= max_rows or len(items) <= 1:
        return items
    n = max(1, int(len(items) * max_rows / total))
    picks = np.unique(np.linspace(0, len(items) - 1, n).round().astype(int))
    out, rows = [], 0
    for i in picks:
        if out and rows + items[i][1] > max_rows:
            break
        out.append(items[i])
        rows += items[i][1]
    return out


def iter_row_groups(store: Store, key: str, columns: list[str]):
    """Yield the file's row groups one at a time (only the columns that exist)."""
    pf = store.parquet_file(key)
    names = pf.schema_arrow.names
    cols = [c for c in columns if c in names]
    groups = range(pf.metadata.num_row_groups)
    prefetch_groups(pf, groups, cols)  # object stores: one GET for the file's columns
    for g in groups:
        yield pf.read_row_group(g, columns=cols)


def groups_with_clusters(pf, wanted) -> list[int]:
    """Row groups whose `cluster` statistics may hold one of the wanted clusters."""
    return groups_matching(pf, CLUSTER, lambda a, b: any(a <= j <= b for j in wanted))


def distance_range(store: Store, keys: list[str], metric: str) -> tuple[float, float]:
    """Global min and max of the distance column from the Parquet footers' statistics."""
    lo, hi = np.inf, -np.inf
    for key in keys:
        pf = store.parquet_file(key)
        md = pf.metadata
        col = pf.schema_arrow.get_field_index(DISTANCE)
        for g in range(md.num_row_groups):
            st = md.row_group(g).column(col).statistics
            if st is None or not st.has_min_max:
                mm = pc.min_max(pf.read_row_group(g, columns=[DISTANCE])[DISTANCE]).as_py()
                smin, smax = mm["min"], mm["max"]
            else:
                smin, smax = st.min, st.max
            if smin is not None:
                lo, hi = min(lo, float(smin)), max(hi, float(smax))
    if not np.isfinite(lo):
        return (0.0, 2.0 if metric == "cosine" else 1.0)
    if hi <= lo:
        hi = lo + 1e-6
    return lo, hi
