"""Choosing QEMU's accelerator: KVM when it really works here, TCG otherwise.

``/dev/kvm`` existing is not enough: under nested virtualisation a KVM guest can hang
forever. So the probe boots the guest kernel for real, with no root file system, and
``panic=-1`` plus ``-no-reboot``: a working KVM reaches the "cannot mount root" panic
and QEMU exits within a second; a broken one is still running when the bounded wait
ends. The verdict is cached per QEMU binary, host kernel and guest kernel, so only the
first VM on a host pays for it.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from boincvm import proc
from boincvm.cache import cache_root
from boincvm.errors import CommandNotFound
from boincvm.hypervisor.qemu import runtime as qemu_rt

QEMU = "qemu-system-x86_64"
TRIAL_TIMEOUT = 8.0
ENV_OVERRIDE = "BOINCVM_QEMU_ACCEL"


@dataclass(frozen=True)
class AccelChoice:
    """The accelerator chosen and why (the CLI shows ``reason`` as a note for TCG)."""

    accel: str
    reason: str

    @property
    def is_kvm(self) -> bool:
        """True for KVM."""
        return self.accel == "kvm"


def kvm_device() -> str | None:
    """None if ``/dev/kvm`` is usable, else why not."""
    dev = Path("/dev/kvm")
    if not dev.exists():
        return "/dev/kvm does not exist (no hardware virtualisation, or the kvm module is not loaded)"
    if not os.access(dev, os.R_OK | os.W_OK):
        return "/dev/kvm exists but this user may not open it (permission denied; join the kvm group)"
    return None


def qemu_identity() -> str:
    """What identifies the installed QEMU in cache keys, without running it.

    The binary's resolved path, size, modification time and inode: a package upgrade
    changes them. Running ``--version`` instead costs a process start (about 25 ms) on
    every job start, which the golden-checkpoint path cannot afford.

    Raises:
        CommandNotFound: QEMU is not installed.
    """
    path = qemu_rt.qemu_binary()
    if path is None:
        raise CommandNotFound(f"{QEMU} was not found", hint=proc.INSTALL_HINTS.get(QEMU, f"install {QEMU}"))
    real = path.resolve()
    st = real.stat()
    return f"{real}:{st.st_size}:{st.st_mtime_ns}:{st.st_ino}"


def _cache_file(kernel: Path) -> Path:
    st = kernel.stat()
    key = json.dumps([qemu_identity(), os.uname().release, str(kernel.resolve()), st.st_size, st.st_mtime_ns])
    return cache_root() / "accel" / (hashlib.sha256(key.encode()).hexdigest()[:24] + ".json")


def _trial(kernel: Path, workdir: Path) -> AccelChoice:
    log_file = workdir / "kvm-probe.log"
    argv = [*qemu_rt.qemu_command(), "-accel", "kvm", "-cpu", "host", "-machine", "pc", "-m", "128",
            "-nodefaults", "-no-user-config", "-display", "none", "-no-reboot", "-serial", f"file:{log_file}",
            "-kernel", str(kernel), "-append", "console=ttyS0 panic=-1 root=/dev/boincvm-none"]  # fmt: skip
    started = time.monotonic()
    child = proc.spawn(argv, stderr=subprocess.PIPE, env=qemu_rt.qemu_env())
    try:
        child.wait(TRIAL_TIMEOUT)
    except subprocess.TimeoutExpired:
        return AccelChoice(
            "tcg",
            f"KVM is present but a trial boot hung for {TRIAL_TIMEOUT:g} s "
            "(nested virtualisation?); using TCG, which is much slower",
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
    return AccelChoice("tcg", f"KVM trial boot failed ({last}); using TCG, which is much slower")


def choose_accel(kernel: Path | None, workdir: Path, override: str | None = None) -> AccelChoice:
    """Pick ``kvm`` or ``tcg`` for VMs on this host, probing KVM with a bounded boot of ``kernel``.

    ``override`` (or the ``BOINCVM_QEMU_ACCEL`` environment variable) forces ``kvm`` or
    ``tcg``. Without a kernel to try, KVM is not trusted.
    """
    forced = override or os.environ.get(ENV_OVERRIDE)
    if forced in ("kvm", "tcg"):
        return AccelChoice(forced, f"accelerator {forced} forced by configuration")
    why_not = kvm_device()
    if why_not:
        return AccelChoice("tcg", f"{why_not}; using TCG, which is much slower")
    if kernel is None:
        return AccelChoice("tcg", "KVM not tried: no guest kernel to probe it with; using TCG")
    cache = _cache_file(kernel)
    try:
        data = json.loads(cache.read_text())
        return AccelChoice(str(data["accel"]), str(data["reason"]) + " (cached)")
    except (OSError, ValueError, KeyError):
        pass
    choice = _trial(kernel, workdir)
    cache.parent.mkdir(parents=True, exist_ok=True)
    tmp = cache.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps({"accel": choice.accel, "reason": choice.reason}))
    tmp.replace(cache)
    return choice
