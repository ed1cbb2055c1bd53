"""`protoprune status`: what a run folder says about its progress (a pure read)."""

from __future__ import annotations

from typing import Any

from scoring import layout
from scoring.commit import committed, current, failures, read_json
from scoring.errors import NotFound
from scoring.storage import Store

# -- status ------------------------------------------------------------------------------------
STAGES = (layout.PROTOTYPES, layout.SCORES, layout.REDUCE)


def _one_unit(done: bool, failures: list[dict[str, Any]]) -> dict[str, Any]:
    """Status counts of a stage that is one unit of work (prototypes, reduce)."""
    return {
        "units": 1,
        "done": int(done),
        "failed": int(bool(failures)),
        "pending": 0 if (done or failures) else 1,
        "failures": failures,
    }


def run_status(store: Store) -> dict[str, Any]:
    """What a run folder says about its progress: a pure read, safe on a running or dead run.

    Returns {"run", "run_id", "committed", "rows", "shards", "stages": {prototypes, scores,
    reduce}}; each stage has done / pending / failed counts and a "failures" list with
    {"shard", "file", "row_groups", "error", "attempts"}. Needs only run.json, the markers and the failure records.
    """
    if not store.exists(layout.RUN_JSON):
        raise NotFound(f"{store.uri()}: no run.json (not a protoprune run folder)")
    run = read_json(store, layout.RUN_JSON)
    shards = run.get("shards", [])
    files = {s["index"]: s["file"] for s in shards}
    n_shards = len(shards)
    committed_manifest = store.exists(layout.MANIFEST)
    doc = read_json(store, layout.MANIFEST) if committed_manifest else None

    def fail_list(stage: str) -> list[dict[str, Any]]:
        out = []
        for name, rec in sorted(failures(store, stage).items()):
            out.append(
                {
                    "shard": rec.get("shard"),
                    "name": name,
                    "file": rec.get("file")
                    or (files.get(rec["shard"]) if rec.get("shard") is not None else None),
                    "row_groups": rec.get("row_groups"),
                    "error": rec.get("error", ""),
                    "attempts": rec.get("attempts"),
                    "at": rec.get("at"),
                }
            )
        return out

    # prototypes: one unit
    proto_marker = (
        read_json(store, layout.PROTOTYPES_COMMIT)
        if store.exists(layout.PROTOTYPES_COMMIT)
        else None
    )
    proto_fail = [] if proto_marker else fail_list(layout.PROTOTYPES)
    proto = {
        **_one_unit(proto_marker is not None, proto_fail),
        "sha256": proto_marker.get("sha256") if proto_marker else None,
        "sample_rows": proto_marker.get("sample_rows") if proto_marker else None,
    }
    # scores: one unit per shard; a marker naming other prototypes counts as missing
    sha = proto["sha256"]
    marks = committed(store, layout.SCORES)
    done = current(marks, sha)
    score_fail = [f for f in fail_list(layout.SCORES) if f["shard"] not in done]
    failed_idx = {f["shard"] for f in score_fail}
    scores = {
        "units": n_shards,
        "done": len(done),
        "failed": len(failed_idx),
        "pending": n_shards - len(done) - len(failed_idx - set(done)),
        "rows_done": int(sum(m.get("rows", 0) for m in done.values())),
        "reused": sum(1 for m in done.values() if m.get("reused_from")),
        "failures": score_fail,
    }
    red_fail = [] if committed_manifest else fail_list(layout.REDUCE)
    reduce = _one_unit(committed_manifest, red_fail)
    if proto_fail or score_fail or red_fail:
        state = "failed"
    elif committed_manifest:
        state = "committed"
    else:
        state = "incomplete"
    return {
        "run": store.uri(),
        "run_id": run.get("run_id"),
        "state": state,
        "committed": committed_manifest,
        "created_at": run.get("created_at"),
        "input": run.get("input", {}).get("url"),
        "rows": run.get("input", {}).get("rows"),
        "rows_kept": doc.get("rows_kept") if doc else None,
        "shards": n_shards,
        "stages": {"prototypes": proto, "scores": scores, "reduce": reduce},
    }
