"""The Python entry point, for notebooks and pipelines; the CLI is a thin layer over it.

    from ray_jobs import prune
    from scoring.config import RunConfig

    manifest = prune.run(RunConfig(input="s3://bucket/data/", output="s3://bucket/runs/",
                                   run_id="june", k=1000, keep_fraction=0.3))
    prune.status("s3://bucket/runs/june")["state"]      # "committed"

Errors: `scoring.errors.UserError` (and its kinds) for bad input or settings, `RunFailed` when
shards failed on bad data (nothing committed; fix and call again with the same run id to
resume); anything else is a bug.

`python -m ray_jobs.prune [run flags]` is the entry point for `ray job submit`: identical to
`protoprune run`; inside a Ray job RAY_ADDRESS is set, so the driver joins the cluster instead of
starting an embedded Ray.
"""

from __future__ import annotations

import sys
from typing import Any

from scoring.config import RunConfig


def run(cfg: RunConfig, quiet: bool | None = None, wait_report: bool = True) -> dict[str, Any]:
    """Run (or resume) a pruning job; returns the committed manifest (`_MANIFEST.json`).
    `wait_report=False`: return before report/index.html is written (it finishes on a thread;
    `scoring.report.background.wait_all()` waits for it)."""
    from ray_jobs.driver import run as run_job

    return run_job(cfg, quiet=cfg.quiet if quiet is None else quiet, wait_report=wait_report)


def status(run_url: str, storage_options: dict[str, Any] | None = None) -> dict[str, Any]:
    """What a run folder says about its progress (`protoprune status --json`)."""
    from scoring.status import run_status
    from scoring.storage import Store

    return run_status(Store(run_url, storage_options))


def report(run_url: str, storage_options: dict[str, Any] | None = None, **kwargs: Any) -> str:
    """Write <run_url>/report/index.html; returns its URL (`protoprune report`)."""
    from scoring.report import write_report
    from scoring.storage import Store

    return write_report(Store(run_url, storage_options), **kwargs)


def select(run_url: str, name: str, **settings: Any) -> dict[str, Any]:
    """A new selection from a committed run (`protoprune select`); returns its manifest
    (`<run_url>/selections/<name>/_MANIFEST.json`). Settings: strategy, keep_fraction or
    keep_count, dedup_eps (None: no dedup), dbp_temperature, label_column, storage_options,
    quiet, address; unset ones are the run's."""
    from ray_jobs.selection import select as run_select

    return run_select(run_url, name, **settings)


def apply(run_url: str, output: str, **options: Any) -> dict[str, Any]:
    """Write the pruned dataset (`protoprune apply`): selection, columns, with_scores,
    storage_options, quiet, address. Returns the output's `_MANIFEST.json`."""
    from ray_jobs.apply import apply as run_apply

    return run_apply(run_url, output, **options)


def entry(argv: list[str] | None = None) -> int:
    from ray_jobs.cli import main

    return main(["run", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(entry())
