"""The wrapper's host checks: which reason gives which line, hint and outcome; the KVM device probe."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from boincvm.boinc.files import ExitCode
from boincvm.hypervisor.base import Availability
from boincvm.hypervisor.qemu.accel import (
    PERMISSION_HINT,
    TEST_DEVICE_ENV,
    WSL_NESTED_HINT,
    WSL_PERMISSION_HINT,
    AccelChoice,
    for_this_host,
    in_wsl,
    kvm_device_problem,
)
from boincvm.wrapper import hostcheck
from boincvm.wrapper.hostcheck import HostFacts, Verdict

MEMINFO = "MemTotal:        8000000 kB\nMemFree:         100000 kB\nMemAvailable:    2048000 kB\n"


def facts(total: int = 7812, available: int = 2000, disk_total: int = 10_000, free: int = 5_000) -> HostFacts:
    return HostFacts(total, available, disk_total, free)


def test_meminfo_is_read_in_mib() -> None:
    assert hostcheck.parse_meminfo(MEMINFO) == (7812, 2000)
    assert hostcheck.parse_meminfo("garbage\n") == (None, None)


def test_memory_beyond_the_host_is_refused_with_the_memory_exit_status() -> None:
    d = hostcheck.check_memory(9000, facts())
    assert d.verdict is Verdict.REFUSE
    assert d.exit_code is ExitCode.MEM_LIMIT_EXCEEDED
    assert "9000 MiB" in d.line and "7812 MiB in all" in d.line and "before the VM starts" in d.line


def test_memory_beyond_what_is_free_now_is_a_temporary_exit_without_notice() -> None:
    d = hostcheck.check_memory(3000, facts())
    assert d.verdict is Verdict.POSTPONE
    assert d.delay == hostcheck.SHORTAGE_DELAY and not d.notice
    assert "only 2000 MiB are free" in d.line and "close other programs" in d.line


def test_enough_memory_and_unknown_memory_run() -> None:
    assert hostcheck.check_memory(1000, facts()) == hostcheck.GO
    assert hostcheck.check_memory(10**6, HostFacts(None, None, None, None)) == hostcheck.GO


def test_disk_need_counts_two_memory_images_capped_by_the_disk_bound_less_what_is_used() -> None:
    assert hostcheck.disk_need_mb(512, 0) == 2 * 512 + hostcheck.DISK_MARGIN_MB
    assert hostcheck.disk_need_mb(512, 100 * hostcheck.MIB) == 100
    assert hostcheck.disk_need_mb(512, 0, used_mb=400) == 2 * 512 + hostcheck.DISK_MARGIN_MB - 400
    assert hostcheck.disk_need_mb(512, 0, used_mb=10**6) == 0


def test_disk_refused_beyond_the_file_system_postponed_beyond_free_space() -> None:
    refuse = hostcheck.check_disk(20_000, facts())
    assert refuse.verdict is Verdict.REFUSE and refuse.exit_code is ExitCode.DISK_LIMIT_EXCEEDED
    later = hostcheck.check_disk(6_000, facts())
    assert later.verdict is Verdict.POSTPONE and "only 5000 MiB are free" in later.line
    assert hostcheck.check_disk(4_000, facts()) == hostcheck.GO


@pytest.mark.parametrize(
    ("reason", "hint"),
    [
        ("/dev/kvm does not exist (no hardware virtualisation, or the kvm module is not loaded)", "load kvm"),
        ("/dev/kvm exists but user boinc may not open it (permission denied)", PERMISSION_HINT),
        ("KVM is present but a trial boot hung for 8 s (nested virtualisation?)", "enable nested"),
    ],
)
def test_unusable_kvm_is_tcg_with_one_line_or_a_noticed_temporary_exit(reason: str, hint: str) -> None:
    accel = Availability(False, reason, hint)
    note = hostcheck.check_accel(accel, required=False)
    assert note.verdict is Verdict.RUN
    assert note.line == f"KVM unusable, running on TCG (much slower): {reason}; fix: {hint}"
    assert "\n" not in note.line
    required = hostcheck.check_accel(accel, required=True)
    assert required.verdict is Verdict.POSTPONE and required.notice
    assert required.delay == hostcheck.NO_KVM_DELAY
    assert required.line == f"KVM is required by this job but unusable: {reason}; fix: {hint}"


def test_usable_kvm_says_nothing() -> None:
    usable = Availability(True, "trial boot reached root mount")
    assert hostcheck.check_accel(usable, required=True) == hostcheck.GO


def test_probe_missing_and_not_a_device(tmp_path: Path) -> None:
    missing = kvm_device_problem(tmp_path / "kvm")
    assert missing is not None and "does not exist" in missing.reason and "kvm_intel" in missing.hint
    plain = tmp_path / "plain"
    plain.write_bytes(b"")
    not_dev = kvm_device_problem(plain)
    assert not_dev is not None and "is not a character device" in not_dev.reason


@pytest.mark.skipif(not Path("/dev/kvm").exists(), reason="this host has no /dev/kvm to be refused")
def test_probe_permission_denied_as_an_unprivileged_user(tmp_path: Path) -> None:
    # The real /dev/kvm (mode 0600 or 0660 root:kvm) opened by user nobody: EACCES, the
    # situation of a BOINC client running as user boinc outside group kvm.
    setpriv = shutil.which("setpriv")
    assert setpriv is not None, "setpriv (util-linux) is part of the set-up"
    code = (
        "from boincvm.hypervisor.qemu.accel import kvm_device_problem; p = kvm_device_problem();"
        "print(p.reason if p else 'usable'); print(p.hint if p else '')"
    )
    env = {"PATH": os.environ.get("PATH", ""), "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    out = subprocess.run(
        [setpriv, "--reuid=65534", "--regid=65534", "--clear-groups", sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
        cwd=tmp_path,
        check=True,
    ).stdout.splitlines()
    assert out[0] == "/dev/kvm exists but user nobody may not open it (permission denied)"
    assert out[1] == PERMISSION_HINT


def test_the_device_path_is_injectable_for_tests_only_through_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    plain = tmp_path / "kvm"
    plain.write_bytes(b"")
    monkeypatch.setenv(TEST_DEVICE_ENV, str(plain))
    problem = kvm_device_problem()
    assert problem is not None and problem.reason == f"{plain} is not a character device"


WSL_RELEASE = "5.15.167.4-microsoft-standard-WSL2"


def test_inside_wsl_the_fix_is_wsl_s_own(tmp_path: Path) -> None:
    assert in_wsl(WSL_RELEASE) and not in_wsl("6.1.0-28-amd64")
    missing = kvm_device_problem(tmp_path / "kvm", kernel_release=WSL_RELEASE)
    assert missing is not None and missing.accel == "tcg" and missing.hint == WSL_NESTED_HINT
    assert "nestedVirtualization=true" in missing.note and ".wslconfig" in missing.note
    denied = AccelChoice("tcg", "/dev/kvm exists but user boinc may not open it", PERMISSION_HINT)
    assert for_this_host(denied, WSL_RELEASE).hint == WSL_PERMISSION_HINT
    assert for_this_host(denied, "6.1.0-28-amd64") == denied
    usable = AccelChoice("kvm", "trial boot reached the root mount")
    assert for_this_host(usable, WSL_RELEASE) == usable
