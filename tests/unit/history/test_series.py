"""The min/max pyramid and the chart drawn from it: every spike survives, however the points arrive."""

from __future__ import annotations

import gc

from hypothesis import given
from hypothesis import strategies as st

from airflow_amlrun.history.series import (
    BUCKET_SIZES,
    READ_LIMIT,
    Bucket,
    Point,
    bucket_points,
    downsample,
    level_buckets,
    level_for,
)

values = st.lists(st.floats(-1e6, 1e6, allow_nan=False), min_size=1, max_size=1500)


def _points(series: list[float], first: int = 0) -> list[Point]:
    return [Point(first + i, 10 * (first + i), v) for i, v in enumerate(series)]


def _brute(points: list[Point], size: int) -> dict[int, Bucket]:
    """Each bucket's extremes, found the plain way."""
    found = {}
    for index in {p.number // size for p in points}:
        inside = [p for p in points if p.number // size == index]
        low = min(inside, key=lambda p: (p.value, p.number))
        high = min(inside, key=lambda p: (-p.value, p.number))
        found[index] = Bucket(len(inside), low.x, low.value, high.x, high.value, low.number <= high.number)
    return found


@given(values)
def test_each_level_holds_every_bucket_s_extremes(series):
    points = _points(series)
    buckets = level_buckets(points)
    for level, size in enumerate(BUCKET_SIZES):
        assert {i: b for (lv, i), b in buckets.items() if lv == level} == _brute(points, size)


@given(values, st.data())
def test_points_stored_in_several_writes_give_the_same_pyramid(series, data):
    cut = data.draw(st.integers(0, len(series)))
    points = _points(series)
    first, second = level_buckets(points[:cut]), level_buckets(points[cut:])
    joined = dict(first)
    for key, bucket in second.items():
        joined[key] = joined[key].then(bucket) if key in joined else bucket
    assert joined == level_buckets(points)


@given(st.lists(st.floats(-1e6, 1e6, allow_nan=False), min_size=3, max_size=5000), st.integers(4, 200))
def test_a_chart_keeps_the_series_minimum_and_maximum(series, width):
    xs, kept = downsample(list(range(len(series))), series, width)
    assert len(kept) <= width
    assert min(kept) == min(series) and max(kept) == max(series)
    assert xs == sorted(xs)
    assert all(series[x] == v for x, v in zip(xs, kept, strict=True))


def test_a_spike_in_a_million_points_is_charted_from_the_pyramid():
    count = 1_000_000
    series = [float(i % 100) for i in range(count)]
    series[654_321] = 1e9
    series[123_456] = -1e9
    level = level_for(count)
    assert level is not None
    size = BUCKET_SIZES[level]
    assert -(-count // size) <= READ_LIMIT
    # A million points are a million objects that all stay alive: the garbage collector would walk them over
    # and over as they are made, to free nothing (half this test's time).
    gc.disable()
    try:
        buckets = level_buckets(_points(series))
    finally:
        gc.enable()
    top = [b for (lv, _), b in sorted(buckets.items()) if lv == level]
    xs, kept = downsample(*bucket_points(top), 2000)
    assert len(kept) <= 2000
    assert (xs[kept.index(1e9)], xs[kept.index(-1e9)]) == (6_543_210, 1_234_560)


def test_a_short_series_is_read_whole():
    assert level_for(READ_LIMIT) is None
    assert level_for(READ_LIMIT + 1) == 0
    assert level_for(10**12) == len(BUCKET_SIZES) - 1
    assert downsample([1, 2], [0.5, 0.25], 2000) == ([1, 2], [0.5, 0.25])
