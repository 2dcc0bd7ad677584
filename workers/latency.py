"""Produce-to-counted latency, kept as a sparse histogram (1 ms steps below 100 ms).

Each worker publishes its histogram in its heartbeat (no extra round trip), so
``orders status`` and the benchmark can report p50/p99/max across workers, and
``orders metrics`` exports it as a Prometheus histogram (hence the sum too).
"""
from __future__ import annotations

from collections.abc import Iterable, Mapping


def bucket(ms: int) -> int:
    """The histogram bucket (its upper bound, in ms) that ``ms`` falls in."""
    if ms <= 100:
        return max(ms, 0)
    if ms <= 1000:
        return -(-ms // 10) * 10
    if ms <= 10000:
        return -(-ms // 100) * 100
    return -(-ms // 1000) * 1000


class LatencyHistogram:
    def __init__(self):
        self.counts: dict[int, int] = {}
        self.max_ms = 0
        self.sum_ms = 0  # of every recorded latency: a Prometheus histogram has a sum

    def record(self, latencies_ms: Iterable[int]) -> None:
        counts = self.counts
        total = 0
        top = self.max_ms  # locals: this runs once per counted order
        for ms in latencies_ms:
            b = bucket(ms)
            counts[b] = counts.get(b, 0) + 1
            if ms > 0:  # clocks apart can give a negative latency: counted as 0, like its bucket
                total += ms
                if ms > top:
                    top = ms
        self.max_ms = top
        self.sum_ms += total

    def as_dict(self) -> dict:
        return {"buckets": {str(k): v for k, v in self.counts.items()}, "max_ms": self.max_ms, "sum_ms": self.sum_ms}


def merge(histograms: Iterable[Mapping]) -> dict:
    """Merge ``as_dict()`` histograms and summarise them: count, p50, p99, max (ms)."""
    counts: dict[int, int] = {}
    max_ms = 0
    for h in histograms:
        for k, v in h.get("buckets", {}).items():
            counts[int(k)] = counts.get(int(k), 0) + v
        max_ms = max(max_ms, h.get("max_ms", 0))
    total = sum(counts.values())
    return {"count": total, "p50_ms": _quantile(counts, total, 0.50), "p99_ms": _quantile(counts, total, 0.99),
            "max_ms": max_ms if total else None}


def _quantile(counts: dict[int, int], total: int, q: float) -> int | None:
    if not total:
        return None
    rank = q * total
    seen = 0
    for k in sorted(counts):
        seen += counts[k]
        if seen >= rank:
            return k
    return max(counts)


def cumulative(buckets: Mapping[str, int], bounds_ms: Iterable[int]) -> list[tuple[int, int]]:
    """(bound, orders at or below it) for each bound, from ``as_dict()["buckets"]``.

    Exact when every bound is one of ``bucket()``'s upper bounds: a recorded
    latency is counted in the bucket whose upper bound is the first one at or above it.
    """
    counts = sorted((int(k), v) for k, v in buckets.items())
    out, seen, i = [], 0, 0
    for bound in sorted(bounds_ms):
        while i < len(counts) and counts[i][0] <= bound:
            seen += counts[i][1]
            i += 1
        out.append((bound, seen))
    return out
