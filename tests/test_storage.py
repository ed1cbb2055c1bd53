"""Store on a local folder and on real S3 and GCS APIs (moto_server, fake-gcs-server on
loopback)."""

from __future__ import annotations

import os
import pickle

import pytest

from scoring.storage import Store, StoreError, split_url


@pytest.fixture(params=["local", "s3", "gs"])
def store(request, tmp_path):
    if request.param == "local":
        return Store(str(tmp_path / "root"))
    server = request.getfixturevalue("s3_server" if request.param == "s3" else "gcs_server")
    return Store(f"{request.param}://{server.new_bucket()}/some/prefix")


def test_put_get_list_exists(store):
    assert not store.exists("a.txt")
    assert store.list() == []
    store.put_bytes("a.txt", b"one")
    store.put_bytes("sub/b.parquet", b"two")
    store.put_bytes("sub/deeper/c.parquet", b"three")
    assert store.exists("a.txt") and store.exists("sub/b.parquet")
    assert store.get_bytes("sub/deeper/c.parquet") == b"three"
    assert store.get_range("sub/deeper/c.parquet", 1, 3) == b"hr"
    assert store.list() == ["a.txt", "sub/b.parquet", "sub/deeper/c.parquet"]
    assert store.list("sub/") == ["sub/b.parquet", "sub/deeper/c.parquet"]
    assert store.list(suffix=".parquet") == ["sub/b.parquet", "sub/deeper/c.parquet"]
    assert store.list("nothing-here/") == []
    details = store.list_details(suffix=".parquet")
    assert [(d["key"], d["size"]) for d in details] == [
        ("sub/b.parquet", 3),
        ("sub/deeper/c.parquet", 5),
    ]
    assert all(d["version"] for d in details)
    store.put_bytes("a.txt", b"replaced")  # a put replaces the whole object
    assert store.get_bytes("a.txt") == b"replaced"
    child = store.child("sub")
    assert child.list() == ["b.parquet", "deeper/c.parquet"]
    assert child.uri("b.parquet") == store.uri("sub/b.parquet")
    store.delete("a.txt")
    assert not store.exists("a.txt")


def test_missing_key_names_the_url(store):
    with pytest.raises(FileNotFoundError, match=r"missing\.json"):
        store.get_bytes("missing.json")


def test_put_if_absent_is_create_only(store):
    assert store.put_if_absent("_commits/x.json", b"first") is True
    assert store.put_if_absent("_commits/x.json", b"second") is False
    assert store.get_bytes("_commits/x.json") == b"first"
    store.put_bytes("y", b"plain")
    assert store.put_if_absent("y", b"other") is False
    assert store.get_bytes("y") == b"plain"


def test_pickling_drops_the_client(store):
    store.put_bytes("k", b"v")
    assert store.exists("k") and store._fs is not None
    clone = pickle.loads(pickle.dumps(store))
    assert clone._fs is None and store._fs is not None
    assert clone.get_bytes("k") == b"v"
    assert clone.url == store.url


def test_s3_conditional_put_reaches_the_server(s3_server):
    """moto honours If-None-Match: *, so Store's S3 path is a real conditional PUT."""
    bucket = s3_server.new_bucket()
    client = s3_server.client()
    client.put_object(Bucket=bucket, Key="k", Body=b"1", IfNoneMatch="*")
    with pytest.raises(client.exceptions.ClientError, match="PreconditionFailed"):
        client.put_object(Bucket=bucket, Key="k", Body=b"2", IfNoneMatch="*")
    store = Store(f"s3://{bucket}")
    assert store.put_if_absent("k", b"3") is False
    assert client.get_object(Bucket=bucket, Key="k")["Body"].read() == b"1"


def test_s3_missing_bucket_is_a_clear_error(s3_server):
    store = Store("s3://pp-no-such-bucket-xyz/out")
    with pytest.raises(StoreError, match="pp-no-such-bucket-xyz"):
        store.check_writable()


def test_local_writes_are_atomic(tmp_path, monkeypatch):
    store = Store(str(tmp_path))
    store.put_bytes("f.bin", b"old")

    def boom(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError):
        store.put_bytes("f.bin", b"new-but-interrupted")
    monkeypatch.undo()
    assert store.get_bytes("f.bin") == b"old"  # readers never see a partial or new file
    # no temp file is visible as a key once a write has succeeded
    store.put_bytes("f.bin", b"new")
    leftovers = [k for k in store.list() if k != "f.bin"]
    assert all(".tmp-" in k for k in leftovers)  # only the interrupted attempt's temp file
    assert store.get_bytes("f.bin") == b"new"


def test_write_parquet_size_and_hash_are_the_bytes_written(store):
    """Local stores encode straight into the temp file and hash on the way; object stores PUT
    the encoded bytes: both report the size and sha256 of exactly the stored object, which is
    pyarrow's encoding of the table."""
    import hashlib

    import pyarrow as pa
    import pyarrow.parquet as pq

    from scoring.storage import parquet_bytes

    t = pa.table({"id": list(range(1000)), "x": [float(i) / 7 for i in range(1000)]})
    size, sha = store.write_parquet("p/t.parquet", t, row_group_size=300)
    data = store.get_bytes("p/t.parquet")
    assert (size, sha) == (len(data), hashlib.sha256(data).hexdigest())
    assert data == parquet_bytes(t, row_group_size=300)
    assert pq.ParquetFile(pa.BufferReader(data)).metadata.num_row_groups == 4
    assert store.list() == ["p/t.parquet"]


def test_failed_local_parquet_write_leaves_the_old_file(tmp_path):
    import pyarrow as pa

    store = Store(str(tmp_path))
    good = pa.table({"a": [1, 2]})
    store.write_parquet("t.parquet", good)
    old = store.get_bytes("t.parquet")
    with pytest.raises(Exception, match="nope"):  # an option pyarrow refuses, mid-encode
        store.write_parquet("t.parquet", good, compression="nope")
    assert store.get_bytes("t.parquet") == old
    assert store.list() == ["t.parquet"]  # the failed attempt's temp file is gone


def test_local_put_if_absent_leaves_no_temp_files(tmp_path):
    store = Store(str(tmp_path))
    assert store.put_if_absent("m.json", b"1")
    assert not store.put_if_absent("m.json", b"2")
    assert store.list() == ["m.json"]


def test_split_url():
    assert split_url("s3://b/p/") == ("s3", "b/p")
    assert split_url("s3a://b") == ("s3", "b")
    assert split_url("gs://b/x") == ("gs", "b/x")
    assert split_url("rel/dir")[0] == "file" and os.path.isabs(split_url("rel/dir")[1])
    assert split_url("file:///tmp/x") == ("file", "/tmp/x")


def test_other_schemes_use_exists_then_put():
    store = Store("memory://pp-test-store")
    assert store.put_if_absent("a/b", b"1") is True
    assert store.put_if_absent("a/b", b"2") is False
    assert store.get_bytes("a/b") == b"1"


def test_single_file_root_is_listed(tmp_path):
    """A Store rooted at one file lists it as key '' (so `--input file.parquet` works)."""
    Store(str(tmp_path)).put_bytes("one.parquet", b"x")
    store = Store(str(tmp_path / "one.parquet"))
    assert store.list(suffix=".parquet") == [""]
    assert [d["key"] for d in store.list_details(suffix=".parquet")] == [""]
    assert store.list(suffix=".json") == []
    assert store.get_bytes("") == b"x"
