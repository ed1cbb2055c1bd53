"""`balanced`: quotas proportional to cluster sizes (largest remainder), hardest first inside."""

from scoring.kernels.quotas import balanced_quotas
from scoring.strategies.base import ClusterRule, QuotaInput


class Balanced(ClusterRule):
    name = "balanced"
    summary = "per-cluster quotas proportional to cluster size, hardest first in each"

    def quotas(self, q: QuotaInput):
        return balanced_quotas(q.counts, q.n_keep), {}
