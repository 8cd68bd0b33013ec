"""A bare, older volunteer host for the tests: Debian 11 (glibc 2.31) with boinc-client 7.16 only.

The root file system comes from ``mmdebstrap --variant=apt --include=boinc-client bullseye``
with python3 (pulled in by boinc-client's helper scripts) purged afterwards, so the host has
neither Python nor QEMU. It is built once and cached by its recipe under the boincvm cache
(``<cache>/test-roots/<hash>``), built in a temporary directory next to it and renamed into
place, like the guest image. The cached root is never written: the client tests work on a
copy, and :func:`run_in_root` (the frozen wrapper and the bundled QEMU on glibc 2.31) only
mounts over it in a private mount namespace.

:class:`BareHost` enters the root the way a volunteer's machine runs the client: a private
mount namespace (``unshare -m``, so the mounts vanish with the last process in it) with
``/proc``, ``/sys``, ``/dev`` and a fresh ``/dev/shm``, then ``chroot`` and a clean
environment. It shares the host's network namespace, so the loopback project on 127.0.0.1
is reachable. Needs root.

``python -m tests.bare_host`` builds the cached root (scripts/bootstrap.sh calls it).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

from boincvm import proc
from boincvm.cache import cache_root
from boincvm.runlocal.real_client import ClientLauncher
from tests.cached_build import cached

#: Bumped whenever the build steps change in a way the arguments do not show.
BUILD_VERSION = 1
SUITE = "bullseye"
#: python3 first: its prerm needs py3clean, which needs the interpreter the second purge removes.
PURGES = (
    ("python3",),
    (
        "python3.9",
        "libpython3-stdlib",
        "libpython3.9-stdlib",
        "python3-minimal",
        "python3.9-minimal",
        "libpython3.9-minimal",
    ),
)
MMDEBSTRAP_ARGS = (
    "--variant=apt",
    "--include=boinc-client",
    *(f'--customize-hook=chroot "$1" dpkg --purge --force-depends {" ".join(p)}' for p in PURGES),
    SUITE,
)
MARKER = ".boincvm-root.json"
#: Where the tests' client data directories go inside the root.
DATA_DIRS = "var/lib/boincvm-test"
#: The PATH the client runs with on the bare host (Debian's default for root).
PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
#: Names of interpreters and hypervisors the bare host must not have.
FOREIGN = re.compile(r"^(python[0-9.]*|libpython.*|qemu-.*)$")

#: Runs ``ROOT CMD...``: mounts what a booted host has, then enters the root with a clean
#: environment (HOME as Debian's boinc-client service has it).
ENTER = (
    "set -e; root=$1; shift; "
    'mount -t proc proc "$root/proc"; '
    'mount --rbind /sys "$root/sys"; '
    'mount --rbind /dev "$root/dev"; '
    'mount -t tmpfs -o mode=1777,nosuid,nodev shm "$root/dev/shm"; '
    f'exec chroot "$root" /usr/bin/env -i PATH={PATH} HOME=/var/lib/boinc-client LANG=C.UTF-8 "$@"'
)


#: Where :func:`run_in_root` mounts a host directory inside the root (Debian's empty /mnt).
MOUNT_POINT = "/mnt"
#: ``sh -c ENTER_WITH_DIR sh ROOT HOSTDIR CMD...``: /proc, a fresh tmpfs /tmp and the host
#: directory mounted read-only, then chroot with a clean environment. Nothing is written
#: to ROOT: the mounts live in the private mount namespace and vanish with it.
ENTER_WITH_DIR = (
    "set -e; root=$1; dir=$2; shift 2; "
    'mount -t proc proc "$root/proc"; '
    'mount -t tmpfs -o mode=1777 tmp "$root/tmp"; '
    f'mount --bind "$dir" "$root{MOUNT_POINT}"; '
    f'mount -o remount,bind,ro "$root{MOUNT_POINT}"; '
    f'exec chroot "$root" /usr/bin/env -i PATH={PATH} LANG=C.UTF-8 "$@"'
)


def recipe_digest() -> str:
    """The cache key: the mmdebstrap arguments and the build version."""
    raw = json.dumps({"args": MMDEBSTRAP_ARGS, "build": BUILD_VERSION}).encode()
    return hashlib.sha256(raw).hexdigest()


def make_root(dest: Path) -> None:
    """Run the recipe: a fresh bullseye root at ``dest`` (not cached; :func:`build_root` caches).

    Raises:
        CommandFailed: mmdebstrap failed.
    """
    proc.run(["mmdebstrap", "-q", *MMDEBSTRAP_ARGS, str(dest)], timeout=1800)


def build_root() -> Path:
    """The cached bullseye root (built first if needed; about 15-50 s and 150 MB)."""
    digest = recipe_digest()
    target = cache_root() / "test-roots" / f"{SUITE}-boinc-{digest[:16]}"
    return cached(target, digest, make_root, marker=MARKER, facts={"args": MMDEBSTRAP_ARGS})


def glibc_version(root: Path) -> tuple[int, int]:
    """The root's glibc version, from its ``libc-X.Y.so`` file (``libc-2.31.so`` on Debian 11)."""
    for libdir in ("usr/lib/x86_64-linux-gnu", "lib/x86_64-linux-gnu"):
        for f in sorted((root / libdir).glob("libc-*.so")):
            major, minor = f.name.removeprefix("libc-").removesuffix(".so").split(".")[:2]
            return int(major), int(minor)
    raise FileNotFoundError(f"no libc-X.Y.so in {root}")


def run_in_root(
    root: Path, host_dir: Path, *cmd: str, cwd: str = "/", timeout: float = 120, check: bool = True
) -> proc.Completed:
    """Run ``cmd`` inside the cached ``root`` with ``host_dir`` read-only at :data:`MOUNT_POINT`.

    Raises:
        RuntimeError: not running as root.
        CommandFailed: the command exited non-zero (with ``check``).
    """
    if os.geteuid() != 0:
        raise RuntimeError("entering the Debian 11 root needs root: it chroots and mounts /proc")
    prefix = ["unshare", "--mount", "--propagation", "private", "--", "sh", "-c", ENTER_WITH_DIR, "sh"]
    inner = ["sh", "-c", 'cd "$1" && shift && exec "$@"', "sh", cwd, *cmd]
    return proc.run([*prefix, str(root), str(host_dir), *inner], timeout=timeout, check=check)


def foreign_tools(root: Path, *, skip: tuple[Path, ...] = ()) -> list[str]:
    """Interpreters and hypervisors on ``root`` (files named python*, libpython*, qemu-*),
    as paths inside it; directories below ``skip`` (host paths) are not looked at."""
    found = []
    skipped = {p.resolve() for p in skip}
    for top in ("usr", "bin", "sbin", "lib", "lib64", "opt", "etc", "var", "root", "tmp"):
        base = root / top
        if base.is_symlink() or not base.is_dir():
            continue  # usrmerge: /bin is a link into /usr
        for dirpath, dirnames, filenames in os.walk(base):
            here = Path(dirpath)
            dirnames[:] = [d for d in dirnames if (here / d).resolve() not in skipped]
            found += ["/" + str((here / f).relative_to(root)) for f in filenames if FOREIGN.match(f)]
    return sorted(found)


@dataclass(frozen=True)
class BareHost:
    """A private copy of the bullseye root, entered through :data:`ENTER`."""

    root: Path

    @classmethod
    def copy_of(cls, cached: Path, dest: Path) -> BareHost:
        """A copy of ``cached`` at ``dest`` (ownership and modes kept).

        Raises:
            RuntimeError: not running as root (entering the root needs chroot and mounts).
        """
        if os.geteuid() != 0:
            raise RuntimeError("the bare-host tests need root: they chroot and mount /proc, /sys and /dev")
        proc.run(["cp", "-a", "--reflink=auto", str(cached), str(dest)], timeout=600)
        return cls(dest)

    @property
    def launcher(self) -> ClientLauncher:
        """Runs the root's own ``boinc`` inside it."""
        return ClientLauncher(
            prefix=(
                "unshare",
                "--mount",
                "--propagation",
                "private",
                "--",
                "sh",
                "-c",
                ENTER,
                "sh",
                str(self.root),
            ),
            root=self.root,
        )

    def run(self, *cmd: str, timeout: float = 60) -> proc.Completed:
        """Run ``cmd`` inside the root and wait for it (raises on a non-zero exit)."""
        return proc.run([*self.launcher.prefix, *cmd], timeout=timeout)

    def data_dir(self, name: str) -> Path:
        """A fresh client data directory inside the root (host path)."""
        d = self.root / DATA_DIRS / name
        d.mkdir(parents=True)
        return d


if __name__ == "__main__":
    print(build_root())
