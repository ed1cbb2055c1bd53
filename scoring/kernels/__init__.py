"""Numeric cores without IO: normalisation and devices, k-means, nearest-prototype search,
SemDeDup, percentiles, the radix select and per-cluster quotas."""
