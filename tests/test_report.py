"""The HTML report: its numbers against brute force over the run folder, unfinished runs, dedup and
label sections, S3, the CLI, and a render in headless Chromium."""

from __future__ import annotations

import base64
import io
import logging
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from scoring import manifest, report
from scoring.config import make_config
from scoring.storage import Store
from tests.helpers import clustered, emb_array, read_all

N, D, C = 3000, 16, 6


def write_text_dataset(root: str, n: int = N) -> pa.Table:
    """id, embedding, text, label in 3 files with several row groups; returns the whole table."""
    x = clustered(n, D, C, seed=3)
    rng = np.random.default_rng(4)
    ids = np.arange(100, 100 + n, dtype=np.int64)
    labels = np.array(["cat", "dog", "bird", "fish"])[rng.integers(0, 4, n)]
    texts = [f"sentence number {i} about {lab}" for i, lab in zip(ids.tolist(), labels)]
    full = pa.table({"id": ids, "embedding": emb_array(x), "text": texts, "label": labels.tolist()})
    os.makedirs(root, exist_ok=True)
    bounds = np.linspace(0, n, 4).astype(int)
    for f in range(3):
        pq.write_table(
            full.slice(bounds[f], bounds[f + 1] - bounds[f]),
            f"{root}/part-{f}.parquet",
            row_group_size=250,
        )
    return full


def run_cfg(tmp, run_id: str, **kw):
    return make_config(
        dict(
            input=f"{tmp}/data",
            output=f"{tmp}/runs",
            run_id=run_id,
            k=C,
            strategy=kw.pop("strategy", "hard"),
            keep_fraction=0.4,
            shard_rows=500,
            quiet=True,
            **kw,
        )
    )


@pytest.fixture(scope="module")
def finished(ray_local, tmp_path_factory):
    """A real finished run (hard, 40%) on a small text dataset: (tmp, run store, input table)."""
    from ray_jobs.driver import run

    tmp = tmp_path_factory.mktemp("rep")
    full = write_text_dataset(f"{tmp}/data")
    run(run_cfg(tmp, "r1"))
    return tmp, Store(f"{tmp}/runs/r1"), full


def copy_run(src: Store, dst: str) -> Store:
    shutil.copytree(src.root, dst)
    return Store(dst)


def imgs(page: str) -> list[str]:
    return re.findall(r'<img[^>]*\ssrc="([^"]*)"', page)


def test_report_written_at_end_of_run(finished):
    _, store, _ = finished
    page = store.get_bytes(report.REPORT_KEY).decode()
    assert "protoprune report: r1" in page and "finished" in page
    assert "badge done" in page and "badge running" not in page and "Not finished" not in page
    srcs = imgs(page)
    # distance histogram, clusters, timings: all inline PNGs, nothing fetched from elsewhere
    assert len(srcs) >= 3
    assert all(s.startswith("data:image/png;base64,") for s in srcs)
    assert "http://" not in page and "https://" not in page
    man = manifest.read_json(store, manifest.MANIFEST)
    assert f"{man['rows_in']:,}" in page and f"{man['rows_kept']:,}" in page


def test_report_numbers_match_brute_force(finished):
    _, store, full = finished
    man = manifest.read_json(store, manifest.MANIFEST)
    scores = read_all(store, "scores/")
    kept = read_all(store, "keep/")
    d = report.collect(store, example_column="text")
    assert d.finished and d.shards_done == d.shards_total == len(d.run["shards"])
    assert d.scanned_rows == N and float(d.hist_all.sum()) == pytest.approx(N)
    assert float(d.hist_kept.sum()) == pytest.approx(man["n_keep"])
    # hard: the threshold decoded from the manifest is the smallest kept distance, exactly
    kd = kept["distance"].to_numpy()
    assert d.threshold == float(kd.min())
    assert f"{kd.min():.4g}" in d.threshold_label
    # per-cluster numbers
    cl = scores["cluster"].to_numpy()
    assert d.cluster_rows.tolist() == np.bincount(cl, minlength=C).tolist()
    kc = kept["cluster"].to_numpy()
    for j in range(C):
        if (kc == j).any():
            assert d.cluster_cut[j] == kd[kc == j].min()
        else:
            assert np.isnan(d.cluster_cut[j])
    # examples: the largest clusters, easiest and hardest rows by (distance, id)
    largest = np.argsort(-np.bincount(cl, minlength=C), kind="stable")[: report.TOP_CLUSTERS]
    assert list(d.examples) == largest.tolist()
    text = dict(zip(full["id"].to_pylist(), full["text"].to_pylist()))
    rows = scores.to_pylist()
    for j, ex in d.examples.items():
        members = [r for r in rows if r["cluster"] == j]
        easy = sorted(members, key=lambda r: (r["distance"], r["id"]))[: report.N_EXAMPLES]
        hard = sorted(members, key=lambda r: (-r["distance"], r["id"]))[: report.N_EXAMPLES]
        assert [e.id for e in ex["prototypical"]] == [r["id"] for r in easy]
        assert [e.id for e in ex["hardest"]] == [r["id"] for r in hard]
        assert [e.content for e in ex["hardest"]] == [text[r["id"]] for r in hard]
    page = report.render_html(d)
    assert text[d.examples[int(largest[0])]["hardest"][0].id] in page
    # stage timings from the manifest
    stages = [s for s, _, _ in report.stage_timings(d)]
    assert stages == list(man["timings_seconds"])


def test_report_reads_a_bounded_subset(finished):
    _, store, _ = finished
    d = report.collect(store, max_rows=1200)
    assert d.scanned_rows <= 1200 and 0 < d.scanned_shards < d.shards_total
    assert float(d.hist_all.sum()) == pytest.approx(N)  # scaled to all rows
    assert any("of 6 score files" in n for n in d.notes)


def test_report_of_unfinished_run_via_cli(finished, tmp_path, capsys):
    from ray_jobs.cli import main

    _, store, _ = finished
    part = copy_run(store, str(tmp_path / "part"))
    part.delete(manifest.MANIFEST)
    part.delete("keep")
    part.delete(report.REPORT_KEY)
    for i in (1, 4):
        part.delete(manifest.marker_key("scores", i))  # shards 1 and 4 not committed yet
    left = manifest.committed(part, "scores")
    assert main(["report", part.root]) == 0
    assert capsys.readouterr().out.strip() == part.uri(report.REPORT_KEY)
    page = part.get_bytes(report.REPORT_KEY).decode()
    assert "not finished" in page and "Not finished:" in page
    assert f"{len(left)} of 6 shards scored" in page
    d = report.collect(part)
    assert d.rows_done == sum(m["rows"] for m in left.values())
    assert float(d.hist_all.sum()) == pytest.approx(d.rows_done)
    assert d.cluster_kept is None and len(imgs(page)) >= 2
    # --out writes elsewhere and leaves the run folder alone
    out = tmp_path / "elsewhere.html"
    assert main(["report", part.root, "--out", str(out)]) == 0
    assert "not finished" in out.read_text()


def test_report_of_run_with_nothing_scored(finished, tmp_path):
    _, store, _ = finished
    part = copy_run(store, str(tmp_path / "fresh"))
    for key in part.list():
        if key != manifest.RUN_JSON:
            part.delete(key)
    page = report.build_report(part)
    assert "0 of 6 shards scored" in page and "No shard is scored yet" in page


def test_report_errors_name_the_folder(tmp_path, capsys):
    from ray_jobs.cli import main

    assert main(["report", str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "nope: not a protoprune run folder" in err
    assert "Traceback" not in err


def test_dedup_and_label_sections(finished, tmp_path):
    """A run folder whose scores carry `duplicate` flags and whose manifest has per-label counts
    (manifest key `labels`), as the dedup and label-column features write them."""
    _, store, full = finished
    run2 = copy_run(store, str(tmp_path / "dd"))
    n_dup = 0
    for key in run2.list("scores/", suffix=".parquet"):
        t = run2.read_parquet(key)
        flag = pa.array((t["id"].to_numpy() % 37) == 0)
        n_dup += int(np.asarray(flag).sum())
        t = t.append_column("duplicate", flag).append_column(
            "duplicate_of", pa.array(np.where(np.asarray(flag), t["id"].to_numpy() + 1, -1))
        )
        run2.write_parquet(key, t, row_group_size=200)
    man = manifest.read_json(run2, manifest.MANIFEST)
    lab = dict(zip(full["id"].to_pylist(), full["label"].to_pylist()))
    kept_ids = read_all(run2, "keep/")["id"].to_pylist()
    before: dict[str, int] = {}
    after: dict[str, int] = {}
    for v in lab.values():
        before[v] = before.get(v, 0) + 1
    for i in kept_ids:
        after[lab[i]] = after.get(lab[i], 0) + 1
    man["labels"] = {"column": "label", "before": before, "after": after}
    man["dedup"] = {"eps": 0.05, "removed": n_dup}
    manifest.write_json(run2, manifest.MANIFEST, man)

    d = report.collect(run2, example_column="text")
    assert d.duplicates == n_dup
    assert len(d.duplicate_examples) == report.N_DUPLICATES
    assert all(r["id"] % 37 == 0 and r["duplicate_of"] == r["id"] + 1 for r in d.duplicate_examples)
    text = dict(zip(full["id"].to_pylist(), full["text"].to_pylist()))
    assert all(r["content"] == text[r["id"]] for r in d.duplicate_examples)
    rows = report.label_rows(d.manifest)
    assert rows == sorted(
        [(k, before[k], after.get(k, 0)) for k in before], key=lambda r: (-r[1], r[0])
    )
    page = report.render_html(d)
    assert "Labels (column 'label')" in page and "Duplicates removed" in page
    assert f"{n_dup:,} rows are flagged" in page
    for k in before:
        assert f"<td>{k}</td>" in page
    assert len(imgs(page)) >= 4  # + the labels figure


def test_report_failure_does_not_fail_the_run(finished, monkeypatch, caplog):
    from ray_jobs.driver import run

    tmp, _, _ = finished

    def boom(*a, **k):
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(report, "write_report", boom)
    with caplog.at_level(logging.ERROR, logger="protoprune"):
        doc = run(run_cfg(tmp, "r2", strategy="balanced"))
    store = Store(f"{tmp}/runs/r2")
    assert doc["rows_kept"] == doc["n_keep"] and store.exists(manifest.MANIFEST)
    assert not store.exists(report.REPORT_KEY)
    assert any(
        "report not written" in r.getMessage() and "disk on fire" in r.getMessage()
        for r in caplog.records
    )
    # a per-cluster rule has no single threshold: the page says so and draws no line
    d = report.collect(store)
    assert d.threshold is None and "Each cluster has its own cut" in report.render_html(d)


def test_report_on_s3(s3_server, finished):
    _, store, _ = finished
    bucket = s3_server.new_bucket()
    s3 = Store(f"s3://{bucket}/runs/r1")
    for key in store.list():
        if not key.startswith("report/"):
            s3.put_bytes(key, store.get_bytes(key))
    uri = report.write_report(s3)
    assert uri == f"s3://{bucket}/runs/r1/report/index.html"
    page = s3.get_bytes(report.REPORT_KEY).decode()
    assert "protoprune report: r1" in page and len(imgs(page)) >= 3


# -- headless Chromium -----------------------------------------------------------------------
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--hide-scrollbars",
]
# Appended to a copy of the page: after load, count the images that decoded to real pixels.
PROBE = (
    "<script>window.addEventListener('load',()=>{const im=[...document.images];"
    "document.body.setAttribute('data-figs',im.filter(i=>i.complete&&i.naturalWidth>0).length"
    "+'/'+im.length)})</script>"
)


def chromium() -> str:
    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    if not exe:
        pytest.fail("chromium is not installed (apt-get install -y chromium; .ci/run does it)")
    return exe


def run_chromium(args: list[str], profile) -> subprocess.CompletedProcess:
    return subprocess.run(
        [chromium(), *CHROMIUM_FLAGS, f"--user-data-dir={profile}", *args],
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_report_renders_in_headless_chromium(finished, tmp_path):
    from PIL import Image

    _, store, _ = finished
    page = report.build_report(store, example_column="text")
    n_img = len(imgs(page))
    probe = tmp_path / "probe.html"
    probe.write_text(page.replace("</body>", PROBE + "</body>"), encoding="utf-8")
    r = run_chromium(
        ["--virtual-time-budget=5000", "--dump-dom", probe.as_uri()], tmp_path / "profile1"
    )
    dom = r.stdout
    assert r.returncode == 0, r.stderr[-2000:]
    assert f'data-figs="{n_img}/{n_img}"' in dom  # every figure decoded
    for text in (
        "protoprune report: r1",
        "Distance to the nearest prototype",
        "Clusters",
        "Examples from the largest clusters",
        "Stage timings",
        "keep distance ≥",
    ):
        assert text in dom
    # a screenshot of the plain page: a PNG with real content, not a blank canvas
    html_file = tmp_path / "index.html"
    html_file.write_text(page, encoding="utf-8")
    shot = tmp_path / "shot.png"
    r = run_chromium(
        ["--window-size=1200,1600", f"--screenshot={shot}", html_file.as_uri()],
        tmp_path / "profile2",
    )
    assert r.returncode == 0 and shot.exists(), r.stderr[-2000:]
    im = Image.open(io.BytesIO(shot.read_bytes())).convert("RGB")
    assert im.size == (1200, 1600)
    a = np.asarray(im)
    ink = (a.min(axis=2) < 200).mean()  # fraction of non-background pixels
    assert ink > 0.03
    assert len(np.unique(a.reshape(-1, 3), axis=0)) > 50  # figures, not flat colour


def test_cli_report_subprocess(finished, tmp_path):
    """`protoprune report` as a subprocess prints the report URL and exits 0."""
    _, store, _ = finished
    part = copy_run(store, str(tmp_path / "cli"))
    env = dict(os.environ)
    r = subprocess.run(
        [sys.executable, "-m", "ray_jobs.cli", "report", part.root, "--example-column", "text"],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == part.uri(report.REPORT_KEY)
    page = part.get_bytes(report.REPORT_KEY).decode()
    assert "content from column 'text'" in page
    bad = subprocess.run(
        [sys.executable, "-m", "ray_jobs.cli", "report", part.root, "--example-column", "nope"],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    # a missing example column is not fatal: the page says which column and file
    assert bad.returncode == 0
    assert "column &#x27;nope&#x27; not found" in part.get_bytes(report.REPORT_KEY).decode()


def test_image_thumbnails(finished, tmp_path):
    """An image column (PNG bytes) of the input shows as inline thumbnails of the examples."""
    from PIL import Image

    tmp, store, full = finished
    run3 = copy_run(store, str(tmp_path / "img"))

    def png(i: int) -> bytes:
        buf = io.BytesIO()
        Image.new("RGB", (200, 120), ((i * 7) % 256, (i * 13) % 256, 90)).save(buf, "PNG")
        return buf.getvalue()

    src = Store(f"{tmp}/data")
    dst = Store(str(tmp_path / "imgdata"))
    for key in src.list(suffix=".parquet"):
        t = src.read_parquet(key)
        t = t.append_column("img", pa.array([png(i) for i in t["id"].to_pylist()], pa.binary()))
        dst.write_parquet(key, t, row_group_size=250)
    rj = manifest.read_json(run3, manifest.RUN_JSON)
    rj["input"]["url"] = dst.uri()
    rj["config"]["image_column"] = "img"
    manifest.write_json(run3, manifest.RUN_JSON, rj)
    d = report.collect(run3)
    ex = [e for v in d.examples.values() for lst in v.values() for e in lst]
    assert d.example_column == "img" and ex and all(e.is_image for e in ex)
    for e in ex:
        assert e.content.startswith("data:image/png;base64,")
        im = Image.open(io.BytesIO(base64.b64decode(e.content.split(",", 1)[1])))
        assert max(im.size) == report.THUMB_PX
        assert im.getpixel((0, 0))[:2] == ((e.id * 7) % 256, (e.id * 13) % 256)
    page = report.render_html(d)
    assert len(imgs(page)) >= 3 + len(ex)
