"""The report's figures: PNGs drawn with matplotlib (Agg), inlined as base64 data: URLs, so the
page needs no other file and no network. Each returns None when it has nothing to draw."""

from __future__ import annotations

import base64
import io
from typing import Any

import numpy as np

from scoring.report.data import ReportData

KEPT_COLOR = "#1f77b4"
REMOVED_COLOR = "#c7c7c7"
LINE_COLOR = "#d62728"


def _per_cluster_axes(ax, title: str) -> None:
    """Labels of a rows-per-cluster plot (clusters ordered largest first)."""
    ax.set_xlabel("clusters, largest first")
    ax.set_ylabel("rows")
    ax.set_title(title, fontsize=10)
    ax.legend(frameon=False)
    ax.spines[["top", "right"]].set_visible(False)


def _plt():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _png(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    _plt().close(fig)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def fig_distances(data: ReportData) -> str | None:
    if data.bin_edges is None or data.hist_all is None:
        return None
    plt = _plt()
    e = data.bin_edges
    fig, ax = plt.subplots(figsize=(8.5, 3.0))
    all_label = "all rows" if data.finished else "rows scored so far"
    ax.stairs(data.hist_all, e, fill=True, color=REMOVED_COLOR, label=all_label)
    if data.hist_kept is not None and len(data.hist_kept):
        ax.stairs(data.hist_kept, e, fill=True, color=KEPT_COLOR, alpha=0.85, label="kept")
    if data.threshold is not None:
        ax.axvline(data.threshold, color=LINE_COLOR, lw=2, label=data.threshold_label)
    metric = (data.manifest or {}).get("metric") or data.run.get("config", {}).get("metric")
    ax.set_xlabel(
        "distance to nearest prototype" + (" (1 − cos)" if metric == "cosine" else " (L2)")
    )
    ax.set_ylabel("rows")
    ax.legend(loc="upper right", frameon=False)
    ax.spines[["top", "right"]].set_visible(False)
    return _png(fig)


def fig_clusters(data: ReportData) -> str | None:
    if data.cluster_rows is None or not len(data.cluster_rows):
        return None
    plt = _plt()
    rows = data.cluster_rows
    order = np.argsort(-rows, kind="stable")
    x = np.arange(len(rows))
    grey = "removed" if data.cluster_kept is not None else "rows scored so far"
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.0), gridspec_kw={"width_ratios": [3, 2]})
    ax = axes[0]
    if len(rows) <= 120:
        ax.bar(x, rows[order], color=REMOVED_COLOR, width=0.9, label=grey)
        if data.cluster_kept is not None:
            ax.bar(x, data.cluster_kept[order], color=KEPT_COLOR, width=0.9, label="kept")
    else:
        ax.fill_between(x, rows[order], step="mid", color=REMOVED_COLOR, label=grey)
        if data.cluster_kept is not None:
            ax.fill_between(x, data.cluster_kept[order], step="mid", color=KEPT_COLOR, label="kept")
    _per_cluster_axes(ax, "cluster sizes")
    ax = axes[1]
    if data.cluster_kept is not None:
        nz = rows > 0
        frac = np.divide(data.cluster_kept, np.maximum(rows, 1))
        c = data.cluster_mean[nz] if data.cluster_mean is not None else KEPT_COLOR
        sc = ax.scatter(rows[nz], frac[nz], s=14, c=c, cmap="viridis")
        if data.cluster_mean is not None:
            fig.colorbar(sc, ax=ax, label="mean distance")
        ax.set_xscale("log" if rows[nz].max() > 20 * max(rows[nz].min(), 1) else "linear")
        ax.set_ylim(-0.03, 1.03)
        ax.set_xlabel("cluster size (rows)")
        ax.set_ylabel("kept fraction")
        ax.set_title("kept fraction per cluster", fontsize=10)
    else:
        ax.axis("off")
        ax.text(0.5, 0.5, "kept fractions appear\nwhen the run commits", ha="center")
    ax.spines[["top", "right"]].set_visible(False)
    fig.tight_layout()
    return _png(fig)


def label_rows(man: dict[str, Any] | None) -> list[tuple[str, int, int]]:
    """(label, before, after) from manifest['labels'], largest first."""
    lab = (man or {}).get("labels")
    if not isinstance(lab, dict) or not isinstance(lab.get("before"), dict):
        return []
    after = lab.get("after") or {}
    rows = [
        (str(k), int(v), int(after.get(k, after.get(str(k), 0)))) for k, v in lab["before"].items()
    ]
    return sorted(rows, key=lambda r: (-r[1], r[0]))


def fig_labels(data: ReportData) -> str | None:
    rows = label_rows(data.manifest)[:30]
    if not rows:
        return None
    plt = _plt()
    rows = rows[::-1]
    fig, ax = plt.subplots(figsize=(8.5, 0.6 + 0.26 * len(rows)))
    y = np.arange(len(rows))
    frac = [a / b if b else 0.0 for _, b, a in rows]
    ax.barh(y, frac, color=KEPT_COLOR)
    overall = (data.manifest or {}).get("rows_kept", 0) / max(
        (data.manifest or {}).get("rows_in", 1), 1
    )
    ax.axvline(overall, color=LINE_COLOR, ls="--", label=f"overall {overall:.1%}")
    ax.set_yticks(y, [f"{lab} ({b:,})" for lab, b, _ in rows])
    ax.set_xlim(0, 1)
    ax.set_xlabel("kept fraction")
    ax.legend(frameon=False, loc="lower right")
    ax.spines[["top", "right"]].set_visible(False)
    return _png(fig)


def stage_timings(data: ReportData) -> list[tuple[str, float, float | None]]:
    """(stage, seconds, rows/s or None)."""
    man = data.manifest or {}
    t = man.get("timings_seconds") or {}
    n = man.get("rows_in") or data.run.get("input", {}).get("rows") or 0
    out = []
    for stage, secs in t.items():
        secs = float(secs)
        rate = n / secs if secs > 0 and stage != "plan" and n else None
        out.append((stage, secs, rate))
    return out


def fig_timings(data: ReportData) -> str | None:
    rows = stage_timings(data)
    if not rows:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(8.5, 0.7 + 0.35 * len(rows)))
    y = np.arange(len(rows))[::-1]
    secs = [s for _, s, _ in rows]
    ax.barh(y, secs, color=KEPT_COLOR)
    for yi, (_, s, rate) in zip(y, rows):
        txt = f" {s:.1f}s" + (f"  ({human(rate)} rows/s)" if rate else "")
        ax.text(s, yi, txt, va="center", fontsize=9)
    ax.set_yticks(y, [name for name, _, _ in rows])
    ax.set_xlabel("seconds")
    ax.set_xlim(0, max(secs) * 1.45 + 1e-9)
    ax.spines[["top", "right"]].set_visible(False)
    return _png(fig)


def human(x: float) -> str:
    for unit, div in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(x) >= div:
            return f"{x / div:.3g}{unit}"
    return f"{x:.3g}"


def per_cluster(man: dict[str, Any] | None, section: str, name: str, k: int) -> np.ndarray | None:
    """manifest[section][name] as a float array when it is a list of k numbers, else None."""
    sec = (man or {}).get(section)
    v = sec.get(name) if isinstance(sec, dict) else None
    if not isinstance(v, list) or len(v) != k or not all(isinstance(x, (int, float)) for x in v):
        return None
    return np.asarray(v, np.float64)


def fig_dedup(data: ReportData) -> str | None:
    """Rows and duplicates removed per cluster (manifest dedup.removed_per_cluster)."""
    rows = data.cluster_rows
    if rows is None or not len(rows):
        return None
    removed = per_cluster(data.manifest, "dedup", "removed_per_cluster", len(rows))
    if removed is None:
        return None
    plt = _plt()
    order = np.argsort(-rows, kind="stable")
    x = np.arange(len(rows))
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.0), gridspec_kw={"width_ratios": [3, 2]})
    ax = axes[0]
    if len(rows) <= 120:
        ax.bar(x, rows[order], color=REMOVED_COLOR, width=0.9, label="rows")
        ax.bar(x, removed[order], color=LINE_COLOR, width=0.9, label="duplicates removed")
    else:
        ax.fill_between(x, rows[order], step="mid", color=REMOVED_COLOR, label="rows")
        ax.fill_between(x, removed[order], step="mid", color=LINE_COLOR, label="duplicates removed")
    _per_cluster_axes(ax, "duplicates removed per cluster")
    ax = axes[1]
    nz = rows > 0
    ax.scatter(rows[nz], removed[nz] / rows[nz], s=14, color=LINE_COLOR)
    ax.set_xscale("log" if rows[nz].max() > 20 * max(rows[nz].min(), 1) else "linear")
    ax.set_ylim(-0.03, 1.03)
    ax.set_xlabel("cluster size (rows)")
    ax.set_ylabel("fraction removed")
    ax.set_title("duplicate fraction per cluster", fontsize=10)
    ax.spines[["top", "right"]].set_visible(False)
    fig.tight_layout()
    return _png(fig)


def fig_dbp(data: ReportData) -> str | None:
    """dbp: each cluster's complexity against its target share and its kept share."""
    rows = data.cluster_rows
    if rows is None or not len(rows):
        return None
    c = per_cluster(data.manifest, "dbp", "complexity", len(rows))
    p = per_cluster(data.manifest, "dbp", "target", len(rows))
    if c is None or p is None:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(8.5, 3.0))
    size = 10 + 60 * rows / max(int(rows.max()), 1)
    ax.scatter(c, p, s=size, color=REMOVED_COLOR, edgecolor="#777", label="target share")
    if data.cluster_kept is not None and data.cluster_kept.sum() > 0:
        ax.scatter(
            c,
            data.cluster_kept / data.cluster_kept.sum(),
            s=12,
            color=KEPT_COLOR,
            label="kept share",
        )
    ax.set_xlabel("cluster complexity (d_inter × d_intra)")
    ax.set_ylabel("share of the kept rows")
    ax.legend(frameon=False)
    ax.spines[["top", "right"]].set_visible(False)
    return _png(fig)
