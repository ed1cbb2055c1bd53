"""The interface of a selection rule (DESIGN §5).

Two kinds, both exact and distributed by the reduce:

* `GlobalRule`: every row gets an unsigned sort key (smaller = kept first; ties by id); the
  reduce finds the exact (key, id) threshold of the n_keep-th row by a radix select over the
  annotated parts (`scoring.kernels.radix`). A rule supplies `key` (run on the workers, so the
  rule object travels to them) and `key_bits`.
* `ClusterRule`: integer quotas per cluster from the global cluster counts (run on the driver),
  then the q_j first rows of every cluster are kept, in the order `within` names: hardest
  first (distance desc), easiest first, or a stratified random sample (hash of seed and id).
  A rule supplies `quotas` and may override `within`.

A rule may name a `default_dedup_eps`: the run then deduplicates (SemDeDup) with that eps when
the user gives no --dedup-eps.

`hardest_first` says how a rule orders distances (True, False, or None when it ignores them):
the report uses it to draw thresholds and per-cluster cuts.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np


@dataclass(frozen=True)
class QuotaInput:
    """What a per-cluster rule sees: rows and distance sums per cluster (all rows, or the dedup
    survivors), the number to keep (<= rows), the run's settings and the centroids."""

    counts: np.ndarray  # int64 [k]
    dist_sum: np.ndarray  # float64 [k]
    n_keep: int
    settings: Any  # the RunConfig
    centroids: np.ndarray  # float32 [k, d]


class Strategy:
    name: str = ""
    summary: str = ""
    hardest_first: bool | None = True
    per_cluster: bool = False
    default_dedup_eps: float | None = None  # dedup with this eps unless --dedup-eps is given


class GlobalRule(Strategy):
    key_bits: int = 32  # 32 for float keys, 64 for hashes

    def key(self, distance: np.ndarray, ids, seed: int) -> np.ndarray:
        """uint32/uint64 sort keys of rows (smaller = kept first)."""
        raise NotImplementedError


class ClusterRule(Strategy):
    per_cluster = True

    def quotas(self, q: QuotaInput) -> tuple[np.ndarray, dict[str, Any]]:
        """int64 [k] quotas with sum = q.n_keep and 0 <= q_j <= counts_j, and what the manifest
        should record about them (merged into it; {} for nothing)."""
        raise NotImplementedError

    def within(self, q: QuotaInput) -> str:
        """The order rows are kept in inside each cluster: one of kernels.quotas.WITHIN."""
        return "hardest"
