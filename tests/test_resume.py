"""Resume: a rerun redoes only what is not committed, refuses a changed config or input with a
message saying what differs, --force-new starts over, and a fixed input file redoes only its
shards. Real Ray (one per module), local run folders."""

from __future__ import annotations

import json
import logging
import os
import shutil

import numpy as np
import pytest

from ray_jobs.driver import Run, RunFailed, run
from scoring import commit, layout
from scoring.config import make_config
from scoring.status import run_status
from scoring.storage import Store
from tests.helpers import clustered, write_dataset

N = 600


def cfg(tmp_path, run_id="a", **kw):
    s = dict(
        input=str(tmp_path / "in"),
        output=str(tmp_path / "out"),
        run_id=run_id,
        k=4,
        shard_rows=100,
        strategy="hard",
        keep_fraction=0.3,
        quiet=True,
        workers=2,
    )
    s.update(kw)
    return make_config(s)


def dataset(tmp_path, ids=None, seed=0):
    store = Store(str(tmp_path / "in"))
    x = clustered(N, 8, 4, seed)
    write_dataset(store, x, ids if ids is not None else list(range(N)), files=3)
    return store, x


def keep_ids(run_dir) -> list:
    doc = json.loads((run_dir / "_MANIFEST.json").read_text())
    st = Store(str(run_dir))
    ids = []
    for f in doc["files"]:
        ids += st.read_parquet(f["path"])["id"].to_pylist()
    return sorted(ids)


def stamps(run_dir, sub="scores") -> dict[str, tuple[int, int]]:
    """(inode, mtime_ns) of every file below sub: an atomic rewrite changes the inode."""
    out = {}
    for p in sorted((run_dir / sub).glob("*")):
        st = os.stat(p)
        out[p.name] = (st.st_ino, st.st_mtime_ns)
    return out


@pytest.fixture(scope="module")
def ray_mod(ray_local):
    return ray_local


@pytest.fixture(scope="module")
def base(tmp_path_factory, ray_mod):
    """One input and one undisturbed, committed run ("ref") shared by the module's tests;
    each test copies the run folder under its own run id instead of recomputing it."""
    tmp = tmp_path_factory.mktemp("base")
    dataset(tmp)
    doc = run(cfg(tmp, "ref"), quiet=True)
    assert os.listdir(tmp / "out") == ["ref"]  # nothing written outside <output>/<run_id>/
    return tmp, doc


def copy_run(tmp, run_id: str):
    dst = tmp / "out" / run_id
    shutil.rmtree(dst, ignore_errors=True)
    shutil.copytree(tmp / "out" / "ref", dst)
    return dst


def test_resume_redoes_only_missing_shards(base, caplog):
    tmp, ref = base
    d = copy_run(tmp, "a")
    n_shards = len(json.loads((d / "run.json").read_text())["shards"])
    assert n_shards >= 6
    # as if the driver died after the other shards committed, before 1 and 4 and the reduce
    (d / "_MANIFEST.json").unlink()
    for i in (1, 4):
        (d / layout.marker_key("scores", i)).unlink()
    before = stamps(d)
    markers_before = stamps(d, "_commits/scores")
    caplog.set_level(logging.INFO, logger="protoprune")
    doc = run(cfg(tmp, "a"), quiet=True)
    assert f"score: {n_shards - 2} shards committed, 2 to do" in caplog.text
    after = stamps(d)
    redone = sorted(k for k in after if after[k] != before[k])
    assert redone == ["shard-000001.parquet", "shard-000004.parquet"]
    m_after = stamps(d, "_commits/scores")
    assert {k for k in m_after if m_after[k] != markers_before.get(k)} == {
        "shard-000001.json",
        "shard-000004.json",
    }
    assert keep_ids(d) == keep_ids(tmp / "out" / "ref")
    assert len(set(keep_ids(d))) == doc["rows_kept"] == ref["rows_kept"] == int(0.3 * N)


def test_committed_run_is_not_touched(base):
    tmp, ref = base
    d = copy_run(tmp, "c")
    before = {**stamps(d), **stamps(d, "keep"), **stamps(d, ".")}
    again = run(cfg(tmp, "c"), quiet=True)
    assert again == ref
    assert {**stamps(d), **stamps(d, "keep"), **stamps(d, ".")} == before


def test_marker_naming_other_prototypes_counts_as_missing(base, caplog):
    tmp, _ = base
    d = copy_run(tmp, "p")
    (d / "_MANIFEST.json").unlink()
    mk = d / layout.marker_key("scores", 2)
    m = json.loads(mk.read_text())
    m["prototypes_sha256"] = "0" * 64
    mk.write_text(json.dumps(m))
    assert run_status(Store(str(d)))["stages"]["scores"]["pending"] == 1
    before = stamps(d)
    caplog.set_level(logging.INFO, logger="protoprune")
    run(cfg(tmp, "p"), quiet=True)
    assert "shard 2: marker names other prototypes" in caplog.text
    after = stamps(d)
    assert sorted(k for k in after if after[k] != before[k]) == ["shard-000002.parquet"]
    assert keep_ids(d) == keep_ids(tmp / "out" / "ref")


def test_config_change_is_refused_naming_the_key(base):
    tmp, _ = base
    copy_run(tmp, "k")
    with pytest.raises(ValueError) as e:
        Run(cfg(tmp, "k", k=5, strategy="easy")).plan()
    msg = str(e.value)
    assert "k: 4 -> 5" in msg and "strategy: 'hard' -> 'easy'" in msg and "--force-new" in msg


def test_input_added_or_removed_is_refused_naming_the_file(tmp_path):
    store, x = dataset(tmp_path)
    Run(cfg(tmp_path)).plan()  # writes run.json; no stage needed to test the check
    write_dataset(store, x[:50], list(range(N, N + 50)), files=1, prefix="more")
    with pytest.raises(ValueError, match=r"added more/part-000.parquet"):
        Run(cfg(tmp_path)).plan()
    store.delete("more")
    store.delete("data/part-002.parquet")
    with pytest.raises(ValueError, match=r"removed data/part-002.parquet"):
        Run(cfg(tmp_path)).plan()


def test_changed_row_groups_are_refused(tmp_path):
    store, x = dataset(tmp_path)
    Run(cfg(tmp_path)).plan()
    write_dataset(store, x, list(range(N)), files=3, row_group_rows=37)
    with pytest.raises(ValueError, match=r"row groups of input file\(s\) changed .*part-000"):
        Run(cfg(tmp_path)).plan()


def test_changed_input_of_a_committed_run_is_refused(base, tmp_path):
    tmp, _ = base
    d = copy_run(tmp, "m")
    doc = json.loads((d / "run.json").read_text())
    doc["input"]["files"][0]["version"] = "older"
    (d / "run.json").write_text(json.dumps(doc))
    with pytest.raises(ValueError, match=r"is committed, and its input changed: data/part-000"):
        Run(cfg(tmp, "m")).plan()


def test_force_new_starts_over_inside_the_run_folder_only(base):
    tmp, _ = base
    out = tmp / "out"
    d = copy_run(tmp, "f")
    (out / "neighbour.txt").write_text("not ours")
    ref_before = stamps(out / "ref")
    with pytest.raises(ValueError):
        Run(cfg(tmp, "f", shard_rows=250)).plan()
    doc = run(cfg(tmp, "f", shard_rows=250, force_new=True), quiet=True)
    shards = json.loads((d / "run.json").read_text())["shards"]
    assert len(list((d / "scores").glob("*.parquet"))) == len(shards) < 6
    assert len(list((d / "_commits" / "scores").glob("*.json"))) == len(shards)
    assert (out / "neighbour.txt").read_text() == "not ours"
    assert stamps(out / "ref") == ref_before
    assert keep_ids(d) == keep_ids(out / "ref")  # only the sharding differs: same keep list
    assert doc["rows_in"] == N


def test_fixed_file_redoes_only_its_shards(tmp_path, ray_mod):
    """Duplicate id in part-002; the user fixes the ids of that file; the rerun redoes its
    shards only and ends with the keep list of a fresh run over the fixed data."""
    ids = list(range(N))
    ids[550] = 3
    store, x = dataset(tmp_path, ids=ids)
    with pytest.raises(RunFailed, match=r"id 3 in .*part-000.parquet row 3 .* and .*part-002"):
        run(cfg(tmp_path), quiet=True)
    d = tmp_path / "out" / "a"
    st = run_status(Store(str(d)))
    assert st["stages"]["reduce"]["failed"] == 1 and "duplicate id" in str(st["stages"])
    plan = json.loads((d / "run.json").read_text())["shards"]
    fixed_shards = {s["index"] for s in plan if s["file"] == "data/part-002.parquet"}
    before = stamps(d)
    ids[550] = 10_000
    keep_same = {}
    for f in ("part-000.parquet", "part-001.parquet"):
        p = tmp_path / "in" / "data" / f
        keep_same[p] = (p.read_bytes(), os.stat(p).st_mtime_ns)
    write_dataset(store, x, ids, files=3)  # same row groups; part-002 gets new ids
    for p, (data, ns) in keep_same.items():  # the user only touched part-002
        p.write_bytes(data)
        os.utime(p, ns=(ns, ns))
    run(cfg(tmp_path), quiet=True)
    after = stamps(d)
    redone = {int(k[6:12]) for k in after if after[k] != before.get(k)}
    history = json.loads((d / "run.json").read_text())["input_history"]
    assert history[0]["changed"] == ["data/part-002.parquet"]
    assert redone == fixed_shards and 0 < len(fixed_shards) < len(plan)
    assert not commit.failures(Store(str(d)), "reduce")
    run(cfg(tmp_path, "fresh"), quiet=True)
    assert keep_ids(d) == keep_ids(tmp_path / "out" / "fresh")
    rerun_scores = stamps(d)
    run(cfg(tmp_path), quiet=True)  # accepted once: the new fingerprint is recorded
    assert stamps(d) == rerun_scores


def test_fix_that_regroups_rows_and_moves_the_sample_is_refused(tmp_path, ray_mod):
    """part-002 rewritten with the same rows (its duplicate id fixed) in row groups of 90, 72
    and 38 instead of 81, 81 and 38: the same shard plan ([0, 2) and [2, 3)), but the sample
    is drawn over row groups, so it now reads other rows, of other files too."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from tests.helpers import emb_array

    ids = list(range(N))
    ids[550] = 3
    store, x = dataset(tmp_path, ids=ids)
    with pytest.raises(RunFailed):
        run(cfg(tmp_path, sample_size=40), quiet=True)
    d = tmp_path / "out" / "a"
    assert commit.load_committed_marker(Store(str(d)))["sample_plan_sha256"]
    ids[550] = 10_000
    t = pa.table({"id": pa.array(ids[400:]), "embedding": emb_array(x[400:])})
    with pq.ParquetWriter(str(tmp_path / "in" / "data" / "part-002.parquet"), t.schema) as w:
        for a, b in ((0, 90), (90, 162), (162, 200)):
            w.write_table(t.slice(a, b - a))
    with pytest.raises(ValueError, match=r"part-002.parquet changed the row groups the committed"):
        run(cfg(tmp_path, sample_size=40), quiet=True)
    # the same rows in the same row groups: accepted, only part-002's shards redone
    write_dataset(store, x, ids, files=3)
    run(cfg(tmp_path, sample_size=40), quiet=True)
    run(cfg(tmp_path, "fresh", sample_size=40), quiet=True)
    assert keep_ids(d) == keep_ids(tmp_path / "out" / "fresh")


def test_fix_that_changes_the_prototype_sample_is_refused(tmp_path, ray_mod):
    ids = list(range(N))
    ids[550] = 3
    store, x = dataset(tmp_path, ids=ids)
    with pytest.raises(RunFailed):
        run(cfg(tmp_path), quiet=True)
    ids[550] = 10_000
    x2 = x.copy()
    x2[400:] += np.float32(0.5)  # the "fix" also changes embeddings of part-002
    write_dataset(store, x2, ids, files=3)
    with pytest.raises(ValueError, match=r"part-002.parquet changed rows the committed prototypes"):
        run(cfg(tmp_path), quiet=True)
