"""The app version's binaries on an older host: the bare Debian 11 root (glibc 2.31, boinc-client
7.16, no Python, no QEMU) of :mod:`tests.bare_host`."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from boincvm import __version__, unpacked
from boincvm.appversion.frozen import frozen_wrapper
from boincvm.appversion.runtime import cached_runtime_archive
from boincvm.appversion.wrapper_runtime import launcher_script, wrapper_runtime_archive
from boincvm.hypervisor.qemu.runtime import unpack_once
from tests.bare_host import MOUNT_POINT, build_root, glibc_version, run_in_root

pytestmark = pytest.mark.integration

#: In the root: a slot-like working directory on its tmpfs /tmp, the version printed, then
#: everything left in the slot and in /tmp (where staticx unpacks) listed.
_SCRIPT = (
    "set -e; mkdir /tmp/slot; cd /tmp/slot; "
    f'"{MOUNT_POINT}/boincvm-wrapper" --version; '
    "echo left:; ls -A /tmp/slot; echo tmp:; ls -A /tmp"
)


def test_frozen_wrapper_runs_on_debian_11(tmp_path: Path) -> None:
    root = build_root()
    assert glibc_version(root) == (2, 31)
    assert not (root / "usr/bin/python3").exists() and not (root / "usr/bin/qemu-system-x86_64").exists()
    shared = tmp_path / "shared"
    shared.mkdir()
    shutil.copyfile(frozen_wrapper().path, shared / "boincvm-wrapper")
    (shared / "boincvm-wrapper").chmod(0o755)
    done = run_in_root(root, shared, "sh", "-c", _SCRIPT)
    # Nothing left in the slot, and staticx removed its unpacked directory from /tmp.
    assert done.text == f"boincvm-wrapper {__version__}\nleft:\ntmp:\nslot\n", done.stderr


def test_bundled_qemu_runs_on_debian_11(tmp_path: Path, guest_image: Path) -> None:
    """The runtime archive's QEMU, through its own loader, boots the guest kernel on glibc 2.31
    with only the bundled firmware (-L) and modules (TCG)."""
    root = build_root()
    shared = tmp_path / "shared"
    shared.mkdir()
    rt = unpack_once(cached_runtime_archive(), shared)
    shutil.copyfile(guest_image / "vmlinux", shared / "vmlinux")
    inside = f"{MOUNT_POINT}/{rt.root.name}"
    loader = f"{inside}/lib/ld-linux-x86-64.so.2 --library-path {inside}/lib"
    # The kernel's first lines on the serial console are enough: the firmware ran and booted it.
    script = (
        f"{loader} {inside}/bin/qemu-img --version; "
        f"QEMU_MODULE_DIR={inside}/modules timeout 60 {loader} {inside}/bin/qemu-system-x86_64 "
        f"-L {inside}/share -machine q35 -accel tcg -m 256 -nodefaults -no-user-config -display none "
        "-no-reboot -netdev user,id=n -device virtio-net-pci,netdev=n "
        f"-kernel {MOUNT_POINT}/vmlinux -append 'console=ttyS0 panic=-1' -serial stdio "
        "| grep -m1 -o 'Linux version [^ ]*'"
    )
    done = run_in_root(root, shared, "sh", "-c", script, timeout=120)
    assert done.text.startswith("qemu-img version "), done.stderr
    assert "Linux version " in done.text, done.stderr


def test_the_launcher_runs_the_static_wrapper_then_the_runtime_on_debian_11(tmp_path: Path) -> None:
    """The Linux app version's main program on glibc 2.31: the static wrapper until the
    wrapper's runtime is unpacked beside it, then the runtime, through its own loader."""
    root = build_root()
    frozen = frozen_wrapper()
    project = tmp_path / "project"
    project.mkdir()
    shutil.copyfile(frozen.path, project / "static")
    (project / "static").chmod(0o755)
    archive = shutil.copyfile(wrapper_runtime_archive(frozen), project / "runtime.tar.xz")
    name = unpacked.WRAPPER.directory_name(archive)
    (project / "main").write_bytes(launcher_script(static="static", archive=archive.name, unpacked=name))
    (project / "main").chmod(0o755)
    # Run by its path from a slot, as the client runs it.
    script = f"set -e; mkdir -p /tmp/slot; cd /tmp/slot; ../..{MOUNT_POINT}/main --version"
    done = run_in_root(root, project, "sh", "-c", script)
    assert done.text == f"boincvm-wrapper {__version__}\n", done.stderr
    unpacked.unpack_once(archive, unpacked.WRAPPER)
    (project / "static").unlink()  # only the runtime can answer now
    done = run_in_root(root, project, "sh", "-c", f"cd /tmp && {MOUNT_POINT}/main --version")
    assert done.text == f"boincvm-wrapper {__version__}\n", done.stderr
