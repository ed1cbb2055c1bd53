"""Growing datasets (--prototypes-from, --reuse-scores-from): a run over files A, then a run
over A+B that scores only B's shards and keeps exactly what a fresh run over A+B with the same
prototypes keeps; a changed file is rescored; mismatched settings are refused. Local disk and a
real S3 API (moto_server)."""

from __future__ import annotations

import io

import numpy as np
import pyarrow as pa
import pytest

from ray_jobs import cli
from ray_jobs.driver import run
from scoring import commit, layout
from scoring.config import make_config
from scoring.status import run_status
from scoring.storage import Store
from tests.helpers import clustered, emb_array, read_all, reference_keep

N, D, K = 2400, 12, 6


def table(ids: np.ndarray, x: np.ndarray) -> pa.Table:
    e = emb_array(x)
    return pa.table({"id": ids, "embedding": e, "emb2": e, "label": ids % 3})


def write_files(root: str, x: np.ndarray, files: dict[str, np.ndarray]) -> None:
    st = Store(root)
    for name, rows in files.items():
        st.write_parquet(name, table(rows, x[rows]), row_group_size=200)


@pytest.fixture(scope="module")
def ray_s3(s3_server, ray_local):
    """moto first, so that the module's Ray workers inherit its endpoint and credentials."""
    return s3_server


@pytest.fixture(scope="module")
def rows():
    x = clustered(N, D, K, seed=9)
    rng = np.random.default_rng(9)
    dst = rng.choice(np.arange(1600, N), size=150, replace=False)
    x[dst] = x[rng.integers(0, 1600, size=150)] * 1.00001  # near-copies for dedup
    return x


def settings(inp: str, out: str, run_id: str, **kw):
    return dict(input=inp, output=out, run_id=run_id, shard_rows=400, quiet=True, **kw)


def kept(store: Store) -> list:
    return sorted(read_all(store, layout.KEEP)["id"].to_pylist())


def check_update(root: str, x: np.ndarray) -> None:
    """The whole story on one storage root (a local folder or an s3:// bucket)."""
    inp, out = f"{root}/in", f"{root}/runs"
    a = {"a0.parquet": np.arange(0, 800), "a1.parquet": np.arange(800, 1600)}
    write_files(inp, x, a)
    base = settings(inp, out, "v1", k=K, save_embeddings=True)
    run(make_config(base))
    v1 = f"{out}/v1"
    write_files(inp, x, {"b0.parquet": np.arange(1600, N)})  # the dataset grows
    rules = [
        ("hard", {"strategy": "hard", "keep_fraction": 0.4}),
        ("bal", {"strategy": "balanced", "keep_fraction": 0.4}),
        ("dd", {"strategy": "balanced", "keep_fraction": 0.4, "dedup_eps": 0.001}),
    ]
    for name, rule in rules:
        upd = run(
            make_config(
                settings(inp, out, f"upd-{name}", prototypes_from=v1, reuse_scores_from=v1, **rule)
            )
        )
        fresh = run(make_config(settings(inp, out, f"fresh-{name}", prototypes_from=v1, **rule)))
        su, sf = Store(f"{out}/upd-{name}"), Store(f"{out}/fresh-{name}")
        assert kept(su) == kept(sf) and len(kept(su)) == upd["rows_kept"] == fresh["rows_kept"]
        # only B's shards were scored; A's were copied, with their own markers
        marks = commit.committed(su, layout.SCORES)
        reused = {i for i, m in marks.items() if m.get("reused_from")}
        scored = {m["input"] for i, m in marks.items() if i not in reused}
        assert scored == {"b0.parquet"} and len(reused) == 4
        assert {marks[i]["input"] for i in reused} == set(a)
        assert upd["reuse"]["shards_reused"] == 4 and upd["reuse"]["shards_scored"] == 2
        assert upd["reuse"]["rows_reused"] == 1600 and upd["reuse"]["rows_new"] == 800
        assert not upd["reuse"]["drift_warning"]  # B is drawn like A
        st = run_status(su)["stages"]["scores"]
        assert st["reused"] == 4 and st["done"] == 6
        # the same prototypes, byte for byte
        assert su.get_bytes(layout.CENTROIDS) == Store(v1).get_bytes(layout.CENTROIDS)
        assert upd["prototypes_sha256"] == commit.load_committed_marker(Store(v1))["sha256"]
        if name == "hard":  # and the keep list against an independent sort of all rows
            sc = read_all(sf, layout.SCORES)
            ref = reference_keep(
                sc["id"].to_pylist(), sc["cluster"].to_numpy(), sc["distance"].to_numpy(),
                "hard", upd["n_keep"],
            )  # fmt: skip
            assert set(kept(su)) == ref
        if name == "dd":
            assert upd["dedup"]["removed"] == fresh["dedup"]["removed"] > 0
    # a file of A changes: its shards are rescored, the rest reused
    y = x.copy()
    y[800:1600] = clustered(800, D, K, seed=99)
    write_files(inp, y, {"a1.parquet": np.arange(800, 1600)})
    rule = rules[1][1]
    upd = run(
        make_config(settings(inp, out, "upd2", prototypes_from=v1, reuse_scores_from=v1, **rule))
    )
    fresh = run(make_config(settings(inp, out, "fresh2", prototypes_from=v1, **rule)))
    marks = commit.committed(Store(f"{out}/upd2"), layout.SCORES)
    scored = {m["input"] for m in marks.values() if not m.get("reused_from")}
    assert scored == {"a1.parquet", "b0.parquet"} and upd["reuse"]["shards_reused"] == 2
    assert kept(Store(f"{out}/upd2")) == kept(Store(f"{out}/fresh2"))


def test_update_locally(tmp_path, ray_s3, rows):
    check_update(str(tmp_path), rows)


def test_update_on_s3(ray_s3, rows):
    check_update(f"s3://{ray_s3.new_bucket()}", rows)


@pytest.fixture(scope="module")
def committed_run(tmp_path_factory, ray_s3, rows):
    root = tmp_path_factory.mktemp("upd")
    inp, out = str(root / "in"), str(root / "runs")
    write_files(inp, rows, {"a0.parquet": np.arange(0, 1200), "a1.parquet": np.arange(1200, N)})
    run(make_config(settings(inp, out, "v1", k=K)))
    return root


def cli_error(capsys, *args: str) -> tuple[int, str]:
    rc = cli.main(list(args))
    err = capsys.readouterr().err.strip().splitlines()
    return rc, err[-1] if err else ""


def test_mismatched_settings_are_refused(committed_run, capsys):
    root = committed_run
    inp, out, v1 = str(root / "in"), str(root / "runs"), str(root / "runs" / "v1")
    base = ["run", "--input", inp, "--output", out, "--shard-rows", "400", "--quiet"]
    cases = [
        (["--run-id", "m1", "--prototypes-from", v1, "--reuse-scores-from", v1,
          "--embedding-column", "emb2"], "it was scored with embedding_column = 'embedding', this run has 'emb2'"),
        (["--run-id", "m2", "--prototypes-from", v1, "--reuse-scores-from", v1,
          "--label-column", "label"], "it was scored with label_column = None, this run has 'label'"),
        (["--run-id", "m3", "--reuse-scores-from", v1, "--k", str(K), "--seed", "1"], "add --prototypes-from"),
        (["--run-id", "m4", "--prototypes-from", v1, "--metric", "l2"],
         "metric l2 but the prototypes from"),
        (["--run-id", "m5", "--prototypes-from", v1, "--k", "7"], f"have k = {K}"),
    ]  # fmt: skip
    for extra, msg in cases:
        rc, line = cli_error(capsys, *base, *extra)
        assert rc == 2 and msg in line, (extra, line)
        assert line.startswith("protoprune: error: ")
        assert not Store(out).exists(f"{extra[1]}/{layout.MANIFEST}")
    # a bare centroids.npy of another width: both widths named
    buf = io.BytesIO()
    c = np.eye(5, 7, dtype=np.float32)
    np.save(buf, c)
    Store(str(root)).put_bytes("c7.npy", buf.getvalue())
    rc, line = cli_error(capsys, *base, "--run-id", "m6", "--prototypes-from", str(root / "c7.npy"))
    assert rc == 2 and "input embeddings have width 12, the prototypes from" in line
    assert line.endswith(" 7")


def test_prototypes_from_a_npy_file(committed_run, capsys):
    """A bare centroids.npy: k comes from the file, the bytes are committed unchanged, and
    status says the shards were scored, none reused."""
    root = committed_run
    src = Store(str(root / "runs" / "v1")).get_bytes(layout.CENTROIDS)
    Store(str(root)).put_bytes("c.npy", src)
    args = ["run", "--input", str(root / "in"), "--output", str(root / "runs"), "--run-id",
            "npy", "--prototypes-from", str(root / "c.npy"), "--quiet"]  # fmt: skip
    assert cli.main(args) == 0
    run_dir = Store(str(root / "runs" / "npy"))
    assert run_dir.get_bytes(layout.CENTROIDS) == src
    marker = commit.load_committed_marker(run_dir)
    assert marker["source"] == str(root / "c.npy") and marker["k"] == K
    capsys.readouterr()
    assert cli.main(["status", str(root / "runs" / "npy")]) == 0
    out = capsys.readouterr().out
    assert "scores          done 2/2" in out and "reused" not in out


def test_drift_is_recorded_and_the_report_warns(tmp_path, ray_s3):
    """New rows unlike the old ones (other clusters): the manifest records both mean
    distances and the report suggests a refit."""
    inp, out = str(tmp_path / "in"), str(tmp_path / "runs")
    x = np.vstack([clustered(N, D, K, seed=9), clustered(600, D, K, seed=1234)])
    write_files(inp, x, {"a0.parquet": np.arange(0, N)})
    run(make_config(settings(inp, out, "v1", k=K)))
    write_files(inp, x, {"b0.parquet": np.arange(N, N + 600)})
    v1 = f"{out}/v1"
    doc = run(make_config(settings(inp, out, "drift", prototypes_from=v1, reuse_scores_from=v1)))
    r = doc["reuse"]
    assert r["shards_reused"] == 6 and r["shards_scored"] == 2
    assert r["drift_warning"] and r["drift_ratio"] > 1.25
    assert r["mean_distance_new"] > r["mean_distance_reused"] > 0
    page = Store(f"{out}/drift").get_bytes(layout.REPORT).decode()
    assert "<b>Drift:</b>" in page and "consider a refit" in page
