"""A poison shard on real Ray: a row that ends its worker's process on every attempt (a
`--text-column` run whose model, tests/poison_text.py, calls os._exit on that row).

The run commits every other shard, stops after --max-retries retries with exit status 1 and one
line naming the shard, its file, its row-group range and the last error, keeps that in
_failures/ and in `protoprune status`; once the file is fixed, a rerun redoes only that shard
and its keep list equals a clean run's."""

from __future__ import annotations

import json
import logging
import re

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from ray_jobs import cli
from scoring import layout
from scoring.storage import Store
from tests.poison_text import POISON

FILES, ROWS, GROUP = 6, 40, 20  # one shard (two row groups) per file
BAD_FILE, BAD_ROW = 3, 27  # in the file's row group 1
RETRIES = 2


def texts(f: int, poison: bool) -> list[str]:
    rng = np.random.default_rng(f)
    words = ["alpha", "beta", "gamma", "delta", "omega", "sigma", "kappa", "theta"]
    out = [" ".join(rng.choice(words, size=4)) for _ in range(ROWS)]
    if poison:
        out[BAD_ROW] = f"{out[BAD_ROW]} {POISON}"
    return out


def write_file(root: Store, f: int, poison: bool) -> None:
    import io

    ids = list(range(f * ROWS, (f + 1) * ROWS))
    buf = io.BytesIO()
    pq.write_table(pa.table({"id": ids, "body": texts(f, poison)}), buf, row_group_size=GROUP)
    root.put_bytes(f"in/part-{f:03d}.parquet", buf.getvalue())


def args(root, run_id: str) -> list[str]:
    return [
        "run", "--input", f"{root}/in", "--output", f"{root}/runs", "--run-id", run_id,
        "--text-column", "body", "--model", "tests.poison_text:factory",
        "--prototypes-from", f"{root}/c.npy", "--shard-rows", str(ROWS), "--strategy", "hard",
        "--keep-fraction", "0.5", "--workers", "2", "--max-retries", str(RETRIES), "--quiet",
    ]  # fmt: skip


def keep_ids(run: Store) -> list:
    doc = json.loads(run.get_bytes(layout.MANIFEST))
    return sorted(i for f in doc["files"] for i in run.read_parquet(f["path"])["id"].to_pylist())


@pytest.fixture(scope="module")
def folder(tmp_path_factory, ray_local):
    root = tmp_path_factory.mktemp("poison")
    st = Store(str(root))
    for f in range(FILES):
        write_file(st, f, poison=False)
    rng = np.random.default_rng(7)
    import io

    buf = io.BytesIO()
    c = rng.normal(size=(3, 8))
    np.save(buf, (c / np.linalg.norm(c, axis=1, keepdims=True)).astype(np.float32))
    st.put_bytes("c.npy", buf.getvalue())
    assert cli.main(args(root, "clean")) == 0  # the reference: the same data, never poisoned
    return root


def test_poison_shard_fails_alone_then_a_rerun_redoes_only_it(folder, capsys, caplog):
    root, st = folder, Store(str(folder))
    caplog.set_level(logging.INFO, logger="protoprune")
    write_file(st, BAD_FILE, poison=True)
    capsys.readouterr()
    assert cli.main(args(root, "poisoned")) == 1
    err = capsys.readouterr().err.strip().splitlines()
    bad_url = st.uri(f"in/part-{BAD_FILE:03d}.parquet")
    assert len(err) == 1, err
    line = err[0]
    assert line.startswith("protoprune: error: 1 shard(s) failed in scores")
    assert f"shard {BAD_FILE} ({bad_url}, row groups 0-1)" in line
    # the last error: Ray's word for the dead actor (ActorDiedError / ActorUnavailableError)
    assert re.search(rf"worker died {RETRIES + 1} times \(Actor\w+Error: \S", line)
    assert re.findall(rf"shard {BAD_FILE}: worker lost", caplog.text)

    run = Store(str(root / "runs" / "poisoned"))
    committed = sorted(layout.marker_shard(k) for k in run.list(layout.marker_dir(layout.SCORES)))
    assert committed == [i for i in range(FILES) if i != BAD_FILE]  # every other shard
    assert not run.exists(layout.MANIFEST)
    rec = json.loads(run.get_bytes(layout.failure_key(layout.SCORES, layout.shard_name(BAD_FILE))))
    assert rec["shard"] == BAD_FILE and rec["file"] == bad_url
    assert rec["row_groups"] == [0, 2] and rec["attempts"] == RETRIES + 1
    assert f"worker died {RETRIES + 1} times" in rec["error"]
    assert run.list(layout.failure_dir(layout.SCORES)) == [
        layout.failure_key(layout.SCORES, layout.shard_name(BAD_FILE))
    ]

    assert cli.main(["status", str(root / "runs" / "poisoned")]) == 0
    out = capsys.readouterr().out
    assert "state     failed" in out
    assert (
        f"FAILED shard {BAD_FILE} ({bad_url}, row groups 0-1) after {RETRIES + 1} attempts" in out
    )
    assert cli.main(["status", "--json", str(root / "runs" / "poisoned")]) == 0
    fails = json.loads(capsys.readouterr().out)["stages"]["scores"]["failures"]
    assert [(f["shard"], f["row_groups"], f["attempts"]) for f in fails] == [
        (BAD_FILE, [0, 2], RETRIES + 1)
    ]

    # the file is fixed: a rerun redoes only that shard
    before = {k: run.get_bytes(k) for k in run.list(layout.marker_dir(layout.SCORES))}
    write_file(st, BAD_FILE, poison=False)
    caplog.clear()
    assert cli.main(args(root, "poisoned")) == 0
    assert [int(m) for m in re.findall(r"shard (\d+) scored", caplog.text)] == [BAD_FILE]
    for k, v in before.items():
        assert run.get_bytes(k) == v  # committed shards untouched
    assert run.list(layout.failure_dir(layout.SCORES)) == []
    assert keep_ids(run) == keep_ids(Store(str(root / "runs" / "clean")))
    assert cli.main(["status", str(root / "runs" / "poisoned")]) == 0
    assert "state     committed" in capsys.readouterr().out
