"""vmrun output parsing, error classification from the messages vmrun prints, and argument order."""

from __future__ import annotations

from pathlib import Path

import pytest

from boincvm.errors import (
    BoincvmError,
    GuestToolsMissing,
    HypervisorUnavailable,
    UnsupportedOperation,
)
from boincvm.hypervisor.vmware import vmrun as vr

# (vmrun's stdout, the error class it must become); texts as vmrun 1.17 prints them (reference §1.4).
MESSAGES: list[tuple[str, type[BoincvmError]]] = [
    ("Error: The virtual machine is not powered on: /vm/x.vmx\n", vr.VmNotRunning),
    ("Error: The VMware Tools are not running in the virtual machine: /vm/x.vmx\n", GuestToolsMissing),
    ("Error: Anonymous guest operations are not allowed on this virtual machine\n", GuestToolsMissing),
    ("Error: Invalid user name or password for the guest OS\n", vr.GuestCredentialsRejected),
    (
        "Error: The specified guest user must be logged in interactively to perform this operation\n",
        vr.GuestCredentialsRejected,
    ),
    ("Error: A file was not found\n", vr.GuestFileMissing),
    ("Error: Cannot open VM: /vm/x.vmx, The virtual machine cannot be found\n", vr.VmrunError),
    ("Error: A password is required for this operation\n", vr.VmrunError),
    ("Error: The operation is not supported for the specified parameters\n", UnsupportedOperation),
    ("Error: Invalid snapshot name 'ck-3'\n", vr.SnapshotNotFound),
    ("Error: Unable to connect to host.\n", vr.WrongHostType),
    ("Error: vmrun was unable to start. Please make sure that vmrun is installed correctly\n", vr.VmrunError),
    ("Guest program exited with non-zero exit code: 7\n", vr.GuestExit),
]


@pytest.mark.parametrize(("output", "cls"), MESSAGES)
def test_error_classification(output: str, cls: type[BoincvmError]) -> None:
    err = vr.error_for("someCommand", output, 255)
    assert type(err) is cls
    if cls is not vr.GuestExit:
        assert err.message.startswith("vmware: vmrun someCommand: ")
        assert "Error:" not in err.message


def test_guest_exit_code_is_parsed() -> None:
    err = vr.error_for("runProgramInGuest", "Guest program exited with non-zero exit code: -3\n", 255)
    assert isinstance(err, vr.GuestExit) and err.exit_code == -3


def test_encrypted_and_dialog_hints() -> None:
    assert "vm_password_file" in (
        vr.error_for("start", "Error: A password is required for this operation", 255).hint or ""
    )
    err = vr.error_for("start", "Error: Cannot power on: a dialog requires user interaction", 255)
    assert "msg.autoAnswer" in (err.hint or "")


def test_unknown_error_keeps_the_text() -> None:
    err = vr.error_for("snapshot", "Error: Something new happened\n", 255)
    assert isinstance(err, vr.VmrunError) and err.message.endswith("Something new happened")
    assert vr.classify("no error line at all")[1] == "no error line at all"


def test_parsers() -> None:
    assert vr.parse_list("Total running VMs: 2\n/vm/a.vmx\n/vm/b c/b.vmx\n") == ["/vm/a.vmx", "/vm/b c/b.vmx"]
    assert vr.parse_list("Total running VMs: 0\n") == []
    assert vr.parse_snapshots("Total snapshots: 2\nboincvm-base\nck 1\n") == ["boincvm-base", "ck 1"]
    procs = vr.parse_processes(
        "Process list: 2\npid=1, owner=root, cmd=/sbin/init splash\n"
        "pid=812, owner=boinc, cmd=/bin/sh -c a, b\n"
    )
    assert procs == [
        vr.GuestProcEntry(1, "root", "/sbin/init splash"),
        vr.GuestProcEntry(812, "boinc", "/bin/sh -c a, b"),
    ]
    assert vr.parse_version("vmrun version 1.17.0 build-14665864\n\nUsage: ...") == "1.17.0"


def test_flags_come_before_the_command_and_passwords_are_secrets(tmp_path: Path) -> None:
    run = vr.Vmrun(tmp_path / "vmrun", vr.HostType.FUSION, vm_password="vp")
    login = vr.GuestLogin("boinc", "gp")
    argv = run.argv("CopyFileFromGuestToHost", Path("/vm/x.vmx"), ["/g", "/h"], login)
    assert argv[1:] == [
        "-T",
        "fusion",
        "-vp",
        "vp",
        "-gu",
        "boinc",
        "-gp",
        "gp",
        "CopyFileFromGuestToHost",
        "/vm/x.vmx",
        "/g",
        "/h",
    ]
    assert run.secrets(login) == ["vp", "gp"]
    assert "gp" not in repr(login) and "vp" not in repr(run)
    assert vr.redact("x gp y", ["gp"]) == "x *** y"


def test_missing_vmrun_is_unavailable(tmp_path: Path) -> None:
    with pytest.raises(HypervisorUnavailable, match="vmrun not found"):
        vr.Vmrun(tmp_path / "nope").call("list")


def test_find_vmrun_explicit_and_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    exe = tmp_path / "vmrun"
    exe.write_text("")
    assert vr.find_vmrun(str(exe)) == exe
    assert vr.find_vmrun(str(tmp_path / "missing")) is None
    monkeypatch.setenv("BOINCVM_VMRUN", str(exe))
    assert vr.find_vmrun() == exe
