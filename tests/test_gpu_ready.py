"""Ready for GPU nodes (issue 18), all on this CPU machine.

- Placement: a head started with logical GPUs (`ray start --num-gpus 4 --num-cpus 8`) and a
  `ray.cluster_utils.Cluster` of unequal nodes; runs with 0.5, 0.75, 1 and 2 GPUs per worker and
  CPU-only workers whose --cpus-per-worker does not divide a node either commit the exact keep
  list or fail at once with one line naming the request and the cluster. Real scheduling.
- Dedup range tasks on logical GPUs: fractional GPU requests, processes reused, as many at
  once as the CPUs allow.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
import threading
import time

import numpy as np
import pytest
from helpers import clustered, write_dataset
from test_cluster import Head, check_distances, check_run

from ray_jobs.placement import Node, gpu_task_share, per_node, placeable
from scoring.config import make_config
from scoring.errors import BadConfig
from scoring.storage import Store

N, D, K = 2000, 8, 5
RUN = {"k": K, "kmeans_iters": 4, "shard_rows": 200, "strategy": "hard", "keep_fraction": 0.3}


# -- the count, node by node (no Ray) ---------------------------------------------------------
def test_per_node_counts():
    four = Node(cpus=8, gpus=4)
    assert per_node(four, 0.5, 1) == 8  # two halves per GPU
    assert per_node(four, 0.75, 1) == 4  # one 0.75 per GPU, not floor(4 / 0.75) = 5
    assert per_node(four, 0.3, 1) == 8  # three per GPU, but 8 CPUs
    assert per_node(four, 2, 1) == 2
    assert per_node(four, 2, 4) == 2
    assert per_node(four, 1, 3) == 2  # CPUs bind
    assert per_node(Node(cpus=5, gpus=0), 0, 2) == 2  # 2 CPUs each: not 5 / 2 rounded up
    nodes = [Node(3, 2), Node(1, 1)]
    assert placeable(nodes, 0.75, 1) == 3  # floor(3 GPUs / 0.75) would say 4
    assert placeable(nodes, 2, 1) == 1
    assert placeable(nodes, 3, 1) == 0
    assert placeable([Node(3, 0), Node(1, 0)], 0, 2) == 1  # floor(4 / 2) would say 2
    assert gpu_task_share([Node(8, 4)]) == 0.5
    assert gpu_task_share([Node(96, 8), Node(4, 0)]) == 0.0833  # 12 one-CPU tasks per GPU
    assert gpu_task_share([Node(4, 0)]) == 0.0


# -- real scheduling ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("gpuready")
    x = clustered(N, D, K, seed=3)
    write_dataset(Store(str(root / "in")), x, list(range(N)), files=2, prefix="data")
    return root, x


def run_on(address: str, root, run_id: str, **over):
    """A whole run against the cluster at `address`, in a thread: (manifest or error, seconds).
    A run that does not end within 150 s is reported as hung. The driver's connection stays
    for the module's next runs."""
    from ray_jobs.driver import run

    cfg = make_config(
        dict(RUN, input=str(root / "in" / "data"), output=str(root / "out"), run_id=run_id,
             address=address, quiet=True, **over)
    )  # fmt: skip
    got: dict = {}

    def drive():
        try:
            got["doc"] = run(cfg, quiet=True)
        except BaseException as e:  # noqa: BLE001 - reported by the test
            got["error"] = e

    t0 = time.perf_counter()
    t = threading.Thread(target=drive, daemon=True)
    t.start()
    t.join(150)
    hung = t.is_alive()
    assert not hung, f"run {run_id} ({over}) did not finish"
    return got, time.perf_counter() - t0


@pytest.fixture(scope="module")
def gpu_head():
    """`ray start --head --num-gpus 4 --num-cpus 8`, stopped by its process group."""
    import ray

    ray.shutdown()
    env = dict(os.environ, RAY_AUTH_MODE="disabled")
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")
    h = Head(env, num_cpus=8, num_gpus=4)
    h.gcs = f"127.0.0.1:{h.ports['port']}"  # the driver's address; h.address: the dashboard
    yield h
    ray.shutdown()
    h.stop()


def placed(address: str, root, **over) -> int:
    """The pool size worker_resources picks on the cluster at `address`, after checking that
    Ray places that many actors of those resources at once (each answers a call)."""
    import ray

    from ray_jobs.placement import worker_resources
    from ray_jobs.scheduler import ensure_ray

    ensure_ray(address)
    cfg = make_config(dict(RUN, input=str(root), output=str(root / "o"), run_id="p", **over))
    n, res, _ = worker_resources(cfg, 100)

    @ray.remote
    class Probe:
        def node(self) -> str:
            return ray.get_runtime_context().get_node_id()

    actors = [Probe.options(**res).remote() for _ in range(n)]
    try:
        ray.get([a.node.remote() for a in actors], timeout=120)
    finally:
        for a in actors:
            ray.kill(a)
    return n


@pytest.mark.parametrize("gpus, want", [(0.5, 8), (0.75, 4), (1, 4), (2, 2)])
def test_logical_gpus_pool_is_what_ray_places(gpu_head, data, gpus, want):
    """4 GPUs, 8 CPUs: 8, 4, 4 and 2 actors, every one placed (floor(4 / 0.75) = 5 was not)."""
    assert placed(gpu_head.gcs, data[0], gpus_per_worker=gpus) == want


def test_logical_gpus_075_run_finishes_exact(gpu_head, data):
    """The measured hang: 0.75 GPU per worker on 4 logical GPUs never finished."""
    root, x = data
    got, _ = run_on(gpu_head.gcs, root, "g075", gpus_per_worker=0.75)
    assert "error" not in got, got.get("error")
    out = Store(str(root / "out"))
    check_run(out, "g075", N, "hard", 0.3)
    check_distances(out.child("g075"), x)


def test_gpu_share_tasks_fill_the_cpus_and_keep_their_processes(gpu_head):
    """The dedup range tasks' request on 4 GPUs / 8 CPUs: half a GPU each, so 8 run at once
    (a whole GPU each ran 4), and 16 tasks reuse their processes (Ray's default for GPU
    tasks, max_calls=1, starts a process per task)."""
    import ray

    from ray_jobs.scheduler import ensure_ray, map_tasks

    ensure_ray(gpu_head.gcs)
    share = gpu_task_share()
    assert share == 0.5

    @ray.remote(num_cpus=0)
    class Gate:
        def __init__(self):
            self.n = 0

        def enter(self) -> int:
            self.n += 1
            return self.n

        def count(self) -> int:
            return self.n

    gate = Gate.remote()

    def task(i: int):
        seen = ray.get(gate.enter.remote())
        deadline = time.time() + 90
        while seen < 8 and time.time() < deadline:
            time.sleep(0.05)
            seen = ray.get(gate.count.remote())
        return os.getpid(), seen, ray.get_gpu_ids()

    got = list(map_tasks(task, range(16), 16, num_gpus=share))
    assert all(seen >= 8 for _, seen, _ in got)  # 8 at once
    assert len({pid for pid, _, _ in got}) <= 8 < 16  # processes kept
    assert all(len(ids) == 1 for _, _, ids in got)  # each on one GPU


def test_dedup_on_logical_gpus_exact(gpu_head, tmp_path):
    """A dedup run whose range tasks take GPU shares: the exact survivors and keep list."""
    from helpers import read_all, reference_keep
    from ref6 import all_scores, dedup_survivors

    rng = np.random.default_rng(7)
    x = clustered(1000, 16, 4, seed=3)
    dst = rng.choice(np.arange(500, 1000), size=200, replace=False)
    x[dst] = (
        x[rng.integers(0, 500, size=200)] + rng.normal(size=(200, 16)).astype(np.float32) * 0.01
    )
    ids = list(range(1000))
    write_dataset(Store(str(tmp_path / "in")), x, ids, files=2, prefix="data")
    eps = 0.002
    got, _ = run_on(gpu_head.gcs, tmp_path, "dd", gpus_per_worker=2, dedup_eps=eps, k=6)
    assert "error" not in got, got.get("error")
    doc = got["doc"]
    runs = Store(str(tmp_path / "out" / "dd"))
    sc = all_scores(runs)
    sid = sc["id"].to_pylist()
    cl, dist = sc["cluster"].to_numpy(), sc["distance"].to_numpy()
    surv = dedup_survivors(sid, cl, dist, x[sid], eps)
    assert 120 < len(ids) - len(surv) < 280  # the planted near-duplicates
    assert doc["dedup"]["removed"] == len(ids) - len(surv)
    keep = read_all(runs, "keep")["id"].to_pylist()
    m = [i for i in range(len(sid)) if sid[i] in surv]
    n_keep = min(doc["n_keep"], len(surv))
    assert set(keep) == reference_keep([sid[i] for i in m], cl[m], dist[m], "hard", n_keep)
    from ray.util.state import list_tasks

    ranges = list_tasks(
        address=gpu_head.address,
        filters=[("func_or_class_name", "=", "annotate_range")],
        detail=True,
        limit=1000,
    )
    # the module's other runs (no dedup) ran their range tasks on one CPU and no GPU
    on_gpu = [t.required_resources for t in ranges if "GPU" in t.required_resources]
    assert len(on_gpu) >= doc["cluster_ranges"] > 1
    assert all(r == {"CPU": 1.0, "GPU": 0.5} for r in on_gpu), on_gpu


def test_logical_gpus_request_no_node_holds_fails_at_once(gpu_head, data):
    root, _ = data
    got, _ = run_on(gpu_head.gcs, root, "g6", gpus_per_worker=6)
    e = got.get("error")
    assert isinstance(e, BadConfig), got
    msg = str(e)
    assert "\n" not in msg
    assert "gpus_per_worker = 6" in msg and "4 GPU + 8 CPU" in msg, msg


@pytest.fixture(scope="module")
def unequal(monkeypatch_module):
    """A head of 2 GPUs + 3 CPUs and a node of 1 GPU + 1 CPU."""
    import ray
    from ray.cluster_utils import Cluster

    ray.shutdown()
    tmp = tempfile.mkdtemp(prefix="pp18-", dir="/tmp")  # short: unix sockets live here
    monkeypatch_module.setenv("RAY_TMPDIR", tmp)
    os.makedirs(os.path.join(tmp, "ray"))
    cluster = Cluster()
    try:
        cluster.add_node(num_cpus=3, num_gpus=2, temp_dir=tmp, include_dashboard=False)
        cluster.add_node(num_cpus=1, num_gpus=1)
        cluster.wait_for_nodes()
        yield cluster.address
    finally:
        ray.shutdown()
        cluster.shutdown()
        shutil.rmtree(tmp, ignore_errors=True)


@pytest.fixture(scope="module")
def monkeypatch_module():
    mp = pytest.MonkeyPatch()
    yield mp
    mp.undo()


@pytest.mark.parametrize(
    "over, want",
    [({"gpus_per_worker": 0.75}, 3), ({"gpus_per_worker": 2}, 1), ({"gpus_per_worker": 0.5}, 4)],
    ids=["g075", "g2", "g05"],
)
def test_unequal_nodes_pool_is_what_ray_places(unequal, data, over, want):
    """2 GPU + 3 CPU and 1 GPU + 1 CPU: 0.75 -> 2 + 1 (floor(3 / 0.75) = 4 hung), 0.5 -> 3 + 1
    (CPUs bind on the head)."""
    assert placed(unequal, data[0], **over) == want


@pytest.mark.parametrize(
    "over",
    [
        {"gpus_per_worker": 2},  # 1 actor, on the head
        {"gpus_per_worker": 0, "cpus_per_worker": 2},  # 1 actor; floor(4 CPUs / 2) = 2 hung
    ],
    ids=["g2", "cpu2"],
)
def test_unequal_nodes_finish_exact(unequal, data, over):
    root, x = data
    rid = "u-" + "-".join(f"{k[0]}{v}".replace(".", "") for k, v in over.items())
    got, _ = run_on(unequal, root, rid, **over)
    assert "error" not in got, got.get("error")
    out = Store(str(root / "out"))
    check_run(out, rid, N, "hard", 0.3)
    check_distances(out.child(rid), x)


@pytest.mark.parametrize(
    "over, asked",
    [
        ({"gpus_per_worker": 3}, "gpus_per_worker = 3, cpus_per_worker = 1"),
        ({"gpus_per_worker": 0, "cpus_per_worker": 4}, "gpus_per_worker = 0, cpus_per_worker = 4"),
    ],
    ids=["g3", "cpu4"],
)
def test_unequal_nodes_unplaceable_fails_at_once(unequal, data, over, asked):
    root, _ = data
    got, _ = run_on(unequal, root, "u-bad-" + asked[-1], **over)
    e = got.get("error")
    assert isinstance(e, BadConfig), got
    msg = str(e)
    assert "\n" not in msg and asked in msg, msg
    assert "2 GPU + 3 CPU" in msg and "1 GPU + 1 CPU" in msg, msg
