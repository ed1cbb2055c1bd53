"""Credentials given through `storage_options` (flat, and nested in `client_kwargs`) reach no
file of the run folder, no log line of the driver or of the Ray workers (the files of the Ray
temp dir) and no error message: real runs, failed runs and refused runs through the CLI, on
moto_server and a fault proxy in front of it."""

from __future__ import annotations

import logging
import os

import numpy as np
import pytest

from ray_jobs import cli
from scoring.storage import Store
from tests.helpers import clustered, write_dataset
from tests.s3proxy import FaultProxy

N = 300

FLAT = {"key": "PPKEYIDFLAT7c1d", "secret": "pp-SECRET-FLAT-e5b9", "token": "pp-TOKEN-FLAT-93aa"}
NESTED = {
    "aws_access_key_id": "PPKEYIDNEST41f0",
    "aws_secret_access_key": "pp-SECRET-NEST-0d27",
    "aws_session_token": "pp-TOKEN-NEST-b81c",
}


def options(style: str, endpoint: str) -> dict:
    if style == "flat":
        return {"endpoint_url": endpoint, **FLAT}
    return {"client_kwargs": {"endpoint_url": endpoint, **NESTED}}


def secrets(style: str) -> list[str]:
    return list((FLAT if style == "flat" else NESTED).values())


def yaml_of(opts: dict, indent: int = 2) -> str:
    lines = []
    for k, v in opts.items():
        if isinstance(v, dict):
            lines.append(" " * indent + f"{k}:")
            lines.append(yaml_of(v, indent + 2))
        else:
            lines.append(" " * indent + f"{k}: {v}")
    return "\n".join(lines)


def write_config(path, opts: dict) -> str:
    path.write_text("storage_options:\n" + yaml_of(opts) + "\n")
    return str(path)


def run_args(config: str, inp: str, out: str, run_id: str) -> list[str]:
    return [
        "run", "--config", config, "--input", inp, "--output", out, "--run-id", run_id,
        "--k", "4", "--shard-rows", "100", "--keep-fraction", "0.5", "--workers", "2", "--quiet",
    ]  # fmt: skip


def files_below(root: str):
    for dirpath, _, names in os.walk(root):
        for n in names:
            p = os.path.join(dirpath, n)
            if os.path.isfile(p) and not os.path.islink(p):
                yield p


@pytest.fixture(scope="module")
def data(s3_server, ray_local):
    bucket = s3_server.new_bucket()
    x = clustered(N, 8, 4)
    write_dataset(Store(f"s3://{bucket}/in"), x, list(range(N)), files=3, row_group_rows=50)
    bad = x.copy()
    bad[123, 2] = np.nan  # one shard fails on bad data
    write_dataset(Store(f"s3://{bucket}/bad"), bad, list(range(N)), files=3, row_group_rows=50)
    return s3_server, bucket


@pytest.mark.parametrize("style", ["flat", "nested"])
def test_credentials_leak_nowhere(data, ray_temp_dir, tmp_path, capsys, caplog, style):
    server, bucket = data
    caplog.set_level(logging.INFO)  # every logger of the driver process
    config = write_config(tmp_path / "c.yaml", options(style, server.endpoint))
    out = f"s3://{bucket}/out-{style}"
    texts = []

    # a committed run, then its status
    assert cli.main(run_args(config, f"s3://{bucket}/in", out, "ok")) == 0
    assert cli.main(["status", f"{out}/ok"]) == 0
    # a run whose shard fails on bad data: exit 1, one line
    assert cli.main(run_args(config, f"s3://{bucket}/bad", out, "bad")) == 1
    # refused at once: a missing input bucket, an output bucket that denies access
    assert cli.main(run_args(config, "s3://pp-no-such-bucket/in", out, "none")) == 2
    denied = server.new_bucket()
    proxy = FaultProxy(server.endpoint, deny_buckets=(denied,), lifetime=120)
    try:
        cfg2 = write_config(tmp_path / "p.yaml", options(style, proxy.endpoint))
        rc = cli.main(run_args(cfg2, f"s3://{bucket}/in", f"s3://{denied}/o", "denied"))
        assert rc == 2
    finally:
        proxy.stop()
    captured = capsys.readouterr()
    texts += [captured.out, captured.err, caplog.text]
    assert captured.err.count("protoprune: error:") == 3  # the three failures said so

    for text in texts:
        for s in secrets(style):
            assert s not in text
    # every object of the run folders (run.json, markers, failures, parquet, report)
    for run_id in ("ok", "bad"):
        st = Store(f"{out}/{run_id}")
        keys = st.list()
        assert "run.json" in keys
        for key in keys:
            blob = st.get_bytes(key)
            for s in secrets(style):
                assert s.encode() not in blob, f"{st.uri(key)} holds a credential"
    # every file of the Ray temp dir: the workers' and raylets' logs, session files
    scanned = 0
    for p in files_below(ray_temp_dir):
        with open(p, "rb") as f:
            blob = f.read()
        scanned += 1
        for s in secrets(style):
            assert s.encode() not in blob, f"{p} holds a credential"
    worker_logs = [p for p in files_below(ray_temp_dir) if os.path.basename(p).startswith("worker")]
    assert scanned > 10 and worker_logs
