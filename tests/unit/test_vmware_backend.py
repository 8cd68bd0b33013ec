"""The VMware backend against the stand-in vmrun (tests/fakes/vmrun.py), which enforces vmrun's grammar."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import sys
import time
import types
from collections.abc import Iterator
from pathlib import Path

import pytest

from boincvm import proc
from boincvm.errors import GuestToolsMissing, InputError, OutputError, UnsupportedOperation
from boincvm.hypervisor import BackendKind, VmSpec, backend_class
from boincvm.hypervisor.vmware import guestops as vmware_guestops
from boincvm.hypervisor.vmware.backend import VmwareBackend
from boincvm.hypervisor.vmware.config import AGENT_SCRIPT
from boincvm.hypervisor.vmware.vmrun import (
    GuestCredentialsRejected,
    HostType,
    SnapshotNotFound,
    WrongHostType,
)
from boincvm.hypervisor.vmware.vmx import VmxFile

FAKE = Path(__file__).resolve().parents[1] / "fakes" / "vmrun.py"
PASSWORD = "pw-Zq8#x y"  # a space and a shell metacharacter, to catch quoting mistakes

BASE_VMX = """\
.encoding = "UTF-8"
config.version = "8"
virtualHW.version = "19"
displayName = "base"
guestOS = "debian11-64"
memsize = "1024"
numvcpus = "1"
cpuid.coresPerSocket = "4"
scsi0.present = "TRUE"
scsi0:0.present = "TRUE"
scsi0:0.fileName = "base.vmdk"
ethernet0.present = "TRUE"
ethernet0.connectionType = "bridged"
ethernet1.present = "TRUE"
custom.boinc.marker = "kept"
"""


def install_fake(bindir: Path, state: Path, mp: pytest.MonkeyPatch, tools_delay: float = 0.05) -> None:
    """Put the stand-in vmrun on PATH (a shim runs it with ``-S``: Python starts twice as fast)."""
    bindir.mkdir(exist_ok=True)
    shim = bindir / "vmrun"
    shim.write_text(f'#!/bin/sh\nexec "{sys.executable}" -S "{FAKE}" "$@"\n')
    shim.chmod(0o755)
    mp.setenv("PATH", f"{bindir}{os.pathsep}{os.environ['PATH']}")
    mp.delenv("BOINCVM_VMRUN", raising=False)
    state.mkdir(exist_ok=True)
    config = {"guest_user": "boinc", "guest_password": PASSWORD, "tools_delay": tools_delay}
    (state / "config.json").write_text(json.dumps(config))
    mp.setenv("FAKE_VMRUN_STATE", str(state))


def stop_everything(state: Path) -> None:
    """Power off whatever a test left running in the stand-in (its guest processes are real)."""
    for f in state.glob("vms/*/state.json"):
        vm = json.loads(f.read_text())
        if vm["power"] != "off" and Path(vm["vmx"]).exists():
            proc.run(["vmrun", "stop", vm["vmx"], "hard"], timeout=30, check=False)


@pytest.fixture
def fake_vmrun(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A fresh stand-in vmrun on PATH; yields its state directory."""
    install_fake(tmp_path / "bin", tmp_path / "state", monkeypatch)
    yield tmp_path / "state"
    stop_everything(tmp_path / "state")


@pytest.fixture
def base_vmx(tmp_path: Path) -> Path:
    d = tmp_path / "base"
    d.mkdir()
    (d / "base.vmx").write_text(BASE_VMX)
    return d / "base.vmx"


def make_spec(tmp_path: Path, base_vmx: Path, **options: str) -> VmSpec:
    pw = tmp_path / "guest-password"
    pw.write_text(PASSWORD + "\n")
    workdir = tmp_path / "slot"
    workdir.mkdir(exist_ok=True)
    opts = {"guest_user": "boinc", "guest_password_file": str(pw), "pyvix": "off", **options}
    return VmSpec(
        name="task 1",
        workdir=workdir,
        image=base_vmx,
        memory_mb=254,
        ncpus=2,
        boot_timeout=10,
        options={k: v for k, v in opts.items() if v},
    )


@pytest.fixture(scope="module")
def vm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[VmwareBackend]:
    """One running VM shared by the tests that only run programs, copy files and take snapshots."""
    tmp = tmp_path_factory.mktemp("vmware")
    with pytest.MonkeyPatch.context() as mp:
        install_fake(tmp / "bin", tmp / "state", mp)
        base = tmp / "base"
        base.mkdir()
        (base / "base.vmx").write_text(BASE_VMX)
        with VmwareBackend(make_spec(tmp, base / "base.vmx")) as backend:
            backend.power_on()
            backend.wait_for_tools()
            yield backend
        stop_everything(tmp / "state")


def calls(state: Path) -> list[list[str]]:
    return [json.loads(line)["argv"] for line in (state / "calls.jsonl").read_text().splitlines()]


def test_registered_and_probe_finds_vmrun_on_path(fake_vmrun: Path) -> None:
    assert backend_class(BackendKind.VMWARE) is VmwareBackend
    avail = VmwareBackend.probe()
    assert avail.ok, avail
    assert "1.17.0" in avail.reason


def test_probe_says_why_when_vmrun_is_missing(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.delenv("BOINCVM_VMRUN", raising=False)
    avail = VmwareBackend.probe()
    assert not avail.ok and avail.reason == "vmrun not found"


def test_power_cycle_clone_and_vmx_settings(tmp_path: Path, fake_vmrun: Path, base_vmx: Path) -> None:
    backend = VmwareBackend(make_spec(tmp_path, base_vmx))
    backend.power_off()  # idempotent before anything exists
    backend.power_on()
    assert backend.is_running()
    assert backend.vmx.parent == tmp_path / "slot" / "vm"
    vmx = VmxFile.load(backend.vmx)
    assert vmx.get("memsize") == "256"  # rounded up to a multiple of 4
    assert vmx.get("numvcpus") == "2"
    assert vmx.get("cpuid.coresPerSocket") is None  # 4 does not divide 2
    assert vmx.flag("ethernet0.present") is False and vmx.flag("ethernet1.startConnected") is False
    assert vmx.flag("msg.autoAnswer") is True
    assert vmx.get("custom.boinc.marker") == "kept"
    assert base_vmx.read_text() == BASE_VMX  # the base .vmx is never edited
    backend.wait_for_tools()
    backend.power_off()
    assert not backend.is_running()
    backend.power_off()
    argvs = calls(fake_vmrun)
    clone = next(a for a in argvs if "clone" in a)
    assert clone[clone.index("clone") + 3 :] == ["linked", "-snapshot=boincvm-base", "-cloneName=task 1"]
    assert any(a[-2:] == ["soft"] or a[-1] == "soft" for a in argvs)


def test_network_on_when_enabled(tmp_path: Path, fake_vmrun: Path, base_vmx: Path) -> None:
    spec = make_spec(tmp_path, base_vmx)
    spec = VmSpec(**{**spec.__dict__, "enable_network": True})
    with VmwareBackend(spec) as backend:
        backend.power_on()
        vmx = VmxFile.load(backend.vmx)
    assert vmx.flag("ethernet0.present") is True and vmx.flag("ethernet0.startConnected") is True
    assert vmx.get("ethernet0.connectionType") == "bridged"  # the image's choice is kept
    assert vmx.flag("ethernet1.present") is False


def test_run_program_exit_code_and_output(vm: VmwareBackend) -> None:
    status = vm.run_program(["/bin/sh", "-c", "echo out; echo err >&2; exit 3"], timeout=20)
    assert not status.running and status.exit_code == 3 and not status.succeeded
    assert status.stdout_tail == b"out\n" and status.stderr_tail == b"err\n"
    ok = vm.run_program(["/bin/true"], timeout=20)
    assert ok.succeeded
    killed = vm.run_program(["/bin/sh", "-c", "kill -9 $$"], timeout=20)
    assert killed.signal == 9 and killed.exit_code is None and not killed.succeeded


def test_arguments_env_and_cwd_survive_the_guest_shell(vm: VmwareBackend) -> None:
    status = vm.run_program(
        ["/bin/sh", "-c", 'printf "%s|%s|%s" "$X" "$(pwd)" "$1"', "sh", "it's $HOME; `x`"],
        env={"X": "a b'c\"d"},
        cwd="/var/tmp",
        timeout=20,
    )
    assert status.exit_code == 0, status
    assert status.stdout_tail == b"a b'c\"d|/var/tmp|it's $HOME; `x`"


def test_poll_while_running_then_done(vm: VmwareBackend) -> None:
    proc = vm.start_program(["/bin/sh", "-c", "sleep 0.6; echo done"])
    assert vm.poll_program(proc).running
    status = vm.run_program(["/bin/true"], timeout=10)
    assert status.succeeded
    final = vm.poll_program(proc)
    while final.running:
        final = vm.poll_program(proc)
    assert final.exit_code == 0 and final.stdout_tail == b"done\n"


def test_file_round_trip_with_an_awkward_name(vm: VmwareBackend, tmp_path: Path) -> None:
    data = os.urandom(1024 * 1024 + 13)
    src = tmp_path / "in.bin"
    src.write_bytes(data)
    guest = "/tmp/odd name 'ä' $x.bin"
    vm.copy_to_guest(src, guest)
    st = vm.run_program(["sha256sum", guest], timeout=30)  # PATH lookup, as the QEMU contract does
    assert st.stdout_tail.split()[0].decode() == hashlib.sha256(data).hexdigest()
    back = tmp_path / "out ä.bin"
    assert vm.copy_from_guest(guest, back) == len(data)
    assert back.read_bytes() == data


def test_copy_in_and_out_with_max_bytes(vm: VmwareBackend, tmp_path: Path) -> None:
    src = tmp_path / "in.bin"
    src.write_bytes(b"x" * 1000)
    vm.copy_to_guest(src, "/tmp/in.bin")
    status = vm.run_program(
        ["/bin/sh", "-c", "cp /tmp/in.bin /tmp/out.bin && echo -n ab >> /tmp/out.bin"], timeout=20
    )
    assert status.succeeded
    out = tmp_path / "out.bin"
    assert vm.copy_from_guest("/tmp/out.bin", out, max_bytes=1002) == 1002
    assert out.read_bytes() == b"x" * 1000 + b"ab"
    big = tmp_path / "big.bin"
    with pytest.raises(OutputError, match="more than the 100 allowed"):
        vm.copy_from_guest("/tmp/out.bin", big, max_bytes=100)
    assert not big.exists() and not list(tmp_path.glob(".big.bin*"))
    with pytest.raises(OutputError, match="does not exist"):
        vm.copy_from_guest("/tmp/missing", tmp_path / "m")
    assert vm.read_guest_file("/tmp/missing") is None
    assert vm.read_guest_file("/tmp/out.bin", max_bytes=3) == b"xxx"
    with pytest.raises(InputError):
        vm.copy_to_guest(tmp_path / "nope", "/tmp/nope")


def test_snapshots_create_list_revert_delete(vm: VmwareBackend, tmp_path: Path) -> None:
    assert vm.run_program(["/bin/sh", "-c", "echo 1 > /tmp/state"], timeout=20).succeeded
    vm.snapshot_create("ck1")
    with pytest.raises(Exception, match="exists already"):
        vm.snapshot_create("ck1")
    assert vm.run_program(["/bin/sh", "-c", "echo 2 > /tmp/state"], timeout=20).succeeded
    vm.snapshot_create("ck2")
    assert [s.name for s in vm.snapshot_list()] == ["ck1", "ck2"]
    vm.snapshot_revert("ck1")
    assert vm.is_running()
    assert vm.read_guest_file("/tmp/state") == b"1\n"
    vm.snapshot_delete("ck1")
    assert [s.name for s in vm.snapshot_list()] == ["ck2"]
    with pytest.raises(SnapshotNotFound):
        vm.snapshot_revert("ck1")
    with pytest.raises(SnapshotNotFound):
        vm.snapshot_delete("nope")


def test_restart_resumes_from_a_snapshot(tmp_path: Path, fake_vmrun: Path, base_vmx: Path) -> None:
    spec = make_spec(tmp_path, base_vmx)
    with VmwareBackend(spec) as first:
        first.power_on()
        first.wait_for_tools()
        assert first.run_program(["/bin/sh", "-c", "echo kept > /tmp/ck"], timeout=20).succeeded
        first.snapshot_create("ck")
        assert first.run_program(["/bin/sh", "-c", "echo lost > /tmp/ck"], timeout=20).succeeded
    with VmwareBackend(spec) as second:  # a new wrapper process
        second.power_on(snapshot="ck")
        second.wait_for_tools()
        assert second.read_guest_file("/tmp/ck") == b"kept\n"
        second.power_on()  # fresh: a new clone, no snapshots
        second.wait_for_tools()
        assert second.snapshot_list() == []
        assert second.read_guest_file("/tmp/ck") is None


def test_pause_and_resume(vm: VmwareBackend) -> None:
    proc = vm.start_program(["/bin/sh", "-c", "sleep 0.3"])
    vm.pause()
    assert vm.is_running()
    vm.resume()
    status = vm.poll_program(proc)
    while status.running:
        status = vm.poll_program(proc)
    assert status.succeeded


def test_tools_that_never_start(tmp_path: Path, fake_vmrun: Path, base_vmx: Path) -> None:
    config = json.loads((fake_vmrun / "config.json").read_text())
    (fake_vmrun / "config.json").write_text(json.dumps({**config, "tools_delay": 1000}))
    with VmwareBackend(make_spec(tmp_path, base_vmx)) as backend:
        backend.power_on()
        with pytest.raises(GuestToolsMissing, match="did not start within 0.3 s"):
            backend.wait_for_tools(timeout=0.3)


def test_guest_operations_without_credentials_are_unsupported(
    tmp_path: Path, fake_vmrun: Path, base_vmx: Path
) -> None:
    spec = make_spec(tmp_path, base_vmx, guest_user="", guest_password_file="", channel="guestops")
    with VmwareBackend(spec) as backend:
        backend.power_on()
        backend.wait_for_tools()
        with pytest.raises(UnsupportedOperation, match="need credentials"):
            backend.start_program(["/bin/true"])
        backend.guestinfo_write("boinc.cmd", "go now")  # the credential-free channel still works
        assert backend.guestinfo_read("boinc.cmd") == "go now"
        assert backend.guestinfo_read("boinc.rc") is None


def test_inline_passwords_and_unknown_options_are_refused(tmp_path: Path, base_vmx: Path) -> None:
    with pytest.raises(InputError, match="options.guest_password: passwords are not accepted inline"):
        VmwareBackend(make_spec(tmp_path, base_vmx, guest_password="x"))
    with pytest.raises(InputError, match="options.host_type"):
        VmwareBackend(make_spec(tmp_path, base_vmx, host_type="esx"))
    with pytest.raises(InputError, match="options.colour: unknown"):
        VmwareBackend(make_spec(tmp_path, base_vmx, colour="blue"))


def test_password_from_environment_and_never_logged(
    tmp_path: Path,
    fake_vmrun: Path,
    base_vmx: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    monkeypatch.setenv("GUEST_PW", PASSWORD)
    spec = make_spec(tmp_path, base_vmx, guest_password_file="", guest_password_env="GUEST_PW")
    with VmwareBackend(spec) as backend:
        backend.power_on()
        backend.wait_for_tools()
        assert backend.run_program(["/bin/true"], timeout=20).succeeded
        assert repr(backend.login).count(PASSWORD) == 0
    assert "-gp ***" in caplog.text or "-gp '***'" in caplog.text
    assert PASSWORD not in caplog.text
    # the credentials always come before the command, as vmrun requires
    for argv in calls(fake_vmrun):
        flags = argv[
            : next(i for i, a in enumerate(argv) if not a.startswith("-") and argv[i - 1] not in FLAGS)
        ]
        assert "-gp" not in argv[len(flags) :]


FLAGS = {"-T", "-vp", "-gu", "-gp"}


def test_wrong_password_is_classified_and_not_echoed(
    tmp_path: Path, fake_vmrun: Path, base_vmx: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    wrong = tmp_path / "wrong"
    wrong.write_text("not-the-password")
    with VmwareBackend(make_spec(tmp_path, base_vmx, guest_password_file=str(wrong))) as backend:
        backend.power_on()
        with pytest.raises(GuestCredentialsRejected) as err:
            backend.wait_for_tools()
    assert "not-the-password" not in str(err.value) and "not-the-password" not in caplog.text


def test_host_cpu_time_from_the_vmx_process(tmp_path: Path, fake_vmrun: Path, base_vmx: Path) -> None:
    vm = VmwareBackend(make_spec(tmp_path, base_vmx))
    vm.power_on()
    if not sys.platform.startswith("linux"):
        with pytest.raises(UnsupportedOperation):
            vm.host_cpu_time()
        return
    deadline = time.monotonic() + 10
    while (seconds := vm.host_cpu_time()) == 0 and time.monotonic() < deadline:
        time.sleep(0.05)  # the stand-in vmware-vmx burns 50 ms of CPU once it is scheduled
    assert seconds > 0
    vm.power_off()
    assert vm.host_cpu_time() >= seconds  # the last sample outlives the process


def test_image_must_be_a_vmx(tmp_path: Path, fake_vmrun: Path) -> None:
    disk = tmp_path / "disk.vmdk"
    disk.write_text("x")
    backend = VmwareBackend(make_spec(tmp_path, disk))
    with pytest.raises(InputError, match="must be a VMware .vmx"):
        backend.power_on()


def test_pyvix_is_used_where_importable_and_vmrun_takes_over_on_failure(
    tmp_path: Path, fake_vmrun: Path, base_vmx: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: list[str] = []

    class FakeVm:
        def poweron(self, op: int) -> None:
            seen.append(f"poweron {op}")
            raise RuntimeError("VIX library not loaded")

        def waitfortools(self, seconds: int) -> None:
            seen.append(f"waitfortools {seconds}")
            raise RuntimeError("VixError 3000")

    host = types.SimpleNamespace(open=lambda path: FakeVm())
    monkeypatch.setitem(sys.modules, "pyvix", types.SimpleNamespace(connect=lambda: host))
    with VmwareBackend(make_spec(tmp_path, base_vmx, pyvix="auto")) as backend:
        backend.power_on()
        backend.wait_for_tools()
        assert backend.is_running()
    assert seen == ["poweron 0", "waitfortools 10"]


def test_a_program_that_dies_without_an_exit_status(
    vm: VmwareBackend, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(vmware_guestops, "LIVENESS_INTERVAL", 0.0)
    # The program kills the wrapper shell that would have written its exit status.
    proc = vm.start_program(["/bin/sh", "-c", "sleep 0.2; kill -9 $PPID"])
    status = vm.poll_program(proc)
    while status.running:
        status = vm.poll_program(proc)
    assert status.exit_code is None and status.signal is None and not status.succeeded
    assert b"vanished" in status.stderr_tail


def test_falls_back_to_player_when_only_player_is_installed(
    tmp_path: Path, fake_vmrun: Path, base_vmx: Path
) -> None:
    config = json.loads((fake_vmrun / "config.json").read_text())
    (fake_vmrun / "config.json").write_text(json.dumps({**config, "host_types": ["player"]}))
    with VmwareBackend(make_spec(tmp_path, base_vmx)) as backend:
        backend.power_on()
        assert backend.vmrun.host_type is HostType.PLAYER
    explicit = VmwareBackend(make_spec(tmp_path, base_vmx, host_type="ws"))  # no fallback when chosen
    with pytest.raises(WrongHostType, match="VIX_SERVICEPROVIDER_VMWARE_WORKSTATION"):
        explicit.is_running()


def test_the_stand_in_enforces_vmrun_grammar(fake_vmrun: Path, base_vmx: Path) -> None:
    def vmrun(*args: str) -> tuple[int, str]:
        done = proc.run(["vmrun", *args], timeout=30, check=False)
        return done.returncode, done.text

    vmx = str(base_vmx)
    assert vmrun("-T", "ws", "listsnapshots", vmx) == (0, "Total snapshots: 0\n")  # any case
    rc, out = vmrun("-T", "esx", "list")
    assert rc == 255 and out.startswith("vmrun version 1.17.0")
    rc, out = vmrun("start", vmx, "-T", "ws")
    assert rc == 255 and "Usage: vmrun" in out
    rc, out = vmrun("-gu", "boinc", "runProgramInGuest", "-gp", PASSWORD, vmx, "/bin/true")
    assert (rc, out) == (255, "Error: Cannot open VM: -gp, unknown file suffix\n")
    assert vmrun("snapshot", vmx)[0] == 255  # a name is required
    assert vmrun("frobnicate", vmx) == (255, "Error: Unrecognized command: frobnicate\n")
    assert vmrun("checkToolsState", vmx) == (254, "unknown\n")
    rc, out = vmrun("-gu", "boinc", "-gp", PASSWORD, "fileExistsInGuest", vmx, "/etc")
    assert (rc, out) == (255, f"Error: The virtual machine is not powered on: {base_vmx.resolve()}\n")


# -- the credential-free channel: guestinfo variables, a shared folder and the in-guest agent ------------


def test_without_credentials_through_the_guest_agent(
    tmp_path: Path, fake_vmrun: Path, base_vmx: Path
) -> None:
    (fake_vmrun / "agent.sh").write_text(AGENT_SCRIPT)  # the image's boot service
    spec = make_spec(tmp_path, base_vmx, guest_user="", guest_password_file="")
    with VmwareBackend(spec) as vm:
        vm.power_on()
        assert VmxFile.load(vm.vmx).get("sharedFolder0.guestName") == "boinc"
        vm.wait_for_tools()
        st = vm.run_program(["/bin/sh", "-c", 'echo "$X"; pwd; echo err >&2; exit 4'], env={"X": "a b"},
                            cwd="/var/tmp", timeout=20)  # fmt: skip
        assert (st.exit_code, st.stdout_tail, st.stderr_tail) == (4, b"a b\n/var/tmp\n", b"err\n")
        src = tmp_path / "in.txt"
        src.write_bytes(b"payload")
        vm.copy_to_guest(src, "/tmp/in.txt")
        assert vm.run_program(
            ["/bin/sh", "-c", "cat /tmp/in.txt /tmp/in.txt > /tmp/out.txt"], timeout=20
        ).succeeded
        out = tmp_path / "out.txt"
        assert vm.copy_from_guest("/tmp/out.txt", out, max_bytes=14) == 14
        assert out.read_bytes() == b"payloadpayload"
        with pytest.raises(OutputError, match="more than the 13 allowed"):
            vm.copy_from_guest("/tmp/out.txt", tmp_path / "big", max_bytes=13)
        with pytest.raises(OutputError, match="does not exist"):
            vm.copy_from_guest("/tmp/none", tmp_path / "none")
        assert vm.read_guest_file("/tmp/none") is None
        assert vm.read_guest_file("/tmp/out.txt", max_bytes=3) == b"pay"
        # a revert replays the snapshot's guestinfo; the job directory on the share stops a second run
        vm.snapshot_create("ck")
        assert vm.run_program(["/bin/sh", "-c", "echo x >> /tmp/count"], timeout=20).succeeded
        vm.snapshot_revert("ck")
        assert vm.read_guest_file("/tmp/count") is None
        assert vm.run_program(["/bin/sh", "-c", "echo y >> /tmp/count"], timeout=20).succeeded
        assert vm.read_guest_file("/tmp/count") == b"y\n"
    assert not any("-gu" in argv or "-gp" in argv for argv in calls(fake_vmrun))


def test_without_credentials_or_agent_the_error_says_what_is_missing(
    tmp_path: Path, fake_vmrun: Path, base_vmx: Path
) -> None:
    spec = make_spec(tmp_path, base_vmx, guest_user="", guest_password_file="")
    with VmwareBackend(spec) as vm:
        vm.power_on()
        with pytest.raises(GuestToolsMissing, match="guest agent did not announce itself"):
            vm.wait_for_tools(timeout=0.5)
