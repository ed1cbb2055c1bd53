"""Create-only puts on S3 are decided by the error's code or HTTP status, never by its text:
a real moto_server behind a loopback proxy that answers conditional PUTs with chosen errors."""

from __future__ import annotations

import pytest

from scoring.errors import StoreError
from scoring.storage import Store
from tests.s3proxy import FaultProxy, error_xml

# numbers the old text matching took for "exists" (412) and "no conditional PUT" (501)
NUMBERS = "shard-000412 on port 41207, policy 501"


def proxied(server, **kw):
    proxy = FaultProxy(server.endpoint, lifetime=120, **kw)
    opts = {"endpoint_url": proxy.endpoint, "config_kwargs": {"retries": {"max_attempts": 1}}}
    return proxy, opts


def test_real_precondition_failed_means_exists(s3_server):
    store = Store(f"s3://{s3_server.new_bucket()}/p")
    assert store.put_if_absent("_commits/shard-000412.json", b"1") is True
    assert store.put_if_absent("_commits/shard-000412.json", b"2") is False
    assert store.get_bytes("_commits/shard-000412.json") == b"1"


@pytest.mark.parametrize(
    "status,body",
    [
        (501, error_xml("NotImplemented", "A header you provided implies functionality")),
        (501, b""),  # no error body at all: the HTTP status decides
    ],
)
def test_no_conditional_put_falls_back_to_exists_then_put(s3_server, status, body):
    bucket = s3_server.new_bucket()
    proxy, opts = proxied(s3_server, conditional_error=(status, body))
    try:
        store = Store(f"s3://{bucket}/p", opts)
        assert store.put_if_absent("m", b"1") is True
        assert store.put_if_absent("m", b"2") is False
        assert store.get_bytes("m") == b"1"
    finally:
        proxy.stop()


@pytest.mark.parametrize(
    "status,body",
    [
        (412, error_xml("PreconditionFailed", "At least one of the pre-conditions failed")),
        (409, error_xml("ConditionalRequestConflict", "A conflicting operation is in progress")),
        (412, b""),
    ],
)
def test_exists_codes_and_status(s3_server, status, body):
    bucket = s3_server.new_bucket()
    proxy, opts = proxied(s3_server, conditional_error=(status, body))
    try:
        store = Store(f"s3://{bucket}/p", opts)
        assert store.put_if_absent("m", b"1") is False
        assert s3_server.client().list_objects_v2(Bucket=bucket).get("KeyCount") == 0
    finally:
        proxy.stop()


@pytest.mark.parametrize(
    "status,body",
    [
        (400, error_xml("InvalidRequest", f"bad request for {NUMBERS}")),
        (400, error_xml("", f"412 501 {NUMBERS}")),
        (409, error_xml("OperationAborted", f"conflict on {NUMBERS}")),
    ],
)
def test_unrelated_error_whose_text_holds_412_or_501_is_raised(s3_server, status, body):
    bucket = s3_server.new_bucket()
    proxy, opts = proxied(s3_server, conditional_error=(status, body))
    try:
        store = Store(f"s3://{bucket}/p", opts)
        with pytest.raises(OSError) as info:
            store.put_if_absent("_commits/shard-000412.json", b"1")
        assert not isinstance(info.value, FileExistsError)
        # nothing was written by a fallback put
        assert s3_server.client().list_objects_v2(Bucket=bucket).get("KeyCount") == 0
    finally:
        proxy.stop()


def test_access_denied_whose_text_holds_412_and_501_is_a_store_error(s3_server):
    bucket = s3_server.new_bucket()
    denied = error_xml("AccessDenied", f"Access Denied for {NUMBERS}")
    proxy, opts = proxied(s3_server, deny_buckets=(bucket,), deny_body=denied)
    try:
        store = Store(f"s3://{bucket}/p", opts)
        with pytest.raises(StoreError, match=r"access denied") as info:
            store.put_if_absent("_commits/shard-000412.json", b"1")
        assert "\n" not in str(info.value) and bucket in str(info.value)
    finally:
        proxy.stop()
