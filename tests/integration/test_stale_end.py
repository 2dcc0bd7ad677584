"""A partition's end read below the counted position once is not a truncated log.

Found by the nemesis soak (seed 15, tests/soak/README.md): right after a preferred
leader election moved orders partition 11 back to a restarted broker, a worker that
was being assigned the partition read its end as 3794 while Redis's position and
the group's committed offset were 3803 (offsets 3794..3815 were on the log at the
end of the run: nothing was truncated). The worker took the state for one of
another log (``state past the end of its partition ... action=rebuild_all``) and
wiped every partition's state: the pool's count fell to 0 and every order was
counted again from the log start.

Kafka cannot be made to answer with a stale end on demand, so the worker's one
read of the ends (``known_end_offsets``) answers low as often as the test says;
Kafka and Redis are real.

The 30-minute soak (seed 791067977) then found the likelier cause, a race in the worker's
own reads: it read the ends first and Redis's positions after, while the partition's last
owner (not fenced yet, or still handing over) counted on in between. The ends kept
growing (29399, 29495, 29600) and the positions were always a few orders past them
(29400, 29496, 29605), so the 10 s of reading again ended in a wipe anyway, twice in that
run. test_state_counted_on_while_the_ends_are_read_is_not_past_them reproduces it with a
real second worker counting between the two reads.
"""
from __future__ import annotations

import workers.engine
from workers.settings import Settings
from workers.store import Source

from ..conftest import isolated_env
from ..pool import run_orders
from .conftest import cleanup
from .test_rewind import drive_to, make_worker

ORDERS = 40
STALE_BY = 9
MORE = 5  # orders the last owner counts during each read of the ends


def counted_then_restarted(settings: Settings, monkeypatch, stale_reads: int | None):
    """A worker counts every order and stops; a new one starts while the ends read ``STALE_BY`` low
    ``stale_reads`` times (None: always, a log truly shorter than the state)."""
    source = Source(settings.orders_topic, 0)
    first = make_worker(settings)
    first.start()
    drive_to(first, source, ORDERS)
    first.shutdown()
    assert first.store.totals().count == ORDERS

    real = workers.engine.known_end_offsets
    calls = {"n": 0}

    def stale(admin, partitions):
        calls["n"] += 1
        ends = real(admin, partitions)
        if stale_reads is None or calls["n"] <= stale_reads:
            return [end - STALE_BY for end in ends]
        return ends

    monkeypatch.setattr(workers.engine, "known_end_offsets", stale)
    second = make_worker(settings)
    second.start()
    return second, source


def test_an_end_read_low_once_does_not_wipe_the_state(monkeypatch):
    env = isolated_env("stale-end", ORDERS_FAILURE_RATE="0", ORDERS_PARTITIONS="1")
    settings = Settings.from_env(env)
    try:
        run_orders(env, "init")
        run_orders(env, "produce", "--count", str(ORDERS), "--rate", "0")
        worker, source = counted_then_restarted(settings, monkeypatch, stale_reads=1)
        try:
            assert worker.store.totals().count == ORDERS, "the state was wiped"
            assert worker.position[source] == ORDERS, "the worker rebuilds from the log start"
        finally:
            worker.shutdown()
    finally:
        cleanup(settings)


def test_state_counted_on_while_the_ends_are_read_is_not_past_them(monkeypatch):
    """The partition's last owner counts new orders while the next one loads its state: each time
    the loader reads the ends, more orders arrive and the last owner counts them at once."""
    env = isolated_env("moving-end", ORDERS_FAILURE_RATE="0", ORDERS_PARTITIONS="1")
    settings = Settings.from_env(env)
    source = Source(settings.orders_topic, 0)
    try:
        run_orders(env, "init")
        run_orders(env, "produce", "--count", str(ORDERS), "--rate", "0")
        last_owner = make_worker(settings, "partition-0-last")
        last_owner.start()
        drive_to(last_owner, source, ORDERS)
        real = workers.engine.known_end_offsets
        produced = {"n": ORDERS}

        def while_the_last_owner_counts_on(admin, partitions):
            ends = real(admin, partitions)
            if produced["n"] < ORDERS + 10 * MORE:
                run_orders(env, "produce", "--count", str(MORE), "--rate", "0")
                produced["n"] += MORE
                drive_to(last_owner, source, produced["n"])
            return ends

        monkeypatch.setattr(workers.engine, "known_end_offsets", while_the_last_owner_counts_on)
        loader = make_worker(settings)
        try:
            loader.start()
            last_owner.shutdown()
            assert loader.store.totals().count == produced["n"] > ORDERS, "the state was wiped"
            assert loader.position[source] is not None, "the worker rebuilds from the log start"
        finally:
            loader.shutdown()
    finally:
        cleanup(settings)


def test_a_log_shorter_than_the_state_still_rebuilds_it(monkeypatch):
    """What the check is for: a log that stays shorter than the counted position (another Kafka,
    a truncated log) is taken as such once it has stayed so, and the state is rebuilt."""
    env = isolated_env("short-log", ORDERS_FAILURE_RATE="0", ORDERS_PARTITIONS="1")
    settings = Settings.from_env(env)
    try:
        run_orders(env, "init")
        run_orders(env, "produce", "--count", str(ORDERS), "--rate", "0")
        worker, source = counted_then_restarted(settings, monkeypatch, stale_reads=None)
        try:
            assert worker.store.totals().count == 0
            assert worker.position[source] is None  # from the log start
        finally:
            worker.shutdown()
    finally:
        cleanup(settings)

