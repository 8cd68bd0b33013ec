"""The QEMU command line for one VM, as a pure function of its settings (unit-tested)."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

QEMU = "qemu-system-x86_64"
DISK_NODE = "disk0"
AGENT_PORT = "org.qemu.guest_agent.0"
QMP_SOCKET = "qmp.sock"
QGA_SOCKET = "qga.sock"
PIDFILE = "qemu.pid"
CONSOLE_LOG = "console.log"
#: The q35 root port transfer disks are hot-plugged into (pcie.0 itself takes no hot-plug).
HOTPLUG_PORT = "hotplug0"
MACHINES = ("pc", "q35", "microvm")
#: TCG's translation cache in MiB. QEMU 7.2's default is 1 GiB, which a long task fills
#: page by page (host RSS growing for hours); the code a guest job runs hot fits in far
#: less, and a full cache is flushed and refilled with what still runs.
TCG_TB_SIZE_MB = 32
#: The id QEMU gives the RAM backend it makes for ``-m``: a backend of our own under the same
#: id keeps snapshots and migration streams interchangeable with plain ``-m`` VMs.
RAM_IDS = {"pc": "pc.ram", "q35": "pc.ram", "microvm": "microvm.ram"}


@dataclass(frozen=True)
class QemuArgs:
    """Everything the command line depends on.

    Paths of sockets, pidfile and console are relative: QEMU runs with the slot's work
    directory as its current directory, which keeps socket paths short whatever the
    slot's depth (``sun_path`` holds only 108 bytes).
    """

    name: str
    accel: str
    machine: str
    memory_mb: int
    ncpus: int
    disk: Path
    attach_disk: bool
    kernel: Path | None = None
    initrd: Path | None = None
    cmdline: str = ""
    network: bool = False
    incoming: str | None = None
    loadvm: str | None = None
    tsc_khz: int | None = None
    hotplug_port: bool = False
    #: Guest RAM mapped from this file: ``ram_shared`` writes through to it (the VM that
    #: saves a golden checkpoint), otherwise it is mapped privately, copy-on-write (every
    #: job started from that golden checkpoint shares the pages it only reads).
    ram_file: Path | None = None
    ram_shared: bool = False
    #: The incoming stream is a checkpoint's device state alone (:mod:`.ramdiff`): it has
    #: neither the configuration section nor the description a full migration stream has.
    devices_only: bool = False


def host_tsc_khz(cpuinfo: str) -> int | None:
    """The host's TSC frequency in kHz from /proc/cpuinfo text (microvm guests need it)."""
    m = re.search(r"^cpu MHz\s*:\s*([0-9.]+)", cpuinfo, re.MULTILINE)
    return int(float(m.group(1)) * 1000) if m else None


def build_argv(a: QemuArgs) -> list[str]:
    """The full argument list for ``qemu-system-x86_64``.

    Raises:
        ValueError: an unknown machine type.
    """
    if a.machine not in MACHINES:
        raise ValueError(f"machine must be one of {', '.join(MACHINES)}, not {a.machine!r}")
    bus = "device" if a.machine == "microvm" else "pci"
    accel = f"tcg,tb-size={TCG_TB_SIZE_MB}" if a.accel == "tcg" else a.accel
    machine = a.machine
    if a.ram_file is not None:
        machine = f"{a.machine},memory-backend={RAM_IDS[a.machine]}"
    if a.devices_only:
        machine += ",suppress-vmdesc=on"
    argv = [QEMU, "-name", f"{a.name},process=boincvm-{a.name}"[:200],
            "-accel", accel, "-machine", machine, "-m", str(a.memory_mb), "-smp", str(a.ncpus),
            "-nodefaults", "-no-user-config", "-display", "none", "-no-reboot",
            "-serial", f"file:{CONSOLE_LOG}", "-pidfile", PIDFILE,
            "-qmp", f"unix:{QMP_SOCKET},server=on,wait=off",
            "-chardev", f"socket,id=qga0,path={QGA_SOCKET},server=on,wait=off",
            "-device", f"virtio-serial-{bus},id=vser0",
            "-device", f"virtserialport,bus=vser0.0,chardev=qga0,name={AGENT_PORT}",
            "-blockdev", f"driver=qcow2,node-name={DISK_NODE},file.driver=file,file.filename={a.disk}",
    ]  # fmt: skip
    if a.ram_file is not None:
        share = "on" if a.ram_shared else "off"
        argv += ["-object", f"memory-backend-file,id={RAM_IDS[a.machine]},size={a.memory_mb}M,"
                            f"mem-path={a.ram_file},share={share}"]  # fmt: skip
    if a.accel == "kvm":
        argv += ["-cpu", "host"]
    if a.attach_disk:
        boot = ",bootindex=0" if a.kernel is None else ""
        argv += ["-device", f"virtio-blk-{bus},drive={DISK_NODE}{boot}"]
    if a.kernel is not None:
        cmdline = a.cmdline
        if a.tsc_khz and "tsc_early_khz" not in cmdline:
            # microvm has no HPET or PM timer: without this the TSC calibration can hang the
            # boot; elsewhere it spares the slow calibration under TCG (the kernel refines it).
            cmdline = f"{cmdline} tsc_early_khz={a.tsc_khz}".strip()
        argv += ["-kernel", str(a.kernel), "-append", cmdline]
        if a.initrd is not None:
            argv += ["-initrd", str(a.initrd)]
    if a.hotplug_port and a.machine == "q35":
        argv += ["-device", f"pcie-root-port,id={HOTPLUG_PORT},bus=pcie.0,chassis=1"]
    if a.network:
        argv += ["-netdev", "user,id=net0", "-device", f"virtio-net-{bus},netdev=net0"]
    else:
        argv += ["-nic", "none"]
    if a.devices_only:
        argv += ["-global", "migration.send-configuration=off"]
    if a.incoming is not None:
        argv += ["-incoming", a.incoming]
    if a.loadvm is not None:
        argv += ["-loadvm", a.loadvm]
    return argv
