"""The run report: one self-contained HTML page (report/index.html) that shows what pruning did.

Everything is read from the run folder through `Store`: run.json (settings, shard plan), the
score markers, the score and keep files, and `_MANIFEST.json` when the run has finished. A run
that is still going (no manifest) gets a report of what is committed so far, marked "not
finished". Memory is bounded: score and keep files are read one row group and a few columns
at a time into fixed-bin histograms, and when a run holds more than `max_rows` rows only an
evenly spaced subset of the files is read (the page says so). Figures are PNGs drawn with
matplotlib (Agg) and inlined as base64, so the page needs no other file and no network.

Manifest keys read: `rows_in`, `rows_kept`, `n_keep`, `strategy`, `metric`, `k`, `threshold`,
`clusters` (`rows`, `kept`, `mean_distance`), `files`, `timings_seconds`, `committed_at`,
`labels` (`{"column": C, "before": {label: n}, "after": {label: n}}`) and, when dedup ran,
`dedup` (any mapping, shown as is). Score columns read: `cluster`, `distance`, `id`, and
`duplicate` / `duplicate_of` when present.
"""

from __future__ import annotations

import base64
import html
import io
import json
import logging
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from scoring import manifest
from scoring.shards import Shard, prefetch_groups, read_groups
from scoring.storage import Store

log = logging.getLogger(__name__)

REPORT_KEY = "report/index.html"
MAX_ROWS = 20_000_000  # rows of score (and of keep) files read for the figures; beyond: subset
N_BINS = 80
TOP_CLUSTERS = 4
N_EXAMPLES = 3
N_DUPLICATES = 8
THUMB_PX = 96
MAX_TEXT = 300


# -- data collection -----------------------------------------------------------------------------
@dataclass
class Example:
    id: Any
    cluster: int
    distance: float
    shard: int
    content: str | None = None  # text, or a data: URL for an image thumbnail
    is_image: bool = False


@dataclass
class ReportData:
    """Everything the page shows; built by `collect`, rendered by `render_html`."""

    uri: str
    run: dict[str, Any]
    manifest: dict[str, Any] | None
    shards_total: int
    shards_done: int
    rows_done: int
    prototypes_committed: bool
    scanned_shards: int = 0
    scanned_rows: int = 0
    bin_edges: np.ndarray | None = None
    hist_all: np.ndarray | None = None  # estimated counts over all rows (scaled when subset)
    hist_kept: np.ndarray | None = None
    kept_scanned_files: int = 0
    kept_total_files: int = 0
    threshold: float | None = None
    threshold_label: str = ""
    cluster_rows: np.ndarray | None = None
    cluster_kept: np.ndarray | None = None
    cluster_mean: np.ndarray | None = None
    cluster_cut: np.ndarray | None = None  # per cluster: min kept distance (hard-first rules)
    examples: dict[int, dict[str, list[Example]]] = field(default_factory=dict)
    example_column: str | None = None
    example_note: str = ""
    duplicates: int | None = None
    duplicate_examples: list[dict[str, Any]] = field(default_factory=list)
    marker_seconds: float = 0.0
    notes: list[str] = field(default_factory=list)

    @property
    def finished(self) -> bool:
        return self.manifest is not None


def _read_json(store: Store, key: str) -> Any | None:
    if not store.exists(key):
        return None
    try:
        return manifest.read_json(store, key)
    except ValueError:
        return None


def _subset(items: list[tuple[str, int]], max_rows: int) -> list[tuple[str, int]]:
    """An evenly spaced subset of (key, rows) whose rows stay within max_rows (at least one)."""
    total = sum(r for _, r in items)
    if total <= max_rows or len(items) <= 1:
        return items
    n = max(1, int(len(items) * max_rows / total))
    picks = np.unique(np.linspace(0, len(items) - 1, n).round().astype(int))
    out, rows = [], 0
    for i in picks:
        if out and rows + items[i][1] > max_rows:
            break
        out.append(items[i])
        rows += items[i][1]
    return out


def _distance_range(store: Store, keys: list[str], metric: str) -> tuple[float, float]:
    """Global min and max of the `distance` column from the Parquet footers' statistics."""
    lo, hi = np.inf, -np.inf
    for key in keys:
        pf = store.parquet_file(key)
        md = pf.metadata
        col = pf.schema_arrow.get_field_index("distance")
        for g in range(md.num_row_groups):
            st = md.row_group(g).column(col).statistics
            if st is None or not st.has_min_max:
                mm = pc.min_max(pf.read_row_group(g, columns=["distance"])["distance"]).as_py()
                smin, smax = mm["min"], mm["max"]
            else:
                smin, smax = st.min, st.max
            if smin is not None:
                lo, hi = min(lo, float(smin)), max(hi, float(smax))
    if not np.isfinite(lo):
        return (0.0, 2.0 if metric == "cosine" else 1.0)
    if hi <= lo:
        hi = lo + 1e-6
    return lo, hi


def _iter_row_groups(store: Store, key: str, columns: list[str]):
    """Yield the file's row groups one at a time (only the columns that exist)."""
    pf = store.parquet_file(key)
    names = pf.schema_arrow.names
    cols = [c for c in columns if c in names]
    groups = range(pf.metadata.num_row_groups)
    prefetch_groups(pf, groups, cols)  # object stores: one GET for the file's columns
    for g in groups:
        yield pf.read_row_group(g, columns=cols)


def _float_from_key(key: int, hardest_first: bool) -> float:
    """Inverse of scoring.select.distance_key for one uint32 key."""
    fk = (~key & 0xFFFFFFFF) if hardest_first else key
    u = (fk & 0x7FFFFFFF) if fk & 0x80000000 else (~fk & 0xFFFFFFFF)
    return float(np.array([u], dtype=np.uint32).view(np.float32)[0])


def _threshold(man: dict[str, Any]) -> tuple[float | None, str]:
    strategy = man.get("strategy")
    th = man.get("threshold")
    if strategy not in ("hard", "easy") or not isinstance(th, dict):
        return None, ""
    if th.get("keep_all") or th.get("keep_none"):
        return None, ""
    if th.get("distance") is not None:
        d = float(th["distance"])
    elif th.get("key") is not None:
        d = _float_from_key(int(th["key"]), strategy == "hard")
    else:
        return None, ""
    op = "≥" if strategy == "hard" else "≤"
    return d, f"keep distance {op} {d:.4g}"


def collect(
    store: Store,
    example_column: str | None = None,
    max_rows: int = MAX_ROWS,
    n_bins: int = N_BINS,
) -> ReportData:
    """Read what the run folder holds into a ReportData (bounded memory, Store IO only)."""
    run = _read_json(store, manifest.RUN_JSON)
    if run is None:
        raise ValueError(f"{store.uri()}: not a protoprune run folder (no {manifest.RUN_JSON})")
    man = _read_json(store, manifest.MANIFEST)
    cfg = run.get("config", {})
    shards = [Shard.from_json(s) for s in run.get("shards", [])]
    proto = _read_json(store, "prototypes/_COMMITTED.json")
    proto_sha = (proto or {}).get("sha256")
    markers = {
        i: m
        for i, m in manifest.committed(store, "scores").items()
        if proto_sha is None or m.get("prototypes_sha256") in (None, proto_sha)
    }
    data = ReportData(
        uri=store.uri(),
        run=run,
        manifest=man,
        shards_total=len(shards),
        shards_done=len(markers),
        rows_done=sum(int(m.get("rows", 0)) for m in markers.values()),
        prototypes_committed=proto is not None,
        marker_seconds=sum(float(m.get("seconds", 0.0)) for m in markers.values()),
    )
    metric = (man or {}).get("metric") or cfg.get("metric", "cosine")
    k = int((man or {}).get("k") or cfg.get("k") or 0)
    score_files = [
        (f"scores/shard-{i:06d}.parquet", int(m.get("rows", 0))) for i, m in sorted(markers.items())
    ]
    if not score_files:
        data.notes.append("No shard is scored yet: nothing to plot.")
        return data
    chosen = _subset(score_files, max_rows)
    data.scanned_shards = len(chosen)
    if len(chosen) < len(score_files):
        data.notes.append(
            f"Distances and examples are read from {len(chosen)} of {len(score_files)} score "
            f"files (evenly spaced); histogram counts are scaled to all rows."
        )
    keys = [key for key, _ in chosen]
    lo, hi = _distance_range(store, keys, metric)
    edges = np.linspace(lo, hi, n_bins + 1)
    data.bin_edges = edges
    hist = np.zeros(n_bins, np.int64)
    counts = np.zeros(max(k, 1), np.int64)
    dups = 0
    has_dup = False
    for key in keys:
        for t in _iter_row_groups(store, key, ["cluster", "distance", "id", "duplicate"]):
            d = t["distance"].to_numpy(zero_copy_only=False)
            hist += np.histogram(d, bins=edges)[0]
            cl = t["cluster"].to_numpy(zero_copy_only=False)
            if len(cl) and cl.max() >= len(counts):
                counts = np.concatenate([counts, np.zeros(int(cl.max()) + 1 - len(counts), int)])
            counts += np.bincount(cl, minlength=len(counts))
            if "duplicate" in t.column_names:
                has_dup = True
                dmask = t["duplicate"].fill_null(False)
                dups += int(pc.sum(dmask).as_py() or 0)
    data.scanned_rows = int(hist.sum())
    scale = data.rows_done / max(data.scanned_rows, 1)
    data.hist_all = hist * scale

    if man is not None:
        cl = man.get("clusters", {})
        data.cluster_rows = np.asarray(cl.get("rows", counts), np.int64)
        if cl.get("kept") is not None:
            data.cluster_kept = np.asarray(cl["kept"], np.int64)
        if cl.get("mean_distance") is not None:
            data.cluster_mean = np.asarray(cl["mean_distance"], np.float64)
        data.threshold, data.threshold_label = _threshold(man)
        _collect_kept(store, data, man, max_rows)
    else:
        data.cluster_rows = counts
        data.notes.append(
            "Cluster sizes count the scored shards only; nothing is kept before the run commits."
        )
    if has_dup:
        data.duplicates = int(round(dups * scale))
        data.duplicate_examples = _duplicate_examples(store, keys)
    top = [int(j) for j in np.argsort(-data.cluster_rows, kind="stable")[:TOP_CLUSTERS]]
    top = [j for j in top if data.cluster_rows[j] > 0]
    data.examples = _cluster_examples(store, keys, top)
    col = example_column or cfg.get("text_column") or cfg.get("image_column")
    if col:
        _attach_content(store, data, run, col, shards)
    return data


def _collect_kept(store: Store, data: ReportData, man: dict[str, Any], max_rows: int) -> None:
    files = [(f["path"], int(f.get("rows", 0))) for f in man.get("files", [])]
    data.kept_total_files = len(files)
    if not files or data.bin_edges is None:
        data.hist_kept = np.zeros(len(data.bin_edges) - 1 if data.bin_edges is not None else 0)
        return
    chosen = _subset(files, max_rows)
    data.kept_scanned_files = len(chosen)
    edges = data.bin_edges
    hist = np.zeros(len(edges) - 1, np.int64)
    k = len(data.cluster_rows) if data.cluster_rows is not None else 0
    cut = np.full(k, np.inf)
    read = 0
    for key, _ in chosen:
        for t in _iter_row_groups(store, key, ["cluster", "distance"]):
            d = t["distance"].to_numpy(zero_copy_only=False)
            # out-of-range values (sampled score files) go to the edge bins
            hist += np.histogram(np.clip(d, edges[0], edges[-1]), bins=edges)[0]
            read += len(d)
            if k:
                np.minimum.at(cut, t["cluster"].to_numpy(zero_copy_only=False), d)
    rows_kept = int(man.get("rows_kept", read))
    data.hist_kept = hist * (rows_kept / max(read, 1))
    if len(chosen) == len(files) and man.get("strategy") in ("balanced", "dbp", "hard"):
        data.cluster_cut = np.where(np.isfinite(cut), cut, np.nan)
    if len(chosen) < len(files):
        data.notes.append(
            f"The kept-rows histogram is read from {len(chosen)} of {len(files)} keep files."
        )


def _cluster_examples(
    store: Store, keys: list[str], top: list[int]
) -> dict[int, dict[str, list[Example]]]:
    """The N_EXAMPLES easiest and hardest rows of each top cluster (ties by id)."""
    if not top:
        return {}
    parts: dict[int, list[pa.Table]] = {j: [] for j in top}
    for key in keys:
        shard = int(key.rsplit("-", 1)[1].split(".")[0])
        pf = store.parquet_file(key)
        col = pf.schema_arrow.get_field_index("cluster")
        for g in range(pf.metadata.num_row_groups):
            st = pf.metadata.row_group(g).column(col).statistics
            if st is not None and st.has_min_max and not any(st.min <= j <= st.max for j in top):
                continue
            t = read_groups(pf, [g], ["id", "cluster", "distance"])
            for j in top:
                sub = t.filter(pc.equal(t["cluster"], j))
                if sub.num_rows:
                    sub = sub.append_column("shard", pa.array([shard] * sub.num_rows, pa.int32()))
                    parts[j].append(_extremes(sub))
            for j in top:  # keep memory bounded: reduce as we go
                if len(parts[j]) > 8:
                    parts[j] = [_extremes(pa.concat_tables(parts[j]))]
    out: dict[int, dict[str, list[Example]]] = {}
    for j in top:
        if not parts[j]:
            continue
        t = pa.concat_tables(parts[j])
        rows = t.to_pylist()
        easy = sorted(rows, key=lambda r: (r["distance"], r["id"]))[:N_EXAMPLES]
        hard = sorted(rows, key=lambda r: (-r["distance"], r["id"]))[:N_EXAMPLES]
        out[j] = {
            "prototypical": [
                Example(r["id"], j, float(r["distance"]), int(r["shard"])) for r in easy
            ],
            "hardest": [Example(r["id"], j, float(r["distance"]), int(r["shard"])) for r in hard],
        }
    return out


def _extremes(t: pa.Table) -> pa.Table:
    if t.num_rows <= 2 * N_EXAMPLES:
        return t
    asc = pc.sort_indices(t, sort_keys=[("distance", "ascending"), ("id", "ascending")])
    desc = pc.sort_indices(t, sort_keys=[("distance", "descending"), ("id", "ascending")])
    idx = np.unique(np.concatenate([asc[:N_EXAMPLES].to_numpy(), desc[:N_EXAMPLES].to_numpy()]))
    return t.take(pa.array(idx))


def _duplicate_examples(store: Store, keys: list[str]) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for key in keys:
        shard = int(key.rsplit("-", 1)[1].split(".")[0])
        cols = ["id", "cluster", "distance", "duplicate", "duplicate_of"]
        for t in _iter_row_groups(store, key, cols):
            if "duplicate" not in t.column_names:
                return out
            sub = t.filter(t["duplicate"].fill_null(False))
            for r in sub.slice(0, N_DUPLICATES - len(out)).to_pylist():
                r["shard"] = shard
                out.append(r)
            if len(out) >= N_DUPLICATES:
                return out
    return out


def _attach_content(
    store: Store, data: ReportData, run: dict[str, Any], column: str, shards: list[Shard]
) -> None:
    """Read `column` of the example ids from their input shards (shard N of the plan)."""
    cfg = run.get("config", {})
    id_col = cfg.get("id_column", "id")
    url = run.get("input", {}).get("url")
    if not url:
        return
    in_store = Store(url, store.storage_options)
    wanted: dict[int, set] = {}
    items: list[Any] = [e for ex in data.examples.values() for lst in ex.values() for e in lst]
    for e in items:
        wanted.setdefault(e.shard, set()).add(e.id)
    for r in data.duplicate_examples:
        wanted.setdefault(r["shard"], set()).add(r["id"])
    found: dict[Any, Any] = {}
    by_index = {s.index: s for s in shards}
    try:
        for idx, ids in sorted(wanted.items()):
            shard = by_index[idx]
            pf = in_store.parquet_file(shard.file)
            if column not in pf.schema_arrow.names:
                raise ValueError(
                    f"{in_store.uri(shard.file)}: column '{column}' not found "
                    f"(columns: {', '.join(pf.schema_arrow.names)})"
                )
            for g in shard.row_groups:
                t = read_groups(pf, [g], [id_col, column])
                m = pc.is_in(t[id_col], value_set=pa.array(list(ids), t[id_col].type))
                for r in t.filter(m).to_pylist():
                    found[r[id_col]] = r[column]
    except (ValueError, KeyError, OSError) as e:
        data.example_note = f"could not read column '{column}': {e}"
        log.warning("report: %s", data.example_note)
        return
    data.example_column = column
    image = bool(cfg.get("image_column")) and column == cfg.get("image_column")
    for e in items:
        e.content, e.is_image = _render_value(found.get(e.id), image, in_store)
    for r in data.duplicate_examples:
        r["content"], r["is_image"] = _render_value(found.get(r["id"]), image, in_store)


def _render_value(v: Any, image: bool, in_store: Store) -> tuple[str | None, bool]:
    if v is None:
        return None, False
    raw: bytes | None = None
    if isinstance(v, dict):  # {"bytes": ..., "path": ...} (Hugging Face image struct)
        raw = v.get("bytes")
        v = raw if raw is not None else v.get("path")
    if isinstance(v, (bytes, bytearray)):
        raw = bytes(v)
    elif image and isinstance(v, str):
        try:
            raw = (Store(v) if "://" in v else in_store).get_bytes(v if "://" not in v else "")
        except (OSError, ValueError):
            return v[:MAX_TEXT], False
    if raw is not None:
        thumb = _thumbnail(raw)
        if thumb:
            return thumb, True
        return f"<{len(raw)} bytes>", False
    s = str(v)
    return (s if len(s) <= MAX_TEXT else s[:MAX_TEXT] + "…"), False


def _thumbnail(raw: bytes) -> str | None:
    try:
        from PIL import Image

        im = Image.open(io.BytesIO(raw))
        im.thumbnail((THUMB_PX, THUMB_PX))
        buf = io.BytesIO()
        im.convert("RGB").save(buf, format="PNG", optimize=True)
        return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
    except Exception:  # noqa: BLE001 - a bad image shows as bytes, not as a failed report
        return None


# -- figures ----------------------------------------------------------------------------------
KEPT_COLOR = "#1f77b4"
REMOVED_COLOR = "#c7c7c7"
LINE_COLOR = "#d62728"


def _plt():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _png(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    _plt().close(fig)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def fig_distances(data: ReportData) -> str | None:
    if data.bin_edges is None or data.hist_all is None:
        return None
    plt = _plt()
    e = data.bin_edges
    fig, ax = plt.subplots(figsize=(8.5, 3.0))
    all_label = "all rows" if data.finished else "rows scored so far"
    ax.stairs(data.hist_all, e, fill=True, color=REMOVED_COLOR, label=all_label)
    if data.hist_kept is not None and len(data.hist_kept):
        ax.stairs(data.hist_kept, e, fill=True, color=KEPT_COLOR, alpha=0.85, label="kept")
    if data.threshold is not None:
        ax.axvline(data.threshold, color=LINE_COLOR, lw=2, label=data.threshold_label)
    metric = (data.manifest or {}).get("metric") or data.run.get("config", {}).get("metric")
    ax.set_xlabel(
        "distance to nearest prototype" + (" (1 − cos)" if metric == "cosine" else " (L2)")
    )
    ax.set_ylabel("rows")
    ax.legend(loc="upper right", frameon=False)
    ax.spines[["top", "right"]].set_visible(False)
    return _png(fig)


def fig_clusters(data: ReportData) -> str | None:
    if data.cluster_rows is None or not len(data.cluster_rows):
        return None
    plt = _plt()
    rows = data.cluster_rows
    order = np.argsort(-rows, kind="stable")
    x = np.arange(len(rows))
    grey = "removed" if data.cluster_kept is not None else "rows scored so far"
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.0), gridspec_kw={"width_ratios": [3, 2]})
    ax = axes[0]
    if len(rows) <= 120:
        ax.bar(x, rows[order], color=REMOVED_COLOR, width=0.9, label=grey)
        if data.cluster_kept is not None:
            ax.bar(x, data.cluster_kept[order], color=KEPT_COLOR, width=0.9, label="kept")
    else:
        ax.fill_between(x, rows[order], step="mid", color=REMOVED_COLOR, label=grey)
        if data.cluster_kept is not None:
            ax.fill_between(x, data.cluster_kept[order], step="mid", color=KEPT_COLOR, label="kept")
    ax.set_xlabel("clusters, largest first")
    ax.set_ylabel("rows")
    ax.set_title("cluster sizes", fontsize=10)
    ax.legend(frameon=False)
    ax.spines[["top", "right"]].set_visible(False)
    ax = axes[1]
    if data.cluster_kept is not None:
        nz = rows > 0
        frac = np.divide(data.cluster_kept, np.maximum(rows, 1))
        c = data.cluster_mean[nz] if data.cluster_mean is not None else KEPT_COLOR
        sc = ax.scatter(rows[nz], frac[nz], s=14, c=c, cmap="viridis")
        if data.cluster_mean is not None:
            fig.colorbar(sc, ax=ax, label="mean distance")
        ax.set_xscale("log" if rows[nz].max() > 20 * max(rows[nz].min(), 1) else "linear")
        ax.set_ylim(-0.03, 1.03)
        ax.set_xlabel("cluster size (rows)")
        ax.set_ylabel("kept fraction")
        ax.set_title("kept fraction per cluster", fontsize=10)
    else:
        ax.axis("off")
        ax.text(0.5, 0.5, "kept fractions appear\nwhen the run commits", ha="center")
    ax.spines[["top", "right"]].set_visible(False)
    fig.tight_layout()
    return _png(fig)


def label_rows(man: dict[str, Any] | None) -> list[tuple[str, int, int]]:
    """(label, before, after) from manifest['labels'], largest first."""
    lab = (man or {}).get("labels")
    if not isinstance(lab, dict) or not isinstance(lab.get("before"), dict):
        return []
    after = lab.get("after") or {}
    rows = [
        (str(k), int(v), int(after.get(k, after.get(str(k), 0)))) for k, v in lab["before"].items()
    ]
    return sorted(rows, key=lambda r: (-r[1], r[0]))


def fig_labels(data: ReportData) -> str | None:
    rows = label_rows(data.manifest)[:30]
    if not rows:
        return None
    plt = _plt()
    rows = rows[::-1]
    fig, ax = plt.subplots(figsize=(8.5, 0.6 + 0.26 * len(rows)))
    y = np.arange(len(rows))
    frac = [a / b if b else 0.0 for _, b, a in rows]
    ax.barh(y, frac, color=KEPT_COLOR)
    overall = (data.manifest or {}).get("rows_kept", 0) / max(
        (data.manifest or {}).get("rows_in", 1), 1
    )
    ax.axvline(overall, color=LINE_COLOR, ls="--", label=f"overall {overall:.1%}")
    ax.set_yticks(y, [f"{lab} ({b:,})" for lab, b, _ in rows])
    ax.set_xlim(0, 1)
    ax.set_xlabel("kept fraction")
    ax.legend(frameon=False, loc="lower right")
    ax.spines[["top", "right"]].set_visible(False)
    return _png(fig)


def stage_timings(data: ReportData) -> list[tuple[str, float, float | None]]:
    """(stage, seconds, rows/s or None)."""
    man = data.manifest or {}
    t = man.get("timings_seconds") or {}
    n = man.get("rows_in") or data.run.get("input", {}).get("rows") or 0
    out = []
    for stage, secs in t.items():
        secs = float(secs)
        rate = n / secs if secs > 0 and stage != "plan" and n else None
        out.append((stage, secs, rate))
    return out


def fig_timings(data: ReportData) -> str | None:
    rows = stage_timings(data)
    if not rows:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(8.5, 0.7 + 0.35 * len(rows)))
    y = np.arange(len(rows))[::-1]
    secs = [s for _, s, _ in rows]
    ax.barh(y, secs, color=KEPT_COLOR)
    for yi, (_, s, rate) in zip(y, rows):
        txt = f" {s:.1f}s" + (f"  ({_human(rate)} rows/s)" if rate else "")
        ax.text(s, yi, txt, va="center", fontsize=9)
    ax.set_yticks(y, [name for name, _, _ in rows])
    ax.set_xlabel("seconds")
    ax.set_xlim(0, max(secs) * 1.45 + 1e-9)
    ax.spines[["top", "right"]].set_visible(False)
    return _png(fig)


def _human(x: float) -> str:
    for unit, div in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(x) >= div:
            return f"{x / div:.3g}{unit}"
    return f"{x:.3g}"


# -- HTML ---------------------------------------------------------------------------------------
CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:0;
 color:#222;background:#fafafa}
main{max-width:1100px;margin:0 auto;padding:18px 24px 40px}
h1{font-size:22px;margin:8px 0 4px} h2{font-size:17px;margin:26px 0 8px;
 border-bottom:1px solid #ddd;padding-bottom:4px} h3{font-size:14px;margin:14px 0 6px}
.sub{color:#666;font-size:13px}
.badge{display:inline-block;padding:2px 10px;border-radius:10px;font-size:13px;
 font-weight:600;vertical-align:middle;margin-left:8px}
.done{background:#dff3e4;color:#17622f} .running{background:#fde2e1;color:#9b1c1c}
.banner{background:#fff4d6;border:1px solid #e6c65c;padding:10px 14px;margin:12px 0;
 border-radius:6px}
.cards{display:flex;flex-wrap:wrap;gap:10px;margin:12px 0}
.card{background:#fff;border:1px solid #e2e2e2;border-radius:8px;padding:8px 14px;min-width:120px}
.card b{display:block;font-size:20px} .card span{color:#666;font-size:12px}
table{border-collapse:collapse;font-size:13px;background:#fff}
td,th{border:1px solid #e2e2e2;padding:3px 8px;text-align:left;vertical-align:top}
th{background:#f1f1f1} td.n{text-align:right;font-variant-numeric:tabular-nums}
img.fig{max-width:100%;background:#fff;border:1px solid #eee;border-radius:6px}
.ex{display:grid;grid-template-columns:1fr 1fr;gap:12px}
.ex div{background:#fff;border:1px solid #e2e2e2;border-radius:6px;padding:6px 10px}
.ex ol{margin:4px 0;padding-left:20px;font-size:13px} .ex li{margin:3px 0}
.d{color:#888;font-size:11px} .note{color:#666;font-size:12px}
details{margin:8px 0} summary{cursor:pointer;color:#444}
"""


def _e(x: Any) -> str:
    return html.escape(str(x), quote=True)


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.6g}"
    if isinstance(v, int) and not isinstance(v, bool):
        return f"{v:,}"
    if isinstance(v, (dict, list)):
        return json.dumps(v)
    return str(v)


def _table(rows: list[list[Any]], head: list[str] | None = None, num: set[int] = frozenset()):
    out = ["<table>"]
    if head:
        out.append("<tr>" + "".join(f"<th>{_e(h)}</th>" for h in head) + "</tr>")
    for r in rows:
        cells = [
            f'<td class="n">{_e(_fmt(c))}</td>' if i in num else f"<td>{_e(_fmt(c))}</td>"
            for i, c in enumerate(r)
        ]
        out.append("<tr>" + "".join(cells) + "</tr>")
    out.append("</table>")
    return "".join(out)


def _img(src: str | None, alt: str) -> str:
    if not src:
        return f'<p class="note">({_e(alt)}: no figure; install matplotlib for figures)</p>'
    return f'<img class="fig" src="{src}" alt="{_e(alt)}">'


def _example_li(e: Example) -> str:
    if e.content and e.is_image:
        body = f'<img src="{e.content}" alt="id {_e(e.id)}" width="{THUMB_PX}"> '
    elif e.content is not None:
        body = _e(e.content) + " "
    else:
        body = ""
    return f'<li>{body}<span class="d">id {_e(e.id)} · distance {e.distance:.4g}</span></li>'


def render_html(data: ReportData) -> str:
    """The whole page as one string (figures inline)."""
    man = data.manifest
    run = data.run
    cfg = run.get("config", {})
    run_id = run.get("run_id") or cfg.get("run_id", "")
    try:
        plt_ok = True
        figs = {
            "dist": fig_distances(data),
            "clusters": fig_clusters(data),
            "labels": fig_labels(data),
            "timings": fig_timings(data),
        }
    except ImportError:
        plt_ok = False
        figs = {}
    p: list[str] = [
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>",
        "<meta name='viewport' content='width=device-width, initial-scale=1'>",
        f"<title>protoprune report: {_e(run_id)}</title><style>{CSS}</style></head><body><main>",
    ]
    badge = (
        '<span class="badge done">finished</span>'
        if data.finished
        else '<span class="badge running">not finished</span>'
    )
    p.append(f"<h1>protoprune report: {_e(run_id)}{badge}</h1>")
    when = (man or {}).get("committed_at") or run.get("created_at", "")
    p.append(
        f'<div class="sub">{_e(data.uri)} · '
        f"{'committed' if data.finished else 'started'} {_e(when)} · "
        f"report written {_e(time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime()))}</div>"
    )
    if not data.finished:
        p.append(
            '<div class="banner"><b>Not finished:</b> this run has no _MANIFEST.json yet, so '
            "there is no final keep list. Shown: what is committed so far "
            f"({data.shards_done} of {data.shards_total} shards scored, "
            f"{data.rows_done:,} rows; prototypes "
            f"{'committed' if data.prototypes_committed else 'not committed yet'}).</div>"
        )
    # summary cards
    n_in = (man or {}).get("rows_in", run.get("input", {}).get("rows", 0))
    cards = [("rows in", f"{int(n_in):,}")]
    if man:
        kept = int(man.get("rows_kept", 0))
        cards += [("rows kept", f"{kept:,}"), ("kept", f"{kept / max(int(n_in), 1):.1%}")]
    else:
        cards += [("shards scored", f"{data.shards_done} / {data.shards_total}")]
    cards += [
        ("strategy", (man or {}).get("strategy", cfg.get("strategy", ""))),
        ("prototypes k", _fmt((man or {}).get("k", cfg.get("k", "")))),
        ("metric", (man or {}).get("metric", cfg.get("metric", ""))),
    ]
    if data.duplicates is not None:
        cards.append(("duplicates removed", f"{data.duplicates:,}"))
    p.append(
        '<div class="cards">'
        + "".join(f'<div class="card"><b>{_e(v)}</b><span>{_e(k)}</span></div>' for k, v in cards)
        + "</div>"
    )
    for n in data.notes:
        p.append(f'<p class="note">{_e(n)}</p>')
    if not plt_ok:
        p.append('<p class="note">matplotlib is not installed: figures are left out.</p>')

    p.append("<h2>Distance to the nearest prototype</h2>")
    if figs.get("dist"):
        cap = (
            ("Grey: all rows; blue: kept rows. " if data.finished else "Rows scored so far. ")
            + (f"Red line: {_e(data.threshold_label)}. " if data.threshold is not None else "")
            + (
                "Each cluster has its own cut (per-cluster quotas)."
                if (man or {}).get("strategy") in ("balanced", "dbp")
                else ""
            )
        )
        p.append(_img(figs["dist"], "distance histogram") + f'<p class="note">{cap}</p>')
    else:
        p.append('<p class="note">No scores yet.</p>')

    p.append("<h2>Clusters</h2>")
    if figs.get("clusters"):
        p.append(_img(figs["clusters"], "cluster sizes and kept fraction"))
    p.append(_cluster_table(data))

    if label_rows(man):
        lab = man.get("labels", {})
        p.append(f"<h2>Labels (column '{_e(lab.get('column', ''))}')</h2>")
        p.append(_img(figs.get("labels"), "kept fraction per label"))
        rows = label_rows(man)
        p.append(
            "<details><summary>all labels</summary>"
            + _table(
                [[lab_, b, a, f"{a / b:.1%}" if b else "-"] for lab_, b, a in rows],
                ["label", "before", "after", "kept"],
                {1, 2, 3},
            )
            + "</details>"
        )

    if data.examples:
        p.append("<h2>Examples from the largest clusters</h2>")
        col = data.example_column
        p.append(
            '<p class="note">Prototypical: closest to the cluster centre (the easiest rows); '
            "hardest: farthest from it"
            + (
                f"; content from column '{_e(col)}'"
                if col
                else "; ids only (pass a text or image column to see content)"
            )
            + ".</p>"
        )
        if data.example_note:
            p.append(f'<p class="note">{_e(data.example_note)}</p>')
        for j, ex in data.examples.items():
            size = int(data.cluster_rows[j]) if data.cluster_rows is not None else 0
            p.append(f"<h3>cluster {j} · {size:,} rows</h3><div class='ex'>")
            for title in ("prototypical", "hardest"):
                items = "".join(_example_li(e) for e in ex[title])
                p.append(f"<div><b>{title}</b><ol>{items}</ol></div>")
            p.append("</div>")

    if data.duplicates is not None or (man or {}).get("dedup"):
        p.append("<h2>Duplicates removed</h2>")
        if data.duplicates is not None:
            p.append(f"<p>{data.duplicates:,} rows are flagged <code>duplicate</code>.</p>")
        if isinstance((man or {}).get("dedup"), dict):
            p.append(_table([[k, v] for k, v in man["dedup"].items()], ["dedup", "value"]))
        if data.duplicate_examples:
            head = ["id", "cluster", "distance"]
            if any("duplicate_of" in r for r in data.duplicate_examples):
                head.append("duplicate of")
            if data.example_column:
                head.append(data.example_column)
            rows = []
            for r in data.duplicate_examples:
                row = [r["id"], r["cluster"], r["distance"]]
                if "duplicate of" in head:
                    row.append(r.get("duplicate_of"))
                if data.example_column:
                    row.append("" if r.get("is_image") else (r.get("content") or ""))
                rows.append(row)
            p.append(_table(rows, head, {1, 2}))

    p.append("<h2>Stage timings</h2>")
    if figs.get("timings"):
        p.append(_img(figs["timings"], "stage timings"))
        p.append(
            _table(
                [[s, round(sec, 2), _human(r) if r else "-"] for s, sec, r in stage_timings(data)],
                ["stage", "seconds", "rows/s"],
                {1, 2},
            )
        )
        p.append(
            "<p class=\"note\">rows/s: the run's input rows divided by the stage's seconds.</p>"
        )
    elif not data.finished:
        rate = data.rows_done / data.marker_seconds if data.marker_seconds else 0
        p.append(
            f"<p>{data.shards_done} shards scored so far: {data.rows_done:,} rows in "
            f"{data.marker_seconds:.1f} worker-seconds"
            + (f" ({_human(rate)} rows/s per worker)" if rate else "")
            + ".</p>"
        )

    p.append("<h2>Settings</h2>")
    p.append(_settings_table(data))
    p.append("</main></body></html>")
    return "\n".join(p)


def _cluster_table(data: ReportData) -> str:
    if data.cluster_rows is None:
        return ""
    rows = data.cluster_rows
    top = np.argsort(-rows, kind="stable")[:10]
    head = ["cluster", "rows"]
    if data.cluster_kept is not None:
        head += ["kept", "kept fraction"]
    if data.cluster_mean is not None:
        head.append("mean distance")
    if data.cluster_cut is not None:
        head.append("smallest kept distance")
    out = []
    for j in top:
        r: list[Any] = [int(j), int(rows[j])]
        if data.cluster_kept is not None:
            r += [int(data.cluster_kept[j]), f"{data.cluster_kept[j] / max(rows[j], 1):.1%}"]
        if data.cluster_mean is not None:
            r.append(float(data.cluster_mean[j]))
        if data.cluster_cut is not None:
            c = data.cluster_cut[j]
            r.append("-" if np.isnan(c) else float(c))
        out.append(r)
    k = len(rows)
    return f'<p class="note">{k:,} clusters; the 10 largest:</p>' + _table(
        out, head, set(range(1, len(head)))
    )


def _settings_table(data: ReportData) -> str:
    cfg = data.run.get("config", {})
    man = data.manifest or {}
    rows: list[list[Any]] = [
        ["input", data.run.get("input", {}).get("url", cfg.get("input", ""))],
        ["input files", len(data.run.get("input", {}).get("files", []))],
        ["shards", data.shards_total],
        ["config hash", data.run.get("config_hash", "")[:16]],
        ["code version", data.run.get("code_version", "")],
    ]
    for key in ("n_keep", "rows_in", "rows_kept", "select_passes", "cluster_ranges"):
        if key in man:
            rows.append([key, man[key]])
    rows += [[k, v] for k, v in cfg.items() if v not in (None, {}, "") and k != "input"]
    return _table(rows, ["setting", "value"])


# -- entry points -------------------------------------------------------------------------------
def build_report(store: Store, example_column: str | None = None, max_rows: int = MAX_ROWS) -> str:
    """The report page of the run folder `store` (finished or not)."""
    return render_html(collect(store, example_column=example_column, max_rows=max_rows))


def write_report(store: Store, example_column: str | None = None, max_rows: int = MAX_ROWS) -> str:
    """Build the report and write it to report/index.html; returns its URL."""
    t0 = time.perf_counter()
    page = build_report(store, example_column=example_column, max_rows=max_rows)
    store.put_bytes(REPORT_KEY, page.encode("utf-8"))
    log.info("report %s written (%.1fs)", store.uri(REPORT_KEY), time.perf_counter() - t0)
    return store.uri(REPORT_KEY)
