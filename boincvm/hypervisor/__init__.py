"""Hypervisor backends: one interface (:mod:`.base`), one folder per backend."""

from __future__ import annotations

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
