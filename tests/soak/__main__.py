"""``python -m tests.soak`` (``scripts/soak``): one nemesis soak on a bed of its own.

Runs on lane 0's ports (tests/lanes.py; TEST_PORT_SHIFT moves them): the bed on the
lane's ports + 50, the pool on the lane's schema registry, which is started (and
stopped afterwards) if it is not running. Exit code 0 when the verdict passed.
"""
from __future__ import annotations

import logging
import os
import random
import signal
import sys
import tempfile
import time
from pathlib import Path

import click
import httpx

from ..bed import running_bed
from ..conftest import stack_env  # also points this process at lane 0 (tests/conftest.py)
from ..lanes import REPO
from ..pool import stack
from .runner import SoakConfig, plan, run

log = logging.getLogger("tests.soak")


@click.command()
@click.option("--minutes", type=click.FloatRange(min=1), default=5.0, show_default=True,
              help="How long the load runs and faults are drawn (convergence and checks come on top).")
@click.option("--seed", type=int, default=None, help="The schedule's seed (default: a random one, printed).")
@click.option("--rate", type=click.IntRange(min=1), default=300, show_default=True, help="Orders per second.")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Folder for report.json, timeline.png and the logs [default: run/soak/<time>-seed<seed>].")
@click.option("--plan-only", is_flag=True, help="Print the schedule the seed draws; start nothing.")
def main(minutes: float, seed: int | None, rate: int, out: Path | None, plan_only: bool) -> None:
    """Run the pool under a seeded random fault schedule, then check it against the log."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    if seed is None:
        seed = random.SystemRandom().randrange(1, 2**31)
    config = SoakConfig(minutes=minutes, seed=seed, rate=rate)
    click.echo(f"soak seed={seed} (rerun with --seed {seed})")
    if plan_only:
        for fault in plan(config):
            click.echo(f"{fault.at_s:7.1f}s  {fault.kind:<17} {fault.target:<28} {fault.duration_s:5.1f}s")
        return
    out = out or REPO / "run" / "soak" / f"{time.strftime('%Y%m%d-%H%M%S')}-seed{seed}"
    out = out.resolve()  # the hosts run supervisord from their own folders
    # SIGTERM ends the run like Ctrl-C: the finally blocks stop the pool, the load and the bed.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    started_registry = _ensure_registry()
    try:
        with tempfile.TemporaryDirectory(prefix="soak-bed-") as folder, running_bed(Path(folder)) as bed:
            report = run(config, bed, out)
    finally:
        if started_registry:
            stack("stop", "registry", env=dict(os.environ))
    verdict = report["verdict"] or {}
    for check in verdict.get("checks", []):
        click.echo(f"{'ok  ' if check['ok'] else 'FAIL'} {check['name']}" + (f": {check['detail']}"
                                                                          if check["detail"] else ""))
    click.echo(f"soak seed={seed} {report['status']}: {len(report['faults'])} faults, "
               f"{verdict.get('orders')} orders, converged after {verdict.get('converged_after_s')} s; "
               f"report {out / 'report.json'}, timeline {out / 'timeline.png'}")
    sys.exit(0 if verdict.get("passed") else 1)


def _ensure_registry() -> bool:
    """Start the lane's schema registry unless it answers; whether this run started it."""
    try:
        httpx.get(stack_env()["SCHEMA_REGISTRY_URL"] + "/subjects", timeout=5).raise_for_status()
        return False
    except httpx.HTTPError:
        log.info("starting the lane's schema registry")
        stack("start", "registry", env=dict(os.environ))
        return True


if __name__ == "__main__":
    main()
