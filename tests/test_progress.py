"""Progress: a bar on a terminal, periodic log lines without carriage returns elsewhere, JSON lines
for pipelines, nothing when quiet; and the CLI's --log-format json / --quiet end to end."""

from __future__ import annotations

import io
import json
import logging
import os
import subprocess
import sys

import pytest

from ray_jobs.progress import JsonFormatter, Progress


class Clock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


class Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.fixture
def captured():
    """Records of the progress logger, formatted as text and as JSON."""
    text, js = io.StringIO(), io.StringIO()
    lg = logging.getLogger("protoprune.progress")
    h1, h2 = logging.StreamHandler(text), logging.StreamHandler(js)
    h1.setFormatter(logging.Formatter("%(message)s"))
    h2.setFormatter(JsonFormatter())
    old = lg.level
    lg.setLevel(logging.INFO)
    lg.addHandler(h1)
    lg.addHandler(h2)
    yield text, js
    lg.removeHandler(h1)
    lg.removeHandler(h2)
    lg.setLevel(old)


def test_log_lines_when_not_a_tty(captured):
    text, js = captured
    stream, clock = io.StringIO(), Clock()
    p = Progress("score", 5, 5000, False, interval=10, stream=stream, clock=clock)
    assert p.mode == "lines"
    clock.t += 4
    p.update(1000)  # 4 s since start: below the interval, no line
    assert text.getvalue() == ""
    clock.t += 6
    p.update(1000)  # 10 s: 2000 rows, 200 rows/s, 3000 left -> ETA 15 s
    clock.t += 1
    p.update(0, failed=True)
    clock.t += 9
    p.update(1000)
    assert p.close() == pytest.approx(20.0)
    lines = text.getvalue().splitlines()
    assert lines == [
        "score: 2/5 shards, 2k/5k rows, 200 rows/s, ETA 15s",
        "score: 3/5 shards (1 failed), 3k/5k rows, 150 rows/s, ETA 13s",
        "score: 3/5 shards (1 failed), 3k/5k rows, 150 rows/s, done in 20s",
    ]
    assert stream.getvalue() == ""  # no bar was drawn
    assert "\r" not in text.getvalue()
    docs = [json.loads(x) for x in js.getvalue().splitlines()]
    assert [d["event"] for d in docs] == ["progress", "progress", "done"]
    assert docs[0] | {"time": None} == {
        "time": None,
        "level": "INFO",
        "logger": "protoprune.progress",
        "message": lines[0],
        "stage": "score",
        "event": "progress",
        "shards_done": 2,
        "shards_failed": 0,
        "shards_total": 5,
        "rows": 2000,
        "rows_total": 5000,
        "rows_per_s": 200.0,
        "eta_s": 15.0,
        "elapsed_s": 10.0,
    }
    assert docs[-1]["shards_failed"] == 1 and docs[-1]["elapsed_s"] == 20.0


def test_eta_by_shards_when_rows_unknown(captured):
    text, _ = captured
    clock = Clock()
    p = Progress("reduce: keep", 4, None, False, interval=0, stream=io.StringIO(), clock=clock)
    clock.t += 3
    p.update()
    assert text.getvalue().splitlines() == ["reduce: keep: 1/4 shards, ETA 9s"]


def test_json_format_even_on_a_tty(captured):
    _, js = captured
    tty = Tty()
    p = Progress("sample", 2, 10, False, log_format="json", interval=0, stream=tty)
    p.update(5)
    p.close()
    assert tty.getvalue() == ""  # pipelines get JSON lines, never a bar
    assert [json.loads(x)["event"] for x in js.getvalue().splitlines()] == ["progress", "done"]


def test_bar_on_a_tty(captured):
    text, _ = captured
    tty = Tty()
    p = Progress("score", 3, 3000, False, stream=tty)
    assert p.mode == "bar"
    p.update(1000)
    p.update(0, failed=True)
    p.update(1000)
    p.close()
    out = tty.getvalue()
    assert "\r" in out and "score" in out and "rows/s" in out
    assert "shards 2/3 failed 1" in out
    assert text.getvalue() == ""  # the bar replaces log lines


def test_quiet_prints_nothing(captured):
    text, js = captured
    for stream in (io.StringIO(), Tty()):
        p = Progress("score", 2, 20, True, interval=0, stream=stream)
        p.update(10)
        p.update(0, failed=True)
        assert p.done == 1 and p.failed == 1
        p.close()
        assert stream.getvalue() == ""
    assert text.getvalue() == "" and js.getvalue() == ""


@pytest.fixture(scope="module")
def demo_input(tmp_path_factory):
    from scoring.demo import make_demo

    tmp = tmp_path_factory.mktemp("prog")
    make_demo(str(tmp / "data"), rows=4000, dim=8, clusters=5, files=2, row_group_rows=500)
    return tmp


def cli_run(tmp, run_id: str, *flags: str) -> subprocess.CompletedProcess:
    args = [sys.executable, "-m", "ray_jobs.cli", "run", "--input", str(tmp / "data")]
    args += ["--output", str(tmp / "runs"), "--run-id", run_id, "--k", "5", "--shard-rows", "1000"]
    return subprocess.run(
        args + list(flags), capture_output=True, text=True, env=dict(os.environ), timeout=300
    )


def test_cli_log_format_json(demo_input):
    r = cli_run(demo_input, "js", "--log-format", "json")
    assert r.returncode == 0, r.stderr[-3000:]
    assert json.loads(r.stdout)["rows_kept"] == 2000
    assert "\r" not in r.stderr
    ours = [json.loads(x) for x in r.stderr.splitlines() if x.startswith("{")]
    # every protoprune log line is JSON: no text-format line of our loggers is left
    assert not [x for x in r.stderr.splitlines() if " INFO protoprune" in x]
    done = {d["stage"]: d for d in ours if d.get("event") == "done"}
    assert set(done) == {"sample", "score", "reduce: stats", "reduce: keep"}
    assert done["score"]["shards_done"] == done["score"]["shards_total"] == 4
    assert done["score"]["rows"] == 4000 and done["score"]["shards_failed"] == 0
    assert done["score"]["rows_per_s"] > 0
    assert any(d.get("logger") == "scoring.report" for d in ours)  # report written, logged
    assert (demo_input / "runs" / "js" / "report" / "index.html").exists()
