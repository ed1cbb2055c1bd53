"""What the report shows, as plain data: built by `collect`, rendered by `html.render_html`."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np


@dataclass
class Example:
    id: Any
    cluster: int
    distance: float
    shard: int | None  # the input shard holding the row (None: not located)
    content: str | None = None  # text, or a data: URL for an image thumbnail
    is_image: bool = False


@dataclass
class Duplicate:
    """A row dedup flagged, next to the earlier-ranked row of its cluster it duplicates."""

    row: Example
    of: Example  # the earlier-ranked row (its distance is nan when it was not read)
    similarity: float  # max_similarity: cosine between the two rows


@dataclass
class ReportData:
    """Everything the page shows; built by `collect`, rendered by `render_html`."""

    uri: str
    run: dict[str, Any]
    manifest: dict[str, Any] | None
    shards_total: int
    shards_done: int
    rows_done: int
    prototypes_committed: bool
    strategy: str = ""
    rule_known: bool = True  # False: a rule not registered in this process (a plug-in)
    per_cluster: bool = False  # the rule's quotas are per cluster (no single threshold)
    hardest_first: bool | None = None  # the rule's order of distances (None: ignores them)
    rule_summary: str = ""
    scanned_shards: int = 0
    scanned_rows: int = 0
    bin_edges: np.ndarray | None = None
    hist_all: np.ndarray | None = None  # estimated counts over all rows (scaled when subset)
    hist_kept: np.ndarray | None = None
    kept_scanned_files: int = 0
    kept_total_files: int = 0
    threshold: float | None = None
    threshold_label: str = ""
    cluster_rows: np.ndarray | None = None
    cluster_kept: np.ndarray | None = None
    cluster_mean: np.ndarray | None = None
    cluster_cut: np.ndarray | None = None  # per cluster: min kept distance (hardest-first rules)
    examples: dict[int, dict[str, list[Example]]] = field(default_factory=dict)
    example_column: str | None = None
    example_note: str = ""
    duplicates: int | None = None  # rows flagged `duplicate` in annotated/ (scaled when subset)
    duplicates_exact: bool = True  # every annotated part the manifest lists was read
    duplicate_examples: list[Duplicate] = field(default_factory=list)
    near_eps: list[tuple[Duplicate, str]] = field(default_factory=list)  # (pair, removed|kept)
    marker_seconds: float = 0.0
    notes: list[str] = field(default_factory=list)

    @property
    def finished(self) -> bool:
        return self.manifest is not None
