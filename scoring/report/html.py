"""`render_html`: the report page as one self-contained string (figures inline).

Manifest values are shown as tables and figures: scalars as text, dicts as key/value tables,
lists of one number per cluster (dedup's removed_per_cluster, dbp's complexity and target, and
any such list a plug-in rule records) as columns of the cluster table, other lists as tables
of their first items (`markup.value_html`).
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from scoring import layout
from scoring.report import figures
from scoring.report.content import THUMB_PX
from scoring.report.curve import curve_html, fig_eps_curve
from scoring.report.data import Example, ReportData
from scoring.report.markup import CSS, Raw, esc, fmt, img, is_numbers, table, value_html
from scoring.report.tables import CLUSTER, DISTANCE, ID

# manifest fields shown in their own place; any other field is listed under "Selection"
SHOWN = {
    "format_version", "run_id", "config_hash", "code_version", "strategy", "metric", "k",
    "rows_in", "rows_kept", "n_keep", "clusters", "files", "annotated", "timings_seconds",
    "committed_at", "labels", "dedup", "threshold", "select_passes", "percentile",
    "cluster_ranges", "prototypes_sha256", "reuse", "prototypes_from", "reduce_seconds",
}  # fmt: skip
COLUMN_NAMES = {
    ("dedup", "removed_per_cluster"): "duplicates removed",
    ("dbp", "complexity"): "dbp complexity",
    ("dbp", "target"): "dbp target share",
}


def render_html(data: ReportData) -> str:
    """The whole page as one string (figures inline)."""
    man = data.manifest or {}
    cfg = data.run.get("config", {})
    run_id = data.run.get("run_id") or cfg.get("run_id", "")
    draw = {
        "dist": figures.fig_distances,
        "clusters": figures.fig_clusters,
        "labels": figures.fig_labels,
        "timings": figures.fig_timings,
        "dedup": figures.fig_dedup,
        "eps": fig_eps_curve,
        "dbp": figures.fig_dbp,
    }
    try:
        figs = {name: f(data) for name, f in draw.items()}
        plt_ok = True
    except ImportError:
        figs, plt_ok = {}, False
    p: list[str] = [
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>",
        "<meta name='viewport' content='width=device-width, initial-scale=1'>",
        f"<title>protoprune report: {esc(run_id)}</title><style>{CSS}</style></head><body><main>",
    ]
    badge = (
        '<span class="badge done">finished</span>'
        if data.finished
        else '<span class="badge running">not finished</span>'
    )
    p.append(f"<h1>protoprune report: {esc(run_id)}{badge}</h1>")
    when = man.get("committed_at") or data.run.get("created_at", "")
    p.append(
        f'<div class="sub">{esc(data.uri)} · '
        f"{'committed' if data.finished else 'started'} {esc(when)} · "
        f"report written {esc(time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime()))}</div>"
    )
    if not data.finished:
        p.append(
            f'<div class="banner"><b>Not finished:</b> this run has no {layout.MANIFEST} yet, so '
            "there is no final keep list. Shown: what is committed so far "
            f"({data.shards_done} of {data.shards_total} shards scored, "
            f"{data.rows_done:,} rows; prototypes "
            f"{'committed' if data.prototypes_committed else 'not committed yet'}).</div>"
        )
    p.append(_cards(data))
    p.append(_update(man))
    p += [f'<p class="note">{esc(n)}</p>' for n in data.notes]
    if not plt_ok:
        p.append('<p class="note">matplotlib is not installed: figures are left out.</p>')

    p.append("<h2>Distance to the nearest prototype</h2>")
    if figs.get("dist"):
        cap = (
            ("Grey: all rows; blue: kept rows. " if data.finished else "Rows scored so far. ")
            + (f"Red line: {esc(data.threshold_label)}. " if data.threshold is not None else "")
            + ("Each cluster has its own cut (per-cluster quotas)." if data.per_cluster else "")
        )
        p.append(img(figs["dist"], "distance histogram") + f'<p class="note">{cap}</p>')
    else:
        p.append('<p class="note">No scores yet.</p>')

    p.append("<h2>Clusters</h2>")
    if figs.get("clusters"):
        p.append(img(figs["clusters"], "cluster sizes and kept fraction"))
    if figs.get("dbp"):
        p.append(img(figs["dbp"], "dbp complexity and target share per cluster"))
    p.append(_cluster_table(data))
    p.append(_labels(data, figs.get("labels")))
    p.append(_examples(data))
    p.append(_dedup(data, figs.get("dedup")))
    p.append(curve_html(data, figs.get("eps")))
    if data.finished:
        p.append("<h2>Selection</h2>" + _selection_table(data))
    p.append(_timings(data, figs.get("timings")))
    p.append("<h2>Settings</h2>")
    p.append(_settings_table(data))
    p.append("</main></body></html>")
    return "\n".join(x for x in p if x)


def _update(man: dict[str, Any]) -> str:
    """An update of a growing dataset: where the prototypes and the reused scores came from,
    shards reused and scored, and the drift of the new rows (a warning when they sit much
    farther from the prototypes than the reused ones)."""
    src, reuse = man.get("prototypes_from"), man.get("reuse")
    if not src and not reuse:
        return ""
    p = ["<h2>Update</h2>"]
    rows: list[list[Any]] = []
    if src:
        rows.append(["prototypes from", src.get("url", "")])
    if reuse:
        rows += [
            ["scores reused from", reuse.get("from", "")],
            ["shards reused / scored", f"{reuse['shards_reused']:,} / {reuse['shards_scored']:,}"],
            ["rows reused / new", f"{reuse['rows_reused']:,} / {reuse['rows_new']:,}"],
            ["mean distance of reused rows", _opt(reuse.get("mean_distance_reused"))],
            ["mean distance of new rows", _opt(reuse.get("mean_distance_new"))],
            ["new / reused", _opt(reuse.get("drift_ratio"))],
        ]
        if reuse.get("drift_warning"):
            p.append(
                '<div class="banner"><b>Drift:</b> the new rows sit '
                f"{reuse['drift_ratio']:.2f}× farther from the prototypes than the reused "
                "ones. The prototypes may no longer fit the data: consider a refit (a run "
                "without --prototypes-from).</div>"
            )
    return "".join(p) + table(rows)


def _opt(v: Any) -> str:
    return "–" if v is None else fmt(v)


def _cards(data: ReportData) -> str:
    man = data.manifest or {}
    cfg = data.run.get("config", {})
    n_in = man.get("rows_in", data.run.get("input", {}).get("rows", 0))
    cards = [("rows in", f"{int(n_in):,}")]
    if data.finished:
        kept = int(man.get("rows_kept", 0))
        cards += [("rows kept", f"{kept:,}"), ("kept", f"{kept / max(int(n_in), 1):.1%}")]
    else:
        cards += [("shards scored", f"{data.shards_done} / {data.shards_total}")]
    cards += [
        ("strategy", data.strategy),
        ("prototypes k", fmt(man.get("k", cfg.get("k", "")))),
        ("metric", man.get("metric", cfg.get("metric", ""))),
    ]
    if data.duplicates is not None:
        cards.append(("rows flagged duplicate", f"{data.duplicates:,}"))
    items = "".join(
        f'<div class="card"><b>{esc(v)}</b><span>{esc(k)}</span></div>' for k, v in cards
    )
    return f'<div class="cards">{items}</div>'


def cluster_columns(man: dict[str, Any] | None, k: int) -> list[tuple[str, list]]:
    """The manifest's lists of one number per cluster (outside `clusters`), named."""
    out = []
    for sec, val in (man or {}).items():
        if sec == "clusters":
            continue
        if isinstance(val, dict):
            for name, v in val.items():
                if isinstance(v, list) and len(v) == k and is_numbers(v):
                    out.append((COLUMN_NAMES.get((sec, name), f"{sec}.{name}"), v))
        elif isinstance(val, list) and len(val) == k and is_numbers(val):
            out.append((sec, val))
    return out


def _cluster_table(data: ReportData) -> str:
    if data.cluster_rows is None:
        return ""
    rows = data.cluster_rows
    k = len(rows)
    top = np.argsort(-rows, kind="stable")[:10]
    cols: list[tuple[str, Any]] = [("rows", rows)]
    if data.cluster_kept is not None:
        frac = [f"{a / max(b, 1):.1%}" for a, b in zip(data.cluster_kept, rows)]
        cols += [("kept", data.cluster_kept), ("kept fraction", frac)]
    if data.cluster_mean is not None:
        cols.append(("mean distance", data.cluster_mean))
    if data.cluster_cut is not None:
        cut = ["-" if np.isnan(c) else float(c) for c in data.cluster_cut]
        cols.append(("smallest kept distance", cut))
    cols += cluster_columns(data.manifest, k)
    out = [[int(j)] + [_scalar(v[j]) for _, v in cols] for j in top]
    head = ["cluster"] + [name for name, _ in cols]
    return f'<p class="note">{k:,} clusters; the 10 largest:</p>' + table(
        out, head, set(range(1, len(head)))
    )


def _scalar(v: Any) -> Any:
    return v.item() if isinstance(v, np.generic) else v


def _labels(data: ReportData, fig: str | None) -> str:
    rows = figures.label_rows(data.manifest)
    if not rows:
        return ""
    lab = data.manifest.get("labels", {})
    dd = lab.get("after_dedup") if isinstance(lab.get("after_dedup"), dict) else None
    head = ["label", "before"] + (["after dedup"] if dd is not None else []) + ["after", "kept"]
    body = [
        [name, b]
        + ([int(dd.get(name, 0))] if dd is not None else [])
        + [a, f"{a / b:.1%}" if b else "-"]
        for name, b, a in rows
    ]
    return (
        f"<h2>Labels (column '{esc(lab.get('column', ''))}')</h2>"
        + img(fig, "kept fraction per label")
        + "<details><summary>all labels</summary>"
        + table(body, head, set(range(1, len(head))))
        + "</details>"
    )


def _content(e: Example) -> Any:
    if e.content and e.is_image:
        return Raw(f'<img src="{e.content}" alt="id {esc(e.id)}" width="{THUMB_PX}">')
    return e.content or ""


def _example_li(e: Example) -> str:
    c = _content(e)
    body = (c if isinstance(c, Raw) else esc(c)) + " " if c else ""
    return f'<li>{body}<span class="d">id {esc(e.id)} · distance {e.distance:.4g}</span></li>'


def _examples(data: ReportData) -> str:
    if not data.examples:
        return ""
    col = data.example_column
    p = [
        "<h2>Examples from the largest clusters</h2>",
        '<p class="note">Prototypical: closest to the cluster centre (the easiest rows); '
        "hardest: farthest from it"
        + (
            f"; content from column '{esc(col)}'"
            if col
            else "; ids only (pass a text or image column to see content)"
        )
        + ".</p>",
    ]
    if data.example_note:
        p.append(f'<p class="note">{esc(data.example_note)}</p>')
    for j, ex in data.examples.items():
        size = int(data.cluster_rows[j]) if data.cluster_rows is not None else 0
        p.append(f"<h3>cluster {j} · {size:,} rows</h3><div class='ex'>")
        for title in ("prototypical", "hardest"):
            items = "".join(_example_li(e) for e in ex[title])
            p.append(f"<div><b>{title}</b><ol>{items}</ol></div>")
        p.append("</div>")
    return "".join(p)


def _dedup(data: ReportData, fig: str | None) -> str:
    dd = (data.manifest or {}).get("dedup")
    if data.duplicates is None and not dd:
        return ""
    k = len(data.cluster_rows) if data.cluster_rows is not None else None
    p = ["<h2>Duplicates removed</h2>"]
    if data.duplicates is not None:
        est = "" if data.duplicates_exact else " (some annotated parts are missing)"
        p.append(
            f"<p>{data.duplicates:,} rows are flagged <code>duplicate</code> in the annotated "
            f"parts{est}: each is within cosine similarity 1 − eps of an earlier-ranked "
            "(harder) row of its cluster, and no strategy keeps it.</p>"
        )
    if isinstance(dd, dict):
        removed = dd.get("removed")
        if data.duplicates_exact and data.duplicates is not None and removed is not None:
            if int(removed) != data.duplicates:
                p.append(
                    f'<p class="note">The manifest records {fmt(removed)} rows removed, the '
                    f"annotated parts flag {data.duplicates:,}.</p>"
                )
        p.append(value_html(dd, k))
    p.append(img(fig, "duplicates removed per cluster") if fig else "")
    if data.duplicate_examples:
        col = data.example_column
        head = [ID, CLUSTER, DISTANCE, "similarity", "duplicate of", "its distance"]
        if col:
            head += [col, f"{col} of the row it duplicates"]
        rows = []
        for d in data.duplicate_examples:
            r = [str(d.row.id), d.row.cluster, d.row.distance, d.similarity, str(d.of.id)]
            r.append(d.of.distance)
            if col:
                r += [_content(d.row), _content(d.of)]
            rows.append([_scalar(x) for x in r])
        p.append(
            '<p class="note">Flagged rows next to the earlier-ranked row of their cluster they '
            "duplicate (similarity: their cosine similarity, <code>max_similarity</code>):</p>"
        )
        p.append(table(rows, head, {1, 2, 3, 5}))
    return "".join(p)


def _selection_table(data: ReportData) -> str:
    man = data.manifest or {}
    k = len(data.cluster_rows) if data.cluster_rows is not None else None
    rule = data.strategy + (f": {data.rule_summary}" if data.rule_summary else "")
    rows: list[list[Any]] = [["strategy", rule if data.rule_known else f"{rule} (not registered)"]]
    if isinstance(man.get("auto"), dict) and man["auto"].get("why"):
        rows.append(["why (auto)", str(man["auto"]["why"])])
    for key in ("n_keep", "rows_kept", "select_passes", "cluster_ranges"):
        if key in man:
            rows.append([key, man[key]])
    if isinstance(man.get("threshold"), dict):
        rows.append(["threshold", Raw(value_html(man["threshold"], k))])
        if data.threshold_label:
            rows.append(["threshold distance", data.threshold_label])
    if isinstance(man.get("percentile"), dict):
        rows.append(["percentile bins", Raw(value_html(man["percentile"], k))])
    rows.append(["keep files", len(man.get("files") or [])])
    rows.append(["annotated parts", len(man.get("annotated") or [])])
    if man.get("prototypes_sha256"):
        rows.append(["prototypes sha256", str(man["prototypes_sha256"])[:16]])
    rows += [[key, Raw(value_html(v, k))] for key, v in man.items() if key not in SHOWN]
    return table(rows, ["", "value"])


def _timings(data: ReportData, fig: str | None) -> str:
    p = ["<h2>Stage timings</h2>"]
    if fig:
        p.append(img(fig, "stage timings"))
        rows = [
            [s, round(sec, 2), figures.human(r) if r else "-"]
            for s, sec, r in figures.stage_timings(data)
        ]
        p.append(table(rows, ["stage", "seconds", "rows/s"], {1, 2}))
        p.append(
            "<p class=\"note\">rows/s: the run's input rows divided by the stage's seconds.</p>"
        )
    elif not data.finished:
        rate = data.rows_done / data.marker_seconds if data.marker_seconds else 0
        p.append(
            f"<p>{data.shards_done} shards scored so far: {data.rows_done:,} rows in "
            f"{data.marker_seconds:.1f} worker-seconds"
            + (f" ({figures.human(rate)} rows/s per worker)" if rate else "")
            + ".</p>"
        )
    return "".join(p)


def _settings_table(data: ReportData) -> str:
    cfg = data.run.get("config", {})
    inp = data.run.get("input", {})
    rows: list[list[Any]] = [
        ["input", inp.get("url", cfg.get("input", ""))],
        ["input files", len(inp.get("files", []))],
        ["shards", data.shards_total],
        ["config hash", data.run.get("config_hash", "")[:16]],
        ["code version", data.run.get("code_version", "")],
    ]
    rows += [[k, v] for k, v in cfg.items() if v not in (None, {}, "") and k != "input"]
    return table(rows, ["setting", "value"])
