"""Where boincvm keeps what it can rebuild: built images, probe verdicts, golden checkpoints."""

from __future__ import annotations

import os
from pathlib import Path


def cache_root() -> Path:
    """``${XDG_CACHE_HOME:-~/.cache}/boincvm``."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "boincvm"
