"""Shared fixtures: a real local Ray (one per test module) and real S3 and GCS APIs on
loopback."""

from __future__ import annotations

import os
import shutil
import tempfile

import pytest
from gcsserver import GCSServer
from s3server import S3Server, free_port  # noqa: F401 - re-exported for tests

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")
# gcsfs >= 2025 probes each bucket over gRPC for zonal/HNS features (60 s against an emulator)
os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")
# Our workers must import this checkout, whatever is installed.
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
os.environ["PYTHONPATH"] = os.pathsep.join(
    [_ROOT] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
)


@pytest.fixture(scope="module")
def ray_temp_dir():
    """The Ray temp dir of the module's local Ray (its session logs, worker logs included)."""
    tmp = tempfile.mkdtemp(prefix="pp-ray-", dir="/tmp")
    yield tmp
    shutil.rmtree(tmp, ignore_errors=True)


@pytest.fixture(scope="module")
def ray_local(ray_temp_dir):
    """An embedded local Ray with 2 CPUs, shared by the tests of one module."""
    import ray

    from tests.helpers import init_local_ray

    init_local_ray(ray_temp_dir)
    yield ray
    ray.shutdown()


def _serve(server):
    """Yield a started loopback server with its environment set in os.environ (inherited by
    Ray workers started afterwards); restore the environment and stop it afterwards."""
    env = server.env()
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield server
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        server.stop()


@pytest.fixture(scope="session")
def s3_server():
    """Starts moto_server and points the standard AWS environment at it (inherited by Ray
    workers started afterwards)."""
    yield from _serve(S3Server())


@pytest.fixture(scope="session")
def gcs_server():
    """Starts fake-gcs-server and points STORAGE_EMULATOR_HOST at it (inherited by Ray workers
    started afterwards)."""
    yield from _serve(GCSServer())
