"""The soak's checker: what the pool claims against the truth read from Kafka itself.

Liveness first: after the last heal, ``orders stats`` must equal the truth read from
the log (tests/pool.py check_exact) within a stated bound. Then every check runs,
whatever the ones before found, so that a failed run's report says all that is wrong:
the totals, the dead letters (none twice, each naming its order, exactly the orders
the fault injector failed on every attempt), every order a producer saw delivered on the
topic, no order on it twice (_orders_once), every program running without a human.
"""
from __future__ import annotations

import logging
import time
from collections import Counter
from dataclasses import asdict, dataclass

from workers import envelope
from workers.clients import make_registry
from workers.serde import OrderSerde, load_schema
from workers.settings import Settings

from ..pool import LogTruth, SupervisedPool, Truth, check_exact, read_topic, stats
from .load import Load

log = logging.getLogger(__name__)

# How long after the last heal the counts must have converged. Above what one fault costs
# at worst: a worker stuck in a commit across a broker restart is ended by the watchdog
# after 45 s, restarted, and waits up to TRANSACTION_TIMEOUT_MS (10 s) for its
# predecessor's transaction; the load runs on for the schedule's tail, and two busy
# cores read a backlog of tens of thousands of orders.
CONVERGENCE_BOUND_S = 180.0
ALL_RUNNING_TIMEOUT_S = 60.0
EXAMPLES = 5  # offending items named in a failed check


@dataclass
class Check:
    name: str
    ok: bool
    detail: str = ""


def verdict(env: dict, settings: Settings, *, hosts: dict[str, SupervisedPool], load: Load,
            last_heal: float, faults_failed: list[str]) -> dict:
    """Every check's outcome, and the run's figures; ``last_heal`` is a time.monotonic() value."""
    checks: list[Check] = []
    converged_after = _converge(env, settings, last_heal, checks)
    orders = read_topic(settings.bootstrap_servers, settings.orders_topic, timeout=180)
    dead = read_topic(settings.bootstrap_servers, settings.dlq_topic, timeout=60)
    serde = OrderSerde(make_registry(settings), load_schema(settings.schema_path))
    predicted = Truth(orders, serde, settings)
    truth = LogTruth(settings)
    claimed = stats(env)
    checks.append(_exact(claimed, truth))
    checks.extend(_dead_letters(orders, dead, predicted))
    checks.extend(_orders_once(orders, load))
    checks.append(_no_human(hosts))
    checks.append(_no_state_wiped(hosts))
    checks.append(Check("every fault applied and healed", not faults_failed, "; ".join(faults_failed)))
    return {
        "passed": all(c.ok for c in checks),
        "checks": [asdict(c) for c in checks],
        "orders": truth.total,
        "counted": claimed["count"],
        "truth_counted": truth.count,
        "dead_lettered": len(truth.dead_origins),
        "predicted_dead": len(predicted.expected_dead),
        "sum": claimed["sum"],
        "average": claimed["average"],
        "converged_after_s": converged_after,
        "convergence_bound_s": CONVERGENCE_BOUND_S,
    }


def _converge(env: dict, settings: Settings, last_heal: float, checks: list[Check]) -> float | None:
    """Wait for stats to equal the log; seconds from the last heal to then, None if not within the bound."""
    left = CONVERGENCE_BOUND_S - (time.monotonic() - last_heal)
    try:
        check_exact(env, settings, timeout=max(left, 1.0))
    except AssertionError as exc:
        checks.append(Check(f"converged within {CONVERGENCE_BOUND_S:.0f} s of the last heal", False, str(exc)))
        return None
    after = round(time.monotonic() - last_heal, 1)
    ok = after <= CONVERGENCE_BOUND_S
    checks.append(Check(f"converged within {CONVERGENCE_BOUND_S:.0f} s of the last heal", ok, f"after {after} s"))
    return after


def _exact(claimed: dict, truth: LogTruth) -> Check:
    """Count, sum, average and each partition's count equal the log's."""
    problems = []
    if claimed["count"] != truth.count:
        problems.append(f"count {claimed['count']} != {truth.count}")
    if round(claimed["sum"] * 100) != truth.cents:
        problems.append(f"sum {claimed['sum']} != {truth.cents / 100}")
    # The pool reports the average rounded to 6 decimals (workers/store.py Totals.average).
    expected_avg = round(truth.cents / truth.count / 100, 6) if truth.count else None
    if claimed["average"] != expected_avg:
        problems.append(f"average {claimed['average']} != {expected_avg}")
    for p in claimed["partitions"]:
        want = truth.count_by_partition.get(p["partition"], 0)
        if p["count"] != want:
            problems.append(f"partition {p['partition']} count {p['count']} != {want}")
    if truth.count + len(truth.dead_origins) != truth.total:
        problems.append(f"counted {truth.count} + dead {len(truth.dead_origins)} != orders {truth.total}")
    return Check("count, sum, average and per-partition counts equal the log", not problems,
                 "; ".join(problems[:EXAMPLES]))


def _dead_letters(orders: list, dead: list, predicted: Truth) -> list[Check]:
    """None twice (by origin, by orderId), each naming its order, exactly the injector's."""
    at = {(m.partition(), m.offset()): m.key() for m in orders}
    origins, keys, orphans, not_transient = [], [], [], []
    for msg in dead:
        h = envelope.header_dict(msg.headers())
        origin = (h.get(envelope.ORIGINAL_TOPIC), int(h.get(envelope.ORIGINAL_PARTITION, -1)),
                  int(h.get(envelope.ORIGINAL_OFFSET, -1)))
        origins.append(origin)
        keys.append(msg.key())
        if at.get(origin[1:]) != msg.key():
            orphans.append(f"{origin} key={msg.key()!r}")
        if h.get(envelope.ERROR_TYPE) != "DownstreamUnavailable":
            not_transient.append(f"{origin} {h.get(envelope.ERROR_TYPE)}: {h.get(envelope.ERROR_MESSAGE, '')[:80]}")
    twice = [o for o, n in Counter(origins).items() if n > 1]
    keys_twice = [k for k, n in Counter(keys).items() if n > 1]
    dead_ids = {k.decode() for k in keys if k is not None}
    missing = sorted(predicted.expected_dead - dead_ids)
    extra = sorted(dead_ids - predicted.expected_dead)
    return [
        Check("no order dead-lettered twice", not twice and not keys_twice,
              f"origins {twice[:EXAMPLES]} orderIds {keys_twice[:EXAMPLES]}" if twice or keys_twice else ""),
        Check("every dead letter names its order (provenance)", not orphans, "; ".join(orphans[:EXAMPLES])),
        Check("dead letters are exactly the orders that failed every attempt", not missing and not extra
              and not not_transient,
              f"missing {missing[:EXAMPLES]} ({len(missing)}), extra {extra[:EXAMPLES]} ({len(extra)}), "
              f"other errors {not_transient[:EXAMPLES]} ({len(not_transient)})"
              if missing or extra or not_transient else ""),
    ]


def _orders_once(orders: list, load: Load) -> list[Check]:
    """Every delivery a producer recorded is on the topic, and no order is on it twice.

    A delivery report can come without an offset (librdkafka then knows the batch was
    written, not where): such an order must be on its partition. The load produces
    in transactions (``orders produce --transactional``), so an orderId on the topic
    twice is a failure: the idempotent producer could write one twice during a
    leader change (confluentinc/librdkafka#4953, bug 6 of the soak's README).
    """
    where: dict[bytes, list[str]] = {}
    for m in orders:
        where.setdefault(m.key(), []).append(f"{m.partition()}@{m.offset()}")
    twice = {k.decode(): v for k, v in where.items() if len(v) > 1}
    at = {(m.partition(), m.offset()): m.key() for m in orders}
    on_partition = {(m.partition(), m.key()) for m in orders}
    delivered = load.delivered()
    no_offset = [d for d in delivered if d["offset"] is None]
    lost = [d for d in delivered
            if (at.get((d["partition"], d["offset"])) != d["orderId"].encode() if d["offset"] is not None
                else (d["partition"], d["orderId"].encode()) not in on_partition)]
    return [
        Check("no order on the topic twice", not twice,
              f"{len(twice)} orderIds twice: {dict(list(twice.items())[:EXAMPLES])}" if twice else ""),
        Check("every order a producer saw delivered is on the topic", not lost,
              f"{len(lost)} of {len(delivered)} missing, e.g. {lost[:EXAMPLES]}" if lost
              else f"{len(delivered)} delivered orders found ({len(no_offset)} reported without an offset, "
                   "found on their partition by orderId)"),
    ]


def _no_state_wiped(hosts: dict[str, SupervisedPool]) -> Check:
    """No worker took the state for another log's and wiped it (``action=rebuild_all``).

    The soak never recreates a topic and Kafka never elects an unclean leader, so no log
    is ever shorter than what was counted: a wipe is a false alarm that costs a recount
    of every order (run 5 found one: a partition's end read low after a leader change).
    """
    wipes = []
    for name, host in hosts.items():
        for path in sorted((host.folder / "run").glob("*.log")):
            wipes += [f"{name} {path.stem}: {line[:240]}" for line in path.read_text(errors="replace").splitlines()
                      if "action=rebuild_all" in line]
    return Check("no worker wiped the state (rebuild_all)", not wipes,
                 f"{len(wipes)}: " + "; ".join(wipes[:EXAMPLES]) if wipes else "")


def _no_human(hosts: dict[str, SupervisedPool]) -> Check:
    """Every program of every host RUNNING (none FATAL or given up on), with nobody's help."""
    problems = []
    for name, host in hosts.items():
        try:
            host.wait_all_running(timeout=ALL_RUNNING_TIMEOUT_S)
        except AssertionError as exc:
            problems.append(f"{name}: {str(exc)[:300]}")
    return Check("no worker needed a human (every program RUNNING)", not problems, "; ".join(problems))
