"""The benchmark of the order pool against the local stack: see ``bench/run.py`` and ``bench/RESULTS.md``."""
