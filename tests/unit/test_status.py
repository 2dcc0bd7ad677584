"""`orders status` snapshots compared: rates and alerts (the part without servers)."""
from workers.settings import Settings
from workers.status import StatusReader


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
