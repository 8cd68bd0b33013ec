"""A generic older Linux host for the tests: a minimal Debian 11 root (glibc 2.31), nothing else.

The root file system comes from ``mmdebstrap --variant=minbase bullseye`` (about 100 MB):
no Python, no QEMU, the glibc a volunteer on Debian 11 has. It is built once and cached by
its recipe under the boincvm cache (``<cache>/test-roots/<name>-<hash>``), built in a
temporary directory next to it and renamed into place, like the guest image. The cached
root is not written: :func:`run_in_root` bind-mounts one host directory read-only at
``/mnt/boincvm`` for the program under test and a fresh tmpfs on ``/tmp``, inside a private
mount namespace (``unshare -m``), so every mount vanishes with the command.

Needs root (chroot and mounts). ``python -m tests.old_host`` builds the cached root.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

from boincvm import proc
from boincvm.cache import cache_root

#: Bumped whenever the build steps change in a way the arguments do not show.
BUILD_VERSION = 1
SUITE = "bullseye"
MMDEBSTRAP_ARGS = ("--variant=minbase", SUITE)
MARKER = ".boincvm-root.json"
#: Where :func:`run_in_root` mounts the host directory inside the root.
MOUNT_POINT = "/mnt/boincvm"
#: Debian's default PATH for root.
PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

#: ``sh -c ENTER sh ROOT HOSTDIR CMD...``: /proc, a fresh tmpfs /tmp (the only writable
#: place the command needs) and the host directory mounted, then chroot with a clean
#: environment.
ENTER = (
    "set -e; root=$1; dir=$2; shift 2; "
    'mount -t proc proc "$root/proc"; '
    'mount -t tmpfs -o mode=1777 tmp "$root/tmp"; '
    f'mkdir -p "$root{MOUNT_POINT}"; '
    f'mount --bind "$dir" "$root{MOUNT_POINT}"; '
    f'mount -o remount,bind,ro "$root{MOUNT_POINT}"; '
    f'exec chroot "$root" /usr/bin/env -i PATH={PATH} LANG=C.UTF-8 "$@"'
)


def recipe_digest() -> str:
    """The cache key: the mmdebstrap arguments and the build version."""
    raw = json.dumps({"args": MMDEBSTRAP_ARGS, "build": BUILD_VERSION}).encode()
    return hashlib.sha256(raw).hexdigest()


def _is_built(target: Path, digest: str) -> bool:
    with contextlib.suppress(OSError, ValueError):
        return bool(json.loads((target / MARKER).read_text())["digest"] == digest)
    return False


def build_root() -> Path:
    """The cached minimal bullseye root (built first if needed; about 20-60 s here).

    Raises:
        CommandFailed: mmdebstrap failed.
    """
    digest = recipe_digest()
    target = cache_root() / "test-roots" / f"{SUITE}-minbase-{digest[:16]}"
    if _is_built(target, digest):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.build-"))
    try:
        root = work / "root"
        proc.run(["mmdebstrap", "-q", *MMDEBSTRAP_ARGS, str(root)], timeout=1800)
        # The mount point exists in the cached root, so entering it never writes there.
        (root / MOUNT_POINT.lstrip("/")).mkdir(parents=True, exist_ok=True)
        (root / MARKER).write_text(json.dumps({"digest": digest, "args": MMDEBSTRAP_ARGS}))
        try:
            root.rename(target)
        except OSError:
            if not _is_built(target, digest):  # a concurrent build won the race: fine
                raise
        return target
    finally:
        shutil.rmtree(work, ignore_errors=True)


def glibc_version(root: Path) -> tuple[int, int]:
    """The root's glibc version, from its ``libc.so.6`` link target or file name
    (``libc-2.31.so`` on Debian 11)."""
    for libdir in ("usr/lib/x86_64-linux-gnu", "lib/x86_64-linux-gnu"):
        for f in sorted((root / libdir).glob("libc-*.so")):
            major, minor = f.name.removeprefix("libc-").removesuffix(".so").split(".")[:2]
            return int(major), int(minor)
    raise FileNotFoundError(f"no libc-X.Y.so in {root}")


def run_in_root(
    root: Path, host_dir: Path, *cmd: str, cwd: str = "/", timeout: float = 120, check: bool = True
) -> proc.Completed:
    """Run ``cmd`` inside ``root`` with ``host_dir`` mounted read-only at :data:`MOUNT_POINT`.

    Raises:
        RuntimeError: not running as root.
        CommandFailed: the command exited non-zero (with ``check``).
    """
    if os.geteuid() != 0:
        raise RuntimeError("entering the Debian 11 root needs root: it chroots and mounts /proc")
    prefix = ["unshare", "--mount", "--propagation", "private", "--", "sh", "-c", ENTER, "sh"]
    inner = ["sh", "-c", 'cd "$1" && shift && exec "$@"', "sh", cwd, *cmd]
    return proc.run([*prefix, str(root), str(host_dir), *inner], timeout=timeout, check=check)


if __name__ == "__main__":
    print(build_root())
