"""The ground rules for paths: what an untrusted input names, and the directories boincvm creates.

An image, a VM directory or a package handed to an administrator names other files
(a backing file, an extent, an initramfs). Every such reference goes through here:

* :func:`reference` turns a name found inside a file into a path below that file's own
  directory, refusing absolute names, ``..`` that leaves, protocol prefixes QEMU would
  interpret (``json:``, ``nbd:``, ``file:``) and anything that resolves outside;
* :func:`check_regular` refuses what is not a plain file: a symbolic link (whose target
  could be any host file), a FIFO (reading it hangs), a device or a directory;
* :func:`open_regular` opens such a file without following a link and without blocking,
  so a file swapped for a link or a FIFO after the check is still refused.

An output directory replaced with ``--force`` is deleted; so it must not be, contain or
lie inside one of the command's inputs (:func:`refuse_output_overlapping`), nor be the
working directory or above it, and where it cannot be made (a parent is a file, or not
writable) that is said in one sentence before any work starts (:func:`check_output_dir`).
Ground module: imports only :mod:`boincvm.errors`.
"""

from __future__ import annotations

import os
import re
import stat
from collections.abc import Iterable
from pathlib import Path, PurePosixPath
from typing import BinaryIO

from boincvm.errors import InputError, PathEscapeError

#: A prefix QEMU's block layer reads as a protocol or as JSON options (``json:``, ``nbd:``,
#: ``file:``): a colon before the first slash (qemu's ``path_has_protocol``).
_PROTOCOL = re.compile(r"^[^/]*:")
_KINDS = {
    stat.S_IFIFO: "a FIFO",
    stat.S_IFCHR: "a character device",
    stat.S_IFBLK: "a block device",
    stat.S_IFSOCK: "a socket",
    stat.S_IFDIR: "a directory",
}


def reference(
    root: Path,
    base: str,
    value: str,
    place: str,
    *,
    inside: str = "the image's directory",
    resolve: bool = True,
) -> Path:
    """The file that ``value``, a reference found in ``place``, names below the directory ``root``.

    ``base`` is the directory (relative to ``root``) the reference is relative to. Without
    ``resolve`` the name alone is checked (for a directory of links boincvm made itself).

    Raises:
        PathEscapeError: the reference is absolute, a protocol or JSON filename, leaves
            ``root`` or resolves outside it (through a symbolic link on the way).
    """
    where = f"{place} names {value!r}"
    hint = f"keep every file it refers to in {inside}, named relatively (or flatten the image)"
    if not value or any(c in value for c in "\0\r\n"):
        raise PathEscapeError(f"{where}, which is not a usable file name", hint=hint)
    norm = value.replace("\\", "/")
    if norm.startswith("/") or re.match(r"^[A-Za-z]:/", norm):
        raise PathEscapeError(
            f"{where}, an absolute path; only names inside {inside} are followed", hint=hint
        )
    if _PROTOCOL.match(norm):
        raise PathEscapeError(
            f"{where}, a protocol or JSON filename that QEMU would follow anywhere",
            hint="flatten the image (qemu-img convert -O qcow2 IMAGE flat.qcow2) on a trusted machine",
        )
    parts = PurePosixPath(base, norm).parts
    depth = 0
    for part in parts:
        depth += -1 if part == ".." else 0 if part == "." else 1
        if depth < 0:
            raise PathEscapeError(f"{where}, which leaves {inside}", hint=hint)
    path = root.joinpath(*parts)
    if resolve and not path.resolve().is_relative_to(root.resolve()):
        raise PathEscapeError(f"{where}, which resolves outside {inside} through a symbolic link", hint=hint)
    return path


def check_regular(path: Path, what: str) -> os.stat_result:
    """The status of ``path`` once it is known to be a regular file that is not a symbolic link.

    ``what`` names the file in messages, its name included (``image x.qcow2``).

    Raises:
        InputError: it does not exist, or is a FIFO, a device, a socket or a directory.
        PathEscapeError: it is a symbolic link.
    """
    try:
        st = path.lstat()
    except FileNotFoundError:
        raise InputError(f"{what} does not exist", hint="check the name and that the file is there") from None
    except OSError as exc:
        raise InputError(f"{what} cannot be read: {exc.strerror}", hint="check its permissions") from exc
    if stat.S_ISLNK(st.st_mode):
        raise PathEscapeError(
            f"{what} is a symbolic link (to {str(path.readlink())!r}), whose target could be any host file",
            hint="replace the link by the file itself (cp --dereference) after checking what it points to",
        )
    if not stat.S_ISREG(st.st_mode):
        kind = _KINDS.get(stat.S_IFMT(st.st_mode), "not a regular file")
        raise InputError(f"{what} is {kind}, not a regular file", hint="give a regular file")
    return st


def open_regular(path: Path, what: str) -> BinaryIO:
    """Open a checked regular file for reading: no symbolic link followed, no FIFO waited on.

    Raises:
        InputError: as :func:`check_regular`, or it cannot be opened.
        PathEscapeError: it is a symbolic link.
    """
    check_regular(path, what)
    flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(path, flags)
    except OSError as exc:
        check_regular(path, what)  # swapped for a link or removed since: say so
        raise InputError(f"{what} cannot be opened: {exc.strerror}", hint="check its permissions") from exc
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        raise InputError(f"{what} is not a regular file", hint="give a regular file")
    os.set_blocking(fd, True)
    return os.fdopen(fd, "rb")


_OTHER_OUTPUT = "choose another output directory (-o) that holds none of the inputs"


def _real(path: Path) -> Path:
    # resolve() follows symlinks, so a link to an input is seen as that input.
    return Path(os.path.realpath(path))


def refuse_output_overlapping(
    output: Path, inputs: Iterable[tuple[str, Path]], *, option: str = "output directory"
) -> None:
    """Refuse an output directory that is, contains, or lies inside an input.

    Checked before anything is written or replaced: ``--force`` replaces the output
    directory whole, which would delete an input inside it.

    Args:
        output: the directory the command will create (or replace).
        inputs: ``(what, path)`` for every file or directory the command reads.
        option: how the output is named in the message (``--output-dir``).

    Raises:
        InputError: naming the input the output would overlap.
    """
    out = _real(output)
    for what, path in inputs:
        src = _real(path)
        if out == src:
            raise InputError(f"{option} {output} is {what} {path}", hint=_OTHER_OUTPUT)
        if src.is_relative_to(out):
            raise InputError(
                f"{option} {output} holds {what} {path}; replacing it would delete that input",
                hint=_OTHER_OUTPUT,
            )
        if out.is_relative_to(src):
            raise InputError(f"{option} {output} lies inside {what} {path}", hint=_OTHER_OUTPUT)


def inside(path: str | Path, directory: Path) -> bool:
    """True when ``path`` (symlinks resolved) is ``directory`` or below it."""
    return _real(Path(path)).is_relative_to(_real(directory))


def check_output_dir(output: Path) -> None:
    """Refuse an output directory that cannot be made, or whose replacement would be destructive.

    Raises:
        InputError: it is the working directory or above it, an existing parent is not a
            directory, the nearest existing parent is not writable, or it exists as a file.
    """
    out = _real(output)
    cwd = _real(Path.cwd())
    if cwd.is_relative_to(out):
        raise InputError(
            f"output directory {output} is the working directory or one of its parents",
            hint="give a new directory, e.g. -o out; boincvm replaces the whole output directory",
        )
    if output.is_symlink() or (output.exists() and not output.is_dir()):
        raise InputError(
            f"output directory {output} exists and is not a directory"
            + (" (it is a symlink)" if output.is_symlink() else ""),
            hint="remove it or choose another output directory",
        )
    parent = output.absolute().parent
    while not parent.exists() and not parent.is_symlink():
        parent = parent.parent
    if not parent.is_dir():
        raise InputError(
            f"cannot create output directory {output}: {parent} is not a directory",
            hint="choose an output directory whose parents are directories",
        )
    if not os.access(parent, os.W_OK | os.X_OK):
        raise InputError(
            f"cannot create output directory {output}: {parent} is not writable",
            hint="choose a directory you may write to, or fix its permissions",
        )


def refuse_symlinks_in(directory: Path, what: str) -> None:
    """Refuse a directory boincvm will write files into when it, or an entry in it, is a symlink.

    A file written there through a symlink (even a dangling one) lands wherever the link
    points, outside the directory; the check runs before anything is written.

    Raises:
        InputError: naming the symlink.
    """
    hint = f"remove the symlink or choose another {what}"
    if directory.is_symlink():
        raise InputError(f"{what} {directory} is a symlink (to {directory.readlink()})", hint=hint)
    if not directory.is_dir():
        if directory.exists():
            raise InputError(f"{what} {directory} exists and is not a directory", hint=hint)
        return
    for entry in directory.iterdir():
        if entry.is_symlink():
            raise InputError(
                f"{what} {directory} holds a symlink {entry.name} (to {entry.readlink()}); "
                "boincvm would write through it",
                hint=hint,
            )
