"""Running on a real Ray cluster (issue 7).

- cluster.yaml passes Ray's own cluster-launcher validation and has the promised shape;
- docs/kuberay.yaml is a RayJob with the same entry point and a GPU worker group;
- `ray job submit` to a head started with `ray start --head --block` (private ports and temp
  dir) runs `python -m ray_jobs.prune --config ...` and `protoprune run ...` against the local
  S3 server: the job joins that cluster, uses every CPU slot, logs to the job log, and a
  resubmission with the same run id resumes;
- on a two-node `ray.cluster_utils.Cluster`, shards run on both nodes and removing one node
  mid-run still ends with the exact keep list.
"""

from __future__ import annotations

import copy
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import yaml
from conftest import free_port
from helpers import clustered, read_all, reference_keep, write_dataset

from ray_jobs.scheduler import IN_FLIGHT_PER_WORKER
from scoring import commit, layout
from scoring.config import load_yaml, make_config
from scoring.storage import Store

ROOT = Path(__file__).resolve().parent.parent
RAY_BIN = os.path.join(os.path.dirname(sys.executable), "ray")
IMAGE_RE = re.compile(r"^rayproject/ray:(\d+\.\d+\.\d+)-py311-gpu$")
ENTRY = ["python", "-m", "ray_jobs.prune", "--config"]

# Memory (GiB) of the instance types cluster.yaml may use, to check /dev/shm against the
# object store Ray sizes by default (30% of memory, at most 200 GB).
INSTANCE_GIB = {
    "m6i.2xlarge": 32,
    "g5.xlarge": 16,
    "g5.12xlarge": 192,
    "p4d.24xlarge": 1152,
    "p5.48xlarge": 2048,
}
GPU_FAMILIES = ("g5.", "g6.", "g6e.", "p4d.", "p4de.", "p5.", "p5e.", "p5en.")


# -- cluster.yaml --------------------------------------------------------------------------
def load_cluster_yaml() -> dict:
    with open(ROOT / "cluster.yaml", encoding="utf-8") as f:
        return yaml.safe_load(f)


def test_cluster_yaml_passes_ray_validation():
    """Ray's own pipeline for `ray up` up to the cloud calls: defaults, schema, node types."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    raw = load_cluster_yaml()
    cfg = prepare_config(copy.deepcopy(raw))
    validate_config(cfg)
    assert cfg["provider"]["type"] == "aws"
    assert cfg["head_node_type"] in cfg["available_node_types"]
    # Setup commands as Ray merges them: torch first, then protoprune with its extra.
    head_cmds = " && ".join(cfg["head_setup_commands"])
    worker_cmds = " && ".join(cfg["worker_setup_commands"])
    for cmds in (head_cmds, worker_cmds):
        assert "torch==" in cmds and cmds.index("torch==") < cmds.index("protoprune[")
    assert "protoprune[gpu]" in worker_cmds
    # A broken file is rejected by the same validation (the test can fail).
    bad = copy.deepcopy(raw)
    bad["available_node_types"]["head"]["resources"] = {"CPU": -1}
    with pytest.raises(Exception, match="CPU|minimum"):
        validate_config(prepare_config(bad))


def _shm_gib(options: list[str]) -> float:
    sizes = [o.split("=", 1)[1] for o in options if o.startswith("--shm-size=")]
    assert len(sizes) == 1, options
    m = re.fullmatch(r"(\d+)([gm])", sizes[0])
    assert m, sizes[0]
    return int(m.group(1)) / (1024 if m.group(2) == "m" else 1)


def test_cluster_yaml_shape():
    raw = load_cluster_yaml()
    text = (ROOT / "cluster.yaml").read_text()
    # No credentials in the file: instance profiles only.
    assert not re.search(r"AKIA[0-9A-Z]{16}|aws_secret|aws_access_key|secret_access", text, re.I)
    image = raw["docker"]["image"]
    assert IMAGE_RE.match(image), image
    types = raw["available_node_types"]
    head = types[raw["head_node_type"]]
    assert head["resources"] == {"CPU": 0}, "the head must take no tasks or actors"
    assert any("--num-cpus=0" in c for c in raw["head_start_ray_commands"])
    assert not head["node_config"]["InstanceType"].startswith(GPU_FAMILIES)
    head_gib = INSTANCE_GIB[head["node_config"]["InstanceType"]]
    assert _shm_gib(raw["docker"]["head_run_options"]) >= min(0.3 * head_gib, 200 / 1.074)
    workers = {k: v for k, v in types.items() if k != raw["head_node_type"]}
    instance_types = {v["node_config"]["InstanceType"] for v in workers.values()}
    assert {"g5.xlarge", "g5.12xlarge"} <= instance_types
    assert instance_types & {"p4d.24xlarge", "p5.48xlarge"}
    assert sum(v["min_workers"] for v in workers.values()) >= 1
    assert sum(v["min_workers"] for v in workers.values()) <= raw["max_workers"]
    spot = set()
    for name, t in workers.items():
        nc = t["node_config"]
        assert nc["InstanceType"].startswith(GPU_FAMILIES), name
        assert 0 <= t["min_workers"] <= t["max_workers"] <= raw["max_workers"], name
        assert "IamInstanceProfile" in nc, name
        gib = INSTANCE_GIB[nc["InstanceType"]]
        # /dev/shm holds the object store: at least Ray's default size for this much memory.
        assert _shm_gib(t["docker"]["worker_run_options"]) >= min(0.3 * gib, 200 / 1.074), name
        if nc.get("InstanceMarketOptions", {}).get("MarketType") == "spot":
            spot.add(nc["InstanceType"])
    assert "IamInstanceProfile" in head["node_config"]
    assert "g5.xlarge" in spot


# -- docs/kuberay.yaml ---------------------------------------------------------------------
def test_kuberay_rayjob(tmp_path):
    docs = list(yaml.safe_load_all((ROOT / "docs" / "kuberay.yaml").read_text()))
    jobs = [d for d in docs if d and d.get("kind") == "RayJob"]
    maps = {d["metadata"]["name"]: d for d in docs if d and d.get("kind") == "ConfigMap"}
    assert len(jobs) == 1
    job = jobs[0]
    assert job["apiVersion"] == "ray.io/v1"
    spec = job["spec"]
    entry = spec["entrypoint"].split()
    assert entry[: len(ENTRY)] == ENTRY and len(entry) == len(ENTRY) + 1
    config_path = entry[-1]
    cluster = spec["rayClusterSpec"]
    assert cluster["rayVersion"] == IMAGE_RE.match(load_cluster_yaml()["docker"]["image"])[1]
    head = cluster["headGroupSpec"]
    assert str(head["rayStartParams"]["num-cpus"]) == "0"
    head_pod = head["template"]["spec"]
    # The job's config file is mounted into the head pod from the ConfigMap.
    mounts = {m["name"]: m["mountPath"] for m in head_pod["containers"][0]["volumeMounts"]}
    volumes = {v["name"]: v for v in head_pod["volumes"]}
    (vol_name,) = [n for n, p in mounts.items() if config_path.startswith(p.rstrip("/") + "/")]
    cm = maps[volumes[vol_name]["configMap"]["name"]]
    file_name = config_path[len(mounts[vol_name].rstrip("/")) + 1 :]
    # The mounted job.yaml is a valid protoprune config.
    p = tmp_path / file_name
    p.write_text(cm["data"][file_name])
    cfg = make_config(load_yaml(str(p)), source=str(p))
    assert cfg.input.startswith("s3://") and cfg.output.startswith("s3://") and cfg.run_id
    groups = cluster["workerGroupSpecs"]
    assert groups
    images = {head_pod["containers"][0]["image"]}
    for g in groups:
        pod = g["template"]["spec"]
        c = pod["containers"][0]
        images.add(c["image"])
        assert int(c["resources"]["limits"]["nvidia.com/gpu"]) >= 1
        assert g["minReplicas"] <= g["replicas"] <= g["maxReplicas"]
        shm = [m for m in c["volumeMounts"] if m["mountPath"] == "/dev/shm"]
        assert shm, "workers need a /dev/shm sized for the object store"
        vol = {v["name"]: v for v in pod["volumes"]}[shm[0]["name"]]
        assert vol["emptyDir"]["medium"] == "Memory"
    assert len(images) == 1


# -- a real head started with `ray start --head --block` -------------------------------------
def _session_members(sid: int) -> set[int]:
    """PIDs whose session id is `sid` (the head was started in its own session)."""
    out = set()
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        if int(fields[3]) == sid:  # fields after the name: state ppid pgrp session ...
            out.add(int(d))
    return out


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


class Head:
    """`ray start --head --block` on private free ports and a private temp dir."""

    def __init__(self, env: dict[str, str], num_cpus: int = 2, num_gpus: int = 0):
        # <root>/ray is to RAY_TMPDIR=<root> what /tmp/ray is to a default install: `ray start`
        # leaves the cluster's address there, where a no-address ray.init() would look.
        # (a short path: Ray's unix sockets live under it)
        self.root = tempfile.mkdtemp(prefix="pp7-", dir="/tmp")
        self.tmp = os.path.join(self.root, "ray")
        names = [
            "port",
            "dashboard-port",
            "node-manager-port",
            "object-manager-port",
            "ray-client-server-port",
            "dashboard-agent-listen-port",
            "dashboard-agent-grpc-port",
            "runtime-env-agent-port",
            "metrics-export-port",
        ]
        ports: list[int] = []
        while len(ports) < len(names):
            p = free_port()
            if p not in ports:
                ports.append(p)
        self.ports = dict(zip(names, ports))
        self.address = f"http://127.0.0.1:{self.ports['dashboard-port']}"
        cmd = [RAY_BIN, "start", "--head", "--block", "--node-ip-address=127.0.0.1"]
        cmd += [f"--{k}={v}" for k, v in self.ports.items()]
        cmd += [
            "--dashboard-host=127.0.0.1",
            "--include-dashboard=true",
            "--min-worker-port=0",
            "--max-worker-port=0",
            f"--temp-dir={self.tmp}",
            f"--num-cpus={num_cpus}",
            f"--num-gpus={num_gpus}",  # logical GPUs: Ray schedules them, nothing runs on one
            "--disable-usage-stats",
        ]
        self.env = dict(env, RAY_TMPDIR=self.root)
        self.log = open(os.path.join(self.root, "head.log"), "w")
        self.proc = subprocess.Popen(
            cmd,
            env=self.env,
            stdout=self.log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        self._wait_ready()

    def _wait_ready(self, timeout: float = 90) -> None:
        import urllib.request

        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                self.stop()
                raise RuntimeError(f"ray start exited with {self.proc.returncode}")
            try:
                with urllib.request.urlopen(f"{self.address}/api/version", timeout=2) as r:
                    # ready: the job API answers and `ray start` has written the address file
                    if r.status == 200 and os.path.exists(
                        os.path.join(self.tmp, "ray_current_cluster")
                    ):
                        return
            except OSError:
                pass
            time.sleep(0.5)
        self.stop()
        raise RuntimeError("the Ray head did not come up")

    def stop(self) -> None:
        """Terminate the `ray start --block` process (it shuts its node down), then kill by PID
        whatever of its session is left."""
        members = _session_members(self.proc.pid)
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        deadline = time.time() + 15
        left = {p for p in members | _session_members(self.proc.pid) if _alive(p)}
        while left and time.time() < deadline:
            time.sleep(0.2)
            left = {p for p in left if _alive(p)}
        for p in left:
            try:
                os.kill(p, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.log.close()
        import shutil

        shutil.rmtree(self.root, ignore_errors=True)


def job_cli(head: Head, verb: str, *args: str, timeout: float = 180):
    """`ray job VERB --address <head> ARGS...`"""
    return subprocess.run(
        [RAY_BIN, "job", verb, "--address", head.address, *args],
        env=head.env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def submit(head: Head, submission_id: str, runtime_env: dict, entry: list[str], *opts: str):
    """`ray job submit --submission-id ID --runtime-env-json JSON [opts] -- entry`; it waits
    for the job and streams its log."""
    return job_cli(
        head,
        "submit",
        "--submission-id",
        submission_id,
        "--runtime-env-json",
        json.dumps(runtime_env),
        *opts,
        "--",
        *entry,
    )


def check_run(out: Store, run_id: str, n_rows: int, strategy: str, frac: float) -> set:
    """The committed manifest and keep list: exact against a brute-force reference."""
    store = out.child(run_id)
    doc = commit.read_json(store, layout.MANIFEST)
    n_keep = int(frac * n_rows)
    assert doc["rows_in"] == n_rows and doc["rows_kept"] == n_keep == doc["n_keep"]
    assert doc["strategy"] == strategy
    scores = read_all(store, "scores/")
    sid = scores.column("id").to_pylist()
    assert sorted(sid) == list(range(n_rows)), "every input row scored exactly once"
    keep = [store.read_parquet(f["path"]) for f in doc["files"]]
    kid = [i for t in keep for i in t.column("id").to_pylist()]
    assert len(kid) == len(set(kid)) == n_keep
    want = reference_keep(
        sid,
        scores.column("cluster").to_numpy(),
        scores.column("distance").to_numpy(),
        strategy,
        n_keep,
    )
    assert set(kid) == want
    return set(kid)


@pytest.fixture(scope="class")
def head(s3_server):
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env.update(
        RAY_AUTH_MODE="disabled",
        PATH=os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", ""),
    )
    h = Head(env, num_cpus=2)
    yield h
    h.stop()
    assert not {p for p in _session_members(h.proc.pid) if _alive(p)}


@pytest.fixture(scope="class")
def dataset(s3_server):
    bucket = s3_server.new_bucket()
    n, d = 1200, 16
    x = clustered(n, d, 6, seed=7)
    write_dataset(Store(f"s3://{bucket}"), x, list(range(n)), files=3, prefix="data")
    return bucket, n


def scoring_actors(head: Head, submission_id: str) -> list:
    """The ShardWorker actors that this cluster recorded for a submitted job."""
    from ray.job_submission import JobSubmissionClient
    from ray.util.state import list_actors

    job_id = JobSubmissionClient(head.address).get_job_info(submission_id).job_id
    flt = [("class_name", "=", "ShardWorker"), ("job_id", "=", job_id)]
    return list_actors(address=head.address, filters=flt, raise_on_missing_output=False)


JOB = {
    "k": 6,
    "kmeans_iters": 5,
    "shard_rows": 400,
    "strategy": "hard",
    "keep_fraction": 0.3,
}


@pytest.mark.slow
class TestRayJobSubmit:
    def runtime_env(self, s3_server) -> dict:
        """What the job needs that the head's environment lacks: our code and the S3 endpoint
        and (dummy) credentials. The head was started without any AWS_* variable."""
        env = {k: v for k, v in os.environ.items() if k.startswith("AWS_")}
        assert env["AWS_ENDPOINT_URL"] == s3_server.endpoint
        return {"env_vars": dict(env, PYTHONPATH=str(ROOT), PYTHONUNBUFFERED="1")}

    def test_submit_joins_cluster_and_resumes(self, head, dataset, s3_server, tmp_path):
        """`-- python -m ray_jobs.prune --config job.yaml`, then, after losing part of the run,
        `-- protoprune run ...` with the same settings and run id: it resumes."""
        from ray.job_submission import JobStatus, JobSubmissionClient

        bucket, n = dataset
        inp, outp, run_id = f"s3://{bucket}/data/", f"s3://{bucket}/runs/", "job-run"
        # As in the README: job.yaml in a folder of its own, uploaded as the working dir.
        (tmp_path / "myjob").mkdir()
        job_yaml = tmp_path / "myjob" / "job.yaml"
        job_yaml.write_text(yaml.safe_dump(dict(JOB, input=inp, output=outp, run_id=run_id)))
        renv = self.runtime_env(s3_server)
        opts = ("--working-dir", str(tmp_path / "myjob"))
        r = submit(head, "prune-1", renv, [*ENTRY, "job.yaml"], *opts)
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
        client = JobSubmissionClient(head.address)
        info = client.get_job_info("prune-1")
        assert info.status == JobStatus.SUCCEEDED
        logs = job_cli(head, "logs", "prune-1").stdout
        # The driver's output reaches the job log: progress (the score stage's end line: all
        # shards done), a line per scored shard, and the result line.
        assert re.search(r"score: (\d+)/\1 shards", logs), logs[-2000:]
        assert re.search(r"shard \d+ scored", logs), logs[-2000:]
        result = json.loads([ln for ln in logs.splitlines() if ln.startswith('{"run"')][-1])
        assert result["rows_kept"] == int(0.3 * n)
        out = Store(outp)
        kept = check_run(out, run_id, n, "hard", 0.3)
        # It joined this cluster (no embedded Ray) and used every CPU slot: this cluster
        # recorded its scoring actors under this job, one per CPU.
        assert len(scoring_actors(head, "prune-1")) == 2

        # A failure lost the manifest, the keep list and every other score commit. Resubmit
        # with the same run id: only the missing shards are scored again, same keep list.
        store = out.child(run_id)
        markers = sorted(store.list("_commits/scores/"))
        assert len(markers) >= 3
        for key in markers[::2] + store.list("keep/") + [layout.MANIFEST]:
            store.delete(key)
        flags = [f"--{k.replace('_', '-')}={v}" for k, v in JOB.items()]
        entry = ["protoprune", "run", f"--input={inp}", f"--output={outp}", f"--run-id={run_id}"]
        r = submit(head, "prune-2", renv, entry + flags)
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
        # `ray job submit` streams the job log until the job ends.
        done = len(markers) - len(markers[::2])
        assert f"score: {done} shards committed, {len(markers) - done} to do" in r.stdout
        assert f'"rows_kept": {int(0.3 * n)}' in r.stdout
        assert check_run(out, run_id, n, "hard", 0.3) == kept
        assert len(scoring_actors(head, "prune-2")) == min(2, len(markers) - done)

    def test_no_address_starts_embedded_ray_beside_a_cluster(self, head):
        """Outside a job, no --address starts an embedded Ray even though a cluster started
        with `ray start` left its address where ray.init() looks; --address auto joins it."""
        assert os.path.exists(os.path.join(head.tmp, "ray_current_cluster"))
        code = (
            "import sys, ray\n"
            "from ray_jobs.scheduler import ensure_ray\n"
            "ensure_ray(sys.argv[1] or None)\n"
            "print('GCS', ray.get_runtime_context().gcs_address.rsplit(':', 1)[1])\n"
            "ray.shutdown()\n"
        )
        env = dict(head.env, PYTHONPATH=str(ROOT))
        env.pop("RAY_ADDRESS", None)
        ports = {}
        for address in ("", "auto"):
            r = subprocess.run(
                [sys.executable, "-c", code, address],
                env=env,
                capture_output=True,
                text=True,
                timeout=120,
            )
            assert r.returncode == 0, r.stderr[-3000:]
            ports[address] = int(re.findall(r"^GCS (\d+)$", r.stdout, re.M)[-1])
        assert ports["auto"] == head.ports["port"]
        assert ports[""] != head.ports["port"], "no --address joined the ray-start cluster"

    def test_failed_job_reports_error(self, head, dataset, s3_server):
        """A user error in a submitted job: one line in the job log, job FAILED, no traceback."""
        from ray.job_submission import JobStatus, JobSubmissionClient

        bucket, _ = dataset
        entry = ["protoprune", "run", "--input", f"s3://{bucket}/nope/", "--output"]
        entry += [f"s3://{bucket}/runs/", "--run-id", "bad", "--k", "6"]
        r = submit(head, "prune-bad", self.runtime_env(s3_server), entry)
        assert r.returncode != 0
        assert JobSubmissionClient(head.address).get_job_status("prune-bad") == JobStatus.FAILED
        logs = job_cli(head, "logs", "prune-bad").stdout
        assert re.search(r"protoprune: error: .*nope", logs), logs[-2000:]
        assert "Traceback" not in logs
        assert not Store(f"s3://{bucket}/runs").exists("bad/_MANIFEST.json")


# -- two nodes with ray.cluster_utils.Cluster ----------------------------------------------
def check_distances(store: Store, x: np.ndarray) -> None:
    """The scores match an independent float64 nearest-prototype search of the input."""
    import io

    from scoring.kernels.assign import brute_force_nearest
    from scoring.kernels.devices import normalize

    c = np.load(io.BytesIO(store.get_bytes("prototypes/centroids.npy")))
    scores = read_all(store, "scores/")
    order = np.argsort(scores.column("id").to_numpy())
    j, d = brute_force_nearest(normalize(x), c, "cosine")
    np.testing.assert_array_equal(scores.column("cluster").to_numpy()[order], j)
    np.testing.assert_allclose(scores.column("distance").to_numpy()[order], d, atol=1e-5)


@pytest.mark.slow
def test_two_nodes_shards_on_both_and_node_removed_mid_run(tmp_path, monkeypatch):
    """Shards run on both nodes of a two-node cluster; one node is removed while the run is in
    its score stage, and the run still commits the exact keep list.

    A scoring actor, after committing a shard, waits while `hold` exists: both actors commit
    one shard each (on their own node) and stop, so the node is removed mid-run, always; the
    head's actor is released only after the cluster has marked the other node dead."""
    import ray
    from ray.cluster_utils import Cluster

    import ray_jobs.workers as workers_mod
    from ray_jobs.driver import run

    n, d = 900, 8
    x = clustered(n, d, 5, seed=11)
    write_dataset(Store(str(tmp_path / "in")), x, list(range(n)), files=3, prefix="data")
    rec, hold = tmp_path / "nodes", tmp_path / "hold"
    rec.mkdir()
    hold.touch()
    rec_dir, hold_file = str(rec), str(hold)

    class GatedWorker(workers_mod.ShardWorker):
        """ShardWorker that records the node of each scored shard, then waits on the gate.
        Defined here, so Ray ships it by value; its base is the real ShardWorker."""

        def score(self, shard, *args):
            out = super().score(shard, *args)
            node = ray.get_runtime_context().get_node_id()
            open(os.path.join(rec_dir, f"{shard.index}.{node}.{os.getpid()}"), "w").close()
            while os.path.exists(hold_file):
                time.sleep(0.02)
            return out

    monkeypatch.setattr(workers_mod, "ShardWorker", GatedWorker)
    ray.shutdown()  # the driver must connect to this cluster, not reuse another Ray
    ray_tmp = tempfile.mkdtemp(prefix="pp7c-", dir="/tmp")  # short: unix sockets live here
    # ray.cluster_utils writes and deletes `ray_current_cluster` under RAY_TMPDIR: keep it
    # private so no other local Ray user is pointed at this cluster.
    monkeypatch.setenv("RAY_TMPDIR", ray_tmp)
    os.makedirs(os.path.join(ray_tmp, "ray"))
    cluster = Cluster()
    try:
        cluster.add_node(num_cpus=1, temp_dir=ray_tmp, include_dashboard=False)
        node_b = cluster.add_node(num_cpus=1)
        cluster.wait_for_nodes()
        cfg = make_config(
            {
                "input": str(tmp_path / "in" / "data"),
                "output": str(tmp_path / "out"),
                "run_id": "two-nodes",
                "k": 5,
                "kmeans_iters": 5,
                "shard_rows": 100,
                "strategy": "hard",
                "keep_fraction": 0.25,
                "address": cluster.address,
                # One node dies once: each of its shards is lost once, and one retry must do.
                "max_retries": 1,
                "quiet": True,
            }
        )
        result: dict = {}

        def drive() -> None:
            try:
                result["doc"] = run(cfg, quiet=True)
            except BaseException as e:  # noqa: BLE001 - reported by the test
                result["error"] = e

        t = threading.Thread(target=drive, daemon=True)
        t.start()
        deadline = time.time() + 120
        nodes: set[str] = set()
        # each actor runs IN_FLIGHT_PER_WORKER calls at once (max_concurrency), so each node
        # commits that many shards before its calls wait on the gate
        per_node = IN_FLIGHT_PER_WORKER
        while (len(nodes) < 2 or len(os.listdir(rec)) < 2 * per_node) and (
            time.time() < deadline and t.is_alive()
        ):
            nodes = {f.split(".")[1] for f in os.listdir(rec)}
            time.sleep(0.05)
        head_id = cluster.head_node.node_id
        assert nodes == {head_id, node_b.node_id}, (nodes, result)
        store = Store(cfg.output).child(cfg.run_id)
        n_shards = len(commit.read_json(store, layout.RUN_JSON)["shards"])
        committed = len(store.list("_commits/scores/"))
        assert committed == 2 * per_node < n_shards  # mid-run: the rest still to do
        cluster.remove_node(node_b)
        deadline = time.time() + 60
        while time.time() < deadline and any(
            nd["NodeID"] == node_b.node_id and nd["Alive"] for nd in ray.nodes()
        ):
            time.sleep(0.1)
        # Keep the head's actor held a little longer: a driver that sends the lost node's
        # shards back to the dead actor burns their retries now and fails the run.
        time.sleep(2)
        os.remove(hold)
        t.join(150)
        assert not t.is_alive(), "the run hung after a node was removed"
        assert "error" not in result, result.get("error")
        doc = result["doc"]
    finally:
        if os.path.exists(hold):
            os.remove(hold)
        ray.shutdown()
        cluster.shutdown()
        import shutil

        shutil.rmtree(ray_tmp, ignore_errors=True)
    out = Store(cfg.output)
    assert doc["rows_kept"] == int(0.25 * n)
    check_run(out, cfg.run_id, n, "hard", 0.25)
    check_distances(out.child(cfg.run_id), x)
    # The removed node scored `per_node` shards; the head scored every shard once, including
    # those again (their tasks died with the node after the commits: committed shards are not
    # rewritten, the retry returns the committed summary).
    by_node: dict[str, int] = {}
    for f in os.listdir(rec):
        by_node[f.split(".")[1]] = by_node.get(f.split(".")[1], 0) + 1
    assert by_node == {head_id: n_shards, node_b.node_id: per_node}


def test_readme_cluster_section_matches():
    """The README's cluster commands: the steps exist and the `protoprune run` flags parse."""
    from ray_jobs.cli import build_parser

    text = (ROOT / "README.md").read_text()
    sec = text[text.index("## Running on a Ray cluster") :]
    sec = sec[: sec.index("\n## ", 5)]
    for step in ("ray up", "ray job submit", "ray job logs", "--follow", "ray job stop"):
        assert step in sec, step
    assert "ray down" in sec and "--runtime-env-json" in sec
    assert load_cluster_yaml()["docker"]["image"] in sec
    cmd = sec[sec.index("-- protoprune run") :].split("\n#")[0]
    argv = cmd.replace("\\\n", " ").split()[2:]
    args = build_parser().parse_args(argv)
    assert args.run_id == "web-2026-11" and args.strategy == "balanced"
    assert "-- python -m ray_jobs.prune --config job.yaml" in sec
