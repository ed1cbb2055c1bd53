"""Progress of a stage: a tqdm bar on a terminal, periodic log lines elsewhere, JSON for pipelines.

* stderr is a TTY and the log format is text: one tqdm bar per stage (rows/s, ETA, shards done
  and failed).
* stderr is not a TTY (a Ray job log, a file, CI): no bar and no carriage returns; one log line
  every `interval` seconds and one when the stage ends, e.g.
  `score: 12/40 shards (1 failed), 1.2M/4M rows, 350k rows/s, ETA 8s`.
* log format json: the same lines as JSON objects (see `JsonFormatter`) with the fields `stage`,
  `event` ("progress" or "done"), `shards_done`, `shards_failed`, `shards_total`, `rows`,
  `rows_total`, `rows_per_s`, `eta_s`, `elapsed_s`.
* quiet: nothing at all.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from collections.abc import Callable
from typing import Any, TextIO

log = logging.getLogger("protoprune.progress")

DEFAULT_INTERVAL = 10.0
_settings: dict[str, Any] = {"log_format": "text", "interval": DEFAULT_INTERVAL}


def configure(log_format: str | None = None, interval: float | None = None) -> None:
    """Process-wide defaults for new Progress objects (set once per run by the driver)."""
    if log_format is not None:
        _settings["log_format"] = log_format
    if interval is not None:
        _settings["interval"] = interval


def human(x: float) -> str:
    """1234567 -> '1.23M'."""
    for unit, div in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(x) >= div:
            return f"{x / div:.3g}{unit}"
    return f"{x:.3g}" if isinstance(x, float) and x != int(x) else f"{int(x)}"


def duration(s: float) -> str:
    s = int(round(s))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


class Progress:
    """Progress of one stage. Interface: update(rows, failed) per finished shard; close()."""

    def __init__(
        self,
        desc: str,
        total_shards: int,
        total_rows: int | None,
        quiet: bool,
        *,
        log_format: str | None = None,
        interval: float | None = None,
        stream: TextIO | None = None,
        clock: Callable[[], float] = time.perf_counter,
    ):
        self.desc = desc
        self.quiet = quiet
        self.done = self.failed = 0
        self.rows = 0
        self.total = total_shards
        self.total_rows = total_rows
        self.clock = clock
        self.t0 = clock()
        self.log_format = log_format or _settings["log_format"]
        self.interval = _settings["interval"] if interval is None else interval
        self.stream = stream if stream is not None else sys.stderr
        self._last_line = self.t0
        self.bar = None
        self.mode = "quiet"
        if quiet:
            return
        tty = bool(getattr(self.stream, "isatty", lambda: False)())
        if self.log_format == "text" and tty:
            from tqdm import tqdm

            self.mode = "bar"
            self.bar = tqdm(
                total=total_rows or total_shards,
                desc=desc,
                file=self.stream,
                unit=" rows" if total_rows else " shards",
                unit_scale=True,
                dynamic_ncols=True,
                mininterval=0.5,
            )
            self.bar.set_postfix_str(self._postfix())
        else:
            self.mode = "lines"

    def _postfix(self) -> str:
        return f"shards {self.done}/{self.total} failed {self.failed}"

    def update(self, rows: int = 0, failed: bool = False) -> None:
        """One shard finished (or failed) with `rows` rows."""
        if failed:
            self.failed += 1
        else:
            self.done += 1
        self.rows += rows
        if self.bar is not None:
            self.bar.set_postfix_str(self._postfix(), refresh=False)
            self.bar.update(rows if self.total_rows else (0 if failed else 1))
        elif self.mode == "lines" and self.clock() - self._last_line >= self.interval:
            self._emit("progress")

    def stats(self) -> dict[str, Any]:
        """The numbers of a progress line."""
        elapsed = max(self.clock() - self.t0, 0.0)
        rate = self.rows / elapsed if elapsed > 0 and self.rows else None
        eta = None
        if self.total_rows and rate:
            eta = max(self.total_rows - self.rows, 0) / rate
        elif self.done and elapsed > 0:
            left = max(self.total - self.done - self.failed, 0)
            eta = left * elapsed / (self.done + self.failed)
        return {
            "stage": self.desc,
            "shards_done": self.done,
            "shards_failed": self.failed,
            "shards_total": self.total,
            "rows": self.rows,
            "rows_total": self.total_rows,
            "rows_per_s": round(rate, 1) if rate is not None else None,
            "eta_s": round(eta, 1) if eta is not None else None,
            "elapsed_s": round(elapsed, 3),
        }

    def line(self, event: str = "progress") -> str:
        """The text form of a progress line."""
        s = self.stats()
        parts = [f"{s['shards_done']}/{s['shards_total']} shards"]
        if s["shards_failed"]:
            parts[0] += f" ({s['shards_failed']} failed)"
        if s["rows_total"]:
            parts.append(f"{human(s['rows'])}/{human(s['rows_total'])} rows")
        elif s["rows"]:
            parts.append(f"{human(s['rows'])} rows")
        if s["rows_per_s"]:
            parts.append(f"{human(s['rows_per_s'])} rows/s")
        if event == "done":
            parts.append(f"done in {duration(s['elapsed_s'])}")
        elif s["eta_s"] is not None:
            parts.append(f"ETA {duration(s['eta_s'])}")
        return f"{self.desc}: " + ", ".join(parts)

    def _emit(self, event: str) -> None:
        self._last_line = self.clock()
        fields = dict(self.stats(), event=event)
        log.info(self.line(event), extra={"progress": fields})

    def close(self) -> float:
        """End the stage; returns its seconds."""
        elapsed = self.clock() - self.t0
        if self.bar is not None:
            self.bar.close()
        elif self.mode == "lines":
            self._emit("done")
        self.mode = "closed" if self.mode != "quiet" else "quiet"
        return elapsed


class JsonFormatter(logging.Formatter):
    """One JSON object per log record: time, level, logger, message, and the progress fields."""

    def format(self, record: logging.LogRecord) -> str:
        doc: dict[str, Any] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        progress = getattr(record, "progress", None)
        if isinstance(progress, dict):
            doc.update(progress)
        if record.exc_info:
            doc["exception"] = self.formatException(record.exc_info)
        return json.dumps(doc, default=str)


def use_json_logs(root: logging.Logger | None = None) -> None:
    """Switch every handler of the root logger to JSON lines."""
    root = root or logging.getLogger()
    for h in root.handlers:
        h.setFormatter(JsonFormatter())
