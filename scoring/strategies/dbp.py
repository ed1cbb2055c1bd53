"""`dbp`: density-based pruning (Abbas et al. 2024): quotas from cluster complexity."""

from scoring.kernels.dbp import dbp_quotas
from scoring.strategies.base import ClusterRule, QuotaInput


class DBP(ClusterRule):
    name = "dbp"
    summary = "per-cluster quotas by softmax(complexity / T), hardest first in each"

    def quotas(self, q: QuotaInput):
        quotas, info = dbp_quotas(
            q.centroids, q.counts, q.dist_sum, q.n_keep, q.settings.dbp_temperature
        )
        return quotas, {"dbp": info}
