"""Retries of transient IO only: bounded, exponential backoff with full jitter."""

from __future__ import annotations

import errno
import logging
import random
import time
from collections.abc import Callable
from typing import TypeVar

from scoring.errors import StoreError, first_line

log = logging.getLogger("scoring.storage")
T = TypeVar("T")

_PERMANENT_ERRNOS = {
    errno.ENOENT,
    errno.EACCES,
    errno.EPERM,
    errno.EISDIR,
    errno.ENOTDIR,
    errno.EEXIST,
    errno.EROFS,
    errno.ENOSPC,
}


def is_transient(exc: BaseException) -> bool:
    """True for errors worth retrying: throttling, 5xx, timeouts, dropped connections."""
    if isinstance(
        exc,
        (
            FileNotFoundError,
            PermissionError,
            IsADirectoryError,
            NotADirectoryError,
            FileExistsError,
            StoreError,
        ),
    ):
        return False
    text = f"{type(exc).__name__} {exc}"
    markers = (
        "SlowDown",
        "Throttl",
        "RequestTimeout",
        "InternalError",
        "ServiceUnavailable",
        "503",
        "500 ",
        "502",
        "504",
        "Connection reset",
        "ConnectionReset",
        "ConnectionError",
        "ClientConnector",
        "ServerDisconnected",
        "ReadTimeout",
        "timed out",
        "Timeout",
        "IncompleteRead",
        "Broken pipe",
        "EndpointConnection",
        "ResponseStreamingError",
        "RemoteDisconnected",
        "ClientPayloadError",
        # s3fs turns botocore errors into OSError(errno, message): 503 SlowDown arrives as
        # OSError(EBUSY, 'Please reduce your request rate.') or 'Service Unavailable'.
        "reduce your request rate",
        "Service Unavailable",
        "Internal Server Error",
        "Bad Gateway",
        "Gateway Timeout",
    )
    if any(m in text for m in markers):
        return True
    if isinstance(exc, (ConnectionError, TimeoutError)):
        return True
    if isinstance(exc, OSError) and exc.errno is not None:
        return exc.errno not in _PERMANENT_ERRNOS and exc.errno in {
            errno.ECONNRESET,
            errno.ECONNREFUSED,
            errno.ETIMEDOUT,
            errno.EPIPE,
            errno.EAGAIN,
            errno.EBUSY,  # s3fs: SlowDown / throttling
        }
    return False


def retry_io(
    fn: Callable[[], T], what: str, attempts: int = 6, base: float = 0.05, cap: float = 10.0
) -> T:
    """Call fn, retrying transient IO errors with exponential backoff and full jitter:
    delay uniform(0, min(cap, base * 2**attempt)), short first delays as S3's guidance for
    503 SlowDown asks (a throttled request usually succeeds on its next try)."""
    for attempt in range(attempts):
        try:
            return fn()
        except Exception as exc:  # noqa: BLE001 - classified below
            if not is_transient(exc) or attempt == attempts - 1:
                raise
            delay = random.uniform(0, min(cap, base * 2**attempt))
            log.warning(
                "transient error on %s (%s); retry %d in %.2fs",
                what,
                first_line(exc, 200),
                attempt + 1,
                delay,
            )
            time.sleep(delay)
    raise AssertionError("unreachable")
