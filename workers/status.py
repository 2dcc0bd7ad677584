"""`orders status`: is the pool healthy? One snapshot from Redis and Kafka watermarks."""
from __future__ import annotations

import time
from dataclasses import dataclass, field

from confluent_kafka import TopicPartition
from confluent_kafka.admin import AdminClient

from .latency import merge
from .settings import Settings
from .store import AggregateStore, Source
from .topics import end_offsets

ALIVE_WITHIN_MS = 10_000  # workers refresh their heartbeat every 2 s


def _end_offsets(admin: AdminClient, topic: str, partitions: int) -> list[int | None]:
    """Each partition's end offset; None where the topic does not exist yet."""
    return end_offsets(admin, [TopicPartition(topic, p) for p in range(partitions)])


@dataclass
class StatusReader:
    """Takes snapshots; remembers the previous one to show rates and what grew."""

    settings: Settings
    store: AggregateStore
    admin: AdminClient
    previous: dict | None = field(default=None)

    def snapshot(self) -> dict:
        s = self.settings
        order_sources = [Source(s.orders_topic, p) for p in range(s.partitions)]
        retry_sources = [Source(s.retry_topic, p) for p in range(s.retry_partitions)]
        workers = [f"partition-{p}" for p in range(s.partitions)] + ["retry"]
        snap = self.store.snapshot(s.partitions, order_sources + retry_sources, workers)
        order_ends = _end_offsets(self.admin, s.orders_topic, s.partitions)
        retry_ends = _end_offsets(self.admin, s.retry_topic, s.retry_partitions)
        now_ms = int(time.time() * 1000)
        beats = snap["workers"]

        partitions = []
        for p, source in enumerate(order_sources):
            beat = beats[f"partition-{p}"]
            totals = snap["partitions"][p]
            position = snap["sources"][source].get("offset")
            end = order_ends[p]
            partitions.append({
                "partition": p,
                "alive": _alive(beat, now_ms),
                "pid": beat["pid"] if beat else None,
                "manager": beat.get("manager") if beat else None,
                **totals.as_dict(),
                "end_offset": end,
                "position": position,
                "lag": (end - (position or 0)) if end is not None else None,
            })
        retry_beat = beats["retry"]
        retry_backlog = sum(max(0, (end or 0) - (snap["sources"][src].get("offset") or 0))
                            for src, end in zip(retry_sources, retry_ends, strict=True))
        total = snap["total"]
        data = {
            "at_ms": now_ms,
            "global": {**total.as_dict(), "dead_lettered": total.dead_lettered, "retried": total.retried,
                       "duplicate_replays": total.duplicate_replays},
            "partitions": partitions,
            "retry": {
                "alive": _alive(retry_beat, now_ms),
                "pid": retry_beat["pid"] if retry_beat else None,
                # end offsets include transaction markers: an upper bound
                "backlog": retry_backlog,
                "waiting": retry_beat.get("waiting", 0) if retry_beat else None,
                "next_due_ms": retry_beat.get("next_due_ms") if retry_beat else None,
            },
            "dlq": {"size": total.dead_lettered},
            "latency": merge(b["latency"] for b in beats.values() if b and "latency" in b),
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
        for part in data["partitions"]:
            before = prev["partitions"][part["partition"]] if prev else None
            part["rate_per_s"] = round((part["count"] - before["count"]) / elapsed, 1) if before and elapsed else None
            part["lag_growing"] = bool(before and part["lag"] is not None and before["lag"] is not None
                                       and part["lag"] > before["lag"] > 0)
            if not part["alive"]:
                alerts.append(f"partition {part['partition']} has no live worker")
            if before and part["lag_growing"]:
                alerts.append(f"partition {part['partition']} lag is growing ({before['lag']} -> {part['lag']})")
        if not data["retry"]["alive"]:
            alerts.append("the retry worker is not alive")
        grown = data["dlq"]["size"] - prev["dlq"]["size"] if prev else 0
        data["dlq"]["grew"] = grown > 0
        if grown > 0:
            alerts.append(f"the DLQ grew by {grown}")
        data["alerts"] = alerts


def _alive(beat: dict | None, now_ms: int) -> bool:
    if not beat:
        return False
    return now_ms - beat.get("at_ms", 0) <= ALIVE_WITHIN_MS


def _pool(data: dict) -> dict:
    alive = [p for p in data["partitions"] if p["alive"]]
    managers = {p["manager"] for p in alive if p.get("manager")}
    running = len(alive) + (1 if data["retry"]["alive"] else 0)
    if running == 0:
        state = "not running"
    elif len(alive) == len(data["partitions"]) and data["retry"]["alive"]:
        state = "running"
    else:
        state = "degraded"
    return {"state": state, "manager": ",".join(sorted(managers)) or None,
            "workers_alive": running, "workers_expected": len(data["partitions"]) + 1}


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
        style(f"pool {pool['state']}{manager}: {pool['workers_alive']}/{pool['workers_expected']} workers alive",
              fg=state_color, bold=True),
        f"global   count={g['count']}  sum={g['sum']:.2f}  average={avg}  retried={g['retried']}  "
        f"dead-lettered={g['dead_lettered']}  duplicate replays={g['duplicate_replays']}",
        f"latency  p50={_num(lat['p50_ms'])} ms  p99={_num(lat['p99_ms'])} ms  max={_num(lat['max_ms'])} ms  "
        "(produce to counted)",
        "",
        f"{'part':<5}{'worker':<16}{'count':>10}{'sum':>14}{'average':>10}{'lag':>9}{'orders/s':>10}",
    ]
    for p in data["partitions"]:
        worker = f"pid {p['pid']}" if p["alive"] else "DOWN"
        row = (f"{p['partition']:<5}{worker:<16}{p['count']:>10}{p['sum']:>14.2f}"
               f"{_num(p['average'], '.2f'):>10}{_num(p['lag']):>9}{_num(p['rate_per_s']):>10}")
        lines.append(style(row, fg="red") if not p["alive"] else style(row, fg="yellow") if p["lag_growing"] else row)
    r = data["retry"]
    retry_state = f"pid {r['pid']}" if r["alive"] else "DOWN"
    due = "-"
    if r["next_due_ms"]:
        due = f"in {max(0, r['next_due_ms'] - data['at_ms']) / 1000:.1f}s"
    lines += ["", style(f"retry    {retry_state}  backlog<={r['backlog']}  waiting={r['waiting']}  next due {due}",
                        fg=None if r["alive"] else "red")]
    dlq_line = f"dlq      {data['dlq']['size']} dead letter(s)"
    lines.append(style(dlq_line, fg="yellow") if data["dlq"]["grew"] else dlq_line)
    for alert in data["alerts"]:
        lines.append(style(f"! {alert}", fg="red"))
    return lines
