"""The VMware backend's settings: its options, the .vmx keys a job controls, the guest wrapper script."""

from __future__ import annotations

import re
import shlex
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from boincvm.errors import InputError
from boincvm.hypervisor.base import VmSpec
from boincvm.hypervisor.vmware import vmrun as vr
from boincvm.hypervisor.vmware.vmx import VmxFile

_KNOWN_OPTIONS = frozenset(
    {
        "vmrun",
        "host_type",
        "guest_user",
        "guest_password_file",
        "guest_password_env",
        "vm_password_file",
        "base_snapshot",
        "guest_tmp",
        "pyvix",
        "call_timeout",
        "gui",
        "channel",
    }
)
CHANNELS = ("auto", "guestops", "guestinfo")
#: The share's name (``.host:/boinc``) and where open-vm-tools mounts shares in the guest.
SHARE_NAME = "boinc"
SHARE_MOUNT = "/mnt/hgfs/boinc"

#: The in-guest agent of the credential-free channel (POSIX sh + open-vm-tools' vmware-rpctool).
#: Install it in the image as a boot service (e.g. a systemd unit ``ExecStart=/usr/local/sbin/
#: boincvm-agent``). It announces itself in ``guestinfo.boinc.agent``; when the host sets
#: ``guestinfo.boinc.job`` to ``"<number> <shell line>"`` with a new number, it runs the line (a
#: :func:`wrapper_script` whose job directory is on the shared folder) in the background and
#: acknowledges the number in ``guestinfo.boinc.ack``. A job directory is claimed with mkdir, so
#: a job replayed after a snapshot revert does not run twice (the share is not reverted).
AGENT_SCRIPT = r"""#!/bin/sh
# boincvm guest agent for VMware: runs host jobs without guest credentials.
share=${BOINCVM_SHARE:-/mnt/hgfs/boinc}
rpc() { vmware-rpctool "$1" 2>/dev/null; }
if [ ! -d "$share" ]; then
    mkdir -p /mnt/hgfs && vmhgfs-fuse .host:/ /mnt/hgfs -o allow_other,subtype=vmhgfs-fuse
fi
rpc "info-set guestinfo.boinc.agent ready"
ack=""
while :; do
    job=$(rpc "info-get guestinfo.boinc.job") || job=""
    seq=${job%% *}
    if [ -n "$seq" ] && [ "$seq" != "$ack" ]; then
        (/bin/sh -c "${job#* }" </dev/null >/dev/null 2>&1 &)
        ack=$seq
        rpc "info-set guestinfo.boinc.ack $ack"
    fi
    sleep 0.1
done
"""


@dataclass(frozen=True)
class VmwareOptions:
    """The VMware-specific part of a :class:`VmSpec`, parsed once.

    Raises (from :meth:`from_options`):
        InputError: an option is unknown or malformed; a password was given inline.
    """

    vmrun: str | None = None
    host_type: vr.HostType | None = None
    guest_user: str | None = None
    guest_password_file: Path | None = None
    guest_password_env: str | None = None
    vm_password_file: Path | None = None
    base_snapshot: str = "boincvm-base"
    guest_tmp: str = "/tmp/boincvm"
    pyvix: bool = True
    call_timeout: float = vr.DEFAULT_CALL_TIMEOUT
    gui: bool = False
    channel: str = "auto"

    @property
    def uses_guestinfo(self) -> bool:
        """True for the credential-free channel (explicitly, or by default when no guest user is set)."""
        return self.channel == "guestinfo" or (self.channel == "auto" and not self.guest_user)

    @classmethod
    def from_options(cls, options: Mapping[str, str]) -> VmwareOptions:
        """Parse ``spec.options``.

        Raises:
            InputError: naming the option (``options.host_type: ...``).
        """
        for key in options:
            if key in ("guest_password", "vm_password"):
                raise InputError(
                    f"options.{key}: passwords are not accepted inline",
                    hint=f"use {key}_file (a file holding it) or guest_password_env",
                )
            if key not in _KNOWN_OPTIONS:
                raise InputError(
                    f"options.{key}: unknown VMware option",
                    hint="known: " + ", ".join(sorted(_KNOWN_OPTIONS)),
                )
        host_type = options.get("host_type")
        if host_type is not None and host_type not in vr.HOST_TYPES:
            raise InputError(
                f"options.host_type: must be one of {', '.join(vr.HOST_TYPES)}, not {host_type!r}"
            )
        guest_tmp = options.get("guest_tmp", "/tmp/boincvm")
        if not guest_tmp.startswith("/"):
            raise InputError("options.guest_tmp: must be an absolute guest path")
        try:
            call_timeout = float(options.get("call_timeout", vr.DEFAULT_CALL_TIMEOUT))
        except ValueError:
            raise InputError("options.call_timeout: must be a number of seconds") from None
        pyvix = options.get("pyvix", "auto")
        if pyvix not in ("auto", "off"):
            raise InputError("options.pyvix: must be auto or off")
        channel = options.get("channel", "auto")
        if channel not in CHANNELS:
            raise InputError(f"options.channel: must be one of {', '.join(CHANNELS)}, not {channel!r}")
        gui = options.get("gui", "false").lower()
        if gui not in ("true", "false"):
            raise InputError("options.gui: must be true or false")
        pw_file, vm_pw = options.get("guest_password_file"), options.get("vm_password_file")
        return cls(
            vmrun=options.get("vmrun"),
            host_type=vr.HostType(host_type) if host_type else None,
            guest_user=options.get("guest_user"),
            guest_password_file=Path(pw_file) if pw_file else None,
            guest_password_env=options.get("guest_password_env"),
            vm_password_file=Path(vm_pw) if vm_pw else None,
            base_snapshot=options.get("base_snapshot", "boincvm-base"),
            guest_tmp=guest_tmp.rstrip("/") or "/",
            pyvix=pyvix == "auto",
            call_timeout=call_timeout,
            gui=gui == "true",
            channel=channel,
        )


def read_secret(path: Path, what: str) -> str:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise InputError(f"options.{what}: cannot read {path.name}: {exc.strerror or exc}") from exc
    secret = text.splitlines()[0] if text else ""
    if not secret:
        raise InputError(
            f"options.{what}: {path.name} is empty", hint="VMware refuses guest logins with an empty password"
        )
    return secret


def job_settings(vmx: VmxFile, spec: VmSpec) -> dict[str, str | None]:
    """The .vmx settings a job controls, for a VM built from ``spec``.

    Memory is rounded up to a multiple of 4 MB (VMware refuses others). Without
    ``enable_network`` every NIC is removed and disconnected; with it, ``ethernet0`` is present,
    connected at power-on and NATed unless the image chose a connection type.
    """
    memsize = (max(spec.memory_mb, 4) + 3) // 4 * 4
    updates: dict[str, str | None] = {
        "displayName": spec.name,
        "memsize": str(memsize),
        "numvcpus": str(spec.ncpus),
        "msg.autoAnswer": "TRUE",
        "uuid.action": "create",
        "tools.upgrade.policy": "manual",
        "tools.syncTime": "TRUE",
        "sound.present": "FALSE",
        "usb.present": "FALSE",
        "floppy0.present": "FALSE",
        "isolation.tools.copy.disable": "TRUE",
        "isolation.tools.paste.disable": "TRUE",
        "isolation.tools.dnd.disable": "TRUE",
        "mainMem.useNamedFile": "FALSE",
    }
    cores = vmx.get("cpuid.coresPerSocket")
    if cores is not None and (not cores.isdigit() or int(cores) == 0 or spec.ncpus % int(cores)):
        updates["cpuid.coresPerSocket"] = None
    nics = {m.group(1) for k, _ in vmx.items() if (m := re.match(r"(ethernet\d+)\.", k, re.IGNORECASE))}
    nics.add("ethernet0")
    for nic in sorted(nics):
        if spec.enable_network and nic.lower() == "ethernet0":
            updates[f"{nic}.present"] = "TRUE"
            updates[f"{nic}.startConnected"] = "TRUE"
            if vmx.get(f"{nic}.connectionType") is None:
                updates[f"{nic}.connectionType"] = "nat"
        else:
            updates[f"{nic}.present"] = "FALSE"
            updates[f"{nic}.startConnected"] = "FALSE"
    return updates


def wrapper_script(directory: str, argv: Sequence[str], env: Mapping[str, str], cwd: str | None) -> str:
    """The POSIX sh line that runs ``argv``, leaving ``pid``, ``stdout``, ``stderr``, ``rc`` in ``directory``.

    Raises:
        InputError: an environment variable name is not a shell identifier.
    """
    q = shlex.quote
    inner = []
    if cwd is not None:
        inner.append(f"cd {q(cwd)}")
    for key, value in env.items():
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", key):
            raise InputError(f"vmware: {key!r} is not a valid environment variable name")
        inner.append(f"export {key}={q(value)}")
    inner.append("exec " + " ".join(q(a) for a in argv))
    d = q(directory)
    parent = q(directory.rsplit("/", 1)[0] or "/")
    # mkdir (not -p) claims the directory: a job replayed after a revert finds it and stops.
    return (
        f"mkdir -p {parent} && mkdir {d} || exit 1; echo $$ >{d}/pid; "
        f"( {' && '.join(inner)} ) >{d}/stdout 2>{d}/stderr </dev/null; "
        f"echo $? >{d}/rc.tmp && mv {d}/rc.tmp {d}/rc"
    )


def share_settings(host_dir: Path) -> dict[str, str | None]:
    """The .vmx keys that share ``host_dir`` read-write with the guest as ``.host:/boinc``."""
    return {
        "isolation.tools.hgfs.disable": "FALSE",
        "sharedFolder.maxNum": "1",
        "sharedFolder0.present": "TRUE",
        "sharedFolder0.enabled": "TRUE",
        "sharedFolder0.readAccess": "TRUE",
        "sharedFolder0.writeAccess": "TRUE",
        "sharedFolder0.hostPath": str(host_dir),
        "sharedFolder0.guestName": SHARE_NAME,
        "sharedFolder0.expiration": "never",
    }


def check_var(name: str) -> None:
    """Refuse a guestinfo variable name vmrun would reject.

    Raises:
        InputError: the name is empty or contains ``/`` or whitespace.
    """
    if not name or re.search(r"[/\s]", name):
        raise InputError(f"vmware: guest variable name {name!r} must not be empty or contain / or spaces")
