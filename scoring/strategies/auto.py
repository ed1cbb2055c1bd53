"""`auto`, the default: the rule the quality benchmark (benchmarks/quality.py, docs/quality.md)
found never worse than a random subset of the same size on clean real pools and better on
redundant, web-like ones.

1. SemDeDup with a conservative eps (AUTO_EPS, unless --dedup-eps is given; `off` skips it):
   only rows whose cosine similarity to an earlier-ranked row of their cluster is >= 1 - eps
   go. On the clean pools it removes almost nothing (3 of 1,257 digits, 10 of 6,000 MNIST
   images); on the redundant ones every exact copy and most near-copies.
2. Quotas proportional to the survivors per cluster (largest remainder, as `balanced`).
3. Inside each cluster a stratified random sample: the rows with the smallest hash(seed, id),
   ties by id. The benchmark measured hardest-first inside clusters (`balanced` + dedup) too:
   it wins by about half a point on MNIST at 30-70% kept but loses 1-3 points on the text
   pool at every fraction and 3-20 points everywhere at 10-20%, so auto does not switch to it.

The manifest's `auto` records the eps and where it came from, the quotas, the order inside
clusters and the kept share, and a sentence saying why.
"""

from __future__ import annotations

from scoring.kernels.quotas import balanced_quotas
from scoring.strategies.base import ClusterRule, QuotaInput

AUTO_EPS = 0.01


class Auto(ClusterRule):
    name = "auto"
    summary = (
        f"SemDeDup (eps {AUTO_EPS} unless --dedup-eps), quotas proportional to the survivors "
        "per cluster, a stratified random sample inside each cluster"
    )
    hardest_first = None  # distance does not order the picks inside a cluster
    default_dedup_eps = AUTO_EPS

    def within(self, q: QuotaInput) -> str:
        return "random"

    def quotas(self, q: QuotaInput):
        given, eps = q.settings.dedup_eps, q.settings.effective_dedup_eps
        source = "auto's default" if given is None else "--dedup-eps"
        m = int(q.counts.sum())
        dedup = (
            f"SemDeDup at eps {eps} ({source}) left {m} rows"
            if eps is not None
            else f"no dedup (--dedup-eps off): {m} rows"
        )
        why = (
            f"{dedup}; {q.n_keep} are kept ({q.n_keep / max(m, 1):.1%}) with quotas proportional "
            "to each cluster's rows and a stratified random sample (smallest hash of seed and "
            "id) inside each cluster: on the quality benchmark this was never worse than a "
            "random subset on clean pools and better on redundant ones (docs/quality.md)"
        )
        info = {
            "auto": {
                "dedup_eps": eps,
                "dedup_eps_source": source if eps is not None else "--dedup-eps off",
                "quotas": "balanced",
                "within": self.within(q),
                "kept_share": round(q.n_keep / max(m, 1), 6),
                "why": why,
            }
        }
        return balanced_quotas(q.counts, q.n_keep), info
