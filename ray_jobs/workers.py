"""Ray actors and tasks: thin wrappers that call the stage functions of `scoring`."""

from __future__ import annotations

import logging
import os
import threading
from typing import Any

import numpy as np
import ray

from scoring import score as stage
from scoring.config import RunConfig
from scoring.shards import Shard
from scoring.storage import Store

log = logging.getLogger(__name__)


class ShardWorker:
    """One per GPU (or CPU slot). Loads the embedder and the prototypes once, then scores
    shard after shard.

    Created with `max_concurrency=2` and fed two shards at a time: each call reads its shard
    (IO) outside the compute lock, so the next shard is read while the current one is embedded
    and searched; embedding, search and writes run under the lock, one shard at a time.
    The driver creates the pool once per run with `centroids=None`: the same actors embed the
    prototype sample (`sample`), fit the prototypes (`fit`), then score (`score` carries the
    prototypes' ObjectRef and sha256, loaded on first use).
    """

    def __init__(
        self,
        cfg: RunConfig,
        in_store: Store,
        run_store: Store,
        centroids: np.ndarray | list | None,
        prototypes_sha: str,
        use_gpu: bool = False,
    ):
        from scoring.embed import ShardEmbedder, device_for

        self.cfg, self.in_store, self.run_store = cfg, in_store, run_store
        self.prototypes_sha = prototypes_sha
        self.lock = threading.Lock()
        threads = int(cfg.cpus_per_worker) if cfg.cpus_per_worker else None
        self.source = ShardEmbedder(cfg, in_store, device_for(use_gpu), threads=threads)
        self.use_gpu = use_gpu
        self.searcher = None
        if centroids is not None:
            self._load_prototypes(centroids, prototypes_sha)

    def _load_prototypes(self, centroids: np.ndarray | list, sha: str) -> None:
        from scoring.assign import NearestPrototype

        if isinstance(centroids, list):  # [ObjectRef]: nested, so a restart can re-fetch it
            centroids = ray.get(centroids[0])
        self.searcher = NearestPrototype(
            centroids, self.cfg.metric, use_gpu=self.use_gpu and _has_faiss_gpu()
        )
        self.prototypes_sha = sha

    def pid(self) -> int:
        return os.getpid()

    def score(
        self, shard: Shard, cached: list | None = None, prototypes: list | None = None
    ) -> stage.ShardSummary:
        """Score a shard. `cached` = [ObjectRef of the shard's embeddings, all rows in order]
        (kept from the prototype sample when it covered the whole shard): nothing is
        embedded again. `prototypes` = [ObjectRef of the centroids, their sha256]: loaded
        when they differ from the actor's (the same actors serve the sample stage first,
        and a restarted actor reloads them on its next call)."""
        if cached is not None:
            table = self.source.read(shard, [self.cfg.id_column])
        else:
            table = self.source.read(shard)  # prefetch: outside the lock
        with self.lock:
            if prototypes is not None and (
                self.searcher is None or prototypes[1] != self.prototypes_sha
            ):
                self._load_prototypes([prototypes[0]], prototypes[1])
            if cached is not None:
                x = ray.get(cached[0])
                ids = table[self.cfg.id_column].combine_chunks()
                assert len(x) == len(ids), (len(x), len(ids))

                def source(_s: Shard):
                    return ids, x
            else:

                def source(s: Shard):
                    return self.source.embed(s, table=table)

            return stage.score_shard(
                self.cfg,
                self.in_store,
                self.run_store,
                shard,
                self.searcher,
                self.prototypes_sha,
                source=source,
            )

    def fit(self, samples: list[Any]) -> dict:
        """Fit and commit the prototypes here (the pool's actors hold the cluster's
        resources while the sample stage runs; a separate fit task would wait for them)."""
        with self.lock:
            return fit_task(self.cfg, self.run_store, samples, self.use_gpu)

    def sample(self, shard: Shard, count: int) -> np.ndarray:
        """The shard's prototype-sample rows, embedded (only those rows)."""
        from scoring.prototypes import normalize, sample_rows

        rows = sample_rows(shard.index, shard.rows, count, self.cfg.seed)
        table = self.source.read(shard)
        with self.lock:
            _, x = self.source.embed(shard, table=table, rows=rows)
        return normalize(x) if self.cfg.metric == "cosine" else x


def _has_faiss_gpu() -> bool:
    try:
        import faiss

        return hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0
    except Exception:  # noqa: BLE001
        return False


def sample_task(cfg: RunConfig, in_store: Store, shard: Shard, count: int) -> np.ndarray:
    return stage.sample_shard(cfg, in_store, shard, count)


def fit_task(cfg: RunConfig, run_store: Store, samples: list[Any], use_gpu: bool) -> dict:
    """Concatenate the sample (fetched here, not on the driver), fit, save, commit."""
    from scoring.prototypes import fit_kmeans, save_centroids

    parts = [p for p in ray.get(samples) if len(p)]
    x = np.concatenate(parts, axis=0)
    centroids, _, stats = fit_kmeans(
        x, cfg.k, cfg.kmeans_iters, cfg.metric, cfg.seed, use_gpu=use_gpu and _has_faiss_gpu()
    )
    sha = save_centroids(run_store, centroids, stats)
    return dict(stats, sha256=sha)


def call(fn_name: str, *args: Any) -> Any:
    """Run a reduce-stage function of scoring.score by name (one remote for all of them)."""
    return getattr(stage, fn_name)(*args)
