"""A short nemesis soak with a fixed seed (tests/soak/runner.py): every order counted once or
dead-lettered once through the schedule's faults, and the counts converged after the last heal.

In CI's run, not in the lanes': pyproject.toml deselects the ``soak`` marker from the
lanes' run, and ``scripts/test`` without arguments (the whole suite, what ``.ci/run`` runs)
runs this test after the lanes have finished, alone on the machine: about 5 minutes on two
idle cores, 8-10 beside another test run (tests/soak/README.md, "The soak in CI").
``scripts/test tests/soak -m soak`` runs it alone; it needs root (network namespaces).
"""
from __future__ import annotations

import json

import pytest

from .runner import SoakConfig, run

pytestmark = [pytest.mark.slow, pytest.mark.soak, pytest.mark.timeout(1500), pytest.mark.xdist_group("cluster-bed")]

# A fixed schedule, so that CI stays deterministic; its 18 faults, one of every kind at least
# (both hosts killed at once, a graceful broker restart, two partitions of host-b, a
# registry restart, partitions added twice), are listed by
# `scripts/soak --seed 47 --minutes 3 --plan-only`.
SEED = 47
MINUTES = 3


def test_a_short_soak_with_a_fixed_seed_ends_exact(bed, tmp_path):
    report = run(SoakConfig(minutes=MINUTES, seed=SEED), bed, tmp_path / "soak")
    failed = [c for c in report["verdict"]["checks"] if not c["ok"]]
    assert not failed, f"seed {SEED}, report {tmp_path / 'soak' / 'report.json'}:\n" + json.dumps(failed, indent=1)
