"""The score stage reads precomputed embeddings in batches of row groups, each next batch
while the current one is searched (stages.score.embedding_batches): the committed files are
the bytes of a single read, and a bad row's message is the whole shard's."""

from __future__ import annotations

import hashlib
import io

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from helpers import clustered, emb_array

from scoring import layout
from scoring.config import RunConfig
from scoring.errors import BadInput
from scoring.kernels.assign import NearestPrototype, brute_force_nearest
from scoring.kernels.devices import normalize
from scoring.plan import plan_input
from scoring.stages import score
from scoring.storage import Store


def put(store: Store, key: str, table: pa.Table, rg: int) -> None:
    buf = io.BytesIO()
    pq.write_table(table, buf, row_group_size=rg)
    store.put_bytes(key, buf.getvalue())


def score_files(tmp_path, name: str, batch_rows: int, monkeypatch, metric="cosine", **kw):
    """Score every shard of data/ into runs/name with `batch_rows` rows per read batch; the
    sha256 of each committed file, by key."""
    monkeypatch.setattr(score, "BATCH_ROWS", batch_rows)
    ins = Store(str(tmp_path / "data"))
    cfg = RunConfig(
        input=ins.url, output=str(tmp_path / "runs"), run_id=name, k=7, shard_rows=1000,
        metric=metric, **kw,
    )  # fmt: skip
    run = Store(str(tmp_path / "runs" / name))
    cent = clustered(7, 16, 7, seed=9)
    searcher = NearestPrototype(cent, metric)
    for shard in plan_input(cfg, ins).shards:
        score.score_shard(cfg, ins, run, shard, searcher, "p" * 64)
    keys = [k for k in run.list("", suffix=".parquet")]  # markers hold timings: not compared
    return {k: hashlib.sha256(run.get_bytes(k)).hexdigest() for k in keys}


@pytest.mark.parametrize("metric", ["cosine", "l2"])
def test_batches_write_the_bytes_of_one_read(tmp_path, monkeypatch, metric):
    x = clustered(2300, 16, 7, seed=1)
    store = Store(str(tmp_path / "data"))
    t = pa.table({"id": pa.array(np.arange(2300) * 3), "embedding": emb_array(x)})
    put(store, "part-000.parquet", t, rg=97)  # 24 row groups, shards of ~1000 rows
    one = score_files(tmp_path, "one", 1 << 20, monkeypatch, metric, save_embeddings=True)
    many = score_files(tmp_path, "many", 150, monkeypatch, metric, save_embeddings=True)
    assert one.keys() == many.keys()
    assert {k.split("/")[0] for k in one} == {"scores", "ids", "embeddings"}
    assert one == many
    # and the scores are the nearest prototypes (an independent float64 brute force)
    run = Store(str(tmp_path / "runs" / "many"))
    got = pa.concat_tables(
        [run.read_parquet(k) for k in sorted(run.list(layout.SCORES, suffix=".parquet"))]
    ).sort_by("id")
    c, raw = clustered(7, 16, 7, seed=9), x
    if metric == "cosine":  # the reference takes unit rows for cosine
        x, c = normalize(x), normalize(c)
    cl, _ = brute_force_nearest(x, c, metric)
    np.testing.assert_array_equal(got["cluster"].to_numpy(), cl)
    # the saved embeddings: each score file's rows, in its order, as searched (unit rows for
    # cosine), one file per shard, with the score file's row groups
    for key in sorted(run.list(layout.SCORES, suffix=".parquet")):
        sf = pq.ParquetFile(run.path(key))
        ef = pq.ParquetFile(run.path(key.replace(layout.SCORES, layout.EMBEDDINGS, 1)))
        assert ef.metadata.num_row_groups == sf.metadata.num_row_groups
        ids = sf.read(columns=["id"])["id"].to_numpy()
        e = ef.read()
        assert e["id"].to_numpy().tolist() == ids.tolist()
        want = raw[ids // 3].astype(np.float64)  # ids are 3 x the input row
        if metric == "cosine":
            want /= np.linalg.norm(want, axis=1, keepdims=True)
        got_x = np.stack(e["embedding"].to_numpy(zero_copy_only=False))
        np.testing.assert_allclose(got_x, want, rtol=1e-6, atol=1e-7)


def test_sorted_rows_is_one_normalised_gather():
    """score.sorted_rows scatters batches into one array: the bytes of normalising the whole
    shard, then taking it in order (the embeddings file's contract)."""
    rng = np.random.default_rng(3)
    parts = [rng.normal(size=(n, 12)).astype(np.float32) * 5 for n in (7, 1, 30, 0, 12)]
    parts[2][4] = 0  # a zero row stays zero
    order = rng.permutation(50)
    whole = np.concatenate(parts)
    for unit in (True, False):
        got = score.sorted_rows(parts, order, unit)
        want = (normalize(whole) if unit else whole)[order]
        assert got.dtype == np.float32 and got.tobytes() == want.tobytes()


def test_row_group_batches():
    class Md:
        def row_group(self, g):
            return type("R", (), {"num_rows": [5, 5, 0, 7, 1, 9][g]})

    pf = type("P", (), {"metadata": Md()})
    assert score.row_group_batches(pf, [0, 1, 2, 3, 4, 5], 10) == [[0, 1], [2, 3, 4, 5]]
    assert score.row_group_batches(pf, [0, 1, 2, 3, 4, 5], 6) == [[0, 1], [2, 3], [4, 5]]
    assert score.row_group_batches(pf, [3], 100) == [[3]]
    assert score.row_group_batches(pf, [], 10) == [[]]


def one_shard_error(tmp_path, monkeypatch, table: pa.Table) -> str:
    monkeypatch.setattr(score, "BATCH_ROWS", 10)
    store = Store(str(tmp_path / "data"))
    put(store, "part-000.parquet", table, rg=10)
    cfg = RunConfig(input=store.url, output=str(tmp_path / "runs"), run_id="r", k=2)
    shard = plan_input(cfg, store).shards[0]
    with pytest.raises(BadInput) as e:
        list(score.embedding_batches(cfg, store, shard))
    return str(e.value)


def test_errors_name_the_whole_shard(tmp_path, monkeypatch):
    x = clustered(60, 4, 2)
    ids = pa.array(np.arange(60))
    # nulls in two batches: the shard's count
    emb = emb_array(x)
    mask = np.zeros(60, bool)
    mask[[15, 16, 45]] = True
    nulls = pa.FixedSizeListArray.from_arrays(emb.flatten(), 4, mask=pa.array(mask))
    msg = one_shard_error(tmp_path / "a", monkeypatch, pa.table({"id": ids, "embedding": nulls}))
    assert "has 3 null embedding(s)" in msg and "part-000.parquet (shard 0)" in msg
    # rows of another width in a later batch: the shard's row number
    rows = [list(map(float, r)) for r in x]
    rows[47] = rows[47][:3]
    msg = one_shard_error(
        tmp_path / "b", monkeypatch, pa.table({"id": ids, "embedding": pa.array(rows)})
    )
    assert "rows of different widths (4 and 3 at row 47)" in msg
    # a whole later batch of another width
    rows = [list(map(float, r)) for r in x[:30]] + [list(map(float, r[:3])) for r in x[30:]]
    msg = one_shard_error(
        tmp_path / "c", monkeypatch, pa.table({"id": ids, "embedding": pa.array(rows)})
    )
    assert "rows of different widths (4 and 3 at row 30)" in msg
    # NaN in two batches: the first row's id
    y = x.copy()
    y[[33, 52], 1] = np.nan
    msg = one_shard_error(
        tmp_path / "d", monkeypatch, pa.table({"id": ids, "embedding": emb_array(y)})
    )
    assert "NaN or inf in the embedding of id 33" in msg
