"""Read and check guest packages someone else built, without installing or unpacking them.

RPMs are read with ``rpmfile`` (headers: names, modes, sizes, link targets, scriptlets);
tarballs with ``tarfile``. :func:`check_package` refuses what must never reach a guest:
paths outside the allowed prefixes or with ``..``, device and FIFO files, setuid/setgid
files (unless allowed), symlinks pointing outside the allowed prefixes, payloads the
guest's installer cannot read, and sizes beyond the limit.
"""

from __future__ import annotations

import enum
import posixpath
import stat
import tarfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from boincvm.errors import PackageError
from boincvm.findings import Finding, error, info, warning

DEFAULT_PREFIXES = ("/opt/", "/usr/local/")
DEFAULT_MAX_INSTALLED = 4 * 1024**3
#: Payload compressions busybox's ``rpm -i`` (the bundled guest) can read.
BUSYBOX_RPM_PAYLOADS = ("gzip", "bzip2", "xz", "lzma")


class PackageKind(enum.StrEnum):
    """The two package formats."""

    RPM = "rpm"
    TAR = "tar"


@dataclass(frozen=True)
class PackageEntry:
    """One file of a package: absolute install path, mode (with type bits), size, link target."""

    path: str
    mode: int
    size: int
    link_target: str = ""

    @property
    def kind(self) -> str:
        """file, dir, symlink, or the odd kinds a package must not have."""
        m = self.mode
        if stat.S_ISDIR(m):
            return "dir"
        if stat.S_ISLNK(m):
            return "symlink"
        if stat.S_ISREG(m) or m & 0o170000 == 0:
            return "file"
        if stat.S_ISCHR(m) or stat.S_ISBLK(m):
            return "device"
        if stat.S_ISFIFO(m):
            return "fifo"
        return "socket" if stat.S_ISSOCK(m) else "other"


@dataclass(frozen=True)
class PackageInfo:
    """What a package says about itself."""

    kind: PackageKind
    name: str
    version: str
    arch: str
    payload: str
    entries: tuple[PackageEntry, ...]
    scriptlets: dict[str, str] = field(default_factory=dict)

    @property
    def installed_size(self) -> int:
        """Bytes the files take once installed."""
        return sum(e.size for e in self.entries if e.kind == "file")


def _text(value: object) -> str:
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return "" if value is None else str(value)


def _list(value: object) -> list[object]:
    if value is None:
        return []
    if isinstance(value, (list, tuple)):
        return list(value)
    return [value]


def inspect_rpm(path: Path) -> PackageInfo:
    """Read an RPM's headers.

    Raises:
        PackageError: not a readable RPM.
    """
    import rpmfile

    try:
        with rpmfile.open(str(path)) as rpm:
            h = rpm.headers
    except Exception as exc:  # noqa: BLE001 - rpmfile raises anything on a broken file
        raise PackageError(
            f"{path.name} is not a readable RPM ({type(exc).__name__})",
            hint="rebuild it with boincvm package-rpm, or check that the download is complete",
        ) from None
    basenames = [_text(b) for b in _list(h.get("basenames"))]
    dirnames = [_text(d) for d in _list(h.get("dirnames"))]
    dirindexes = [int(str(i)) for i in _list(h.get("dirindexes"))]
    modes = [int(str(m)) & 0xFFFF for m in _list(h.get("filemodes"))]
    sizes = [int(str(s)) for s in _list(h.get("filesizes") or h.get("longfilesizes"))]
    links = [_text(t) for t in _list(h.get("filelinktos"))]
    entries = []
    for i, base in enumerate(basenames):
        try:
            full = dirnames[dirindexes[i]] + base
            entries.append(PackageEntry(full, modes[i], sizes[i], links[i] if i < len(links) else ""))
        except IndexError:
            raise PackageError(
                f"{path.name}: its file list is inconsistent (truncated or forged header)"
            ) from None
    scriptlets = {
        tag: _text(h.get(tag))
        for tag in ("prein", "postin", "preun", "postun", "pretrans", "posttrans")
        if h.get(tag)
    }
    return PackageInfo(
        kind=PackageKind.RPM,
        name=_text(h.get("name")),
        version=f"{_text(h.get('version'))}-{_text(h.get('release'))}",
        arch=_text(h.get("arch")),
        payload=_text(h.get("archive_compression") or h.get("payloadcompressor") or "gzip"),
        entries=tuple(entries),
        scriptlets=scriptlets,
    )


def inspect_tarball(path: Path) -> PackageInfo:
    """List a tarball's members (paths are taken relative to ``/``).

    Raises:
        PackageError: not a readable tar archive.
    """
    entries = []
    try:
        with tarfile.open(path, "r:*") as tar:
            for m in tar:
                raw = m.name
                if raw.startswith("/"):
                    name = "\0abs:" + raw  # remembered as absolute: refused below
                else:
                    name = "/" + (raw[2:] if raw.startswith("./") else raw)
                mode = m.mode | {
                    tarfile.DIRTYPE: stat.S_IFDIR,
                    tarfile.SYMTYPE: stat.S_IFLNK,
                    tarfile.LNKTYPE: stat.S_IFREG,
                    tarfile.CHRTYPE: stat.S_IFCHR,
                    tarfile.BLKTYPE: stat.S_IFBLK,
                    tarfile.FIFOTYPE: stat.S_IFIFO,
                }.get(m.type, stat.S_IFREG)
                target = m.linkname if (m.issym() or m.islnk()) else ""
                if m.islnk():
                    target = "\0hard:" + target
                entries.append(PackageEntry(name, mode, m.size, target))
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise PackageError(f"{path.name} is not a readable tar archive ({exc})") from None
    compression = "gzip" if path.name.endswith((".gz", ".tgz")) else "none"
    return PackageInfo(PackageKind.TAR, path.name.split(".tar")[0], "", "noarch", compression, tuple(entries))


def inspect_package(path: Path) -> PackageInfo:
    """Read an RPM or a tarball.

    Raises:
        PackageError: unreadable, or neither kind.
    """
    if not path.is_file():
        raise PackageError(f"package {path} does not exist")
    name = path.name.lower()
    if name.endswith(".rpm"):
        return inspect_rpm(path)
    if name.endswith((".tar.gz", ".tgz", ".tar")):
        return inspect_tarball(path)
    raise PackageError(f"{path.name} is neither an RPM nor a tarball", hint="name it .rpm or .tar.gz")


def _under(path: str, prefixes: Sequence[str]) -> bool:
    return any(path == p.rstrip("/") or path.startswith(p) for p in prefixes)


def check_package(
    path: Path,
    *,
    arch: str = "x86_64",
    allowed_prefixes: Sequence[str] = DEFAULT_PREFIXES,
    allow_setuid: bool = False,
    max_installed: int = DEFAULT_MAX_INSTALLED,
) -> list[Finding]:
    """Findings for a package: readable, fits the architecture, every file where it may be."""
    try:
        pkg = inspect_package(path)
    except PackageError as exc:
        return [error(path.name, exc.message, exc.hint)]
    out: list[Finding] = []
    where = path.name
    if pkg.kind is PackageKind.RPM:
        if pkg.arch not in ("noarch", arch):
            out.append(error(f"{where}.arch", f"built for {pkg.arch}; the image runs {arch}"))
        if pkg.payload not in BUSYBOX_RPM_PAYLOADS:
            out.append(
                error(
                    f"{where}.payload",
                    f"{pkg.payload} payload: busybox rpm (the bundled guest) reads only gzip, bzip2 and xz",
                    hint="rebuild with rpmbuild --define '_binary_payload w9.gzdio'",
                )
            )
        if any(e.kind == "symlink" for e in pkg.entries):
            out.append(
                warning(where, "has symbolic links; busybox rpm (the bundled guest) does not create them")
            )
        for tag, script in pkg.scriptlets.items():
            out.append(
                warning(
                    f"{where}.{tag}",
                    f"has a scriptlet ({len(script)} bytes); busybox rpm does not run scriptlets",
                )
            )
    bad = 0
    for e in pkg.entries:
        problem = _entry_problem(e, allowed_prefixes, allow_setuid)
        if problem:
            bad += 1
            if bad <= 20:
                out.append(error(f"{where}:{e.path.replace(chr(0), '')}", problem))
    if bad > 20:
        out.append(error(where, f"{bad - 20} more files refused"))
    if pkg.installed_size > max_installed:
        out.append(
            error(where, f"installs {pkg.installed_size} bytes, more than the limit of {max_installed}")
        )
    if not out:
        files = sum(1 for e in pkg.entries if e.kind == "file")
        out.append(
            info(
                where,
                f"{pkg.kind.value} {pkg.name} {pkg.version} ({pkg.arch}): {files} files, "
                f"{pkg.installed_size} bytes installed, {pkg.payload} payload",
            )
        )
    return out


def _entry_problem(e: PackageEntry, prefixes: Sequence[str], allow_setuid: bool) -> str | None:
    if e.path.startswith("\0abs:"):
        return "is an absolute path in the archive"
    parts = e.path.split("/")
    if ".." in parts:
        return "leaves its directory (contains '..')"
    norm = posixpath.normpath(e.path)
    if e.kind == "dir" and any(norm == p.rstrip("/") or p.startswith(norm + "/") for p in prefixes):
        return None  # the directories leading to an allowed prefix
    if not _under(norm, prefixes):
        return f"installs outside the allowed prefixes ({', '.join(prefixes)})"
    if e.kind in ("device", "fifo", "socket", "other"):
        return f"is a {e.kind}; packages may hold only files, directories and symlinks"
    if e.mode & (stat.S_ISUID | stat.S_ISGID) and not allow_setuid:
        return "is setuid or setgid"
    if e.link_target.startswith("\0hard:"):
        target = "/" + e.link_target[6:].lstrip("./")
        if ".." in target.split("/") or not _under(posixpath.normpath(target), prefixes):
            return "is a hard link to a file outside the allowed prefixes"
    elif e.kind == "symlink":
        target = e.link_target
        resolved = posixpath.normpath(
            target if target.startswith("/") else posixpath.join(posixpath.dirname(norm), target)
        )
        if not _under(resolved, prefixes):
            return f"is a symlink to {target}, outside the allowed prefixes"
    return None
