"""Hashes of files (ground): the md5 and size BOINC's templates, signatures and app versions name,
and the sha256 that cache keys and the bundled runtime use."""

from __future__ import annotations

import hashlib
from pathlib import Path


def md5_file(path: str | Path) -> tuple[str, int]:
    """md5 (hex) and size of a file, read in 1 MiB blocks."""
    h = hashlib.md5(usedforsecurity=False)
    size = 0
    with open(path, "rb") as f:  # noqa: PTH123 - called once per staged file
        while block := f.read(1 << 20):
            h.update(block)
            size += len(block)
    return h.hexdigest(), size


def sha256_file(path: str | Path) -> str:
    """sha256 (hex) of a file, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:  # noqa: PTH123 - as md5_file
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()
