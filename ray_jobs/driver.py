"""Stage orchestration on Ray: plan -> prototypes -> scores -> reduce -> manifest.

The driver holds no large data: only the shard plan, per-cluster count vectors (k entries) and
one 65,536-bin histogram. Every stage lists its commit markers once and schedules only what is
missing, so a rerun with the same run id resumes.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import numpy as np

from ray_jobs.progress import Progress
from ray_jobs.progress import configure as configure_progress
from scoring import manifest
from scoring.config import RunConfig
from scoring.embed import check_model_spec, content_column
from scoring.prototypes import load_committed, sample_counts
from scoring.select import ThresholdSearch, balanced_quotas, key_bits, plan_cluster_ranges
from scoring.shards import Shard, plan_shards
from scoring.storage import Store

log = logging.getLogger("protoprune")

IN_FLIGHT_PER_WORKER = 2
RANGE_ROWS = 4_000_000  # rows per cluster range in the per-cluster reduce


class RunFailed(RuntimeError):
    """Some shards failed on bad data; the message names them and their files."""


# -- Ray setup ---------------------------------------------------------------------------------
def ensure_ray(address: str | None) -> None:
    """Join a cluster (address, `auto`, or RAY_ADDRESS inside `ray job submit`), else start
    an embedded local Ray."""
    import ray

    if ray.is_initialized():
        return
    kwargs: dict[str, Any] = {"log_to_driver": True, "logging_level": logging.WARNING}
    if address:
        ray.init(address=address, **kwargs)
    elif os.environ.get("RAY_ADDRESS"):
        ray.init(**kwargs)
    else:
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")
        ray.init(include_dashboard=False, **kwargs)


def cluster_gpus() -> int:
    import ray

    return int(ray.cluster_resources().get("GPU", 0))


def cluster_cpus() -> int:
    import ray

    return max(1, int(ray.cluster_resources().get("CPU", 1)))


def worker_resources(cfg: RunConfig, n_shards: int) -> tuple[int, dict[str, float], bool]:
    """(actors, ray resource options, use_gpu) of the ShardWorker pool.

    Default: one actor per GPU in the cluster (num_gpus=1), else one per CPU. With
    --gpus-per-worker G (fractions allowed) there are floor(GPUs / G) actors; with
    --cpus-per-worker C on a CPU cluster floor(CPUs / C). --workers overrides the count.
    """
    gpus = cluster_gpus()
    cpus = cluster_cpus()
    g = cfg.gpus_per_worker if cfg.gpus_per_worker is not None else (1.0 if gpus else 0.0)
    c = cfg.cpus_per_worker if cfg.cpus_per_worker is not None else 1.0
    if g > 0 and gpus == 0:
        raise ValueError(f"gpus_per_worker = {g} but the Ray cluster has no GPU")
    if g > gpus > 0:
        raise ValueError(f"gpus_per_worker = {g} is more than the cluster's {gpus} GPU(s)")
    if g > 0:
        n = int(gpus / g + 1e-9)
    else:
        n = int(cpus / c + 1e-9) if c > 0 else cpus
    n = max(1, n)
    if cfg.workers and cfg.workers > n:
        # An actor that cannot be placed never starts; shards sent to it would wait forever.
        log.warning("--workers %d > %d worker slots in the cluster; using %d", cfg.workers, n, n)
    n = max(1, min(cfg.workers or n, n, n_shards))
    return n, {"num_gpus": g, "num_cpus": c}, g > 0


# -- progress: ray_jobs/progress.py (a bar per stage, log lines, JSON) ------------------------


# -- generic scheduling ------------------------------------------------------------------------
def map_tasks(
    fn: Callable,
    args: Iterable[tuple],
    max_in_flight: int,
    num_cpus: float = 1,
    num_gpus: float = 0,
) -> Iterator[tuple[int, Any]]:
    """Run remote(fn)(*a) for each args tuple with bounded concurrency; yield (i, result)
    in completion order. Exceptions propagate."""
    import ray

    remote = ray.remote(num_cpus=num_cpus, num_gpus=num_gpus, max_retries=3)(fn)
    pending: dict[Any, int] = {}
    it = iter(enumerate(args))
    exhausted = False
    while pending or not exhausted:
        while not exhausted and len(pending) < max_in_flight:
            try:
                i, a = next(it)
            except StopIteration:
                exhausted = True
                break
            pending[remote.remote(*a)] = i
        if not pending:
            break
        ready, _ = ray.wait(list(pending), num_returns=1)
        for ref in ready:
            i = pending.pop(ref)
            yield i, ray.get(ref)


def user_error(exc: BaseException) -> BaseException | None:
    """The user-facing cause inside a Ray task error (bad data), or None for crashes."""
    cause = getattr(exc, "cause", None) or exc
    if isinstance(cause, (ValueError, TypeError, FileNotFoundError)):
        return cause
    return None


# -- the run -----------------------------------------------------------------------------------
class Run:
    """One run folder and its stages."""

    def __init__(self, cfg: RunConfig, quiet: bool = False):
        self.cfg = cfg
        self.quiet = quiet
        self.in_store = Store(cfg.input, cfg.storage_options)
        self.out_root = Store(cfg.output, cfg.storage_options)
        self.store = self.out_root.child(cfg.run_id)
        self.timings: dict[str, float] = {}
        self.shards: list[Shard] = []
        self.cached: dict[int, Any] = {}  # shard -> ObjectRef of its embeddings (whole sample)
        self._actors: list[Any] | None = None

    # ---- plan and run.json
    def plan(self) -> None:
        t0 = time.perf_counter()
        cfg = self.cfg
        files, shards, schemas = plan_shards(self.in_store, cfg.shard_rows)
        for key, schema in schemas.items():
            for col in (cfg.id_column, content_column(cfg)):
                if col not in schema.names:
                    raise ValueError(
                        f"{self.in_store.uri(key)}: column '{col}' not found "
                        f"(columns: {', '.join(schema.names)})"
                    )
        # One id type across files: the reducer compares and concatenates ids of all shards.
        id_types = sorted((k, sc.field(cfg.id_column).type) for k, sc in schemas.items())
        for key, typ in id_types[1:]:
            if typ != id_types[0][1]:
                raise ValueError(
                    f"{self.in_store.uri(key)}: column '{cfg.id_column}' is {typ}, but "
                    f"{id_types[0][1]} in {self.in_store.uri(id_types[0][0])}; all files need "
                    "the same id type"
                )
        check_model_spec(cfg)
        self.shards = shards
        self.n_rows = sum(s.rows for s in shards)
        if self.n_rows == 0:
            raise ValueError(f"input {self.in_store.uri()}: the Parquet files hold zero rows")
        if cfg.k > self.n_rows:
            raise ValueError(f"k = {cfg.k} is larger than the {self.n_rows} input rows")
        self.fingerprint = [
            {"path": f["key"], "size": f["size"], "version": f["version"]} for f in files
        ]
        self.timings["plan"] = time.perf_counter() - t0
        self._write_or_check_run_json()

    def _write_or_check_run_json(self) -> None:
        cfg = self.cfg
        doc = {
            "format_version": manifest.FORMAT_VERSION,
            "run_id": cfg.run_id,
            "config": cfg.redacted(),
            "config_hash": cfg.config_hash(),
            "code_version": manifest.code_version(),
            "input": {"url": self.in_store.uri(), "files": self.fingerprint, "rows": self.n_rows},
            "shards": [s.to_json() for s in self.shards],
            "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        if self.store.exists(manifest.RUN_JSON):
            old = manifest.read_json(self.store, manifest.RUN_JSON)
            if old.get("config_hash") != doc["config_hash"]:
                changed = sorted(
                    k for k, v in cfg.hashed_settings().items() if old.get("config", {}).get(k) != v
                )
                raise ValueError(
                    f"run {self.store.uri()} exists with a different config "
                    f"(changed: {', '.join(changed) or 'unknown'}); use a new --run-id"
                )
            if old.get("input", {}).get("files") != self.fingerprint:
                raise ValueError(
                    f"run {self.store.uri()} exists but the input changed since "
                    f"it started; use a new --run-id"
                )
            log.info("resuming run %s", self.store.uri())
            return
        self.out_root.check_writable()
        manifest.write_json(self.store, manifest.RUN_JSON, doc)

    # ---- prototypes
    def prototypes(self) -> tuple[np.ndarray, str]:
        import ray

        from ray_jobs import workers

        got = load_committed(self.store)
        if got is not None:
            log.info("prototypes already committed (sha256 %s)", got[1][:12])
            return got
        t0 = time.perf_counter()
        cfg = self.cfg
        counts = sample_counts([s.rows for s in self.shards], cfg.effective_sample_size)
        todo = [(s, int(c)) for s, c in zip(self.shards, counts) if c > 0]
        prog = Progress("sample", len(todo), int(counts.sum()), self.quiet)
        if cfg.text_column or cfg.image_column:
            refs = self._sample_on_actors(todo, prog)
        else:
            refs = self._sample_tasks(todo, prog)
        prog.close()
        if self._actors:
            # the pool holds the cluster's GPUs/CPUs: fit inside one of its actors
            stats = self._get_user(self._actors[0].fit.remote(refs))
        else:
            use_gpu = cluster_gpus() > 0
            fit = ray.remote(num_cpus=1, num_gpus=1 if use_gpu else 0)(workers.fit_task)
            stats = ray.get(fit.remote(cfg, self.store, refs, use_gpu))
        del refs
        self.timings["prototypes"] = time.perf_counter() - t0
        log.info(
            "prototypes: k=%d on %d sampled rows, inertia %.4g, %d iterations (%.1fs)",
            cfg.k,
            stats["sample_rows"],
            stats["inertia"],
            stats["iterations"],
            stats["seconds"],
        )
        got = load_committed(self.store)
        assert got is not None
        return got

    def _sample_tasks(self, todo: list[tuple[Shard, int]], prog: Progress) -> list[Any]:
        """Precomputed embeddings: one Ray task per shard reads its sample rows."""
        import ray

        from ray_jobs import workers

        sample_remote = ray.remote(num_cpus=1, max_retries=3)(workers.sample_task)
        calls = [
            lambda s=s, c=c: sample_remote.remote(self.cfg, self.in_store, s, c) for s, c in todo
        ]
        return self._bounded(calls, 2 * cluster_cpus(), prog)

    def _sample_on_actors(self, todo: list[tuple[Shard, int]], prog: Progress) -> list[Any]:
        """Raw content: ShardWorker actors (the embedder loaded once each) embed only the
        sample rows. A shard whose sample is the whole shard keeps its embeddings (the
        ObjectRef, in self.cached) for the score stage, so no row is embedded twice."""
        actors = self.pool()
        n = len(actors)
        retries = self.cfg.max_retries  # sampling writes nothing: safe to retry on a lost actor
        calls = [
            lambda i=i, s=s, c=c: (
                actors[i % n].sample.options(max_task_retries=retries).remote(s, c)
            )
            for i, (s, c) in enumerate(todo)
        ]
        try:
            refs = self._bounded(calls, IN_FLIGHT_PER_WORKER * n, prog)
        except BaseException:
            self.close_pool()
            raise
        self.cached = {s.index: r for (s, c), r in zip(todo, refs) if c >= s.rows}
        return refs

    def pool(self) -> list[Any]:
        """The run's ShardWorker actors, created once (each loads the embedder once) and
        shared by the sample and score stages. max_concurrency=2: an actor reads its next
        shard while it computes the current one."""
        import ray

        from ray_jobs.workers import ShardWorker

        if self._actors is None:
            n, res, use_gpu = worker_resources(self.cfg, len(self.shards))
            cls = ray.remote(
                max_restarts=self.cfg.max_retries, max_task_retries=0, max_concurrency=2, **res
            )(ShardWorker)
            self._actors = [
                cls.remote(self.cfg, self.in_store, self.store, None, "", use_gpu) for _ in range(n)
            ]
        return self._actors

    def close_pool(self) -> None:
        import ray

        for a in self._actors or []:
            ray.kill(a)
        self._actors = None

    def _bounded(self, calls: list[Callable[[], Any]], limit: int, prog: Progress) -> list[Any]:
        """Submit calls with at most `limit` in flight; results stay in the object store."""
        import ray

        refs: list[Any] = []
        pending: list[Any] = []
        for call_ in calls:
            if len(pending) >= limit:
                ready, pending = ray.wait(pending, num_returns=1)
                self._count_ready(ready, prog)
            ref = call_()
            refs.append(ref)
            pending.append(ref)
        while pending:
            ready, pending = ray.wait(pending, num_returns=1)
            self._count_ready(ready, prog)
        return refs

    def _get_user(self, ref: Any) -> Any:
        """ray.get, re-raising a user error (bad data or settings) as itself."""
        import ray

        try:
            return ray.get(ref)
        except Exception as e:  # noqa: BLE001
            cause = user_error(e)
            if cause is not None:
                self.close_pool()
                raise cause from None
            raise

    def _count_ready(self, ready: list[Any], prog: Progress) -> None:
        import ray

        for r in ready:
            try:
                arr = ray.get(r)
            except Exception as e:  # noqa: BLE001
                cause = user_error(e)
                if cause is not None:
                    raise cause from None
                raise
            prog.update(len(arr))

    # ---- score
    def score(self, centroids: np.ndarray, sha: str) -> None:
        import ray

        cfg = self.cfg
        done = {
            i
            for i, m in manifest.committed(self.store, "scores").items()
            if m.get("prototypes_sha256") == sha
        }
        todo = [s for s in self.shards if s.index not in done]
        log.info("score: %d shards committed, %d to do", len(done), len(todo))
        if not todo:
            self.close_pool()
            return
        actors = self.pool()
        n_workers = len(actors)
        proto = [ray.put(centroids), sha]  # nested ref: each actor fetches it once
        cached = self.cached
        prog = Progress("score", len(todo), sum(s.rows for s in todo), self.quiet)
        failures: dict[int, str] = {}
        attempts: dict[int, int] = {}
        queue = list(reversed(todo))
        pending: dict[Any, tuple[Shard, int]] = {}
        load = [0] * n_workers
        while queue or pending:
            while queue and min(load) < IN_FLIGHT_PER_WORKER:
                w = int(np.argmin(load))
                shard = queue.pop()
                c = cached.get(shard.index)
                ref = actors[w].score.remote(shard, [c] if c is not None else None, proto)
                pending[ref] = (shard, w)
                load[w] += 1
            ready, _ = ray.wait(list(pending), num_returns=1)
            for ref in ready:
                shard, w = pending.pop(ref)
                load[w] -= 1
                try:
                    summary = ray.get(ref)
                except Exception as e:  # noqa: BLE001 - classified below
                    cause = user_error(e)
                    if cause is not None:
                        failures[shard.index] = str(cause)
                        log.error("shard %d failed: %s", shard.index, cause)
                        prog.update(failed=True)
                        continue
                    attempts[shard.index] = attempts.get(shard.index, 0) + 1
                    if attempts[shard.index] > cfg.max_retries:
                        failures[shard.index] = f"worker died {attempts[shard.index]} times: {e}"
                        prog.update(failed=True)
                        continue
                    log.warning(
                        "shard %d: worker lost (%s); retrying", shard.index, type(e).__name__
                    )
                    queue.append(shard)
                    continue
                prog.update(summary.rows)
                log.info(
                    "shard %d scored: %d rows in %.2fs", shard.index, summary.rows, summary.seconds
                )
        self.close_pool()
        self.cached = {}
        self.timings["score"] = prog.close()
        if failures:
            names = "; ".join(
                f"shard {i} ({self.in_store.uri(self.shards[i].file)}): {msg}"
                for i, msg in sorted(failures.items())
            )
            raise RunFailed(f"{len(failures)} shard(s) failed, no manifest committed: {names}")

    # ---- reduce
    def reduce(self, sha: str) -> dict[str, Any]:
        from ray_jobs.workers import call

        cfg = self.cfg
        t0 = time.perf_counter()
        k = cfg.k
        idx = [s.index for s in self.shards]
        par = 2 * cluster_cpus()
        counts = np.zeros(k, np.int64)
        dist_sum = np.zeros(k, np.float64)
        prog = Progress("reduce: stats", len(idx), None, self.quiet)
        for _, st in map_tasks(call, [("shard_stats", self.store, i, k) for i in idx], par):
            counts += st["counts"]
            dist_sum += st["dist_sum"]
            prog.update()
        prog.close()
        n = int(counts.sum())
        assert n == self.n_rows, f"scores hold {n} rows, the input {self.n_rows}"
        n_keep = cfg.n_keep(n)
        kept = np.zeros(k, np.int64)
        files: list[dict[str, Any]] = []
        extra: dict[str, Any] = {}
        if cfg.strategy in ("hard", "easy", "random"):
            search = ThresholdSearch(n_keep, n, key_bits(cfg.strategy))
            while (req := search.request()) is not None:
                mode, prefix, bits, limit = req
                tot = key_bits(cfg.strategy)
                if mode == "hist":
                    args = [
                        (
                            "shard_histogram",
                            self.store,
                            i,
                            cfg.strategy,
                            cfg.seed,
                            prefix,
                            bits,
                            tot,
                        )
                        for i in idx
                    ]
                    for _, h in map_tasks(call, args, par):
                        search.add_histogram(h)
                else:
                    args = [
                        (
                            "shard_candidates",
                            self.store,
                            i,
                            cfg.strategy,
                            cfg.seed,
                            prefix,
                            bits,
                            tot,
                            limit,
                        )
                        for i in idx
                    ]
                    for _, t in map_tasks(call, args, par):
                        search.add_candidates(t)
                search.advance()
            th = search.result
            extra["threshold"] = th.to_json()
            extra["select_passes"] = search.passes
            prog = Progress("reduce: keep", len(idx), None, self.quiet)
            args = [("keep_global", self.store, i, cfg.strategy, cfg.seed, th, k) for i in idx]
            for _, (entry, kc) in map_tasks(call, args, par):
                kept += kc
                if entry:
                    files.append(entry)
                prog.update()
            prog.close()
        else:
            if cfg.strategy != "balanced":
                raise ValueError(f"strategy '{cfg.strategy}' is not implemented yet")
            quotas = balanced_quotas(counts, n_keep)
            ranges = plan_cluster_ranges(counts, RANGE_ROWS)
            prog = Progress("reduce: keep", len(ranges), None, self.quiet)
            args = [
                ("keep_cluster_range", self.store, idx, part, lo, hi, quotas, k)
                for part, (lo, hi) in enumerate(ranges)
            ]
            for _, (entry, kc) in map_tasks(call, args, par):
                kept += kc
                if entry:
                    files.append(entry)
                prog.update()
            prog.close()
            extra["cluster_ranges"] = len(ranges)
        files.sort(key=lambda f: f["path"])
        assert int(kept.sum()) == n_keep, f"kept {int(kept.sum())} rows, expected {n_keep}"
        self.timings["reduce"] = time.perf_counter() - t0
        mean_dist = np.divide(dist_sum, np.maximum(counts, 1))
        return {
            "format_version": manifest.FORMAT_VERSION,
            "run_id": cfg.run_id,
            "config_hash": cfg.config_hash(),
            "code_version": manifest.code_version(),
            "strategy": cfg.strategy,
            "metric": cfg.metric,
            "k": k,
            "rows_in": n,
            "rows_kept": int(kept.sum()),
            "n_keep": n_keep,
            "prototypes_sha256": sha,
            "clusters": {
                "rows": counts.tolist(),
                "kept": kept.tolist(),
                "mean_distance": [round(float(x), 6) for x in mean_dist],
            },
            "files": files,
            **extra,
        }

    def commit(self, doc: dict[str, Any]) -> None:
        doc["timings_seconds"] = {k: round(v, 3) for k, v in self.timings.items()}
        doc["committed_at"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        manifest.write_json(self.store, manifest.MANIFEST, doc)


def run(cfg: RunConfig, quiet: bool = False) -> dict[str, Any]:
    """Run (or resume) a whole pruning job; returns the committed manifest."""
    configure_progress(log_format=cfg.log_format)
    r = Run(cfg, quiet=quiet)
    r.plan()
    if r.store.exists(manifest.MANIFEST):
        log.info("run %s is already committed", r.store.uri())
        return manifest.read_json(r.store, manifest.MANIFEST)
    ensure_ray(cfg.address)
    try:
        centroids, sha = r.prototypes()
        r.score(centroids, sha)
    finally:
        r.close_pool()
    doc = r.reduce(sha)
    r.commit(doc)
    write_report_logged(r.store)
    return doc


def write_report_logged(store: Store) -> str | None:
    """Write report/index.html; a failure is logged, never raised (the run is committed)."""
    try:
        from scoring.report import write_report

        return write_report(store)
    except Exception as e:  # noqa: BLE001 - the report must not fail a committed run
        log.error("report not written for %s: %s: %s", store.uri(), type(e).__name__, e)
        log.debug("report failure", exc_info=True)
        return None
