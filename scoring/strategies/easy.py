"""`easy`: the globally easiest rows (distance asc, id asc)."""

from scoring.kernels.radix import distance_key
from scoring.strategies.base import GlobalRule


class Easy(GlobalRule):
    name = "easy"
    summary = "the n_keep rows closest to their prototype"
    hardest_first = False

    def key(self, distance, ids, seed):
        return distance_key(distance, hardest_first=False)
