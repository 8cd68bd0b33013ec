"""Hypervisor backends: one interface (:mod:`.base`), one module per backend."""

from __future__ import annotations

# Each backend module registers itself on import.
from boincvm.hypervisor import qemu as _qemu  # noqa: E402, F401
from boincvm.hypervisor import vmware as _vmware  # noqa: E402, F401
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
