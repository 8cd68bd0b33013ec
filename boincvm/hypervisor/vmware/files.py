"""The files of a VMware VM directory: which ones a VM needs, and rebuilding the directory in a slot.

A VMware VM is a directory whose files name each other: the ``.vmx`` names its disks, the
``.vmsd`` (snapshot dictionary, ``.vmx`` syntax) names each snapshot's state file
(``.vmsn``) and disks, a disk descriptor names its extents and, for a delta (snapshot or
linked-clone) disk, its parent (``parentFileNameHint``). :func:`collect_vm` follows every
one of these references from the ``.vmx`` and returns the closed set of files, refusing what
cannot be shipped: references that leave the directory or are absolute, missing files, a VM
that is running, suspended or encrypted, and a VM without the base snapshot that per-task
linked clones start from.

:func:`rebuild_vm_dir` lays such a set out again under its original names (in a slot, for
:func:`base_vmx`): small
files, which VMware may rewrite (``.vmx``, ``.vmsd``, descriptors, ``.nvram``), are copied;
large ones (extents, snapshot memory) are symbolic links to the read-only originals, which a
linked clone only ever opens as a parent disk, read-only.
"""

from __future__ import annotations

import logging
import os
import posixpath
import re
import shutil
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from boincvm.errors import InputError, PathEscapeError
from boincvm.hypervisor.base import VmSpec
from boincvm.hypervisor.vmware.inspect import check_vmware
from boincvm.hypervisor.vmware.vmx import VmxFile, find_vmx, parse_vmsd, read_vmdk_descriptor
from boincvm.paths import check_regular

log = logging.getLogger(__name__)

#: The snapshot every task's linked clone starts from (vmrun clone ... -snapshot=NAME).
BASE_SNAPSHOT = "boincvm-base"
#: Files below this size are copied into the slot's VM directory; larger ones are linked.
COPY_MAX_BYTES = 1 << 20

_DISK_KEY = re.compile(r"^((?:scsi|sata|ide|nvme)\d+:\d+)\.filename$", re.IGNORECASE)


@dataclass(frozen=True)
class VmFile:
    """One file of a VM directory.

    Attributes:
        name: its path relative to the VM directory (``/``-separated), as the VM's files name it.
        path: where it is on this host.
        role: ``vmx``, ``vmsd``, ``vmxf``, ``nvram``, ``disk``, ``extent``, ``snapshot-state``
            or ``snapshot-memory``.
    """

    name: str
    path: Path
    role: str


@dataclass(frozen=True)
class VmDirectory:
    """A VM directory's closed set of files (the ``.vmx`` first) and what packaging needs from it."""

    root: Path
    files: tuple[VmFile, ...]
    snapshot: str
    memory_mb: int | None

    @property
    def vmx(self) -> VmFile:
        """The ``.vmx`` file."""
        return self.files[0]


def collect_vm(path: Path, *, snapshot: str = BASE_SNAPSHOT, follow_links: bool = False) -> VmDirectory:
    """Every file the VM at ``path`` (a VM directory or its .vmx) needs, checked for shipping.

    Every file must be a regular file inside the VM directory: a symbolic link could name any
    host file (``-flat.vmdk -> /etc/shadow``) and a FIFO would hang the copy. Only
    ``follow_links`` (for a VM directory boincvm itself laid out as links) accepts links.

    Raises:
        InputError: the VM is in use, suspended, encrypted, has an independent disk or a
            missing file, or lacks the snapshot ``snapshot`` (or has it twice).
        PathEscapeError: a file reference is absolute or leaves the VM directory.
    """
    vmx_path = find_vmx(path)
    if not follow_links:
        check_regular(vmx_path, f"the VM's .vmx file {vmx_path.name}")
    refuse_in_use(vmx_path.parent)
    vmx = VmxFile.load(vmx_path)
    _refuse_unshippable(vmx_path, vmx, follow_links)
    walk = _Walk(vmx_path, follow_links)
    walk.add(vmx_path.name, "vmx")
    walk.add_vmx_references(vmx)
    walk.add_snapshots(snapshot)
    memsize = vmx.get("memsize")
    return VmDirectory(
        root=walk.root,
        files=tuple(walk.files.values()),
        snapshot=snapshot,
        memory_mb=int(memsize) if memsize and memsize.isdigit() else None,
    )


def _refuse_unshippable(vmx_path: Path, vmx: VmxFile, follow_links: bool) -> None:
    """Refuse what :func:`check_vmware` calls an error (but missing files) and a suspended VM.

    Raises:
        InputError: naming the first such problem.
    """
    for f in check_vmware(vmx_path, follow_links=follow_links):
        # Missing files are left to the walk, which follows every reference (and
        # refuses one that leaves the directory before asking whether it exists).
        if f.is_error and not re.search(r"(\.filename|\.extent|\.parentfilenamehint)$", f.place.lower()):
            raise InputError(
                f"{vmx_path.name}: {f.place}: {f.message}",
                hint=f.hint or "fix it in VMware with the VM powered off, then take the snapshot again",
            )
    if vmx.get("checkpoint.vmState"):
        raise InputError(
            f"{vmx_path.name}: the VM is suspended",
            hint="power it off (not suspend), take the snapshot again, then package it",
        )


class _Walk:
    """The files of one VM directory, collected by following the references from its .vmx."""

    def __init__(self, vmx_path: Path, follow_links: bool) -> None:
        self.vmx_path = vmx_path
        self.root = vmx_path.parent
        self.follow_links = follow_links
        self.files: dict[str, VmFile] = {}

    def present(self, name: str) -> bool:
        """Whether ``name`` is there: a file, or a link (refused later) unless links are followed."""
        p = self.root / name
        return p.is_file() or (not self.follow_links and p.is_symlink())

    def add(self, name: str, role: str) -> Path:
        """Record file ``name`` (once); its path.

        Raises:
            InputError: it is missing or not a regular file.
            PathEscapeError: it resolves outside the VM directory through a link.
        """
        p = self.root / name
        where = f"{self.vmx_path.name}: {role} file {name}"
        if name not in self.files:
            if not self.present(name):
                raise InputError(
                    f"{where} does not exist",
                    hint="the VM directory is incomplete: copy it whole (power it on in VMware to check)",
                )
            if not self.follow_links:
                if not p.resolve().is_relative_to(self.root.resolve()):
                    raise PathEscapeError(
                        f"{where} resolves outside the VM directory through a symbolic link",
                        hint="keep the VM's files in its own directory, without links",
                    )
                check_regular(p, where)
            self.files[name] = VmFile(name, p, role)
        return p

    def add_vmx_references(self, vmx: VmxFile) -> None:
        """The disks the .vmx attaches (with their chains), its nvram and its .vmxf."""
        settings = vmx.as_dict()
        for key, value in vmx.items():
            m = _DISK_KEY.match(key)
            if not m or not value:
                continue
            dev = m.group(1).lower()
            if settings.get(f"{dev}.present", "TRUE").upper() == "FALSE":
                continue
            if "cdrom" in settings.get(f"{dev}.devicetype", "") or value.lower().endswith(".iso"):
                continue
            _add_disk(self.root, _reference(self.root, "", value, f"vmx.{key}"), self.add)
        for key, role, default in (
            ("nvram", "nvram", f"{self.vmx_path.stem}.nvram"),
            ("extendedConfigFile", "vmxf", None),
        ):
            ref = vmx.get(key, default)
            if ref:
                name = _reference(self.root, "", ref, f"vmx.{key}")
                if self.present(name):
                    self.add(name, role)

    def add_snapshots(self, snapshot: str) -> None:
        """The snapshot dictionary and every snapshot's files; ``snapshot`` must be among them, once.

        Raises:
            InputError: no snapshots, none named ``snapshot``, or more than one.
        """
        vmx_name = self.vmx_path.name
        vmsd_name = f"{self.vmx_path.stem}.vmsd"  # VMware keeps it beside the .vmx, by its name
        hint = (
            f'power the VM off and take it: vmrun -T ws snapshot "{vmx_name}" {snapshot}'
            " (Fusion: -T fusion; or Snapshot > Take Snapshot in Workstation)"
        )
        if not self.present(vmsd_name):
            raise InputError(f"{vmx_name}: no snapshots; the VM needs one named {snapshot!r}", hint=hint)
        self.add(vmsd_name, "vmsd")
        snapshots = parse_vmsd((self.root / vmsd_name).read_text(encoding="utf-8", errors="replace"))
        named = [s for s in snapshots if s.display_name == snapshot]
        if not named:
            have = ", ".join(repr(s.display_name) for s in snapshots) or "none"
            raise InputError(
                f"{vmx_name}: no snapshot named {snapshot!r} (snapshots: {have})",
                hint=hint + "; each task runs a linked clone of that snapshot",
            )
        if len(named) > 1:
            raise InputError(
                f"{vmx_name}: {len(named)} snapshots are named {snapshot!r}; VMware needs a unique name",
                hint="delete or rename the others in the Snapshot Manager",
            )
        for snap in snapshots:
            place = f"{vmsd_name}.snapshot{snap.index}"
            if snap.state_file:
                state = _reference(self.root, "", snap.state_file, f"{place}.filename")
                self.add(state, "snapshot-state")
                memory = posixpath.splitext(state)[0] + ".vmem"
                if self.present(memory):
                    self.add(memory, "snapshot-memory")
            for disk in snap.disks:
                _add_disk(self.root, _reference(self.root, "", disk, f"{place}.disk.fileName"), self.add)


def refuse_in_use(root: Path) -> None:
    """Refuse a VM directory holding a VMware lock (``*.lck``): the VM runs, or ran and crashed.

    Raises:
        InputError: naming the lock.
    """
    for dirpath, dirnames, filenames in os.walk(root):
        for name in (*dirnames, *filenames):
            if name.lower().endswith(".lck"):
                rel = (Path(dirpath) / name).relative_to(root)
                raise InputError(
                    f"the VM is in use or was not shut down cleanly: lock {rel} exists",
                    hint="power the VM off and close it in VMware "
                    "(remove a stale .lck only when no VMware process uses the VM)",
                )


def _reference(root: Path, base: str, value: str, place: str) -> str:
    """A file reference (relative to the directory ``base`` inside ``root``) as a path relative to ``root``.

    Raises:
        PathEscapeError: absolute, or leaving the VM directory.
    """
    value = value.replace("\\", "/")
    if value.startswith("/") or re.match(r"^[A-Za-z]:", value):
        inside = Path(value).resolve().is_relative_to(root.resolve())
        raise PathEscapeError(
            f"{place}: {value} is an absolute path{'' if inside else ' outside the VM directory'}; "
            "on a volunteer's host it would name nothing",
            hint=(
                "make it relative to the VM directory (edit the .vmx or descriptor while the VM is off)"
                if inside
                else "a linked clone cannot be shipped: make a full clone (or consolidate its disks) first"
            ),
        )
    name = posixpath.normpath(posixpath.join(base, value))
    if name == ".." or name.startswith("../"):
        raise PathEscapeError(
            f"{place}: {value} leaves the VM directory",
            hint="move the file into the VM directory and fix the reference, or make a full clone",
        )
    return name


def _add_disk(root: Path, name: str, add: Callable[[str, str], Path]) -> None:
    """A disk and everything it needs: its extents and, for a delta disk, its parent chain."""
    seen: set[str] = set()
    while name not in seen:
        seen.add(name)
        path = add(name, "disk")
        try:
            desc = read_vmdk_descriptor(path)
        except InputError as exc:
            raise InputError(exc.message, hint="check the disk in VMware (Virtual Machine Settings)") from exc
        base = posixpath.dirname(name)
        if not desc.embedded:
            for extent in desc.extents:
                if extent.filename and extent.kind != "ZERO":
                    add(_reference(root, base, extent.filename, f"{name}.extent"), "extent")
        if not desc.is_delta:
            return
        if not desc.parent_hint:
            raise InputError(f"{name}: a delta disk without parentFileNameHint")
        name = _reference(root, base, desc.parent_hint, f"{name}.parentFileNameHint")


def rebuild_vm_dir(dest: Path, files: Mapping[str, Path]) -> dict[str, str]:
    """Lay ``files`` (name in the VM directory -> file on this host) out in ``dest``, whole or not at all.

    Files under :data:`COPY_MAX_BYTES` are copied (VMware may rewrite them: the .vmx, the
    .vmsd when a linked clone is registered, descriptors, the .nvram); larger ones become
    symbolic links to the resolved originals. An existing ``dest`` is kept as it is: a
    clone made from it refers to its disks.

    Returns:
        name -> ``"copied"`` or ``"linked"``, for the log.

    Raises:
        InputError: a name leaves the directory or a file is missing.
    """
    how: dict[str, str] = {}
    if dest.is_dir():
        return how
    tmp = dest.with_name(f".{dest.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        for name, src in files.items():
            rel = posixpath.normpath(name)
            if rel.startswith(("/", "../")) or rel in ("..", "."):
                raise PathEscapeError(f"vmware: image file name {name!r} leaves the VM directory")
            target = tmp / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            try:
                size = src.stat().st_size
            except OSError as exc:
                raise InputError(f"vmware: image file {name} ({src}) is missing: {exc.strerror}") from exc
            if size < COPY_MAX_BYTES:
                shutil.copyfile(src, target)
                how[name] = "copied"
            else:
                target.symlink_to(src.resolve())
                how[name] = "linked"
        tmp.rename(dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return how


def base_vmx(spec: VmSpec, base_dir: Path) -> Path:
    """The .vmx of the base VM that ``spec`` clones: its image, or for an app version (its
    ``image_files``) the VM rebuilt in ``base_dir`` (:func:`rebuild_vm_dir`, once).

    Small files are copied, large ones linked, so VMware's writes (the .vmx, the .vmsd a
    linked clone is registered in) land in the slot and never in the project's immutable files.

    Raises:
        InputError: the image is not a .vmx (or not the .vmx among the image files), or is missing.
    """
    image = spec.image
    if image is not None and spec.image_files:
        names = [n for n, p in spec.image_files.items() if p == image]
        if not names or not names[0].lower().endswith(".vmx"):
            raise InputError(
                "vmware: the image must be the .vmx among the image files",
                hint="make the app version with boincvm package-image VM_DIRECTORY",
            )
        how = rebuild_vm_dir(base_dir, spec.image_files)
        if how:
            linked = sum(1 for v in how.values() if v == "linked")
            log.info("vmware: rebuilt the base VM in %s (%d files copied, %d linked)", base_dir.name,
                     len(how) - linked, linked)  # fmt: skip
        return base_dir / names[0]
    if image is None or image.suffix.lower() != ".vmx":
        raise InputError(
            f"vmware: the image must be a VMware .vmx file, not {image.name if image else 'none'}",
            hint="ship the base VM's .vmx and disks; a bare .vmdk needs a .vmx around it",
        )
    if not image.is_file():
        raise InputError(f"vmware: {image} does not exist")
    return image
