"""Packages in the real bundled guest: install with busybox rpm / tar, run, uninstall, files gone."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from boincvm.hypervisor.qemu.backend import QemuBackend
from boincvm.image.descriptor import spec_for_image
from boincvm.job import PackageKind
from boincvm.package import PackageFormat, PackageRequest, build_package
from boincvm.wrapper.guest_install import install_script, package_guest_path, uninstall_script

pytestmark = pytest.mark.integration

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
EXEC_DIR = "/scratch/pkgtest"


@pytest.fixture(scope="module")
def vm(guest_image: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[QemuBackend]:
    spec = spec_for_image(guest_image, name="pkgtest", workdir=tmp_path_factory.mktemp("pkg") / "slot")
    with QemuBackend(spec) as backend:
        backend.power_on()
        backend.wait_for_tools()
        yield backend


def sh(vm: QemuBackend, script: str) -> bytes:
    status = vm.run_program(["/bin/sh", "-c", script], timeout=120)
    assert status.succeeded, (status.exit_code, status.stderr_tail)
    return status.stdout_tail


@pytest.mark.parametrize(
    ("fmt", "kind"), [(PackageFormat.RPM, PackageKind.RPM), (PackageFormat.TAR, PackageKind.TAR)]
)
def test_install_run_uninstall(
    vm: QemuBackend, tmp_path: Path, fmt: PackageFormat, kind: PackageKind
) -> None:
    built = build_package(
        PackageRequest(EXAMPLES / "hello/program", "hello", "1.0", entry_point="bin/hello", format=fmt),
        tmp_path,
    )
    sh(vm, f"rm -rf {EXEC_DIR} && mkdir -p {EXEC_DIR}")
    guest_pkg = package_guest_path(kind, EXEC_DIR)
    vm.copy_to_guest(built.path, guest_pkg)
    sh(vm, install_script(kind, guest_pkg))
    assert sh(vm, "ls -l /opt/hello/bin/hello /usr/local/bin/hello").count(b"hello") >= 2
    sh(vm, f"cd {EXEC_DIR} && echo guest > in && /usr/local/bin/hello")
    assert vm.read_guest_file(f"{EXEC_DIR}/out") == b"Hello, guest!\n"
    sh(vm, uninstall_script(kind, EXEC_DIR))
    gone = vm.run_program(["/bin/sh", "-c", "ls /opt/hello /usr/local/bin/hello"], timeout=30)
    assert gone.exit_code != 0, gone.stdout_tail
    # The directories the package did not create are still there.
    sh(vm, "test -d /opt && test -d /usr/local/bin || test ! -e /usr/local/bin")


def test_a_broken_package_fails_to_install_clearly(vm: QemuBackend, tmp_path: Path) -> None:
    bogus = tmp_path / "bogus.rpm"
    bogus.write_bytes(b"not an rpm at all")
    guest_pkg = package_guest_path(PackageKind.RPM, EXEC_DIR)
    sh(vm, f"mkdir -p {EXEC_DIR}")
    vm.copy_to_guest(bogus, guest_pkg)
    status = vm.run_program(["/bin/sh", "-c", install_script(PackageKind.RPM, guest_pkg)], timeout=60)
    assert status.exit_code != 0


def test_busybox_rpm_installs_the_payload_not_the_header(vm: QemuBackend, tmp_path: Path) -> None:
    """Why check_package reads the payload: busybox rpm installs files the header never lists.

    ``rpm -qpl`` (the header) shows only the harmless files, yet the forged payload's
    ``../`` and setuid members land in the guest. The check on the host refuses this package.
    """
    import gzip

    from boincvm.findings import has_errors
    from boincvm.package import check_package
    from tests.unit.test_package_payload import _newc, _replace_payload

    built = build_package(PackageRequest(EXAMPLES / "hello/program", "hello", "1.0"), tmp_path)
    payload = _newc(
        [
            ("./opt/hello/bin/hello", 0o100755, b"#!/bin/sh\n"),
            ("./opt/hello/../../tmp/escaped", 0o100644, b"x\n"),
            ("./opt/hello/su", 0o104755, b"x\n"),
        ]
    )
    forged = tmp_path / "forged.rpm"
    forged.write_bytes(_replace_payload(built.path.read_bytes(), gzip.compress(payload, mtime=0)))
    findings = check_package(forged)
    assert has_errors(findings) and any("header does not list" in f.message for f in findings)

    sh(vm, f"rm -rf {EXEC_DIR} /tmp/escaped && mkdir -p {EXEC_DIR}")
    guest_pkg = package_guest_path(PackageKind.RPM, EXEC_DIR)
    vm.copy_to_guest(forged, guest_pkg)
    assert b"escaped" not in sh(vm, f"rpm -qpl {guest_pkg}")
    sh(vm, f"cd {EXEC_DIR} && rpm -i {guest_pkg}")
    listing = sh(vm, "ls -l /tmp/escaped /opt/hello/su").decode()
    assert "/tmp/escaped" in listing and "rws" in listing
    sh(vm, "rm -rf /tmp/escaped /opt/hello")
