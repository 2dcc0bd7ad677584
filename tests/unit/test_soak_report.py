"""The soak's report pieces that need no server: per-second rates, the PNG timeline, a log check."""
from __future__ import annotations

import json
from types import SimpleNamespace

from tests.soak import schedule as s
from tests.soak import timeline
from tests.soak.checker import _no_state_wiped, _orders_once
from tests.soak.load import Load
from tests.soak.sampler import per_second


def test_counted_per_second_skips_unreadable_samples():
    samples: list[dict] = [{"t": 0.0, "counted": 0}, {"t": 1.0, "counted": 300}, {"t": 2.0, "error": "redis down"},
               {"t": 3.0, "counted": 900}]
    assert per_second(samples) == [{"t": 1.0, "counted_per_s": 300.0}, {"t": 3.0, "counted_per_s": 300.0}]


def test_the_timeline_is_a_png_with_every_fault_kind(tmp_path):
    faults = [{**s.Fault(10.0 + i, kind, "x", 2.0).as_dict(), "applied_s": 10.0 + i, "active_s": 10.5 + i,
               "healed_s": 13.0 + i, "outcome": "healed", "detail": ""} for i, kind in enumerate(s.WEIGHTS)]
    faults.append({**s.Fault(30.0, s.WORKER_KILL, "x", 0).as_dict(), "applied_s": None, "active_s": None,
                   "healed_s": 30.0, "outcome": "skipped", "detail": "not running"})
    samples = [{"t": float(t), "counted": 300 * t, "lag": t % 7, "retry_backlog": t % 3, "dlq": t // 10}
               for t in range(60)]
    report = {"seed": 1, "minutes": 1, "faults": faults, "samples": samples,
              "marks": {"last heal": 40.0, "converged": None}, "verdict": {"passed": True}}
    path = tmp_path / "timeline.png"
    timeline.draw(report, path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_worker_that_wiped_the_state_fails_the_check(tmp_path):
    for name, line in (("host-a", "progress worker=host-a-consumer-0 counted=10"),
                       ("host-b", "state past the end of its partition worker=host-b-consumer-2 action=rebuild_all")):
        (tmp_path / name / "run").mkdir(parents=True)
        (tmp_path / name / "run" / "consumer-2.log").write_text(line + "\n")
    hosts = {name: SimpleNamespace(folder=tmp_path / name) for name in ("host-a", "host-b")}
    check = _no_state_wiped(hosts)  # type: ignore[arg-type]
    assert not check.ok and "host-b consumer-2" in check.detail and "host-a" not in check.detail
    assert _no_state_wiped({"host-a": hosts["host-a"]}).ok  # type: ignore[dict-item]


def message(key: str, partition: int, offset: int) -> SimpleNamespace:
    return SimpleNamespace(key=lambda: key.encode(), partition=lambda: partition, offset=lambda: offset)


def test_a_delivery_reported_without_an_offset_is_found_by_its_order_id(tmp_path):
    """Seen in a 30-minute soak: librdkafka reported one order delivered with no offset (None)."""
    orders = [message("a", 5, 0), message("b", 5, 1), message("c", 8, 0), message("c", 8, 7)]
    records = [{"orderId": "a", "partition": 5, "offset": 0}, {"orderId": "b", "partition": 5, "offset": None},
               {"orderId": "c", "partition": 8, "offset": 0}]
    (tmp_path / "delivered-0.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    load = Load({}, tmp_path, rate=1, seed=1)
    twice, delivered = _orders_once(orders, load)
    assert delivered.ok, delivered.detail
    assert "1 reported without an offset" in delivered.detail
    assert not twice.ok and "'c': ['8@0', '8@7']" in twice.detail  # a transactional load never writes one twice

    (tmp_path / "delivered-1.jsonl").write_text(json.dumps({"orderId": "d", "partition": 5, "offset": None}) + "\n")
    _, delivered = _orders_once(orders, load)
    assert not delivered.ok and "'d'" in delivered.detail  # not on its partition: lost
