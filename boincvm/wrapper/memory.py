"""The wrapper's own memory: a host full of tasks runs one wrapper per task.

Files go into the guest in 4 MiB chunks, base64-encoded in JSON; glibc's malloc raises its
mmap threshold to the largest block freed, so after the first chunk such buffers come from
the heap and their pages stay with the process after the copy (about 12 MiB per wrapper,
measured). A fixed threshold keeps them mapped and unmapped on free; a trim after the
copying steps gives back what is left. Where the C library has neither call (not glibc)
nothing happens.
"""

from __future__ import annotations

import ctypes
import logging

log = logging.getLogger(__name__)

#: glibc's ``M_MMAP_THRESHOLD`` parameter of ``mallopt``.
_M_MMAP_THRESHOLD = -3
#: Blocks from this size up are mapped on their own (glibc's initial default).
MMAP_THRESHOLD = 128 * 1024


def _libc() -> ctypes.CDLL | None:
    try:
        return ctypes.CDLL(None)
    except OSError:
        return None


def keep_heap_small() -> bool:
    """Fix malloc's mmap threshold (no dynamic rise); True when the C library took it."""
    libc = _libc()
    mallopt = getattr(libc, "mallopt", None)
    if mallopt is None:
        return False
    return bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD))


def trim() -> bool:
    """Give the heap's free pages back to the host; True when the C library could."""
    libc = _libc()
    malloc_trim = getattr(libc, "malloc_trim", None)
    if malloc_trim is None:
        return False
    return bool(malloc_trim(0))
