"""Where boincvm keeps what it can rebuild: built images, probe verdicts, golden checkpoints."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
from pathlib import Path

from boincvm.hashing import sha256_file

_SHA256 = re.compile(r"[0-9a-f]{64}")


def cache_root() -> Path:
    """``${XDG_CACHE_HOME:-~/.cache}/boincvm``."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "boincvm"


def content_digest(path: Path) -> str:
    """The sha256 of a file's content, computed once per file and remembered under
    ``<cache>/digests`` by its resolved path, device, inode, size and mtime.

    Cache keys that name a file by content rather than by where it lies hold across data
    directories: each BOINC project directory has its own copy of an app version's kernel,
    and one golden checkpoint or KVM verdict serves them all.

    Raises:
        OSError: the file cannot be read.
    """
    st = path.stat()
    facts = json.dumps([str(path.resolve()), st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns])
    memo = cache_root() / "digests" / hashlib.sha256(facts.encode()).hexdigest()[:32]
    with contextlib.suppress(OSError, UnicodeDecodeError):
        known = memo.read_text(encoding="ascii").strip()
        if _SHA256.fullmatch(known):
            return known
    digest = sha256_file(path)
    with contextlib.suppress(OSError):  # only a later recomputation is lost
        memo.parent.mkdir(parents=True, exist_ok=True)
        tmp = memo.with_name(f".{memo.name}.{os.getpid()}.tmp")
        tmp.write_text(digest, encoding="ascii")
        tmp.replace(memo)
    return digest
