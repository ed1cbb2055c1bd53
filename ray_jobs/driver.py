"""A run as a sequence of stages: plan -> prototypes (sample, fit) -> score -> reduce -> commit.

The driver holds no large data: the shard plan, per-cluster count vectors (k entries) and a
65,536-bin histogram. Every stage lists its commit markers once and schedules only what is
missing, so a rerun with the same run id resumes. Work runs through `ray_jobs.scheduler`;
what a worker does for one unit is a function of `scoring.stages`.
"""

from __future__ import annotations

import logging
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

from ray_jobs import scheduler as sch
from ray_jobs.progress import Progress
from ray_jobs.progress import configure as configure_progress
from scoring import commit, layout
from scoring.config import RunConfig
from scoring.errors import BadInput, RunFailed, user_cause
from scoring.plan import RunPlan, check_resume, check_sample_plan, plan_input, run_doc
from scoring.stages import reuse
from scoring.stages.sample import SampleTask, digest_task, pick_rows, sample_task
from scoring.storage import Store

log = logging.getLogger("protoprune")
REUSE_THREADS = 16  # concurrent copies of --reuse-scores-from (object-store requests)

__all__ = ["Run", "RunFailed", "run"]


class Run:
    """One run folder and its stages."""

    def __init__(self, cfg: RunConfig, quiet: bool = False):
        self.cfg = cfg
        self.quiet = quiet
        self.in_store = Store(cfg.input, cfg.storage_options)
        self.store = Store(cfg.output, cfg.storage_options).child(cfg.run_id)
        self.timings: dict[str, float] = {}
        self.retried: set[int] = set()  # score shards resubmitted after their worker died
        self.cached: dict[int, Any] = {}  # shard -> ObjectRef of its embeddings (whole sample)
        self.pool: sch.ActorPool | None = None
        self.changed_files: list[str] = []

    @property
    def shards(self):
        return self.plan_.shards

    @property
    def n_rows(self) -> int:
        return self.plan_.n_rows

    def where(self, i: int) -> str:
        return self.in_store.uri(self.shards[i].file)

    def row_groups(self, i: int) -> list[int]:
        """[first, end) of shard i's row groups in its file."""
        return self.shards[i].to_json()["row_groups"]

    # ---- plan and run.json
    def plan(self) -> None:
        t0 = time.perf_counter()
        self.plan_: RunPlan = plan_input(self.cfg, self.in_store)
        self.source = None
        if self.cfg.prototypes_from:  # frozen prototypes: checked before anything is written
            self.source = reuse.load_prototypes(self.cfg.prototypes_from, self.cfg.storage_options)
            reuse.check_source(self.cfg, self.source, self.plan_.embedding_width)
        self.timings["plan"] = time.perf_counter() - t0
        self.open_run_folder()

    def open_run_folder(self) -> None:
        """Write run.json, or check it against this run's plan when resuming (--force-new
        wipes the old run first)."""
        doc = run_doc(self.cfg, self.plan_, self.in_store)
        if self.cfg.force_new and self.store.exists(layout.RUN_JSON):
            removed = commit.wipe_run(self.store)
            log.warning("--force-new: removed %s from %s", ", ".join(removed), self.store.uri())
        if not self.store.exists(layout.RUN_JSON):
            self.store.check_writable()  # a probe inside <output>/<run_id>/, nowhere else
            if self.store.put_if_absent(layout.RUN_JSON, commit.dumps(doc)):
                return
        # resuming (or another driver created the run between our check and our write)
        old = commit.read_json(self.store, layout.RUN_JSON)
        committed = self.store.exists(layout.MANIFEST)
        self.changed_files = check_resume(self.cfg, self.store.uri(), old, doc, committed)
        log.info("resuming run %s", self.store.uri())

    def accept_changed_inputs(self) -> None:
        """Resume over changed input files: check that the committed prototypes' sample is
        unaffected, invalidate the changed files' score markers, then record the new fingerprint.

        Order matters for a crash at any point: markers are deleted before run.json is updated,
        so no stale marker can ever be trusted under the new fingerprint.
        """
        if not self.changed_files:
            return
        changed = set(self.changed_files)
        shards = [s for s in self.shards if s.file in changed]
        marker = commit.load_committed_marker(self.store)
        if marker is not None and marker.get("source"):
            marker = None  # frozen prototypes (--prototypes-from): fitted on no row of this input
        again = "rerun with --force-new or use a new --run-id"
        if marker is not None and (self.cfg.text_column or self.cfg.image_column):
            # checking the sample rows of raw content would need the model: refuse
            raise BadInput(
                f"run {self.store.uri()}: input file(s) {', '.join(sorted(changed))} changed "
                f"after the prototypes were fitted on their embedded rows; {again}"
            )
        if marker is not None:
            digests = marker.get("sample_sha256") or {}
            picks, gone = check_sample_plan(self.cfg, self.plan_, marker, shards, self.store.uri())
            tasks = sch.Tasks(digest_task, 2 * sch.cluster_cpus())
            units = [
                (s.index, self._sample_task(s, picks[s.index])) for s in shards if s.index in picks
            ]
            for i, digest in [(j, None) for j in gone] or sch.run_map(tasks, units):
                if digests.get(str(i)) != digest:
                    raise BadInput(
                        f"run {self.store.uri()}: input file {self.where(i)} changed rows the "
                        f"committed prototypes were fitted on (shard {i}); {again}"
                    )
        for s in shards:
            self.store.delete(layout.marker_key(layout.SCORES, s.index))
        self.store.delete(layout.MANIFEST)
        doc = commit.read_json(self.store, layout.RUN_JSON)
        doc.setdefault("input_history", []).append(
            {
                "at": commit.utc_now(),
                "changed": sorted(changed),
                "old": [f for f in doc["input"]["files"] if f["path"] in changed],
                "shards_redone": [s.index for s in shards],
            }
        )
        doc["input"]["files"] = self.plan_.fingerprint
        commit.write_json(self.store, layout.RUN_JSON, doc)
        log.warning(
            "accepted changed input file(s) %s: redoing shard(s) %s",
            ", ".join(sorted(changed)),
            ", ".join(str(s.index) for s in shards),
        )
        self.changed_files = []

    def _sample_task(self, shard, picks) -> SampleTask:
        return SampleTask(self.cfg, self.in_store, shard, picks)

    def _failures(self, stage: str) -> sch.Failures:
        return sch.Failures(self.store, stage, self.where, self.row_groups)

    # ---- the actor pool (sample of raw content, fit there, score)
    def actors(self, units: int | None = None) -> sch.ActorPool:
        """The run's ShardWorker actors, created once (each loads the embedder once) and
        shared by the sample and score stages; at most one per shard to do (`units`, default
        all shards). max_concurrency=2: an actor reads its next shard while it computes the
        current one. Creation returns at once: the actors start in the background."""
        if self.pool is None:
            import ray

            from ray_jobs.workers import ShardWorker

            n, res, gpu = sch.worker_resources(self.cfg, units or len(self.shards))
            cls = ray.remote(
                max_restarts=self.cfg.max_retries, max_task_retries=0, max_concurrency=2, **res
            )(ShardWorker)
            tag, made = uuid.uuid4().hex[:8], iter(range(1 << 62))

            def make() -> Any:  # named, so an operator (or a fault test) can find it
                name = f"protoprune-score-{self.cfg.run_id}-{tag}-{next(made)}"
                return cls.options(name=name).remote(
                    self.cfg, self.in_store, self.store, None, "", gpu
                )

            self.pool = sch.ActorPool(make, n, self.cfg.max_retries)
        return self.pool

    def close_pool(self) -> None:
        if self.pool is not None:
            self.pool.close()
        self.pool = None

    # ---- prototypes
    def prototypes(self) -> tuple[np.ndarray, str]:
        got = commit.load_committed(self.store)
        if got is not None:
            log.info("prototypes already committed (sha256 %s)", got[1][:12])
            return got
        if self.source is not None:
            reuse.commit_prototypes(self.store, self.source)
            log.info("prototypes from %s (sha256 %s)", self.source.url, self.source.sha256[:12])
            return commit.load_committed(self.store)
        cfg = self.cfg
        picks, plan_sha = self.plan_.sample_picks(cfg)
        total = sum(pick_rows(p) for p in picks.values())
        if total < min(cfg.effective_sample_size, self.n_rows):
            log.warning("k-means sample capped at %d rows (sample memory cap)", total)
        # in shard order = canonical (file, row group, row) order, whatever --shard-rows is
        todo = [(s, picks[s.index]) for s in self.shards if s.index in picks]
        names = [(s.index, self.in_store.uri(s.file)) for s, _ in todo]
        prog = Progress("sample", len(todo), total, self.quiet)
        raw = bool(cfg.text_column or cfg.image_column)
        # Raw content: the ShardWorker actors (the embedder loaded once each) embed only the
        # sample rows; sampling writes nothing, so a lost actor's shard is simply retried.
        # Precomputed embeddings: plain tasks. Sample arrays stay in the object store.
        if raw:
            slots = self.actors()
            slots.call = lambda a, t: a.sample.remote(t.shard, t.picks)
        else:
            slots = sch.Tasks(sample_task, 2 * sch.cluster_cpus())
        units = [(s.index, self._sample_task(s, c)) for s, c in todo]
        refs = {}
        try:
            for _ in sch.run_map(
                slots, units, prog, self._failures(layout.PROTOTYPES), cfg.max_retries,
                rows=len, refs=refs,
            ):  # fmt: skip
                pass
        except BaseException:
            self.close_pool()
            raise
        self.timings["sample"] = prog.close()
        parts = [refs[s.index] for s, _ in todo]
        if raw:  # a shard whose sample is the whole shard keeps its embeddings for scoring
            self.cached = {s.index: refs[s.index] for s, p in todo if pick_rows(p) >= s.rows}
        t1 = time.perf_counter()
        fit = self._fit(parts, names, plan_sha)
        parts.clear()  # release the sample parts from the object store
        commit.clear_failures(self.store, layout.PROTOTYPES)
        self.timings["fit"] = time.perf_counter() - t1  # gather, k-means, commit
        log.info(
            "prototypes: k=%d on %d sampled rows, %s %s on %s, objective %.6g, %d iterations "
            "(%.1fs)",
            cfg.k, fit.sample_rows, fit.stats.get("backend"), fit.stats.get("precision"),
            fit.stats.get("device"), fit.inertia, fit.iterations, fit.seconds,
        )  # fmt: skip
        got = commit.load_committed(self.store)
        assert got is not None
        return got

    def _fit(self, parts: list[Any], names: list[tuple[int, str]], plan_sha: str):
        """The k-means fit: inside an actor of the pool when it holds the cluster's resources,
        else as one task (on a GPU when the cluster has one). A user error is recorded."""
        import ray

        from ray_jobs.workers import fit_task

        try:
            if self.pool is not None:
                return ray.get(self.pool.actors[0].fit.remote(parts, names, plan_sha))
            gpu = sch.cluster_gpus() > 0
            task = ray.remote(num_cpus=1, num_gpus=1 if gpu else 0)(fit_task)
            return ray.get(task.remote(self.cfg, self.store, parts, names, gpu, plan_sha))
        except Exception as e:  # noqa: BLE001 - classified here
            cause = user_cause(e)
            if cause is None:
                raise
            commit.record_failure(self.store, layout.PROTOTYPES, "fit", {"error": str(cause)})
            raise RunFailed(f"prototypes failed, no manifest committed: {cause}") from None

    # ---- score
    def score(self, centroids: np.ndarray, sha: str) -> None:
        import ray

        marks = commit.committed(self.store, layout.SCORES)
        done = commit.current(marks, sha)
        for i in sorted(set(marks) - set(done)):  # names other prototypes: counts as missing
            log.warning("shard %d: marker names other prototypes; redoing it", i)
            self.store.delete(layout.marker_key(layout.SCORES, i))
        todo = [s for s in self.shards if s.index not in done]
        if self.cfg.reuse_scores_from and todo:
            todo = self.reuse_scores(todo, sha)
        log.info("score: %d shards committed, %d to do", len(done), len(todo))
        if not todo:
            self.close_pool()
            return
        proto = [ray.put(centroids), sha]  # nested ref: each actor fetches it once
        cached = self.cached

        def call(actor, shard):
            c = cached.get(shard.index)
            return actor.score.remote(shard, [c] if c is not None else None, proto)

        pool = self.actors(len(todo))
        pool.call = call
        prog = Progress("score", len(todo), sum(s.rows for s in todo), self.quiet)
        units = [(s.index, s) for s in todo]
        for i, summary in sch.run_map(
            pool, units, prog, self._failures(layout.SCORES), self.cfg.max_retries,
            rows=lambda r: r.rows, on_lost=self.retried.add,
        ):  # fmt: skip
            log.info("shard %d scored: %d rows in %.2fs", i, summary.rows, summary.seconds)
        self.close_pool()
        self.cached = {}
        self.timings["score"] = prog.close()

    def reuse_scores(self, todo: list, sha: str) -> list:
        """Copy the committed scores of the unchanged shards of --reuse-scores-from; return
        the shards left to score. The copies are IO (a server-side copy, a hard link): they
        run on threads of the driver while the actors for the shards left start up."""
        old = Store(self.cfg.reuse_scores_from, self.cfg.storage_options)
        plan = reuse.plan_reuse(self.cfg, old, todo, self.in_store, self.plan_.fingerprint, sha)
        left = [s for s in todo if s.index not in plan]
        if left:
            self.actors(len(left))  # started now: their start-up overlaps the copies
        emb = self.cfg.save_embeddings or self.cfg.effective_dedup_eps is not None
        tasks = [
            reuse.ReuseTask(old, self.store, plan[s.index], s, emb, old.uri())
            for s in todo
            if s.index in plan
        ]
        prog = Progress("reuse", len(tasks), None, self.quiet)
        with ThreadPoolExecutor(REUSE_THREADS, thread_name_prefix="reuse") as ex:
            for _ in ex.map(reuse.reuse_shard, tasks):
                prog.update()
        prog.close()
        log.info("score: %d shards reused from %s", len(tasks), old.uri())
        return left

    def commit(self, doc: dict[str, Any]) -> dict[str, Any]:
        """Commit the manifest; the committed one (another driver's when it won)."""
        doc["timings_seconds"] = {k: round(v, 3) for k, v in self.timings.items()}
        marker = commit.load_committed_marker(self.store) or {}
        # what the manifest repeats of the prototypes' marker: which fit ran, and how far
        keys = ("backend", "requested_backend", "device", "precision", "iterations", "tol")
        fit = {key: marker[key] for key in (*keys, "inertia", "seconds") if key in marker}
        if fit:  # the fit that made the prototypes (absent for --prototypes-from)
            doc["kmeans"] = fit
        return commit.commit_run(self.store, doc) or doc


def run(cfg: RunConfig, quiet: bool = False, wait_report: bool = True) -> dict[str, Any]:
    """Run (or resume) a whole pruning job; returns the committed manifest. The report is
    built while the manifest commits; `wait_report=False` returns before it is written
    (`scoring.report.background.wait_all` waits for it)."""
    from ray_jobs.reduce import reduce
    from scoring.report.background import ReportWriter

    configure_progress(log_format=cfg.log_format)
    r = Run(cfg, quiet=quiet)
    done = None if cfg.force_new else commit.read_manifest(r.store)
    if done is not None:
        r.plan()  # committed: check the settings against run.json, start nothing
        log.info("run %s is already committed", r.store.uri())
        return done
    plan_and_start_ray(r, cfg.address)
    # workers the cluster can never place fail the run now, not after the sample and the fit
    sch.worker_resources(cfg, len(r.shards))
    try:
        r.accept_changed_inputs()
        centroids, sha = r.prototypes()
        r.score(centroids, sha)
    finally:
        r.close_pool()
    commit.fault_wait_for_manifest(r.store)
    t0 = time.perf_counter()
    doc = reduce(r, centroids, sha)
    r.timings["reduce"] = time.perf_counter() - t0
    doc.update(reuse.update_record(cfg, r.store, sha))
    report = ReportWriter(r.store, doc)  # built while the manifest commits
    doc = r.commit(doc)
    report.write(doc, wait=wait_report)
    return doc


def plan_and_start_ray(r: Run, address: str | None) -> None:
    """Plan the input (listing, footers, run.json: IO) on a thread while Ray starts on this
    one (ray.init wants the main thread): the two waits overlap (~4 s of Ray start-up and the
    footer reads of every input file)."""
    import ray

    started = not ray.is_initialized()
    with ThreadPoolExecutor(1, thread_name_prefix="plan") as ex:
        planned = ex.submit(r.plan)
        try:
            sch.ensure_ray(address)
        finally:
            try:
                planned.result()  # a bad input's error wins over anything Ray said
            except BaseException:
                if started:
                    sch.shutdown_ray()  # the Ray this run started: nothing left behind
                raise
