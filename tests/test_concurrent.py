"""Two drivers on one run id at once (a resubmitted job while the first still runs), on a
local folder and on S3 (moto): whenever `_MANIFEST.json` exists, every file it lists exists
with its sha256, both drivers exit 0, and the keep list is the reference's."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import threading
import time

import pytest

from ray_jobs.driver import run
from scoring import layout
from scoring.config import make_config
from scoring.errors import NotFound
from scoring.storage import Store
from tests.helpers import clustered, write_dataset

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
N = 800
SETTINGS = dict(k=4, shard_rows=100, strategy="balanced", keep_fraction=0.4, workers=2)


@pytest.fixture(scope="module")
def ray_mod(ray_local):
    return ray_local


def cfg(inp: str, out: str, run_id: str, **kw):
    return make_config(dict(SETTINGS, input=inp, output=out, run_id=run_id, quiet=True, **kw))


def keep_ids(store: Store) -> list:
    doc = json.loads(store.get_bytes(layout.MANIFEST))
    return sorted(i for f in doc["files"] for i in store.read_parquet(f["path"])["id"].to_pylist())


class Watcher(threading.Thread):
    """Polls a run folder: whenever the manifest exists, each keep file it lists must exist
    with its sha256 and each annotated part it lists must exist."""

    def __init__(self, store: Store):
        super().__init__(daemon=True)
        self.store, self.stop_ = store, threading.Event()
        self.checks, self.violations = 0, []

    def run(self) -> None:
        while not self.stop_.is_set():
            self.check()
            time.sleep(0.02)

    def check(self) -> None:
        try:
            doc = json.loads(self.store.get_bytes(layout.MANIFEST))
        except NotFound:
            return
        for f in doc["files"]:
            try:
                sha = hashlib.sha256(self.store.get_bytes(f["path"])).hexdigest()
            except NotFound:
                self.violations.append(f"{f['path']} missing")
                continue
            if sha != f["sha256"]:
                self.violations.append(f"{f['path']} sha256 {sha} != {f['sha256']}")
        for key in doc["annotated"]:
            if not self.store.exists(key):
                self.violations.append(f"{key} missing")
        self.checks += 1


def driver(inp: str, out: str, run_id: str, address: str, env: dict) -> subprocess.Popen:
    args = [sys.executable, "-m", "ray_jobs.cli", "run", "--input", inp, "--output", out]
    args += ["--run-id", run_id, "--address", address]
    for key, val in SETTINGS.items():
        args += [f"--{key.replace('_', '-')}", str(val)]
    penv = dict(os.environ, PYTHONPATH=ROOT, **env)
    return subprocess.Popen(args, env=penv, stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def two_drivers(inp: str, out: str, run_id: str) -> tuple[Store, Watcher, list[str]]:
    """Driver B starts first and, once scored, waits for A's commit before its own reduce
    (PROTOPRUNE_FAULT_REDUCE_WAIT_S): B's reduce runs while A's manifest is committed, the
    window in which a reduce that empties keep/ breaks the invariant."""
    import ray

    address = ray.get_runtime_context().gcs_address
    store = Store(f"{out}/{run_id}")
    watcher = Watcher(store)
    watcher.start()
    b = driver(inp, out, run_id, address, {"PROTOPRUNE_FAULT_REDUCE_WAIT_S": "240"})
    deadline = time.time() + 120
    while not store.exists(layout.RUN_JSON) and time.time() < deadline and b.poll() is None:
        time.sleep(0.05)  # B has planned; its manifest check follows at once
    a = driver(inp, out, run_id, address, {})
    errs = []
    for p in (a, b):
        _, err = p.communicate(timeout=400)
        errs.append(err.decode())
        assert p.returncode == 0, err.decode()[-3000:]
    watcher.stop_.set()
    watcher.join(30)
    watcher.check()
    return store, watcher, errs


def check(store: Store, watcher: Watcher, errs: list[str], ref: Store) -> None:
    assert watcher.violations == []
    assert watcher.checks > 5  # it saw the committed manifest many times, B's reduce included
    assert "committed by another driver first" in errs[1]  # B reduced after A's commit
    assert keep_ids(store) == keep_ids(ref)
    doc = json.loads(store.get_bytes(layout.MANIFEST))
    assert sorted(f["path"] for f in doc["files"]) == store.list(layout.KEEP)  # nothing stray


def test_two_drivers_local(tmp_path, ray_mod):
    inp, out = str(tmp_path / "in"), str(tmp_path / "out")
    write_dataset(Store(inp), clustered(N, 8, 4), list(range(N)), files=2, row_group_rows=100)
    run(cfg(inp, out, "ref"))
    store, watcher, errs = two_drivers(inp, out, "both")
    check(store, watcher, errs, Store(f"{out}/ref"))


def test_two_drivers_s3(s3_server, ray_mod):
    bucket = s3_server.new_bucket()
    inp, out = f"s3://{bucket}/in", f"s3://{bucket}/out"
    write_dataset(Store(inp), clustered(N, 8, 4), list(range(N)), files=2, row_group_rows=100)
    run(cfg(inp, out, "ref"))
    store, watcher, errs = two_drivers(inp, out, "both")
    check(store, watcher, errs, Store(f"{out}/ref"))


def test_parts_no_manifest_lists_go_after_the_commit(tmp_path, ray_mod):
    """An interrupted reduce's parts (here: a stray part and a part of other bytes) stay until
    the next commit, which deletes every keep part its manifest does not list."""
    inp, out = str(tmp_path / "in"), str(tmp_path / "out")
    write_dataset(Store(inp), clustered(N, 8, 4), list(range(N)), files=2, row_group_rows=100)
    run(cfg(inp, out, "r"))
    store = Store(f"{out}/r")
    before = keep_ids(store)
    listed = store.list(layout.KEEP)
    store.delete(layout.MANIFEST)  # as if the reduce had stopped before its commit
    stray = [layout.keep_key(0, "0" * 64), layout.keep_key(99, "f" * 64)]
    for key in stray:
        store.put_bytes(key, b"not a part")
    run(cfg(inp, out, "r"))
    assert store.list(layout.KEEP) == listed and keep_ids(store) == before
