"""The HTML report: its numbers against brute force over the run folder, unfinished runs, the dedup
and label sections of a real dedup run, manifest values as tables (never raw dumps), rules the
reading process does not know, S3, the CLI, and a render in headless Chromium."""

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
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from scoring import commit, layout, report, strategies
from scoring.config import make_config
from scoring.storage import Store
from tests.helpers import clustered, emb_array, read_all

N, D, C = 3000, 16, 6
N_PLANTED, EPS = 40, 0.05


def write_text_dataset(root: str, n: int = N, x: np.ndarray | None = None) -> pa.Table:
    """id, embedding, text, label in 3 files with several row groups; returns the whole table."""
    x = clustered(n, D, C, seed=3) if x is None else x
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
    page = store.get_bytes(layout.REPORT).decode()
    assert "protoprune report: r1" in page and "finished" in page
    assert "badge done" in page and "badge running" not in page and "Not finished" not in page
    srcs = imgs(page)
    # distance histogram, clusters, timings: all inline PNGs, nothing fetched from elsewhere
    assert len(srcs) >= 3
    assert all(s.startswith("data:image/png;base64,") for s in srcs)
    assert "http://" not in page and "https://" not in page
    man = commit.read_json(store, layout.MANIFEST)
    assert f"{man['rows_in']:,}" in page and f"{man['rows_kept']:,}" in page


def test_report_built_during_the_commit_is_the_committed_runs(finished):
    """The driver builds the page from the manifest about to be committed, while it commits:
    the same page as one built afterwards from the committed folder (but for its time stamp);
    another driver's manifest (the commit lost) gets a page of its own, written anew."""
    from scoring.report.background import ReportWriter

    _, store, _ = finished
    man = commit.read_json(store, layout.MANIFEST)
    stamp = re.compile(r"report written [0-9T:Z-]+")
    during = report.build_report(store, manifest=dict(man))
    after = report.build_report(store)
    assert stamp.sub("", during) == stamp.sub("", after)
    ours = dict(man, rows_kept=-12345)  # a manifest that lost the commit: not written
    w = ReportWriter(store, ours)
    w.write(man)  # the committed one, another object
    page = store.get_bytes(layout.REPORT).decode()
    assert stamp.sub("", page) == stamp.sub("", after) and "-12,345" not in page


def test_report_numbers_match_brute_force(finished):
    _, store, full = finished
    man = commit.read_json(store, layout.MANIFEST)
    scores = read_all(store, layout.SCORES + "/")
    kept = read_all(store, layout.KEEP + "/")
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
    part.delete(layout.MANIFEST)
    part.delete(layout.KEEP)
    part.delete(layout.REPORT)
    for i in (1, 4):
        part.delete(layout.marker_key(layout.SCORES, i))  # shards 1 and 4 not committed yet
    left = commit.committed(part, layout.SCORES)
    assert main(["report", part.root]) == 0
    assert capsys.readouterr().out.strip() == part.uri(layout.REPORT)
    page = part.get_bytes(layout.REPORT).decode()
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
        if key != layout.RUN_JSON:
            part.delete(key)
    page = report.build_report(part)
    assert "0 of 6 shards scored" in page and "No shard is scored yet" in page


def test_report_errors_name_the_folder(tmp_path, capsys):
    from ray_jobs.cli import main

    assert main(["report", str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "nope: not a protoprune run folder" in err
    assert "Traceback" not in err


@pytest.fixture(scope="module")
def dedup_run(ray_local, tmp_path_factory):
    """A real dedup run (balanced, 50%, eps 0.05, with a label column) on a text dataset with
    planted near-duplicates: (run store, input table, embeddings by id, planted (source, copy)
    id pairs)."""
    from ray_jobs.driver import run

    tmp = tmp_path_factory.mktemp("dedup")
    x = clustered(N, D, C, seed=5)
    rng = np.random.default_rng(6)
    pick = rng.permutation(N)[: 2 * N_PLANTED]
    src, copy = pick[:N_PLANTED], pick[N_PLANTED:]  # disjoint: every pair flags its own row
    x[copy] = x[src] + 1e-4 * rng.normal(size=(N_PLANTED, D)).astype(np.float32)
    full = write_text_dataset(f"{tmp}/data", x=x)
    ids = full["id"].to_numpy()
    run(
        make_config(
            dict(
                input=f"{tmp}/data",
                output=f"{tmp}/runs",
                run_id="dd",
                k=C,
                dedup_eps=EPS,
                strategy="balanced",
                keep_fraction=0.5,
                shard_rows=500,
                label_column="label",
                quiet=True,
            )
        )
    )
    emb = dict(zip(ids.tolist(), x))
    return Store(f"{tmp}/runs/dd"), full, emb, list(zip(ids[src].tolist(), ids[copy].tolist()))


def table_rows(page: str) -> list[str]:
    return re.findall(r"<tr>(.*?)</tr>", page, flags=re.S)


def test_dedup_section_of_a_real_run(dedup_run):
    """The dedup evidence is read from annotated/ (the pipeline writes it nowhere else): the
    flagged count, and flagged rows next to the earlier-ranked rows they duplicate."""
    store, full, emb, planted = dedup_run
    man = commit.read_manifest(store)
    dd = man["dedup"]
    scores = read_all(store, layout.SCORES + "/")
    ann = read_all(store, layout.ANNOTATED + "/")
    assert layout.DUPLICATE not in scores.column_names  # committed scores are never rewritten
    assert sorted(man["annotated"]) == sorted(store.list(layout.ANNOTATED + "/", ".parquet"))
    flagged = set(ann.filter(ann[layout.DUPLICATE])["id"].to_pylist())
    assert len(flagged) == dd["removed"] >= len(planted)
    assert all(a in flagged or b in flagged for a, b in planted)

    d = report.collect(store, example_column="text")
    assert d.duplicates == dd["removed"] and d.duplicates_exact
    assert len(d.duplicate_examples) == report.N_DUPLICATES
    by_id = {r["id"]: r for r in ann.to_pylist()}
    text = dict(zip(full["id"].to_pylist(), full["text"].to_pylist()))
    for ex in d.duplicate_examples:
        r, o = by_id[ex.row.id], by_id[ex.of.id]
        assert r[layout.DUPLICATE] and ex.of.id == r[layout.DUPLICATE_OF]
        assert ex.row.cluster == ex.of.cluster == r["cluster"] == o["cluster"]
        assert (-o["distance"], o["id"]) < (-r["distance"], r["id"])  # ranked earlier
        assert (ex.row.distance, ex.of.distance) == (r["distance"], o["distance"])
        assert ex.similarity == pytest.approx(r[layout.MAX_SIMILARITY], abs=0)
        assert ex.similarity >= 1 - dd["eps"] - 1e-6
        a, b = emb[ex.row.id], emb[ex.of.id]
        cos = float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))
        assert ex.similarity == pytest.approx(cos, abs=1e-4)
        # content of both rows, looked up in their input shards
        assert ex.row.content == text[ex.row.id] and ex.of.content == text[ex.of.id]

    page = report.render_html(d)
    assert "Duplicates removed" in page
    assert f"{dd['removed']:,} rows are flagged" in page
    rows = table_rows(page)
    for ex in d.duplicate_examples:  # each example in one row with the row it duplicates
        assert any(
            f"<td>{ex.row.id}</td>" in r
            and f"<td>{ex.of.id}</td>" in r
            and f"{ex.similarity:.6g}" in r
            and text[ex.row.id] in r
            and text[ex.of.id] in r
            for r in rows
        ), ex
    # removed_per_cluster: a column of the cluster table and a figure, never a raw list
    assert "[" not in page and str(dd["removed_per_cluster"]) not in page
    assert "<th>duplicates removed</th>" in page
    for j, n in enumerate(dd["removed_per_cluster"]):
        assert any(r.startswith(f"<td>{j}</td>") and f'<td class="n">{n:,}</td>' in r for r in rows)
    assert len(imgs(page)) >= 5  # distances, clusters, labels, duplicates, timings


def test_label_section_of_a_real_run(dedup_run):
    """Per-label counts (manifest key `labels`, written by --label-column) against brute force."""
    store, full, _, _ = dedup_run
    man = commit.read_manifest(store)
    lab = dict(zip(full["id"].to_pylist(), full["label"].to_pylist()))
    kept_ids = read_all(store, layout.KEEP + "/")["id"].to_pylist()
    ann = read_all(store, layout.ANNOTATED + "/")
    live = ann.filter(pc.invert(ann[layout.DUPLICATE]))["id"].to_pylist()
    before: dict[str, int] = {}
    after: dict[str, int] = {}
    after_dedup: dict[str, int] = {}
    for v in lab.values():
        before[v] = before.get(v, 0) + 1
    for i in kept_ids:
        after[lab[i]] = after.get(lab[i], 0) + 1
    for i in live:
        after_dedup[lab[i]] = after_dedup.get(lab[i], 0) + 1
    d = report.collect(store, example_column="text")
    rows = report.label_rows(d.manifest)
    assert rows == sorted(
        [(k, before[k], after.get(k, 0)) for k in before], key=lambda r: (-r[1], r[0])
    )
    page = report.render_html(d)
    assert man["labels"]["column"] == "label" and "Labels (column 'label')" in page
    assert "<th>after dedup</th>" in page
    for k in before:
        assert any(
            r.startswith(f"<td>{k}</td>")
            and f'<td class="n">{before[k]:,}</td><td class="n">{after_dedup.get(k, 0):,}</td>'
            f'<td class="n">{after.get(k, 0):,}</td>'
            in r
            for r in table_rows(page)
        )


def test_dedup_examples_from_a_subset_of_score_files(dedup_run):
    """Beyond max_rows the rows' shards are looked up in the chosen score files only: the
    examples found there (with content) come first; the count is still exact (every part's
    flag column is read)."""
    store, full, _, _ = dedup_run
    man = commit.read_manifest(store)
    d = report.collect(store, example_column="text", max_rows=1200)
    assert d.scanned_shards < d.shards_total
    assert d.duplicates == man["dedup"]["removed"]
    assert len(d.duplicate_examples) == report.N_DUPLICATES
    text = dict(zip(full["id"].to_pylist(), full["text"].to_pylist()))
    both = [e.row.shard is not None and e.of.shard is not None for e in d.duplicate_examples]
    assert both == sorted(both, reverse=True)
    for e in d.duplicate_examples:
        for row in (e.row, e.of):
            assert row.content == (text[row.id] if row.shard is not None else None)
    assert "[" not in report.render_html(d)


def test_dbp_lists_render_as_columns_and_a_figure(finished):
    """dbp's complexity and target lists: columns of the cluster table and a figure."""
    from ray_jobs.driver import run

    tmp, _, _ = finished
    doc = run(run_cfg(tmp, "r3", strategy="dbp"))
    store = Store(f"{tmp}/runs/r3")
    d = report.collect(store)
    assert d.per_cluster and d.threshold is None and d.cluster_cut is not None
    page = report.render_html(d)
    assert "[" not in page and "Each cluster has its own cut" in page
    assert "<th>dbp complexity</th>" in page and "<th>dbp target share</th>" in page
    rows = table_rows(page)
    for j in range(C):
        c, p = doc["dbp"]["complexity"][j], doc["dbp"]["target"][j]
        assert any(
            r.startswith(f"<td>{j}</td>") and f">{c:.6g}<" in r and f">{p:.6g}<" in r for r in rows
        )
    assert len(imgs(page)) >= 4  # distances, clusters, dbp, timings


def test_rule_not_registered_here_does_not_crash(finished, tmp_path):
    """A plug-in rule registered in the process that ran the job but not in this one."""
    _, store, _ = finished
    run2 = copy_run(store, str(tmp_path / "plug"))
    man = commit.read_manifest(run2)
    man["strategy"] = "someone_elses_rule"
    commit.write_json(run2, layout.MANIFEST, man)
    d = report.collect(run2)
    assert not d.rule_known and d.threshold is None and d.cluster_cut is None
    page = report.render_html(d)
    assert "someone_elses_rule" in page and "not registered" in page


def test_registered_plug_in_rule_and_unknown_manifest_fields(finished, tmp_path, monkeypatch):
    """The figures follow the registered rule's attributes, not its name; manifest fields the
    report does not know are tables (a per-cluster list becomes a cluster-table column)."""

    class Plug(strategies.ClusterRule):
        name = "plug"
        summary = "a test rule"

    monkeypatch.setitem(strategies.REGISTRY, "plug", Plug())
    _, store, _ = finished
    run2 = copy_run(store, str(tmp_path / "plug"))
    man = commit.read_manifest(run2)
    man["strategy"] = "plug"
    man["plug"] = {"weights": [0.5 + j for j in range(C)], "why": "because"}
    man["history"] = list(range(50))
    man["steps"] = [{"step": i, "rows": 10 * i} for i in range(3)]
    commit.write_json(run2, layout.MANIFEST, man)
    d = report.collect(run2)
    assert d.per_cluster and d.hardest_first is True and d.rule_known
    assert d.threshold is None and d.cluster_cut is not None
    page = report.render_html(d)
    assert "[" not in page and "{" not in page.split("</style>", 1)[1]
    assert "Each cluster has its own cut" in page and "a test rule" in page
    assert "<th>plug.weights</th>" in page and "because" in page
    assert "… and 30 more" in page and "<th>step</th><th>rows</th>" in page


def test_report_failure_does_not_fail_the_run(finished, monkeypatch, caplog):
    from ray_jobs.driver import run

    tmp, _, _ = finished

    def boom(*a, **k):
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(report, "write_report", boom)
    with caplog.at_level(logging.ERROR, logger="protoprune"):
        doc = run(run_cfg(tmp, "r2", strategy="balanced"))
    store = Store(f"{tmp}/runs/r2")
    assert doc["rows_kept"] == doc["n_keep"] and store.exists(layout.MANIFEST)
    assert not store.exists(layout.REPORT)
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
    page = s3.get_bytes(layout.REPORT).decode()
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
        pytest.fail(
            "chromium is not installed (bash tests/install-chromium.sh, part of the README test command)"
        )
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
    assert r.stdout.strip() == part.uri(layout.REPORT)
    page = part.get_bytes(layout.REPORT).decode()
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
    assert "column &#x27;nope&#x27; not found" in part.get_bytes(layout.REPORT).decode()


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
    rj = commit.read_json(run3, layout.RUN_JSON)
    rj["input"]["url"] = dst.uri()
    rj["config"]["image_column"] = "img"
    commit.write_json(run3, layout.RUN_JSON, rj)
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
