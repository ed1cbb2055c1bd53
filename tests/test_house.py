"""The house: a plug-in strategy end to end through the CLI, the Python entry point, the
error classes (user error vs bug) and the wipe of --force-new."""

from __future__ import annotations

import sys

import numpy as np
import pyarrow as pa
import pytest
import ray

from ray_jobs import cli, prune
from scoring import commit, layout, strategies
from scoring.config import RunConfig
from scoring.kernels.radix import float_key
from scoring.storage import Store
from tests.helpers import clustered, init_local_ray, read_all, write_dataset

N, D, K = 1200, 12, 6


class Middle(strategies.GlobalRule):
    """A rule defined outside scoring/: the rows whose distance is closest to 0.5."""

    name = "middle-test"
    summary = "rows closest to distance 0.5"
    hardest_first = None

    def key(self, distance, ids, seed):
        return float_key(np.abs(np.asarray(distance, np.float32) - np.float32(0.5)))


@pytest.fixture(scope="module")
def data(tmp_path_factory, ray_local):
    tmp = tmp_path_factory.mktemp("house")
    rng = np.random.default_rng(3)
    x = clustered(N, D, K, seed=3)
    ids = (rng.permutation(N) * 7 + 11).tolist()
    write_dataset(Store(str(tmp / "in")), x, ids, files=3)
    return tmp


def run_args(tmp, run_id: str, *more: str) -> list[str]:
    return [
        "run", "--input", str(tmp / "in"), "--output", str(tmp / "out"), "--run-id", run_id,
        "--k", str(K), "--shard-rows", "300", "--quiet", *more,
    ]  # fmt: skip


def test_plugin_strategy_end_to_end_through_the_cli(data, capsys):
    """One registry line makes a new rule: the CLI accepts it, the workers run its key (the
    rule object travels to them), and the keep list is exact against a sort of all rows."""
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    strategies.register(Middle())
    try:
        rc = cli.main(
            run_args(data, "plugin", "--strategy", "middle-test", "--keep-fraction", "0.3")
        )
    finally:
        strategies.REGISTRY.pop("middle-test")
    assert rc == 0, capsys.readouterr().err
    store = Store(str(data / "out" / "plugin"))
    scores = read_all(store, layout.SCORES)
    # the reference: a plain sort of all rows by (|d - 0.5| in float32, id)
    ref32 = sorted(
        zip(
            np.abs(scores["distance"].to_numpy() - np.float32(0.5)).tolist(),
            scores["id"].to_pylist(),
        )
    )
    n_keep = int(0.3 * N)
    want = {i for _, i in ref32[:n_keep]}
    kept = read_all(store, layout.KEEP)["id"].to_pylist()
    assert len(kept) == len(set(kept)) == n_keep and set(kept) == want
    assert len(ref32) == N
    man = commit.read_manifest(store)
    assert man["strategy"] == "middle-test" and man["rows_kept"] == n_keep


def test_python_entry_point_returns_the_manifest(data):
    cfg = RunConfig(
        input=str(data / "in"), output=str(data / "out"), run_id="py", k=K, shard_rows=300,
        strategy="balanced", keep_count=100, quiet=True,
    )  # fmt: skip
    doc = prune.run(cfg)
    store = Store(str(data / "out" / "py"))
    assert doc == commit.read_manifest(store)
    assert doc["rows_kept"] == 100 and sum(doc["clusters"]["kept"]) == 100
    st = prune.status(str(data / "out" / "py"))
    assert st["state"] == "committed" and st["rows_kept"] == 100
    assert prune.run(cfg) == doc  # committed: a second call returns the manifest
    assert prune.report(str(data / "out" / "py")).endswith(layout.REPORT)


def test_internal_error_is_reported_as_a_bug_and_the_run_resumes(data, capsys, caplog, monkeypatch):
    """An internal error that happens to be a ValueError (pyarrow's ArrowInvalid) is a bug:
    exit 1, a line saying so, the traceback in the log; the run is left resumable."""
    import ray_jobs.reduce as reduce_mod

    def broken(*a, **k):
        raise pa.ArrowInvalid("boom inside the reduce")

    monkeypatch.setattr(reduce_mod, "reduce", broken)
    rc = cli.main(run_args(data, "bug"))
    err = capsys.readouterr().err
    last = err.strip().splitlines()[-1]
    assert rc == 1
    assert last.startswith("protoprune: internal error (a bug in protoprune")
    assert "ArrowInvalid: boom inside the reduce" in last and "Traceback" not in last
    logged = [r for r in caplog.records if r.getMessage() == "internal error"]
    assert logged and logged[-1].exc_info[0] is pa.ArrowInvalid  # the traceback, in the log
    store = Store(str(data / "out" / "bug"))
    assert not store.exists(layout.MANIFEST)
    shards = commit.read_json(store, layout.RUN_JSON)["shards"]
    assert len(commit.committed(store, layout.SCORES)) == len(shards)  # the scores stand
    monkeypatch.undo()
    assert cli.main(run_args(data, "bug")) == 0
    assert store.exists(layout.MANIFEST)


def test_user_error_is_one_line(data, capsys):
    rc = cli.main(run_args(data, "bad", "--k", "5000"))
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and "Traceback" not in err
    assert err.startswith("protoprune: error: k = 5000 is larger than the 1200 input rows")


def test_force_new_leaves_nothing_of_the_old_run(data, capsys):
    """A dedup run writes every folder of the layout (annotated/, embeddings/, report/...); a
    spill a crashed task left in _tmp/ stays too. --force-new wipes them all."""
    args = run_args(data, "wipe", "--dedup-eps", "0.05", "--save-embeddings")
    assert cli.main(args + ["--strategy", "balanced"]) == 0
    store = Store(str(data / "out" / "wipe"))
    store.put_bytes(layout.spill_chunk(0, 0, 0), b"left by a crashed task")
    before = {k.split("/")[0] for k in store.list("")}
    assert before <= set(layout.WIPE_ORDER)
    assert {layout.ANNOTATED, layout.TMP, layout.EMBEDDINGS, layout.REPORT_DIR} <= before
    assert commit.wipe_run(store) and store.list("") == []
    # through the CLI: a changed config with --force-new starts over
    assert cli.main(args + ["--strategy", "balanced"]) == 0
    store.put_bytes(layout.spill_chunk(0, 0, 0), b"left by a crashed task")
    assert cli.main(run_args(data, "wipe", "--force-new", "--strategy", "easy")) == 0
    left = set(store.list(""))
    assert not any(k.startswith((layout.TMP, layout.EMBEDDINGS)) for k in left)
    man = commit.read_manifest(store)
    assert man["strategy"] == "easy" and "dedup" not in man
    assert {k for k in left if k.startswith(layout.ANNOTATED)} == set(man["annotated"])
    capsys.readouterr()


def test_the_cli_shuts_down_only_the_ray_it_started(data, ray_temp_dir):
    """`protoprune run` called in a process whose Ray the caller started (a notebook's, this
    module's) runs on that Ray and leaves it up; a Ray the run started itself is shut down at
    its end, after the report is written."""
    node = ray.get_runtime_context().get_node_id()
    assert cli.main(run_args(data, "caller-ray")) == 0
    assert ray.is_initialized() and ray.get_runtime_context().get_node_id() == node
    ray.shutdown()
    try:
        assert cli.main(run_args(data, "own-ray")) == 0  # starts an embedded Ray of its own
        assert not ray.is_initialized()
        assert Store(str(data / "out" / "own-ray")).exists(layout.REPORT)
    finally:  # this module's Ray again, for the fixture's teardown
        init_local_ray(ray_temp_dir)
