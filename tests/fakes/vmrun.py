#!/usr/bin/env python3
"""A stand-in for VMware's ``vmrun`` 1.17 that enforces its grammar and keeps real state.

It exists so the VMware backend can be tested where VMware cannot run. It is strict
where vmrun is: flags (``-T``, ``-vp``, ``-gu``, ``-gp``) only before the command, ``-T`` one of
``ws|fusion|player``, the .vmx right after the command, the documented number of
parameters, command names case-insensitive. A call that breaks the grammar gets a usage
error (exit 255) so the tests catch backend mistakes. Failures print ``Error: <VIX text>``
on stdout and exit 255 (vmrun's -1), as vmrun does.

State lives in ``$FAKE_VMRUN_STATE`` (a directory): ``config.json`` (guest user and password,
seconds until the Tools run), ``calls.jsonl`` (every argv, for assertions), and one
directory per VM with ``state.json``, the guest filesystem ``root/`` and snapshot copies.

The guest is this host with a private ``/tmp``, ``/var/tmp`` and ``/home`` (the VM's
``root/tmp`` ... bind-mounted in a user + mount namespace with ``unshare``), so guest programs
are real host processes and guest paths keep their names. Where user namespaces are not
available, guest paths under those prefixes are rewritten in the command line instead.
Differences from VMware: a snapshot keeps the guest files and the power state but not the
processes (no memory image). Enabled shared folders appear at /mnt/hgfs/<name>; the guest's
``vmware-rpctool`` reads and writes this fake's guestinfo variables; if the state directory holds
an ``agent.sh``, it is started at power-on like a boot service.

Snapshots VMware keeps in a VM's ``.vmsd`` (``snapshotN.displayName``, ``snapshotN.diskM.fileName``)
are taken over, powered off with an empty guest, when the fake first sees the VM; snapshots the
fake takes itself live in its state only. A linked clone of a ``.vmsd`` snapshot does what
Workstation does to the files: it opens that snapshot's disks (descriptor, extents, the
``parentFileNameHint`` chain; symbolic links are followed) and fails with VMware's "Cannot open
the disk" when one is missing, gives the clone a delta disk whose ``parentFileNameHint`` is the
parent's absolute path, and registers the clone in the source's ``.vmsd``
(``snapshotN.numClones``, which real ``.vmsd`` files carry, and ``snapshotN.cloneK``, a guess),
writing that file in place (through a symbolic link, if it is one).
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import signal
import struct
import sys
import time
import zlib
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

if TYPE_CHECKING:
    import subprocess

# Heavier modules (subprocess, shutil) are imported where used: every vmrun call is a
# fresh interpreter, and the tests make hundreds of them.

WRITABLE = ("/tmp", "/var/tmp", "/home")
USAGE = "vmrun version 1.17.0 build-fake\n\nUsage: vmrun [AUTHENTICATION-FLAGS] COMMAND [PARAMETERS]\n"

# name (lower case) -> (canonical name, takes vmx, min params, max params (-1: any), guest login)
COMMANDS: dict[str, tuple[str, bool, int, int, bool]] = {
    c.lower(): (c, vmx, lo, hi, guest)
    for c, vmx, lo, hi, guest in [
        ("start", True, 0, 1, False),
        ("stop", True, 0, 1, False),
        ("reset", True, 0, 1, False),
        ("suspend", True, 0, 1, False),
        ("pause", True, 0, 0, False),
        ("unpause", True, 0, 0, False),
        ("listSnapshots", True, 0, 1, False),
        ("snapshot", True, 1, 1, False),
        ("deleteSnapshot", True, 1, 2, False),
        ("revertToSnapshot", True, 1, 1, False),
        ("runProgramInGuest", True, 1, -1, True),
        ("fileExistsInGuest", True, 1, 1, True),
        ("directoryExistsInGuest", True, 1, 1, True),
        ("setSharedFolderState", True, 3, 3, False),
        ("addSharedFolder", True, 2, 2, False),
        ("removeSharedFolder", True, 1, 1, False),
        ("enableSharedFolders", True, 0, 1, False),
        ("disableSharedFolders", True, 0, 1, False),
        ("listProcessesInGuest", True, 0, 0, True),
        ("killProcessInGuest", True, 1, 1, True),
        ("runScriptInGuest", True, 2, -1, True),
        ("deleteFileInGuest", True, 1, 1, True),
        ("createDirectoryInGuest", True, 1, 1, True),
        ("deleteDirectoryInGuest", True, 1, 1, True),
        ("CreateTempfileInGuest", True, 0, 0, True),
        ("listDirectoryInGuest", True, 1, 1, True),
        ("CopyFileFromHostToGuest", True, 2, 2, True),
        ("CopyFileFromGuestToHost", True, 2, 2, True),
        ("renameFileInGuest", True, 2, 2, True),
        ("captureScreen", True, 1, 1, True),
        ("writeVariable", True, 3, 3, False),
        ("readVariable", True, 2, 2, False),
        ("getGuestIPAddress", True, 0, 1, False),
        ("list", False, 0, 0, False),
        ("upgradevm", True, 0, 0, False),
        ("installTools", True, 0, 0, False),
        ("checkToolsState", True, 0, 0, False),
        ("deleteVM", True, 0, 0, False),
        ("clone", True, 2, 4, False),
    ]
}


class Fail(Exception):
    """A VIX error: printed as ``Error: ...`` on stdout, exit 255."""


def usage(why: str) -> NoReturn:
    sys.stdout.write(USAGE)
    sys.stderr.write(f"fake-vmrun: grammar: {why}\n")
    sys.exit(255)


def state_dir() -> Path:
    d = os.environ.get("FAKE_VMRUN_STATE")
    if not d:
        sys.stderr.write("fake-vmrun: FAKE_VMRUN_STATE is not set\n")
        sys.exit(255)
    return Path(d)


def config() -> dict[str, Any]:
    p = state_dir() / "config.json"
    cfg: dict[str, Any] = {"guest_user": "boinc", "guest_password": "secret", "tools_delay": 0.2}
    if p.exists():
        cfg.update(json.loads(p.read_text()))
    return cfg


class Vm:
    """The fake's record of one VM, keyed by the real path of its .vmx."""

    def __init__(self, vmx: str) -> None:
        self.vmx = os.path.realpath(vmx)
        self.given = str(Path.cwd() / vmx)  # not resolved: VMware finds the VM's files beside this path
        key = f"{zlib.crc32(self.vmx.encode()):08x}"
        self.dir = state_dir() / "vms" / key
        self.file = self.dir / "state.json"
        if self.file.exists():
            self.s: dict[str, Any] = json.loads(self.file.read_text())
        else:
            self.s = {
                "vmx": self.vmx,
                "power": "off",
                "tools_at": None,
                "snapshots": [],
                "sessions": [],
                "vmx_pid": None,
                "shares": {},
                "next_snap": 0,
            }
            self.reset_root()
            self.take_over_vmsd()

    @property
    def root(self) -> Path:
        return self.dir / "root"

    def reset_root(self) -> None:
        user = config()["guest_user"]
        for sub in ("tmp", "var/tmp", f"home/{user}"):
            (self.dir / "root" / sub).mkdir(parents=True, exist_ok=True)

    def take_over_vmsd(self) -> None:
        """Snapshots the VM's .vmsd lists (VMware's own record), powered off, with an empty guest."""
        for index, snap in sorted(read_vmsd(vmsd_path(self.given)).items()):
            if not snap.get("displayname"):
                continue
            n = self.s["next_snap"]
            self.s["next_snap"] = n + 1
            dest = self.dir / "snapshots" / str(n)
            import shutil

            shutil.copytree(self.root, dest, symlinks=True)
            disks = {
                snap.get(k[: -len("filename")] + "node", k): v
                for k, v in snap.items()
                if re.fullmatch(r"disk\d+\.filename", k)
            }
            self.s["snapshots"].append(
                {"name": snap["displayname"], "dir": str(dest), "power": "off", "vars": {},
                 "vmsd_index": index, "disks": disks}
            )  # fmt: skip
        self.save()

    def save(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        self.file.write_text(json.dumps(self.s, indent=1))

    @property
    def running(self) -> bool:
        return self.s["power"] in ("on", "paused")

    def require_on(self) -> None:
        if not self.running:
            raise Fail(f"The virtual machine is not powered on: {self.vmx}")

    def tools_running(self) -> bool:
        return (
            self.s["power"] == "on" and self.s["tools_at"] is not None and time.time() >= self.s["tools_at"]
        )

    def host_path(self, guest: str) -> Path:
        """Where a guest path lives: under root/ for the private prefixes, else the host's own file."""
        if not guest.startswith("/"):
            raise Fail("The operation is not supported for the specified parameters")
        norm = os.path.normpath(guest)
        for pre in WRITABLE:
            if norm == pre or norm.startswith(pre + "/"):
                return self.root / norm.lstrip("/")
        return Path(norm)

    def writable(self, guest: str) -> bool:
        norm = os.path.normpath(guest)
        return any(norm == p or norm.startswith(p + "/") for p in WRITABLE)

    # -- variables: one file each, so the guest's vmware-rpctool can be a few lines of sh --------
    @property
    def vars_dir(self) -> Path:
        return self.dir / "vars"

    def get_var(self, key: str) -> str | None:
        try:
            return (self.vars_dir / key).read_text()
        except OSError:
            return None

    def set_var(self, key: str, value: str) -> None:
        self.vars_dir.mkdir(parents=True, exist_ok=True)
        tmp = self.vars_dir / f".{key}.{os.getpid()}"
        tmp.write_text(value)
        tmp.replace(self.vars_dir / key)

    def all_vars(self) -> dict[str, str]:
        if not self.vars_dir.is_dir():
            return {}
        return {f.name: f.read_text() for f in self.vars_dir.iterdir() if not f.name.startswith(".")}

    def set_vars(self, values: dict[str, str]) -> None:
        import shutil

        shutil.rmtree(self.vars_dir, ignore_errors=True)
        for k, v in values.items():
            self.set_var(k, v)

    # -- processes ---------------------------------------------------------------------------
    def live_sessions(self) -> list[int]:
        return [sid for sid in self.s["sessions"] if session_members(sid)]

    def signal_all(self, sig: int) -> None:
        for sid in self.s["sessions"]:
            try:
                os.killpg(sid, sig)
            except (ProcessLookupError, PermissionError):
                pass
        pid = self.s["vmx_pid"]
        if pid:
            try:
                os.kill(pid, sig)
            except (ProcessLookupError, PermissionError):
                pass

    def power_down(self) -> None:
        self.signal_all(signal.SIGCONT)
        self.signal_all(signal.SIGKILL)
        self.s.update(power="off", tools_at=None, sessions=[], vmx_pid=None)
        self.set_vars({})  # guestinfo is runtime state

    def power_up(self) -> None:
        import subprocess

        code = "import time\nt=time.process_time()\nwhile time.process_time()-t<0.05: pass\ntime.sleep(1e6)"
        p = subprocess.Popen(  # a process named like vmware-vmx whose command line holds the .vmx path
            ["vmware-vmx", "-c", code, "-s", "vmx.stdio.keep=TRUE", "-@", "duplex=3;msgs=ui", self.vmx],
            executable=sys.executable,
            start_new_session=True,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        self.s.update(power="on", tools_at=time.time() + float(config()["tools_delay"]), vmx_pid=p.pid)
        if (state_dir() / "agent.sh").exists():  # the image's boot service: the boincvm guest agent
            spawn_in_guest(self, '"/bin/sh" /mnt/.fake/agent.sh')


def vmsd_path(vmx: str) -> Path:
    """VMware keeps a VM's snapshot dictionary beside its .vmx, under the same name."""
    return Path(vmx).with_suffix(".vmsd")


_KV = re.compile(r'^\s*([^=\s]+)\s*=\s*"(.*)"\s*$')


def read_vmsd(path: Path) -> dict[int, dict[str, str]]:
    """snapshot index -> its keys (lower case, without ``snapshotN.``)."""
    out: dict[int, dict[str, str]] = {}
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError:
        return out
    for line in lines:
        m = _KV.match(line)
        k = re.match(r"snapshot(\d+)\.(.+)$", m.group(1), re.IGNORECASE) if m else None
        if m and k:
            out.setdefault(int(k.group(1)), {})[k.group(2).lower()] = m.group(2)
    return out


def vmdk_descriptor(path: Path) -> str:
    """The text descriptor of a VMDK: embedded in a KDMV sparse file, or the file itself."""
    with path.open("rb") as f:
        head = f.read(512)
        if head[:4] == b"KDMV":
            offset, size = struct.unpack_from("<QQ", head, 28)
            f.seek(offset * 512)
            return f.read(size * 512).replace(b"\0", b"").decode(errors="replace")
        f.seek(0)
        return f.read(65536).decode(errors="replace")


def open_disk_chain(disk: Path) -> None:
    """Open a disk as VMware would for a linked clone: descriptor, extents, parents (links followed)."""
    seen: set[str] = set()
    while str(disk) not in seen:
        seen.add(str(disk))
        try:
            text = vmdk_descriptor(disk)
        except OSError:
            raise Fail(f"Cannot open the disk '{disk}' or one of the snapshot disks it depends on.") from None
        fields = {}
        for line in text.splitlines():
            e = re.match(r'^(RW|RDONLY|NOACCESS)\s+\d+\s+\w+\s+"([^"]+)"', line.strip())
            if e and not (disk.parent / e.group(2)).is_file() and e.group(2) != disk.name:
                raise Fail(f"Cannot open the disk '{disk}' or one of the snapshot disks it depends on.")
            key, eq, value = line.partition("=")
            if eq:
                fields[key.strip().lower()] = value.strip().strip('"')
        if fields.get("parentcid", "ffffffff").lower() == "ffffffff":
            return
        hint = fields.get("parentfilenamehint", "")
        disk = Path(hint) if hint.startswith("/") else disk.parent / hint


def session_members(sid: int) -> list[tuple[int, str]]:
    out = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            rest = stat[stat.rindex(")") + 2 :].split()
            if rest[0] == "Z" or int(rest[3]) != sid:
                continue
            cmd = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
            out.append((int(entry.name), cmd))
        except (OSError, ValueError, IndexError):
            continue
    return out


_NS_OK: bool | None = None


def namespaces_work() -> bool:
    import subprocess

    global _NS_OK
    if _NS_OK is None:
        try:
            r = subprocess.run(
                ["unshare", "-Urm", "--propagation", "private", "true"],
                capture_output=True,
                timeout=10,
                check=False,
            )
            _NS_OK = r.returncode == 0
        except (OSError, subprocess.TimeoutExpired):
            _NS_OK = False
    return _NS_OK


def shares(vm: Vm) -> dict[str, str]:
    """Enabled shared folders: guest name -> host path (from the .vmx, then runtime changes)."""
    found: dict[str, str] = {}
    try:
        keys = {}
        for line in Path(vm.vmx).read_text(errors="replace").splitlines():
            m = re.match(r'^\s*([^=\s]+)\s*=\s*"(.*)"\s*$', line)
            if m:
                keys[m.group(1).lower()] = m.group(2)
    except OSError:
        keys = {}
    for i in range(int(keys.get("sharedfolder.maxnum", "0") or 0)):
        k = f"sharedfolder{i}."
        if keys.get(k + "present", "").upper() == "TRUE" and keys.get(k + "enabled", "").upper() == "TRUE":
            found[keys.get(k + "guestname", f"share{i}")] = keys.get(k + "hostpath", "")
    if vm.s.get("shares_enabled", True):
        found.update({name: info["path"] for name, info in vm.s["shares"].items()})
    return {n: p for n, p in found.items() if p and Path(p).is_dir()}


def guest_command(vm: Vm, cmdline: str) -> list[str]:
    """The host argv that runs ``cmdline`` the way open-vm-tools does (through a shell) 'in the guest'.

    In the namespace: a tmpfs on /mnt holding the shares at /mnt/hgfs/<name> (where open-vm-tools
    mounts them) and this fake's state at /mnt/.fake (for the guest's vmware-rpctool), then the
    VM's private /home, /var/tmp and /tmp (last: the VM's root may live under the host's /tmp).
    """
    if namespaces_work():
        steps = [
            "mount -t tmpfs tmpfs /mnt",
            "mkdir -p /mnt/.fake /mnt/hgfs",
            'mount --bind "$FAKE_HOST_STATE" /mnt/.fake',
        ]
        for i, (name, host) in enumerate(sorted(shares(vm).items())):
            steps.append(f"export S{i}={_sh_quote(host)}; mkdir -p {_sh_quote('/mnt/hgfs/' + name)}")
            steps.append(f'mount --bind "$S{i}" {_sh_quote("/mnt/hgfs/" + name)}')
        steps += [f'mount --bind "$R{pre}" {pre}' for pre in reversed(WRITABLE) if Path(pre).is_dir()]
        script = "set -e; " + "; ".join(steps) + '; cd /; exec /bin/bash -c "$1"'
        return ["unshare", "-Urm", "--propagation", "private", "/bin/sh", "-c", script, "guest", cmdline]
    for pre in WRITABLE:
        cmdline = re.sub(rf"(?<![\w/.]){re.escape(pre)}(?=/|\b)", str(vm.root) + pre, cmdline)
    return ["/bin/bash", "-c", cmdline]


#: The guest's ``vmware-rpctool "info-get guestinfo.X"`` / ``"info-set guestinfo.X VALUE"``.
RPCTOOL = r"""#!/bin/sh
d=/mnt/.fake/vms/$FAKE_VM_KEY/vars
cmd="$*"; verb=${cmd%% *}; rest=${cmd#* }; name=${rest%% *}
case "$rest" in *" "*) value=${rest#* } ;; *) value="" ;; esac
case "$name" in
  guestinfo.*) key="guestVar:${name#guestinfo.}" ;;
  *) echo "Unknown command" >&2; exit 1 ;;
esac
case "$verb" in
  info-get) [ -f "$d/$key" ] || { echo "No value found" >&2; exit 1; }; cat "$d/$key"; echo ;;
  info-set) mkdir -p "$d" && printf '%s' "$value" > "$d/.$key.$$" && mv "$d/.$key.$$" "$d/$key" ;;
  *) echo "Unknown command" >&2; exit 1 ;;
esac
"""


def spawn_in_guest(vm: Vm, cmdline: str) -> subprocess.Popen[bytes]:
    """Start ``cmdline`` as a guest process in its own session, recorded for ps/kill/pause."""
    import subprocess

    guestbin = state_dir() / "guestbin"
    if not (guestbin / "vmware-rpctool").exists():
        guestbin.mkdir(exist_ok=True)
        shim = guestbin / "vmware-rpctool"
        shim.write_text(RPCTOOL)
        shim.chmod(0o755)
    env = {
        **os.environ,
        "R": str(vm.root),
        "HOME": f"/home/{config()['guest_user']}",
        "FAKE_HOST_STATE": str(state_dir()),
        "FAKE_VMRUN_STATE": "/mnt/.fake",
        "FAKE_VM_KEY": vm.dir.name,
        "PATH": "/mnt/.fake/guestbin" + os.pathsep + os.environ.get("PATH", "/usr/bin:/bin"),
    }
    p = subprocess.Popen(
        guest_command(vm, cmdline),
        env=env,
        start_new_session=True,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        cwd="/",
    )
    vm.s["sessions"] = [sid for sid in vm.s["sessions"] if session_members(sid)] + [p.pid]
    return p


# -- commands ---------------------------------------------------------------------------------
def run(cmd: str, vm: Vm | None, params: list[str], login: tuple[str, str] | None) -> int:
    import shutil

    out = sys.stdout.write
    if cmd == "list":
        vms = []
        for f in sorted((state_dir() / "vms").glob("*/state.json")):
            s = json.loads(f.read_text())
            if s["power"] in ("on", "paused") and Path(s["vmx"]).exists():
                vms.append(s["vmx"])
        out(f"Total running VMs: {len(vms)}\n" + "".join(v + "\n" for v in vms))
        return 0
    assert vm is not None
    if not Path(vm.vmx).is_file():
        raise Fail(f"Cannot open VM: {vm.vmx}, The virtual machine cannot be found")
    if cmd != "deleteVM":
        vmx_text = Path(vm.vmx).read_text(errors="replace")
        if "encryption.keysafe" in vmx_text.lower() and os.environ.get("_FAKE_VP") is None:
            raise Fail("A password is required for this operation")
    if COMMANDS[cmd.lower()][4]:
        guest_checks(vm, login)
    match cmd:
        case "start":
            if params and params[0] not in ("gui", "nogui"):
                usage("start takes gui or nogui")
            if vm.s["power"] == "paused":
                raise Fail("The virtual machine is paused")
            if not vm.running:
                vm.power_up()
        case "stop" | "reset" | "suspend":
            if params and params[0] not in ("hard", "soft"):
                usage(f"{cmd} takes hard or soft")
            vm.require_on()
            if params and params[0] == "soft" and not vm.tools_running():
                raise Fail("The VMware Tools are not running in the virtual machine")
            vm.power_down()
            if cmd == "reset":
                vm.power_up()
        case "pause":
            vm.require_on()
            vm.signal_all(signal.SIGSTOP)
            vm.s["power"] = "paused"
        case "unpause":
            vm.require_on()
            vm.signal_all(signal.SIGCONT)
            vm.s["power"] = "on"
        case "listSnapshots":
            if params and params[0] != "showTree":
                usage("listSnapshots takes showTree")
            names = [s["name"] for s in vm.s["snapshots"]]
            out(f"Total snapshots: {len(names)}\n" + "".join(n + "\n" for n in names))
        case "snapshot":
            n = vm.s["next_snap"]
            vm.s["next_snap"] = n + 1
            dest = vm.dir / "snapshots" / str(n)
            shutil.copytree(vm.root, dest, symlinks=True)
            vm.s["snapshots"].append(
                {"name": params[0], "dir": str(dest), "power": vm.s["power"], "vars": vm.all_vars()}
            )
        case "deleteSnapshot":
            if len(params) == 2 and params[1] != "andDeleteChildren":
                usage("deleteSnapshot takes andDeleteChildren")
            snap = find_snapshot(vm, params[0])
            vm.s["snapshots"].remove(snap)
            shutil.rmtree(snap["dir"], ignore_errors=True)
        case "revertToSnapshot":
            snap = find_snapshot(vm, params[0])
            was = vm.s["power"]
            if was != "off":
                vm.power_down()
            shutil.rmtree(vm.root)
            shutil.copytree(snap["dir"], vm.root, symlinks=True)
            if snap["power"] != "off":
                vm.power_up()
                vm.set_vars(dict(snap["vars"]))
        case "checkToolsState":
            state = "running" if vm.tools_running() else ("installed" if vm.running else "unknown")
            out(state + "\n")
            return 0 if state == "running" else 254
        case "runProgramInGuest" | "runScriptInGuest":
            return run_program(vm, cmd, params)
        case "listProcessesInGuest":
            procs = [(1, "root", "/sbin/init")]
            for sid in vm.s["sessions"]:
                procs += [(pid, login[0] if login else "root", c) for pid, c in session_members(sid)]
            out(
                f"Process list: {len(procs)}\n"
                + "".join(f"pid={p}, owner={o}, cmd={c}\n" for p, o, c in procs)
            )
        case "killProcessInGuest":
            pid = int(params[0]) if params[0].isdigit() else -1
            if not any(pid == p for sid in vm.s["sessions"] for p, _ in session_members(sid)):
                raise Fail("The process could not be found in the guest")  # placeholder VIX text
            os.kill(pid, signal.SIGTERM)
        case "fileExistsInGuest":
            p = vm.host_path(params[0])
            out("The file exists.\n" if p.is_file() else "The file does not exist.\n")
            return 0 if p.is_file() else 255
        case "directoryExistsInGuest":
            p = vm.host_path(params[0])
            out("The directory exists.\n" if p.is_dir() else "The directory does not exist.\n")
            return 0 if p.is_dir() else 255
        case "CopyFileFromHostToGuest":
            host_src, guest_dst = Path(params[0]), params[1]
            if not host_src.is_file():
                raise Fail("A file was not found")
            target = vm.host_path(guest_dst)
            if not vm.writable(guest_dst):
                raise Fail("Insufficient permissions in the guest operating system")
            if not target.parent.is_dir():
                raise Fail("A file was not found")
            shutil.copyfile(host_src, target)
        case "CopyFileFromGuestToHost":
            guest_src = vm.host_path(params[0])
            if not guest_src.is_file():
                raise Fail("A file was not found")
            host_dst = Path(params[1])
            if not host_dst.parent.is_dir():
                raise Fail("A file was not found")
            shutil.copyfile(guest_src, host_dst)
        case "deleteFileInGuest":
            p = vm.host_path(params[0])
            if not p.is_file():
                raise Fail("A file was not found")
            p.unlink()
        case "createDirectoryInGuest":
            p = vm.host_path(params[0])
            if not p.parent.is_dir():
                raise Fail("A file was not found")
            p.mkdir()
        case "deleteDirectoryInGuest":
            shutil.rmtree(vm.host_path(params[0]))
        case "listDirectoryInGuest":
            p = vm.host_path(params[0])
            if not p.is_dir():
                raise Fail("A file was not found")
            names = sorted(x.name for x in p.iterdir())
            out(f"Directory list: {len(names)}\n" + "".join(n + "\n" for n in names))
        case "CreateTempfileInGuest":
            n = len(list((vm.root / "tmp").iterdir()))
            path = f"/tmp/vmware{n}"
            vm.host_path(path).touch()
            out(path + "\n")
        case "renameFileInGuest":
            vm.host_path(params[0]).rename(vm.host_path(params[1]))
        case "writeVariable" | "readVariable":
            kind = params[0]
            if kind not in ("guestVar", "runtimeConfig", "guestEnv"):
                usage(f"{cmd}: variable type must be guestVar, runtimeConfig or guestEnv, not {kind}")
            if kind == "guestEnv":
                guest_checks(vm, login)
            vm.require_on()
            if cmd == "writeVariable":
                vm.set_var(f"{kind}:{params[1]}", params[2])
            else:
                out((vm.get_var(f"{kind}:{params[1]}") or "") + "\n")
        case "enableSharedFolders" | "disableSharedFolders":
            vm.s["shares_enabled"] = cmd == "enableSharedFolders"
        case "addSharedFolder":
            vm.s["shares"][params[0]] = {"path": params[1], "writable": True}
        case "setSharedFolderState":
            if params[2] not in ("writable", "readonly"):
                usage("setSharedFolderState takes writable or readonly")
            if params[0] not in vm.s["shares"]:
                raise Fail("The shared folder was not found")  # placeholder VIX text
            vm.s["shares"][params[0]] = {"path": params[1], "writable": params[2] == "writable"}
        case "removeSharedFolder":
            vm.s["shares"].pop(params[0], None)
        case "getGuestIPAddress":
            vm.require_on()
            if not vm.tools_running():
                raise Fail("The VMware Tools are not running in the virtual machine")
            out("192.168.56.101\n")
        case "clone":
            return clone(vm, params)
        case "deleteVM":
            if vm.running:
                raise Fail("The virtual machine should not be powered on. It is already running.")
            Path(vm.vmx).unlink()
            shutil.rmtree(vm.dir, ignore_errors=True)
            return 0
        case "upgradevm" | "installTools" | "captureScreen":
            raise Fail("The operation is not supported for the specified parameters")
    vm.save()
    return 0


def guest_checks(vm: Vm, login: tuple[str, str] | None) -> None:
    vm.require_on()
    if vm.s["power"] == "paused":
        raise Fail("The virtual machine is paused")  # placeholder: real VIX waits or fails
    if not vm.tools_running():
        raise Fail("The VMware Tools are not running in the virtual machine")
    if login is None:
        raise Fail("Anonymous guest operations are not allowed on this virtual machine")
    cfg = config()
    if login != (cfg["guest_user"], cfg["guest_password"]):
        raise Fail("Invalid user name or password for the guest OS")


def find_snapshot(vm: Vm, name: str) -> dict[str, Any]:
    for snap in vm.s["snapshots"]:
        if snap["name"] == name:
            return dict(snap)
    raise Fail(f"Invalid snapshot name '{name}'")


def run_program(vm: Vm, cmd: str, params: list[str]) -> int:
    flags = []
    while params and params[0] in ("-noWait", "-activeWindow", "-interactive"):
        flags.append(params.pop(0))
    if cmd == "runProgramInGuest":
        if not params:
            usage("runProgramInGuest needs a program")
        program, args = params[0], params[1:]
        if not program.startswith("/") or not vm.host_path(program).exists():
            raise Fail("A file was not found")
        cmdline = f'"{program}" ' + " ".join(args)
    else:
        if len(params) != 2:
            usage("runScriptInGuest takes an interpreter and a script")
        cmdline = f'"{params[0]}" -c ' + _sh_quote(params[1])
    p = spawn_in_guest(vm, cmdline)
    vm.save()
    if "-noWait" in flags:
        return 0
    release_lock()
    rc = p.wait()
    if rc != 0:
        sys.stdout.write(f"Guest program exited with non-zero exit code: {rc}\n")
        return 255
    return 0


def _sh_quote(s: str) -> str:
    return "'" + s.replace("'", "'\"'\"'") + "'"


def clone(src: Vm, params: list[str]) -> int:
    import shutil

    dst, mode, rest = params[0], params[1], params[2:]
    if mode not in ("full", "linked"):
        usage("clone takes full or linked")
    snapshot = None
    for opt in rest:
        if opt.startswith("-snapshot="):
            snapshot = opt.split("=", 1)[1]
        elif not opt.startswith("-cloneName="):
            usage(f"clone: unknown option {opt}")
    if mode == "linked" and snapshot is None:
        raise Fail("The operation is not supported for the specified parameters")
    if Path(dst).exists():
        raise Fail("The destination file already exists")  # placeholder VIX text
    if not Path(dst).parent.is_dir():
        raise Fail("A file was not found")
    snap = find_snapshot(src, snapshot) if snapshot else None
    root = snap["dir"] if snap else str(src.root)
    vmx_text = Path(src.vmx).read_text()
    if mode == "linked" and snap is not None and "vmsd_index" in snap:
        # Workstation: the clone's disks are deltas on the snapshot's disks, named by absolute path.
        src_dir = Path(src.given).parent
        for i, (node, name) in enumerate(sorted(snap["disks"].items())):
            parent = src_dir / name
            open_disk_chain(parent)
            delta = Path(dst).with_name(f"{Path(dst).stem}-cl{i + 1}.vmdk")
            delta.write_text(
                f"# Disk DescriptorFile\nversion=1\nCID=fffffffe\nparentCID=fffffffe\n"
                f'createType="monolithicSparse"\nparentFileNameHint="{parent}"\n'
                f'RW 8388608 SPARSE "{delta.name}"\n'
            )
            vmx_text = re.sub(
                rf'(?im)^({re.escape(node)}\.fileName\s*=\s*)".*"$', rf'\g<1>"{delta.name}"', vmx_text
            )
        register_clone(vmsd_path(src.given), snap["vmsd_index"], dst)
    Path(dst).write_text(vmx_text)
    new = Vm(dst)
    shutil.rmtree(new.root)
    shutil.copytree(root, new.root, symlinks=True)
    new.s["parent"] = src.vmx
    new.save()
    return 0


def register_clone(vmsd: Path, index: int, clone_vmx: str) -> None:
    """Record a linked clone in the source's .vmsd, as Workstation does (in place, through links)."""
    text = vmsd.read_text(errors="replace")
    n = int(read_vmsd(vmsd).get(index, {}).get("numclones", "0") or 0)
    text = re.sub(rf"(?im)^snapshot{index}\.numClones\s*=.*\n?", "", text)
    text += f'snapshot{index}.numClones = "{n + 1}"\nsnapshot{index}.clone{n} = "{clone_vmx}"\n'
    with vmsd.open("w") as f:  # open(2) on the path: a symbolic link is written through
        f.write(text)


_LOCK_FD: int | None = None


def take_lock() -> None:
    global _LOCK_FD
    d = state_dir()
    d.mkdir(parents=True, exist_ok=True)
    _LOCK_FD = os.open(d / "lock", os.O_CREAT | os.O_RDWR)
    fcntl.flock(_LOCK_FD, fcntl.LOCK_EX)


def release_lock() -> None:
    global _LOCK_FD
    if _LOCK_FD is not None:
        os.close(_LOCK_FD)
        _LOCK_FD = None


def main(argv: list[str]) -> int:
    args = list(argv)
    if not args:
        sys.stdout.write(USAGE)
        return 255
    login_user = login_pw = None
    host_type = None
    while args and args[0].startswith("-"):
        flag = args.pop(0)
        if flag not in ("-T", "-vp", "-gu", "-gp") or not args:
            usage(f"unknown or incomplete flag {flag}")
        value = args.pop(0)
        if flag == "-T":
            if value not in ("ws", "fusion", "player"):
                usage(f"-T {value}: host type must be ws, fusion or player")
            host_type = value
        elif flag == "-gu":
            login_user = value
        elif flag == "-gp":
            login_pw = value
        elif flag == "-vp":
            os.environ["_FAKE_VP"] = value
    if not args:
        usage("no command")
    name = args.pop(0)
    spec = COMMANDS.get(name.lower())
    if spec is None:
        sys.stdout.write(f"Error: Unrecognized command: {name}\n")
        return 255
    canonical, takes_vmx, lo, hi, _guest = spec
    vm = None
    products = config().get("host_types", ["ws", "fusion", "player"])
    if (host_type or "ws") not in products:
        provider = {"ws": "WORKSTATION", "fusion": "WORKSTATION", "player": "PLAYER"}[host_type or "ws"]
        sys.stdout.write(f"Error: Unable to connect to host (VIX_SERVICEPROVIDER_VMWARE_{provider})\n")
        return 255
    take_lock()
    with (state_dir() / "calls.jsonl").open("a") as f:
        f.write(json.dumps({"argv": argv, "host_type": host_type}) + "\n")
    if takes_vmx:
        if not args:
            usage(f"{canonical} needs the path of a .vmx")
        path = args.pop(0)
        if not path.lower().endswith(".vmx"):
            # vmrun reads whatever follows the command as the VM: misplaced flags land here.
            sys.stdout.write(f"Error: Cannot open VM: {path}, unknown file suffix\n")
            return 255
        vm = Vm(path)
    if "-gu" in args or "-gp" in args or "-T" in args:
        usage("flags must come before the command")
    if len(args) < lo or (hi >= 0 and len(args) > hi):
        usage(f"{canonical} takes {lo}..{hi if hi >= 0 else 'n'} parameters, got {len(args)}")
    if (login_user is None) != (login_pw is None):
        usage("-gu and -gp go together")
    login = (login_user, login_pw) if login_user is not None and login_pw is not None else None
    try:
        return run(canonical, vm, args, login)
    except Fail as exc:
        if vm is not None and Path(vm.vmx).exists():
            vm.save()
        sys.stdout.write(f"Error: {exc}\n")
        return 255


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
