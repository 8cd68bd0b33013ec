"""BOINC's ``wsl_wrapper`` (``samples/wsl_wrapper/wsl_wrapper.cpp``), played on this host.

On a Windows volunteer's host the client starts ``wsl_wrapper.exe``; it runs the Linux
program inside a WSL distro and controls it through two shells of that distro. This
harness does here what it does there, from its source:

* the slot is laid out as the Windows client lays it out: ``<soft_link>`` files for the
  app version's and the workunit's files, ``init_data.xml`` describing a Windows host (its
  ``host_info`` with ``wsl_distros``) and no ``boinc_mmap_file`` (the Windows client's
  shared memory is a Windows object the distro cannot see); the Linux program is copied
  into the slot as ``main``, executable, as ``<copy_file/>`` does;
* the launch line is ``echo $$; ./main ARGS; touch boinc_job_done``, run by a shell of its
  own session in the slot; the first line it prints is the process group. ARGS are the
  arguments joined by single spaces, unquoted, as wsl_wrapper joins them: the distro's
  shell reads them again (a workunit's command line must be plain words there);
* a second shell is the control channel: every second ``ps --no-headers -g PGID -o
  cputime,rss; echo EOM``; suspend, resume and abort are ``kill -STOP``, ``kill -CONT``
  and ``kill -KILL`` of the whole group;
* the job succeeded when ``ps`` lists no process and ``boinc_job_done`` exists, failed when
  no process is left without it;
* the program's output pipe is read only when the job is over (``copy_output``), and is
  made small (one page), as Windows' anonymous pipes are: a program that writes more than
  that while it runs blocks, as it would there.
"""

from __future__ import annotations

import enum
import fcntl
import os
import re
import shlex
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from boincvm.appversion.model import STATIC_WRAPPER_TAIL
from boincvm.boinc.init_data import HostInfo, InitData, write_init_data
from boincvm.boinc.slot import (
    LocalTask,
    SlotLayout,
    collect_outputs,
    escape_project_url,
    install_project_files,
    link_slot_files,
)
from boincvm.runlocal.request import RunLocalRequest
from boincvm.runlocal.task import build_task

#: wsl_wrapper's POLL_PERIOD and CMD_TIMEOUT.
POLL_PERIOD = 1.0
CMD_TIMEOUT = 10.0
#: The Windows client's data directory, as its init_data.xml names it.
WINDOWS_DATA_DIR = "C:\\ProgramData\\BOINC"
#: The distro BOINC's Windows installer sets up since June 2026.
DISTRO = "boinc-buda-runner"
F_SETPIPE_SZ = 1031
_PS_LINE = re.compile(r"\s*(?:(\d+)-)?(\d+):(\d+):(\d+)\s+(\d+)\s*")


class JobStatus(enum.Enum):
    """What ``poll_app`` says."""

    IN_PROGRESS = "in progress"
    SUCCESS = "success"
    FAIL = "fail"


@dataclass
class Usage:
    """``RSC_USAGE``: the group's CPU seconds and resident bytes, summed over ``ps``'s lines."""

    cpu_time: float = 0.0
    wss: float = 0.0
    processes: int = 0


def windows_init_data(layout: SlotLayout, task_name: str, wu_name: str, checkpoint_period: float) -> str:
    """``init_data.xml`` as the Windows client writes it for a WSL task (the parts we read)."""
    data = InitData(
        major_version=8,
        minor_version=2,
        release=0,
        app_name="itest",
        # As the Windows client names them: Windows paths, meaningless inside WSL.
        project_dir=f"{WINDOWS_DATA_DIR}\\projects\\{layout.project_dir_name}",
        boinc_dir=WINDOWS_DATA_DIR,
        wu_name=wu_name,
        result_name=task_name,
        slot=layout.slot,
        checkpoint_period=checkpoint_period,
        fraction_done_start=0.0,
        fraction_done_end=1.0,
        client_pid=4,  # a Windows pid: no process of that number is ours to watch
        host_info=HostInfo(
            os_name="Microsoft Windows",
            os_version="Professional x64 Edition, (10.00.22631.00)",
            p_ncpus=os.cpu_count() or 1,
            m_nbytes=8e9,
            wsl_available=True,
        ),
    )
    path = layout.slot_dir / "init_data.xml"
    write_init_data(path, data)
    text = path.read_text(encoding="utf-8")
    distros = (
        "<wsl_distros>\n<distro>\n"
        f"    <distro_name>{DISTRO}</distro_name>\n"
        "    <os_name>Alpine Linux</os_name>\n    <os_version>3.22.0</os_version>\n"
        "    <libc_version>1.2.5</libc_version>\n    <wsl_version>2</wsl_version>\n"
        "    <is_default/>\n</distro>\n</wsl_distros>\n"
    )
    text = text.replace("</host_info>", distros + "</host_info>", 1)
    path.write_text(text, encoding="utf-8")
    return text


#: Enters a distro root for the launch line: the mounts a WSL distro has (/proc, /dev,
#: /sys, a tmpfs /tmp) in a private mount namespace, then chroot with a clean environment.
#: ``unshare`` and ``chroot`` exec, so the shell inside keeps the launched pid: ``echo $$``
#: names the group as it does under wsl_wrapper.
ENTER_DISTRO = (
    "set -e; root=$1; shift; "
    'mount -t proc proc "$root/proc"; '
    'mount --rbind /dev "$root/dev"; '
    'mount --rbind /sys "$root/sys"; '
    'mount -t tmpfs -o mode=1777 tmp "$root/tmp"; '
    'exec chroot "$root" /bin/env -i PATH=/bin HOME=/root "$@"'
)


def busybox_root(dest: Path) -> Path:
    """A distro root with no libc of its own: busybox-static and its applets, nothing else
    (the frozen main program and the bundled QEMU must bring all they need)."""
    busybox = shutil.which("busybox")
    assert busybox is not None, "busybox-static is not installed (scripts/bootstrap.sh installs it)"
    for d in ("bin", "proc", "dev", "sys", "tmp", "etc", "root"):
        (dest / d).mkdir(parents=True, exist_ok=True)
    shutil.copyfile(busybox, dest / "bin/busybox")
    (dest / "bin/busybox").chmod(0o755)
    listed = subprocess.run([busybox, "--list"], capture_output=True, text=True, check=True).stdout
    for applet in listed.split():
        if applet != "busybox":
            (dest / "bin" / applet).symlink_to("busybox")
    (dest / "etc/passwd").write_text("root:x:0:0:root:/root:/bin/sh\n")
    return dest


def libc_files(root: Path) -> list[str]:
    """Files of a C library or its dynamic loader under ``root`` (none in a busybox root)."""
    names = ("libc.so", "libc-", "ld-linux", "ld-musl", "libc.musl")
    return [str(p.relative_to(root)) for p in root.rglob("*") if p.name.startswith(names)]


@dataclass
class WslWrapper:
    """One task's slot, and wsl_wrapper's launch and control of its Linux program.

    ``distro``: a root the launch line runs in (chrooted, as a WSL distro); ``data_dir``
    must then be inside it. None: the launch line runs on this host's own root.
    """

    workunit_dir: Path
    app_version_dir: Path
    data_dir: Path
    checkpoint_period: float = 2.0
    distro: Path | None = None
    args: tuple[str, ...] = ()
    pgid: int = 0
    output: bytes = b""
    _app: subprocess.Popen[bytes] | None = None
    _ctl: subprocess.Popen[bytes] | None = None
    _layout: SlotLayout | None = None
    _task: LocalTask | None = None
    polls: list[Usage] = field(default_factory=list)

    # -- the slot, as the Windows client lays it out ------------------------------------
    def prepare(self) -> Path:
        """Lay the slot out; return it. The static wrapper becomes ``main``, executable."""
        task = build_task(
            RunLocalRequest(
                workunit_dir=self.workunit_dir,
                app_version_dir=self.app_version_dir,
                results_dir=self.data_dir / "results",
                data_dir=self.data_dir,
            )
        )
        layout = SlotLayout(self.data_dir, escape_project_url(task.project_url), 0)
        install_project_files(task, layout)
        link_slot_files(task, layout)
        # The Windows app version's `main` is the static wrapper, which a Linux app version
        # ships beside its launcher (a zip application's main program is itself).
        static = [f for f in task.app_files if f.name.endswith(f"_{STATIC_WRAPPER_TAIL}")]
        main = layout.slot_dir / "main"
        shutil.copyfile(layout.project_dir / (static[0] if static else task.main_program).name, main)
        main.chmod(0o755)
        (layout.slot_dir / "boinc_mmap_file").unlink(missing_ok=True)
        windows_init_data(layout, task.result_name, task.wu_name, self.checkpoint_period)
        self._layout, self._task = layout, task
        self.args = tuple(shlex.split(task.command_line))
        return layout.slot_dir

    @property
    def slot(self) -> Path:
        assert self._layout is not None, "prepare() first"
        return self._layout.slot_dir

    # -- launch() --------------------------------------------------------------------
    def launch(self) -> int:
        """``echo $$; ./main ARGS; touch boinc_job_done`` in a shell of its own; the group."""
        main_cmd = " ".join(["./main", *self.args])
        launch_line = f"echo $$; {main_cmd}; touch boinc_job_done"
        argv = ["sh", "-c", launch_line]
        if self.distro is not None:
            inside = "/" + str(self.slot.relative_to(self.distro))
            enter = ["unshare", "--mount", "--propagation", "private", "--", "sh", "-c", ENTER_DISTRO]
            argv = [*enter, "sh", str(self.distro), "/bin/sh", "-c", f"cd {inside} && {launch_line}"]
        self._app = subprocess.Popen(
            argv,
            cwd=self.slot,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        assert self._app.stdout is not None
        fcntl.fcntl(self._app.stdout.fileno(), F_SETPIPE_SZ, os.sysconf("SC_PAGE_SIZE"))
        first = b""
        while not first.endswith(b"\n"):
            got = os.read(self._app.stdout.fileno(), 1)
            if not got:
                break
            first += got
        self.pgid = int(first)
        self._ctl = subprocess.Popen(
            ["sh"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
        )
        return self.pgid

    def _command(self, cmd: str) -> None:
        assert self._ctl is not None and self._ctl.stdin is not None
        self._ctl.stdin.write(cmd.encode() + b"\n")
        self._ctl.stdin.flush()

    # -- poll_app() ------------------------------------------------------------------
    def poll(self) -> JobStatus:
        """One ``ps`` of the group through the control shell, judged as wsl_wrapper judges it."""
        if self._app is not None:
            self._app.poll()  # reap the launch shell once it ended, as WSL's init does there
        self._command(f"ps --no-headers -g {self.pgid} -o cputime,rss; echo EOM")
        assert self._ctl is not None and self._ctl.stdout is not None
        reply = b""
        deadline = time.monotonic() + CMD_TIMEOUT
        while not reply.endswith(b"EOM\n"):
            got = self._ctl.stdout.readline()
            if not got or time.monotonic() > deadline:
                return JobStatus.FAIL
            reply += got
        usage = Usage()
        for line in reply.decode().splitlines():
            m = _PS_LINE.fullmatch(line)
            if m:
                d, h, mi, s, rss = (int(g or 0) for g in m.groups())
                usage.cpu_time += d * 86400 + h * 3600 + mi * 60 + s
                usage.wss += rss * 1024
                usage.processes += 1
        self.polls.append(usage)
        if usage.processes == 0:
            return JobStatus.SUCCESS if (self.slot / "boinc_job_done").exists() else JobStatus.FAIL
        return JobStatus.IN_PROGRESS

    def suspend(self) -> None:
        self._command(f"kill -STOP {-self.pgid}")

    def resume(self) -> None:
        self._command(f"kill -CONT {-self.pgid}")

    def abort(self) -> None:
        """``abort_job``: SIGKILL to the whole group (quit, abort and a lost client alike)."""
        self._command(f"kill -KILL {-self.pgid}")

    # -- the end -----------------------------------------------------------------------
    def copy_output(self) -> bytes:
        """What the program wrote on its stdout and stderr (read once the job is over)."""
        assert self._app is not None and self._app.stdout is not None
        self.output += self._app.stdout.read()
        self._app.wait(CMD_TIMEOUT)
        return self.output

    def close(self) -> None:
        """End the control shell (and, if still there, the group: nothing may outlive a test)."""
        if self.pgid:
            try:
                os.killpg(self.pgid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        for p in (self._ctl, self._app):
            if p is not None and p.poll() is None:
                p.kill()
                p.wait(CMD_TIMEOUT)

    def run(self, *, until: float, each_poll: object = None) -> JobStatus:
        """wsl_wrapper's main loop: poll every second until the job ends (or ``until``, a
        monotonic deadline, passes: then FAIL). ``each_poll(self)`` may act between polls."""
        while time.monotonic() < until:
            status = self.poll()
            if status is not JobStatus.IN_PROGRESS:
                self.copy_output()
                return status
            if callable(each_poll):
                each_poll(self)
            time.sleep(POLL_PERIOD)
        return JobStatus.FAIL

    def outputs(self) -> dict[str, bytes]:
        """The result's output files, as the client collects them after the final exit."""
        assert self._layout is not None and self._task is not None, "prepare() first"
        found = collect_outputs(self._task, self._layout)
        return {o.name: o.path.read_bytes() for o in found if o.size is not None}

    def group_processes(self) -> list[int]:
        """Processes still in the task's process group (from /proc: no ``ps`` needed)."""
        if self._app is not None:
            self._app.poll()  # the launch shell, once it ended, is reaped as WSL's init does
        pids = []
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit():
                try:
                    fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
                except OSError:
                    continue
                if int(fields[2]) == self.pgid:
                    pids.append(int(entry.name))
        return pids

    def all_stopped(self) -> bool:
        """Every process of the group is stopped (state T), and there is at least one."""
        states = []
        for pid in self.group_processes():
            try:
                states.append(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0])
            except OSError:
                continue
        return bool(states) and all(s == "T" for s in states)

    def group_cpu_ticks(self) -> int:
        """utime + stime of the group's processes, in clock ticks (finer than ``ps``'s seconds)."""
        total = 0
        for pid in self.group_processes():
            try:
                fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            total += int(fields[11]) + int(fields[12])
        return total
