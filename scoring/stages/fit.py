"""Stage `fit`: k-means on the gathered sample, then the prototypes' commit.

The sample parts stay where the sample stage left them (Ray's object store); `load_part(i)`
fetches part i, so the parts are checked and copied into one preallocated array one at a time:
the task holds the sample once (plus one part), never the parts and their concatenation. The
parts arrive in shard order, so k-means sees the rows in canonical (file, row group, row)
order whatever the shard plan (kernels.sampling).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from scoring import commit
from scoring.config import RunConfig
from scoring.errors import BadInput
from scoring.kernels.kmeans import fit_kmeans
from scoring.kernels.sampling import sample_digest
from scoring.storage import Store


@dataclass(frozen=True)
class FitResult:
    sha256: str
    sample_rows: int
    inertia: float
    iterations: int
    seconds: float
    stats: dict[str, Any]


def fit_prototypes(
    cfg: RunConfig,
    run_store: Store,
    load_part: Callable[[int], np.ndarray],
    names: list[tuple[int, str]],
    use_gpu: bool = False,
    plan_sha: str | None = None,
) -> FitResult:
    """Check, gather and fit the sample, save and commit the centroids.

    `names`: (shard index, input URL) of each sample part, in shard order: the parts are
    gathered in that order, which is the canonical (file, row group, row) order of the sample
    for any shard plan. Widths are checked across parts (naming both files); each part's digest
    and `plan_sha` (the sample plan's, kernels.sampling.plan_digest) are recorded in the commit
    marker for the resume check of a changed input file.
    """
    order = [i for i, _ in names]
    if order != sorted(set(order)):
        raise ValueError(f"sample parts out of shard order: {order[:8]}")
    digests: dict[str, str] = {}
    widths: dict[int, str] = {}
    shapes = []
    for j, (i, f) in enumerate(names):  # one part at a time: bounded memory
        p = load_part(j)
        shapes.append(p.shape)
        if len(p):
            digests[str(i)] = sample_digest(p)
            widths.setdefault(p.shape[1], f"{f} (shard {i})")
        del p
    if len(widths) > 1:
        (w1, f1), (w2, f2) = list(widths.items())[:2]
        raise BadInput(
            f"column '{cfg.embedding_column}' has mixed embedding widths across files: "
            f"{w1} in {f1}, {w2} in {f2}"
        )
    n = sum(s[0] for s in shapes if s[0])
    d = next(iter(widths), 0)
    x = np.empty((n, d), np.float32)
    o = 0
    for j, shape in enumerate(shapes):
        if shape[0]:
            x[o : o + shape[0]] = load_part(j)
            o += shape[0]
    centroids, _, stats = fit_kmeans(
        x, cfg.k, cfg.kmeans_iters, cfg.metric, cfg.seed, use_gpu=use_gpu,
        backend=cfg.kmeans_backend, tol=cfg.kmeans_tol,
    )  # fmt: skip
    stats = dict(stats, sample_sha256=digests)
    if plan_sha is not None:
        stats["sample_plan_sha256"] = plan_sha
    sha = commit.save_centroids(run_store, centroids, stats)
    return FitResult(
        sha, int(stats["sample_rows"]), float(stats["inertia"]), int(stats["iterations"]),
        float(stats["seconds"]), stats,
    )  # fmt: skip
