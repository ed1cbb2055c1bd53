"""Every key of the run folder and every table's columns: the one module that spells them.

A key is a pure function of (stage, unit); a retry writes the same key with the same bytes.

    <output>/<run_id>/
      run.json                           config, config hash, input fingerprint, shard plan
      prototypes/centroids.npy           float32 [k, d]
      prototypes/_COMMITTED.json         the prototypes' commit marker
      scores/shard-NNNNNN.parquet        SCORE_COLUMNS (+ label), sorted by cluster
      ids/shard-NNNNNN.parquet           ID_HASH_COLUMNS, sorted by hash (duplicate-id check)
      embeddings/shard-NNNNNN.parquet    EMBEDDING_COLUMNS, in the score file's row order
      _commits/<stage>/shard-NNNNNN.json per-shard commit markers
      _failures/<stage>/<name>.json      why a unit failed (for status)
      annotated/part-NNNNNN.parquet      scores + ANNOTATION_COLUMNS, by cluster range
      keep/part-NNNNNN-<sha16>.parquet   the keep list (named by part and content: a
                                         concurrent driver never overwrites a committed part)
      _tmp/...                           spill space of one task, deleted by it
      report/index.html                  the report
      selections/<NAME>/                 a later selection (`protoprune select`): selection.json,
                                         keep/, _redecided/, report/, _MANIFEST.json (its commit)
      _MANIFEST.json                     written last: the commit of the whole run

    <apply output>/                      the pruned dataset (`protoprune apply`), outside the run
      _APPLY.json                        what it is made from (run, selection, columns)
      _index/part-NNNNNN.parquet         per keep part: INDEX_COLUMNS, sorted by input shard
      part-NNNNNN.parquet                input shard N's kept rows, the input's schema
      _commits/apply/shard-NNNNNN.json   per-part markers
      _MANIFEST.json                     written last
"""

from __future__ import annotations

import re

RUN_JSON = "run.json"
MANIFEST = "_MANIFEST.json"
CENTROIDS = "prototypes/centroids.npy"
PROTOTYPES_COMMIT = "prototypes/_COMMITTED.json"
REPORT = "report/index.html"

# folders, each written by one stage
SCORES = "scores"
IDS = "ids"
EMBEDDINGS = "embeddings"
COMMITS = "_commits"
FAILURES = "_failures"
ANNOTATED = "annotated"
KEEP = "keep"
TMP = "_tmp"
PROTOTYPES = "prototypes"
REPORT_DIR = "report"
REDUCE = "reduce"  # the stage name of the reduce's failure records
SELECTIONS = "selections"
SELECTION_JSON = "selection.json"  # a selection's settings, create-only (refuses other ones)
REDECIDED = "_redecided"  # a selection's re-decided duplicate flags (a changed eps)
APPLY_JSON = "_APPLY.json"
APPLY_INDEX = "_index"
APPLY = "apply"  # the stage name of apply's markers

# Tables. The first three score columns are the contract other tools read (DESIGN §4).
SCORE_COLUMNS = ("id", "cluster", "distance", "margin")
LABEL = "label"  # added to scores/annotated/keep with --label-column
ID_HASH_COLUMNS = ("hash", "id", "row")
EMBEDDING_COLUMNS = ("id", "embedding")
PERCENTILE = "percentile"
DUPLICATE = "duplicate"
MAX_SIMILARITY = "max_similarity"
DUPLICATE_OF = "duplicate_of"
DEDUP_COLUMNS = (DUPLICATE, MAX_SIMILARITY, DUPLICATE_OF)
REDECIDED_COLUMNS = ("row", DUPLICATE)  # row: position in the annotated part
SHARD = "shard"
WITH_SCORES = ("cluster", "distance", PERCENTILE)  # added to apply's rows by --with-scores
INDEX_COLUMNS = (SHARD, "id", *WITH_SCORES)
ROW_GROUP = 65_536  # rows per row group of every table the run writes
# The only columns of run-folder tables that Parquet dictionary-encodes: they repeat (clusters
# in a score file sorted by cluster, labels, input shards). Every other column is unique per
# row (ids, hashes) or continuous (distances, embeddings): pyarrow's default dictionary attempt
# on them, abandoned at the page limit, made writes ~7x slower and files ~1.5x larger
# (2.7M annotated rows: 0.85 s and 65 MB, against 0.12 s and 44 MB; benchmarks/README.md).
DICTIONARY_COLUMNS = ("cluster", LABEL, SHARD)


def encoding(table) -> dict:
    """Parquet writer options of a run-folder table (`Store.write_parquet(..., **encoding(t))`)."""
    return {"use_dictionary": [c for c in table.column_names if c in DICTIONARY_COLUMNS]}


# Wiping a run (--force-new): the manifest first (no reader may trust a half-deleted run), then
# the markers (nothing half-deleted counts as done), then the data, run.json last. Every
# top-level entry of the layout is here: a test checks that a wiped run folder is empty.
WIPE_ORDER = (
    MANIFEST,
    COMMITS,
    PROTOTYPES_COMMIT,
    FAILURES,
    KEEP,
    ANNOTATED,
    TMP,
    SCORES,
    IDS,
    EMBEDDINGS,
    PROTOTYPES,
    REPORT_DIR,
    SELECTIONS,
    RUN_JSON,
)


def shard_name(index: int) -> str:
    return f"shard-{index:06d}"


def part_name(part: int) -> str:
    return f"part-{part:06d}"


def score_key(shard: int) -> str:
    return f"{SCORES}/{shard_name(shard)}.parquet"


def ids_key(shard: int) -> str:
    return f"{IDS}/{shard_name(shard)}.parquet"


def embeddings_key(shard: int) -> str:
    return f"{EMBEDDINGS}/{shard_name(shard)}.parquet"


def annotated_key(part: int) -> str:
    return f"{ANNOTATED}/{part_name(part)}.parquet"


def keep_key(part: int, sha256: str) -> str:
    """A keep part, named by its content (the first 16 hex digits of its sha256): a second
    driver on the same run writes the same bytes under the same name, or other bytes under
    another name, and never replaces a file a committed manifest lists (docs/architecture.md,
    "Concurrent drivers")."""
    return f"{KEEP}/{part_name(part)}-{sha256[:16]}.parquet"


def marker_dir(stage: str) -> str:
    return f"{COMMITS}/{stage}/"


def marker_key(stage: str, shard: int) -> str:
    return f"{marker_dir(stage)}{shard_name(shard)}.json"


def failure_dir(stage: str) -> str:
    return f"{FAILURES}/{stage}/"


def failure_key(stage: str, name: str) -> str:
    return f"{failure_dir(stage)}{name}.json"


def selection_prefix(name: str) -> str:
    """The folder of selection `name` inside the run folder."""
    return f"{SELECTIONS}/{name}"


def redecided_key(part: int) -> str:
    return f"{REDECIDED}/{part_name(part)}.parquet"


def apply_part_key(shard: int) -> str:
    """The pruned dataset's file of input shard `shard` (below the apply output)."""
    return f"{part_name(shard)}.parquet"


def apply_index_key(part: int) -> str:
    return f"{APPLY_INDEX}/{part_name(part)}.parquet"


def dedup_spill(part: int) -> str:
    """Spill folder of one cluster too large for memory (deleted by the task that made it)."""
    return f"{TMP}/dedup/{part_name(part)}"


def spill_chunk(part: int, chunk: int, shard: int) -> str:
    return f"{dedup_spill(part)}/chunk-{chunk:06d}/{shard_name(shard)}.npz"


def spill_chunk_dir(part: int, chunk: int) -> str:
    return f"{dedup_spill(part)}/chunk-{chunk:06d}/"


_SHARD_RE = re.compile(r"shard-(\d+)\.json$")


def marker_shard(key: str) -> int | None:
    """The shard index of a marker key, or None for a key that is not a marker."""
    m = _SHARD_RE.search(key)
    return int(m.group(1)) if m else None


_PART_RE = re.compile(r"part-(\d+)(?:-[0-9a-f]+)?\.\w+$")


def key_part(key: str) -> int | None:
    """The part number of a part-NNNNNN (or a keep part's part-NNNNNN-<sha16>) key, or None."""
    m = _PART_RE.search(key)
    return int(m.group(1)) if m else None
