"""Hypervisor backends: one interface (:mod:`.base`), one module per backend."""

from __future__ import annotations

import contextlib

from boincvm.hypervisor.base import (
    Availability,
    Backend,
    BackendKind,
    GuestProcess,
    ProcessStatus,
    SnapshotInfo,
    VmSpec,
    backend_class,
)

# Each backend module registers itself on import; a backend still being written may be absent.
for _mod in ("qemu", "vmware"):
    with contextlib.suppress(ModuleNotFoundError):
        __import__(f"boincvm.hypervisor.{_mod}")

__all__ = [
    "Availability",
    "Backend",
    "BackendKind",
    "GuestProcess",
    "ProcessStatus",
    "SnapshotInfo",
    "VmSpec",
    "backend_class",
]
