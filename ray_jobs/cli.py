"""The `protoprune` command line.

    protoprune run --input URL --output URL [...]      prune (or resume) a dataset
    protoprune status RUN_FOLDER [--json]               progress and failures of a run
    protoprune demo DIR                                 write a small demo dataset
    protoprune report RUN_URL                           write RUN_URL/report/index.html
    protoprune select RUN_URL --name NAME [...]         another selection from a run's scores
    protoprune apply RUN_URL --output URL [...]         write the pruned dataset

User errors (`scoring.errors.UserError`: bad flags, bad config, bad input data, storage the user
must fix) print one line `protoprune: error: ...` and exit with status 2 (1 when shards failed
on bad data); no traceback. Anything else is a bug: its traceback goes to the log, the last line
says so, and the status is 1; the run folder is left resumable. The commands are a thin layer
over `ray_jobs.prune` (the Python entry point).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from typing import Any

from ray_jobs.cli_select import add_select_parsers, cmd_apply, cmd_select
from scoring.config import FIELDS, load_yaml, make_config
from scoring.errors import BadConfig, UserError, first_line


def eps_or_off(text: str) -> float | str:
    """--dedup-eps: a number, or `off` (no dedup, also for auto)."""
    if text.strip().lower() == "off":
        return "off"
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number or off (got {text!r})") from None


# flag -> (config key, type, help). Flag names are a contract: outside tools depend on them.
RUN_FLAGS: list[tuple[str, str, Any, str]] = [
    ("--input", "input", str, "input Parquet folder, file or bucket URL (s3://, gs://, local)"),
    ("--output", "output", str, "output root; the run goes to <output>/<run_id>/"),
    ("--run-id", "run_id", str, "run id (default: a UTC timestamp); reuse it to resume"),
    ("--id-column", "id_column", str, "id column (default: id)"),
    ("--embedding-column", "embedding_column", str, "embedding column (default: embedding)"),
    ("--k", "k", int, "number of prototypes (default: 1000)"),
    ("--metric", "metric", str, "cosine (default; spherical k-means) or l2"),
    ("--kmeans-iters", "kmeans_iters", int, "k-means iterations (default: 20)"),
    (
        "--kmeans-backend",
        "kmeans_backend",
        str,
        "auto (default: torch where bf16 is native, CPU or GPU, its products in bf16 on GPUs and "
        "AMX CPUs, fp32 elsewhere; else faiss) | faiss | torch",
    ),
    (
        "--kmeans-tol",
        "kmeans_tol",
        float,
        "stop k-means once the objective moves by <= TOL (relative) in an iteration "
        "(default: off, exactly --kmeans-iters)",
    ),
    ("--sample-size", "sample_size", int, "rows sampled for k-means (default: 256 * k)"),
    ("--seed", "seed", int, "seed for sampling, k-means and random (default: 0)"),
    ("--shard-rows", "shard_rows", int, "target rows per shard (default: 1,000,000)"),
    ("--strategy", "strategy", str, "auto | hard | easy | random | balanced | dbp (default: auto)"),
    ("--keep-fraction", "keep_fraction", float, "fraction of rows kept, 0 < F <= 1 (default 0.5)"),
    ("--keep-count", "keep_count", int, "number of rows kept (instead of --keep-fraction)"),
    ("--text-column", "text_column", str, "raw text column to embed (instead of embeddings)"),
    ("--image-column", "image_column", str, "image bytes or paths column to embed"),
    (
        "--model",
        "model",
        str,
        "embedding model: sentence-transformers dir, open_clip/timm/torchvision spec, or module:factory",
    ),
    (
        "--embed-batch-size",
        "embed_batch_size",
        int,
        "rows per model batch (default: sized to memory)",
    ),
    ("--gpus-per-worker", "gpus_per_worker", float, "GPUs per scoring actor (fractions allowed)"),
    ("--cpus-per-worker", "cpus_per_worker", float, "CPUs per scoring actor (default 1)"),
    (
        "--dedup-eps",
        "dedup_eps",
        eps_or_off,
        "SemDeDup: drop rows with cosine >= 1 - eps to a harder row of their cluster "
        "(default: auto's 0.01, none for the other rules; off: none)",
    ),
    ("--dbp-temperature", "dbp_temperature", float, "DBP softmax temperature (default 0.5)"),
    (
        "--prototypes-from",
        "prototypes_from",
        str,
        "use the prototypes of a committed run (or a centroids.npy) instead of fitting",
    ),
    (
        "--reuse-scores-from",
        "reuse_scores_from",
        str,
        "copy the committed scores of unchanged shards from this run (same prototypes)",
    ),
    ("--label-column", "label_column", str, "label column: per-label counts before/after pruning"),
    ("--log-format", "log_format", str, "text (default) or json"),
    ("--workers", "workers", int, "scoring actors (default: one per GPU, else one per CPU)"),
    ("--address", "address", str, "Ray address; none = embedded local Ray; 'auto' joins"),
    ("--max-retries", "max_retries", int, "retries of a shard whose worker died (default: 3)"),
]


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, exit 2, no usage dump
        sys.stderr.write(f"protoprune: error: {message}\n")
        sys.exit(2)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="protoprune", description="Prune datasets by prototype distance, on Ray.")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)
    r = sub.add_parser("run", help="prune (or resume) a dataset")
    add_run_flags(r)
    e = sub.add_parser("evaluate", help="linear probe: keep list vs random subsets of its size")
    e.add_argument("run", help="the run folder, <output>/<run_id>")
    e.add_argument("--label-column", required=True, help="label column in the input")
    e.add_argument(
        "--seeds",
        type=int,
        default=3,
        help="random subsets of the keep list's size to compare (default 3; 0: none)",
    )
    e.add_argument("--test-fraction", type=float, default=0.2, help="hash-split held-out share")
    e.add_argument("--test-input", default=None, help="a separate labelled held-out dataset")
    st = sub.add_parser("status", help="progress and failures of a run folder")
    st.add_argument("run", help="the run folder: <output>/<run_id>")
    st.add_argument("--json", action="store_true", help="one JSON document instead of text")
    d = sub.add_parser("demo", help="write a small demo dataset")
    d.add_argument("dir", help="folder or bucket URL to write into")
    d.add_argument("--rows", type=int, default=200_000)
    d.add_argument("--dim", type=int, default=64)
    d.add_argument("--clusters", type=int, default=40)
    d.add_argument("--files", type=int, default=4)
    d.add_argument("--seed", type=int, default=0)
    add_report_parser(sub)
    add_select_parsers(sub)
    return p


def add_report_parser(sub: Any) -> None:
    rp = sub.add_parser("report", help="write the HTML report of a run folder (finished or not)")
    rp.add_argument("run", help="the run folder: <output>/<run_id> (local, s3://, gs://)")
    rp.add_argument(
        "--example-column",
        help="input column whose text (or image) is shown for the example rows "
        "(default: the run's text/image column)",
    )
    rp.add_argument("--out", help="write the page to this file instead of <run>/report/index.html")
    rp.add_argument(
        "--max-rows",
        type=int,
        default=None,
        help="read at most this many score rows for the figures (default 20,000,000)",
    )


def add_run_flags(r: argparse.ArgumentParser) -> None:
    r.add_argument("--config", help="YAML file with the same settings; flags override it")
    for flag, key, typ, help_ in RUN_FLAGS:
        r.add_argument(flag, dest=key, type=typ, default=None, help=help_)
    r.add_argument(
        "--save-embeddings",
        dest="save_embeddings",
        action="store_true",
        default=None,
        help="also write embeddings/shard-NNNNNN.parquet",
    )
    r.add_argument(
        "--force-new",
        dest="force_new",
        action="store_true",
        default=None,
        help="start the run id over even if its config or input changed",
    )
    r.add_argument(
        "--quiet", dest="quiet", action="store_true", default=None, help="no progress bars"
    )
    r.add_argument("--verbose", action="store_true", help="debug logging")


def settings_from_args(args: argparse.Namespace) -> dict[str, Any]:
    settings: dict[str, Any] = load_yaml(args.config) if args.config else {}
    for key in [k for _, k, _, _ in RUN_FLAGS] + ["save_embeddings", "force_new", "quiet"]:
        v = getattr(args, key, None)
        if v is not None:
            settings[key] = v
    # --keep-fraction and --keep-count exclude each other: a flag replaces the YAML's choice.
    for flag_key, other in (("keep_fraction", "keep_count"), ("keep_count", "keep_fraction")):
        if getattr(args, flag_key, None) is not None and getattr(args, other, None) is None:
            settings.pop(other, None)
    assert set(settings) <= set(FIELDS)
    return settings


def setup_logging(verbose: bool = False) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    for noisy in ("botocore", "s3fs", "aiobotocore", "fsspec", "urllib3", "filelock", "matplotlib"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def cmd_run(args: argparse.Namespace) -> int:
    from ray_jobs import prune

    cfg = make_config(settings_from_args(args), source=args.config or "config")
    if cfg.log_format == "json":
        from ray_jobs.progress import use_json_logs

        use_json_logs()
    doc = prune.run(cfg, wait_report=False)  # the report finishes while the result prints
    print_result("run", f"{cfg.output.rstrip('/')}/{cfg.run_id}", doc)
    sys.stdout.flush()
    finish_run()
    return 0


def finish_run() -> None:
    """The end of a `run` process: wait for the report (written on its thread while the
    result line was printed), then shut down the Ray this process started (or its connection
    to a cluster). Nothing of ours runs on another thread while Ray shuts down."""
    from ray_jobs.scheduler import shutdown_ray
    from scoring.report.background import wait_all

    try:
        wait_all()
    finally:
        shutdown_ray()


def print_result(what: str, where: str, doc: dict[str, Any]) -> None:
    """The one JSON result line of `run` and `select`, from the committed manifest."""
    out = {
        what: where,
        "rows_in": doc["rows_in"],
        "rows_kept": doc["rows_kept"],
        "strategy": doc["strategy"],
        "keep_files": len(doc["files"]),
    }
    if doc.get("dedup"):
        out["duplicates_removed"] = doc["dedup"]["removed"]
    print(json.dumps(out))


def cmd_demo(args: argparse.Namespace) -> int:
    from scoring.demo import make_demo

    keys = make_demo(
        args.dir,
        rows=args.rows,
        dim=args.dim,
        clusters=args.clusters,
        files=args.files,
        seed=args.seed,
    )
    print(f"wrote {args.rows} rows in {len(keys)} files to {args.dir}")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from scoring.report import MAX_ROWS, build_report, write_report
    from scoring.storage import Store

    if args.max_rows is not None and args.max_rows < 1:
        raise BadConfig(f"--max-rows must be at least 1 (got {args.max_rows})")
    store = Store(args.run)
    max_rows = args.max_rows or MAX_ROWS
    if args.out:
        page = build_report(store, example_column=args.example_column, max_rows=max_rows)
        folder, name = os.path.split(args.out)
        Store(folder or ".").put_bytes(name, page.encode("utf-8"))
        print(args.out)
    else:
        print(write_report(store, example_column=args.example_column, max_rows=max_rows))
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from scoring.evaluate import evaluate_run

    out = evaluate_run(
        args.run,
        args.label_column,
        seeds=args.seeds,
        test_fraction=args.test_fraction,
        test_input=args.test_input,
    )
    print(json.dumps(out))
    sys.stderr.write(out["summary"] + "\n")
    return 0


def format_status(st: dict[str, Any]) -> str:
    """The plain-text view of scoring.status.run_status()."""
    lines = [
        f"run       {st['run']}",
        f"state     {st['state']}" + ("  (_MANIFEST.json committed)" if st["committed"] else ""),
        f"input     {st['input']}  rows {st['rows']}  shards {st['shards']}",
    ]
    if st.get("rows_kept") is not None:
        lines.append(f"kept      {st['rows_kept']} rows")
    names = {"prototypes": "prototypes", "scores": "scores", "reduce": "reduce/manifest"}
    for stage, label in names.items():
        s = st["stages"][stage]
        extra = f"  rows {s['rows_done']}" if "rows_done" in s else ""
        if s.get("reused"):
            extra += f"  reused {s['reused']} (scored {s['done'] - s['reused']})"
        lines.append(
            f"{label:<16}done {s['done']}/{s['units']}  pending {s['pending']}  "
            f"failed {s['failed']}{extra}"
        )
        for f in s["failures"]:
            who = f"shard {f['shard']}" if f.get("shard") is not None else f["name"]
            rg = f.get("row_groups") or []
            span = f", row groups {rg[0]}-{rg[1] - 1}" if len(rg) == 2 else ""
            tries = f" after {f['attempts']} attempts" if (f.get("attempts") or 1) > 1 else ""
            lines.append(f"  FAILED {who} ({f.get('file') or '-'}{span}){tries}: {f['error']}")
    return "\n".join(lines)


def cmd_status(args: argparse.Namespace) -> int:
    from ray_jobs import prune

    st = prune.status(args.run)
    print(json.dumps(st, indent=1, default=str) if args.json else format_status(st))
    return 0


COMMANDS = {
    "run": cmd_run,
    "demo": cmd_demo,
    "status": cmd_status,
    "report": cmd_report,
    "evaluate": cmd_evaluate,
    "select": cmd_select,
    "apply": cmd_apply,
}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(getattr(args, "verbose", False))
    try:
        return COMMANDS[args.command](args)
    except UserError as e:
        if os.environ.get("PROTOPRUNE_DEBUG"):
            raise
        sys.stderr.write(f"protoprune: error: {first_line(e, 2000)}\n")
        return e.exit_code
    except KeyboardInterrupt:
        sys.stderr.write("protoprune: interrupted; rerun with the same --run-id to resume\n")
        return 130
    except Exception as e:  # noqa: BLE001 - a bug: say so, with the traceback in the log
        if os.environ.get("PROTOPRUNE_DEBUG"):
            raise
        logging.getLogger("protoprune").error("internal error", exc_info=True)
        sys.stderr.write(
            f"protoprune: internal error (a bug in protoprune, please report it with the log "
            f"above): {type(e).__name__}: {first_line(e)}; the run folder is left as it was, "
            "rerun with the same --run-id to resume\n"
        )
        return 1


if __name__ == "__main__":
    sys.exit(main())
