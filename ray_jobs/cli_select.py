"""The `protoprune select` and `protoprune apply` commands (parsers and handlers; the
dispatch, logging and error handling are ray_jobs.cli's)."""

from __future__ import annotations

import argparse
import json
from typing import Any


def _eps(value: str):
    """--dedup-eps of select: a number, or 'none'/'off' for no dedup (also for auto)."""
    if value.lower() in ("none", "off"):
        return "off"
    try:
        return float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number or 'none' (got {value!r})") from None


def add_select_parsers(sub: Any) -> None:
    s = sub.add_parser("select", help="a new selection from a committed run, without re-scoring")
    s.add_argument("run", help="the committed run folder: <output>/<run_id>")
    s.add_argument("--name", required=True, help="the selection: <run>/selections/<NAME>/")
    s.add_argument("--strategy", help="a registered rule (default: the run's)")
    g = s.add_mutually_exclusive_group()
    g.add_argument("--keep-fraction", type=float, help="fraction of rows kept (default: the run's)")
    g.add_argument("--keep-count", type=int, help="number of rows kept")
    s.add_argument(
        "--dedup-eps", type=_eps, default=argparse.SUPPRESS,
        help="SemDeDup eps (default: the run's); 'none' selects without dedup",
    )  # fmt: skip
    s.add_argument("--dbp-temperature", type=float, help="DBP temperature (default: the run's)")
    s.add_argument(
        "--label-column", default=argparse.SUPPRESS, help="the run's label column (default)"
    )
    s.add_argument("--address", help="Ray address; none = embedded local Ray; 'auto' joins")
    s.add_argument("--quiet", action="store_true", help="no progress bars")
    s.add_argument("--verbose", action="store_true", help="debug logging")
    a = sub.add_parser("apply", help="write the pruned dataset: the kept rows of every shard")
    a.add_argument("run", help="the committed run folder: <output>/<run_id>")
    a.add_argument("--output", required=True, help="folder or bucket URL of the pruned dataset")
    a.add_argument("--selection", help="a committed selection of the run (default: the run's)")
    a.add_argument("--columns", help="comma-separated input columns (default: all)")
    a.add_argument(
        "--with-scores", action="store_true", help="add cluster, distance and percentile"
    )
    a.add_argument("--address", help="Ray address; none = embedded local Ray; 'auto' joins")
    a.add_argument("--quiet", action="store_true", help="no progress bars")
    a.add_argument("--verbose", action="store_true", help="debug logging")


def cmd_select(args: argparse.Namespace) -> int:
    from ray_jobs import prune

    kw = {k: getattr(args, k) for k in ("dedup_eps", "label_column") if hasattr(args, k)}
    doc = prune.select(
        args.run, args.name, strategy=args.strategy, keep_fraction=args.keep_fraction,
        keep_count=args.keep_count, dbp_temperature=args.dbp_temperature,
        quiet=args.quiet, address=args.address, **kw,
    )  # fmt: skip
    from ray_jobs.cli import print_result
    from scoring.layout import selection_prefix

    print_result("selection", f"{args.run.rstrip('/')}/{selection_prefix(args.name)}", doc)
    return 0


def cmd_apply(args: argparse.Namespace) -> int:
    from ray_jobs import prune

    cols = [c.strip() for c in args.columns.split(",") if c.strip()] if args.columns else None
    doc = prune.apply(
        args.run, args.output, selection=args.selection, columns=cols,
        with_scores=args.with_scores, quiet=args.quiet, address=args.address,
    )  # fmt: skip
    print(json.dumps({"output": args.output, "rows": doc["rows"], "files": len(doc["files"])}))
    return 0
