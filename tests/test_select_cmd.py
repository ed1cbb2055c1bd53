"""`protoprune select`: a new selection from a committed run's scores equals a fresh run with
those settings and the same prototypes (--prototypes-from), and a single-process brute-force
reference; a changed eps re-decides the rows near the new threshold from the saved
embeddings; refusals are one line. Local folders and a real S3 API (moto_server)."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pytest

from scoring.commit import load_committed
from scoring.config import make_config
from scoring.storage import Store
from tests.helpers import clustered, emb_array, read_all, reference_keep
from tests.ref6 import all_scores, dbp_reference, dedup_survivors, per_cluster_pick

RUN_EPS = 0.004
# every strategy that `select --strategy` is tested with: adding a rule is one name here
STRATEGIES = ["hard", "balanced", "dbp", "auto"]
N, D, K = 1500, 16, 5


def data(seed: int = 3):
    rng = np.random.default_rng(seed)
    x = clustered(N, D, K, seed=seed)
    dst = rng.choice(np.arange(N // 2, N), size=350, replace=False)
    src = rng.integers(0, N // 2, size=350)
    # near-duplicates at a spread of similarities, so different eps remove different rows
    noise = rng.normal(size=(350, D)).astype(np.float32) * rng.uniform(0.001, 0.08, (350, 1))
    x[dst] = x[src] + noise.astype(np.float32)
    return x, list(range(10, 10 + 3 * N, 3))


def write_input(store: Store, x, ids, files: int = 3):
    for f, part in enumerate(np.array_split(np.arange(len(ids)), files)):
        t = pa.table({"id": pa.array([ids[i] for i in part]), "embedding": emb_array(x[part])})
        store.write_parquet(f"p{f}.parquet", t, row_group_size=120)


def settings(inp: str, out: str, run_id: str, **kw):
    base = dict(input=inp, output=out, run_id=run_id, k=K, shard_rows=250, seed=1, quiet=True)
    return make_config(dict(base, **kw))


def brute(run: Store, x, ids, strategy: str, fraction: float, eps) -> set:
    """The keep set by one process: SemDeDup in float64 from the embeddings, then the rule."""
    sc = all_scores(run)
    sid, cl, dist = sc["id"].to_pylist(), sc["cluster"].to_numpy(), sc["distance"].to_numpy()
    pos = {v: i for i, v in enumerate(ids)}
    surv = (
        set(sid) if eps is None else dedup_survivors(sid, cl, dist, x[[pos[v] for v in sid]], eps)
    )
    n_keep = min(int(fraction * len(sid)), len(surv))
    m = [i for i in range(len(sid)) if sid[i] in surv]
    if strategy in ("hard", "easy", "random", "balanced", "auto"):
        return reference_keep([sid[i] for i in m], cl[m], dist[m], strategy, n_keep, seed=1)
    if strategy == "dbp":
        counts = np.bincount(cl[m], minlength=K)
        dsum = np.bincount(cl[m], weights=dist[m].astype(np.float64), minlength=K)
        q = dbp_reference(load_committed(run)[0], counts, dsum, n_keep, 0.5)
        return per_cluster_pick(sid, cl, dist, q, surv)
    return None  # a rule without a brute-force reference here: the fresh run is the check


def keep_rows(store: Store, files) -> pa.Table:
    t = pa.concat_tables([store.read_parquet(f["path"]) for f in files])
    return t.sort_by("id").select(["id", "cluster", "distance", "percentile"])


@pytest.fixture(scope="module")
def first(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("sel")
    x, ids = data()
    write_input(Store(str(tmp / "in")), x, ids)
    return tmp, x, ids


@pytest.fixture(scope="module")
def committed(s3_server, ray_local, first):  # S3 first: Ray workers inherit its env
    from ray_jobs.driver import run

    tmp, x, ids = first
    cfg = settings(str(tmp / "in"), str(tmp / "out"), "base", dedup_eps=RUN_EPS)
    doc = run(cfg, quiet=True)
    return Store(str(tmp / "out" / "base")), doc


def fresh(tmp, name: str, **kw):
    """A fresh run with these settings and the first run's prototypes."""
    from ray_jobs.driver import run

    cfg = settings(
        str(tmp / "in"), str(tmp / "fresh"), name, prototypes_from=str(tmp / "out" / "base"), **kw
    )
    return Store(str(tmp / "fresh" / name)), run(cfg, quiet=True)


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("eps", [RUN_EPS, 0.03, None], ids=["run-eps", "new-eps", "no-dedup"])
def test_select_equals_fresh_run(ray_local, first, committed, strategy, eps):
    from ray_jobs import prune

    tmp, x, ids = first
    run, _ = committed
    name = f"{strategy}-{eps}"
    doc = prune.select(str(tmp / "out" / "base"), name, strategy=strategy, keep_fraction=0.4,
                       dedup_eps=eps)  # fmt: skip
    assert doc["selection"]["from_annotated"] and doc["strategy"] == strategy
    # the first run saved embeddings (dedup): its score files are those of a run that does
    fstore, fdoc = fresh(tmp, f"f-{name}", strategy=strategy, keep_fraction=0.4,
                         dedup_eps="off" if eps is None else eps, save_embeddings=True)  # fmt: skip
    got, want = keep_rows(run, doc["files"]), keep_rows(fstore, fdoc["files"])
    assert got.equals(want)
    assert all(f["path"].startswith(f"selections/{name}/keep/") for f in doc["files"])
    assert doc["rows_kept"] == fdoc["rows_kept"] == got.num_rows > 0
    ref = brute(run, x, ids, strategy, 0.4, eps)
    if ref is not None:
        assert set(got["id"].to_pylist()) == ref
    if eps is not None:
        assert doc["dedup"]["removed"] == fdoc["dedup"]["removed"] > 0
        assert doc["dedup"]["curve"] == fdoc["dedup"]["curve"]
    else:
        assert (
            "dedup" not in doc
            and "duplicate" not in run.read_parquet(doc["files"][0]["path"]).column_names
        )
    sel = run.child(f"selections/{name}")
    assert sel.exists("_MANIFEST.json") and sel.exists("report/index.html")
    assert not run.list("selections/" + name + "/annotated")  # the run's parts were reused


def test_eps_at_a_stored_similarity_is_redecided(ray_local, first, committed):
    """eps = 1 - a row's stored similarity: float32 cannot decide it; the selection re-decides
    the rows within the bound from the embeddings, exactly like a fresh run (float64)."""
    from ray_jobs import prune

    tmp, x, ids = first
    run, _ = committed
    ann = read_all(run, "annotated")
    sim = ann["max_similarity"].to_numpy(zero_copy_only=False)
    cand = np.flatnonzero(np.isfinite(sim) & (sim > 0.95) & (sim < 0.999))
    eps = float(1.0 - np.float64(sim[cand[len(cand) // 2]]))
    doc = prune.select(str(tmp / "out" / "base"), "edge", strategy="hard", keep_fraction=0.4,
                       dedup_eps=eps)  # fmt: skip
    assert doc["redecided_parts"] >= 1 and run.list("selections/edge/_redecided")
    got = set(keep_rows(run, doc["files"])["id"].to_pylist())
    assert got == brute(run, x, ids, "hard", 0.4, eps)
    fstore, fdoc = fresh(tmp, "f-edge", strategy="hard", keep_fraction=0.4, dedup_eps=eps)
    assert keep_rows(run, doc["files"]).equals(keep_rows(fstore, fdoc["files"]))
    assert doc["dedup"]["removed"] == fdoc["dedup"]["removed"]


def test_run_without_dedup_selects_from_saved_embeddings(ray_local, first):
    from ray_jobs import prune
    from ray_jobs.driver import run as run_job

    tmp, x, ids = first
    cfg = settings(str(tmp / "in"), str(tmp / "out"), "plain", strategy="hard",
                   save_embeddings=True)  # fmt: skip
    run_job(cfg, quiet=True)
    run = Store(str(tmp / "out" / "plain"))
    doc = prune.select(run.uri(), "dd", strategy="balanced", keep_count=500, dedup_eps=0.02)
    assert not doc["selection"]["from_annotated"]
    assert run.list("selections/dd/annotated", suffix=".parquet")
    sc = all_scores(run)
    sid, cl, dist = sc["id"].to_pylist(), sc["cluster"].to_numpy(), sc["distance"].to_numpy()
    pos = {v: i for i, v in enumerate(ids)}
    surv = dedup_survivors(sid, cl, dist, x[[pos[v] for v in sid]], 0.02)
    m = [i for i in range(len(sid)) if sid[i] in surv]
    want = reference_keep([sid[i] for i in m], cl[m], dist[m], "balanced", 500)
    assert set(keep_rows(run, doc["files"])["id"].to_pylist()) == want


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "ray_jobs.cli", *args], capture_output=True, text=True, timeout=300
    )


def test_refusals_are_one_line(ray_local, first, committed, tmp_path):
    from ray_jobs import prune
    from scoring.errors import BadConfig, NotFound

    tmp, _, _ = first
    base = str(tmp / "out" / "base")
    prune.select(base, "twice", strategy="hard", keep_fraction=0.3)
    again = prune.select(base, "twice", strategy="hard", keep_fraction=0.3)  # resumes: committed
    assert again["rows_kept"] == int(0.3 * N)
    with pytest.raises(BadConfig, match="exists with other settings: keep_fraction=0.3"):
        prune.select(base, "twice", strategy="hard", keep_fraction=0.2)
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "run.json").write_text(json.dumps({"run_id": "half"}))
    with pytest.raises(NotFound, match="is not committed"):
        prune.select(str(tmp_path / "half"), "x")
    r = cli("select", base, "--name", "twice", "--keep-fraction", "0.25")
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "other settings" in r.stderr
    r = cli("select", base, "--name", "bad", "--strategy", "nope")
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "'nope'" in r.stderr
    r = cli("select", base, "--name", "lab", "--label-column", "label")
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "label column" in r.stderr


def test_no_embeddings_refuses_an_eps(ray_local, first):
    from ray_jobs import prune
    from ray_jobs.driver import run as run_job
    from scoring.errors import BadInput

    tmp, _, _ = first
    run_job(settings(str(tmp / "in"), str(tmp / "out"), "noemb", strategy="hard"), quiet=True)
    with pytest.raises(BadInput, match="no duplicate evidence and no saved embeddings"):
        prune.select(str(tmp / "out" / "noemb"), "e", dedup_eps=0.01)
    doc = prune.select(str(tmp / "out" / "noemb"), "ok", strategy="easy", keep_fraction=0.2)
    assert doc["rows_kept"] == int(0.2 * N)


def test_select_on_s3(s3_server, ray_local):
    """Run and selection in a bucket; the selection equals the brute-force reference and a
    fresh run on the same bucket."""
    from ray_jobs import prune
    from ray_jobs.driver import run as run_job

    bucket = s3_server.new_bucket()
    x, ids = data(seed=5)
    write_input(Store(f"s3://{bucket}/in"), x, ids, files=2)
    inp, out = f"s3://{bucket}/in", f"s3://{bucket}/runs"
    run_job(settings(inp, out, "a", dedup_eps=RUN_EPS), quiet=True)
    run = Store(f"{out}/a")
    doc = prune.select(run.uri(), "s", strategy="dbp", keep_fraction=0.3, dedup_eps=0.02)
    got = keep_rows(run, doc["files"])
    assert set(got["id"].to_pylist()) == brute(run, x, ids, "dbp", 0.3, 0.02)
    cfg = settings(inp, out, "b", strategy="dbp", keep_fraction=0.3, dedup_eps=0.02,
                   prototypes_from=run.uri())  # fmt: skip
    fdoc = run_job(cfg, quiet=True)
    assert got.equals(keep_rows(Store(f"{out}/b"), fdoc["files"]))
    assert Store(f"{out}/a/selections/s").exists("_MANIFEST.json")


def test_eps_curve_and_report(ray_local, first, committed):
    """The manifest's curve counts, for every eps of its grid, the rows a float64 brute-force
    SemDeDup removes; the report plots it and shows the pairs nearest the chosen eps."""
    from scoring.report import build_report, collect

    tmp, x, ids = first
    run, doc = committed
    curve = doc["dedup"]["curve"]
    assert curve["eps"][0] == 0.001 and curve["eps"][-1] == 0.3 and len(curve["eps"]) >= 10
    assert all(a < b for a, b in zip(curve["eps"], curve["eps"][1:]))
    sc = all_scores(run)
    sid, cl, dist = sc["id"].to_pylist(), sc["cluster"].to_numpy(), sc["distance"].to_numpy()
    pos = {v: i for i, v in enumerate(ids)}
    xs = x[[pos[v] for v in sid]]
    want = [len(sid) - len(dedup_survivors(sid, cl, dist, xs, e)) for e in curve["eps"]]
    assert curve["removed"] == want and want[0] < want[-1]
    data = collect(run)
    thr = 1.0 - RUN_EPS
    verdicts = [v for _, v in data.near_eps]
    assert verdicts.count("removed") == verdicts.count("kept") == 4
    for d, v in data.near_eps:
        assert (d.similarity >= thr) == (v == "removed")
        assert d.of.id is not None and d.of.cluster == d.row.cluster
    page = build_report(run)
    assert "Choosing eps" in page and 'alt="rows removed by eps"' in page
