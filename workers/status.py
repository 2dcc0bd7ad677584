"""`orders status`: is the pool healthy? One snapshot from Redis and Kafka watermarks."""
from __future__ import annotations

import time
from dataclasses import dataclass, field

from confluent_kafka import KafkaException, TopicPartition
from confluent_kafka.admin import AdminClient

from .errors import ServiceUnavailable
from .latency import merge
from .settings import Settings
from .store import AggregateStore, Source
from .topics import end_offsets, retry_delay_of, retry_family

ALIVE_WITHIN_MS = 10_000  # workers refresh their heartbeat every 2 s


def _partition_counts(admin: AdminClient, settings: Settings) -> dict[str, int]:
    """The orders topic's and each retry topic's partitions as Kafka has them (more may have been
    added); as configured for a topic not created yet. The retry topics are today's delay levels
    and every other of the family that exists (levels of earlier settings still being drained).

    One metadata request for all the topics (``orders metrics`` reads this at every scrape).
    """
    try:
        # All topics: asking for one by name could create it on a broker that auto-creates.
        topics = admin.list_topics(timeout=5).topics
    except KafkaException as exc:
        raise ServiceUnavailable(f"kafka: {exc.args[0].str()}") from exc
    configured = {settings.orders_topic: settings.partitions,
                  **{t: settings.retry_partitions for t in retry_family(settings, topics)}}
    counts = {}
    for topic, default in configured.items():
        meta = topics.get(topic)
        counts[topic] = len(meta.partitions) if meta is not None and meta.error is None and meta.partitions else default
    return counts


@dataclass
class StatusReader:
    """Takes snapshots; remembers the previous one to show rates and what grew."""

    settings: Settings
    store: AggregateStore
    admin: AdminClient
    previous: dict | None = field(default=None)
    # The last snapshot's heartbeats as the workers wrote them (live or not), by worker name
    beats: dict[str, dict] = field(default_factory=dict)
    # How long the topics' partition counts are reused (0: read at every snapshot). `orders metrics`
    # reuses them for a while: a scrape then costs one Kafka round trip, not two.
    metadata_max_age_s: float = 0.0
    _counts: tuple[float, dict[str, int]] | None = field(default=None, repr=False)

    def _partition_counts(self) -> dict[str, int]:
        s = self.settings
        now = time.monotonic()
        if self._counts is None or now - self._counts[0] >= self.metadata_max_age_s:
            self._counts = (now, _partition_counts(self.admin, s))
        return self._counts[1]

    def snapshot(self) -> dict:
        s = self.settings
        counts = self._partition_counts()
        order_sources = [Source(s.orders_topic, p) for p in range(counts[s.orders_topic])]
        retry_sources = [Source(t, p) for t, n in counts.items() if t != s.orders_topic for p in range(n)]
        snap = self.store.snapshot(len(order_sources), order_sources + retry_sources, self.store.worker_names())
        # After Redis: an end read later than the position it is compared with, so a lag is never negative.
        ends = end_offsets(self.admin, [TopicPartition(src.topic, src.partition)
                                        for src in order_sources + retry_sources])
        order_ends, retry_ends = ends[:len(order_sources)], ends[len(order_sources):]
        now_ms = int(time.time() * 1000)
        self.beats = {name: beat for name, beat in snap["workers"].items() if beat}
        # Who owns what: each live worker's heartbeat names the partitions it holds.
        live = {name: beat for name, beat in snap["workers"].items() if _alive(beat, now_ms)}
        owners: dict[str, list[str]] = {}
        for name, beat in sorted(live.items()):
            for source in beat.get("positions", {}):
                owners.setdefault(source, []).append(name)

        partitions = []
        for p, source in enumerate(order_sources):
            claimed = owners.get(str(source), [])
            beat = live[claimed[0]] if claimed else None
            totals = snap["partitions"][p]
            position = snap["sources"][source].get("offset")
            end = order_ends[p]
            partitions.append({
                "partition": p,
                "alive": beat is not None,
                "owner": claimed[0] if claimed else None,
                # two live claims: a move in progress (the old owner's heartbeat has not expired yet)
                "moving": len(claimed) > 1,
                "host": beat.get("host") if beat else None,
                "pid": beat["pid"] if beat else None,
                "manager": beat.get("manager") if beat else None,
                **totals.as_dict(),
                "end_offset": end,
                "position": position,
                "lag": (end - (position or 0)) if end is not None else None,
            })
        retry_beats = [live[name] for name in sorted({n for src in retry_sources for n in owners.get(str(src), [])})]
        levels = _retry_levels(s, retry_sources, retry_ends, snap["sources"], retry_beats)
        retry_backlog = sum(level["backlog"] for level in levels)
        dues = [b["next_due_ms"] for b in retry_beats if b.get("next_due_ms")]
        retry_workers = [b for n, b in live.items() if b.get("role") == "retry"]
        total = snap["total"]
        data = {
            "at_ms": now_ms,
            "global": {**total.as_dict(), "dead_lettered": total.dead_lettered, "retried": total.retried,
                       "duplicate_replays": total.duplicate_replays},
            "partitions": partitions,
            "retry": {
                "alive": bool(retry_workers),
                "pid": retry_workers[0]["pid"] if retry_workers else None,
                "workers": len(retry_workers),
                "unowned": [src.partition for src in retry_sources if str(src) not in owners],
                # end offsets include transaction markers: an upper bound
                "backlog": retry_backlog,
                "waiting": sum(b.get("waiting", 0) for b in retry_beats) if retry_workers else None,
                "next_due_ms": min(dues) if dues else None,
                # handled - due of every retry the live retry workers handled since they started
                "lateness": merge(b["lateness"] for b in retry_workers if "lateness" in b),
                "levels": levels,
            },
            "workers": {name: {"host": b.get("host"), "pid": b.get("pid"), "role": b.get("role"),
                               "at_ms": b.get("at_ms"), "owns": sorted(b.get("positions", {}))}
                        for name, b in sorted(live.items())},
            # What each source decided: its orders counted, retried, dead-lettered, duplicate replays
            "sources": [{"topic": src.topic, "partition": src.partition,
                         **{k: snap["sources"][src].get(k, 0)
                            for k in ("counted", "retried", "dead_lettered", "duplicate_replays")}}
                        for src in order_sources + retry_sources],
            "dlq": {"size": total.dead_lettered},
            "latency": merge(b["latency"] for b in live.values() if "latency" in b),
        }
        data["pool"] = _pool(data)
        self._compare(data)
        self.previous = data
        return data

    def _compare(self, data: dict) -> None:
        """Rates since the previous snapshot, and the alerts a person should see."""
        prev = self.previous
        alerts = []
        elapsed = (data["at_ms"] - prev["at_ms"]) / 1000 if prev else 0
        # By partition number: partitions added since the previous snapshot have no "before".
        previous = {p["partition"]: p for p in prev["partitions"]} if prev else {}
        for part in data["partitions"]:
            before = previous.get(part["partition"])
            part["rate_per_s"] = round((part["count"] - before["count"]) / elapsed, 1) if before and elapsed else None
            part["lag_growing"] = bool(before and part["lag"] is not None and before["lag"] is not None
                                       and part["lag"] > before["lag"] > 0)
            if not part["alive"]:
                alerts.append(f"partition {part['partition']} is owned by no live worker")
            elif part["moving"]:
                alerts.append(f"partition {part['partition']} is moving between workers (rebalance)")
            if before and part["lag_growing"]:
                alerts.append(f"partition {part['partition']} lag is growing ({before['lag']} -> {part['lag']})")
        if not data["retry"]["alive"]:
            alerts.append("no retry worker is alive")
        elif data["retry"]["unowned"]:
            alerts.append(f"retry partitions owned by no live worker: {data['retry']['unowned']}")
        grown = data["dlq"]["size"] - prev["dlq"]["size"] if prev else 0
        data["dlq"]["grew"] = grown > 0
        if grown > 0:
            alerts.append(f"the DLQ grew by {grown}")
        data["alerts"] = alerts


def _retry_levels(settings: Settings, sources: list[Source], ends: list[int | None], states: dict[Source, dict],
                  beats: list[dict]) -> list[dict]:
    """Per retry topic (delay level): backlog, waiting retries and the next due time.

    ``current`` is false for a level of other backoff settings (or the single retry
    topic of earlier versions): nothing new goes there, and it drains to a backlog of 0.
    """
    waiting: dict[str, list] = {}
    for beat in beats:
        waiting.update(beat.get("waiting_by_source", {}))
    levels: dict[str, dict] = {}
    for src, end in zip(sources, ends, strict=True):
        delay = retry_delay_of(src.topic)
        level = levels.setdefault(src.topic, {
            "topic": src.topic, "delay_ms": delay if delay >= 0 else None,
            "current": src.topic in settings.retry_topics, "backlog": 0, "waiting": 0, "next_due_ms": None})
        level["backlog"] += max(0, (end or 0) - (states[src].get("offset") or 0))
        count, due = waiting.get(str(src), (0, None))
        level["waiting"] += count
        if due is not None and (level["next_due_ms"] is None or due < level["next_due_ms"]):
            level["next_due_ms"] = due
    return list(levels.values())


def _alive(beat: dict | None, now_ms: int) -> bool:
    if not beat:
        return False
    return now_ms - beat.get("at_ms", 0) <= ALIVE_WITHIN_MS


def _pool(data: dict) -> dict:
    owned = [p for p in data["partitions"] if p["alive"]]
    managers = {p["manager"] for p in owned if p.get("manager")}
    running = len(data["workers"])
    if running == 0:
        state = "not running"
    elif len(owned) == len(data["partitions"]) and data["retry"]["alive"] and not data["retry"]["unowned"]:
        state = "running"
    else:
        state = "degraded"
    return {"state": state, "manager": ",".join(sorted(managers)) or None, "workers_alive": running,
            "hosts": sorted({w["host"] for w in data["workers"].values() if w.get("host")}),
            "partitions_owned": len(owned), "partitions": len(data["partitions"])}


def _num(value, fmt: str = "") -> str:
    return "-" if value is None else format(value, fmt)


def render(data: dict, style=lambda text, **kw: text) -> list[str]:
    """The status as lines of text; ``style`` is click.style on a terminal."""
    pool = data["pool"]
    g = data["global"]
    state_color = {"running": "green", "degraded": "yellow", "not running": "red"}[pool["state"]]
    manager = f" under {pool['manager']}" if pool["manager"] else ""
    avg = "-" if g["average"] is None else f"{g['average']:.4f}"
    lat = data["latency"]
    lines = [
        style(f"pool {pool['state']}{manager}: {pool['workers_alive']} workers alive on "
              f"{len(pool['hosts'])} host(s), {pool['partitions_owned']}/{pool['partitions']} partitions owned",
              fg=state_color, bold=True),
        f"global   count={g['count']}  sum={g['sum']:.2f}  average={avg}  retried={g['retried']}  "
        f"dead-lettered={g['dead_lettered']}  duplicate replays={g['duplicate_replays']}",
        f"latency  p50={_num(lat['p50_ms'])} ms  p99={_num(lat['p99_ms'])} ms  max={_num(lat['max_ms'])} ms  "
        "(produce to counted)",
        "",
        f"{'part':<5}{'worker':<28}{'count':>10}{'sum':>14}{'average':>10}{'lag':>9}{'orders/s':>10}",
    ]
    for p in data["partitions"]:
        worker = f"{p['owner']} ({p['pid']})" if p["alive"] else "NOBODY"
        if p["moving"]:
            worker += " moving"
        row = (f"{p['partition']:<5}{worker:<28}{p['count']:>10}{p['sum']:>14.2f}"
               f"{_num(p['average'], '.2f'):>10}{_num(p['lag']):>9}{_num(p['rate_per_s']):>10}")
        lines.append(style(row, fg="red") if not p["alive"] else style(row, fg="yellow") if p["lag_growing"] else row)
    r = data["retry"]
    retry_state = f"{r['workers']} worker(s)" if r["alive"] else "DOWN"
    due = "-"
    if r["next_due_ms"]:
        due = f"in {max(0, r['next_due_ms'] - data['at_ms']) / 1000:.1f}s"
    late = r["lateness"]
    lines += ["", style(f"retry    {retry_state}  backlog<={r['backlog']}  waiting={r['waiting']}  next due {due}",
                        fg=None if r["alive"] else "red"),
              f"         late p50={_num(late['p50_ms'])} ms  p99={_num(late['p99_ms'])} ms  "
              f"max={_num(late['max_ms'])} ms  (handled after due)"]
    for level in r["levels"]:
        when = "-" if level["next_due_ms"] is None else f"in {max(0, level['next_due_ms'] - data['at_ms']) / 1000:.1f}s"
        note = "" if level["current"] else "  (not in use: draining)"
        lines.append(f"         {level['topic']:<28} backlog<={level['backlog']:<7} waiting={level['waiting']:<6} "
                     f"next due {when}{note}")
    dlq_line = f"dlq      {data['dlq']['size']} dead letter(s)"
    lines.append(style(dlq_line, fg="yellow") if data["dlq"]["grew"] else dlq_line)
    for alert in data["alerts"]:
        lines.append(style(f"! {alert}", fg="red"))
    return lines
