"""One contract, every backend: the same tests run against QEMU (a real guest) and against
the VMware backend driving the stand-in vmrun (tests/fakes/vmrun.py), which is all of
VMware that can run here."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from boincvm.errors import OutputError
from boincvm.hypervisor.base import Backend, VmSpec
from tests.unit.test_vmware_backend import BASE_VMX, install_fake, make_spec, stop_everything

pytestmark = pytest.mark.integration

GUEST_DIR = "/tmp/contract"


@pytest.fixture(scope="module", params=["qemu", "vmware-fake"])
def backend(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Backend]:
    tmp = tmp_path_factory.mktemp(str(request.param))
    if request.param == "qemu":
        from boincvm.hypervisor.qemu.backend import QemuBackend
        from boincvm.image.descriptor import spec_for_image

        guest_image: Path = request.getfixturevalue("guest_image")
        spec: VmSpec = spec_for_image(guest_image, name="contract", workdir=tmp / "slot")
        with QemuBackend(spec) as vm:
            vm.power_on()
            vm.wait_for_tools()
            vm.run_program(["/bin/mkdir", "-p", GUEST_DIR], timeout=30)
            yield vm
        return
    from boincvm.hypervisor.vmware.backend import VmwareBackend

    with pytest.MonkeyPatch.context() as mp:
        install_fake(tmp / "bin", tmp / "state", mp)
        (tmp / "base").mkdir()
        (tmp / "base/base.vmx").write_text(BASE_VMX)
        with VmwareBackend(make_spec(tmp, tmp / "base/base.vmx")) as vm:
            vm.power_on()
            vm.wait_for_tools()
            vm.run_program(["/bin/mkdir", "-p", GUEST_DIR], timeout=30)
            yield vm
        stop_everything(tmp / "state")


def test_exit_codes_and_output(backend: Backend) -> None:
    ok = backend.run_program(["/bin/sh", "-c", "echo hello"], timeout=30)
    assert ok.succeeded and ok.stdout_tail == b"hello\n"
    bad = backend.run_program(["/bin/sh", "-c", "echo oops >&2; exit 7"], timeout=30)
    assert not bad.running and bad.exit_code == 7 and b"oops" in bad.stderr_tail


def test_start_and_poll_a_running_program(backend: Backend) -> None:
    proc = backend.start_program(["/bin/sh", "-c", f"sleep 1; echo done > {GUEST_DIR}/polled"])
    assert backend.poll_program(proc).running
    status = backend.run_program(["/bin/sh", "-c", "sleep 2"], timeout=30)
    assert status.succeeded
    import time

    deadline = time.monotonic() + 20
    while backend.poll_program(proc).running:
        assert time.monotonic() < deadline
        time.sleep(0.1)
    assert backend.poll_program(proc).succeeded
    assert backend.read_guest_file(f"{GUEST_DIR}/polled") == b"done\n"


def test_file_round_trip(backend: Backend, tmp_path: Path) -> None:
    data = os.urandom(300_000) + b"\0\n\xff"
    src = tmp_path / "in.bin"
    src.write_bytes(data)
    backend.copy_to_guest(src, f"{GUEST_DIR}/in.bin")
    back = tmp_path / "back.bin"
    assert backend.copy_from_guest(f"{GUEST_DIR}/in.bin", back) == len(data)
    assert back.read_bytes() == data


def test_copy_out_limits_and_missing_files(backend: Backend, tmp_path: Path) -> None:
    backend.run_program(["/bin/sh", "-c", f"seq 1 1000 > {GUEST_DIR}/big"], timeout=30)
    target = tmp_path / "big"
    with pytest.raises(OutputError):
        backend.copy_from_guest(f"{GUEST_DIR}/big", target, max_bytes=100)
    assert not target.exists()
    with pytest.raises(OutputError):
        backend.copy_from_guest(f"{GUEST_DIR}/absent", tmp_path / "absent")
    assert not (tmp_path / "absent").exists()
    assert backend.read_guest_file(f"{GUEST_DIR}/absent") is None


def test_snapshot_revert_and_delete(backend: Backend) -> None:
    backend.run_program(["/bin/sh", "-c", f"echo before > {GUEST_DIR}/state"], timeout=30)
    backend.snapshot_create("contract-1")
    assert "contract-1" in [s.name for s in backend.snapshot_list()]
    backend.run_program(["/bin/sh", "-c", f"echo after > {GUEST_DIR}/state"], timeout=30)
    backend.snapshot_revert("contract-1")
    backend.wait_for_tools(60)
    assert backend.read_guest_file(f"{GUEST_DIR}/state") == b"before\n"
    backend.snapshot_delete("contract-1")
    assert "contract-1" not in [s.name for s in backend.snapshot_list()]


def test_pause_and_resume(backend: Backend) -> None:
    backend.pause()
    backend.resume()
    assert backend.run_program(["/bin/true"], timeout=30).succeeded
    assert backend.host_cpu_time() >= 0.0


def test_power_off_is_final_and_idempotent(backend: Backend) -> None:
    # Runs last in the module (file order): the shared VM goes away.
    assert backend.is_running()
    backend.power_off()
    assert not backend.is_running()
    backend.power_off()
