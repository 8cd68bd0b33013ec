"""Shared fixtures. Append yours below; keep each fixture's scope as narrow as it can be."""

from __future__ import annotations

from pathlib import Path

import pytest

#: The golden cache a run leaves at most (beyond what the last hour used): the stable
#: images' goldens of a whole run take about 2 GiB.
GOLDEN_KEEP_BYTES = 4 << 30


def pytest_sessionfinish(session: pytest.Session) -> None:
    """Trim the golden cache to :data:`GOLDEN_KEEP_BYTES`, least recently used first.

    Many tests build images of their own (new content each run, so new cache keys); their
    goldens would otherwise pile up run after run. One a later run needs is rebuilt in
    seconds.
    """
    from boincvm.hypervisor.qemu import golden

    golden.prune(keep_bytes=GOLDEN_KEEP_BYTES)


@pytest.fixture(scope="session")
def guest_image() -> Path:
    """The bundled example guest (kernel + initramfs + scratch disk), built once and cached by content."""
    from boincvm.image.guest import build_guest_image

    return build_guest_image("minimal")
