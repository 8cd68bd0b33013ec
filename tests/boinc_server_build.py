"""BOINC's server built from source for the tests (Debian ships none), cached by content.

The source is, in this order:

1. ``$BOINCVM_BOINC_SOURCE``: a tarball (``git archive`` style, one top directory) or a
   checkout directory, taken as it is;
2. ``boinc-c5c6cb79b9.tar.xz`` in a ``vendor/`` directory of any sibling directory of this
   checkout (``<checkout>/../*/vendor/``), accepted only if its sha256 is :data:`PINNED_SHA256`;
3. a clone of :data:`GIT_URL` at :data:`PINNED_COMMIT`, kept under the cache.

The server part only is built (``_autosetup``, ``configure`` with :data:`CONFIGURE_FLAGS`,
``make -C lib`` alone first because lib/'s Makefile races under ``-j``, then ``make -jN``), in a
temporary directory next to its place and renamed into ``<cache>/boinc-server/<key>``, the key
being the sha256 of the source's content (a tarball's bytes; a clean git checkout's tree id,
else every file), the configure flags and :data:`BUILD_VERSION`. The build tree is what
``tools/make_project --srcdir`` wants; its BOINC libraries are linked statically, and its
``boinc_path_config.py`` files find the tree from where they lie, so the rename is safe.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from boincvm import proc
from boincvm.cache import cache_root
from boincvm.errors import CommandFailed
from boincvm.hashing import sha256_file
from tests.cached_build import cached

#: The BOINC/boinc commit the tests build (master, 2026-08-21, "BOINC 8.3.0").
PINNED_COMMIT = "c5c6cb79b9aa4747d80d066e3627c22f2c124144"
#: sha256 of ``boinc-c5c6cb79b9.tar.xz``, the vendored tarball of that commit.
PINNED_SHA256 = "91fa49bff5d19f5d40c39ea5dcd12fd68c6e26490f2aef505f5c3e864e3093b8"
TARBALL_NAME = f"boinc-{PINNED_COMMIT[:10]}.tar.xz"
GIT_URL = "https://github.com/BOINC/boinc"
#: Names a tarball or a checkout directory to build instead of the vendored tarball.
SOURCE_ENV = "BOINCVM_BOINC_SOURCE"
CONFIGURE_FLAGS = ("--enable-server", "--disable-client", "--disable-manager")
#: Bumped whenever the build steps change in a way the key does not show.
BUILD_VERSION = 1
MARKER = ".boincvm-server.json"


# -- the source --------------------------------------------------------------------------


@dataclass(frozen=True)
class Source:
    """Where BOINC's source is and the sha256 that names its content."""

    path: Path
    kind: Literal["tarball", "directory"]
    digest: str


def checkout() -> Path:
    """This repository's checkout (the parent of ``tests/``)."""
    return Path(__file__).resolve().parents[1]


def _git(path: Path, *args: str, timeout: float = 120) -> str:
    return proc.run(["git", "-c", "safe.directory=*", "-C", str(path), *args], timeout=timeout).text


def _walk_digest(path: Path) -> str:
    """sha256 over every file's relative path, executable bit and content (``.git`` left out)."""
    h = hashlib.sha256()
    for dirpath, dirnames, filenames in os.walk(path):
        dirnames[:] = sorted(d for d in dirnames if d != ".git")
        for name in sorted(filenames):
            f = Path(dirpath) / name
            rel = str(f.relative_to(path))
            if f.is_symlink():
                h.update(f"L {rel} {f.readlink()}\n".encode())
            elif f.is_file():
                h.update(f"F {rel} {os.access(f, os.X_OK):d} {sha256_file(f)}\n".encode())
    return h.hexdigest()


def directory_digest(path: Path) -> str:
    """A content key for a source directory: a clean git checkout's tree id, else the files' hash."""
    if (path / ".git").exists():
        with contextlib.suppress(CommandFailed):
            tree = _git(path, "rev-parse", "HEAD^{tree}").strip()
            if not _git(path, "status", "--porcelain", "--untracked-files=all").strip():
                return hashlib.sha256(f"git-tree {tree}".encode()).hexdigest()
    return _walk_digest(path)


def clone_pinned() -> Path:
    """A checkout of :data:`GIT_URL` at :data:`PINNED_COMMIT` under the cache (fetched once)."""
    target = cache_root() / "boinc-server" / f"src-{PINNED_COMMIT[:16]}"
    if (target / "configure.ac").exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.clone-"))
    try:
        repo = work / "boinc"
        proc.run(["git", "init", "-q", str(repo)], timeout=60)
        _git(repo, "fetch", "-q", "--depth", "1", GIT_URL, PINNED_COMMIT, timeout=1800)
        _git(repo, "checkout", "-q", "FETCH_HEAD", timeout=600)
        with contextlib.suppress(FileExistsError, OSError):
            repo.rename(target)
        return target
    finally:
        shutil.rmtree(work, ignore_errors=True)


def find_source() -> Source:
    """BOINC's source, looked up as the module docstring says."""
    named = os.environ.get(SOURCE_ENV)
    if named:
        p = Path(named).expanduser().resolve()
        if p.is_dir():
            return Source(p, "directory", directory_digest(p))
        if p.is_file():
            return Source(p, "tarball", sha256_file(p))
        raise FileNotFoundError(f"{SOURCE_ENV}={named}: no such tarball or directory")
    for candidate in sorted(checkout().parent.glob(f"*/vendor/{TARBALL_NAME}")):
        if sha256_file(candidate) == PINNED_SHA256:
            return Source(candidate.resolve(), "tarball", PINNED_SHA256)
    repo = clone_pinned()
    return Source(repo, "directory", directory_digest(repo))


# -- the build ---------------------------------------------------------------------------


def build_key(source: Source) -> str:
    """The cache key: the source's content, the configure flags and :data:`BUILD_VERSION`."""
    raw = json.dumps({"source": source.digest, "flags": CONFIGURE_FLAGS, "build": BUILD_VERSION})
    return hashlib.sha256(raw.encode()).hexdigest()


def _unpack(source: Source, dest: Path) -> None:
    if source.kind == "directory":
        shutil.copytree(source.path, dest, symlinks=True, ignore=shutil.ignore_patterns(".git"))
        return
    unpacked = dest.parent / ".unpacked"
    unpacked.mkdir()
    proc.run(["tar", "-xf", str(source.path), "-C", str(unpacked), "--no-same-owner"], timeout=600)
    (top,) = list(unpacked.iterdir())
    top.rename(dest)
    unpacked.rmdir()


def _relocatable(tree: Path) -> None:
    """configure writes the build directory into every ``boinc_path_config.py`` (make_project
    reads it to find the programs): make each find its tree from its own place instead."""
    for f in tree.glob("*/boinc_path_config.py"):
        text = re.sub(
            r'^TOP_BUILD_DIR = ".*"$',
            "TOP_BUILD_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))",
            f.read_text(),
            flags=re.M,
        )
        f.write_text(text)


def make_server(source: Source, tree: Path, *, jobs: int) -> None:
    """Unpack ``source`` to ``tree`` and build the server there (not cached; see :func:`build_server`).

    Raises:
        CommandFailed: a build step failed (its output is in ``tree/boincvm-build.log``).
    """
    _unpack(source, tree)
    build_log = tree / "boincvm-build.log"
    steps: list[tuple[list[str], float]] = [
        (["./_autosetup"], 900),
        (["./configure", *CONFIGURE_FLAGS], 900),
        (["make", "-C", "lib"], 3600),
        (["make", f"-j{jobs}"], 3600),
    ]
    for argv, timeout in steps:
        done = proc.run(argv, cwd=tree, timeout=timeout, check=False)
        with build_log.open("ab") as log:
            log.write(f"\n+ {' '.join(argv)}\n".encode() + done.stdout + done.stderr)
        if done.returncode != 0:
            raise CommandFailed(argv, done.returncode, proc.tail(done.stderr or done.stdout))
    _relocatable(tree)


def build_server(source: Source | None = None, *, jobs: int | None = None) -> Path:
    """The cached server build tree (built first if needed: minutes), the ``--srcdir`` of make_project."""
    source = source or find_source()
    key = build_key(source)
    target = cache_root() / "boinc-server" / key[:16]
    facts = {"source": str(source.path), "digest": source.digest, "flags": CONFIGURE_FLAGS}
    return cached(
        target,
        key,
        lambda tree: make_server(source, tree, jobs=jobs or os.cpu_count() or 1),
        marker=MARKER,
        facts=facts,
    )
