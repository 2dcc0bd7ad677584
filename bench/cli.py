"""The benchmark's command line: run the parts, take medians, print the table, write the JSON.

Every figure is the median of ``--reps`` repetitions from this one run; what
each measures, and how, is in the docstring of its module and in
bench/RESULTS.md. Everything the run creates (topics, Redis keys, consumer
groups, processes) is removed at the end, also when it fails.
"""
from __future__ import annotations

import argparse
import functools
import json
import logging
import os
import signal
import subprocess
import time
from pathlib import Path

from workers.clients import make_admin
from workers.topics import ensure_topics

from .ceiling import measure_ceiling
from .common import Resources, bench_env, preproduce
from .latency import measure_latency
from .metrics import PARTITIONS as METRICS_PARTITIONS
from .metrics import measure_metrics
from .naive import measure_naive
from .pipeline import drain
from .producer import encoded_orders, measure_producer, send_all
from .report import build_report, render_table

log = logging.getLogger("bench")

REPO = Path(__file__).resolve().parent.parent
PARTS = ("ceiling", "pipeline", "failures", "failures3", "latency", "lateness", "producer", "naive", "pools",
         "metrics")
BACKLOG_PARTS = {"ceiling", "pipeline", "failures", "failures3", "naive"}
CEILING_MIN_REPS = 5
LATENESS_RATE = 1000.0  # orders/s for the retry lateness run
# The smoke run leaves out what only repeats another part's code under other settings
# (failures3 is failures with three retry workers): it keeps CI's run short.
QUICK_SKIPS = ("failures3",)
POOLS_PARTITIONS = 6  # the pools part: 3 workers per pool, so two pools give each worker a partition


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="bench/run.py", description=__doc__.splitlines()[0])
    p.add_argument("--orders", type=int, default=500_000, help="pre-produced backlog (default 500000)")
    p.add_argument("--reps", type=int, default=3, help="repetitions per figure (default 3)")
    p.add_argument("--quick", action="store_true",
                   help="smoke run: 30000 orders, 1 repetition, short latency/naive windows")
    p.add_argument("--only", default=None,
                   help=f"comma-separated parts (default: all of {PARTS}; --quick leaves out {QUICK_SKIPS})")
    p.add_argument("--latency-rate", type=float, default=2000.0, help="orders/s for the latency run")
    p.add_argument("--latency-seconds", type=float, default=10.0, help="seconds per latency repetition")
    p.add_argument("--producer-orders", type=int, default=200_000, help="orders per producer repetition")
    p.add_argument("--naive-seconds", type=float, default=5.0, help="seconds per naive repetition")
    p.add_argument("--metrics-scrapes", type=int, default=50, help="scrapes of /metrics per repetition")
    p.add_argument("--json", type=Path, default=REPO / "bench" / "results" / "latest.json",
                   help="where to write the results")
    args = p.parse_args(argv)
    if args.quick:
        args.orders, args.reps = min(args.orders, 30_000), 1
        args.latency_seconds, args.producer_orders, args.naive_seconds = 2.0, 20_000, 1.0
        args.metrics_scrapes = 10
    # The ceiling is cheap and the most sensitive to other load on the machine: at least 5 repetitions.
    args.ceiling_reps = args.reps if args.quick else max(args.reps, CEILING_MIN_REPS)
    if args.only is None:
        args.only = ",".join(p for p in PARTS if not (args.quick and p in QUICK_SKIPS))
    args.parts = [x.strip() for x in args.only.split(",") if x.strip()]
    unknown = set(args.parts) - set(PARTS)
    if unknown:
        p.error(f"unknown parts {sorted(unknown)}; choose from {PARTS}")
    return args


def run_parts(args: argparse.Namespace, res: Resources) -> dict:
    """Run the chosen parts; returns the raw per-repetition results."""
    raw: dict = {}
    base = bench_env("backlog")
    if BACKLOG_PARTS & set(args.parts):
        ends = preproduce(res.track(base), args.orders)
        total = sum(ends.values())
        if "ceiling" in args.parts:
            raw["ceiling"] = [measure_ceiling(base, ends) for _ in range(args.ceiling_reps)]
        raw.update(run_drains(args, res, total))
        if "naive" in args.parts:
            env = bench_env("naive", ORDERS_TOPIC=base["ORDERS_TOPIC"])
            res.track(env)
            raw["naive"] = measure_naive(env, total, args.naive_seconds, args.reps)
    if "latency" in args.parts:
        env = bench_env("latency")
        res.track(env)
        raw["latency"] = measure_latency(env, args.latency_rate, args.latency_seconds, args.reps, warmup_s=2.0)
    if "lateness" in args.parts:
        # Issue 14's setting: 1,000 orders/s, 30% failures, backoffs of 200, 400 and 800 ms.
        env = bench_env("lateness", ORDERS_FAILURE_RATE="0.3", RETRY_BACKOFF_MS="200", RETRY_BACKOFF_MULTIPLIER="2")
        res.track(env)
        # The warm-up lets the slowest backoff (800 ms) fill the retry topic with every level.
        raw["lateness"] = measure_latency(env, LATENESS_RATE, args.latency_seconds, args.reps, warmup_s=5.0,
                                          field="lateness")
    if "producer" in args.parts:
        env = bench_env("producer")
        res.track(env)
        raw["producer"] = [measure_producer(env, args.producer_orders) for _ in range(args.reps)]
    if "pools" in args.parts:
        raw.update(run_pools(args, res))
    if "metrics" in args.parts:
        # 10% failures at 500/s: the workers batch, retry and beat while the endpoint reads.
        env = bench_env("metrics", ORDERS_PARTITIONS=str(METRICS_PARTITIONS), ORDERS_FAILURE_RATE="0.1",
                        PRODUCE_RATE="500")
        res.track(env)
        raw["metrics"] = measure_metrics(env, args.metrics_scrapes, args.reps)
    return raw


def run_pools(args: argparse.Namespace, res: Resources) -> dict[str, list[dict]]:
    """One pool, then two (supervisord "hosts" in one consumer group), repetitions interleaved.

    Each run starts its pools on an empty 6-partition topic, waits until the group has
    spread the partitions over them, then feeds the orders pre-encoded (the bare
    producer outruns the pools several times over). On one machine the pools share
    its cores: this shows the spread is exact and costs little, not a speed-up
    (docs/scaling.md)."""
    values = encoded_orders(res.track(bench_env("pools-feed")), args.orders)
    raw: dict[str, list[dict]] = {}
    for _ in range(args.reps):
        for hosts in (1, 2):
            env = bench_env(f"pools-{hosts}", ORDERS_PARTITIONS=str(POOLS_PARTITIONS))
            settings = res.track(env)
            ensure_topics(make_admin(settings), settings)
            raw.setdefault(f"pools_{hosts}", []).append(
                drain(env, len(values), timeout=120 + len(values) / 2000, hosts=hosts,
                      feed=functools.partial(send_all, settings, values)))
    return raw


def run_drains(args: argparse.Namespace, res: Resources, total: int) -> dict[str, list[dict]]:
    """The pool draining ``total`` orders, failure-free and with 10% failures (with one retry worker,
    and with three: ``failures3``), repetitions interleaved (so that drift and other load on the
    machine hit them alike).

    Each drain starts the pool on an empty topic, waits until the consumer group has
    given each worker its partition, then feeds the orders pre-encoded (as the pools
    do). A pool started on a full topic counts with one worker for the first seconds:
    the group assigns the other two a few seconds after they join (KIP-848
    heartbeats), and most of a 500,000-order backlog was gone before the window that
    counts (all three workers busy) began (2.3 s windows, figures +-30%)."""
    values = encoded_orders(res.track(bench_env("drains-feed")), total)
    raw: dict[str, list[dict]] = {}
    parts = [p for p in ("pipeline", "failures", "failures3") if p in args.parts]
    for _ in range(args.reps):
        for part in parts:
            env = bench_env(part, ORDERS_FAILURE_RATE="0" if part == "pipeline" else "0.1",
                            RETRY_WORKERS="3" if part == "failures3" else "1")
            settings = res.track(env)
            ensure_topics(make_admin(settings), settings)
            raw.setdefault(part, []).append(drain(env, total, timeout=120 + total / 2000,
                                                  feed=functools.partial(send_all, settings, values)))
    return raw


def git_revision() -> str:
    result = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True)
    dirty = subprocess.run(["git", "status", "--porcelain", "workers"], cwd=REPO, capture_output=True, text=True)
    return result.stdout.strip() + ("+dirty-workers" if dirty.stdout.strip() else "")


def _exit_on_sigterm(signum, frame) -> None:
    raise SystemExit(128 + signum)  # so that the clean-up in the finally blocks runs


def main(argv=None) -> None:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    for noisy in ("httpx", "httpx2"):  # the registry client logs every request
        logging.getLogger(noisy).setLevel(logging.WARNING)
    started = time.time()
    load_before = os.getloadavg()
    res = Resources()
    try:
        raw = run_parts(args, res)
    finally:
        res.cleanup()
    meta = {"started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(started)),
            "duration_s": round(time.time() - started, 1), "orders": args.orders, "reps": args.reps,
            "ceiling_reps": args.ceiling_reps,
            "quick": args.quick, "parts": args.parts, "cpus": os.cpu_count(), "load_before": load_before,
            "load_after": os.getloadavg(), "revision": git_revision(), "latency_rate": args.latency_rate,
            "producer_orders": args.producer_orders, "created": res.names()}
    report = build_report(raw, meta)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=2) + "\n")
    print(render_table(report))
    log.info("wrote %s in %.0f s", args.json, meta["duration_s"])
