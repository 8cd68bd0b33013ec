"""Host cost of a process tree, read from /proc: peak memory, CPU time, load.

A :class:`TreeSampler` watches the descendants of some root processes (and, for Podman,
the tree of the ``conmon`` that holds a named container: it is not our descendant) and
keeps, per process, its latest CPU time and its peak RSS, and for the whole set the
peak of the summed RSS and PSS (PSS shares a page between the processes mapping it, so
it is the fair figure when QEMUs map one file privately).
"""

from __future__ import annotations

import os
import statistics
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")
MIB = 1024 * 1024


def loadavg() -> str:
    """The 1-minute load average, as /proc/loadavg says it (noted next to every figure)."""
    try:
        return Path("/proc/loadavg").read_text().split()[0]
    except OSError:
        return "?"


def _stat(pid: int) -> tuple[int, float, int, str] | None:
    """(ppid, CPU seconds (utime + stime), RSS bytes, comm) of ``pid``, or None if it is gone."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    comm = raw[raw.find("(") + 1 : raw.rfind(")")]
    f = raw.rsplit(")", 1)[1].split()
    return int(f[1]), (int(f[11]) + int(f[12])) / CLK_TCK, int(f[21]) * PAGE, comm


def _pss(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0


@dataclass
class Peaks:
    """What a sampler saw."""

    peak_rss: int = 0
    peak_pss: int = 0
    cpu: dict[int, float] = field(default_factory=dict)
    rss: dict[int, int] = field(default_factory=dict)
    comm: dict[int, str] = field(default_factory=dict)

    @property
    def cpu_seconds(self) -> float:
        return sum(self.cpu.values())

    def peak_rss_of(self, pred: Callable[[str], bool]) -> int:
        """Sum of the per-process RSS peaks of the processes whose name matches."""
        return sum(r for p, r in self.rss.items() if pred(self.comm.get(p, "")))


class TreeSampler:
    """Sample the descendants of ``roots`` (pids, or a callable giving them) every ``interval`` s.

    ``marker``: also follow any ``conmon`` whose command line holds it (a Podman container).
    ``pss``: read PSS too (costs a smaps_rollup read per process and sample).
    ``include_roots``: count the roots themselves (False for the benchmark's own process).
    """

    def __init__(
        self,
        roots: Iterable[int] | Callable[[], Iterable[int]],
        *,
        interval: float = 0.05,
        marker: str | None = None,
        pss: bool = False,
        include_roots: bool = True,
    ) -> None:
        self._roots = roots if callable(roots) else (lambda r=tuple(roots): r)
        self.interval, self.marker, self.pss, self.include_roots = interval, marker, pss, include_roots
        self.peaks = Peaks()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def __enter__(self) -> TreeSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.sample()

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            self.sample()

    def sample(self) -> None:
        table: dict[int, tuple[int, float, int, str]] = {}
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit() and (st := _stat(int(entry.name))) is not None:
                table[int(entry.name)] = st
        children: dict[int, list[int]] = {}
        for pid, (ppid, *_rest) in table.items():
            children.setdefault(ppid, []).append(pid)
        roots = [int(p) for p in self._roots()]
        if self.marker:
            for pid, st in table.items():
                if st[3] == "conmon":
                    try:
                        if self.marker.encode() in Path(f"/proc/{pid}/cmdline").read_bytes():
                            roots.append(pid)
                    except OSError:
                        continue
        seen: set[int] = set()
        todo = list(roots) if self.include_roots else [c for r in roots for c in children.get(r, [])]
        while todo:
            p = todo.pop()
            if p in seen or p not in table:
                continue
            seen.add(p)
            todo += children.get(p, [])
        total_rss = total_pss = 0
        pk = self.peaks
        for p in seen:
            _, cpu, rss, comm = table[p]
            pk.cpu[p] = max(pk.cpu.get(p, 0.0), cpu)
            pk.rss[p] = max(pk.rss.get(p, 0), rss)
            pk.comm[p] = comm
            total_rss += rss
            if self.pss:
                total_pss += _pss(p)
        pk.peak_rss = max(pk.peak_rss, total_rss)
        pk.peak_pss = max(pk.peak_pss, total_pss)


def spread(values: Iterable[float], fmt: str = "{:.2f}") -> str:
    """``median (min-max)`` of ``values``."""
    v = sorted(values)
    if not v:
        return "-"
    return f"{fmt.format(statistics.median(v))} ({fmt.format(v[0])}-{fmt.format(v[-1])})"


def wait_rusage(pid: int, timeout: float) -> tuple[int, float, int]:
    """Wait for child ``pid`` (bounded): (exit status, CPU seconds of it and its reaped
    descendants, peak RSS bytes of the largest of them)."""
    killer = threading.Timer(timeout, lambda: os.kill(pid, 9))
    killer.start()
    try:
        _, status, ru = os.wait4(pid, 0)
    finally:
        killer.cancel()
    if os.WIFSIGNALED(status) and os.WTERMSIG(status) == 9:
        raise TimeoutError(f"process {pid} did not finish within {timeout:g} s")
    return os.waitstatus_to_exitcode(status), ru.ru_utime + ru.ru_stime, ru.ru_maxrss * 1024
