"""Run the README's commands in order, as a new user would, so the README cannot drift.

The repo's tracked files are copied to a temp folder (with a link to the repo's
.venv), so the pool this starts has its own run/ folder; the settings point it at
this test's own topics and Redis prefix. `scripts/test` itself is not run here
(it is what runs this test).
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from workers.settings import Settings

from ..conftest import isolated_env
from ..pool import REPO, free_port
from .conftest import cleanup

pytestmark = pytest.mark.timeout(300)

# Commands that follow output forever: run briefly, then stopped.
FOLLOWING = ("tail -f", "--watch", "--follow")


def readme_block(heading: str) -> list[str]:
    """The commands of the first ```sh block under ``heading`` (comments stripped)."""
    text = (REPO / "README.md").read_text()
    section = text.split(f"\n## {heading}\n", 1)[1]
    match = re.search(r"```sh\n(.*?)```", section, re.S)
    assert match, f"no sh block under {heading}"
    block = match.group(1)
    commands = []
    for line in block.splitlines():
        command = re.sub(r"\s+#.*$", "", line).strip()
        if command:
            commands.append(command)
    return commands


@pytest.fixture
def checkout(tmp_path):
    # The checkout shares the repo's .venv. Bring it up to date from the repo first, so
    # that the checkout's scripts/start finds it current and does not re-install the
    # package from the checkout (which would leave the shared venv pointing at a temp dir).
    subprocess.run([str(REPO / "scripts" / "venv")], check=True, capture_output=True)
    files = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True).stdout.split()
    for name in files:
        target = tmp_path / name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / name, target)
    (tmp_path / ".venv").symlink_to(REPO / ".venv")
    return tmp_path


def run(command: str, cwd: Path, env: dict) -> subprocess.CompletedProcess:
    timeout = 3 if any(f in command for f in FOLLOWING) else 240
    try:
        return subprocess.run(["bash", "-c", command], cwd=cwd, env=env, capture_output=True, text=True,
                              timeout=timeout, start_new_session=True)
    except subprocess.TimeoutExpired as exc:
        assert timeout == 3, f"{command} hung"
        return subprocess.CompletedProcess(command, 0, exc.stdout or "", exc.stderr or "")


def test_readme_commands_work_as_written(checkout):
    # The checkout keeps its stack state in its own .stack, as a new user's would: with
    # this lane's STACK_DIR, its scripts/stop would stop the lane's servers.
    env = {k: v for k, v in {**os.environ, **isolated_env("readme")}.items() if k != "STACK_DIR"}
    env["METRICS_PORT"] = str(free_port())  # a pool started from the repo may hold the default
    setup = readme_block("Two commands")
    assert setup == ["scripts/start", "scripts/test"]
    tour = readme_block("A tour")
    try:
        started = run("scripts/start", checkout, env)
        assert started.returncode == 0, started.stdout + started.stderr
        assert "The pool is running" in started.stdout
        assert started.stdout.count("RUNNING") == 8, started.stdout[-3000:] + started.stderr[-3000:]
        for command in tour:
            result = run(command, checkout, env)
            assert result.returncode == 0, f"{command}: {result.stdout}{result.stderr}"
            assert "Traceback" not in result.stderr, f"{command}: {result.stderr}"
    finally:
        stopped = run("scripts/stop", checkout, env)
        cleanup(Settings.from_env(env))
    assert stopped.returncode == 0, stopped.stdout + stopped.stderr
    assert not (checkout / "run" / "supervisord.pid").exists()
    # The stack this checkout did not start is left running.
    assert subprocess.run([str(REPO / "scripts" / "stack"), "status"], capture_output=True).returncode == 0
    # The shared venv still runs the repo's code, not the (deleted) checkout's.
    where = subprocess.run([str(REPO / ".venv" / "bin" / "python"), "-c", "import workers; print(workers.__file__)"],
                           cwd="/", capture_output=True, text=True, check=True).stdout.strip()
    assert where == str(REPO / "workers" / "__init__.py")
