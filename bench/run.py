"""Benchmark the order pool against the local stack; print a table and write JSON.

    .venv/bin/python bench/run.py                 # full run, 3 repetitions (about 5 min on 2 cores)
    .venv/bin/python bench/run.py --quick         # smoke run: few orders, 1 repetition
    .venv/bin/python bench/run.py --only pipeline,latency --reps 5

See ``bench/cli.py`` for the options and ``bench/RESULTS.md`` for the method.
"""
import sys
from pathlib import Path

# Run as a script: import bench, tests and workers from the repository root.
sys.path[0] = str(Path(__file__).resolve().parent.parent)

from bench.cli import main  # noqa: E402

if __name__ == "__main__":
    main()
