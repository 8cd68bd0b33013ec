"""Read and check guest packages someone else built, without installing or unpacking them.

RPMs are read with ``rpmfile`` (headers: names, modes, sizes, link targets, scriptlets)
and their payload with :mod:`boincvm.package.payload` (busybox rpm installs what the
payload holds, whatever the header says); tarballs with ``tarfile``, member headers only.
:func:`check_package` refuses what must never reach a guest: paths outside the allowed
prefixes or with ``..``, device and FIFO files, setuid/setgid files (unless allowed),
symlinks pointing outside the allowed prefixes or used as directories, payloads the
guest's installer cannot read, a payload that differs from its header, and sizes (declared
or actual) beyond the limit. Reading stops at the limit, so a decompression bomb costs
no more than a package of the limit's size.
"""

from __future__ import annotations

import lzma
import posixpath
import stat
import tarfile
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from boincvm.errors import PackageError
from boincvm.findings import Finding, error, info, warning
from boincvm.job.model import PackageKind
from boincvm.package.payload import (
    ABSOLUTE_MARK,
    BUSYBOX_RPM,
    Compression,
    PackageEntry,
    Payload,
    install_path,
    read_payload,
    sniff,
)

DEFAULT_PREFIXES = ("/opt/", "/usr/local/")
DEFAULT_MAX_INSTALLED = 4 * 1024**3
#: Payload compressions busybox's ``rpm -i`` (the bundled guest) can read, told by magic bytes.
BUSYBOX_RPM_PAYLOADS = tuple(sorted(c.value for c in BUSYBOX_RPM))
#: Members a tarball may have before reading stops.
MAX_TAR_MEMBERS = 200_000
_RPM_LEAD = b"\xed\xab\xee\xdb"
_RPMFILE_GHOST = 64


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
    #: RPM: what the payload really holds (None when it could not be read, e.g. zstd).
    payload_entries: tuple[PackageEntry, ...] | None = None
    #: False when reading stopped at the size or member limit (the package is bigger).
    complete: bool = True
    #: RPM: the installed size the header declares (its SIZE tag).
    declared_size: int = 0
    #: RPM: the payload compression the header claims (busybox goes by the magic bytes).
    declared_payload: str = ""
    #: RPM: requirements (busybox rpm ignores them; the real rpm is run with --nodeps).
    requires: tuple[str, ...] = ()

    @property
    def installed_size(self) -> int:
        """Bytes the files take once installed (the payload's, when it was read)."""
        entries = self.payload_entries if self.payload_entries is not None else self.entries
        return sum(e.size for e in entries if e.kind == "file")


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


def _ints(path: Path, h: dict[object, object], tag: str) -> list[int]:
    values = _list(h.get(tag))
    if not all(isinstance(v, int) for v in values):
        raise PackageError(f"{path.name}: its header field {tag} is not a list of numbers (forged header)")
    return [int(str(v)) for v in values]


def inspect_rpm(path: Path, *, max_installed: int = DEFAULT_MAX_INSTALLED) -> PackageInfo:
    """Read an RPM's headers and its payload (stopping past ``max_installed`` bytes of data).

    Raises:
        PackageError: not a readable RPM, a forged or truncated header, a corrupt payload.
    """
    h, payload = _read_rpm(path, max_installed)
    entries = _rpm_entries(path, h)
    scriptlets = {
        tag: _text(h.get(tag))
        for tag in ("prein", "postin", "preun", "postun", "pretrans", "posttrans")
        if h.get(tag)
    }
    declared = _ints(path, h, "size")
    return PackageInfo(
        kind=PackageKind.RPM,
        name=_text(h.get("name")),
        version=f"{_text(h.get('version'))}-{_text(h.get('release'))}",
        arch=_text(h.get("arch")),
        payload=payload.compression.value,
        entries=entries,
        scriptlets=scriptlets,
        payload_entries=payload.members if payload.members or payload.complete else None,
        complete=payload.complete or payload.compression in (Compression.ZSTD, Compression.UNKNOWN),
        declared_size=declared[0] if declared else 0,
        declared_payload=_text(h.get("archive_compression") or h.get("payloadcompressor") or "gzip"),
        requires=tuple(
            r for r in (_text(x) for x in _list(h.get("requirename"))) if r and not r.startswith("rpmlib(")
        ),
    )


def _read_rpm(path: Path, max_installed: int) -> tuple[dict[object, object], Payload]:
    """The RPM's header (rpmfile's mapping) and what its payload holds, read up to the limit."""
    import rpmfile

    unreadable = "rebuild it with boincvm package-rpm, or check that the download is complete"
    with path.open("rb") as f:
        # rpmfile would scan a non-RPM byte by byte for a header magic: look at the lead first.
        if f.read(4) != _RPM_LEAD:
            raise PackageError(f"{path.name} is not a readable RPM (no RPM lead)", hint=unreadable)
        f.seek(0)
        try:
            rpm = rpmfile.open(fileobj=f)
            h = rpm.headers
            data_offset = rpm.data_offset
        # rpmfile reports a broken file with assertions, struct errors, IndexError and its own RPMError.
        except Exception as exc:  # noqa: BLE001
            raise PackageError(
                f"{path.name} is not a readable RPM ({type(exc).__name__})", hint=unreadable
            ) from None
        if "filesizes" not in h and "longfilesizes" in h:
            raise PackageError(
                f"{path.name} declares files of 4 GiB or more, beyond what boincvm installs",
                hint="ship large data as workunit input files instead",
            )
        f.seek(data_offset)
        try:
            payload = read_payload(f, max_bytes=max_installed)
        except PackageError as exc:
            raise PackageError(f"{path.name}: {exc.message}", hint=unreadable) from None
    return h, payload


def _rpm_entries(path: Path, h: dict[object, object]) -> tuple[PackageEntry, ...]:
    """The files the header lists (``%ghost`` files left out: they are never installed)."""
    basenames = [_text(b) for b in _list(h.get("basenames"))]
    dirnames = [_text(d) for d in _list(h.get("dirnames"))]
    dirindexes = _ints(path, h, "dirindexes")
    modes = [m & 0xFFFF for m in _ints(path, h, "filemodes")]
    sizes = _ints(path, h, "filesizes")
    flags = _ints(path, h, "fileflags")
    links = [_text(t) for t in _list(h.get("filelinktos"))]
    entries = []
    for i, base in enumerate(basenames):
        try:
            full = dirnames[dirindexes[i]] + base
            if i < len(flags) and flags[i] & _RPMFILE_GHOST:
                continue  # %ghost: listed, never installed
            entries.append(PackageEntry(full, modes[i], sizes[i], links[i] if i < len(links) else ""))
        except IndexError:
            raise PackageError(
                f"{path.name}: its file list is inconsistent (truncated or forged header)"
            ) from None
    return tuple(entries)


def inspect_tarball(path: Path, *, max_installed: int = DEFAULT_MAX_INSTALLED) -> PackageInfo:
    """List a tarball's members (paths are taken relative to ``/``), stopping past ``max_installed``.

    Raises:
        PackageError: not a readable tar archive.
    """
    entries: list[PackageEntry] = []
    total = 0
    complete = True
    with path.open("rb") as f:
        compression = sniff(f.read(8))
    try:
        with tarfile.open(path, "r:*") as tar:
            while (m := tar.next()) is not None:
                total += m.size
                if total > max_installed or len(entries) >= MAX_TAR_MEMBERS:
                    complete = False  # stop before reading (decompressing) past the limit
                    break
                name = install_path(m.name)
                mode = m.mode | {
                    tarfile.DIRTYPE: stat.S_IFDIR,
                    tarfile.SYMTYPE: stat.S_IFLNK,
                    tarfile.LNKTYPE: stat.S_IFREG,
                    tarfile.CHRTYPE: stat.S_IFCHR,
                    tarfile.BLKTYPE: stat.S_IFBLK,
                    tarfile.FIFOTYPE: stat.S_IFIFO,
                }.get(m.type, stat.S_IFREG if m.type in tarfile.REGULAR_TYPES else 0o170000)
                target = m.linkname if (m.issym() or m.islnk()) else ""
                if m.islnk():
                    target = "\0hard:" + target
                entries.append(PackageEntry(name, mode, m.size, target))
    except (tarfile.TarError, OSError, EOFError, zlib.error, lzma.LZMAError) as exc:
        raise PackageError(f"{path.name} is not a readable tar archive ({exc})") from None
    if compression is Compression.UNKNOWN and entries:
        compression = Compression.NONE
    return PackageInfo(
        PackageKind.TAR,
        path.name.split(".tar")[0],
        "",
        "noarch",
        compression.value,
        tuple(entries),
        complete=complete,
    )


def inspect_package(path: Path, *, max_installed: int = DEFAULT_MAX_INSTALLED) -> PackageInfo:
    """Read an RPM or a tarball without unpacking it; reading stops past ``max_installed`` bytes.

    Raises:
        PackageError: unreadable, truncated, forged, or neither kind.
    """
    if not path.is_file():
        raise PackageError(f"package {path} does not exist")
    name = path.name.lower()
    if name.endswith(".rpm"):
        return inspect_rpm(path, max_installed=max_installed)
    if name.endswith((".tar.gz", ".tgz", ".tar")):
        return inspect_tarball(path, max_installed=max_installed)
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
    """Findings for a package: readable, fits the architecture, every file where it may be.

    Never raises for a bad package: an unreadable one gives one error finding.
    """
    try:
        pkg = inspect_package(path, max_installed=max_installed)
    except PackageError as exc:
        return [error(path.name, exc.message, exc.hint)]
    out: list[Finding] = []
    where = path.name
    if pkg.kind is PackageKind.RPM:
        out += _rpm_findings(pkg, where, arch, max_installed)
    elif pkg.payload != Compression.GZIP:
        out.append(
            error(
                f"{where}.compression",
                f"{pkg.payload} tarball: the guest unpacks tarballs with tar -xzf, which needs gzip",
                hint="compress it with gzip (boincvm package-rpm --format tar does)",
            )
        )
    out += _entry_findings(pkg, where, allowed_prefixes, allow_setuid)
    out += _size_findings(pkg, where, max_installed)
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


#: Files refused one by one before the rest are counted.
_MAX_ENTRY_FINDINGS = 20


def _entry_findings(
    pkg: PackageInfo, where: str, prefixes: Sequence[str], allow_setuid: bool
) -> list[Finding]:
    """One error per file refused (header and payload, each problem once), the rest counted."""
    out: list[Finding] = []
    bad = 0
    seen: set[tuple[str, str]] = set()
    entries = pkg.entries + (pkg.payload_entries or ())
    symlinks = {posixpath.normpath(e.path) for e in entries if e.kind == "symlink"}
    for e in entries:
        problem = _entry_problem(e, prefixes, allow_setuid) or _through_symlink(e, symlinks)
        if problem and (e.path, problem) not in seen:
            seen.add((e.path, problem))
            bad += 1
            if bad <= _MAX_ENTRY_FINDINGS:
                out.append(error(f"{where}:{e.path.replace(chr(0), '')}", problem))
    if bad > _MAX_ENTRY_FINDINGS:
        out.append(error(where, f"{bad - _MAX_ENTRY_FINDINGS} more files refused"))
    return out


def _size_findings(pkg: PackageInfo, where: str, max_installed: int) -> list[Finding]:
    """An error when reading stopped at the limit, or the files installed exceed it."""
    if not pkg.complete:
        return [
            error(
                where,
                f"unpacks to more than the limit of {max_installed} bytes (or {MAX_TAR_MEMBERS} files)",
                hint="ship large data as workunit input files instead",
            )
        ]
    if pkg.installed_size > max_installed:
        return [error(where, f"installs {pkg.installed_size} bytes, more than the limit of {max_installed}")]
    return []


def _rpm_findings(pkg: PackageInfo, where: str, arch: str, max_installed: int) -> list[Finding]:
    out: list[Finding] = []
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
    declared = max(pkg.declared_size, sum(e.size for e in pkg.entries if e.kind == "file"))
    if declared > max_installed:
        out.append(
            error(
                f"{where}.size",
                f"declares {declared} bytes installed, more than the limit of {max_installed}",
            )
        )
    if pkg.payload_entries is not None:
        listed = {e.path for e in pkg.entries}
        unlisted = [e.path for e in pkg.payload_entries if e.path not in listed]
        if unlisted:
            out.append(
                error(
                    f"{where}.payload",
                    f"the payload holds {len(unlisted)} files its header does not list "
                    f"(first: {unlisted[0].replace(chr(0), '')}); busybox rpm would install them",
                )
            )
    if any(e.kind == "symlink" for e in pkg.entries):
        out.append(warning(where, "has symbolic links; busybox rpm (the bundled guest) does not create them"))
    for tag, script in pkg.scriptlets.items():
        out.append(
            warning(
                f"{where}.{tag}",
                f"has a scriptlet ({len(script)} bytes); busybox rpm does not run scriptlets",
            )
        )
    return out


def _through_symlink(e: PackageEntry, symlinks: set[str]) -> str | None:
    """A member below another member that is a symlink would be written through that link."""
    if e.path.startswith("\0"):
        return None
    parent = posixpath.dirname(posixpath.normpath(e.path))
    while parent not in ("/", ""):
        if parent in symlinks:
            return f"goes through the package's own symlink {parent}"
        parent = posixpath.dirname(parent)
    return None


def _entry_problem(e: PackageEntry, prefixes: Sequence[str], allow_setuid: bool) -> str | None:
    if e.path.startswith(ABSOLUTE_MARK):
        return "is an absolute path in the archive"
    parts = e.path.split("/")
    if ".." in parts:
        return "leaves its directory (contains '..')"
    norm = posixpath.normpath(e.path)
    if e.kind == "dir" and e.mode & (stat.S_ISUID | stat.S_ISGID | stat.S_ISVTX | stat.S_IWOTH):
        # tar would apply the mode to the guest's /opt or /usr/local too (mode 7777: anyone may
        # write there, setgid spreads the group); packages carry plain directories only.
        mode = stat.S_IMODE(e.mode)
        return f"is a directory with mode {mode:04o} (setuid, setgid, sticky or world-writable)"
    if e.kind == "dir" and any(norm == p.rstrip("/") or p.startswith(norm + "/") for p in prefixes):
        return None  # the directories leading to an allowed prefix
    if not _under(norm, prefixes):
        return f"installs outside the allowed prefixes ({', '.join(prefixes)})"
    if e.kind in ("device", "fifo", "socket", "other"):
        return f"is a {e.kind}; packages may hold only files, directories and symlinks"
    if e.mode & (stat.S_ISUID | stat.S_ISGID) and not allow_setuid:
        return "is setuid or setgid"
    if e.link_target.startswith("\0hard:"):
        raw = e.link_target[6:]
        target = "/" + (raw[2:] if raw.startswith("./") else raw.lstrip("/"))
        if ".." in raw.split("/") or not _under(posixpath.normpath(target), prefixes):
            return "is a hard link to a file outside the allowed prefixes"
    elif e.kind == "symlink":
        target = e.link_target
        resolved = posixpath.normpath(
            target if target.startswith("/") else posixpath.join(posixpath.dirname(norm), target)
        )
        if not _under(resolved, prefixes):
            return f"is a symlink to {target}, outside the allowed prefixes"
    return None
