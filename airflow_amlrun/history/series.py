"""A metric's min/max pyramid, and the chart of a long series drawn from it with every spike kept.

Pure logic, no database: the history stores the buckets this module computes (metricstore.py).

A metric's finite points are numbered in the order they are stored (0, 1, 2, ...). Level L of its pyramid
cuts that sequence into buckets of ``BUCKET_SIZES[L]`` points and keeps, for each, the lowest and the highest
point (value and where it lies on the x axis). A chart of a series of a million points reads the few
thousand buckets of one level instead of the points, and since every point's value lies between its bucket's
minimum and maximum, no spike is lost on the way.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

# Points per bucket at each level: each level's buckets hold 8 of the level below.
BUCKET_SIZES = (64, 512, 4096, 32768, 262144)
_FANOUT = 8
# A chart reads at most this many rows (raw points, or one level's buckets).
READ_LIMIT = 4096


@dataclass(frozen=True)
class Bucket:
    """The extremes of consecutive points: their number, the lowest and the highest, and which came first.

    Of equal values, the first one is kept.
    """

    count: int
    min_x: int
    min_value: float
    max_x: int
    max_value: float
    min_first: bool

    def then(self, later: Bucket) -> Bucket:
        """This bucket's points followed by `later`'s, as one bucket."""
        # Of equal values, the earlier point (this bucket's) is kept.
        low = self if self.min_value <= later.min_value else later
        top = self if self.max_value >= later.max_value else later
        min_first = low.min_first if low is top else low is self
        return Bucket(self.count + later.count, low.min_x, low.min_value, top.max_x, top.max_value, min_first)


@dataclass(frozen=True)
class Point:
    """A finite point to chart: its number among the metric's finite points, x (step, else its number), value."""

    number: int
    x: int
    value: float


def level_buckets(points: Sequence[Point]) -> dict[tuple[int, int], Bucket]:
    """What `points` (numbered consecutively, in order) add to each level: {(level, bucket index): bucket}.

    A bucket that already held points before these gets only their part here: join it to the stored one
    with `Bucket.then` (the stored one first).
    """
    found: dict[tuple[int, int], Bucket] = {}
    size = BUCKET_SIZES[0]
    below: dict[int, Bucket] = {}
    start = 0
    while start < len(points):
        index = points[start].number // size
        end = min(len(points), start + (index + 1) * size - points[start].number)
        chunk = points[start:end]
        # min and max return the first of equal values.
        low = min(chunk, key=_value)
        high = max(chunk, key=_value)
        below[index] = Bucket(len(chunk), low.x, low.value, high.x, high.value, low.number <= high.number)
        start = end
    for level in range(len(BUCKET_SIZES)):
        if level > 0:
            above: dict[int, Bucket] = {}
            for index in sorted(below):
                known = above.get(index // _FANOUT)
                above[index // _FANOUT] = below[index] if known is None else known.then(below[index])
            below = above
        for index, bucket in below.items():
            found[(level, index)] = bucket
    return found


def _value(point: Point) -> float:
    return point.value


def level_for(finite_points: int) -> int | None:
    """The finest pyramid level a chart of this many points reads (None: read the points themselves)."""
    if finite_points <= READ_LIMIT:
        return None
    for level, size in enumerate(BUCKET_SIZES):
        if -(-finite_points // size) <= READ_LIMIT:
            return level
    return len(BUCKET_SIZES) - 1


def bucket_points(buckets: Iterable[Bucket]) -> tuple[list[int], list[float]]:
    """The buckets' extremes as points in order: two a bucket (its minimum and maximum), one if they are one."""
    xs: list[int] = []
    values: list[float] = []
    for b in buckets:
        if b.min_x == b.max_x and b.min_value == b.max_value:
            xs.append(b.min_x)
            values.append(b.min_value)
            continue
        first, second = ((b.min_x, b.min_value), (b.max_x, b.max_value))
        if not b.min_first:
            first, second = second, first
        xs += [first[0], second[0]]
        values += [first[1], second[1]]
    return xs, values


def downsample(xs: Sequence[int], values: Sequence[float], points: int) -> tuple[list[int], list[float]]:
    """At most `points` of the series (x, value), keeping each of `points`/2 equal slices' minimum and maximum.

    The selection is tsdownsample's MinMaxDownsampler, over the points' positions (x may repeat or go back).
    """
    if len(values) <= points:
        return list(xs), list(values)
    import numpy as np
    from tsdownsample import MinMaxDownsampler

    kept = MinMaxDownsampler().downsample(  # type: ignore[no-untyped-call]
        np.asarray(values, dtype=np.float64), n_out=max(2, points - points % 2)
    )
    kept.sort()
    return [int(xs[i]) for i in kept], [float(values[i]) for i in kept]
