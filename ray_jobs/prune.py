"""`python -m ray_jobs.prune [run flags]`: the entry point for `ray job submit`.

Identical to `protoprune run`; inside a Ray job RAY_ADDRESS is set, so the driver joins the
cluster instead of starting an embedded Ray.
"""

from __future__ import annotations

import sys

from ray_jobs.cli import main


def entry(argv: list[str] | None = None) -> int:
    return main(["run", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(entry())
