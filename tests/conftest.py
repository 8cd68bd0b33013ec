"""Shared fixtures. Append yours below; keep each fixture's scope as narrow as it can be."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def guest_image() -> Path:
    """The bundled example guest (kernel + initramfs + scratch disk), built once and cached by content."""
    from boincvm.image.guest import build_guest_image

    return build_guest_image("minimal")
