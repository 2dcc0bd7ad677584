import os
import signal
import subprocess
import threading
import time

import pytest
import redis

from workers.errors import ServiceUnavailable
from workers.store import (
    ADOPTED,
    APPLIED,
    DEAD,
    RESET,
    RETRIED,
    SAME,
    STATE_AHEAD,
    STATE_BEHIND,
    STATE_LOST,
    AggregateStore,
    Source,
    SourceBatch,
)

SRC = Source("orders", 0)


@pytest.fixture
def store(settings):
    client = redis.Redis.from_url(settings.redis_url)
    return AggregateStore(client, settings.redis_prefix)


def apply(store, batch):
    return store.apply([batch], worker="w", heartbeat={"pid": 1}, now_ms=1)[0]


def test_batch_counts_and_moves_the_offset(store):
    r = apply(store, SourceBatch(SRC, to_offset=3, known_offset=None, items=[(0, 0, 1000, ""), (2, 1, 250, "")]))
    assert (r.status, r.counted, r.offset) == (APPLIED, 2, 3)
    snap = store.snapshot(3)
    assert snap["total"].count == 2 and snap["total"].cents == 1250
    assert [p.count for p in snap["partitions"]] == [1, 1, 0]
    assert store.positions([SRC]) == {SRC: 3}


def test_replaying_a_batch_changes_nothing(store):
    batch = SourceBatch(SRC, to_offset=2, known_offset=None, items=[(0, 0, 100, ""), (1, 0, 200, "")])
    apply(store, batch)
    before = store.snapshot(1)
    again = apply(store, batch)
    assert again.counted == 0
    assert store.snapshot(1)["total"] == before["total"]


def test_overlapping_batch_counts_only_the_new_part(store):
    apply(store, SourceBatch(SRC, to_offset=2, known_offset=None, items=[(0, 0, 100, ""), (1, 0, 200, "")]))
    r = apply(store, SourceBatch(SRC, to_offset=4, known_offset=2, items=[(1, 0, 200, ""), (3, 0, 5, "")]))
    assert r.counted == 1
    assert store.snapshot(1)["total"].cents == 305


def counted_batch(known: int | None, offsets: range, target_of=lambda o: o % 3, cents_of=lambda o: 100 + o):
    """A batch built as the workers build one: ``count`` per order (summed unless it needs a look)."""
    batch = SourceBatch(SRC, to_offset=offsets.stop, known_offset=known)
    for offset in offsets:
        batch.count(offset, target_of(offset), cents_of(offset))
    return batch


def test_summed_orders_count_once_per_target(store):
    batch = counted_batch(None, range(0, 6))
    assert batch.items == [] and batch.sums == {0: [2, 203], 1: [2, 205], 2: [2, 207]}  # nothing sent per order
    r = apply(store, batch)
    assert (r.status, r.counted, r.offset) == (APPLIED, 6, 6)
    snap = store.snapshot(3)
    assert [(p.count, p.cents) for p in snap["partitions"]] == [(2, 203), (2, 205), (2, 207)]
    assert apply(store, batch).status == STATE_AHEAD  # the same batch again: nothing applied
    assert store.snapshot(3)["total"] == snap["total"]


def test_summed_batch_after_a_rewind_counts_only_past_r(store):
    apply(store, counted_batch(None, range(0, 4)))
    again = counted_batch(4, range(2, 7))  # a rewind re-reads 2..3: below R, looked at one by one and skipped
    assert [item[0] for item in again.items] == [2, 3] and again.sum_from == 4
    r = apply(store, again)
    assert (r.status, r.counted, r.offset) == (APPLIED, 3, 7)
    assert store.snapshot(3)["total"].count == 7


def test_sums_from_below_r_are_refused(store):
    """The script's own check: sums that reach below the stored R are an error, never a double count."""
    apply(store, counted_batch(None, range(0, 4)))
    bad = SourceBatch(SRC, to_offset=6, known_offset=4, sums={0: [3, 300]}, sum_from=3)
    with pytest.raises(redis.ResponseError, match="below R"):
        apply(store, bad)
    assert store.snapshot(3)["total"].count == 4


def test_lost_state_is_reported_not_overwritten(store):
    r = apply(store, SourceBatch(SRC, to_offset=9, known_offset=8, items=[(8, 0, 100, "")]))
    assert r.status == STATE_LOST
    assert store.snapshot(1)["total"].count == 0
    assert store.positions([SRC]) == {SRC: None}


def test_large_sums_stay_exact(store):
    items = [(i, 0, 99999999, "") for i in range(1000)]
    apply(store, SourceBatch(SRC, to_offset=1000, known_offset=None, items=items))
    apply(store, SourceBatch(Source("orders", 1), to_offset=1000, known_offset=None, items=items))
    assert store.snapshot(1)["total"].cents == 2 * 1000 * 99999999


def test_redis_down_is_unavailable(settings):
    down = AggregateStore(redis.Redis.from_url("redis://127.0.0.1:1/0", socket_connect_timeout=1), "x")
    with pytest.raises(ServiceUnavailable, match="redis"):
        down.positions([SRC])


def test_aof_keeps_state_across_a_redis_restart(tmp_path):
    """A redis-server of our own (own port, own dir) is stopped and started again."""
    port = 6390 + os.getpid() % 500
    args = ["redis-server", "--bind", "127.0.0.1", "--port", str(port), "--appendonly", "yes",
            "--dir", str(tmp_path), "--save", "", "--daemonize", "no"]

    def start():
        proc = subprocess.Popen(args, stdout=subprocess.DEVNULL)
        client = redis.Redis(port=port)
        for _ in range(50):
            try:
                client.ping()
                return proc, client
            except redis.ConnectionError:
                time.sleep(0.1)
        proc.kill()
        raise AssertionError("redis-server did not start")

    proc, client = start()
    try:
        store = AggregateStore(client, "aof")
        apply(store, SourceBatch(SRC, to_offset=5, known_offset=None, items=[(4, 0, 4242, "")]))
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(10)
    proc, client = start()
    try:
        store = AggregateStore(client, "aof")
        assert store.positions([SRC]) == {SRC: 5}
        assert store.snapshot(1)["total"].cents == 4242
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(10)


def test_replayed_order_counts_once(store):
    batch = SourceBatch(SRC, to_offset=3, known_offset=None)
    batch.count(0, 0, 100, replay_of="order-1")
    batch.count(1, 0, 100, replay_of="order-1")   # the same dead letter replayed again
    batch.park(2, DEAD)
    r = apply(store, batch)
    assert r.counted == 1
    total = store.snapshot(1)["total"]
    assert (total.count, total.dead_lettered, total.duplicate_replays) == (1, 1, 1)


def test_state_that_went_back_in_time_is_reported(store):
    apply(store, SourceBatch(SRC, to_offset=5, known_offset=None, items=[(4, 0, 1, "")]))
    r = apply(store, SourceBatch(SRC, to_offset=12, known_offset=9, items=[(10, 0, 1, "")]))
    assert (r.status, r.offset) == (STATE_BEHIND, 5)
    assert store.snapshot(1)["total"].count == 1  # nothing applied


def test_state_another_writer_moved_is_reported_and_left_alone(store):
    """R past what the worker knew (or state where it knew none): another worker wrote the source."""
    apply(store, SourceBatch(SRC, to_offset=8, known_offset=None, items=[(7, 0, 1, "")]))
    r = apply(store, SourceBatch(SRC, to_offset=12, known_offset=5, items=[(10, 0, 1, "")]))
    assert (r.status, r.offset) == (STATE_AHEAD, 8)
    r = apply(store, SourceBatch(SRC, to_offset=12, known_offset=None, items=[(10, 0, 1, "")]))
    assert (r.status, r.offset) == (STATE_AHEAD, 8)
    assert store.snapshot(1)["total"].count == 1  # nothing applied
    assert store.positions([SRC]) == {SRC: 8}


def test_decision_records_are_kept_until_kafka_has_them(store):
    """Parked decisions between K and R stay in Redis; a batch with a later K drops them."""
    batch = SourceBatch(SRC, to_offset=4, known_offset=None)
    batch.count(0, 0, 100)
    batch.park(1, DEAD, "dead-record")
    batch.park(2, RETRIED, "retry-record")
    batch.park(3, DEAD)  # already in Kafka: nothing to keep
    batch.park(4, RETRIED, "retry-record")  # the same words, another offset
    apply(store, batch)
    assert store.state([SRC])[1] == {SRC: {1: "dead-record", 2: "retry-record", 4: "retry-record"}}
    apply(store, SourceBatch(SRC, to_offset=5, known_offset=4, items=[(4, 0, 1, "")], committed_offset=2))
    assert store.state([SRC])[1] == {SRC: {2: "retry-record", 4: "retry-record"}}
    # A replay below R neither counts again nor records again.
    again = SourceBatch(SRC, to_offset=3, known_offset=5, committed_offset=2)
    again.park(1, DEAD, "other")
    assert apply(store, again).counted == 0
    assert store.state([SRC])[1] == {SRC: {2: "retry-record", 4: "retry-record"}}


def test_touch_reports_each_sources_stored_offset(store):
    apply(store, SourceBatch(SRC, to_offset=7, known_offset=None, items=[(6, 0, 1, "")]))
    other = Source("orders", 1)
    assert store.touch([SRC, other], worker="w", heartbeat={}) == {SRC: 7, other: None}


def test_identity_of_another_incarnation_resets_the_state(store):
    ids = {"orders": "id-a", "orders-retry": "id-b"}
    parts = {"orders": 2, "orders-retry": 1}
    assert store.ensure_identity(ids, partitions=parts) == (ADOPTED, {})
    apply(store, SourceBatch(SRC, to_offset=3, known_offset=None, items=[(0, 0, 100, ""), (1, 1, 50, "")]))
    assert store.ensure_identity(ids, partitions=parts) == (SAME, ids)
    assert store.snapshot(2)["total"].count == 2
    new = {**ids, "orders": "id-c"}
    assert store.ensure_identity(new, partitions=parts) == (RESET, ids)
    snap = store.snapshot(2, sources=[SRC])
    assert snap["total"].count == 0 and [p.count for p in snap["partitions"]] == [0, 0]
    assert snap["sources"] == {SRC: {}}
    assert store.ensure_identity(new, partitions=parts) == (SAME, new)
    assert store.ensure_identity(new, partitions=parts, force=True)[0] == RESET


def test_clear_is_one_wipe_that_no_batch_straddles(store, settings):
    """A wipe that races batches leaves only whole batches: every source offset left
    has its count in the totals.

    Each batch is a new source counting one order. On main's single-slot layout,
    deleting keys with SCAN then DEL from the client kept the source a batch created
    between the two and deleted the total it added to: the worker then resumed from
    that offset, and the order was lost for good (the Redis-wipe fault test saw 215
    orders missing so). Here a source's offset and totals share one hash, and the
    wipe is one script per node; a registry entry a wipe removed comes back with the
    worker's next touch (every 2 s).
    """
    stop = threading.Event()
    written: list[Source] = []
    writer_store = AggregateStore(redis.Redis.from_url(settings.redis_url), settings.redis_prefix)

    def write() -> None:
        while not stop.is_set():
            source = Source("orders", 1000 + len(written))
            written.append(source)
            writer_store.apply([SourceBatch(source, to_offset=1, known_offset=None, items=[(0, 0, 100, "")])],
                               worker="w", heartbeat={}, now_ms=1)

    client = redis.Redis.from_url(settings.redis_url)
    writer = threading.Thread(target=write)
    writer.start()
    try:
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            # Heartbeat-like keys to wipe with the state: a wipe that takes several
            # pages of SCAN, as a pool's keys do.
            client.mset({f"{{{settings.redis_prefix}}}:worker:filler-{n}": "x" for n in range(5000)})
            store.clear()
    finally:
        stop.set()
        writer.join(10)
    stored = store.touch(written, worker="w", heartbeat={})
    survivors = [source for source, offset in stored.items() if offset is not None]
    assert all(stored[source] == 1 for source in survivors)
    assert store.snapshot(0)["total"].count == len(survivors)


def test_retry_levels_of_other_backoff_settings_never_reset_the_state(store):
    """Issue 14: hosts whose backoff settings differ know different retry topics (one per delay
    level). A level new to a source joins its identity, one a host does not know is kept: neither
    resets anything, so a rolling change of RETRY_BACKOFF_MS never rebuilds the pool. A topic that
    was deleted and created again (another id) is still another incarnation."""
    base = {"orders": "id-o", "orders-dlq": "id-d", "orders-retry-1000ms": "id-1"}
    more = {**base, "orders-retry-200ms": "id-2"}
    level = Source("orders-retry-200ms", 0)
    parts = {"orders": 2, "orders-retry-1000ms": 1}
    claims = ("orders", "orders-dlq")
    assert store.ensure_identity(base, partitions=parts, claims=claims)[0] == ADOPTED
    claim_key = store.claim_key("order-1")
    apply(store, SourceBatch(SRC, to_offset=2, known_offset=None, items=[(0, 0, 100, ""), (1, 1, 50, "")]))
    assert store.ensure_identity(more, partitions={**parts, level.topic: 1}, claims=claims)[0] == SAME
    apply(store, SourceBatch(level, to_offset=1, known_offset=None, items=[(0, 1, 25, "")]))
    for _ in range(3):  # a rolling change: hosts with either settings start again, in turn
        assert store.ensure_identity(base, partitions=parts, claims=claims)[0] == SAME
        assert store.ensure_identity(more, partitions={**parts, level.topic: 1}, claims=claims)[0] == SAME
    assert store.totals().count == 3 and store.totals().cents == 175
    assert store.claim_key("order-1") == claim_key  # replay claims do not move with the levels
    recreated = {**more, "orders-retry-200ms": "id-3"}
    assert store.ensure_identity(recreated, partitions={**parts, level.topic: 1}, claims=claims)[0] == RESET
    assert store.totals().count == 0  # every source named the old topic: all are rebuilt from the logs
