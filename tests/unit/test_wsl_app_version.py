"""The header checks of a WSL app version's two programs, and its plan class entry's ``<wsl/>``."""

from __future__ import annotations

import struct
import sys
from pathlib import Path

import pytest

from boincvm.appversion.plan_class import PlanClassSpec, check_plan_class_spec
from boincvm.appversion.wsl import PLAN_CLASS, PLATFORM, default_target, pe_problem
from boincvm.findings import has_errors
from boincvm.image.elf import static_x86_64_problem
from boincvm.job import VmJob


def pe_program(*, machine: int = 0x8664, characteristics: int = 0x0022, magic: int = 0x020B) -> bytes:
    """A minimal PE file: a DOS header pointing at a COFF header and the start of an optional
    header (nothing to run, but every field the checks read)."""
    dos = bytearray(0x40)
    dos[:2] = b"MZ"
    struct.pack_into("<I", dos, 0x3C, len(dos))
    optional_size = 240 if magic == 0x020B else 224
    coff = struct.pack("<4sHHIIIHH", b"PE\0\0", machine, 0, 0, 0, 0, optional_size, characteristics)
    return bytes(dos) + coff + struct.pack("<H", magic) + bytes(optional_size - 2)


def elf_program(*, machine: int = 62, e_type: int = 2, interp: bool = False) -> bytes:
    """A minimal 64-bit ELF header with one program header: PT_LOAD, or PT_INTERP."""
    header = bytearray(64)
    header[:6] = b"\x7fELF\x02\x01"
    struct.pack_into("<HHI", header, 0x10, e_type, machine, 1)
    struct.pack_into("<QQ", header, 0x20, 64, 0)  # program headers right after, no sections
    struct.pack_into("<HHHHHH", header, 0x34, 64, 56, 1, 64, 0, 0)
    phdr = struct.pack("<IIQQQQQQ", 3 if interp else 1, 5, 0, 0, 0, 120, 120, 8)
    return bytes(header) + phdr


def test_a_windows_x86_64_program_passes() -> None:
    assert pe_problem(pe_program()) is None


@pytest.mark.parametrize(
    ("data", "says"),
    [
        (b"#!/bin/sh\necho hello\n" + bytes(64), "does not start with MZ"),
        (b"MZ" + bytes(62), "no PE header"),
        (pe_program(machine=0x014C, magic=0x010B), "i386 (machine 0x014c), not x86-64"),
        (pe_program(machine=0xAA64), "ARM64"),
        (pe_program(characteristics=0x2022), "DLL"),
        (pe_program(characteristics=0x0020), "executable image"),
        (pe_program(magic=0x010B), "PE32+"),
        (pe_program()[:0x50], "no PE header"),
    ],
)
def test_other_files_are_no_windows_x86_64_program(data: bytes, says: str) -> None:
    problem = pe_problem(data)
    assert problem is not None and says in problem


def test_static_elf_check() -> None:
    assert static_x86_64_problem(elf_program()) is None
    assert static_x86_64_problem(elf_program(e_type=3)) is None  # static-pie
    for data, says in (
        (elf_program(interp=True), "dynamically linked"),
        (elf_program(machine=183), "not x86-64"),
        (elf_program(e_type=1), "not an executable"),
        (elf_program()[:80], "cut short"),
        (pe_program(), "not a 64-bit little-endian ELF"),
    ):
        problem = static_x86_64_problem(data)
        assert problem is not None and says in problem, (says, problem)
    # A real dynamically linked program: this interpreter.
    problem = static_x86_64_problem(Path(sys.executable).resolve().read_bytes()[: 1 << 16])
    assert problem is not None and "dynamically linked" in problem


def test_defaults_of_a_wsl_app_version() -> None:
    assert default_target(None, None, wsl=True) == (PLATFORM, PLAN_CLASS) == ("windows_x86_64", "wsl")
    assert default_target(None, "wsl_kvm", wsl=True) == ("windows_x86_64", "wsl_kvm")
    assert default_target(None, None, wsl=False) == ("x86_64-pc-linux-gnu", None)


def _entry(inner: str) -> bytes:
    return f"<plan_classes><plan_class><name>wsl</name>{inner}</plan_class></plan_classes>".encode()


@pytest.mark.parametrize(
    ("inner", "wsl", "ok"),
    [
        ("<wsl/>", True, True),
        ("<wsl>1</wsl>", True, True),
        ("", True, False),
        ("<wsl>0</wsl>", True, False),
        ("<wsl>yes</wsl>", True, False),
        ("", False, True),
        ("<wsl/>", False, False),
        ("<wsl>0</wsl>", False, True),
    ],
)
def test_plan_class_entry_asks_for_wsl_exactly_when_it_runs_through_it(
    inner: str, wsl: bool, ok: bool
) -> None:
    findings = check_plan_class_spec(_entry(inner), plan_class="wsl", job=None, wsl=wsl)
    assert has_errors(findings) is not ok, findings
    assert all(f.place.endswith(".wsl") for f in findings)


def test_the_entry_package_image_writes_for_wsl() -> None:
    spec = PlanClassSpec.for_job("wsl", VmJob(vm_image="vm_disk.qcow2"), wsl=True)
    text = spec.render()
    assert "<wsl/>" in text
    assert check_plan_class_spec(text.encode(), plan_class="wsl", job=None, wsl=True) == []
    assert "<wsl" not in PlanClassSpec.for_job("vm", VmJob(vm_image="vm_disk.qcow2")).render()
