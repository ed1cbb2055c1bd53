"""`protoprune evaluate`: a linear probe on the keep list against random subsets of its size.

A logistic regression (scikit-learn) is trained on the embeddings of the kept rows and, for
each of `seeds` seeds, on a uniformly random subset of the same size drawn from the same
training pool; all are scored on one held-out set. The held-out set is either a separate
labelled dataset (`test_input`, same id / embedding / label columns as the run's input) or a
deterministic hash split of the run's own rows (`test_fraction`, by hash(seed, id) as the
`random` rule), whose rows are then excluded from every training set.

Embeddings come from the run's saved `embeddings/` when every shard has them (needed for runs
that embedded raw text or images), else from the input's embedding column (unit rows for
metric cosine, as the run scored them). Labels are read from the input by id. This command
holds the pool in memory: it is meant for evaluation-sized data, not the full 10^9 rows.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from scoring import commit, layout
from scoring.errors import BadConfig, BadInput
from scoring.inputs.parquet import Shard, embedding_matrix, plan_shards, read_shard_columns
from scoring.kernels.devices import normalize
from scoring.kernels.radix import random_key
from scoring.storage import Store

log = logging.getLogger(__name__)

HASH_SPLIT_SEED = 0x5EED


def _read_pool(
    run: Store, run_json: dict[str, Any], label_column: str, storage_options
) -> tuple[pa.Array, np.ndarray, np.ndarray]:
    cfg = run_json["config"]
    in_store = Store(run_json["input"]["url"], storage_options)
    shards = [Shard.from_json(s) for s in run_json["shards"]]
    saved = all(run.exists(layout.embeddings_key(s.index)) for s in shards)
    ids_all, x_all, y_all = [], [], []
    for s in shards:
        where = f"{in_store.uri(s.file)} (shard {s.index})"
        cols = [cfg["id_column"], label_column]
        if not saved:
            cols.append(cfg["embedding_column"])
        t = read_shard_columns(in_store, s, cols, where)
        ids = t[cfg["id_column"]].combine_chunks()
        y = t[label_column].combine_chunks()
        if y.null_count:
            raise BadInput(f"{where}: column '{label_column}' has {y.null_count} null label(s)")
        if saved:
            e = run.read_parquet(layout.embeddings_key(s.index))
            pos = pc.index_in(e["id"], value_set=ids)
            if pos.null_count:
                raise BadInput(f"{run.uri(layout.embeddings_key(s.index))}: ids not in the input")
            y = y.take(pos)
            ids = e["id"].combine_chunks()
            col = e["embedding"].combine_chunks()
            x = col.flatten().to_numpy(zero_copy_only=False).reshape(len(col), -1)
        else:
            x = embedding_matrix(t[cfg["embedding_column"]], where, cfg["embedding_column"])
            if cfg.get("metric") == "cosine":
                x = normalize(x)
        ids_all.append(ids)
        x_all.append(np.asarray(x, np.float32))
        y_all.append(np.asarray(y.to_pylist(), dtype=object))
    return pa.concat_arrays(ids_all), np.concatenate(x_all), np.concatenate(y_all)


def _read_test(url: str, cfg: dict[str, Any], label_column: str, storage_options):
    store = Store(url, storage_options)
    _, shards, _ = plan_shards(store, 1 << 30)
    xs, ys = [], []
    for s in shards:
        where = f"{store.uri(s.file)}"
        t = read_shard_columns(store, s, [cfg["embedding_column"], label_column], where)
        x = embedding_matrix(t[cfg["embedding_column"]], where, cfg["embedding_column"])
        xs.append(normalize(x) if cfg.get("metric") == "cosine" else x)
        ys.append(np.asarray(t[label_column].to_pylist(), dtype=object))
    return np.concatenate(xs), np.concatenate(ys)


def probe_accuracy(xtr: np.ndarray, ytr: np.ndarray, xte: np.ndarray, yte: np.ndarray) -> float:
    """Held-out accuracy of a logistic regression trained on (xtr, ytr)."""
    try:
        from sklearn.linear_model import LogisticRegression
    except ImportError:
        raise BadConfig("evaluate needs scikit-learn: pip install 'protoprune[eval]'") from None

    labels = {str(v) for v in ytr}
    if len(labels) < 2:
        raise BadInput(f"the training set holds {len(labels)} label value(s); need at least 2")
    clf = LogisticRegression(max_iter=2000)
    clf.fit(xtr, np.asarray([str(v) for v in ytr]))
    return float((clf.predict(xte) == np.asarray([str(v) for v in yte])).mean())


def evaluate_run(
    run_url: str,
    label_column: str,
    seeds: int = 3,
    test_fraction: float = 0.2,
    test_input: str | None = None,
    storage_options=None,
) -> dict[str, Any]:
    """Accuracy of the keep list and of `seeds` random subsets of its size, side by side
    (seeds 0: the keep list alone)."""
    if not 0 < test_fraction < 1:
        raise BadConfig(f"--test-fraction must be in (0, 1) (got {test_fraction})")
    if isinstance(seeds, bool) or not isinstance(seeds, int) or seeds < 0:
        raise BadConfig(f"--seeds must be an integer >= 0 (got {seeds!r})")
    run = Store(run_url, storage_options)
    if not run.exists(layout.MANIFEST):
        raise BadInput(f"run {run.uri()}: no {layout.MANIFEST} (the run is not finished)")
    doc = commit.read_json(run, layout.MANIFEST)
    run_json = commit.read_json(run, layout.RUN_JSON)
    ids, x, y = _read_pool(run, run_json, label_column, storage_options)
    kept_ids = pa.concat_arrays(
        [run.read_parquet(f["path"], ["id"])["id"].combine_chunks() for f in doc["files"]]
    ) if doc["files"] else ids.slice(0, 0)  # fmt: skip
    is_kept = pc.is_in(ids, value_set=kept_ids).to_numpy(zero_copy_only=False)
    if test_input:
        xte, yte = _read_test(test_input, run_json["config"], label_column, storage_options)
        train = np.ones(len(ids), bool)
        split = f"separate test set {test_input}"
    else:
        h = random_key(ids, HASH_SPLIT_SEED)
        test = h < np.uint64(int(test_fraction * 2.0**64))
        xte, yte = x[test], y[test]
        train = ~test
        split = f"hash split, test fraction {test_fraction}"
    if len(yte) == 0:
        raise BadInput(f"run {run.uri()}: the held-out set is empty")
    keep_idx = np.flatnonzero(train & is_kept)
    pool_idx = np.flatnonzero(train)
    size = len(keep_idx)
    if size == 0:
        raise BadInput(f"run {run.uri()}: no kept row is in the training pool")
    acc_keep = probe_accuracy(x[keep_idx], y[keep_idx], xte, yte)
    rand = []
    for s in range(seeds):
        pick = np.random.default_rng(s).choice(pool_idx, size=size, replace=False)
        rand.append(probe_accuracy(x[pick], y[pick], xte, yte))
    return {
        "run": run.uri(),
        "strategy": doc.get("strategy"),
        "label_column": label_column,
        "split": split,
        "train_rows": size,
        "pool_rows": int(len(pool_idx)),
        "test_rows": int(len(yte)),
        "keep_accuracy": round(acc_keep, 6),
        "random_accuracy": [round(a, 6) for a in rand],
        "random_mean": round(float(np.mean(rand)), 6) if rand else None,
        "random_std": round(float(np.std(rand, ddof=1)), 6) if len(rand) > 1 else None,
        "random_size": size,
        "summary": summary(acc_keep, rand, size),
    }


def summary(acc_keep: float, rand: list[float], size: int) -> str:
    """One line: the keep list's accuracy against the random subsets' mean ± std."""
    line = f"keep list {acc_keep:.4f} on {size} rows"
    if not rand:
        return line
    spread = f" ± {np.std(rand, ddof=1):.4f}" if len(rand) > 1 else ""
    diff = (acc_keep - float(np.mean(rand))) * 100
    return (
        f"{line}; random {float(np.mean(rand)):.4f}{spread} "
        f"({len(rand)} subset(s) of {size} rows); difference {diff:+.2f} points"
    )
