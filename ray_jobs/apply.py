"""`protoprune apply`: write the pruned dataset of a committed run (or of one of its
selections) to its own output, one Ray task per input shard (scoring.stages.apply).

Order (each step resumable): `_APPLY.json` (create-only: what the output is made from; other
settings on the same output are refused), the per-keep-part index files, one
`part-NNNNNN.parquet` per input shard and then its marker (`_commits/part-NNNNNN.json`), and
`_MANIFEST.json` last (rows per file, sha256, the run and selection). A rerun lists the markers
once and writes only the shards without one: committed parts are never rewritten. The index is
deleted once the manifest is committed.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from ray_jobs import scheduler as sch
from ray_jobs.selection import open_run, read_selection
from scoring import commit, layout
from scoring.errors import BadConfig, BadInput
from scoring.inputs.parquet import Shard
from scoring.stages.apply import ApplyTask, IndexTask, apply_shard, index_part
from scoring.storage import Store

log = logging.getLogger("protoprune")


def _inside(path: str, root: str) -> bool:
    path, root = path.rstrip("/"), root.rstrip("/")
    return path == root or path.startswith(root + "/")


def apply(
    run_url: str,
    output: str,
    selection: str | None = None,
    columns: list[str] | None = None,
    with_scores: bool = False,
    storage_options: dict[str, Any] | None = None,
    quiet: bool = True,
    address: str | None = None,
) -> dict[str, Any]:
    """Write (or resume) the pruned dataset at `output`; returns its manifest."""
    run, run_doc, man = open_run(run_url, storage_options)
    if selection:
        man = read_selection(run, selection)
    cfg = run_doc["config"]
    inp = Store(cfg["input"], storage_options)
    out = Store(output, storage_options)
    if _inside(out.uri(), run.uri()):
        raise BadConfig(f"--output {out.uri()} is inside the run folder {run.uri()}")
    if _inside(out.uri(), inp.uri()):
        raise BadConfig(f"--output {out.uri()} is the input {inp.uri()} or inside it")
    shards = [Shard.from_json(s) for s in run_doc["shards"]]
    id_col = cfg.get("id_column", "id")
    names = inp.parquet_file(shards[0].file).schema_arrow.names if shards else []
    cols = list(columns) if columns else list(names)
    for c in cols:
        if c not in names:
            raise BadInput(
                f"--columns: column '{c}' not found in the input {inp.uri()} "
                f"(columns: {', '.join(names)})"
            )
    clash = [c for c in layout.WITH_SCORES if with_scores and c in cols]
    if clash:
        raise BadInput(f"--with-scores: the input already has a column '{clash[0]}'")
    record = {
        "run": run.uri(),
        "run_committed_at": man.get("committed_at"),
        "selection": selection,
        "columns": cols,
        "with_scores": bool(with_scores),
    }
    out.check_writable()
    if not out.put_if_absent(layout.APPLY_JSON, commit.dumps(record)):
        old = commit.read_json(out, layout.APPLY_JSON)
        if old != record:
            what = ", ".join(f"{k}={old.get(k)!r}" for k in record if old.get(k) != record[k])
            raise BadConfig(f"--output {out.uri()} holds another apply ({what}); use another one")
    done = commit.read_manifest(out)
    if done is not None:
        log.info("apply %s is already committed", out.uri())
        return done
    sch.ensure_ray(address)
    t0 = time.perf_counter()
    par = 2 * sch.cluster_cpus()
    idx = [s.index for s in shards]
    keep = [(f["path"], layout.key_part(f["path"])) for f in man.get("files", [])]
    tasks = [IndexTask(run, out, key, part, idx) for key, part in keep]
    list(sch.map_tasks(index_part, tasks, par, "apply: index", quiet))
    index_keys = [layout.apply_index_key(part) for _, part in keep]
    marks = commit.committed(out, layout.APPLY)
    todo = [s for s in shards if s.index not in marks]
    log.info("apply: %d shards committed, %d to do", len(marks), len(todo))
    tasks = [
        ApplyTask(inp, out, s, index_keys, cols, id_col, with_scores, inp.uri(s.file)) for s in todo
    ]
    for m in sch.map_tasks(apply_shard, tasks, par, "apply: shards", quiet):
        marks[m["shard"]] = m
    files = [{k: marks[i][k] for k in ("path", "shard", "rows", "bytes", "sha256")} for i in idx]
    rows = sum(f["rows"] for f in files)
    expect = int(man["rows_kept"])
    if rows != expect:
        raise BadInput(f"apply wrote {rows} rows, the keep list has {expect}")
    doc = dict(
        record,
        format_version=commit.FORMAT_VERSION,
        run_id=run_doc["run_id"],
        input=inp.uri(),
        strategy=man.get("strategy"),
        rows=rows,
        files=files,
        seconds=round(time.perf_counter() - t0, 3),
    )
    commit.commit_manifest(out, doc)
    out.delete(layout.APPLY_INDEX)
    return doc
