"""The run's report, built on a thread while the manifest commits.

The page is built from the manifest about to be committed (`build_report(manifest=...)`), so
reading the run folder and drawing the figures overlap the manifest's create-only put and the
clean-up of keep/. Once the commit is known the page is written: as built when this driver's
manifest won, built anew from the committed one when another driver's won. A report failure
is logged, never raised: the run is committed.

`wait=False` (the CLI) leaves the write on its thread: the caller does its own end-of-run work
(printing the result, shutting down the Ray it started) while the report finishes, then
`wait_all()`, so the exit is delayed by at most the report's remaining time.
"""

from __future__ import annotations

import logging
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from scoring.storage import Store

log = logging.getLogger("protoprune")

_PENDING: list[Future] = []


class ReportWriter:
    def __init__(self, store: Store, manifest: dict[str, Any]):
        from scoring.report import build_report

        self.store = store
        self.manifest = manifest
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="report")
        self._page = self._pool.submit(build_report, store, manifest=manifest)

    def write(self, committed: dict[str, Any], wait: bool = True) -> Future:
        """Write the page for the `committed` manifest; `wait`: return once it is written
        (else it finishes on its thread: `wait_all`)."""
        done = self._pool.submit(self._write, committed)
        self._pool.shutdown(wait=False)
        if wait:
            done.result()
        else:
            _PENDING.append(done)
        return done

    def _write(self, committed: dict[str, Any]) -> str | None:
        page = None
        if committed is self.manifest:
            try:
                page = self._page.result()
            except Exception as e:  # noqa: BLE001 - retried below from the committed folder
                log.debug("report built with the manifest failed: %s", e, exc_info=True)
        return write_logged(self.store, page=page)


def write_logged(store: Store, selection: str | None = None, page: str | None = None):
    """Write report/index.html (of a selection: selections/NAME/report/index.html; `page`:
    built already); a failure is logged, never raised (the run is committed). Its URL, or
    None."""
    try:
        from scoring.report import write_report

        return write_report(store, selection=selection, page=page)
    except Exception as e:  # noqa: BLE001 - the report must not fail a committed run
        log.error("report not written for %s: %s: %s", store.uri(), type(e).__name__, e)
        log.debug("report failure", exc_info=True)
        return None


def wait_all() -> None:
    """Wait for the reports left writing on their threads."""
    while _PENDING:
        _PENDING.pop().result()
