"""The QEMU backend's options (``VmSpec.options``, a job's ``<backend_option>``), checked once."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from boincvm.errors import InputError
from boincvm.hypervisor.qemu.cmdline import MACHINES

#: q35: PCIe hot-plug of a transfer disk takes about 0.25 s under TCG, against about 1 s on pc.
DEFAULT_MACHINE = "q35"
DEFAULT_SNAPSHOT_TIMEOUT = 300.0
#: Files smaller than this go through the agent: a plug and unplug cost about 0.25-1 s.
DEFAULT_TRANSFER_MIN_BYTES = 4 * 1024 * 1024

_CHOICES: dict[str, tuple[str, ...]] = {
    "machine": MACHINES,
    "accel": ("auto", "kvm", "tcg"),
    "golden": ("auto", "yes", "no"),
    "transfer_disk": ("auto", "no"),
}
KNOWN = (*_CHOICES, "snapshot_timeout", "transfer_disk_min_bytes", "runtime")


@dataclass(frozen=True)
class QemuOptions:
    """What a job may set for the QEMU backend.

    Attributes:
        machine: ``q35`` (default), ``pc`` or ``microvm`` (fastest cold boot, no hot-plug).
        accel: ``auto`` (KVM when a trial boot works), ``kvm`` or ``tcg``.
        golden: ``auto`` (kernel boots start from a golden checkpoint), ``yes``, ``no``.
        snapshot_timeout: seconds a snapshot save or load may take.
        transfer_disk: ``auto`` (large files through a hot-plugged disk) or ``no``.
        transfer_disk_min_bytes: the smallest file that takes the transfer disk.
        runtime: the bundled QEMU runtime archive (a path; the wrapper resolves the job's
            logical name through the slot's link file), or "" for PATH's QEMU.
    """

    machine: str = DEFAULT_MACHINE
    accel: str = "auto"
    golden: str = "auto"
    snapshot_timeout: float = DEFAULT_SNAPSHOT_TIMEOUT
    transfer_disk: str = "auto"
    transfer_disk_min_bytes: int = DEFAULT_TRANSFER_MIN_BYTES
    runtime: str = ""

    @classmethod
    def from_options(cls, options: Mapping[str, str]) -> QemuOptions:
        """Parse and check ``options``.

        Raises:
            InputError: naming the option (``options.machine: ...``) and what it accepts.
        """
        for key in options:
            if key not in KNOWN:
                raise InputError(f"options.{key}: unknown QEMU option", hint="known: " + ", ".join(KNOWN))
        values: dict[str, object] = {}
        for key, allowed in _CHOICES.items():
            if key in options:
                if options[key] not in allowed:
                    wanted = ", ".join(allowed)
                    raise InputError(f"options.{key}: must be one of {wanted}, not {options[key]!r}")
                values[key] = options[key]
        if "snapshot_timeout" in options:
            values["snapshot_timeout"] = _number(options, "snapshot_timeout", float, "seconds")
        if "transfer_disk_min_bytes" in options:
            values["transfer_disk_min_bytes"] = _number(options, "transfer_disk_min_bytes", int, "bytes")
        if "runtime" in options:
            values["runtime"] = options["runtime"]
        return cls(**values)  # type: ignore[arg-type]


def _number(options: Mapping[str, str], key: str, kind: type[float] | type[int], unit: str) -> float:
    try:
        value = kind(options[key])
    except ValueError:
        value = -1
    if value <= 0 and not (kind is int and value == 0):
        raise InputError(f"options.{key}: must be a positive number of {unit}, not {options[key]!r}")
    return value
