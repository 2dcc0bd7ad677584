from workers.latency import LatencyHistogram, cumulative
from workers.metrics import LATENCY_BOUNDS_MS, _histogram


def test_prometheus_buckets_are_cumulative_and_exact_from_1ms_to_60s():
    h = LatencyHistogram()
    h.record([0, 1, 7, 150, 9_999, 70_000, -5])
    buckets, total_s = _histogram(h.as_dict())
    le = dict(buckets)
    assert (le["0.001"], le["0.01"], le["0.2"], le["10"], le["60"], le["+Inf"]) == (3, 4, 5, 6, 6, 7)
    assert list(le) == [format(b / 1000, "g") for b in LATENCY_BOUNDS_MS] + ["+Inf"]
    assert total_s == (1 + 7 + 150 + 9_999 + 70_000) / 1000  # a negative latency counts as 0


def test_every_bound_is_an_upper_bound_of_the_workers_buckets():
    # Otherwise a bucket's orders could sit on both sides of a bound and the counts would be guesses.
    from workers.latency import bucket
    assert all(bucket(b) == b for b in LATENCY_BOUNDS_MS)
    assert cumulative({"3": 1, "2000": 2}, [1, 5, 1000, 60000]) == [(1, 0), (5, 1), (1000, 1), (60000, 3)]

