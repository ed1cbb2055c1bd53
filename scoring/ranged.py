"""Ranged reads of remote Parquet files: a file-like object over a few large prefetched byte
ranges of one object (`RangedFile`), used by `Store.parquet_file` on object stores."""

from __future__ import annotations

import bisect
import errno
import io
from collections.abc import Iterable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from scoring.storage import Store

# Remote Parquet reads (see RangedFile): byte ranges closer than RANGE_GAP_BYTES are merged
# into one request, and merged ranges are fetched concurrently in parts of at most
# RANGE_PART_BYTES, so a shard is usually one GET. Parallelism comes from the shards in flight
# (2 per actor, many actors per node), not from splitting one shard; every extra request pays
# the store's latency (and, on the moto test server, a copy of the whole object: 16 MB parts
# made a 192 MB shard read 6x slower there, docs/scale.md).
RANGE_GAP_BYTES = 1 << 20
RANGE_PART_BYTES = 256 << 20
FOOTER_READ_BYTES = 64 << 10  # pyarrow's own first footer read


def merge_ranges(
    spans: Iterable[tuple[int, int]], gap: int | None = None, part: int | None = None
) -> list[tuple[int, int]]:
    """Sorted [start, end) spans merged when closer than `gap`, then cut into parts of at most
    `part` bytes: the requests to fetch them with."""
    gap = RANGE_GAP_BYTES if gap is None else gap
    part = RANGE_PART_BYTES if part is None else part
    merged: list[list[int]] = []
    for a, b in sorted((int(a), int(b)) for a, b in spans if b > a):
        if merged and a - merged[-1][1] <= gap:
            merged[-1][1] = max(merged[-1][1], b)
        else:
            merged.append([a, b])
    return [(x, min(b, x + part)) for a, b in merged for x in range(a, b, part)]


class RangedFile(io.RawIOBase):
    """A read-only file over one remote object that serves reads from byte ranges fetched
    ahead (`prefetch`: a few large concurrent requests) and fetches anything else with one
    ranged GET per read. pyarrow reads a column chunk with one read, so a prefetched
    row-group read costs exactly the prefetch requests."""

    def __init__(self, store: Store, key: str, size: int):
        super().__init__()
        self.store, self.key, self.size = store, key, int(size)
        self.pos = 0
        self.parts: list[tuple[int, bytes]] = []  # (offset, bytes), sorted by offset
        self.fetches = 0  # reads not served from prefetched parts (for tests and benchmarks)
        self.prefetch([(max(0, self.size - FOOTER_READ_BYTES), self.size)])

    def python_file(self):
        import pyarrow as pa

        return pa.PythonFile(self, mode="r")

    def prefetch(self, spans: Iterable[tuple[int, int]]) -> None:
        """Fetch these [start, end) byte spans (merged, in parts, concurrently) for later reads."""
        ranges = merge_ranges((max(0, a), min(self.size, b)) for a, b in spans)
        ranges = [r for r in ranges if not self._find(*r)]
        data = self.store.get_ranges(self.key, ranges)
        for (a, b), d in zip(ranges, data):
            if len(d) != b - a:
                raise OSError(
                    errno.EIO, f"{self.store.uri(self.key)}: short read at {a} ({len(d)} bytes)"
                )
        new = [(a, d) for (a, _), d in zip(ranges, data)]
        self.parts = sorted(self.parts + new, key=lambda p: p[0])

    def _find(self, a: int, b: int) -> bytes | memoryview | None:
        """The bytes [a, b) when fetched parts hold them all (a view when one part does)."""
        i = bisect.bisect_right(self.parts, a, key=lambda p: p[0]) - 1
        pieces, at = [], a
        while at < b:  # across contiguous parts (a merged range fetched in several requests)
            if i < 0 or i >= len(self.parts):
                return None
            start, d = self.parts[i]
            if not start <= at < start + len(d):
                return None
            pieces.append(memoryview(d)[at - start : b - start])  # no copy
            at = start + len(d)
            i += 1
        return pieces[0] if len(pieces) == 1 else b"".join(pieces)  # type: ignore[return-value]

    # -- io.RawIOBase ------------------------------------------------------------------------
    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self.pos, io.SEEK_END: self.size}[whence]
        self.pos = max(0, base + offset)
        return self.pos

    def read(self, n: int = -1) -> bytes | memoryview:
        a = self.pos
        b = self.size if n is None or n < 0 else min(self.size, a + n)
        if b <= a:
            return b""
        d = self._find(a, b)
        if d is None:
            self.fetches += 1
            d = self.store.get_range(self.key, a, b)
        self.pos = a + len(d)
        return d

    def readinto(self, buf) -> int:
        d = self.read(len(buf))
        buf[: len(d)] = d
        return len(d)

    def close(self) -> None:
        self.parts = []
        super().close()
