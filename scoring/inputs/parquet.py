"""Parquet input: discovery, shard planning from the footers, schema checks, shard reads.

A shard is a contiguous run of row groups of one file, about `shard_rows` rows: the unit of work,
commit and retry. The plan is a pure function of the sorted file list and their footers, so every
run over the same input gets the same shards in the same order.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np

from scoring.errors import BadInput
from scoring.storage import Store


@dataclass(frozen=True)
class Shard:
    index: int
    file: str  # key relative to the input root ("" when the input is a single file)
    row_groups: tuple[int, ...]
    rows: int
    row_offset: int  # global index of the shard's first row (deterministic sampling)

    def to_json(self) -> dict[str, Any]:
        # built by hand: dataclasses.asdict deep-copies and took ~0.2 ms per shard, 20 s of
        # driver time for a 100,000-shard run.json
        rg = self.row_groups
        return {
            "index": self.index,
            "file": self.file,
            "row_groups": [rg[0], rg[-1] + 1] if rg else [],
            "rows": self.rows,
            "row_offset": self.row_offset,
        }

    @staticmethod
    def from_json(d: dict[str, Any]) -> Shard:
        a, b = d["row_groups"] if d["row_groups"] else (0, 0)
        return Shard(d["index"], d["file"], tuple(range(a, b)), d["rows"], d["row_offset"])

    @property
    def name(self) -> str:
        from scoring.layout import shard_name

        return shard_name(self.index)


def list_input(store: Store) -> list[dict[str, Any]]:
    """The input's Parquet files with size and version (etag or mtime), sorted by key."""
    files = [
        f
        for f in store.list_details("", suffix=".parquet")
        if not any(part.startswith((".", "_")) for part in f["key"].split("/"))
    ]
    if not files:
        raise BadInput(f"input {store.uri()}: no .parquet files found")
    return files


def _footer(store: Store, key: str) -> tuple[str, list[int], Any]:
    pf = store.parquet_file(key)
    md = pf.metadata
    return key, [md.row_group(i).num_rows for i in range(md.num_row_groups)], pf.schema_arrow


def read_footers(store: Store, keys: list[str], threads: int = 16):
    """(key, [rows per row group], arrow schema) for each key, in key order, read in parallel."""
    with ThreadPoolExecutor(max_workers=max(1, min(threads, len(keys)))) as ex:
        return list(ex.map(lambda k: _footer(store, k), keys))


def plan_from_row_groups(files: list[tuple[str, list[int]]], shard_rows: int) -> list[Shard]:
    """Cut each file's row groups into consecutive shards of about shard_rows rows.

    A shard closes as soon as it reaches shard_rows; shards never span files; empty row groups
    are skipped; files with no rows give no shard.
    """
    shards: list[Shard] = []
    offset = 0
    for key, rg_rows in files:
        cur: list[int] = []
        cur_rows = 0
        for i, n in enumerate(rg_rows):
            if n == 0:
                continue
            cur.append(i)
            cur_rows += n
            if cur_rows >= shard_rows:
                shards.append(
                    Shard(len(shards), key, tuple(range(cur[0], cur[-1] + 1)), cur_rows, offset)
                )
                offset += cur_rows
                cur, cur_rows = [], 0
        if cur:
            shards.append(
                Shard(len(shards), key, tuple(range(cur[0], cur[-1] + 1)), cur_rows, offset)
            )
            offset += cur_rows
    return shards


def plan_shards(store: Store, shard_rows: int, files: list[dict[str, Any]] | None = None):
    """Plan shards for the input root: returns (files, shards, schemas by key)."""
    return plan_groups(store, shard_rows, files)[:3]


def plan_groups(store: Store, shard_rows: int, files: list[dict[str, Any]] | None = None):
    """`plan_shards` plus the rows of every row group, one list per file in planning order:
    returns (files, shards, schemas by key, [(key, [rows per row group])])."""
    files = files if files is not None else list_input(store)
    footers = read_footers(store, [f["key"] for f in files])
    groups = [(k, rg) for k, rg, _ in footers]
    shards = plan_from_row_groups(groups, shard_rows)
    return files, shards, {k: s for k, _, s in footers}, groups


def read_shard(store: Store, shard: Shard, columns: list[str], pf=None):
    """The shard's rows (its row groups) for the given columns, as a pyarrow Table.

    `pf`: the file's already opened ParquetFile (its footer read once), closed here."""
    pf = pf if pf is not None else store.parquet_file(shard.file)
    try:
        return read_groups(pf, shard.row_groups, columns)
    finally:
        close_file(pf)


def close_file(pf) -> None:
    """Close a `Store.parquet_file` (and drop an object store's fetched bytes)."""
    try:
        pf.reader.close()
    except Exception:  # noqa: BLE001
        pass
    if getattr(pf, "ranged_file", None) is not None:
        pf.ranged_file.close()


def check_ids(ids, where: str, column: str) -> None:
    """A one-line error when the id column has nulls (their count)."""
    if ids.null_count:
        raise BadInput(f"{where}: column '{column}' has {ids.null_count} null id(s)")


def check_columns(pf, columns: list[str], where: str) -> None:
    """A one-line error naming the first of `columns` the file does not have."""
    names = pf.schema_arrow.names
    for c in columns:
        if c not in names:
            raise BadInput(f"{where}: column '{c}' not found (columns: {', '.join(names)})")


def read_shard_columns(store: Store, shard: Shard, columns: list[str], where: str, pf=None):
    """The shard's columns (each checked to exist); `pf`: its opened ParquetFile, if any."""
    pf = pf if pf is not None else store.parquet_file(shard.file)
    check_columns(pf, columns, where)
    return read_shard(store, shard, columns, pf)


def row_group_batches(pf, row_groups, rows: int) -> list[list[int]]:
    """`row_groups` in order, cut into runs of whole row groups of at least `rows` rows (the
    last may hold fewer); at least one run."""
    out: list[list[int]] = [[]]
    n = 0
    for g in row_groups:
        if n >= rows:
            out.append([])
            n = 0
        out[-1].append(g)
        n += pf.metadata.row_group(g).num_rows
    return out


def prefetch_groups(pf, row_groups, columns: list[str] | None = None) -> None:
    """On an object store (a `Store.parquet_file` over a RangedFile), fetch these row groups'
    column chunks now, as a few large concurrent requests: pyarrow would otherwise ask for
    them one column chunk at a time. Nothing to do for local files (memory-mapped)."""
    ranged = getattr(pf, "ranged_file", None)
    if ranged is not None:
        cols = columns if columns is not None else pf.schema_arrow.names
        ranged.prefetch(column_chunk_spans(pf.metadata, row_groups, cols))


def read_groups(pf, row_groups, columns: list[str] | None = None):
    """`pf.read_row_groups`, its bytes fetched first by `prefetch_groups`."""
    prefetch_groups(pf, row_groups, columns)
    return pf.read_row_groups(list(row_groups), columns=columns)


def column_chunk_spans(md, row_groups, columns: list[str]) -> list[tuple[int, int]]:
    """[start, end) byte spans of the named top-level columns' chunks in these row groups
    (a superset when a column name has dots; a missed byte is fetched on demand anyway)."""
    spans = []
    for g in row_groups:
        rg = md.row_group(g)
        for c in range(rg.num_columns):
            cc = rg.column(c)
            path = cc.path_in_schema
            if not any(path == n or path.startswith(n + ".") for n in columns):
                continue
            start = cc.data_page_offset
            if cc.has_dictionary_page and 0 < (cc.dictionary_page_offset or 0) < start:
                start = cc.dictionary_page_offset
            # + 100 bytes: old parquet-mr files under-report the size by the dictionary
            # header (pyarrow pads its own reads the same way)
            spans.append((start, start + cc.total_compressed_size + 100))
    return spans


def embedding_matrix(column, where: str, name: str) -> np.ndarray:
    """A (rows, d) float32 matrix from a list / large_list / fixed_size_list<float> column.

    Raises ValueError naming `where` (file or shard) and the column for non-numeric lists,
    nulls, and rows of different widths.
    """
    import pyarrow as pa
    import pyarrow.compute as pc

    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks() if column.num_chunks != 1 else column.chunk(0)
    t = column.type
    if not (pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t)):
        raise BadInput(f"{where}: column '{name}' must be a list of floats, found {t}")
    vt = t.value_type
    if not (pa.types.is_floating(vt) or pa.types.is_integer(vt)):
        raise BadInput(f"{where}: column '{name}' must be a list of floats, found {t}")
    n = len(column)
    if column.null_count:
        raise BadInput(f"{where}: column '{name}' has {column.null_count} null embedding(s)")
    if n == 0:
        return np.zeros((0, t.list_size if pa.types.is_fixed_size_list(t) else 0), np.float32)
    if pa.types.is_fixed_size_list(t):
        d = t.list_size
        values = column.flatten()
    else:
        offsets = column.offsets.to_numpy()
        lengths = np.diff(offsets)
        d = int(lengths[0])
        if not (lengths == d).all():
            bad = int(np.nonzero(lengths != d)[0][0])
            raise BadInput(
                f"{where}: column '{name}' has rows of different widths "
                f"({d} and {int(lengths[bad])} at row {bad})"
            )
        values = column.flatten()
    if values.null_count:
        raise BadInput(f"{where}: column '{name}' has null values inside embeddings")
    if values.type != pa.float32():
        values = pc.cast(values, pa.float32())
    return values.to_numpy(zero_copy_only=False).reshape(n, d)


# -- schema checks (footers only, before any work starts) ---------------------------------------
def _is_id_type(t) -> bool:
    import pyarrow as pa

    return (
        pa.types.is_integer(t)
        or pa.types.is_string(t)
        or pa.types.is_large_string(t)
        or pa.types.is_binary(t)
        or pa.types.is_large_binary(t)
    )


def check_schemas(
    store: Store, schemas: dict[str, Any], id_col: str, columns: list[str], emb_col: str | None
) -> None:
    """Fail fast, from the footers only: missing columns, ids that are not integers or strings,
    id types that differ across files (the reducer compares ids of all shards), embedding
    columns that are not lists of numbers, fixed widths that differ across files
    (variable-width lists are checked when read). `emb_col` is None for raw text/image input
    (the model gives the embeddings)."""
    import pyarrow as pa

    widths: dict[int, str] = {}
    first_id: tuple[str, Any] | None = None
    for key, schema in schemas.items():
        for col in columns:
            if col not in schema.names:
                raise BadInput(
                    f"{store.uri(key)}: column '{col}' not found "
                    f"(columns: {', '.join(schema.names)})"
                )
    for key, schema in schemas.items():
        where = store.uri(key)
        it = schema.field(id_col).type
        if not _is_id_type(it):
            raise BadInput(
                f"{where}: column '{id_col}' must hold integer or string ids, found {it}"
            )
        if emb_col is None:
            continue
        et = schema.field(emb_col).type
        is_list = pa.types.is_list(et) or pa.types.is_large_list(et)
        if not (is_list or pa.types.is_fixed_size_list(et)) or not (
            pa.types.is_floating(et.value_type) or pa.types.is_integer(et.value_type)
        ):
            raise BadInput(
                f"{where}: column '{emb_col}' must be a list of numbers (embeddings), found {et}"
            )
        if pa.types.is_fixed_size_list(et):
            widths.setdefault(et.list_size, where)
            if len(widths) > 1:
                (w1, f1), (w2, f2) = list(widths.items())[:2]
                raise BadInput(
                    f"column '{emb_col}' has mixed embedding widths across files: "
                    f"{w1} in {f1}, {w2} in {f2}"
                )
    for key, schema in sorted(schemas.items()):
        typ = schema.field(id_col).type
        if first_id is None:
            first_id = (key, typ)
        elif typ != first_id[1]:
            raise BadInput(
                f"{store.uri(key)}: column '{id_col}' is {typ}, but {first_id[1]} in "
                f"{store.uri(first_id[0])}; all files need the same id type"
            )


def fixed_width(schemas, column: str) -> int | None:
    """The embedding width when every file stores it as fixed_size_list<float>[d], else None."""
    import pyarrow as pa

    widths = set()
    for sc in schemas:
        if column not in sc.names:
            return None
        t = sc.field(column).type
        if not pa.types.is_fixed_size_list(t):
            return None
        widths.add(t.list_size)
    return widths.pop() if len(widths) == 1 else None


def groups_matching(pf, column: str, may_hold) -> list[int]:
    """Row groups whose `column` statistics (min, max) `may_hold(min, max)` what is wanted
    (all groups without statistics)."""
    col = pf.schema_arrow.get_field_index(column)
    md = pf.metadata
    out = []
    for g in range(md.num_row_groups):
        st = md.row_group(g).column(col).statistics
        if st is None or not st.has_min_max or may_hold(st.min, st.max):
            out.append(g)
    return out


def groups_overlapping(pf, column: str, lo, hi) -> list[int]:
    """Row groups of a file sorted by `column` that may hold values in [lo, hi)."""
    return groups_matching(pf, column, lambda a, b: b >= lo and a < hi)
