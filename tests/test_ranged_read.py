"""Remote Parquet reads: a shard's column chunks are fetched as a few large ranged GETs
(scoring.ranged.RangedFile) and decoded exactly as pyarrow decodes the whole local file."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from scoring import ranged as ranged_module
from scoring.inputs.parquet import Shard, column_chunk_spans, read_shard
from scoring.ranged import RangedFile, merge_ranges
from scoring.storage import Store


def test_merge_ranges_merges_close_spans_and_cuts_parts():
    assert merge_ranges([(50, 60), (0, 10), (12, 20), (5, 8), (30, 30)], gap=2, part=100) == [
        (0, 20),
        (50, 60),
    ]
    assert merge_ranges([(0, 10), (15, 20)], gap=5, part=100) == [(0, 20)]
    assert merge_ranges([(0, 10), (16, 20)], gap=5, part=100) == [(0, 10), (16, 20)]
    assert merge_ranges([(0, 25)], gap=0, part=10) == [(0, 10), (10, 20), (20, 25)]
    assert merge_ranges([], gap=0, part=10) == []


def rich_table(n: int, seed: int = 0) -> pa.Table:
    rng = np.random.default_rng(seed)
    words = np.array(["alpha", "beta", "gamma", "delta"])
    emb = rng.standard_normal((n, 6)).astype(np.float32)
    return pa.table(
        {
            "id": pa.array(np.arange(n, dtype=np.int64) * 7),
            "word": pa.array(words[rng.integers(0, 4, n)]),  # dictionary-encoded pages
            "embedding": pa.array(list(emb), pa.list_(pa.float32())),
            "fixed": pa.FixedSizeListArray.from_arrays(pa.array(emb.reshape(-1)), 6),
            "img": pa.array(
                [{"bytes": bytes([i % 256]) * (i % 5), "path": None} for i in range(n)],
                pa.struct([("bytes", pa.binary()), ("path", pa.string())]),
            ),
            "a": pa.array(rng.random(n)),
            "a.b": pa.array([None if i % 3 else float(i) for i in range(n)]),
        }
    )


@pytest.mark.parametrize("compression", ["snappy", "zstd", "none"])
def test_s3_shard_read_equals_local_read(s3_server, tmp_path, monkeypatch, compression):
    table = rich_table(20_000, seed=len(compression))
    local = tmp_path / "f.parquet"
    pq.write_table(table, local, row_group_size=2500, compression=compression)
    bucket = s3_server.new_bucket()
    s3_server.client().put_object(Bucket=bucket, Key="in/f.parquet", Body=local.read_bytes())
    store = Store(f"s3://{bucket}/in")
    calls = []
    real = Store.get_ranges

    def counting(self, key, ranges):
        calls.append(list(ranges))
        return real(self, key, ranges)

    monkeypatch.setattr(Store, "get_ranges", counting)
    ref_pf = pq.ParquetFile(local)
    cases = [
        ((0, 1, 2, 3, 4, 5, 6, 7), ["id", "fixed"]),
        ((2, 5, 6), ["id", "word", "embedding"]),  # non-contiguous row groups
        ((7,), ["img", "a"]),
        ((1, 3), ["a.b", "id"]),  # a dotted name (and its prefix 'a' is not read)
        ((0, 4), list(table.column_names)),
    ]
    for part_bytes in (ranged_module.RANGE_PART_BYTES, 20_000):  # one GET; many contiguous parts
        monkeypatch.setattr(ranged_module, "RANGE_PART_BYTES", part_bytes)
        for row_groups, cols in cases:
            calls.clear()
            sh = Shard(index=0, file="f.parquet", row_groups=row_groups, rows=0, row_offset=0)
            pf = store.parquet_file(sh.file)
            ranged = pf.ranged_file
            got = read_shard(store, sh, cols, pf)
            want = ref_pf.read_row_groups(list(row_groups), columns=cols)
            assert got.equals(want), (row_groups, cols, part_bytes)
            assert ranged.fetches == 0  # every byte pyarrow read came from the prefetch
            assert len(calls) == 2  # the footer tail, then the column chunks
            if part_bytes > 1 << 20:
                gaps = len(merge_ranges(column_chunk_spans(ref_pf.metadata, row_groups, cols)))
                # one GET per merged span (those inside the footer tail already held)
                assert len(calls[1]) <= gaps <= len(row_groups) * len(cols)


def test_ranged_file_fetches_what_was_not_prefetched(s3_server):
    data = bytes(range(256)) * 400
    bucket = s3_server.new_bucket()
    s3_server.client().put_object(Bucket=bucket, Key="blob", Body=data)
    f = RangedFile(Store(f"s3://{bucket}"), "blob", len(data))
    f.prefetch([(100, 200), (200, 300), (5000, 5100)])
    f.seek(150)
    assert bytes(f.read(100)) == data[150:250] and f.fetches == 0
    f.seek(5050)
    assert bytes(f.read(100)) == data[5050:5150] and f.fetches == 1  # beyond the part
    f.seek(-10, 2)
    assert bytes(f.read()) == data[-10:] and f.fetches == 1  # the footer tail is prefetched
    assert f.read(5) == b""
    buf = bytearray(20)
    f.seek(110)
    assert f.readinto(buf) == 20 and bytes(buf) == data[110:130]
