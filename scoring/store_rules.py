"""The Store's rules for bounded requests and create-only puts (scoring.storage uses them).

- Every object-store request is bounded: a connect timeout, a read timeout per socket read
  (`request_timeout()`), and for a call of known size a deadline on the whole call of
  request_timeout() + bytes / MIN_RATE (a whole object of unknown size: as if 1 GiB; a
  listing: LISTING_REQUESTS base deadlines); a call is tried IO_ATTEMPTS times on transient
  errors.
- A conditional PUT's refusal is decided by the error response's code or HTTP status, never by
  its message, which may hold any number (a port, a key).
"""

from __future__ import annotations

import os

from scoring.errors import StoreError

IO_ATTEMPTS = 6  # tries of one Store call on transient errors (retry_io)
CONNECT_TIMEOUT_S = 10.0
TIMEOUT_ENV = "PROTOPRUNE_REQUEST_TIMEOUT_S"  # read timeout and base deadline (default 60 s)
MIN_RATE = 1 << 20  # bytes/s a transfer is allowed as its slowest, on top of the base deadline
UNSIZED_BYTES = 1 << 30  # a whole-object read of unknown size gets the deadline of 1 GiB
LISTING_REQUESTS = 20  # a listing's deadline: this many base deadlines (its pages, its probes)


def request_timeout() -> float:
    """Seconds a request may go without an answer (per socket read; the base deadline)."""
    raw = os.environ.get(TIMEOUT_ENV)
    try:
        value = float(raw) if raw else 60.0
    except ValueError:
        raise StoreError(f"{TIMEOUT_ENV}={raw!r}: expected seconds") from None
    if value <= 0:
        raise StoreError(f"{TIMEOUT_ENV}={raw!r}: expected seconds > 0")
    return value


# Error codes of a conditional PUT (If-None-Match: *) that was refused because the key exists,
# or because the server has no conditional writes (S3-compatible servers).
_EXISTS_CODES = {"PreconditionFailed", "ConditionalRequestConflict"}
_UNSUPPORTED_CODES = {"NotImplemented"}


def create_only_outcome(exc: BaseException) -> str | None:
    """'exists', 'unsupported' or None (any other error) for an error of a conditional PUT,
    decided by the botocore error response's code, else its HTTP status: never by the
    message, which may hold any number (a port, a key)."""
    response = getattr(exc, "response", None)
    if not isinstance(response, dict):
        return None
    code = str((response.get("Error") or {}).get("Code") or "")
    status = (response.get("ResponseMetadata") or {}).get("HTTPStatusCode")
    bare = code in ("", str(status))  # an error response without a code of its own
    if code in _EXISTS_CODES or (bare and status == 412):
        return "exists"
    if code in _UNSUPPORTED_CODES or (bare and status == 501):
        return "unsupported"
    return None
