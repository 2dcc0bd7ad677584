"""`orders status` snapshots compared: rates and alerts (the part without servers)."""
from workers.settings import Settings
from workers.status import StatusReader, _retry_levels, render
from workers.store import Source


def test_status_after_partitions_were_added():
    """A snapshot with more partitions than the previous one has no rates for the new ones, and no error.

    It raised IndexError, and since the previous snapshot was only replaced after the
    comparison, every later one too: `orders status --watch` and every metrics scrape
    failed after partitions were added (found by the nemesis soak, issue 15).
    """
    reader = StatusReader(settings=Settings(), store=None, admin=None)  # type: ignore[arg-type]  # _compare only
    reader.previous = snapshot(at_ms=0, partitions=3)
    data = snapshot(at_ms=2000, partitions=4)
    reader._compare(data)
    assert [p["rate_per_s"] for p in data["partitions"]] == [5.0, 5.0, 5.0, None]
    assert data["alerts"] == []


def snapshot(at_ms: int, partitions: int) -> dict:
    """What StatusReader.snapshot gives _compare: every partition alive, 10 counted per 2 s."""
    return {"at_ms": at_ms,
            "partitions": [{"partition": p, "count": at_ms // 200, "lag": 0, "alive": True, "moving": False}
                           for p in range(partitions)],
            "retry": {"alive": True, "unowned": []}, "dlq": {"size": 0}}


def test_retry_levels_show_backlog_waiting_and_next_due_per_topic():
    """Issue 14: one line per delay level; a level of earlier settings is marked as draining."""
    settings = Settings(retry_backoff_ms=200)
    old, first, second = "orders-retry-5000ms", "orders-retry-200ms", "orders-retry-400ms"
    sources = [Source(old, 0), Source(first, 0), Source(first, 1), Source(second, 0)]
    ends = [10, 50, 40, None]
    states = {Source(old, 0): {"offset": 10}, Source(first, 0): {"offset": 45}, Source(first, 1): {"offset": 38},
              Source(second, 0): {}}
    beats: list[dict] = [{"waiting_by_source": {f"{first}:0": [3, 1_000_250], f"{first}:1": [2, 1_000_100]}},
             {"waiting_by_source": {f"{old}:0": [0, None]}}]
    levels = {level["topic"]: level for level in _retry_levels(settings, sources, ends, states, beats)}
    assert levels[first] == {"topic": first, "delay_ms": 200, "current": True, "backlog": 7, "waiting": 5,
                             "next_due_ms": 1_000_100}
    assert levels[second]["backlog"] == 0 and levels[second]["next_due_ms"] is None
    assert not levels[old]["current"] and levels[old]["backlog"] == 0

    data = snapshot(at_ms=1_000_000, partitions=1)
    data.update(pool={"state": "running", "manager": None, "workers_alive": 2, "hosts": ["h"],
                      "partitions_owned": 1, "partitions": 1},
                latency={"p50_ms": 1, "p99_ms": 2, "max_ms": 3})
    data["global"] = {"count": 0, "sum": 0.0, "average": None, "retried": 0, "dead_lettered": 0,
                      "duplicate_replays": 0}
    data["partitions"][0].update(owner="w", pid=1, sum=0.0, average=None, rate_per_s=None, lag_growing=False)
    data["retry"].update(workers=1, backlog=7, waiting=5, next_due_ms=1_000_100,
                         lateness={"p50_ms": 1, "p99_ms": 2, "max_ms": 3}, levels=list(levels.values()))
    data["dlq"]["grew"] = False
    data["alerts"] = []
    lines = render(data)
    line = next(text for text in lines if first in text)
    assert "backlog<=7" in line and "waiting=5" in line and "next due in 0.1s" in line
    assert "draining" in next(text for text in lines if old in text)
    assert "draining" not in line
