"""Ray actors and task bodies: thin wrappers that call the stage functions of `scoring`."""

from __future__ import annotations

import itertools
import logging
import os
import threading
import time
from typing import Any

import numpy as np
import ray

from scoring.config import RunConfig
from scoring.embed.base import content_kind
from scoring.errors import first_line
from scoring.inputs.parquet import Shard
from scoring.stages import sample as sample_stage
from scoring.stages.fit import FitResult, fit_prototypes
from scoring.stages.score import ShardSummary, embedding_batches, score_shard
from scoring.storage import Store

log = logging.getLogger(__name__)


def warm_search_backend(use_gpu: bool) -> None:
    """Import the search backend's library (torch: 1-2 s) on a thread, now: the actor is
    ready at once, and its first call reads its shard (Arrow decodes without the GIL) while
    the import runs, instead of after it. The search's own import waits for this one
    (Python's import lock), so nothing is imported twice."""
    from scoring.kernels.assign import auto_backend

    def load() -> None:
        if auto_backend(use_gpu) == "torch":
            import torch  # noqa: F401

    threading.Thread(target=load, name="warm-search-backend", daemon=True).start()


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
        from scoring.embed import ShardEmbedder
        from scoring.kernels.devices import device_for

        self.cfg, self.in_store, self.run_store = cfg, in_store, run_store
        self.prototypes_sha = prototypes_sha
        self.lock = threading.Lock()
        threads = int(cfg.cpus_per_worker) if cfg.cpus_per_worker else None
        # A model that fails to load (truncated weights, a factory that raises, no GPU memory)
        # is a user error, the same on every retry: kept as one line and raised by every
        # call as a ModelLoadError, so the run fails with that line instead of Ray's actor-death
        # traceback and futile actor replacements.
        self.start_error: str | None = None
        try:
            self.source = ShardEmbedder(cfg, in_store, device_for(use_gpu), threads=threads)
        except Exception as e:  # noqa: BLE001 - reported by every call (_started)
            self.source = None
            self.start_error = (
                f"model '{cfg.model}' failed to load on a worker ({type(e).__name__}: "
                f"{first_line(e)})"
            )
        self.use_gpu = use_gpu
        self.searcher = None
        warm_search_backend(use_gpu)
        if centroids is not None:
            self._load_prototypes(centroids, prototypes_sha)

    def _load_prototypes(self, centroids: np.ndarray | list, sha: str) -> None:
        from scoring.kernels.assign import NearestPrototype

        if isinstance(centroids, list):  # [ObjectRef]: nested, so a restart can re-fetch it
            centroids = ray.get(centroids[0])
        # auto: faiss-gpu, else torch on CUDA, else faiss on CPU (both exact)
        self.searcher = NearestPrototype(centroids, self.cfg.metric, use_gpu=self.use_gpu)
        self.prototypes_sha = sha

    def pid(self) -> int:
        return os.getpid()

    def _started(self) -> None:
        if self.start_error is not None:
            from scoring.errors import ModelLoadError

            raise ModelLoadError(self.start_error)

    def score(
        self, shard: Shard, cached: list | None = None, prototypes: list | None = None
    ) -> ShardSummary:
        """Score a shard. `cached` = [ObjectRef of the shard's embeddings, all rows in order]
        (kept from the prototype sample when it covered the whole shard): nothing is
        embedded again. `prototypes` = [ObjectRef of the centroids, their sha256]: loaded
        when they differ from the actor's (the same actors serve the sample stage first,
        and a restarted actor reloads them on its next call)."""
        self._started()
        delay = float(os.environ.get("PROTOPRUNE_FAULT_SHARD_DELAY_S", "0") or 0)
        if delay > 0:  # fault-injection knob for tests: widen the window to kill a worker
            time.sleep(delay)
        batches = None
        if cached is not None:
            table = self.source.read(shard, [self.cfg.id_column])
        elif content_kind(self.cfg) == "embedding":
            # outside the lock: the ids and the first batch; the rest is read under the lock,
            # each batch while the one before is searched (stages.score.embedding_batches)
            batches = embedding_batches(self.cfg, self.in_store, shard)
            first = next(batches)
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
            elif batches is not None:

                def source(_s: Shard):
                    return itertools.chain([first], batches)
            else:

                def source(s: Shard):
                    return self.source.embed(s, table=table)

            return score_shard(
                self.cfg,
                self.in_store,
                self.run_store,
                shard,
                self.searcher,
                self.prototypes_sha,
                source=source,
            )

    def fit(self, samples: list[Any], names: list[tuple[int, str]], plan_sha: str) -> FitResult:
        """Fit and commit the prototypes here (the pool's actors hold the cluster's
        resources while the sample stage runs; a separate fit task would wait for them)."""
        with self.lock:
            return fit_task(self.cfg, self.run_store, samples, names, self.use_gpu, plan_sha)

    def sample(self, shard: Shard, picks: tuple) -> np.ndarray:
        """The shard's prototype-sample rows, embedded (only those rows, read from the few
        row groups the sample rule picks)."""
        self._started()
        part = sample_stage.read_sample(self.cfg, self.in_store, shard, picks, self.source)
        with self.lock:  # IO above, unlocked
            return sample_stage.embed_sample(self.cfg, part, source=self.source)


def fit_task(
    cfg: RunConfig,
    run_store: Store,
    samples: list[Any],
    names: list[tuple[int, str]],
    use_gpu: bool,
    plan_sha: str | None = None,
) -> FitResult:
    """The fit stage over sample parts held in the object store (fetched here, one at a time,
    never on the driver), on every core of the node."""
    use_all_cores()
    return fit_prototypes(cfg, run_store, lambda j: ray.get(samples[j]), names, use_gpu, plan_sha)


def use_all_cores() -> None:
    """Ray pins OMP_NUM_THREADS to a task's num_cpus (1), which left faiss k-means on one core
    while the rest of the node idled (nothing else runs during the fit): use them all."""
    n = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    try:
        import faiss

        faiss.omp_set_num_threads(max(1, n or 1))
    except ImportError:
        pass
    try:
        import torch

        torch.set_num_threads(max(1, n or 1))
    except ImportError:
        pass
