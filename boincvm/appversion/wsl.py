"""Windows app versions through WSL: BOINC's ``wsl_wrapper.exe`` is the main program and runs
our frozen wrapper inside a WSL distro (see ``docs/windows.md``).

BOINC's ``samples/wsl_wrapper`` runs ``./main ARGS`` in the slot directory inside the
distro, so the app version ships, besides the files of a Linux app version:

- ``wsl_wrapper.exe`` (the admin's build; boincvm never builds it) as the main program, a
  Windows x86-64 program;
- the frozen wrapper, the static ELF Linux volunteers run as their main program, with the
  open name ``main`` and ``<copy_file/>``: a real file in the slot, since WSL cannot run a
  BOINC soft-link file;
- a plan class (``wsl`` unless the admin names another) whose ``plan_class_spec.xml`` entry
  carries ``<wsl/>``, so the scheduler sends it only to hosts with a usable WSL distro.
"""

from __future__ import annotations

import os
import stat
import struct
from pathlib import Path
from typing import TYPE_CHECKING

from boincvm.appversion.model import FROZEN_PLATFORM, RuntimeKind, WrapperKind
from boincvm.errors import InputError
from boincvm.findings import Finding, error, warning
from boincvm.hypervisor.base import BackendKind
from boincvm.image.elf import static_x86_64_problem
from boincvm.paths import open_regular

if TYPE_CHECKING:
    from collections.abc import Callable, Mapping, Sequence

    from boincvm.appversion.model import AppVersionFile, AppVersionRequest

#: The only platform a WSL app version is for (wsl_wrapper.exe is a Windows x86-64 program).
PLATFORM = "windows_x86_64"
#: The plan class package-image gives a WSL app version unless the admin names another.
PLAN_CLASS = "wsl"
#: The open name wsl_wrapper runs (``./main``; its ``--main_prog`` default).
MAIN_OPEN_NAME = "main"
#: The end of the main program's physical name: Windows runs programs by their ``.exe``.
EXE_TAIL = "wsl_wrapper.exe"

#: How much of a file the header checks read: the PE header sits within the first few
#: hundred bytes, an ELF file's program headers within the first few KiB.
_HEAD = 1 << 16
_PE_MACHINE_X86_64 = 0x8664
_PE_MACHINES = {0x014C: "i386", 0x01C4: "ARM", 0xAA64: "ARM64", 0x0200: "Itanium"}
_PE_EXECUTABLE_IMAGE = 0x0002
_PE_DLL = 0x2000
_PE32_PLUS = 0x020B


def read_head(path: Path, what: str) -> bytes:
    """The first bytes of a regular file (no link followed, no FIFO waited on).

    Raises:
        InputError, PathEscapeError: not a regular file, or unreadable.
    """
    with open_regular(path, what) as f:
        return f.read(_HEAD)


def pe_problem(head: bytes) -> str | None:
    """What keeps ``head`` (a file's first bytes) from being a Windows x86-64 program; None when
    it is one: ``MZ``, a PE header for machine 0x8664, an executable image, not a DLL, PE32+."""
    if len(head) < 0x40 or head[:2] != b"MZ":
        return "it does not start with MZ, so it is no Windows program"
    pe = struct.unpack_from("<I", head, 0x3C)[0]
    if pe + 26 > len(head) or head[pe : pe + 4] != b"PE\0\0":
        return "it starts with MZ but has no PE header"
    machine, _, _, _, _, optional_size, characteristics = struct.unpack_from("<HHIIIHH", head, pe + 4)
    if machine != _PE_MACHINE_X86_64:
        name = _PE_MACHINES.get(machine, "another machine")
        return f"it is a Windows program for {name} (machine 0x{machine:04x}), not x86-64 (0x8664)"
    if characteristics & _PE_DLL:
        return "it is a DLL, not a program"
    if not characteristics & _PE_EXECUTABLE_IMAGE:
        return "its PE header does not mark it an executable image"
    if optional_size < 2 or struct.unpack_from("<H", head, pe + 24)[0] != _PE32_PLUS:
        return "its PE header is not a 64-bit (PE32+) one"
    return None


def default_target(platform: str | None, plan_class: str | None, *, wsl: bool) -> tuple[str, str | None]:
    """The platform and plan class of an app version, package-image's defaults filled in:
    the frozen wrapper's platform and no plan class, or for a WSL app version (``wsl``)
    :data:`PLATFORM` and :data:`PLAN_CLASS`."""
    if wsl:
        return platform or PLATFORM, plan_class or PLAN_CLASS
    return platform or FROZEN_PLATFORM, plan_class


def check_wsl_request(req: AppVersionRequest, backend: BackendKind) -> None:
    """Refuse a WSL app version that cannot run: another platform, a wrapper that needs Python,
    the host's QEMU, a VMware VM, or a main program that is not a Windows x86-64 program.

    Raises:
        InputError: one of those, said in one sentence with a hint.
        PathEscapeError: the main program is a symbolic link.
    """
    if req.wsl_wrapper is None:
        return
    if req.platform != PLATFORM:
        raise InputError(
            f"a WSL app version is for {PLATFORM}, not {req.platform}",
            hint=f"drop --platform: --wsl-wrapper makes {PLATFORM} the default",
        )
    if req.wrapper is WrapperKind.PYZ:
        raise InputError(
            "--wrapper pyz cannot run through WSL: BOINC's distro has no Python",
            hint="drop --wrapper (the frozen wrapper needs nothing in the distro)",
        )
    if backend is BackendKind.VMWARE:
        raise InputError(
            "a VMware VM cannot run through WSL",
            hint="give a QEMU image (qcow2, raw, a build-image directory)",
        )
    if req.runtime is RuntimeKind.SYSTEM:
        raise InputError(
            "--runtime system cannot run through WSL: BOINC's distro has no QEMU",
            hint="drop --runtime (the app version then brings its own QEMU)",
        )
    problem = pe_problem(read_head(req.wsl_wrapper, f"--wsl-wrapper {req.wsl_wrapper}"))
    if problem:
        raise InputError(
            f"--wsl-wrapper {req.wsl_wrapper} is not a Windows x86-64 program: {problem}",
            hint="give BOINC's wsl_wrapper.exe for windows_x86_64 (from samples/wsl_wrapper)",
        )


def is_wsl_app_version(files: Sequence[AppVersionFile], summary: Mapping[str, object]) -> bool:
    """Whether an app version is (meant to be) a WSL one: package-image recorded it, or a file
    has the open name ``main``, or the main program is a ``.exe``."""
    return (
        summary.get("wsl") is True
        or any(f.logical_name == MAIN_OPEN_NAME for f in files)
        or any(f.main_program and f.physical_name.lower().endswith(".exe") for f in files)
    )


def check_wsl_app_version(
    directory: Path, files: Sequence[AppVersionFile], summary: Mapping[str, object], plan_class: str | None
) -> list[Finding]:
    """Findings for a WSL app version: its main program a Windows x86-64 program, exactly one
    ``main`` copied into the slot and a static x86-64 ELF, the platform, a plan class."""
    out: list[Finding] = []
    mains = [f for f in files if f.main_program]
    if len(mains) == 1:
        out += _check_program(directory, mains[0], pe_problem, "a Windows x86-64 program (wsl_wrapper.exe)")
    out += _check_linux_main(directory, files)
    platform = summary.get("platform")
    if isinstance(platform, str) and platform != PLATFORM:
        out.append(
            error(
                "platform",
                f"a WSL app version is for {PLATFORM}, not {platform}",
                hint=f"package it again with --wsl-wrapper (platform {PLATFORM})",
            )
        )
    if plan_class is None:
        out.append(
            warning(
                "plan_class",
                "a WSL app version without a plan class goes to Windows hosts without WSL too",
                hint=f"package with --plan-class (default {PLAN_CLASS}): its entry carries <wsl/>",
            )
        )
    return out


def _check_linux_main(directory: Path, files: Sequence[AppVersionFile]) -> list[Finding]:
    """Exactly one file with the open name ``main``, copied into the slot, a static x86-64 ELF."""
    named = [f for f in files if f.logical_name == MAIN_OPEN_NAME]
    if len(named) != 1:
        return [
            error(
                f"version.file[{MAIN_OPEN_NAME}]",
                f"{len(named)} files have the open name {MAIN_OPEN_NAME!r}; wsl_wrapper runs ./main, "
                "so exactly one must",
                hint="give the frozen wrapper the logical name main (package-image --wsl-wrapper does)",
            )
        ]
    (main,) = named
    out: list[Finding] = []
    if not main.copy_file:
        out.append(
            error(
                f"version.file.{main.physical_name}",
                "main has no <copy_file/>: the slot gets a BOINC link file, which WSL cannot run",
                hint="add <copy_file/> to its <file> in version.xml",
            )
        )
    if main.main_program:
        out.append(
            error(
                f"version.file.{main.physical_name}",
                "main is the main program; wsl_wrapper.exe must be, and it runs main",
            )
        )
    return out + _check_program(directory, main, static_x86_64_problem, "a static x86-64 Linux executable")


def _check_program(
    directory: Path, f: AppVersionFile, problem_of: Callable[[bytes], str | None], kind: str
) -> list[Finding]:
    """One program of the app version: its header says ``kind``, and it is executable (the
    client's ``executable`` flag comes from the file's mode, as update_versions reads it)."""
    path = directory / f.physical_name
    if not path.is_file():
        return []  # reported with the files
    place = f"version.file.{f.physical_name}"
    try:
        problem = problem_of(read_head(path, f"app-version file {f.physical_name}"))
    except InputError as exc:
        return [error(place, exc.message, exc.hint)]
    out: list[Finding] = []
    if problem:
        out.append(error(place, f"is not {kind}: {problem}"))
    if not os.lstat(path).st_mode & stat.S_IXUSR:
        out.append(
            error(
                place,
                "is not executable: update_versions would not mark it <executable/>",
                hint=f"chmod +x {f.physical_name}",
            )
        )
    return out
