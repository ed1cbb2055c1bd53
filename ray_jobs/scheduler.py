"""The one bounded map of the project: units of work over Ray tasks or over an actor pool.

`run_map` keeps a bounded number of units in flight, yields results in completion order and
handles what can go wrong with a unit:

* a user error (`scoring.errors.UserError`, raised in the worker): recorded under
  `_failures/<stage>/` with the unit's file when `failures` is given (the other units go on and
  the map ends with `RunFailed` naming them all), else raised at once; a model that fails to
  load is the same for every unit and is always raised at once;
* a dead worker (its process or node died): with an actor pool the actor is replaced (a new one
  gets units once a ping shows it is up; meanwhile its units go to the live actors) and the unit
  is resubmitted, at most `retries` times, each time ALONE on an idle worker, so a unit that
  kills its worker every time (a poison row) cannot use up the retries of the units that
  happened to share its worker; Ray itself retries tasks (`max_retries`);
* anything else is a bug and propagates.

Progress: one bar per stage (`ray_jobs.progress`), one log line per unit where asked.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from ray_jobs.placement import worker_resources  # noqa: F401 - the pool's size, re-exported
from ray_jobs.progress import Progress
from scoring import commit, layout
from scoring.errors import ModelLoadError, RunFailed, first_line, user_cause
from scoring.storage import Store

log = logging.getLogger("protoprune")

IN_FLIGHT_PER_WORKER = 2  # units queued per actor: it reads the next while computing one


# -- the cluster -------------------------------------------------------------------------------
_started_here = False  # a Ray that ensure_ray started or joined is up


def ensure_ray(address: str | None) -> None:
    """Join a cluster (address, `auto`, or RAY_ADDRESS inside `ray job submit`), else start
    an embedded local Ray. A Ray the caller started (a notebook's, a test's) is used as it is,
    and `shutdown_ray` leaves it up."""
    global _started_here
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
    _started_here = True


def shutdown_ray() -> None:
    """Shut down the Ray that `ensure_ray` started (or disconnect from the cluster it joined);
    a Ray this process did not start through it is left up.

    Ray ends the whole process with exit status 1 when its core worker is reached after the
    shutdown (ray-project/ray#19115). With the CLI's report still being written on its thread
    during the shutdown, that happened to about one poison-shard test run in four (a process
    that ran a failed run before; the exact call was not pinned down). So the caller waits for
    its threads first (`cli.finish_run`), and cyclic garbage, which can hold actor handles and
    object refs of an earlier run, is collected here while the core worker is up."""
    global _started_here
    import gc

    import ray

    if not (_started_here and ray.is_initialized()):
        return
    _started_here = False
    gc.collect()
    ray.shutdown()


def cluster_gpus() -> int:
    import ray

    return int(ray.cluster_resources().get("GPU", 0))


def cluster_cpus() -> int:
    import ray

    return max(1, int(ray.cluster_resources().get("CPU", 1)))


# -- failure records ---------------------------------------------------------------------------
@dataclass
class Failures:
    """Per-unit failures of one stage, recorded at once under _failures/<stage>/ (so `protoprune
    status` shows them while the run goes on) and raised together at the end."""

    store: Store  # the run folder
    stage: str
    where: Callable[[int], str]  # unit -> its input file's URL
    row_groups: Callable[[int], list[int]] | None = None  # unit -> [first, end) of its file

    def __post_init__(self) -> None:
        self.failed: dict[int, str] = {}
        self.old = set(commit.failures(self.store, self.stage))

    def name(self, unit: int) -> str:
        """'shard 3 (s3://b/in/part-001.parquet, row groups 2-3)': who failed, in messages."""
        rg = self.row_groups(unit) if self.row_groups else []
        span = f", row groups {rg[0]}-{rg[1] - 1}" if len(rg) == 2 else ""
        return f"shard {unit} ({self.where(unit)}{span})"

    def record(self, unit: int, msg: str, attempts: int = 1) -> None:
        log.error("%s failed: %s", self.name(unit), msg)
        self.failed[unit] = msg
        rec = {"shard": unit, "file": self.where(unit), "error": msg, "attempts": attempts}
        if self.row_groups:
            rec["row_groups"] = list(self.row_groups(unit))
        commit.record_failure(self.store, self.stage, layout.shard_name(unit), rec)

    def succeeded(self, unit: int) -> None:
        if layout.shard_name(unit) in self.old:
            commit.clear_failure(self.store, self.stage, layout.shard_name(unit))

    def raise_if_any(self) -> None:
        if self.failed:
            names = "; ".join(f"{self.name(i)}: {msg}" for i, msg in sorted(self.failed.items()))
            raise RunFailed(
                f"{len(self.failed)} shard(s) failed in {self.stage}, no manifest committed: "
                f"{names}; the other shards are committed: fix or remove the input, then rerun "
                "with the same --run-id to redo only these"
            )


# -- where units go ----------------------------------------------------------------------------
class Tasks:
    """Slots of a stateless remote function: up to `in_flight` calls at once."""

    def __init__(self, fn: Callable, in_flight: int, num_cpus: float = 1, num_gpus: float = 0):
        import ray

        opts: dict[str, Any] = {"num_cpus": num_cpus, "num_gpus": num_gpus, "max_retries": 3}
        if num_gpus:
            opts["max_calls"] = 0  # GPU tasks reuse their process (Ray's default is 1 call)
        self.remote = ray.remote(**opts)(fn)
        self.in_flight = max(1, int(in_flight))
        self.busy = 0
        self.pings: dict[Any, int] = {}

    def free(self, alone: bool = False) -> int | None:
        return 0 if self.busy < self.in_flight else None

    def submit(self, slot: int, arg: Any, alone: bool = False) -> Any:
        self.busy += 1
        return self.remote.remote(arg)

    def done(self, slot: int, ref: Any) -> None:
        self.busy -= 1

    def ping_done(self, ref: Any) -> None:
        pass


class ActorPool:
    """Slots of long-lived actors (each loads its model once), IN_FLIGHT_PER_WORKER units each.

    `make()` creates one actor (also the replacement of a dead one). `call(actor, arg)`
    submits a unit to it; the pool serves several stages (sample, score), each setting its own
    `call`. A dead actor is killed and replaced at most `retries` times per slot."""

    call: Callable[[Any, Any], Any]

    def __init__(self, make: Callable[[], Any], n: int, retries: int):
        self.make, self.retries = make, retries
        self.actors = [make() for _ in range(n)]
        self.load = [0] * n
        self.up = [True] * n  # n is what the cluster places at once (placement.py)
        self.replaced = [0] * n
        self.alone = [False] * n  # the slot runs a unit that was lost before: nothing else
        self.pings: dict[Any, int] = {}
        self._sent: dict[Any, Any] = {}  # in-flight ref -> the actor it was sent to

    def free(self, alone: bool = False) -> int | None:
        """A slot for one more unit (the least loaded); `alone`: an idle slot only."""
        cap = 1 if alone else IN_FLIGHT_PER_WORKER
        n = len(self.actors)
        free = [i for i in range(n) if self.up[i] and not self.alone[i] and self.load[i] < cap]
        return min(free, key=self.load.__getitem__) if free else None

    def submit(self, slot: int, arg: Any, alone: bool = False) -> Any:
        self.alone[slot] = alone
        self.load[slot] += 1
        ref = self.call(self.actors[slot], arg)
        self._sent[ref] = self.actors[slot]
        return ref

    def done(self, slot: int, ref: Any) -> Any:
        """A unit came back; returns the actor it ran on."""
        self.load[slot] -= 1
        if self.load[slot] == 0:
            self.alone[slot] = False
        return self._sent.pop(ref)

    def lost(self, slot: int, actor: Any) -> None:
        """A unit's actor died: replace it (once per death); the caller retries the unit."""
        import ray

        if actor is self.actors[slot]:  # first news of this actor's death
            ray.kill(self.actors[slot], no_restart=True)
            self.up[slot] = False
            if self.replaced[slot] < self.retries:
                self.replaced[slot] += 1
                self.actors[slot] = self.make()
                self.pings[self.actors[slot].pid.remote()] = slot

    def ping_done(self, ref: Any) -> None:
        import ray

        slot = self.pings.pop(ref)
        try:
            ray.get(ref)
            self.up[slot] = True
        except Exception as e:  # noqa: BLE001 - the slot stays empty
            log.warning("worker %d not replaced: %s", slot, type(e).__name__)

    def close(self) -> None:
        import ray

        for a in self.actors:
            ray.kill(a)
        self.actors = []


# -- the map -----------------------------------------------------------------------------------
def run_map(
    slots: Tasks | ActorPool,
    units: Iterable[tuple[int, Any]],
    progress: Progress | None = None,
    failures: Failures | None = None,
    retries: int = 0,
    rows: Callable[[Any], int] | None = None,
    on_lost: Callable[[int], None] | None = None,
    refs: dict[int, Any] | None = None,
) -> Iterator[tuple[int, Any]]:
    """Yield (unit, result) for each (unit, arg) in completion order; see the module docstring.
    `rows(result)` counts a unit's rows for the progress bar; `on_lost(unit)` is told of each
    unit resubmitted after its worker died; `refs` receives each unit's result ObjectRef (for
    results that stay in the object store for a later stage)."""
    import ray

    queue = list(reversed(list(units)))
    lost: list[tuple[int, Any]] = []  # units whose worker died: retried alone, first
    pending: dict[Any, tuple[int, Any, int]] = {}
    attempts: dict[int, int] = {}
    while queue or lost or pending:
        while True:
            if lost and (slot := slots.free(alone=True)) is not None:
                unit, arg = lost.pop(0)
                pending[slots.submit(slot, arg, alone=True)] = (unit, arg, slot)
            elif queue and (slot := slots.free()) is not None:
                unit, arg = queue.pop()
                pending[slots.submit(slot, arg)] = (unit, arg, slot)
            else:
                break
        if not pending and not slots.pings:
            for unit, _ in lost + queue[::-1]:
                _fail(failures, unit, "no worker left", progress)
            break
        ready, _ = ray.wait(list(pending) + list(slots.pings), num_returns=1)
        ref = ready[0]
        if ref in slots.pings:
            slots.ping_done(ref)
            continue
        unit, arg, slot = pending.pop(ref)
        ran_on = slots.done(slot, ref)
        try:
            result = ray.get(ref)
        except Exception as e:  # noqa: BLE001 - classified below
            cause = user_cause(e)
            if isinstance(cause, ModelLoadError) or (cause is not None and failures is None):
                raise cause from None
            if cause is not None:
                _fail(failures, unit, str(cause), progress)
                continue
            if not isinstance(slots, ActorPool):
                raise
            slots.lost(slot, ran_on)
            attempts[unit] = attempts.get(unit, 0) + 1
            if on_lost is not None:
                on_lost(unit)
            if attempts[unit] > retries:
                msg = f"worker died {attempts[unit]} times ({type(e).__name__}: {first_line(e)})"
                _fail(failures, unit, msg, progress, attempts[unit])
                continue
            log.warning("shard %d: worker lost (%s); retrying", unit, type(e).__name__)
            lost.append((unit, arg))
            continue
        if refs is not None:
            refs[unit] = ref
        if progress is not None:
            progress.update(rows(result) if rows else 0)
        if failures is not None:
            failures.succeeded(unit)
        yield unit, result
    if failures is not None:
        failures.raise_if_any()


def _fail(failures, unit, msg, progress, attempts: int = 1) -> None:
    if failures is None:
        raise RunFailed(f"shard {unit}: {msg}")
    failures.record(unit, msg, attempts)
    if progress is not None:
        progress.update(failed=True)


def map_tasks(
    fn: Callable,
    args: Iterable[Any],
    in_flight: int,
    desc: str | None = None,
    quiet: bool = True,
    num_cpus: float = 1,
    num_gpus: float = 0,
) -> Iterator[Any]:
    """`fn(arg)` for each arg on Ray tasks, at most `in_flight` at once; results in completion
    order; the first user error is raised. `desc` draws a progress bar."""
    args = list(args)
    prog = Progress(desc, len(args), None, quiet) if desc else None
    for _, res in run_map(Tasks(fn, in_flight, num_cpus, num_gpus), enumerate(args), prog):
        yield res
    if prog is not None:
        prog.close()
