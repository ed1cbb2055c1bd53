"""The run report: one self-contained HTML page (report/index.html) that shows what pruning did.

`collect` reads the run folder into a `ReportData` (bounded memory, `Store` IO only; a run that
is still going gets a report of what is committed so far, marked "not finished"), `figures`
draws its PNGs, `html.render_html` builds the page. `duplicates` reads the dedup evidence from
the annotated parts and `content` the examples' text or image thumbnails from the input.
"""

from __future__ import annotations

import logging
import time

from scoring import layout
from scoring.report.collect import MAX_ROWS, N_EXAMPLES, TOP_CLUSTERS, collect
from scoring.report.content import THUMB_PX
from scoring.report.data import Duplicate, Example, ReportData
from scoring.report.duplicates import N_DUPLICATES
from scoring.report.figures import label_rows, stage_timings
from scoring.report.html import render_html
from scoring.storage import Store

log = logging.getLogger(__name__)


def build_report(
    store: Store,
    example_column: str | None = None,
    max_rows: int = MAX_ROWS,
    selection: str | None = None,
    manifest: dict | None = None,
) -> str:
    """The report page of the run folder `store` (finished or not), or of one of its
    committed selections. `manifest`: the manifest about to be committed, used instead of
    reading `_MANIFEST.json` (the driver builds the page while the manifest commits)."""
    data = collect(
        store, example_column=example_column, max_rows=max_rows, selection=selection,
        manifest=manifest,
    )  # fmt: skip
    return render_html(data)


def write_report(
    store: Store,
    example_column: str | None = None,
    max_rows: int = MAX_ROWS,
    selection: str | None = None,
    page: str | None = None,
) -> str:
    """Build the report (unless `page` is given, built already) and write it to
    report/index.html (a selection's: in its folder); returns its URL."""
    t0 = time.perf_counter()
    if page is None:
        page = build_report(store, example_column, max_rows, selection)
    key = f"{layout.selection_prefix(selection)}/{layout.REPORT}" if selection else layout.REPORT
    store.put_bytes(key, page.encode("utf-8"))
    log.info("report %s written (%.1fs)", store.uri(key), time.perf_counter() - t0)
    return store.uri(key)


__all__ = [
    "MAX_ROWS",
    "N_DUPLICATES",
    "N_EXAMPLES",
    "THUMB_PX",
    "TOP_CLUSTERS",
    "Duplicate",
    "Example",
    "ReportData",
    "build_report",
    "collect",
    "label_rows",
    "render_html",
    "stage_timings",
    "write_report",
]
