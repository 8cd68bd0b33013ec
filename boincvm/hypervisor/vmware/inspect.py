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
from collections.abc import Callable
from pathlib import Path

from boincvm.errors import BoincvmError, InputError
from boincvm.findings import Finding, error, info, warning
from boincvm.hypervisor.vmware.vmx import VmdkDescriptor, VmxFile, find_vmx, parse_vmsd, read_vmdk_descriptor
from boincvm.paths import check_regular, reference

_INSIDE = "the VM directory"

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


def _file(
    root: Path, base: str, value: str, place: str, follow_links: bool
) -> tuple[Path | None, Finding | None]:
    """The file a reference names once it is safe to read, or why it is not (both None: missing).

    A reference that is absolute or leaves the VM directory, and a file that is a symbolic
    link (to any host file) or a FIFO (which would hang the read), is an error and is not read.
    """
    try:
        p = reference(root, base, value, place, inside=_INSIDE, resolve=not follow_links)
        if not p.exists() and (follow_links or not p.is_symlink()):
            return None, None  # missing (a dangling link of ours too); a dangling link of theirs is refused
        if not follow_links:
            check_regular(p, f"{place} {value}")
    except BoincvmError as exc:
        return None, error(place, exc.message, exc.hint)
    return p, None


def check_vmware(path: Path, *, follow_links: bool = False) -> list[Finding]:
    """Check a ``.vmx`` (with the files it names), a VM directory or a ``.vmdk``, statically.

    Returns findings; an unreadable file is an error finding, not an exception. No file is
    read before it is known to be a regular file inside the VM's directory (``follow_links``:
    except links boincvm laid out itself).
    """
    if path.is_dir():
        try:
            path = find_vmx(path)
        except InputError as exc:
            return [error(path.name, exc.message, exc.hint)]
    if not follow_links:
        try:
            check_regular(path, path.name)
        except BoincvmError as exc:
            return [error(path.name, exc.message, exc.hint)]
    if path.suffix.lower() == ".vmdk":
        found, evidence = _check_vmdk(path, "vmdk", path.parent, follow_links)
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
    return _check_vmx(path, vmx, follow_links) + _check_vm_files(path, vmx, follow_links)


def _check_vm_files(path: Path, vmx: VmxFile, follow_links: bool) -> list[Finding]:
    """Errors for the VM's other files (nvram, .vmxf, .vmsd and its snapshots) that are unsafe to ship."""
    root = path.parent
    out: list[Finding] = []
    for key, default in (("nvram", f"{path.stem}.nvram"), ("extendedConfigFile", None)):
        ref = vmx.get(key, default)
        if ref:
            out += [p for p in [_file(root, "", ref, f"vmx.{key}", follow_links)[1]] if p]
    vmsd, problem = _file(root, "", f"{path.stem}.vmsd", f"{path.stem}.vmsd", follow_links)
    out += [problem] if problem else []
    if vmsd is None:
        return out
    for snap in parse_vmsd(vmsd.read_text(encoding="utf-8", errors="replace")):
        place = f"{vmsd.name}.snapshot{snap.index}"
        if snap.state_file:
            out += [p for p in [_file(root, "", snap.state_file, f"{place}.filename", follow_links)[1]] if p]
        for disk in snap.disks:
            found, problem = _file(root, "", disk, f"{place}.disk.fileName", follow_links)
            out += [problem] if problem else []
            if found is not None and found.suffix.lower() == ".vmdk":
                rel = str(found.parent.relative_to(root))
                out += [f for f in _check_vmdk(found, place, root, follow_links, base=rel)[0] if f.is_error]
    return out


def _check_vmx(path: Path, vmx: VmxFile, follow_links: bool = False) -> list[Finding]:
    settings = vmx.as_dict()
    spelled = {k.lower(): k for k, _ in vmx.items()}

    def place(key: str) -> str:
        return f"vmx.{spelled.get(key.lower(), key)}"

    out = _settings_findings(path, settings, place)
    evidence: list[str] = [k for k in _VMX_TOOLS_HINTS if k.lower() in settings]
    disk_findings, disk_evidence = _vmx_disks(path, vmx, settings, place, follow_links)
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


def _settings_findings(path: Path, settings: dict[str, str], place: Callable[[str], str]) -> list[Finding]:
    """What the .vmx's settings (lower-case keys) say: encryption, breakers, memory, network, state."""
    out: list[Finding] = []
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
    memsize = settings.get("memsize")
    if memsize is not None and (not memsize.isdigit() or int(memsize) % 4):
        out.append(warning(place("memsize"), f"{memsize!r} is not a multiple of 4 MB; VMware refuses it"))
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
    return out


def _vmx_disks(
    path: Path, vmx: VmxFile, settings: dict[str, str], place: Callable[[str], str], follow_links: bool
) -> tuple[list[Finding], list[str]]:
    """Findings about the disks the .vmx attaches (CD-ROMs and absent devices skipped), and
    the Tools evidence their descriptors hold."""
    out: list[Finding] = []
    evidence: list[str] = []
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
        disk, problem = _file(path.parent, "", value, f"vmx.{key}", follow_links)
        if problem is not None:
            out.append(problem)
        elif disk is None:
            out.append(error(f"vmx.{key}", f"the disk file {value} does not exist"))
        elif disk.suffix.lower() == ".vmdk":
            rel = str(disk.parent.relative_to(path.parent))
            disk_findings, disk_evidence = _check_vmdk(
                disk, f"vmx.{key}", path.parent, follow_links, base=rel
            )
            out += disk_findings
            evidence += disk_evidence
    return out, evidence


#: Longest chain of delta disks followed (Workstation allows 100 snapshots deep).
MAX_CHAIN = 128


def _check_vmdk(
    path: Path,
    where: str,
    root: Path,
    follow_links: bool,
    seen: frozenset[Path] = frozenset(),
    *,
    base: str = "",
) -> tuple[list[Finding], list[str]]:
    """Findings about one disk and its whole parent chain, and the Tools evidence their DDBs hold.

    ``root`` is the VM directory every reference must stay in; ``base`` the disk's own
    directory relative to it, which its references are relative to.
    """
    try:
        desc = read_vmdk_descriptor(path)
    except InputError as exc:
        return [error(where, exc.message)], []
    out = _descriptor_findings(desc, where) + _extent_findings(desc, where, root, base, follow_links)
    tools, evidence = _tools_from_ddb(desc, where)
    out += tools
    if desc.is_delta:
        parent_findings, parent_evidence = _check_parent(desc, path, where, root, follow_links, seen, base)
        out += parent_findings
        evidence += parent_evidence
    return out, evidence


def _descriptor_findings(desc: VmdkDescriptor, where: str) -> list[Finding]:
    """A disk that cannot run as it is: stream-optimised, or with no extents."""
    out: list[Finding] = []
    if desc.create_type.lower() == "streamoptimized":
        out.append(
            warning(
                f"{where}.createType",
                "streamOptimized (OVF export) disks cannot be run directly",
                hint="convert it: vmware-vdiskmanager -r in.vmdk -t 0 out.vmdk",
            )
        )
    if not desc.embedded and not any(e.filename for e in desc.extents):
        out.append(
            error(
                f"{where}.extent",
                "the descriptor names no extents: the disk has no data",
                "make the disk again",
            )
        )
    return out


def _extent_findings(
    desc: VmdkDescriptor, where: str, root: Path, base: str, follow_links: bool
) -> list[Finding]:
    """Extent files that are unsafe to read, and one error naming those that are missing."""
    out: list[Finding] = []
    missing: list[str] = []
    for e in desc.extents:
        if e.filename and e.kind != "ZERO":
            found, problem = _file(root, base, e.filename, f"{where}.extent", follow_links)
            if problem is not None:
                out.append(problem)
            elif found is None and not desc.embedded:
                missing.append(e.filename)
    if missing:
        files = ", ".join(missing)
        out.append(error(f"{where}.extent", f"the extent file(s) {files} do not exist"))
    return out


def _check_parent(
    desc: VmdkDescriptor,
    path: Path,
    where: str,
    root: Path,
    follow_links: bool,
    seen: frozenset[Path],
    base: str,
) -> tuple[list[Finding], list[str]]:
    """The parent chain of the delta disk ``path`` (descriptor ``desc``): see :func:`_check_vmdk`."""
    hint = desc.parent_hint
    parent, problem = (
        _file(root, base, hint, f"{where}.parentFileNameHint", follow_links) if hint else (None, None)
    )
    if problem is not None:
        return [problem], []
    if parent is None:
        return [
            error(
                f"{where}.parentFileNameHint",
                f"a delta disk whose parent {hint or '(unnamed)'} is missing",
                hint="ship the whole chain or consolidate the snapshots first",
            )
        ], []
    if parent.resolve() in seen or len(seen) >= MAX_CHAIN:
        return [
            error(f"{where}.parentFileNameHint", f"the chain of parent disks loops or runs past {MAX_CHAIN}")
        ], []
    # The base of a chain usually carries the Tools evidence, and a missing extent of a
    # grandparent breaks the VM as surely as one of the disk the .vmx names.
    return _check_vmdk(
        parent,
        f"{where}.parent",
        root,
        follow_links,
        seen | {path.resolve()},
        base=str(parent.parent.relative_to(root)),
    )


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
