"""`hard`: the globally hardest rows (distance desc, id asc)."""

from scoring.kernels.radix import distance_key
from scoring.strategies.base import GlobalRule


class Hard(GlobalRule):
    name = "hard"
    summary = "the n_keep rows farthest from their prototype"
    hardest_first = True

    def key(self, distance, ids, seed):
        return distance_key(distance, hardest_first=True)
