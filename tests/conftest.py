"""Shared fixtures. Append yours below; keep each fixture's scope as narrow as it can be."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

_STARTED = time.time()
#: Goldens another run on this machine began using just before this one started are kept.
_GOLDEN_GRACE_S = 600.0


def pytest_sessionfinish(session: pytest.Session) -> None:
    """Remove the golden checkpoints no VM used during this run.

    Many tests build images of their own (new content each run, so new cache keys); their
    goldens would otherwise pile up in the cache run after run. One the next run needs
    again is rebuilt in seconds.
    """
    from boincvm.hypervisor.qemu import golden

    golden.prune(max_idle=time.time() - _STARTED + _GOLDEN_GRACE_S)


@pytest.fixture(scope="session")
def guest_image() -> Path:
    """The bundled example guest (kernel + initramfs + scratch disk), built once and cached by content."""
    from boincvm.image.guest import build_guest_image

    return build_guest_image("minimal")
