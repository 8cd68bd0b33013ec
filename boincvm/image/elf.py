"""Just enough ELF reading to build a guest: shared-library needs and the PVH entry note.

Reading the files ourselves (instead of running ``ldd`` on the host) keeps the guest build
independent of what the host has installed: the closure is computed inside the
extracted Debian packages.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Iterable
from pathlib import Path

from boincvm.errors import InputError
from boincvm.paths import open_regular

_ELF_MAGIC = b"\x7fELF"
_SHT_NOTE = 7
_SHT_DYNAMIC = 6
_DT_NEEDED = 1
_PT_NOTE = 4
_PT_INTERP = 3
_ET_EXEC, _ET_DYN = 2, 3
_EM_X86_64 = 62
#: XEN_ELFNOTE_PHYS32_ENTRY: the note QEMU looks for to boot a vmlinux through PVH.
_XEN_ELFNOTE_PHYS32_ENTRY = 18


def _header(data: bytes, place: str) -> tuple[int, int, int, int, int, int, int]:
    if len(data) < 64 or data[:4] != _ELF_MAGIC or data[4] != 2 or data[5] != 1:
        raise InputError(f"{place}: not a 64-bit little-endian ELF file")
    (phoff, shoff) = struct.unpack_from("<QQ", data, 0x20)
    (phentsize, phnum, shentsize, shnum, shstrndx) = struct.unpack_from("<HHHHH", data, 0x36)
    return phoff, phentsize, phnum, shoff, shentsize, shnum, shstrndx


def needed_libraries(path: Path) -> list[str]:
    """Return the ``DT_NEEDED`` entries (sonames) of an ELF executable or library.

    Raises:
        InputError: the file is not a 64-bit little-endian ELF file.
    """
    data = path.read_bytes()
    _, _, _, shoff, shentsize, shnum, _ = _header(data, str(path))
    sections = [struct.unpack_from("<IIQQQQIIQQ", data, shoff + i * shentsize) for i in range(shnum)]
    out: list[str] = []
    for _name, sh_type, _flags, _addr, offset, size, link, _info, _align, entsize in sections:
        if sh_type != _SHT_DYNAMIC:
            continue
        strtab_off = sections[link][4]
        for pos in range(offset, offset + size, entsize or 16):
            tag, val = struct.unpack_from("<qQ", data, pos)
            if tag == 0:
                break
            if tag == _DT_NEEDED:
                start = strtab_off + val
                out.append(data[start : data.index(b"\0", start)].decode())
    return out


def has_pvh_entry(data: bytes) -> bool:
    """True when an ELF kernel image carries the PVH entry note QEMU's ``-kernel`` boots directly."""
    try:
        phoff, phentsize, phnum, _, _, _, _ = _header(data, "kernel")
    except InputError:
        return False
    for i in range(phnum):
        p_type, _flags, p_offset, _va, _pa, p_filesz, _memsz, _align = struct.unpack_from(
            "<IIQQQQQQ", data, phoff + i * phentsize
        )
        if p_type != _PT_NOTE:
            continue
        pos, end = p_offset, p_offset + p_filesz
        while pos + 12 <= end:
            namesz, descsz, ntype = struct.unpack_from("<III", data, pos)
            name = data[pos + 12 : pos + 12 + namesz].rstrip(b"\0")
            if name == b"Xen" and ntype == _XEN_ELFNOTE_PHYS32_ENTRY:
                return True
            pos += 12 + ((namesz + 3) & ~3) + ((descsz + 3) & ~3)
    return False


def static_x86_64_problem(data: bytes) -> str | None:
    """What keeps ``data`` from being a static x86-64 executable (one with no ``PT_INTERP``, so
    it runs without the host's dynamic loader); None when it is one.

    ``data`` is the start of the file, its program headers included.
    """
    try:
        phoff, phentsize, phnum, _, _, _, _ = _header(data, "file")
    except InputError:
        return "it is not a 64-bit little-endian ELF file"
    e_type, e_machine = struct.unpack_from("<HH", data, 0x10)
    if e_machine != _EM_X86_64:
        return f"it is an ELF file for machine {e_machine}, not x86-64 ({_EM_X86_64})"
    if e_type not in (_ET_EXEC, _ET_DYN):
        return "it is an ELF file but not an executable"
    if phoff + phentsize * phnum > len(data) or phentsize < 4:
        return "its program headers are cut short"
    for i in range(phnum):
        if struct.unpack_from("<I", data, phoff + i * phentsize)[0] == _PT_INTERP:
            return "it is dynamically linked (it names a program interpreter)"
    return None


def elf_size(data: bytes) -> int:
    """The length of an ELF file judged from its headers (trailing bytes excluded).

    Raises:
        InputError: the data is not a 64-bit little-endian ELF file.
    """
    phoff, phentsize, phnum, shoff, shentsize, shnum, _ = _header(data, "kernel")
    end = max(shoff + shentsize * shnum, phoff + phentsize * phnum)
    for i in range(shnum):
        _n, sh_type, _f, _a, offset, size, *_ = struct.unpack_from("<IIQQQQIIQQ", data, shoff + i * shentsize)
        if sh_type != 8:  # SHT_NOBITS occupies no file space
            end = max(end, offset + size)
    for i in range(phnum):
        _t, _f, p_offset, _va, _pa, p_filesz, *_ = struct.unpack_from(
            "<IIQQQQQQ", data, phoff + i * phentsize
        )
        end = max(end, p_offset + p_filesz)
    return end


def looks_like_kernel(path: Path) -> bool:
    """A Linux kernel: an ELF vmlinux or a bzImage (``HdrS`` at 0x202)."""
    try:
        with open_regular(path, f"image {path}") as f:  # a FIFO or a link is no kernel (and must not hang us)
            head = f.read(0x210)
    except (OSError, InputError):
        return False
    return head[:4] == b"\x7fELF" or head[0x202:0x206] == b"HdrS"


def library_closure(binaries: Iterable[Path], find: Callable[[str], Path]) -> dict[str, Path]:
    """Every shared library the ELF ``binaries`` load, directly or not: soname -> file.

    Args:
        binaries: the programs (or modules) whose ``DT_NEEDED`` entries start the walk.
        find: where a soname's file is (it raises when there is none).

    Raises:
        InputError: a file is not a 64-bit ELF.
    """
    found: dict[str, Path] = {}
    todo = [lib for b in binaries for lib in needed_libraries(b)]
    while todo:
        soname = todo.pop()
        if soname in found:
            continue
        path = find(soname)
        found[soname] = path
        todo.extend(needed_libraries(path.resolve()))
    return found
