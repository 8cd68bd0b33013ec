"""VMware's configuration files: the ``.vmx`` (``key = "value"`` lines) and VMDK descriptors.

:class:`VmxFile` reads and edits a ``.vmx`` without disturbing what it does not touch:
unknown keys, comments, blank lines, the optional ``#!/usr/bin/vmware`` first line and the
order of lines all survive a round trip. Keys are case-insensitive, as VMware treats them.
The format has no escaping, so a value containing ``"``, CR or LF is refused (it could
inject settings).

:func:`read_vmdk_descriptor` finds the text descriptor of a VMDK: the file itself when it
is a separate descriptor, or the one embedded in a monolithic sparse (``KDMV``) file at the
offset its header names (sector 1 in practice).
"""

from __future__ import annotations

import re
import struct
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

from boincvm.errors import InputError

_LINE = re.compile(r'^\s*([A-Za-z0-9_.:\-]+)\s*=\s*(?:"([^"]*)"|(\S*))\s*$')
VMX_MAX_BYTES = 4 * 1024 * 1024
SECTOR = 512
#: Magic of a VMDK4 sparse extent ("KDMV" read little-endian).
SPARSE_MAGIC = 0x564D444B
#: A descriptor file is never large; anything bigger is a data extent.
DESCRIPTOR_MAX_BYTES = 64 * 1024


@dataclass(frozen=True)
class VmxLine:
    """One line of a .vmx: a setting (``key`` set) or anything else kept verbatim."""

    raw: str
    key: str | None = None
    value: str | None = None


def check_value(key: str, value: str) -> None:
    """Refuse a value the .vmx format cannot hold safely.

    Raises:
        InputError: the key is malformed, or the value contains ``"``, CR or LF.
    """
    if not re.fullmatch(r"[A-Za-z0-9_.:\-]+", key):
        raise InputError(f"vmx.{key}: not a valid .vmx key")
    if any(c in value for c in '"\r\n'):
        raise InputError(f'vmx.{key}: a .vmx value cannot contain ", CR or LF')


@dataclass(frozen=True)
class VmxFile:
    """A parsed .vmx file; edits return a new object.

    Attributes:
        lines: every line of the file in order.
    """

    lines: tuple[VmxLine, ...]

    @classmethod
    def parse(cls, text: str) -> VmxFile:
        """Parse .vmx text. Lines that are not settings are kept verbatim."""
        out: list[VmxLine] = []
        for raw in text.splitlines():
            m = _LINE.match(raw)
            if m and not raw.lstrip().startswith("#"):
                value = m.group(2) if m.group(2) is not None else m.group(3)
                out.append(VmxLine(raw, m.group(1), value))
            else:
                out.append(VmxLine(raw))
        return cls(tuple(out))

    @classmethod
    def load(cls, path: Path) -> VmxFile:
        """Read and parse a .vmx file.

        Raises:
            InputError: the file is missing, unreadable or implausibly large.
        """
        try:
            size = path.stat().st_size
            if size > VMX_MAX_BYTES:
                raise InputError(f"{path.name}: {size} bytes is too large for a .vmx file")
            return cls.parse(path.read_bytes().decode("utf-8", "replace"))
        except OSError as exc:
            raise InputError(f"{path}: cannot read the .vmx file: {exc.strerror or exc}") from exc

    def items(self) -> Iterator[tuple[str, str]]:
        """Yield ``(key, value)`` for every setting, in file order (later duplicates win in :meth:`get`)."""
        for line in self.lines:
            if line.key is not None and line.value is not None:
                yield line.key, line.value

    def as_dict(self) -> dict[str, str]:
        """Settings with lower-cased keys (the last occurrence of a key wins, as in VMware)."""
        return {k.lower(): v for k, v in self.items()}

    def get(self, key: str, default: str | None = None) -> str | None:
        """The value of ``key`` (case-insensitive), or ``default``."""
        return self.as_dict().get(key.lower(), default)

    def flag(self, key: str) -> bool | None:
        """A boolean setting (``TRUE``/``FALSE``, any case), or None when unset or not boolean."""
        v = self.get(key)
        if v is None:
            return None
        return {"true": True, "false": False}.get(v.strip().lower())

    def with_values(self, updates: Mapping[str, str | None]) -> VmxFile:
        """Return a copy with ``updates`` applied: a value sets the key, None removes it.

        An existing key keeps its place (and spelling); a new key is appended.

        Raises:
            InputError: a key or value cannot be written safely.
        """
        for k, v in updates.items():
            if v is not None:
                check_value(k, v)
        pending = {k.lower(): (k, v) for k, v in updates.items()}
        done: set[str] = set()
        out: list[VmxLine] = []
        for line in self.lines:
            low = line.key.lower() if line.key is not None else None
            if low is None or low not in pending:
                out.append(line)
                continue
            _, value = pending[low]
            if value is None or low in done:
                continue  # removed, or a duplicate of a key already rewritten
            out.append(VmxLine(f'{line.key} = "{value}"', line.key, value))
            done.add(low)
        for low, (key, value) in pending.items():
            if value is not None and low not in done:
                out.append(VmxLine(f'{key} = "{value}"', key, value))
        return VmxFile(tuple(out))

    def render(self) -> str:
        """The file's text (``\\n`` line ends, with a final newline)."""
        return "".join(line.raw + "\n" for line in self.lines)

    def save(self, path: Path) -> None:
        """Write the file atomically (a temporary file renamed over ``path``)."""
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(self.render(), encoding="utf-8")
        tmp.replace(path)


# -- VMDK descriptors -------------------------------------------------------------------


@dataclass(frozen=True)
class Extent:
    """One extent line of a VMDK descriptor (``RW 41943040 SPARSE "disk.vmdk"``)."""

    access: str
    sectors: int
    kind: str
    filename: str | None


@dataclass(frozen=True)
class VmdkDescriptor:
    """The parts of a VMDK text descriptor boincvm looks at.

    Attributes:
        create_type: ``monolithicSparse``, ``twoGbMaxExtentSparse``, ``streamOptimized``, ...
        parent_cid: ``ffffffff`` unless this is a delta (snapshot) disk.
        parent_hint: the parent disk's file name for a delta disk.
        extents: the extent lines.
        ddb: the ``ddb.*`` keys (lower-cased), e.g. ``ddb.toolsinstalltype``.
        embedded: True when read from inside a monolithic sparse file.
    """

    create_type: str
    parent_cid: str
    parent_hint: str | None
    extents: tuple[Extent, ...]
    ddb: Mapping[str, str]
    embedded: bool = False

    @property
    def is_delta(self) -> bool:
        """True for a child (snapshot / linked clone) disk."""
        return self.parent_cid.lower() != "ffffffff"


_EXTENT = re.compile(r'^(RW|RDONLY|NOACCESS)\s+(\d+)\s+(\w+)(?:\s+"([^"]*)")?')


def parse_vmdk_descriptor(text: str, *, embedded: bool = False) -> VmdkDescriptor:
    """Parse a VMDK text descriptor.

    Raises:
        InputError: the text is not a VMDK descriptor.
    """
    fields: dict[str, str] = {}
    ddb: dict[str, str] = {}
    extents: list[Extent] = []
    for raw in text.replace("\x00", "").splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        em = _EXTENT.match(line)
        if em:
            extents.append(Extent(em.group(1), int(em.group(2)), em.group(3).upper(), em.group(4)))
            continue
        key, sep, value = line.partition("=")
        if not sep:
            continue
        key, value = key.strip(), value.strip().strip('"')
        if key.lower().startswith("ddb."):
            ddb[key.lower()] = value
        else:
            fields[key.lower()] = value
    if "version" not in fields or "createtype" not in fields:
        raise InputError("not a VMDK descriptor (no version= / createType= lines)")
    return VmdkDescriptor(
        create_type=fields["createtype"],
        parent_cid=fields.get("parentcid", "ffffffff"),
        parent_hint=fields.get("parentfilenamehint"),
        extents=tuple(extents),
        ddb=ddb,
        embedded=embedded,
    )


def read_vmdk_descriptor(path: Path) -> VmdkDescriptor:
    """Read the descriptor of a VMDK file, embedded or separate.

    A monolithic sparse file starts with the ``KDMV`` header (VMware's "Virtual Disk
    Format 1.1": magic, version, flags, capacity, grainSize, then ``descriptorOffset`` and
    ``descriptorSize`` in sectors, all little-endian); the descriptor is the text at that
    offset. A streamOptimized file has the same header.

    Raises:
        InputError: unreadable, or neither a sparse VMDK with a descriptor nor a descriptor file.
    """
    try:
        with path.open("rb") as f:
            head = f.read(SECTOR)
            if len(head) >= 44 and struct.unpack_from("<I", head, 0)[0] == SPARSE_MAGIC:
                # magic u32, version u32, flags u32, capacity u64, grainSize u64,
                # descriptorOffset u64, descriptorSize u64 (sectors)
                desc_off, desc_size = struct.unpack_from("<QQ", head, 28)
                if desc_off == 0 or desc_size == 0:
                    raise InputError(f"{path.name}: sparse VMDK without an embedded descriptor")
                if desc_size * SECTOR > DESCRIPTOR_MAX_BYTES:
                    raise InputError(
                        f"{path.name}: embedded descriptor of {desc_size} sectors is implausible"
                    )
                f.seek(desc_off * SECTOR)
                data = f.read(desc_size * SECTOR)
                return parse_vmdk_descriptor(data.decode("utf-8", "replace"), embedded=True)
            if head[:4] == b"COWD":
                raise InputError(f"{path.name}: a VMDK3 (COWD) disk; boincvm reads VMDK4 only")
            f.seek(0)
            data = f.read(DESCRIPTOR_MAX_BYTES + 1)
    except OSError as exc:
        raise InputError(f"{path}: cannot read the VMDK: {exc.strerror or exc}") from exc
    if len(data) > DESCRIPTOR_MAX_BYTES or b"\x00" in data[:SECTOR]:
        raise InputError(f"{path.name}: neither a sparse VMDK nor a VMDK descriptor file")
    return parse_vmdk_descriptor(data.decode("utf-8", "replace"))


_SNAP_KEY = re.compile(r"^snapshot(\d+)\.(.+)$", re.IGNORECASE)


@dataclass(frozen=True)
class VmsdSnapshot:
    """One snapshot of a ``.vmsd``: ``snapshotN.displayName``, ``.filename`` (.vmsn), ``.diskM.fileName``."""

    index: int
    display_name: str
    state_file: str | None
    disks: tuple[str, ...]


def parse_vmsd(text: str) -> tuple[VmsdSnapshot, ...]:
    """The snapshots a ``.vmsd`` lists, in index order."""
    keys: dict[int, dict[str, str]] = {}
    for key, value in VmxFile.parse(text).items():
        m = _SNAP_KEY.match(key)
        if m:
            keys.setdefault(int(m.group(1)), {})[m.group(2).lower()] = value
    out = []
    for index in sorted(keys):
        k = keys[index]
        disks = [v for sub, v in k.items() if re.fullmatch(r"disk\d+\.filename", sub)]
        out.append(VmsdSnapshot(index, k.get("displayname", ""), k.get("filename") or None, tuple(disks)))
    return tuple(out)


def find_vmx(path: Path) -> Path:
    """The ``.vmx`` of a VM: ``path`` itself, or the only ``.vmx`` in the directory ``path``.

    Raises:
        InputError: not a .vmx, or a directory with none or several.
    """
    if path.is_dir():
        # lexists, not is_file: a .vmx that is a link is found here and refused by collect_vm
        found = sorted(p for p in path.iterdir() if p.suffix.lower() == ".vmx" and not p.is_dir())
        if len(found) != 1:
            what = "no .vmx file" if not found else f"{len(found)} .vmx files"
            raise InputError(f"{path} holds {what}", hint="name the VM's .vmx file itself")
        return found[0]
    if path.suffix.lower() != ".vmx":
        raise InputError(f"{path.name} is not a VMware .vmx file")
    return path
