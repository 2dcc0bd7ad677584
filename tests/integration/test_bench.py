"""Smoke run of the benchmark (``bench/run.py --quick``), so that the script cannot rot.

Checks that the JSON has every figure as a positive number and that the run
removed what it created: topics, registry subjects, Redis keys, consumer groups
and processes.
Performance targets are reported by the benchmark, never asserted here.
"""
from __future__ import annotations

import json
import math
import socket
import subprocess
import sys
import time

import psutil
import pytest
import redis
from confluent_kafka.admin import AdminClient
from confluent_kafka.schema_registry import SchemaRegistryClient

from bench.cli import QUICK_SKIPS
from bench.report import ROWS

from ..conftest import stack_env
from ..pool import REPO

pytestmark = pytest.mark.timeout(420)  # a last resort: the run is stopped (and cleans up) after RUN_LIMIT_S

# A hang guard, not a speed check: the run takes about 50 s on an idle 2-core machine
# and much longer when other tests load it; each part has its own deadline too.
RUN_LIMIT_S = 360


def run_quick(out) -> subprocess.CompletedProcess:
    """Run the smoke benchmark; if it hangs past RUN_LIMIT_S, SIGTERM it (it then cleans up what it made)."""
    cmd = [sys.executable, str(REPO / "bench" / "run.py"), "--quick", "--json", str(out)]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        stdout, stderr = proc.communicate(timeout=RUN_LIMIT_S)
    except subprocess.TimeoutExpired:
        proc.terminate()
        stdout, stderr = proc.communicate(timeout=30)
        pytest.fail(f"bench/run.py --quick hung (still running after {RUN_LIMIT_S} s): {stderr[-3000:]}")
    return subprocess.CompletedProcess(cmd, proc.returncode, stdout, stderr)


def test_quick_benchmark_reports_every_figure_and_cleans_up(tmp_path):
    out = tmp_path / "bench.json"
    started = time.time()
    run = run_quick(out)
    assert run.returncode == 0, run.stderr[-4000:]

    report = json.loads(out.read_text())
    figures = report["figures"]
    expected = {row for row in ROWS if not row.startswith(QUICK_SKIPS)}
    assert set(figures) == expected, f"missing figures: {expected - set(figures)}"
    for name, value in figures.items():
        assert isinstance(value, (int, float)) and not isinstance(value, bool), name
        # A retry handled within its due millisecond is 0 ms late: lateness may be 0.
        assert math.isfinite(value) and (value > 0 or name.startswith("lateness") and value == 0), f"{name}={value}"
    host = socket.gethostname()
    # Every partition worker's RSS was sampled; the retry worker's only if it had beaten before a
    # quick drain ended (a clean-clone run saw it still starting).
    consumers = {f"{host}-consumer-{n}" for n in range(3)}
    assert consumers <= set(report["rss_peak_mb"]) <= consumers | {f"{host}-retry-0"}
    assert "figure" in run.stdout and "pipeline / ceiling" in run.stdout  # the table

    assert_cleaned_up(report["meta"]["created"], started)


def assert_cleaned_up(created: dict, started: float) -> None:
    env = stack_env()
    topics = AdminClient({"bootstrap.servers": env["KAFKA_BOOTSTRAP_SERVERS"]}).list_topics(timeout=10).topics
    assert not set(created["topics"]) & set(topics)
    groups = AdminClient({"bootstrap.servers": env["KAFKA_BOOTSTRAP_SERVERS"]}).list_consumer_groups().result(10)
    assert not [g.group_id for g in groups.valid if g.group_id.startswith(tuple(created["group_prefixes"]))]
    subjects = SchemaRegistryClient({"url": env["SCHEMA_REGISTRY_URL"], "timeout": 10}).get_subjects()
    assert not {f"{t}-value" for t in created["topics"]} & set(subjects)
    r = redis.Redis.from_url(env["REDIS_URL"])
    for prefix in created["redis_prefixes"]:
        assert not list(r.scan_iter(match=f"{{{prefix}}}:*", count=1000)), prefix
    # This run's pools live in folders named after its Redis prefixes (other runs may be going on).
    ours = tuple(f"bench-pool-{prefix}-" for prefix in created["redis_prefixes"])
    leftovers = [p.pid for p in psutil.process_iter(["cmdline", "create_time"])
                 if p.info["create_time"] and p.info["create_time"] >= started
                 and any(mark in part for part in p.info["cmdline"] or () for mark in ours)]
    assert not leftovers, f"processes left running: {leftovers}"
