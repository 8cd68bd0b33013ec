"""Host-side helpers of the VMware backend: the pyvix accelerator, a lock file, CPU time from /proc."""

from __future__ import annotations

import logging
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from boincvm.errors import VmTimeout

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Pyvix:
    """The optional pyvix accelerator: power-on and wait-for-tools inside VIX."""

    vm: Any
    module: Any

    @classmethod
    def open(cls, vmx: Path) -> Pyvix | None:
        """Connect to the local product and open ``vmx``; None when pyvix is absent or VIX fails."""
        try:
            import pyvix
        except ImportError:
            return None
        try:
            host = pyvix.connect()
            vm = host.open(str(vmx))
        except Exception as exc:  # noqa: BLE001 - any VIX failure means: use vmrun instead
            log.debug("pyvix unusable, using vmrun: %s", exc)
            return None
        return None if vm is None else cls(vm, pyvix)


def bounded(fn: Any, timeout: float, what: str) -> None:
    """Run a blocking pyvix call in a thread and give up waiting after ``timeout``."""
    box: list[BaseException] = []

    def target() -> None:
        try:
            fn()
        except BaseException as exc:  # noqa: BLE001 - re-raised in the caller's thread
            box.append(exc)

    t = threading.Thread(target=target, name=f"pyvix-{what}", daemon=True)
    t.start()
    t.join(timeout)
    if t.is_alive():
        raise VmTimeout(f"vmware: pyvix {what} did not return within {timeout:g} s")
    if box:
        raise box[0]


def norm(p: Path) -> str:
    """A path in the form used to compare two names of the same file."""
    return os.path.normcase(os.path.realpath(p))


class LockFile:
    """An exclusive lock file shared by tasks cloning the same base VM (stale after 10 minutes).

    Raises (on entry):
        VmTimeout: the lock stayed taken for ``timeout`` seconds.
    """

    def __init__(self, path: Path, timeout: float) -> None:
        self.path = path
        self.timeout = timeout
        self.fd = -1

    def __enter__(self) -> None:
        deadline = time.monotonic() + self.timeout
        while True:
            try:
                self.fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
                return
            except FileExistsError:
                try:
                    if time.time() - self.path.stat().st_mtime > 600:
                        self.path.unlink(missing_ok=True)
                        continue
                except OSError:
                    continue
                if time.monotonic() > deadline:
                    raise VmTimeout(
                        f"vmware: {self.path.name} stayed locked for {self.timeout:g} s"
                    ) from None
                time.sleep(0.2)

    def __exit__(self, *exc: object) -> None:
        os.close(self.fd)
        self.path.unlink(missing_ok=True)


def vmx_process_cpu_seconds(vmx: Path, proc_root: Path = Path("/proc")) -> float | None:
    """CPU seconds (user + system) of the ``vmware-vmx`` process running ``vmx`` and its descendants.

    The process is recognised by its command line: an ``argv[0]`` named ``vmware-vmx*`` and an
    argument that is this .vmx path. Returns None when no such process exists.
    """
    target = norm(vmx)
    tick = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
    stats: dict[int, tuple[int, float]] = {}
    root: int | None = None
    for entry in proc_root.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            fields = stat[stat.rindex(")") + 2 :].split()
            ppid = int(fields[1])
            ticks = int(fields[11]) + int(fields[12])  # utime, stime
            cticks = int(fields[13]) + int(fields[14])  # cutime, cstime (reaped children)
            stats[int(entry.name)] = (ppid, float(ticks))
            if root is None:
                args = (entry / "cmdline").read_bytes().split(b"\0")
                if (
                    args
                    and Path(args[0].decode(errors="replace")).name.startswith("vmware-vmx")
                    and any(a and norm(Path(a.decode(errors="replace"))) == target for a in args[1:])
                ):
                    root = int(entry.name)
                    stats[root] = (ppid, float(ticks + cticks))
        except (OSError, ValueError, IndexError):
            continue
    if root is None:
        return None
    children: dict[int, list[int]] = {}
    for pid, (ppid, _) in stats.items():
        children.setdefault(ppid, []).append(pid)
    total, todo = 0.0, [root]
    while todo:
        pid = todo.pop()
        total += stats[pid][1]
        todo += children.get(pid, [])
    return total / tick
