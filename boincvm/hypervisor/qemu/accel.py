"""Choosing QEMU's accelerator: KVM when it really works here, TCG otherwise.

``/dev/kvm`` existing is not enough: under nested virtualisation a KVM guest can hang
forever. So the probe boots the guest kernel for real, with no root file system, and
``panic=-1`` plus ``-no-reboot``: a working KVM reaches the "cannot mount root" panic
and QEMU exits within a second; a broken one is still running when the bounded wait
ends. The verdict is cached per QEMU binary, host kernel and guest kernel, so only the
first VM on a host pays for it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import pwd
import stat
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from boincvm import proc
from boincvm.atomicdir import write_file_atomically
from boincvm.cache import cache_root, content_digest
from boincvm.errors import CommandNotFound
from boincvm.hypervisor.qemu.runtime import PATH_QEMU, QemuTools

QEMU = "qemu-system-x86_64"
TRIAL_TIMEOUT = 8.0
ENV_OVERRIDE = "BOINCVM_QEMU_ACCEL"
#: What a volunteer does when KVM hangs: the usual cause is a host that is itself a VM.
NESTED_HINT = "run BOINC on the physical machine, or enable nested virtualisation on its hypervisor"


@dataclass(frozen=True)
class AccelChoice:
    """The accelerator chosen, why, and (for TCG where KVM was wanted) how to get KVM.

    ``reason`` is a sentence without the fix; ``hint`` what the host's owner can do.
    The CLI shows :attr:`note` for TCG.
    """

    accel: str
    reason: str
    hint: str = ""

    @property
    def is_kvm(self) -> bool:
        """True for KVM."""
        return self.accel == "kvm"

    @property
    def note(self) -> str:
        """The reason and the fix, as the one line the wrapper logs."""
        return f"{self.reason}; {self.hint}" if self.hint else self.reason


#: The KVM device production uses. Tests may point the probe elsewhere (see :func:`kvm_device_path`).
KVM_DEVICE = Path("/dev/kvm")
#: Tests only: a path that stands in for /dev/kvm (a plain file, a chmod-000 copy), so the
#: "not a device" and "permission" verdicts can be checked without changing the machine.
TEST_DEVICE_ENV = "BOINCVM_TEST_KVM_DEVICE"
#: What a volunteer does when the BOINC client's user may not open /dev/kvm.
PERMISSION_HINT = "add the BOINC user to group kvm (sudo usermod -aG kvm boinc) and restart the client"


#: What a Windows volunteer does when WSL 2 (BOINC's distro) shows no usable KVM. WSL 2's
#: kernel has KVM; nested virtualisation is on by default on x86 Windows 11.
WSL_NESTED_HINT = (
    r"inside WSL 2: on Windows 11 put nestedVirtualization=true under [wsl2] in %UserProfile%\.wslconfig, "
    "run wsl --shutdown and start BOINC again (the task runs on TCG meanwhile)"
)
#: ... and when /dev/kvm is there but the distro's user may not open it.
WSL_PERMISSION_HINT = (
    "inside WSL 2: let the distro's user open /dev/kvm "
    "(as root in the distro: chmod 0666 /dev/kvm, or add the user to group kvm)"
)


def in_wsl(kernel_release: str | None = None) -> bool:
    """Whether this Linux is WSL 2 (its kernel release names Microsoft)."""
    if kernel_release is None:
        try:
            kernel_release = Path("/proc/sys/kernel/osrelease").read_text(encoding="ascii", errors="replace")
        except OSError:
            return False
    return "microsoft" in kernel_release.lower()


def for_this_host(choice: AccelChoice, kernel_release: str | None = None) -> AccelChoice:
    """``choice`` with the fix a volunteer on this kind of host can apply (WSL's own under WSL)."""
    if choice.accel != "tcg" or not choice.hint or not in_wsl(kernel_release):
        return choice
    hint = WSL_PERMISSION_HINT if choice.hint == PERMISSION_HINT else WSL_NESTED_HINT
    return dataclasses.replace(choice, hint=hint)


def kvm_device_path() -> Path:
    """``/dev/kvm``, unless a test named another path in ``BOINCVM_TEST_KVM_DEVICE``."""
    return Path(os.environ.get(TEST_DEVICE_ENV) or KVM_DEVICE)


def _user() -> str:
    try:
        return pwd.getpwuid(os.geteuid()).pw_name
    except KeyError:
        return f"uid {os.geteuid()}"


def kvm_device_problem(device: Path | None = None, kernel_release: str | None = None) -> AccelChoice | None:
    """None if the KVM device can be opened for reading and writing, else why not (and the
    fix, WSL's own under WSL; ``kernel_release`` stands in for this host's in tests).

    It really opens the device (``os.access`` answers for the real uid and ignores ACLs
    set by udev); opening /dev/kvm creates nothing until a VM is asked for.
    """
    problem = _device_problem(device or kvm_device_path())
    return None if problem is None else for_this_host(problem, kernel_release)


def _device_problem(dev: Path) -> AccelChoice | None:
    try:
        st = dev.stat()
    except FileNotFoundError:
        return AccelChoice(
            "tcg",
            f"{dev} does not exist (no hardware virtualisation, or the kvm module is not loaded)",
            "enable VT-x/AMD-V in the firmware settings and load kvm_intel or kvm_amd",
        )
    except OSError as exc:
        return AccelChoice("tcg", f"{dev} cannot be examined ({exc.strerror})", PERMISSION_HINT)
    if not stat.S_ISCHR(st.st_mode):
        return AccelChoice(
            "tcg", f"{dev} is not a character device", "reload the kvm module so udev recreates /dev/kvm"
        )
    try:
        fd = os.open(dev, os.O_RDWR | os.O_CLOEXEC)
    except PermissionError:
        return AccelChoice("tcg", f"{dev} exists but user {_user()} may not open it (permission denied)",
                           PERMISSION_HINT)  # fmt: skip
    except OSError as exc:
        return AccelChoice("tcg", f"{dev} cannot be opened ({exc.strerror})", "check dmesg for kvm errors")
    os.close(fd)
    return None


def kvm_device() -> str | None:
    """None if the KVM device is usable, else why not (one sentence with its fix)."""
    problem = kvm_device_problem()
    return None if problem is None else f"{problem.reason}; {problem.hint}"


def qemu_identity(tools: QemuTools) -> str:
    """What identifies the QEMU ``tools`` run in cache keys, without running it.

    The binary's size and content digest (hashed once per file, :func:`content_digest`):
    an upgrade changes them, and every project directory's unpacked copy of one bundled
    runtime has the same identity, so they share golden checkpoints and KVM verdicts.
    Running ``--version`` instead costs a process start (about 25 ms) on every job start,
    which the golden-checkpoint path cannot afford.

    Raises:
        CommandNotFound: QEMU is not installed.
    """
    path = tools.binary()
    if path is None:
        raise CommandNotFound(f"{QEMU} was not found", hint=proc.INSTALL_HINTS.get(QEMU, f"install {QEMU}"))
    real = path.resolve()
    return f"{real.stat().st_size}:{content_digest(real)}"


def _cache_file(kernel: Path, tools: QemuTools) -> Path:
    st = kernel.stat()
    # The kernel by content: every data directory's copy of it shares the verdict.
    key = json.dumps([qemu_identity(tools), os.uname().release, st.st_size, content_digest(kernel)])
    return cache_root() / "accel" / (hashlib.sha256(key.encode()).hexdigest()[:24] + ".json")


def _trial(kernel: Path, workdir: Path, tools: QemuTools) -> AccelChoice:
    log_file = workdir / "kvm-probe.log"
    argv = [*tools.system_command(), "-accel", "kvm", "-cpu", "host", "-machine", "pc", "-m", "128",
            "-nodefaults", "-no-user-config", "-display", "none", "-no-reboot", "-serial", f"file:{log_file}",
            "-kernel", str(kernel), "-append", "console=ttyS0 panic=-1 root=/dev/boincvm-none"]  # fmt: skip
    started = time.monotonic()
    child = proc.spawn(argv, stderr=subprocess.PIPE, env=tools.env)
    try:
        child.wait(TRIAL_TIMEOUT)
    except subprocess.TimeoutExpired:
        return AccelChoice(
            "tcg",
            f"KVM is present but a trial boot hung for {TRIAL_TIMEOUT:g} s (nested virtualisation?)",
            NESTED_HINT,
        )
    finally:
        if child.poll() is None:
            child.kill()
            child.wait(10)
        stderr = child.stderr.read().decode(errors="replace") if child.stderr else ""
        if child.stderr:
            child.stderr.close()
    took = time.monotonic() - started
    console = log_file.read_text(errors="replace") if log_file.exists() else ""
    if "Kernel panic" in console or "VFS:" in console:
        return AccelChoice("kvm", f"KVM trial boot reached the kernel's root mount in {took:.1f} s")
    last = (stderr.strip().splitlines() or ["no output"])[-1]
    return AccelChoice("tcg", f"KVM trial boot failed ({last})", "check dmesg for kvm errors")


def choose_accel(
    kernel: Path | None, workdir: Path, override: str | None = None, tools: QemuTools = PATH_QEMU
) -> AccelChoice:
    """Pick ``kvm`` or ``tcg`` for VMs on this host, probing KVM with a bounded boot of ``kernel``
    by the QEMU of ``tools``.

    ``override`` (or the ``BOINCVM_QEMU_ACCEL`` environment variable) forces ``kvm`` or
    ``tcg``. Without a kernel to try, KVM is not trusted.
    """
    forced = override or os.environ.get(ENV_OVERRIDE)
    if forced in ("kvm", "tcg"):
        return AccelChoice(forced, f"accelerator {forced} forced by configuration")
    problem = kvm_device_problem()
    if problem is not None:
        return problem
    if kernel is None:
        return AccelChoice("tcg", "KVM not tried: no guest kernel to probe it with")
    cache = _cache_file(kernel, tools)
    try:
        data = json.loads(cache.read_text())
        return AccelChoice(str(data["accel"]), str(data["reason"]) + " (cached)", str(data["hint"]))
    except (OSError, ValueError, KeyError):
        pass
    choice = for_this_host(_trial(kernel, workdir, tools))
    cache.parent.mkdir(parents=True, exist_ok=True)
    verdict = {"accel": choice.accel, "reason": choice.reason, "hint": choice.hint}
    write_file_atomically(cache, json.dumps(verdict).encode())
    return choice
