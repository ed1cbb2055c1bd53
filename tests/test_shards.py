"""Shard planning over files with uneven and empty row groups, and a file with zero rows."""

from __future__ import annotations

import io

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from scoring.inputs.parquet import (
    Shard,
    embedding_matrix,
    plan_from_row_groups,
    plan_shards,
    read_shard,
)
from scoring.storage import Store
from tests.helpers import emb_array

# rows per row group of each file; 0 = an empty row group
LAYOUT = {
    "a.parquet": [7, 3, 0, 12, 1, 1, 5],
    "b/c.parquet": [0, 0, 4],
    "b/empty.parquet": [],  # a file with zero rows
    "d.parquet": [20, 0, 0, 2, 9],
}


def write_layout(store: Store) -> dict[str, list[int]]:
    next_id = 0
    for key, groups in LAYOUT.items():
        schema = pa.schema([("id", pa.int64()), ("embedding", pa.list_(pa.float32(), 4))])
        buf = io.BytesIO()
        with pq.ParquetWriter(buf, schema) as w:
            if not groups:
                w.write_table(schema.empty_table())
            for g in groups:
                ids = np.arange(next_id, next_id + g, dtype=np.int64)
                x = np.repeat(ids[:, None].astype(np.float32), 4, axis=1)
                w.write_table(pa.table({"id": ids, "embedding": emb_array(x)}, schema=schema))
                next_id += g
        store.put_bytes(key, buf.getvalue())
    return LAYOUT


def footers(store: Store) -> dict[str, list[int]]:
    out = {}
    for key in store.list(suffix=".parquet"):
        md = store.parquet_file(key).metadata
        out[key] = [md.row_group(i).num_rows for i in range(md.num_row_groups)]
    return out


@pytest.mark.parametrize("shard_rows", [1, 5, 10, 13, 1000])
def test_plan_is_aligned_per_file_and_covers_every_row_once(tmp_path, shard_rows):
    store = Store(str(tmp_path))
    write_layout(store)
    rg = footers(store)
    files, shards, schemas = plan_shards(store, shard_rows)
    assert [f["key"] for f in files] == sorted(LAYOUT)  # sorted keys, deterministic
    assert set(schemas) == set(LAYOUT)
    assert [s.index for s in shards] == list(range(len(shards)))
    # files in key order, row groups in order, contiguous
    order = [(sorted(LAYOUT).index(s.file), s.row_groups[0]) for s in shards]
    assert order == sorted(order)
    offset = 0
    by_file: dict[str, list[Shard]] = {}
    for s in shards:
        groups = rg[s.file]
        assert s.row_groups == tuple(range(s.row_groups[0], s.row_groups[-1] + 1))
        assert s.row_groups[-1] < len(groups)
        assert s.rows == sum(groups[g] for g in s.row_groups) > 0
        # closes as soon as it reaches shard_rows: without its last group it is short
        assert s.rows - groups[s.row_groups[-1]] < shard_rows
        assert s.row_offset == offset
        offset += s.rows
        by_file.setdefault(s.file, []).append(s)
        assert Shard.from_json(s.to_json()) == s
    assert "b/empty.parquet" not in by_file
    for key, ss in by_file.items():
        # all but the last shard of a file reach shard_rows
        assert all(s.rows >= shard_rows for s in ss[:-1])
        # every non-empty row group belongs to exactly one shard of its file
        covered = [g for s in ss for g in s.row_groups if rg[key][g] > 0]
        assert covered == [g for g, n in enumerate(rg[key]) if n > 0]
    # reading the shards gives every row exactly once, in input order
    ids = []
    for s in shards:
        t = read_shard(store, s, ["id"])
        assert t.num_rows == s.rows
        ids.extend(t["id"].to_pylist())
    assert ids == list(range(sum(sum(g) for g in LAYOUT.values())))
    # deterministic: a second plan is identical
    assert plan_shards(store, shard_rows)[1] == shards


def test_plan_from_row_groups_examples():
    got = plan_from_row_groups([("x", [3, 0, 3, 3]), ("y", [0]), ("z", [10, 1])], 5)
    assert [(s.file, s.row_groups, s.rows, s.row_offset) for s in got] == [
        ("x", (0, 1, 2), 6, 0),
        ("x", (3,), 3, 6),
        ("z", (0,), 10, 9),
        ("z", (1,), 1, 19),
    ]


def test_no_parquet_files_is_an_error(tmp_path):
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(ValueError, match="no .parquet files"):
        plan_shards(Store(str(tmp_path)), 10)


@pytest.mark.parametrize("kind", ["fixed", "list", "large"])
@pytest.mark.parametrize("dtype", [pa.float16(), pa.float32(), pa.float64()])
def test_embedding_matrix_types(kind, dtype):
    x = np.arange(24, dtype=np.float32).reshape(6, 4) / 8
    col = emb_array(x, kind, dtype)
    got = embedding_matrix(pa.chunked_array([col.slice(0, 2), col.slice(2)]), "f", "embedding")
    assert got.dtype == np.float32 and got.shape == (6, 4)
    np.testing.assert_array_equal(got, x)
    np.testing.assert_array_equal(embedding_matrix(col.slice(3), "f", "e"), x[3:])


def test_embedding_matrix_errors_name_the_column():
    with pytest.raises(ValueError, match="f: column 'emb'.*different widths"):
        embedding_matrix(pa.array([[1.0, 2.0], [1.0]]), "f", "emb")
    with pytest.raises(ValueError, match="column 'emb'.*list of floats"):
        embedding_matrix(pa.array(["a"]), "f", "emb")
    with pytest.raises(ValueError, match="column 'emb'.*null"):
        embedding_matrix(pa.array([[1.0], None]), "f", "emb")


def test_single_file_input(tmp_path):
    store = Store(str(tmp_path))
    write_layout(store)
    one = Store(str(tmp_path / "a.parquet"))
    _, shards, _ = plan_shards(one, 10)
    assert {s.file for s in shards} == {""}
    assert sum(s.rows for s in shards) == sum(LAYOUT["a.parquet"])
    assert read_shard(one, shards[0], ["id"])["id"].to_pylist()[:3] == [0, 1, 2]


@pytest.mark.parametrize("n,tasks", [(0, 4), (1, 4), (5, 8), (10, 4), (1001, 16)])
def test_shard_groups_cover_each_shard_once(n, tasks):
    from scoring.stages.stats import shard_groups

    idx = list(range(100, 100 + n))
    groups = shard_groups(idx, tasks)
    assert [i for g in groups for i in g] == idx  # contiguous, in order, each once
    assert len(groups) == min(n, tasks) and all(groups)
    if groups:
        sizes = [len(g) for g in groups]
        assert max(sizes) - min(sizes) <= 1
