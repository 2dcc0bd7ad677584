from workers.latency import LatencyHistogram, bucket, merge


def test_buckets_are_fine_below_100ms_and_coarser_above():
    assert [bucket(x) for x in (-3, 0, 7, 100, 101, 999, 1001, 12345)] == [0, 0, 7, 100, 110, 1000, 1100, 13000]


def test_merge_gives_quantiles_across_workers():
    a, b = LatencyHistogram(), LatencyHistogram()
    a.record(range(1, 51))       # 1..50 ms
    b.record([60] * 49 + [900])  # mostly 60 ms, one slow
    summary = merge([a.as_dict(), b.as_dict()])
    assert summary["count"] == 100
    assert summary["p50_ms"] == 50
    assert summary["p99_ms"] == 60
    assert summary["max_ms"] == 900


def test_empty_histogram():
    assert merge([]) == {"count": 0, "p50_ms": None, "p99_ms": None, "max_ms": None}
