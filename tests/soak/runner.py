"""One soak run: two hosts on the bed under steady load, the nemesis's schedule, heal, converge, check.

The report (``report.json`` in the run's folder) is written before anything starts,
with the seed and the whole schedule, and written again at the end with what
happened: the faults as applied, a sample a second, the verdict. Then the timeline
(``timeline.png``). Everything started here is stopped here, by pid, also on failure.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from urllib.parse import urlsplit

from confluent_kafka import KafkaException

from workers.clients import make_admin, make_redis
from workers.errors import OrdersError
from workers.settings import Settings
from workers.store import AggregateStore

from ..bed import GROUP_SESSION_S, KAFKA_NODES, REDIS_NODES, Bed
from ..conftest import isolated_env
from ..pool import SupervisedPool, wait_until
from . import schedule, timeline
from .checker import verdict
from .load import Load
from .nemesis import Nemesis
from .network import KAFKA, REDIS, REGISTRY, Network, check_available
from .sampler import Sampler, per_second
from .topics import pool_topics

log = logging.getLogger(__name__)

HOSTS = ("host-a", "host-b")
WORKERS, RETRY_WORKERS = 3, 1
PARTITIONS, RETRY_PARTITIONS = 12, 4
HOST_START_TIMEOUT_S = 120
SPREAD_TIMEOUT_S = 120
# Past the schedule's end, how long the faults still healing may take (a broker start waits for readiness).
HEAL_GRACE_S = 300


@dataclass(frozen=True)
class SoakConfig:
    minutes: float
    seed: int
    rate: int = 300              # orders per second, steady
    failure_rate: float = 0.2    # transient failures (ORDERS_FAILURE_RATE): retries and some dead letters

    @property
    def window_s(self) -> float:
        return self.minutes * 60


def topology() -> schedule.Topology:
    return schedule.Topology(hosts=HOSTS, workers=WORKERS, retry_workers=RETRY_WORKERS, kafka_nodes=KAFKA_NODES,
                             redis_nodes=REDIS_NODES, session_s=GROUP_SESSION_S)


def plan(config: SoakConfig) -> list[schedule.Fault]:
    return schedule.draw(config.seed, topology(), window_s=config.window_s)


def run(config: SoakConfig, bed: Bed, out: Path) -> dict:
    """Run the soak on ``bed``, writing its report and timeline into ``out``; the report."""
    out = out.resolve()  # the hosts run supervisord from folders under it
    out.mkdir(parents=True, exist_ok=True)
    faults = plan(config)
    report: dict = {"seed": config.seed, "minutes": config.minutes, "config": asdict(config),
                    "topology": asdict(topology()), "schedule": [f.as_dict() for f in faults],
                    "overlapping_faults": schedule.overlapping(faults), "status": "running",
                    "faults": [], "samples": [], "marks": {}, "verdict": None}
    _write(out, report)
    log.info("soak seed=%d minutes=%s faults=%d overlapping=%d report=%s", config.seed, config.minutes,
             len(faults), report["overlapping_faults"], out / "report.json")
    env = isolated_env("soak", ORDERS_PARTITIONS=str(PARTITIONS), RETRY_PARTITIONS=str(RETRY_PARTITIONS),
                       ORDERS_FAILURE_RATE=str(config.failure_rate), RETRY_BACKOFF_MS="200",
                       PRODUCE_RATE="0.001", **bed.pool_env)
    settings = Settings.from_env(env)
    hosts: dict[str, SupervisedPool] = {}
    load = Load(env, out, config.rate, config.seed)
    check_available()
    network = Network(tag=str(bed.kafka_ports[0]), hosts=HOSTS, folder=out / "network",
                      ports={KAFKA: bed.kafka_ports, REDIS: bed.redis_ports,
                             REGISTRY: [_port(settings.schema_registry_url)]})
    nemesis: Nemesis | None = None
    sampler: Sampler | None = None
    try:
        network.open()
        for name in HOSTS:
            hosts[name] = _host(env, name, out / "hosts" / name, network)
            hosts[name].start(timeout=HOST_START_TIMEOUT_S)
        t0 = time.monotonic()
        sampler = Sampler(settings, t0)
        wait_until(lambda: _spread(sampler), f"every partition owned, on {HOSTS}", timeout=SPREAD_TIMEOUT_S)
        t0 = sampler.t0 = time.monotonic()
        sampler.start()
        load.start()
        nemesis = Nemesis(bed, hosts, load, settings, lane_env=dict(os.environ), network=network)
        nemesis.start(faults, t0)
        time.sleep(config.window_s)  # the soak itself: load and faults for the whole window
        if not nemesis.join(HEAL_GRACE_S):
            log.error("faults still not healed %d s after the window", HEAL_GRACE_S)
        last_heal = max([t0 + a.healed_s for a in nemesis.applied if a.healed_s is not None], default=t0)
        report["marks"]["last heal"] = round(last_heal - t0, 1)
        report["load_exit"] = load.stop()
        report["load_incarnations"] = load.incarnations
        report["marks"]["load stopped"] = round(time.monotonic() - t0, 1)
        failed = [f"{a.fault.kind} {a.fault.target}: {a.outcome} {a.detail}" for a in nemesis.applied
                  if a.outcome not in ("healed", "skipped")]
        report["verdict"] = verdict(env, settings, hosts=hosts, load=load, last_heal=last_heal, faults_failed=failed)
        converged = report["verdict"]["converged_after_s"]
        report["marks"]["converged"] = None if converged is None else round(last_heal - t0 + converged, 1)
        report["status"] = "passed" if report["verdict"]["passed"] else "failed"
    except BaseException as exc:
        report["status"] = f"error: {type(exc).__name__}: {exc}"[:500]
        raise
    finally:
        if nemesis is not None:
            nemesis.abort()
            nemesis.join(120)
            report["faults"] = [a.as_dict() for a in nemesis.applied]
        if sampler is not None:
            sampler.finish()
            report["samples"] = sampler.samples
            report["counted_per_s"] = per_second(sampler.samples)
        load.kill()
        for host in hosts.values():
            host.stop()
        network.close()  # after the hosts: their processes are in its namespaces
        _keep_bed_logs(bed, out)
        _cleanup(settings)
        _write(out, report)
        timeline.draw(report, out / "timeline.png")
        log.info("soak seed=%d status=%s report=%s timeline=%s", config.seed, report["status"],
                 out / "report.json", out / "timeline.png")
    return report


def _host(env: dict, name: str, folder: Path, network: Network) -> SupervisedPool:
    """A supervisord host in its own network namespace."""
    folder.mkdir(parents=True)
    return SupervisedPool({**env, "ORDERS_HOST": name, "ORDERS_WORKERS": str(WORKERS),
                           "RETRY_WORKERS": str(RETRY_WORKERS)}, folder, prefix=tuple(network.exec_prefix(name)))


def _port(url: str) -> int:
    parsed = urlsplit(url)
    if parsed.hostname not in ("127.0.0.1", "localhost") or parsed.port is None:
        raise ValueError(f"the soak's hosts reach servers on 127.0.0.1:<port> only, not {url}")
    return parsed.port


def _spread(sampler: Sampler) -> bool:
    """Every partition and retry partition owned by a live worker, and both hosts own some."""
    try:
        snap = sampler.reader.snapshot()
    except OrdersError:
        return False  # the topics not created yet, a server not answering yet
    return snap["pool"]["state"] == "running" and snap["pool"]["hosts"] == sorted(HOSTS)


def _cleanup(settings: Settings) -> None:
    """The run's topics and Redis keys (the bed may be shared with other tests); a bed gone is no error."""
    try:
        admin = make_admin(settings)
        existing = admin.list_topics(timeout=10).topics
        topics = pool_topics(settings, existing)
        for future in (admin.delete_topics(topics, operation_timeout=30).values() if topics else ()):
            try:
                future.result()
            except KafkaException:
                pass  # already gone
        AggregateStore(make_redis(settings), settings.redis_prefix).clear()
    except (KafkaException, OrdersError) as exc:
        log.warning("cleanup failed: %s", exc)


def _keep_bed_logs(bed: Bed, out: Path) -> None:
    """The brokers' and Redis nodes' logs, for a failed run's post-mortem (the bed's folder goes)."""
    logs = Path(bed.env["STACK_DIR"]) / "logs"
    if logs.is_dir():
        shutil.copytree(logs, out / "bed-logs", dirs_exist_ok=True)


def _write(out: Path, report: dict) -> None:
    tmp = out / "report.json.tmp"
    tmp.write_text(json.dumps(report, indent=1))
    tmp.replace(out / "report.json")
