"""Fixtures of the hostile-input corpus (see harness.py)."""

from tests.hostile.harness import sandbox

__all__ = ["sandbox"]
