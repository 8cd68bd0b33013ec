# tarfile's filters take and give str paths, so this module works on them as os.path does.
# ruff: noqa: PTH110, PTH112, PTH114, PTH118, PTH119, PTH120
"""Laying an image's layers into a directory, as a container runtime would.

:func:`apply_layers` applies them in order: whiteouts (``.wh.NAME``) delete what lower
layers put there, an opaque marker (``.wh..wh..opq``) empties a directory of lower layers'
entries, a later entry replaces an earlier one of another type. The layers are untrusted
archives: extraction goes through the standard library's ``data`` filter, so a member whose
name is absolute, contains ``..`` that leaves the root, or resolves outside it through a
link already there, and a hard link to outside, are refused. Symbolic links are kept as
they are (their targets are read inside the container at run time, where ``/`` is the
container's root), and nothing is ever written *through* one that points outside.

Device nodes and FIFOs are dropped, not refused: roots made by ``mmdebstrap`` and other
distributions' tools carry ``dev/console``, ``dev/null`` and the like, and the guest mounts
its own ``/dev`` (devtmpfs) over the root's anyway. What was dropped is said in a note
(:attr:`RootTree.notes`). Their names are checked first, as any member's: a device node
named ``../x`` is refused like a file would be.

The host tree holds plain files owned by whoever runs boincvm; each entry's real mode
(setuid bits included), owner and group are recorded (:class:`RootTree`) and applied to the
ext4 disk afterwards.
"""

from __future__ import annotations

import bz2
import copy
import gzip
import io
import lzma
import os
import shutil
import stat
import tarfile
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from boincvm.errors import InputError, PathEscapeError
from boincvm.image.oci_source import HINT_LAYOUT, HashingReader, Layer, OciImage

#: The default bound on the unpacked root file system (bytes of regular files).
DEFAULT_MAX_ROOT_BYTES = 32 * 1024**3
#: The default bound on the number of entries all layers may hold.
DEFAULT_MAX_ENTRIES = 2_000_000
#: What may follow a layer's tar end marker (padding) before the diff_id check gives up.
TAIL_LIMIT = 64 * 1024 * 1024
WHITEOUT = ".wh."
OPAQUE = ".wh..wh..opq"


@dataclass
class RootTree:
    """What the unpacked root holds beyond what the host files show.

    Attributes:
        root: the directory the layers were applied to.
        meta: relative path -> (mode with type bits, uid, gid) as the layers said, for every
            entry that exists; the host files have safe modes and whatever owner extracted them.
        nbytes: bytes of regular files written.
        notes: what the user should hear about (device nodes and FIFOs dropped), one line each.
    """

    root: Path
    meta: dict[str, tuple[int, int, int]] = field(default_factory=dict)
    nbytes: int = 0
    notes: list[str] = field(default_factory=list)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink()


def _relname(name: str, what: str) -> str:
    """The member's name relative to the root, refusing absolute names and control characters."""
    if any(ord(c) < 32 or c == "\x7f" for c in name):
        raise PathEscapeError(f"{what} has a member named {name!r}, with control characters")
    if name.startswith("/"):
        raise PathEscapeError(f"{what} has a member with the absolute name {name!r}")
    norm = os.path.normpath(name)
    if norm == ".":
        return ""
    if norm == ".." or norm.startswith("../"):
        raise PathEscapeError(f"{what} has a member {name!r} that leaves the root")
    return norm


#: How many dropped names a note lists before it says how many more there were.
NOTE_NAMES = 12
#: What is dropped, singular and plural, in the order a note lists them.
_DROPPED_KINDS = {
    "device": ("device node", "device nodes"),
    "fifo": ("FIFO", "FIFOs"),
    "link": ("hard link to a dropped node", "hard links to dropped nodes"),
}


class _Applier:
    """The extraction filter all layers pass through, and what it learnt on the way."""

    def __init__(self, tree: RootTree, max_bytes: int, max_entries: int) -> None:
        self.tree, self.max_bytes, self.max_entries = tree, max_bytes, max_entries
        self.root = str(tree.root)
        self.entries = 0
        self.this_layer: set[str] = set()
        #: kind (a key of _DROPPED_KINDS) -> the names dropped, in the order met.
        self.dropped: dict[str, list[str]] = {}
        #: names dropped that no later entry has put back (a hard link to one is dropped too).
        self.absent: set[str] = set()

    def filter(self, member: tarfile.TarInfo, dest: str, what: str) -> tarfile.TarInfo | None:
        """The member as it is to be extracted, or None for nothing (the root, whiteouts, dropped).

        Raises:
            PathEscapeError: the member's name or link leaves the root.
            InputError: too many entries or bytes.
        """
        rel = self._admit(member, what)
        if rel is None or self._drop(member, rel, what):
            return None
        self._clear(member, rel, what)
        checked = self._checked(member, rel, dest, what)
        self._record(member, rel)
        return _host_copy(member, checked)

    def _admit(self, member: tarfile.TarInfo, what: str) -> str | None:
        """The member's name relative to the root, counted; None when it is no entry to write."""
        self.entries += 1
        if self.entries > self.max_entries:
            raise InputError(
                f"the image's layers hold more than {self.max_entries} entries",
                hint="the image is not a sensible root file system; check what was saved",
            )
        rel = _relname(member.name, what)
        if not rel:
            return None  # the root itself ("./")
        if os.path.basename(rel).startswith(WHITEOUT):
            self._whiteout(rel, what)
            return None
        if member.isreg():
            self.tree.nbytes += member.size
            if self.tree.nbytes > self.max_bytes:
                raise InputError(
                    f"the image's layers unpack to more than {self.max_bytes} bytes",
                    hint="a root file system this large is refused; raise --max-root-size if it is meant",
                )
        return rel

    def _drop(self, member: tarfile.TarInfo, rel: str, what: str) -> bool:
        """Whether the member is a device node, a FIFO or a hard link to one dropped: not written.

        It still hides what a lower layer had at its name, as it would in a container.
        """
        if member.ischr() or member.isblk():
            kind = "device"
        elif member.isfifo():
            kind = "fifo"
        elif member.islnk() and os.path.normpath(member.linkname) in self.absent:
            kind = "link"
        else:
            self.absent.discard(rel)
            return False
        literal = self._inside(rel, what)
        if os.path.lexists(literal):
            self._forget(rel)
            _remove(Path(literal))
        self.absent.add(rel)
        self.dropped.setdefault(kind, []).append(rel)
        return True

    def _clear(self, member: tarfile.TarInfo, rel: str, what: str) -> None:
        """Remove what a lower layer had at ``rel``, unless both are directories."""
        literal = self._inside(rel, what)
        if os.path.lexists(literal) and not (
            member.isdir() and os.path.isdir(literal) and not os.path.islink(literal)
        ):
            self._forget(rel)
            _remove(Path(literal))

    def _checked(self, member: tarfile.TarInfo, rel: str, dest: str, what: str) -> tarfile.TarInfo:
        """The member named ``rel``, passed through the data filter."""
        renamed = member.replace(name=rel, deep=False)
        try:
            if member.issym():
                # The target is read inside the container, where "/" is its root: kept as it
                # is. The name is checked as a plain file's would be.
                probe = copy.copy(renamed)
                probe.type, probe.linkname, probe.size = tarfile.REGTYPE, "", 0
                tarfile.data_filter(probe, dest)
                checked = renamed
            else:
                checked = tarfile.data_filter(renamed, dest)
        except tarfile.FilterError as exc:
            raise PathEscapeError(f"{what}: {rel!r} is refused ({exc})") from None
        if member.islnk():
            checked = checked.replace(linkname=_relname(member.linkname, what), deep=False)
        return checked

    def _record(self, member: tarfile.TarInfo, rel: str) -> None:
        """Note the entry's real mode, owner and group (a hard link takes its target's)."""
        self.this_layer.add(rel)
        if member.islnk():
            src_meta = self.tree.meta.get(os.path.normpath(member.linkname))
            self.tree.meta[rel] = src_meta or (stat.S_IFREG | (member.mode & 0o7777), member.uid, member.gid)
            return
        kind = stat.S_IFDIR if member.isdir() else stat.S_IFLNK if member.issym() else stat.S_IFREG
        self.tree.meta[rel] = (kind | (member.mode & 0o7777), member.uid, member.gid)

    def _inside(self, rel: str, what: str) -> str:
        """The host path of ``rel``'s parent, resolved, once the data filter found it inside the root."""
        parent = os.path.dirname(rel)
        if parent:
            probe = tarfile.TarInfo(parent)
            probe.type = tarfile.DIRTYPE
            try:
                tarfile.data_filter(probe, self.root)
            except tarfile.FilterError as exc:
                raise PathEscapeError(f"{what}: {rel!r} would be written outside the root ({exc})") from None
        real_parent = os.path.realpath(os.path.join(self.root, parent))
        return os.path.join(real_parent, os.path.basename(rel))

    def _whiteout(self, rel: str, what: str) -> None:
        parent, base = os.path.split(rel)
        if base == OPAQUE:
            target = Path(self._inside(os.path.join(parent, "x"), what)).parent
            if target.is_dir() and not target.is_symlink():
                for child in target.iterdir():
                    crel = os.path.join(parent, child.name)
                    if crel not in self.this_layer:
                        self._forget(crel)
                        _remove(child)
            return
        name = base[len(WHITEOUT) :]
        if name in ("", ".", "..") or "/" in name:
            raise PathEscapeError(f"{what} has a whiteout of {name!r}, which names no entry of its directory")
        target_rel = os.path.join(parent, name)
        target = Path(self._inside(target_rel, what))
        if os.path.lexists(target):
            self._forget(target_rel)
            _remove(target)

    def _forget(self, rel: str) -> None:
        prefix = rel + "/"
        for key in [k for k in self.tree.meta if k == rel or k.startswith(prefix)]:
            del self.tree.meta[key]

    def drop_note(self) -> str | None:
        """One line saying what was dropped, or None when nothing was."""
        if not self.dropped:
            return None
        parts = []
        for kind, (one, many) in _DROPPED_KINDS.items():
            names = self.dropped.get(kind, [])
            if not names:
                continue
            shown = ", ".join(f"/{n}" for n in names[:NOTE_NAMES])
            more = f" and {len(names) - NOTE_NAMES} more" if len(names) > NOTE_NAMES else ""
            parts.append(f"{len(names)} {one if len(names) == 1 else many} ({shown}{more})")
        return (
            f"dropped from the image's layers: {'; '.join(parts)} (the guest mounts its own /dev, a devtmpfs)"
        )


def _host_copy(member: tarfile.TarInfo, checked: tarfile.TarInfo) -> tarfile.TarInfo:
    """The host copy: owner-writable, nothing set-id; the recorded mode goes on the disk."""
    safe = (member.mode & 0o755) | (0o700 if member.isdir() else 0o600)
    # None means "leave as it is" to tarfile (typeshed says int and str).
    unset: Any = None
    return checked.replace(
        mode=safe if not member.issym() else unset,
        uid=unset,
        gid=unset,
        uname=unset,
        gname=unset,
        deep=False,
    )


def _decompressed(buffered: IO[bytes], media_type: str) -> IO[bytes]:
    head = buffered.peek(8)[:8]  # type: ignore[attr-defined]
    if head[:2] == b"\x1f\x8b":
        return gzip.GzipFile(fileobj=buffered)  # type: ignore[return-value]
    if head[:4] == b"\x28\xb5\x2f\xfd" or media_type.endswith("zstd"):
        raise InputError(
            "a layer is zstd-compressed, which boincvm cannot read yet",
            hint="copy the image with gzip layers: skopeo copy --dest-compress-format gzip SRC oci:DIR",
        )
    if head[:3] == b"BZh":
        return bz2.BZ2File(buffered)
    if head[:6] == b"\xfd7zXZ\x00":
        return lzma.LZMAFile(buffered)
    return buffered


def apply_layers(
    image: OciImage,
    root: Path,
    *,
    max_bytes: int = DEFAULT_MAX_ROOT_BYTES,
    max_entries: int = DEFAULT_MAX_ENTRIES,
    progress: Callable[[str], None] | None = None,
) -> RootTree:
    """Apply the image's layers, in order, to the empty directory ``root``.

    Device nodes and FIFOs are dropped; the returned tree's ``notes`` say which, and each
    note is also given to ``progress`` (as ``note: ...``), so a caller that shows progress
    shows it.

    Raises:
        PathEscapeError: a member is absolute, leaves the root, or goes through a link out of it;
            a whiteout names ``..``.
        InputError: more than ``max_bytes`` of files or ``max_entries`` entries, an unreadable
            or zstd layer.
        ChecksumError: a layer does not match its digest or diff_id.
    """
    tree = RootTree(root)
    applier = _Applier(tree, max_bytes, max_entries)
    for i, layer in enumerate(image.layers):
        what = f"layer {i + 1} of {len(image.layers)}"
        if progress is not None:
            progress(f"applying {what}")
        applier.this_layer = set()
        _apply_layer(image, layer, applier, what)
    note = applier.drop_note()
    if note is not None:
        tree.notes.append(note)
        if progress is not None:
            progress(f"note: {note}")
    return tree


def _apply_layer(image: OciImage, layer: Layer, applier: _Applier, what: str) -> None:
    """Extract one layer through the applier's filter, checking its digest or diff_id."""
    with image.open_layer(layer) as raw:
        buffered: IO[bytes] = io.BufferedReader(raw, 1 << 20)  # type: ignore[type-var]
        stream = _decompressed(buffered, layer.media_type)
        diff = None
        if layer.diff_id is not None:
            diff = HashingReader(stream, layer.diff_id, what)
            stream = io.BufferedReader(diff, 1 << 20)
        try:
            with tarfile.open(fileobj=stream, mode="r|") as tar:
                tar.extractall(  # noqa: S202 - every member passes applier.filter (the data filter)
                    applier.root,
                    filter=lambda m, d: applier.filter(m, d, what),
                    numeric_owner=True,
                )
            if diff is not None:
                diff.verify(limit=TAIL_LIMIT)
            if isinstance(raw, HashingReader):
                raw.verify()
        except (tarfile.TarError, EOFError, zlib.error, lzma.LZMAError, OSError) as exc:
            raise InputError(f"{what} is not a readable tar stream ({exc})", hint=HINT_LAYOUT) from None
