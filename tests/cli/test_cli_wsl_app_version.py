"""``package-image --wsl-wrapper``: the Windows app version that runs the frozen wrapper through
WSL; ``validate`` on it. The .exe can never run here: a minimal PE header stands in for it."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from boincvm.appversion.model import parse_version_xml
from boincvm.cli import cli
from boincvm.signing import parse_public_key, read_key_text, verify_file
from boincvm.xmlio import parse_xml, text_of
from tests.cli.conftest import RunFn
from tests.unit.test_wsl_app_version import pe_program


def _invoke(args: list[str]) -> str:
    result = CliRunner().invoke(cli, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result.stdout


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A directory with base.img, wsl_wrapper.exe and keys/ (a code-signing key pair)."""
    root = tmp_path_factory.mktemp("wsl-in")
    subprocess.run(
        ["qemu-img", "create", "-f", "raw", str(root / "base.img"), "16M"], check=True, capture_output=True
    )
    (root / "wsl_wrapper.exe").write_bytes(pe_program())
    _invoke(["keys", "create", str(root / "keys")])
    return root


@pytest.fixture(scope="module")
def signed_av(inputs: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, object]]:
    """A signed WSL app version (made once; tests that change it work on a copy) and its summary."""
    out = tmp_path_factory.mktemp("wsl-av") / "av"
    stdout = _invoke(
        [
            "-q",
            "package-image",
            str(inputs / "base.img"),
            "--app",
            "hello",
            "--wsl-wrapper",
            str(inputs / "wsl_wrapper.exe"),
            "--sign-key",
            str(inputs / "keys/code_sign_private"),
            "-o",
            str(out),
            "--json",
        ]
    )
    summary: dict[str, object] = json.loads(stdout)
    return out, summary


def _validate(run: RunFn, path: Path) -> tuple[int, list[dict[str, str]]]:
    code, out, err = run(["validate", "--json", str(path)])
    assert "Traceback" not in err
    findings: list[dict[str, str]] = json.loads(out)[0]["findings"]
    return code, findings


def _errors(findings: list[dict[str, str]]) -> list[str]:
    return [f"{f['place']}: {f['message']}" for f in findings if f["severity"] == "error"]


def _copy(av: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "av"
    shutil.copytree(av, copy)
    return copy


def test_the_app_version_runs_wsl_wrapper_which_runs_main(signed_av: tuple[Path, dict[str, object]]) -> None:
    av, summary = signed_av
    vx, findings = parse_version_xml((av / "version.xml").read_bytes())
    assert not findings
    (exe,) = [f for f in vx.files if f.main_program]
    assert exe.physical_name.startswith("hello_1.00_") and exe.physical_name.endswith("_wsl_wrapper.exe")
    assert exe.logical_name is None and not exe.copy_file
    assert (av / exe.physical_name).read_bytes() == pe_program()
    # update_versions marks <executable/> from the mode; the client runs no main program without it.
    assert (av / exe.physical_name).stat().st_mode & 0o100
    (main,) = [f for f in vx.files if f.logical_name == "main"]
    assert main.copy_file and not main.main_program
    assert main.physical_name.endswith("_boincvm-wrapper")
    assert (av / main.physical_name).read_bytes()[:4] == b"\x7fELF"
    assert (av / main.physical_name).stat().st_mode & 0o100
    # The rest as a Linux app version has it.
    names = {f.logical_name for f in vx.files}
    assert names == {None, "main", "vm_disk.qcow2", "qemu_runtime.tar.xz", "vm_job_defaults.xml"}
    assert "<copy_file/>" in (av / "version.xml").read_text()
    assert summary["platform"] == "windows_x86_64" and summary["plan_class"] == "wsl"
    assert summary["wsl"] is True
    recorded = json.loads((av / ".boincvm-app-version.json").read_text())
    assert recorded["wsl"] is True
    assert [f["physical_name"] for f in recorded["files"] if f["copy_file"]] == [main.physical_name]


def test_the_plan_class_entry_asks_for_wsl(signed_av: tuple[Path, dict[str, object]]) -> None:
    av, _ = signed_av
    root = parse_xml((av / ".plan_class_spec.xml").read_bytes(), what="test")
    (entry,) = root
    assert [text_of(c) for c in entry if c.tag == "name"] == ["wsl"]
    assert [c.tag for c in entry if c.tag == "wsl"] == ["wsl"]


def test_every_file_is_signed(signed_av: tuple[Path, dict[str, object]], inputs: Path) -> None:
    av, _ = signed_av
    vx, _ = parse_version_xml((av / "version.xml").read_bytes())
    key = parse_public_key(read_key_text(inputs / "keys/code_sign_public"))
    assert len(vx.files) == 5
    for f in vx.files:
        sig = (av / f"{f.physical_name}.sig").read_text(encoding="ascii")
        assert verify_file(av / f.physical_name, sig, key), f.physical_name


def test_validate_passes_it(run: RunFn, signed_av: tuple[Path, dict[str, object]]) -> None:
    code, findings = _validate(run, signed_av[0])
    assert code == 0 and not _errors(findings), findings


def _edit_version_xml(av: Path, old: str, new: str) -> None:
    text = (av / "version.xml").read_text()
    assert old in text
    (av / "version.xml").write_text(text.replace(old, new))


def test_validate_finds_a_main_that_is_not_copied(
    run: RunFn, signed_av: tuple[Path, dict[str, object]], tmp_path: Path
) -> None:
    av = _copy(signed_av[0], tmp_path)
    _edit_version_xml(av, "<copy_file/>", "")
    code, findings = _validate(run, av)
    assert code == 4 and any("no <copy_file/>" in e for e in _errors(findings)), findings


def test_validate_finds_no_main(
    run: RunFn, signed_av: tuple[Path, dict[str, object]], tmp_path: Path
) -> None:
    av = _copy(signed_av[0], tmp_path)
    _edit_version_xml(av, "<logical_name>main</logical_name>", "<logical_name>wrapper</logical_name>")
    code, findings = _validate(run, av)
    assert code == 4 and any("0 files have the open name 'main'" in e for e in _errors(findings)), findings


def test_validate_finds_a_main_program_that_is_no_windows_program(
    run: RunFn, signed_av: tuple[Path, dict[str, object]], tmp_path: Path
) -> None:
    av = _copy(signed_av[0], tmp_path)
    (exe,) = av.glob("*_wsl_wrapper.exe")
    exe.write_bytes(pe_program(machine=0x014C, magic=0x010B))
    code, findings = _validate(run, av)
    assert code == 4
    assert any("not a Windows x86-64 program" in e and "i386" in e for e in _errors(findings)), findings
    exe.chmod(0o644)
    code, findings = _validate(run, av)
    assert any("is not executable" in e for e in _errors(findings)), findings


def test_validate_finds_a_dynamically_linked_main(
    run: RunFn, signed_av: tuple[Path, dict[str, object]], tmp_path: Path
) -> None:
    av = _copy(signed_av[0], tmp_path)
    (main,) = av.glob("*_boincvm-wrapper")
    shutil.copyfile(Path(sys.executable).resolve(), main)  # a real program, but it needs a loader
    code, findings = _validate(run, av)
    assert code == 4 and any("dynamically linked" in e for e in _errors(findings)), findings


def test_validate_finds_an_entry_without_wsl(
    run: RunFn, signed_av: tuple[Path, dict[str, object]], tmp_path: Path
) -> None:
    av = _copy(signed_av[0], tmp_path)
    entry = av / ".plan_class_spec.xml"
    entry.write_text(entry.read_text().replace("<wsl/>", ""))
    code, findings = _validate(run, av)
    assert code == 4 and any(".wsl:" in e and "does not ask for <wsl/>" in e for e in _errors(findings))


def test_another_plan_class_keeps_wsl_and_the_directory_is_named_after_it(
    run: RunFn, inputs: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    args = ["package-image", str(inputs / "base.img"), "--app", "hello"]
    exe = str(inputs / "wsl_wrapper.exe")
    code, out, err = run([*args, "--wsl-wrapper", exe, "--plan-class", "wsl_kvm", "--require-kvm"])
    assert code == 0, err
    av = tmp_path / "hello_1.00_windows_x86_64__wsl_kvm"
    assert out.strip() == av.name
    entry = (av / ".plan_class_spec.xml").read_text()
    assert "<name>wsl_kvm</name>" in entry and "<wsl/>" in entry and "<cpu_feature>vmx</cpu_feature>" in entry
    code, findings = _validate(run, av)
    assert code == 0 and not _errors(findings), findings
    # The default name: PLATFORM__PLAN_CLASS as ever.
    code, out, err = run([*args, "--wsl-wrapper", exe])
    assert code == 0 and out.strip() == "hello_1.00_windows_x86_64__wsl", err


@pytest.mark.parametrize(
    ("extra", "says"),
    [
        (["--platform", "x86_64-pc-linux-gnu"], "a WSL app version is for windows_x86_64"),
        (["--wrapper", "pyz"], "no Python"),
        (["--runtime", "system"], "no QEMU"),
    ],
)
def test_refusals_of_options(run: RunFn, inputs: Path, tmp_path: Path, extra: list[str], says: str) -> None:
    out = tmp_path / "av"
    args = ["package-image", str(inputs / "base.img"), "--app", "a", "-o", str(out)]
    code, _, err = run([*args, "--wsl-wrapper", str(inputs / "wsl_wrapper.exe"), *extra])
    assert code == 3 and says in err and "Traceback" not in err, err
    assert not out.exists()


@pytest.mark.parametrize(
    ("data", "says"),
    [
        (b"#!/bin/sh\n" + bytes(100), "does not start with MZ"),
        (pe_program(machine=0x014C, magic=0x010B), "i386"),
    ],
)
def test_refusals_of_the_exe(run: RunFn, inputs: Path, tmp_path: Path, data: bytes, says: str) -> None:
    exe = tmp_path / "wsl_wrapper.exe"
    exe.write_bytes(data)
    out = tmp_path / "av"
    args = ["package-image", str(inputs / "base.img"), "--app", "a", "-o", str(out)]
    code, _, err = run([*args, "--wsl-wrapper", str(exe)])
    assert code == 3 and "is not a Windows x86-64 program" in err and says in err, err
    assert "wsl_wrapper.exe for windows_x86_64" in err  # the hint
    assert not out.exists()


def test_windows_without_wsl_wrapper_is_told_of_it(run: RunFn, inputs: Path, tmp_path: Path) -> None:
    args = ["package-image", str(inputs / "base.img"), "--app", "a", "-o", str(tmp_path / "av")]
    code, _, err = run([*args, "--platform", "windows_x86_64"])
    assert code == 3 and "--wsl-wrapper" in err and "--wrapper pyz" in err, err


def test_run_local_refuses_it_with_a_hint(
    run: RunFn, signed_av: tuple[Path, dict[str, object]], tmp_path: Path
) -> None:
    wu = tmp_path / "wu"
    _invoke(["-q", "make-workunit", "--app", "hello", "--application", "/bin/true", "-o", str(wu)])
    code, _, err = run(["run-local", str(wu), "--app-version", str(signed_av[0])])
    assert code == 3, err
    assert "for Windows hosts" in err and "without --wsl-wrapper" in err, err
    assert "Traceback" not in err
