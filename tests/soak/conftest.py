"""The soak runs against the lane's stack (its schema registry) and the lane's bed (tests/conftest.py)."""
from __future__ import annotations

from ..integration.conftest import stack  # noqa: F401  (the autouse check: a missing server fails the run)
