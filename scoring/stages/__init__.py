"""What one worker does for one unit of a stage: dataclass arguments in, dataclass results out.

sample (a shard's part of the k-means sample) -> fit (k-means, commit the prototypes) ->
score (a shard: nearest prototype, commit) -> stats (groups of shards: cluster counts,
percentile histograms; id-hash ranges: duplicate ids) -> annotate (a cluster range: percentile,
dedup evidence) -> keep (an annotated part: the rule's picks). No Ray here: `ray_jobs` maps
these functions over units.
"""
