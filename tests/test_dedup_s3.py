"""Dedup + dbp + labels with input and run folder on a real S3 API (moto_server on loopback):
the range pass reads scores and embeddings by row groups from S3; the keep list equals the
single-process reference."""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from scoring.commit import load_committed
from scoring.config import make_config
from scoring.storage import Store
from tests.helpers import clustered, emb_array, read_all
from tests.ref6 import all_scores, dbp_reference, dedup_survivors, per_cluster_pick


def test_dedup_dbp_on_s3(s3_server, ray_local):
    from ray_jobs.driver import run

    bucket = s3_server.new_bucket()
    rng = np.random.default_rng(2)
    x = clustered(1200, 8, 4, seed=4)
    dst = rng.choice(np.arange(600, 1200), size=200, replace=False)
    x[dst] = x[rng.integers(0, 600, size=200)] * 1.00001
    lab = rng.integers(0, 3, size=1200)
    inp = Store(f"s3://{bucket}/in")
    for f, part in enumerate(np.array_split(np.arange(1200), 2)):
        t = pa.table({"id": part, "embedding": emb_array(x[part]), "label": lab[part]})
        inp.write_parquet(f"p{f}.parquet", t, row_group_size=150)
    cfg = make_config(
        dict(
            input=f"s3://{bucket}/in",
            output=f"s3://{bucket}/runs",
            run_id="s3",
            k=5,
            strategy="dbp",
            keep_fraction=0.25,
            dedup_eps=0.0005,
            label_column="label",
            shard_rows=300,
            quiet=True,
        )
    )
    doc = run(cfg, quiet=True)
    runs = Store(f"s3://{bucket}/runs/s3")
    sc = all_scores(runs)
    sid, cl, dist = sc["id"].to_pylist(), sc["cluster"].to_numpy(), sc["distance"].to_numpy()
    surv = dedup_survivors(sid, cl, dist, x[sid], 0.0005)
    assert doc["dedup"]["removed"] == 1200 - len(surv) >= 190
    live = np.array([i in surv for i in sid])
    counts = np.bincount(cl[live], minlength=5)
    dsum = np.bincount(cl[live], weights=dist[live].astype(np.float64), minlength=5)
    q = dbp_reference(load_committed(runs)[0], counts, dsum, doc["n_keep"], 0.5)
    keep = read_all(runs, "keep")
    assert set(keep["id"].to_pylist()) == per_cluster_pick(sid, cl, dist, q, surv)
    assert keep.num_rows == doc["n_keep"] == 300
    kept_lab = np.bincount(keep["label"].to_numpy(), minlength=3)
    assert doc["labels"]["after"] == {str(i): int(kept_lab[i]) for i in range(3)}
    assert doc["labels"]["after_dedup"] == {
        str(i): int(((lab[sid] == i) & live).sum()) for i in range(3)
    }
