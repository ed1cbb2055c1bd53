"""The k-means backends: the torch bf16 Lloyd iterations (deterministic, within 0.3% of faiss
fp32's objective from the same start), `--kmeans-backend` and `--kmeans-tol`, their config
checks and hash, and a run fitted with each backend checked against brute force."""

from __future__ import annotations

import io
import json

import faiss
import numpy as np
import pytest
import torch

from ray_jobs import cli
from ray_jobs.driver import run
from scoring import commit
from scoring.config import RunConfig
from scoring.errors import BadConfig
from scoring.kernels import kmeans
from scoring.kernels.devices import product_precision
from scoring.kernels.kmeans import choose_backend, fit_kmeans
from scoring.storage import Store
from tests.helpers import write_dataset
from tests.test_bad_input import error_line, run_cli
from tests.test_e2e import check_run


def blobs(n: int, d: int, c: int, noise: float, seed: int, offset: float = 0.0) -> np.ndarray:
    """c Gaussian clusters with overlap (many rows near a border between prototypes)."""
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(c, d))
    lab = rng.integers(0, c, size=n)
    return (centers[lab] + noise * rng.normal(size=(n, d)) + offset).astype(np.float32)


def unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x.astype(np.float64), axis=1, keepdims=True)).astype(np.float32)


def objective(x: np.ndarray, c: np.ndarray, metric: str) -> float:
    """The k-means objective of centroids c in float64: sum of cosine distances (1 - cos) to
    the nearest centroid, or of squared Euclidean distances. Lower is better."""
    x, c = x.astype(np.float64), c.astype(np.float64)
    if metric == "cosine":
        return float((1 - (x @ c.T).max(1)).sum())
    return float(((x[:, None, :] - c[None]) ** 2).sum(-1).min(1).sum())


def faiss_from_the_same_start(x: np.ndarray, k: int, iters: int, metric: str, seed: int):
    """faiss fp32 Lloyd iterations from the k sample rows the torch fit starts from (its
    documented seeded draw), straight through faiss: the reference the bf16 fit must match."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    start = x[torch.randperm(len(x), generator=gen)[:k].numpy()]
    km = faiss.Kmeans(
        x.shape[1], k, niter=iters, seed=seed, spherical=metric == "cosine",
        max_points_per_centroid=len(x), min_points_per_centroid=1, early_stop_threshold=-1.0,
    )  # fmt: skip
    km.train(x, init_centroids=start)
    return unit(km.centroids) if metric == "cosine" else km.centroids


@pytest.mark.parametrize("precision", ["bf16", "fp32", None])
@pytest.mark.parametrize("metric", ["cosine", "l2"])
def test_torch_fit_is_the_same_bytes_for_a_seed(metric, precision):
    """Both product precisions (bf16: CUDA and AMX CPUs; fp32: other CPUs), and the one this
    machine picks (None)."""
    x = blobs(3000, 24, 8, 1.0, seed=3, offset=0.0 if metric == "cosine" else 5.0)
    a, ia, st = fit_kmeans(x, 12, 6, metric, 7, backend="torch", precision=precision)
    b, ib, _ = fit_kmeans(x, 12, 6, metric, 7, backend="torch", precision=precision)
    assert a.tobytes() == b.tobytes() and ia == ib
    assert st["backend"] == "torch" and st["device"] == "cpu" and st["iterations"] == 6
    assert st["precision"] == (precision or product_precision("cpu"))
    other, _, _ = fit_kmeans(x, 12, 6, metric, 8, backend="torch", precision=precision)
    assert other.tobytes() != a.tobytes()  # the seed matters
    if metric == "cosine":
        np.testing.assert_allclose(np.linalg.norm(a, axis=1), 1, atol=1e-5)


@pytest.mark.parametrize(
    "metric,n,d,c,noise,k,seed",
    [
        ("cosine", 4000, 32, 10, 1.0, 25, 0),
        ("cosine", 3000, 32, 5, 1.5, 30, 2),
        ("l2", 4000, 32, 10, 1.0, 25, 0),  # offset 10: the rows are centred before bf16
        ("l2", 3000, 32, 5, 1.5, 30, 1),
    ],
)
def test_torch_objective_within_0_3_percent_of_faiss(metric, n, d, c, noise, k, seed):
    """The bf16 products (those of CUDA and AMX CPUs, forced here): within 0.3% of faiss."""
    x = blobs(n, d, c, noise, seed, offset=0.0 if metric == "cosine" else 10.0)
    if metric == "cosine":
        x = unit(x)
    got, reported, st = fit_kmeans(x, k, 10, metric, seed, backend="torch", precision="bf16")
    want = faiss_from_the_same_start(x, k, 10, metric, seed)
    o_torch, o_faiss = objective(x, got, metric), objective(x, want, metric)
    assert o_torch <= o_faiss * 1.003, (o_torch, o_faiss)
    assert st["iterations"] == 10
    # the reported objective is that of the last assignment (before the last update): it is
    # at least the final centroids' objective and close to it after 10 iterations
    if metric == "cosine":
        assert reported == pytest.approx(n - objective(x, got, metric), rel=0.01)
    else:
        assert objective(x, got, metric) <= reported * (1 + 1e-4)
        assert reported == pytest.approx(objective(x, got, metric), rel=0.01)


@pytest.mark.parametrize("backend", ["faiss", "torch"])
def test_tol_stops_early_and_records_the_iterations_run(backend):
    x = blobs(3000, 16, 6, 0.3, seed=5)
    _, _, full = fit_kmeans(x, 6, 40, "cosine", 0, backend=backend)
    assert full["iterations"] == 40 and full["tol"] is None  # off by default: exactly 40
    _, _, st = fit_kmeans(x, 6, 40, "cosine", 0, backend=backend, tol=1e-4)
    assert 2 <= st["iterations"] < 40 and st["tol"] == 1e-4 and st["backend"] == backend


def test_choose_backend(monkeypatch):
    monkeypatch.setattr(kmeans, "cpu_has_bf16", lambda: True)
    assert choose_backend("auto") == ("torch", "cpu")
    assert choose_backend("faiss") == ("faiss", "cpu")
    monkeypatch.setattr(kmeans, "cpu_has_bf16", lambda: False)
    assert choose_backend("auto") == ("faiss", "cpu")
    assert choose_backend("torch") == ("torch", "cpu")
    with pytest.raises(ValueError, match="'gpu'"):
        choose_backend("gpu")
    monkeypatch.setattr(kmeans, "torch_cuda", lambda: True)
    assert choose_backend("auto", use_gpu=True) == ("torch", "cuda")
    assert choose_backend("auto", use_gpu=False) == ("faiss", "cpu")


def test_product_precision_is_bf16_where_bf16_products_are_fast(monkeypatch):
    """bf16 on CUDA and on CPUs with AMX tiles; fp32 on other CPUs, AVX512_BF16 or not (its
    bf16 matmul ran at half the fp32 rate on such a CPU: devices.product_precision)."""
    from scoring.kernels import devices

    assert devices.product_precision("cuda") == "bf16"
    monkeypatch.setattr(devices, "cpu_has_amx", lambda: True)
    assert devices.product_precision("cpu") == "bf16"
    monkeypatch.setattr(devices, "cpu_has_amx", lambda: False)
    assert devices.product_precision("cpu") == "fp32"
    with pytest.raises(ValueError, match="fp64"):
        fit_kmeans(blobs(100, 4, 2, 0.5, seed=1), 2, 1, "l2", 0, backend="torch", precision="fp64")


def test_faiss_forced_runs_faiss(monkeypatch):
    monkeypatch.setattr(kmeans, "cpu_has_bf16", lambda: True)
    x = blobs(2000, 8, 4, 0.5, seed=1)
    _, _, st = fit_kmeans(x, 4, 3, "l2", 0, backend="faiss")
    assert st["backend"] == "faiss" and st["requested_backend"] == "faiss"
    _, _, st = fit_kmeans(x, 4, 3, "l2", 0)
    assert st["backend"] == "torch" and st["requested_backend"] == "auto"


# -- config ----------------------------------------------------------------------------------
def test_new_settings_keep_the_hash_of_older_runs_at_their_defaults():
    # hashes of these configs computed by the code before kmeans_backend / kmeans_tol existed:
    # a run made then resumes now
    old = {
        "328214949f33972e54372b5da57b7c5e60ae1b23041f0c64e325de06e9f318d8": {},
        "18aca34d2596cdaa08dfadceb88a2aef2fd806a73b2674c81480d1ce617b159d": {
            "k": 50,
            "metric": "l2",
            "strategy": "hard",
            "keep_fraction": 0.3,
        },  # fmt: skip
    }
    for want, kw in old.items():
        inp = "s3://b/x" if kw else "in"
        assert RunConfig(input=inp, output="out", **kw).config_hash() == want
    base = RunConfig(input="in", output="out")
    hashes = {
        base.config_hash(),
        RunConfig(input="in", output="out", kmeans_backend="faiss").config_hash(),
        RunConfig(input="in", output="out", kmeans_backend="torch").config_hash(),
        RunConfig(input="in", output="out", kmeans_tol=1e-4).config_hash(),
        RunConfig(input="in", output="out", kmeans_tol=0).config_hash(),
    }
    assert len(hashes) == 5  # a setting that changes the prototypes changes the hash


@pytest.mark.parametrize(
    "key,value",
    [
        ("kmeans_backend", "gpu"),
        ("kmeans_backend", 3),
        ("kmeans_tol", -0.1),
        ("kmeans_tol", float("nan")),
        ("kmeans_tol", "1e-4"),
        ("kmeans_tol", True),
    ],
)
def test_bad_settings_are_refused(key, value):
    with pytest.raises(BadConfig) as e:
        RunConfig(input="in", output="out", **{key: value})
    msg = str(e.value)
    assert "\n" not in msg and key in msg and repr(value) in msg


@pytest.mark.parametrize(
    "flag,value,needle",
    [
        ("--kmeans-backend", "gpu", "kmeans_backend"),
        ("--kmeans-tol", "-1", "kmeans_tol"),
        ("--kmeans-tol", "soon", "--kmeans-tol"),
    ],
)
def test_cli_bad_values_are_one_line_errors(tmp_path, capsys, flag, value, needle):
    argv = ["run", "--input", str(tmp_path / "in"), "--output", str(tmp_path / "out")]
    with pytest.raises(SystemExit) as ex:  # argparse's own type errors exit from the parser
        raise SystemExit(cli.main([*argv, flag, value]))
    line = error_line(capsys.readouterr().err)
    assert ex.value.code == 2 and needle in line and value in line
    assert not (tmp_path / "out").exists()


# -- runs ------------------------------------------------------------------------------------
N, D, K = 2400, 16, 8


def data(tmp_path):
    x = blobs(N, D, 6, 0.6, seed=11)
    ids = [int(i) * 7 - 3000 for i in np.random.default_rng(1).permutation(N)]
    write_dataset(Store(str(tmp_path / "in")), x, ids, files=2)
    return ids, x


def test_run_with_torch_backend_is_exact_against_brute_force(ray_local, tmp_path, capsys):
    """The CLI with --kmeans-backend torch: the committed prototypes come from the torch fit
    (marker and manifest say so), and every score and the keep list match a brute-force search
    with those centroids. A resume with the prototypes committed does not refit."""
    ids, x = data(tmp_path)
    args = [
        "run", "--input", str(tmp_path / "in"), "--output", str(tmp_path / "out"),
        "--run-id", "t", "--k", str(K), "--kmeans-iters", "7", "--kmeans-backend", "torch",
        "--shard-rows", "700", "--strategy", "hard", "--keep-fraction", "0.3", "--quiet",
    ]  # fmt: skip
    rc, err = run_cli(capsys, *args)
    assert rc == 0, err
    store = Store(str(tmp_path / "out")).child("t")
    doc = json.loads(store.get_bytes("_MANIFEST.json"))
    cfg = RunConfig(
        input=str(tmp_path / "in"), output=str(tmp_path / "out"), run_id="t", k=K,
        kmeans_iters=7, kmeans_backend="torch", shard_rows=700, strategy="hard",
        keep_fraction=0.3,
    )  # fmt: skip
    check_run(cfg, doc, ids, x, n_files=2)
    marker = commit.read_json(store, "prototypes/_COMMITTED.json")
    assert marker["backend"] == "torch" and marker["requested_backend"] == "torch"
    assert marker["iterations"] == 7 and marker["tol"] is None
    assert marker["precision"] == product_precision("cpu")
    assert doc["kmeans"]["backend"] == "torch" and doc["kmeans"]["iterations"] == 7
    assert doc["kmeans"]["inertia"] == marker["inertia"]
    assert doc["config_hash"] == cfg.config_hash()
    # the centroids are k-means means: each is the (normalised) mean of the sample rows its
    # last assignment gave it, so it is close to the mean of the rows nearest to it now
    c = np.load(io.BytesIO(store.get_bytes("prototypes/centroids.npy")))
    xn = unit(x)
    lab = (xn @ c.T).argmax(1)
    for j in np.unique(lab):
        m = xn[lab == j].mean(0)
        assert float(unit(m[None])[0] @ c[j]) > 0.99
    # a resume with committed prototypes keeps them (no refit, not even with another backend
    # on this machine: the same config resolves nothing again)
    before = store.get_bytes("prototypes/_COMMITTED.json")
    store.delete("_MANIFEST.json")
    assert run(cfg, quiet=True)["prototypes_sha256"] == doc["prototypes_sha256"]
    assert store.get_bytes("prototypes/_COMMITTED.json") == before


def test_run_with_faiss_forced_and_tol(ray_local, tmp_path):
    ids, x = data(tmp_path)
    cfg = RunConfig(
        input=str(tmp_path / "in"), output=str(tmp_path / "out"), run_id="f", k=K,
        kmeans_iters=60, kmeans_backend="faiss", kmeans_tol=1e-5, shard_rows=700,
        strategy="easy", keep_fraction=0.5, metric="l2", quiet=True,
    )  # fmt: skip
    doc = run(cfg, quiet=True)
    check_run(cfg, doc, ids, x, n_files=2)
    marker = commit.read_json(Store(cfg.output).child("f"), "prototypes/_COMMITTED.json")
    assert marker["backend"] == "faiss" and marker["precision"] == "fp32"
    assert marker["tol"] == 1e-5 and 2 <= marker["iterations"] < 60
    assert doc["kmeans"]["iterations"] == marker["iterations"]


def test_fit_task_gives_torch_and_faiss_every_core(ray_local):
    """Ray pins OMP_NUM_THREADS to a task's num_cpus (1): the fit task raises both libraries'
    thread counts to the cores it may run on."""
    import ray

    from ray_jobs.workers import use_all_cores

    @ray.remote(num_cpus=1)
    def probe():
        import os

        import faiss
        import torch

        use_all_cores()
        cores = len(os.sched_getaffinity(0))
        return (
            os.environ.get("OMP_NUM_THREADS"),
            torch.get_num_threads(),
            faiss.omp_get_max_threads(),
            cores,
        )

    omp, t, f, cores = ray.get(probe.remote())
    assert omp == "1"  # what Ray set for the task
    assert t == f == cores
