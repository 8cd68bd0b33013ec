"""``qemu-vm.json``: what a VM's overlay and its snapshots need to be started again.

A snapshot loads only into a QEMU with the same accelerator, machine and devices, so a
fresh power-on records them and a restore reads them back (possibly in a later process).
The file is written whole or not at all (:func:`~boincvm.atomicdir.write_file_atomically`).
The on-disk form is a JSON object; states written before ``hotplug_port`` existed lack it
(they had no root port) and read as False.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from boincvm.atomicdir import write_file_atomically
from boincvm.errors import HypervisorError

#: Its name in the VM's work directory.
STATE_FILE = "qemu-vm.json"


@dataclass(frozen=True)
class VmState:
    """The start-up facts a VM's snapshots depend on.

    Attributes:
        accel: ``kvm`` or ``tcg``.
        machine: the QEMU machine type.
        attach_disk: the overlay is a disk the guest sees (False: it only holds snapshots).
        hotplug_port: the q35 VM carries the root port transfer disks are plugged into.
        ram_file: the golden RAM the VM mapped when it started (None: plain RAM).
    """

    accel: str
    machine: str
    attach_disk: bool
    hotplug_port: bool = False
    ram_file: Path | None = None

    def to_json(self) -> str:
        """The file's text."""
        return json.dumps(
            {
                "accel": self.accel,
                "machine": self.machine,
                "attach_disk": self.attach_disk,
                "hotplug_port": self.hotplug_port,
                "ram_file": str(self.ram_file) if self.ram_file is not None else None,
            }
        )

    @classmethod
    def from_json(cls, text: str) -> VmState:
        """Parse the file's text.

        Raises:
            ValueError: not JSON, or not an object with the fields a state needs.
        """
        data = json.loads(text)
        if not isinstance(data, dict):
            raise ValueError("not a JSON object")
        try:
            ram_file = data.get("ram_file")
            return cls(
                accel=str(data["accel"]),
                machine=str(data["machine"]),
                attach_disk=bool(data["attach_disk"]),
                hotplug_port=bool(data.get("hotplug_port", False)),
                ram_file=Path(ram_file) if ram_file else None,
            )
        except KeyError as exc:
            raise ValueError(f"no {exc.args[0]!r}") from None

    def save(self, workdir: Path) -> None:
        """Write the state into ``workdir`` (replacing the one there)."""
        write_file_atomically(workdir / STATE_FILE, self.to_json().encode())

    @classmethod
    def load(cls, workdir: Path) -> VmState:
        """Read the state of the VM in ``workdir``.

        Raises:
            HypervisorError: the file is missing or unreadable, so its snapshots cannot be resumed.
        """
        path = workdir / STATE_FILE
        try:
            return cls.from_json(path.read_text())
        except (OSError, ValueError) as exc:
            raise HypervisorError(
                f"qemu: {path} is missing or unreadable, so its snapshots cannot be resumed"
            ) from exc
