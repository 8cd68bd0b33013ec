"""The VMware backend's settings: its options, the .vmx keys a job controls, the guest wrapper script."""

from __future__ import annotations

import re
import shlex
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from boincvm.errors import InputError
from boincvm.hypervisor import vmrun as vr
from boincvm.hypervisor.base import VmSpec
from boincvm.hypervisor.vmware_vmx import VmxFile

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
    }
)


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
    mem = (max(spec.memory_mb, 4) + 3) // 4 * 4
    updates: dict[str, str | None] = {
        "displayName": spec.name,
        "memsize": str(mem),
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
    return (
        f"mkdir -p {d} || exit 1; echo $$ >{d}/pid; "
        f"( {' && '.join(inner)} ) >{d}/stdout 2>{d}/stderr </dev/null; "
        f"echo $? >{d}/rc.tmp && mv {d}/rc.tmp {d}/rc"
    )


def check_var(name: str) -> None:
    if not name or re.search(r"[/\s]", name):
        raise InputError(f"vmware: guest variable name {name!r} must not be empty or contain / or spaces")
