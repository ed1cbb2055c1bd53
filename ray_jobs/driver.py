"""Stage orchestration on Ray: plan -> prototypes -> scores -> reduce -> manifest.

The driver holds no large data: only the shard plan, per-cluster count vectors (k entries) and
one 65,536-bin histogram. Every stage lists its commit markers once and schedules only what is
missing, so a rerun with the same run id resumes.
"""

from __future__ import annotations

import json
import logging
import os
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import numpy as np

from ray_jobs.progress import Progress
from ray_jobs.progress import configure as configure_progress
from scoring import manifest
from scoring.config import RunConfig
from scoring.embed import ModelLoadError, check_model_spec, content_column
from scoring.prototypes import (
    load_committed,
    load_committed_marker,
    sample_counts,
    sample_size_rule,
)
from scoring.select import ThresholdSearch, balanced_quotas, key_bits, plan_cluster_ranges
from scoring.shards import Shard, plan_shards
from scoring.storage import Store

log = logging.getLogger("protoprune")

IN_FLIGHT_PER_WORKER = 2
RANGE_ROWS = 4_000_000  # rows per cluster range in the per-cluster reduce
DEDUP_RANGE_FLOATS = 1 << 28  # with dedup: at most ~1 GiB of float32 embeddings per range;
# a single cluster above it is deduplicated through spilled chunks (scoring.annotate)
DEDUP_BLOCK = 4096  # rows per block of the dedup similarity products


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
        # "local": a new embedded Ray, even when `ray start` left a cluster address on this
        # machine (ray.init() with no address would silently join that cluster).
        ray.init(address="local", include_dashboard=False, **kwargs)


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


def get_user(ref: Any) -> Any:
    """ray.get, re-raising a user error (bad data or settings) inside a task as itself."""
    import ray

    try:
        return ray.get(ref)
    except Exception as e:  # noqa: BLE001 - classified by user_error
        cause = user_error(e)
        if cause is not None:
            raise cause from None
        raise


def user_error(exc: BaseException) -> BaseException | None:
    """The user-facing cause inside a Ray task error (bad data), or None for crashes."""
    from scoring.storage import StoreError

    cause = getattr(exc, "cause", None) or exc
    if isinstance(cause, (ValueError, TypeError, FileNotFoundError, PermissionError, StoreError)):
        return cause
    return None


def shard_error(exc: BaseException) -> BaseException | None:
    """`user_error` for one shard's call; a model that fails to load on the workers is the
    same for every shard, so it is raised at once (one line) instead of recorded per shard."""
    cause = user_error(exc)
    if isinstance(cause, ModelLoadError):
        raise cause from None
    return cause


def first_line(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return lines[0][:300] if lines else type(e).__name__


def check_schemas(store: Store, schemas: dict[str, Any], id_col: str, emb_col: str | None) -> None:
    """Fail fast, from the footers only, on columns of the wrong type and on fixed embedding
    widths that differ across files (variable-width lists are checked when read). emb_col is
    None for raw text/image input (the model gives the embeddings)."""
    import pyarrow as pa

    widths: dict[int, str] = {}
    for key, schema in schemas.items():
        where = store.uri(key)
        it = schema.field(id_col).type
        if not (
            pa.types.is_integer(it)
            or pa.types.is_string(it)
            or pa.types.is_large_string(it)
            or pa.types.is_binary(it)
            or pa.types.is_large_binary(it)
        ):
            raise ValueError(
                f"{where}: column '{id_col}' must hold integer or string ids, found {it}"
            )
        if emb_col is None:
            continue
        et = schema.field(emb_col).type
        is_list = pa.types.is_list(et) or pa.types.is_large_list(et)
        if not (is_list or pa.types.is_fixed_size_list(et)) or not (
            pa.types.is_floating(et.value_type) or pa.types.is_integer(et.value_type)
        ):
            raise ValueError(
                f"{where}: column '{emb_col}' must be a list of numbers (embeddings), found {et}"
            )
        if pa.types.is_fixed_size_list(et):
            widths.setdefault(et.list_size, where)
            if len(widths) > 1:
                (w1, f1), (w2, f2) = list(widths.items())[:2]
                raise ValueError(
                    f"column '{emb_col}' has mixed embedding widths across files: "
                    f"{w1} in {f1}, {w2} in {f2}"
                )


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
        self.retried: set[int] = set()  # score shards resubmitted after their worker died
        self.cached: dict[int, Any] = {}  # shard -> ObjectRef of its embeddings (whole sample)
        self._actors: list[Any] | None = None

    # ---- plan and run.json
    def plan(self) -> None:
        t0 = time.perf_counter()
        cfg = self.cfg
        files, shards, schemas = plan_shards(self.in_store, cfg.shard_rows)
        for key, schema in schemas.items():
            for col in (cfg.id_column, content_column(cfg), *filter(None, [cfg.label_column])):
                if col not in schema.names:
                    raise ValueError(
                        f"{self.in_store.uri(key)}: column '{col}' not found "
                        f"(columns: {', '.join(schema.names)})"
                    )
        raw = bool(cfg.text_column or cfg.image_column)
        check_schemas(self.in_store, schemas, cfg.id_column, None if raw else cfg.embedding_column)
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
        self.embedding_width = None if raw else fixed_width(schemas.values(), cfg.embedding_column)
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
        if cfg.force_new and self.store.exists(manifest.RUN_JSON):
            removed = manifest.wipe_run(self.store)
            log.warning("--force-new: removed %s from %s", ", ".join(removed), self.store.uri())
        self.run_doc = doc
        self.changed_files: list[str] = []
        if self.store.exists(manifest.RUN_JSON):
            self._check_resume(manifest.read_json(self.store, manifest.RUN_JSON), doc)
            return
        self.store.check_writable()  # a probe inside <output>/<run_id>/, nowhere else
        if not self.store.put_if_absent(manifest.RUN_JSON, manifest.dumps(doc)):
            # another driver created the run between our check and our write
            self._check_resume(manifest.read_json(self.store, manifest.RUN_JSON), doc)

    def _check_resume(self, old: dict[str, Any], doc: dict[str, Any]) -> None:
        """Refuse a resume whose config or input differs, saying exactly what differs.

        A changed input file (size or etag/mtime) is accepted when its footer-derived shard
        plan is unchanged and the run is not committed: its shards are redone (see
        `accept_changed_inputs`). Added or removed files, or a changed shard plan, are refused.
        """
        where = f"run {self.store.uri()} exists"
        hint = "rerun with --force-new to start this run id over, or use a new --run-id"
        if old.get("config_hash") != doc["config_hash"]:
            oldc = old.get("config", {})
            diffs = [
                f"{k}: {oldc.get(k)!r} -> {v!r}"
                for k, v in self.cfg.hashed_settings().items()
                if oldc.get(k) != v
            ]
            raise ValueError(
                f"{where} with a different config ({'; '.join(diffs) or 'config hash differs'}); "
                f"{hint}"
            )
        d = manifest.diff_fingerprint(old.get("input", {}).get("files", []), self.fingerprint)
        what = [f"added {p}" for p in d["added"]] + [f"removed {p}" for p in d["removed"]]
        if what:
            raise ValueError(f"{where} but its input changed ({'; '.join(what)}); {hint}")
        if d["changed"]:
            olds = {f["path"]: f for f in old["input"]["files"]}
            news = {f["path"]: f for f in self.fingerprint}
            detail = "; ".join(
                f"{p} (size {olds[p]['size']} -> {news[p]['size']}, "
                f"version {olds[p]['version']} -> {news[p]['version']})"
                for p in d["changed"]
            )
            if self.store.exists(manifest.MANIFEST):
                raise ValueError(f"{where}, is committed, and its input changed: {detail}; {hint}")
            if old.get("shards") != doc["shards"]:
                olds_j = {json.dumps(x, sort_keys=True) for x in old.get("shards", [])}
                news_j = {json.dumps(x, sort_keys=True) for x in doc["shards"]}
                bad = sorted({json.loads(x)["file"] for x in olds_j ^ news_j})
                raise ValueError(
                    f"{where} but the row groups of input file(s) changed "
                    f"({', '.join(bad) or detail}), so the shard plan differs; {hint}"
                )
            log.warning("input file(s) changed since the run started: %s", detail)
            self.changed_files = d["changed"]
        log.info("resuming run %s", self.store.uri())

    def accept_changed_inputs(self) -> None:
        """Resume over changed input files: check that the committed prototypes' sample is
        unaffected, invalidate the changed files' score markers, then record the new fingerprint.

        Order matters for a crash at any point: markers are deleted before run.json is updated,
        so no stale marker can ever be trusted under the new fingerprint.
        """
        if not self.changed_files:
            return
        import ray

        from ray_jobs import workers

        changed = set(self.changed_files)
        shards = [s for s in self.shards if s.file in changed]
        marker = load_committed_marker(self.store)
        if marker is not None and (self.cfg.text_column or self.cfg.image_column):
            # checking the sample rows of raw content would need the model: refuse
            raise ValueError(
                f"run {self.store.uri()}: input file(s) {', '.join(sorted(changed))} changed "
                "after the prototypes were fitted on their embedded rows; rerun with "
                "--force-new or use a new --run-id"
            )
        if marker is not None:
            digests = marker.get("sample_sha256") or {}
            counts = self.sample_counts()
            check = [s for s in shards if counts[s.index] > 0]
            task = ray.remote(num_cpus=1, max_retries=3)(workers.sample_digest_task)
            refs = [task.remote(self.cfg, self.in_store, s, int(counts[s.index])) for s in check]
            for s, ref in zip(check, refs):
                if digests.get(str(s.index)) != get_user(ref):
                    raise ValueError(
                        f"run {self.store.uri()}: input file {self.in_store.uri(s.file)} "
                        f"changed rows the committed prototypes were fitted on (shard "
                        f"{s.index}); rerun with --force-new or use a new --run-id"
                    )
        for s in shards:
            self.store.delete(manifest.marker_key("scores", s.index))
        self.store.delete(manifest.MANIFEST)
        doc = manifest.read_json(self.store, manifest.RUN_JSON)
        doc.setdefault("input_history", []).append(
            {
                "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "changed": sorted(changed),
                "old": [f for f in doc["input"]["files"] if f["path"] in changed],
                "shards_redone": [s.index for s in shards],
            }
        )
        doc["input"]["files"] = self.fingerprint
        manifest.write_json(self.store, manifest.RUN_JSON, doc)
        log.warning(
            "accepted changed input file(s) %s: redoing shard(s) %s",
            ", ".join(sorted(changed)),
            ", ".join(str(s.index) for s in shards),
        )
        self.changed_files = []

    # ---- prototypes
    def sample_counts(self) -> np.ndarray:
        """Rows each shard gives to the k-means sample (the size rule, then the allocation):
        the fit and the resume check of a changed file must agree on it."""
        cfg = self.cfg
        size = sample_size_rule(
            cfg.effective_sample_size, self.n_rows, cfg.k, getattr(self, "embedding_width", None)
        )
        return sample_counts([s.rows for s in self.shards], size)

    def prototypes(self) -> tuple[np.ndarray, str]:
        import ray

        from ray_jobs import workers

        got = load_committed(self.store)
        if got is not None:
            log.info("prototypes already committed (sha256 %s)", got[1][:12])
            return got
        t0 = time.perf_counter()
        cfg = self.cfg
        counts = self.sample_counts()
        if int(counts.sum()) < min(cfg.effective_sample_size, self.n_rows):
            log.warning("k-means sample capped at %d rows (sample memory cap)", counts.sum())
        todo = [(s, int(c)) for s, c in zip(self.shards, counts) if c > 0]
        prog = Progress("sample", len(todo), int(counts.sum()), self.quiet)
        names = [(s.index, self.in_store.uri(s.file)) for s, _ in todo]
        if cfg.text_column or cfg.image_column:
            refs = self._sample_on_actors(todo, prog)
            prog.close()
            # the pool holds the cluster's GPUs/CPUs: fit inside one of its actors
            stats = self._fit_or_fail(lambda: get_user(self._actors[0].fit.remote(refs, names)))
        else:
            sample_remote = ray.remote(num_cpus=1, max_retries=3)(workers.sample_task)
            refs = []
            failures: dict[int, str] = {}
            # Bounded submission: sample arrays stay in the object store, never on the driver.
            # A shard failing on bad data does not stop the others: all are read, then all
            # failures are reported together.
            pending: dict[Any, Shard] = {}
            for shard, c in todo:
                if len(pending) >= 2 * cluster_cpus():
                    self._sample_ready(pending, prog, failures)
                ref = sample_remote.remote(cfg, self.in_store, shard, c)
                refs.append(ref)
                pending[ref] = shard
            while pending:
                self._sample_ready(pending, prog, failures)
            prog.close()
            if failures:
                self._fail("prototypes", failures)
            use_gpu = cluster_gpus() > 0
            fit = ray.remote(num_cpus=1, num_gpus=1 if use_gpu else 0)(workers.fit_task)
            stats = self._fit_or_fail(
                lambda: ray.get(fit.remote(cfg, self.store, refs, use_gpu, names))
            )
        refs.clear()  # release the sample parts from the object store
        for name in manifest.failures(self.store, "prototypes"):
            manifest.clear_failure(self.store, "prototypes", name)
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

    def _sample_on_actors(self, todo: list[tuple[Shard, int]], prog: Progress) -> list[Any]:
        """Raw content: ShardWorker actors (the embedder loaded once each) embed only the
        sample rows. A shard whose sample is the whole shard keeps its embeddings (the
        ObjectRef, in self.cached) for the score stage, so no row is embedded twice. Bad data
        in a shard is recorded and reported with the others, as on the task path."""
        actors = self.pool()
        n = len(actors)
        retries = self.cfg.max_retries  # sampling writes nothing: safe to retry on a lost actor
        refs: list[Any] = []
        failures: dict[int, str] = {}
        pending: dict[Any, Shard] = {}
        try:
            for i, (s, c) in enumerate(todo):
                if len(pending) >= IN_FLIGHT_PER_WORKER * n:
                    self._sample_ready(pending, prog, failures)
                ref = actors[i % n].sample.options(max_task_retries=retries).remote(s, c)
                refs.append(ref)
                pending[ref] = s
            while pending:
                self._sample_ready(pending, prog, failures)
            if failures:
                self._fail("prototypes", failures)
        except BaseException:
            self.close_pool()
            raise
        self.cached = {s.index: r for (s, c), r in zip(todo, refs) if c >= s.rows}
        return refs

    def pool(self) -> list[Any]:
        """The run's ShardWorker actors, created once (each loads the embedder once) and
        shared by the sample and score stages. max_concurrency=2: an actor reads its next
        shard while it computes the current one."""
        if self._actors is None:
            n, self._actor_res, self._actor_gpu = worker_resources(self.cfg, len(self.shards))
            self._actor_tag = uuid.uuid4().hex[:8]
            self._actors_made = 0
            self._actors = [self._new_actor() for _ in range(n)]
        return self._actors

    def _new_actor(self) -> Any:
        """One ShardWorker of the pool (also the replacement of a dead one). Named, so an
        operator (or a fault test) can find it: protoprune-score-<run_id>-<tag>-<n>."""
        import ray

        from ray_jobs.workers import ShardWorker

        cls = ray.remote(
            max_restarts=self.cfg.max_retries,
            max_task_retries=0,
            max_concurrency=2,
            **self._actor_res,
        )(ShardWorker)
        name = f"protoprune-score-{self.cfg.run_id}-{self._actor_tag}-{self._actors_made}"
        self._actors_made += 1
        return cls.options(name=name).remote(
            self.cfg, self.in_store, self.store, None, "", self._actor_gpu
        )

    def close_pool(self) -> None:
        import ray

        for a in self._actors or []:
            ray.kill(a)
        self._actors = None

    def _fit_or_fail(self, fit: Callable[[], dict]) -> dict:
        """Run the k-means fit; a user error (e.g. mixed widths) fails the run, recorded."""
        try:
            return fit()
        except Exception as e:  # noqa: BLE001
            cause = user_error(e) or (e if isinstance(e, (ValueError, TypeError)) else None)
            if cause is None:
                raise
            manifest.record_failure(self.store, "prototypes", "fit", {"error": str(cause)})
            raise RunFailed(f"prototypes failed, no manifest committed: {cause}") from None

    def _sample_ready(
        self, pending: dict[Any, Shard], prog: Progress, failures: dict[int, str]
    ) -> None:
        import ray

        ready, _ = ray.wait(list(pending), num_returns=1)
        for r in ready:
            shard = pending.pop(r)
            try:
                arr = ray.get(r)
            except Exception as e:  # noqa: BLE001
                cause = shard_error(e)
                if cause is None:
                    raise
                failures[shard.index] = str(cause)
                self._record("prototypes", shard.index, str(cause))
                prog.update(failed=True)
                continue
            prog.update(len(arr))

    def _record(self, stage: str, i: int, msg: str, attempts: int = 1) -> None:
        """Record a failed shard at once under _failures/<stage>/, so `protoprune status`
        shows it while the run goes on (or after the driver died)."""
        log.error("shard %d failed: %s", i, msg)
        manifest.record_failure(
            self.store,
            stage,
            manifest.shard_name(i),
            {
                "shard": i,
                "file": self.in_store.uri(self.shards[i].file),
                "error": msg,
                "attempts": attempts,
            },
        )

    def _fail(self, stage: str, failures: dict[int, str]) -> None:
        """Raise RunFailed naming every failed shard and its file."""
        names = "; ".join(
            f"shard {i} ({self.in_store.uri(self.shards[i].file)}): {msg}"
            for i, msg in sorted(failures.items())
        )
        raise RunFailed(
            f"{len(failures)} shard(s) failed in {stage}, no manifest committed: {names}"
        )

    # ---- score
    def score(self, centroids: np.ndarray, sha: str) -> None:
        import ray

        cfg = self.cfg
        marks = manifest.committed(self.store, "scores")
        done = {i for i, m in marks.items() if m.get("prototypes_sha256") == sha}
        for i in sorted(set(marks) - done):  # names other prototypes: counts as missing
            log.warning("shard %d: marker names other prototypes; redoing it", i)
            self.store.delete(manifest.marker_key("scores", i))
        old_failures = set(manifest.failures(self.store, "scores"))
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
        pending: dict[Any, tuple[Shard, int, Any]] = {}
        load = [0] * n_workers
        # A worker whose process or node died is replaced by a new actor that gets shards only
        # once a ping shows it is up; meanwhile its shards go to the live workers, never back
        # to the dead one (whose restart may wait forever for a node that is gone).
        up = [True] * n_workers
        replaced = [0] * n_workers
        pings: dict[Any, int] = {}
        while queue or pending:
            while queue:
                free = [i for i in range(n_workers) if up[i] and load[i] < IN_FLIGHT_PER_WORKER]
                if not free:
                    break
                w = min(free, key=load.__getitem__)
                shard = queue.pop()
                c = cached.get(shard.index)
                ref = actors[w].score.remote(shard, [c] if c is not None else None, proto)
                pending[ref] = (shard, w, actors[w])
                load[w] += 1
            if not pending and not pings:
                for shard in queue:
                    failures[shard.index] = "no scoring worker left"
                    prog.update(failed=True)
                break
            ready, _ = ray.wait(list(pending) + list(pings), num_returns=1)
            for ref in ready:
                if ref in pings:
                    w = pings.pop(ref)
                    try:
                        ray.get(ref)
                        up[w] = True
                    except Exception as e:  # noqa: BLE001 - the slot stays empty
                        log.warning("scoring worker %d not replaced: %s", w, type(e).__name__)
                    continue
                shard, w, actor = pending.pop(ref)
                load[w] -= 1
                try:
                    summary = ray.get(ref)
                except Exception as e:  # noqa: BLE001 - classified below
                    cause = shard_error(e)  # run() closes the pool on the way out
                    if cause is not None:
                        failures[shard.index] = str(cause)
                        self._record("scores", shard.index, str(cause))
                        prog.update(failed=True)
                        continue
                    if actor is actors[w]:  # first news of this worker's death
                        ray.kill(actor, no_restart=True)
                        up[w] = False
                        if replaced[w] < cfg.max_retries:
                            replaced[w] += 1
                            actors[w] = self._new_actor()
                            pings[actors[w].pid.remote()] = w
                    attempts[shard.index] = attempts.get(shard.index, 0) + 1
                    self.retried.add(shard.index)
                    if attempts[shard.index] > cfg.max_retries:
                        failures[shard.index] = (
                            f"worker died {attempts[shard.index]} times "
                            f"({type(e).__name__}: {first_line(e)})"
                        )
                        self._record(
                            "scores", shard.index, failures[shard.index], attempts[shard.index]
                        )
                        prog.update(failed=True)
                        continue
                    log.warning(
                        "shard %d: worker lost (%s); retrying", shard.index, type(e).__name__
                    )
                    queue.append(shard)
                    continue
                prog.update(summary.rows)
                if manifest.shard_name(shard.index) in old_failures:
                    manifest.clear_failure(self.store, "scores", manifest.shard_name(shard.index))
                log.info(
                    "shard %d scored: %d rows in %.2fs", shard.index, summary.rows, summary.seconds
                )
        self.close_pool()
        self.cached = {}
        self.timings["score"] = prog.close()
        if failures:
            self._fail("scores", failures)

    # ---- reduce
    def reduce(self, sha: str, centroids: np.ndarray | None = None) -> dict[str, Any]:
        """Stats pass, percentile refinement, the range pass (percentile + dedup), the rule."""
        from collections import Counter

        from ray_jobs.workers import call, call_fn
        from scoring.percentile import PercentileBins
        from scoring.score import shard_groups

        cfg = self.cfg
        t0 = time.perf_counter()
        k = cfg.k
        idx = [s.index for s in self.shards]
        par = 2 * cluster_cpus()
        # keep/ is not committed before the manifest: parts of an interrupted reduce go.
        self.store.delete("keep")
        self.check_duplicate_ids(idx, par)
        counts = np.zeros(k, np.int64)
        dist_sum = np.zeros(k, np.float64)
        hist = np.zeros(1 << 16, np.int64)
        # groups of shards per task: the driver sums O(tasks), not O(shards), k-sized vectors
        groups = shard_groups(idx, 2 * par)
        prog = Progress("reduce: stats", len(groups), None, self.quiet)
        for _, st in map_tasks(call, [("group_stats", self.store, g, k) for g in groups], par):
            counts += st["counts"]
            dist_sum += st["dist_sum"]
            hist += st["hist"]
            prog.update()
        prog.close()
        n = int(counts.sum())
        assert n == self.n_rows, f"scores hold {n} rows, the input {self.n_rows}"
        n_keep = cfg.n_keep(n)
        bins = PercentileBins(hist)
        while (req := bins.refine_request()) is not None:
            prefixes, low_bits = req
            sub = np.zeros((len(prefixes), 256), np.int64)
            args = [("group_refine", self.store, g, prefixes, low_bits) for g in groups]
            for _, h in map_tasks(call, args, par):
                sub += h
            bins.apply_refinement(prefixes, low_bits, sub)
        extra: dict[str, Any] = {"percentile": bins.info()}

        dedup = cfg.dedup_eps is not None
        per_cluster = cfg.strategy in ("balanced", "dbp")
        if cfg.strategy not in ("hard", "easy", "random", "balanced", "dbp"):
            raise ValueError(f"strategy '{cfg.strategy}' is not implemented")
        max_rows = RANGE_ROWS
        if dedup and centroids is not None:
            max_rows = max(1, min(RANGE_ROWS, DEDUP_RANGE_FLOATS // max(1, centroids.shape[1])))
        ranges = plan_cluster_ranges(counts, max_rows)
        extra["cluster_ranges"] = len(ranges)
        quotas_now = None
        if per_cluster and not dedup:
            quotas_now, info = self._quotas(counts, dist_sum, n_keep, centroids)
            extra.update(info)
        surv = np.zeros(k, np.int64)
        surv_dist = np.zeros(k, np.float64)
        removed = np.zeros(k, np.int64)
        kept = np.zeros(k, np.int64)
        labels_in: Counter = Counter()
        labels_surv: Counter = Counter()
        labels_kept: Counter = Counter()
        files: list[dict[str, Any]] = []
        annotated: list[str] = []

        def _collect(res: dict[str, Any]) -> None:
            nonlocal kept
            kept = kept + res["kept"]
            labels_kept.update(res["kept_labels"])
            if res["entry"]:
                files.append(res["entry"])

        prog = Progress("reduce: ranges", len(ranges), None, self.quiet)
        dim = int(centroids.shape[1]) if centroids is not None else 0

        def _stream(lo: int, hi: int) -> int | None:  # one cluster too large for memory
            big = dedup and hi - lo == 1 and int(counts[lo]) * dim > DEDUP_RANGE_FLOATS
            return dim if big else None

        # a global rule's first radix-select histogram comes with the range pass
        rule = None if per_cluster else (cfg.strategy, cfg.seed, key_bits(cfg.strategy))
        first_hist = None
        args = [
            ("scoring.annotate", "annotate_range", self.store, idx, part, lo, hi, k, bins,
             cfg.dedup_eps, quotas_now, DEDUP_BLOCK, _stream(lo, hi), DEDUP_RANGE_FLOATS, rule)
            for part, (lo, hi) in enumerate(ranges)
        ]  # fmt: skip
        # dedup's block products run on a GPU when the cluster has one (Ray hides GPUs from
        # tasks that do not ask for one)
        gpu = 1 if dedup and cluster_gpus() > 0 else 0
        for _, res in map_tasks(call_fn, args, max(1, cluster_gpus()) if gpu else par, 1, gpu):
            surv += res["survivors"]
            surv_dist += res["survivor_dist_sum"]
            removed += res["removed"]
            labels_in.update(res["labels"])
            labels_surv.update(res["survivor_labels"])
            if res["annotated"]:
                annotated.append(res["annotated"])
            if "key_hist" in res:
                first_hist = res["key_hist"] + (0 if first_hist is None else first_hist)
            if quotas_now is not None:
                _collect(res)
            prog.update()
        prog.close()
        m = int(surv.sum())
        parts = list(range(len(ranges)))
        if per_cluster and dedup:
            quotas, info = self._quotas(surv, surv_dist, min(n_keep, m), centroids)
            extra.update(info)
            args = [
                ("scoring.annotate", "keep_range_part", self.store, p, quotas, k) for p in parts
            ]
            prog = Progress("reduce: keep", len(parts), None, self.quiet)
            for _, res in map_tasks(call_fn, args, par):
                _collect(res)
                prog.update()
            prog.close()
        elif not per_cluster:
            th, passes = self._global_threshold(parts, min(n_keep, m), m, par, first_hist)
            extra["threshold"] = th.to_json()
            extra["select_passes"] = passes
            args = [
                ("scoring.annotate", "keep_global_part", self.store, p, cfg.strategy, cfg.seed,
                 th, k)
                for p in parts
            ]  # fmt: skip
            prog = Progress("reduce: keep", len(parts), None, self.quiet)
            for _, res in map_tasks(call_fn, args, par):
                _collect(res)
                prog.update()
            prog.close()
        files.sort(key=lambda f: f["path"])
        expect = min(n_keep, m)
        assert int(kept.sum()) == expect, f"kept {int(kept.sum())} rows, expected {expect}"
        if dedup:
            extra["dedup"] = {
                "eps": cfg.dedup_eps,
                "removed": int(removed.sum()),
                "survivors": m,
                "removed_per_cluster": removed.tolist(),
            }
        if cfg.label_column:
            extra["labels"] = {
                "column": cfg.label_column,
                "before": dict(sorted(labels_in.items())),
                "after_dedup": dict(sorted(labels_surv.items())) if dedup else None,
                "after": {key: labels_kept.get(key, 0) for key in sorted(labels_in)},
            }
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
            "annotated": sorted(annotated),
            **extra,
        }

    def _quotas(self, counts, dist_sum, n_keep: int, centroids) -> tuple[np.ndarray, dict]:
        """Per-cluster quotas of balanced or dbp over `counts` rows (all N or the survivors)."""
        if self.cfg.strategy == "balanced":
            return balanced_quotas(counts, n_keep), {}
        from scoring.dbp import dbp_quotas

        if centroids is None:
            centroids = load_committed(self.store)[0]
        q, info = dbp_quotas(centroids, counts, dist_sum, n_keep, self.cfg.dbp_temperature)
        return q, {"dbp": info}

    def _global_threshold(
        self, parts: list[int], n_keep: int, m: int, par: int, first_hist: np.ndarray | None
    ):
        """The exact (key, id) threshold of a global rule over the survivors of all parts.
        `first_hist`: the first digit's histogram, summed from the range pass (no read)."""
        from ray_jobs.workers import call_fn

        cfg = self.cfg
        tot = key_bits(cfg.strategy)
        search = ThresholdSearch(n_keep, m, tot)
        if first_hist is not None and search.request() == ("hist", 0, 0, n_keep):
            search.add_histogram(first_hist)
            search.advance()
        while (req := search.request()) is not None:
            mode, prefix, bits, limit = req
            if mode == "hist":
                args = [
                    ("scoring.annotate", "part_histogram", self.store, p, cfg.strategy, cfg.seed,
                     prefix, bits, tot)
                    for p in parts
                ]  # fmt: skip
                for _, h in map_tasks(call_fn, args, par):
                    search.add_histogram(h)
            else:
                args = [
                    ("scoring.annotate", "part_candidates", self.store, p, cfg.strategy,
                     cfg.seed, prefix, bits, tot, limit)
                    for p in parts
                ]  # fmt: skip
                for _, t in map_tasks(call_fn, args, par):
                    if t is not None:
                        search.add_candidates(t)
            search.advance()
        return search.result, search.passes

    def check_duplicate_ids(self, idx: list[int], par: int) -> None:
        """Find ids that occur more than once, by hash range: each task reads one range of the
        per-shard sorted id hashes (ids/shard-N.parquet) from every shard, so memory is bounded
        by the range, not by N. Fails the run naming the ids and where they occur."""
        from ray_jobs.workers import call
        from scoring.score import hash_ranges

        ranges = hash_ranges(self.n_rows, RANGE_ROWS)
        total = 0
        examples: list[dict[str, Any]] = []
        args = [("duplicate_ids", self.store, idx, lo, hi) for lo, hi in ranges]
        for _, got in map_tasks(call, args, par):
            total += got["count"]
            examples.extend(got["examples"])
        if not total:
            for name in manifest.failures(self.store, "reduce"):
                manifest.clear_failure(self.store, "reduce", name)
            return
        examples.sort(key=lambda d: (d["where"][0], str(d["id"])))

        file_start: dict[str, int] = {}
        for sh in self.shards:
            file_start.setdefault(sh.file, sh.row_offset)

        def where(w: list[list[int]]) -> str:
            return " and ".join(
                f"{self.in_store.uri(self.shards[s].file)} row "
                f"{self.shards[s].row_offset - file_start[self.shards[s].file] + r} (shard {s})"
                for s, r in w
            )

        shown = "; ".join(f"id {d['id']!r} in {where(d['where'])}" for d in examples[:3])
        more = f" (and {total - 3} more)" if total > 3 else ""
        msg = f"column '{self.cfg.id_column}' has {total} duplicate id(s): {shown}{more}"
        files = sorted(
            {self.in_store.uri(self.shards[s].file) for d in examples for s, _ in d["where"]}
        )
        manifest.record_failure(
            self.store,
            "reduce",
            "duplicate-ids",
            {"error": msg, "file": ", ".join(files), "examples": examples[:100]},
        )
        raise RunFailed(f"reduce failed, no manifest committed: {msg}")

    def commit(self, doc: dict[str, Any]) -> None:
        doc["timings_seconds"] = {k: round(v, 3) for k, v in self.timings.items()}
        doc["committed_at"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        if not self.store.put_if_absent(manifest.MANIFEST, manifest.dumps(doc)):
            log.warning("run %s was committed by another driver first", self.store.uri())


def fixed_width(schemas: Iterable[Any], column: str) -> int | None:
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
        r.accept_changed_inputs()
        centroids, sha = r.prototypes()
        r.score(centroids, sha)
    finally:
        r.close_pool()
    doc = r.reduce(sha, centroids)
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
