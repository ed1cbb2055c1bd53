"""The eps curve of a dedup run: rows removed for each eps of the manifest's grid
(`dedup.curve`, from the stored `max_similarity`), the chosen eps marked; and the duplicate
pairs nearest that eps on either side (removed just above the threshold, kept just below),
so a user sees what a slightly smaller or larger eps would change."""

from __future__ import annotations

from typing import Any

import numpy as np

from scoring.report.data import ReportData
from scoring.report.figures import KEPT_COLOR, LINE_COLOR, _plt, _png
from scoring.report.markup import img, table


def curve_of(man: dict[str, Any] | None) -> tuple[np.ndarray, np.ndarray] | None:
    dd = (man or {}).get("dedup")
    c = dd.get("curve") if isinstance(dd, dict) else None
    if not isinstance(c, dict) or not c.get("eps") or len(c["eps"]) != len(c.get("removed", [])):
        return None
    return np.asarray(c["eps"], np.float64), np.asarray(c["removed"], np.float64)


def fig_eps_curve(data: ReportData) -> str | None:
    got = curve_of(data.manifest)
    if got is None:
        return None
    eps, removed = got
    dd = data.manifest["dedup"]
    rows = max(int(data.manifest.get("rows_in") or 1), 1)
    plt = _plt()
    fig, ax = plt.subplots(figsize=(8.5, 3.0))
    ax.plot(eps, removed / rows, marker="o", ms=3, color=KEPT_COLOR, label="rows removed")
    e, r = dd.get("eps"), dd.get("removed")
    if isinstance(e, (int, float)) and e > 0:
        ax.axvline(e, color=LINE_COLOR, lw=1.5, label=f"chosen eps = {e:g}")
        if isinstance(r, int):
            ax.scatter([e], [r / rows], color=LINE_COLOR, zorder=3)
    ax.set_xscale("log")
    ax.set_xlabel("eps (a row is removed when cosine ≥ 1 − eps to a harder row of its cluster)")
    ax.set_ylabel("fraction of rows removed")
    ax.set_title("rows removed by eps", fontsize=10)
    ax.legend(frameon=False)
    ax.spines[["top", "right"]].set_visible(False)
    fig.tight_layout()
    return _png(fig)


def curve_html(data: ReportData, fig: str | None) -> str:
    """The curve's figure and the near-eps pairs table (empty when there is no curve)."""
    if curve_of(data.manifest) is None:
        return ""
    p = ["<h3>Choosing eps</h3>"]
    p.append(
        '<p class="note">Rows removed for each eps, counted from the stored similarities '
        "(every row's largest cosine to an earlier-ranked row of its cluster). "
        "<code>protoprune select RUN --name NAME --dedup-eps E</code> applies another eps "
        "exactly, without re-scoring.</p>"
    )
    p.append(img(fig, "rows removed by eps") if fig else "")
    if data.near_eps:
        head = ["id", "cluster", "similarity", "duplicate of", "at this eps"]
        rows = [
            [str(d.row.id), d.row.cluster, f"{d.similarity:.6f}", str(d.of.id), verdict]
            for d, verdict in data.near_eps
        ]
        p.append(
            '<p class="note">The pairs nearest the chosen threshold 1 − eps: just above it '
            "(removed) and just below it (kept).</p>"
        )
        p.append(table(rows, head, {1, 2}))
    return "".join(p)
