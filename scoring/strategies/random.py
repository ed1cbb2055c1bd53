"""`random`: the n_keep rows with the smallest hash(seed, id): deterministic, distributable."""

from scoring.kernels.radix import random_key
from scoring.strategies.base import GlobalRule


class Random(GlobalRule):
    name = "random"
    summary = "a seeded random subset (smallest hash of seed and id)"
    hardest_first = None
    key_bits = 64

    def key(self, distance, ids, seed):
        return random_key(ids, seed)
