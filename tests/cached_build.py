"""A test prerequisite built once and cached by a key: the Debian 11 root, BOINC's server.

Built in a temporary directory beside its place and renamed into place, with a marker file
that records its key: a killed build leaves nothing that passes for a finished one, and two
builds racing end with one of them in place.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path


def is_built(target: Path, key: str, marker: str) -> bool:
    """Whether ``target`` holds a finished build of ``key`` (its ``marker`` file says so)."""
    with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
        return bool(json.loads((target / marker).read_text())["key"] == key)
    return False


def cached(
    target: Path, key: str, make: Callable[[Path], None], *, marker: str, facts: Mapping[str, object]
) -> Path:
    """``target``, made by ``make(a fresh directory)`` first unless it holds a build of ``key``.

    ``facts`` are written into the ``marker`` file beside the key (what the build was made from).
    """
    if is_built(target, key, marker):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.build-"))
    try:
        if target.exists():  # a build of another key, or with an older marker: a cache, dropped
            target.rename(work / "stale")
        tree = work / "tree"
        make(tree)
        (tree / marker).write_text(json.dumps({"key": key, **facts}))
        try:
            tree.rename(target)
        except OSError:
            if not is_built(target, key, marker):  # a concurrent build won the race: fine
                raise
        return target
    finally:
        shutil.rmtree(work, ignore_errors=True)
