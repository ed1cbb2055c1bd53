"""The fsspec filesystems behind `storage.Store`: URL parsing, one client per (process,
scheme, options, environment), and the per-scheme settings (timeouts, retries, emulators)."""

from __future__ import annotations

import os
import threading
from collections.abc import Mapping
from typing import Any

from scoring.errors import StoreError
from scoring.store_rules import CONNECT_TIMEOUT_S, TIMEOUT_ENV, request_timeout

S3FS_TRIES = 2  # s3fs's tries of one request before retry_io's

__all__ = ["S3FS_TRIES", "make_filesystem", "shared_filesystem", "split_url"]


def split_url(url: str) -> tuple[str, str]:
    """('s3', 'bucket/prefix') for URLs, ('file', '/abs/path') for local paths."""
    if "://" in url:
        scheme, rest = url.split("://", 1)
        scheme = scheme.lower()
        if scheme in ("s3a", "s3n"):
            scheme = "s3"
        if scheme == "file":
            return "file", os.path.abspath(rest)
        return scheme, rest.strip("/")
    return "file", os.path.abspath(url)


def make_filesystem(scheme: str, storage_options: Mapping[str, Any] | None = None):
    """An fsspec filesystem for a scheme. S3 honours AWS_ENDPOINT_URL and the standard AWS env."""
    import fsspec

    opts = dict(storage_options or {})
    if scheme == "file":
        return fsspec.filesystem("file")
    if scheme == "s3":
        endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        if (
            endpoint
            and "endpoint_url" not in opts
            and "endpoint_url" not in opts.get("client_kwargs", {})
        ):
            opts["endpoint_url"] = endpoint
        # Throttling (503 SlowDown): botocore's standard retries wait rand(0, 1) s, then
        # rand(0, 2) s, before s3fs's own retry of SlowDown (per request: 0.1, 0.17, 0.29 ..
        # s) and ours (retry_io: full jitter from 50 ms) — ~3x a clean run's time at 20%
        # throttled requests. Without botocore's, it is within 2x (benchmarks/README.md,
        # bench_throttle.py).
        ck = opts.setdefault("config_kwargs", {})
        ck.setdefault("retries", {"total_max_attempts": 1, "mode": "standard"})
        ck.setdefault("connect_timeout", min(CONNECT_TIMEOUT_S, request_timeout()))
        ck.setdefault("read_timeout", request_timeout())
        opts.setdefault("skip_instance_cache", True)
        # the client is shared by every task of a process (shared_filesystem): never answer
        # info() from a listing another task made before a file changed
        opts.setdefault("use_listings_cache", False)
        fs = fsspec.filesystem("s3", **opts)
        # s3fs's own SlowDown retry waits 0.1, 0.17, 0.29 .. s without jitter; ours (retry_io,
        # per Store call) starts at uniform(0, 50 ms)
        fs.retries = S3FS_TRIES
        return fs
    if scheme in ("gs", "gcs"):
        try:
            import gcsfs  # noqa: F401
        except ImportError:
            raise StoreError("gs:// URLs need gcsfs: pip install 'protoprune[gcs]'") from None
        import aiohttp

        # gcsfs passes this to every aiohttp request; without it a stalled server hangs a call
        opts.setdefault(
            "requests_timeout",
            aiohttp.ClientTimeout(
                total=None,
                sock_connect=min(CONNECT_TIMEOUT_S, request_timeout()),
                sock_read=request_timeout(),
            ),
        )
        opts.setdefault("skip_instance_cache", True)
        opts.setdefault("use_listings_cache", False)
        return fsspec.filesystem("gs", **opts)
    try:
        return fsspec.filesystem(scheme, **opts)
    except (ValueError, ImportError) as e:
        raise StoreError(f"unsupported storage scheme '{scheme}://': {e}") from None


_FS_CACHE: dict[tuple, Any] = {}
_FS_LOCK = threading.Lock()


def shared_filesystem(scheme: str, storage_options: Mapping[str, Any] | None = None):
    """One filesystem client per process for the same scheme, options and AWS/GCP
    environment: Stores arrive pickled in every Ray task, and a new S3 client costs
    ~0.1-0.2 s (seven reduce passes x every shard). Keyed by pid, so a forked child opens
    its own."""
    import json

    prefixes = ("AWS_", "GOOGLE_", "STORAGE_EMULATOR_HOST", TIMEOUT_ENV)
    env = tuple(sorted((k, v) for k, v in os.environ.items() if k.startswith(prefixes)))
    opts = json.dumps(storage_options or {}, sort_keys=True, default=repr)
    key = (os.getpid(), scheme, opts, env)
    with _FS_LOCK:
        fs = _FS_CACHE.get(key)
        if fs is None:
            fs = _FS_CACHE[key] = make_filesystem(scheme, storage_options)
    return fs
