"""Static checks of a VMware image (a .vmx and its disks, or a lone .vmdk), without booting it.

Two questions: is there evidence of VMware Tools / open-vm-tools (which every guest
operation needs), and does anything in the configuration break an unattended run
(encryption, independent disks, guest operations or the tools channel disabled, missing
disk files)? Evidence of Tools is a hint only: the keys are written by VMware when Tools
reported in (or by image builders), can be stale, and are absent from fresh images.
Each finding names its place: ``vmx.<key>``, ``vmdk.ddb.<key>`` or the file.
"""

from __future__ import annotations

import re
from pathlib import Path

from boincvm.errors import InputError
from boincvm.findings import Finding, error, info, warning
from boincvm.hypervisor.vmware_vmx import VmdkDescriptor, VmxFile, read_vmdk_descriptor

#: ddb.toolsInstallType values (open-vm-tools vm_tools_version.h, enum ToolsInstallType).
TOOLS_INSTALL_TYPES = {
    "0": "unknown",
    "1": "MSI (Windows)",
    "2": "tarball",
    "3": "OSP packages",
    "4": "open-vm-tools",
}
TOOLS_VERSION_UNMANAGED = "2147483647"

#: .vmx keys VMware writes once Tools have reported from the guest (hints, reference §4.1).
_VMX_TOOLS_HINTS = (
    "guestInfo.detailed.data",
    "tools.remindInstall",
    "toolsInstallManager.lastInstallError",
    "toolsInstallManager.updateCounter",
    "tools.capability.verifiedSamlToken",
)

#: Settings that stop what the wrapper needs: key -> (value that breaks it, why, severity is error?).
_BREAKERS: dict[str, tuple[str, str, bool]] = {
    "isolation.tools.vixmessage.disable": ("TRUE", "disables VIX messages: no guest operations at all", True),
    "guest_rpc.auth.disabled": ("TRUE", "disables the guest RPC channel the VMware Tools talk through", True),
    "isolation.tools.guestinitiatedrpc.disable": ("TRUE", "blocks RPC from the guest Tools", True),
    "isolation.tools.setinfo.disable": (
        "TRUE",
        "stops the guest from setting guestinfo variables (the credential-free status channel)",
        False,
    ),
    "isolation.tools.hgfs.disable": ("TRUE", "disables shared folders", False),
}

_DISK = re.compile(r"^((?:scsi|sata|ide|nvme)\d+:\d+)\.filename$", re.IGNORECASE)


def check_vmware(path: Path) -> list[Finding]:
    """Check a ``.vmx`` (with the disks it names) or a ``.vmdk``, statically.

    Returns findings; an unreadable file is an error finding, not an exception.
    """
    if path.suffix.lower() == ".vmdk":
        found, evidence = _check_vmdk(path, "vmdk")
        if not evidence and not any(f.place == "vmdk" for f in found):
            found.append(
                warning(
                    "vmdk.ddb",
                    "no ddb.toolsInstallType / ddb.toolsVersion: no evidence of VMware Tools",
                    hint="a hint only: the guest may still have open-vm-tools; boot it once to check",
                )
            )
        return found
    if path.suffix.lower() != ".vmx":
        return [error(path.name, "not a VMware image (expected a .vmx or .vmdk file)")]
    try:
        vmx = VmxFile.load(path)
    except InputError as exc:
        return [error(path.name, exc.message)]
    return _check_vmx(path, vmx)


def _check_vmx(path: Path, vmx: VmxFile) -> list[Finding]:
    out: list[Finding] = []
    settings = vmx.as_dict()
    spelled = {k.lower(): k for k, _ in vmx.items()}

    def place(key: str) -> str:
        return f"vmx.{spelled.get(key.lower(), key)}"

    for key in ("encryption.keySafe", "encryption.data"):
        if key.lower() in settings:
            out.append(
                error(
                    place(key),
                    "the VM is encrypted: vmrun needs its password for every command and "
                    "its disks cannot be read or converted",
                    hint="decrypt the VM (and remove its vTPM) before shipping it",
                )
            )
            break
    for key, (bad, why, is_error) in _BREAKERS.items():
        if why and settings.get(key, "").upper() == bad:
            make = error if is_error else warning
            out.append(make(place(key), f"= {bad}: {why}", hint="remove this setting from the .vmx"))
    mem = settings.get("memsize")
    if mem is not None and (not mem.isdigit() or int(mem) % 4):
        out.append(warning(place("memsize"), f"{mem!r} is not a multiple of 4 MB; VMware refuses it"))
    if settings.get("ethernet0.present", "false").upper() == "TRUE":
        out.append(
            info(
                place("ethernet0.present"),
                "the image has a network card; boincvm disconnects it unless the job enables networking",
            )
        )
    if settings.get("checkpoint.vmstate"):
        out.append(
            warning(place("checkpoint.vmState"), "the VM is suspended; power it off before shipping it")
        )
    if path.with_name(path.name + ".lck").exists():
        out.append(
            warning(f"{path.name}.lck", "the VM looks in use (lock directory present); power it off first")
        )

    evidence: list[str] = [k for k in _VMX_TOOLS_HINTS if k.lower() in settings]
    for key, value in vmx.items():
        m = _DISK.match(key)
        if not m:
            continue
        dev = m.group(1)
        if settings.get(f"{dev}.present".lower(), "TRUE").upper() == "FALSE":
            continue
        if "cdrom" in settings.get(f"{dev}.devicetype".lower(), "") or value.lower().endswith(".iso"):
            continue
        mode = settings.get(f"{dev}.mode".lower(), "")
        if "independent" in mode.lower():
            out.append(
                error(
                    place(f"{dev}.mode"),
                    f"{mode!r}: independent disks are left out of snapshots, "
                    "so checkpoints would lose their contents",
                    hint='remove the mode (or set "persistent")',
                )
            )
        disk = Path(value) if Path(value).is_absolute() else path.parent / value
        if not disk.is_file():
            out.append(error(f"vmx.{key}", f"the disk file {value} does not exist"))
            continue
        if disk.suffix.lower() == ".vmdk":
            disk_findings, disk_evidence = _check_vmdk(disk, f"vmx.{key}")
            out += disk_findings
            evidence += disk_evidence
    if evidence:
        out.append(
            info("vmx", "evidence of VMware Tools (hints, not proof): " + ", ".join(sorted(set(evidence))))
        )
    else:
        out.append(
            warning(
                "vmx",
                "no static evidence of VMware Tools / open-vm-tools in the .vmx or its disks",
                hint="install open-vm-tools in the guest; guest operations need it",
            )
        )
    return out


#: Longest chain of delta disks followed (Workstation allows 100 snapshots deep).
MAX_CHAIN = 128


def _check_vmdk(
    path: Path, where: str, seen: frozenset[Path] = frozenset()
) -> tuple[list[Finding], list[str]]:
    """Findings about one disk and its whole parent chain, and the Tools evidence their DDBs hold."""
    try:
        desc = read_vmdk_descriptor(path)
    except InputError as exc:
        return [error(where, exc.message)], []
    out: list[Finding] = []
    if desc.create_type.lower() == "streamoptimized":
        out.append(
            warning(
                f"{where}.createType",
                "streamOptimized (OVF export) disks cannot be run directly",
                hint="convert it: vmware-vdiskmanager -r in.vmdk -t 0 out.vmdk",
            )
        )
    if not desc.embedded:
        missing = [
            e.filename for e in desc.extents if e.filename and not (path.parent / e.filename).is_file()
        ]
        if missing:
            files = ", ".join(missing)
            out.append(error(f"{where}.extent", f"the extent file(s) {files} do not exist"))
    tools, evidence = _tools_from_ddb(desc, where)
    out += tools
    if desc.is_delta:
        hint = desc.parent_hint
        parent = path.parent / hint if hint else None
        if parent is None or not parent.is_file():
            out.append(
                error(
                    f"{where}.parentFileNameHint",
                    f"a delta disk whose parent {hint or '(unnamed)'} is missing",
                    hint="ship the whole chain or consolidate the snapshots first",
                )
            )
        elif parent.resolve() in seen or len(seen) >= MAX_CHAIN:
            out.append(
                error(
                    f"{where}.parentFileNameHint", f"the chain of parent disks loops or runs past {MAX_CHAIN}"
                )
            )
        else:
            # The base of a chain usually carries the Tools evidence, and a missing extent of a
            # grandparent breaks the VM as surely as one of the disk the .vmx names.
            parent_findings, parent_evidence = _check_vmdk(parent, f"{where}.parent", seen | {path.resolve()})
            out += parent_findings
            evidence += parent_evidence
    return out, evidence


def _tools_from_ddb(desc: VmdkDescriptor, where: str) -> tuple[list[Finding], list[str]]:
    out: list[Finding] = []
    evidence: list[str] = []
    install = desc.ddb.get("ddb.toolsinstalltype")
    version = desc.ddb.get("ddb.toolsversion")
    if install is not None:
        kind = TOOLS_INSTALL_TYPES.get(install, f"type {install}")
        if install != "0":
            evidence.append(f"ddb.toolsInstallType={install} ({kind})")
        out.append(info(f"{where}.ddb.toolsInstallType", f"{install}: Tools installed as {kind}"))
    if version is not None:
        if version == "0":
            meaning = "Tools never reported"
        elif version == TOOLS_VERSION_UNMANAGED:
            meaning = "unmanaged (open-vm-tools from the distribution)"
        else:
            meaning = "version reported by the Tools"
        if version != "0":
            evidence.append(f"ddb.toolsVersion={version}")
        out.append(info(f"{where}.ddb.toolsVersion", f"{version}: {meaning}"))
    return out, evidence
