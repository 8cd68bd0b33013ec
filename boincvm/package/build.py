"""Build guest packages from a program directory: a reproducible RPM, or a plain tarball.

RPMs are built by ``rpmbuild`` from a spec rendered from ``templates/package/rpm.spec.j2``,
with a gzip payload (busybox ``rpm -i`` in the bundled guest reads gzip, bzip2 and xz, not
zstd, the default of current Fedora/RHEL), a fixed build host, and ``SOURCE_DATE_EPOCH``
for build time and file times: the same directory gives the same bytes, so identical
packages are staged once and shared by workunits. Tarballs are written by ``tarfile`` with
sorted members, root ownership and zero times, for guests without rpm.
"""

from __future__ import annotations

import gzip
import io
import os
import re
import shutil
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path

from boincvm import proc
from boincvm.errors import InputError, PackageError
from boincvm.hashing import md5_file
from boincvm.job.model import PackageKind
from boincvm.package.inspect import DEFAULT_PREFIXES
from boincvm.render import render

#: Time stamp of every built package (1980-01-01): reproducible builds.
SOURCE_DATE_EPOCH = 315532800
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]*$")
_VERSION = re.compile(r"^[A-Za-z0-9._+~]+$")
_REQUIRE = re.compile(r"^[A-Za-z0-9_.+()/:-]+( *(<|>|<=|>=|=) *[A-Za-z0-9._+~^:-]+)?$")


def _spec_text(value: str) -> str:
    """Text placed in the spec: ``%`` would start a macro, so it is doubled."""
    return value.replace("%", "%%")


#: What ``package-rpm`` builds: one of the kinds a vm job installs (the job model's enum,
#: under the name this module has always exported).
PackageFormat = PackageKind


@dataclass(frozen=True)
class PackageRequest:
    """What to package.

    Attributes:
        program_dir: the directory whose contents are installed under ``prefix``.
        name, version, release: the package's identity.
        prefix: where the files go in the guest (default ``/opt/NAME``).
        entry_point: a program in the directory (relative path) linked as ``/usr/local/bin/NAME``.
        requires: RPM dependencies (busybox rpm ignores them).
        post_install: a shell script run after installing (RPM ``%post``; busybox rpm skips it).
        summary: one line describing the package.
        format: rpm or tar.
    """

    program_dir: Path
    name: str
    version: str
    release: str = "1"
    prefix: str | None = None
    entry_point: str | None = None
    requires: tuple[str, ...] = ()
    post_install: str | None = None
    summary: str = ""
    format: PackageFormat = PackageFormat.RPM

    @property
    def install_prefix(self) -> str:
        """Where the files go in the guest."""
        return (self.prefix or f"/opt/{self.name}").rstrip("/")


@dataclass(frozen=True)
class BuiltPackage:
    """A built package file.

    Attributes:
        path: the package file (in the output directory).
        kind: rpm or tar.
        md5: its md5 (what BOINC records for the workunit file).
        nbytes: its size.
        name, version, release: the package's identity.
        arch: ``noarch``, or ``x86_64`` when the directory holds an x86-64 ELF file.
    """

    path: Path
    kind: PackageFormat
    md5: str
    nbytes: int
    name: str = ""
    version: str = ""
    release: str = ""
    arch: str = "noarch"

    def as_dict(self) -> dict[str, object]:
        """JSON-ready form."""
        return {
            "name": self.name,
            "version": self.version,
            "release": self.release,
            "arch": self.arch,
            "path": str(self.path),
            "kind": self.kind.value,
            "md5": self.md5,
            "size": self.nbytes,
            "nbytes": self.nbytes,
        }


def _check(req: PackageRequest) -> None:
    if not req.program_dir.is_dir():
        raise InputError(f"program directory {req.program_dir} does not exist or is not a directory")
    if not _NAME.match(req.name):
        raise InputError(f"package name {req.name!r}: use letters, digits and . _ + -")
    for what, value in (("version", req.version), ("release", req.release)):
        if not _VERSION.match(value):
            raise InputError(f"{what} {value!r}: use letters, digits and . _ + ~ (no '-')")
    prefix = req.install_prefix
    if (
        not prefix.startswith("/")
        or ".." in prefix.split("/")
        or not re.fullmatch(r"[A-Za-z0-9/._+-]+", prefix)
    ):
        raise InputError(f"prefix {prefix!r}: an absolute path of letters, digits and / . _ + -")

    if not any(prefix.startswith(p) and len(prefix) > len(p) for p in DEFAULT_PREFIXES):
        # The wrapper and validate refuse packages installing elsewhere: say so now, not later.
        raise InputError(
            f"prefix {prefix!r} is outside {' and '.join(DEFAULT_PREFIXES)}",
            hint="guest packages install under /opt/NAME (the default) or /usr/local/",
        )
    for r in req.requires:
        if not _REQUIRE.match(r):
            raise InputError(f"requirement {r!r}: give a name, optionally with an operator and a version")
    if any(c in req.summary for c in "\r\n"):
        raise InputError("the summary must be one line")
    if req.format is PackageFormat.TAR and (req.post_install or req.requires):
        raise InputError(
            "a tarball cannot carry a post-install script or requirements",
            hint="build an RPM (--format rpm), or do the setup in the program itself",
        )
    if req.entry_point is not None:
        ep = req.program_dir / req.entry_point
        if ".." in Path(req.entry_point).parts or req.entry_point.startswith("/") or not ep.is_file():
            raise InputError(f"entry point {req.entry_point!r} is not a file inside {req.program_dir}")
    for path in req.program_dir.rglob("*"):
        rel = path.relative_to(req.program_dir).as_posix()
        if any(c in rel for c in '\n\r"\\%*?[]{}$`') or rel.startswith("-"):
            raise InputError(
                f"{rel!r}: names with quotes, backslashes, %, glob or shell characters cannot be packaged",
                hint="rename the file",
            )
        if path.is_symlink():
            target = str(path.readlink())
            resolved = (path.parent / target).resolve()
            if target.startswith("/") or not resolved.is_relative_to(req.program_dir.resolve()):
                raise InputError(f"{rel!r} is a symlink leaving the program directory ({target})")
        elif not (path.is_file() or path.is_dir()):
            raise InputError(f"{rel!r} is neither a file nor a directory")


#: ELF e_machine of x86-64, the only architecture boincvm's guests run.
_EM_X86_64 = 62


def _elf_machine(path: Path) -> int | None:
    """The ELF machine of ``path``, or None when it is not an ELF file."""
    try:
        with path.open("rb") as f:
            head = f.read(20)
    except OSError:
        return None
    if len(head) < 20 or head[:4] != b"\x7fELF":
        return None
    return int.from_bytes(head[18:20], "little" if head[5] == 1 else "big")


def _arch(program_dir: Path) -> str:
    """``x86_64`` when the directory holds x86-64 ELF files, ``noarch`` when it holds none.

    Raises:
        InputError: an ELF file is built for another machine.
    """
    arch = "noarch"
    for p in sorted(program_dir.rglob("*")):
        if p.is_symlink() or not p.is_file():
            continue
        machine = _elf_machine(p)
        if machine is None:
            continue
        if machine != _EM_X86_64:
            raise InputError(
                f"{p.relative_to(program_dir).as_posix()} is an ELF file for machine {machine}, "
                "not x86-64; the guest runs x86-64",
                hint="build the program for x86_64",
            )
        arch = "x86_64"
    return arch


def build_package(req: PackageRequest, output_dir: Path) -> BuiltPackage:
    """Build the package into ``output_dir`` (written atomically).

    Raises:
        InputError: bad request or program directory.
        CommandNotFound, CommandFailed: rpmbuild is missing or failed.
    """
    _check(req)
    arch = _arch(req.program_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    if req.format is PackageFormat.TAR:
        target = output_dir / f"{req.name}-{req.version}-{req.release}.tar.gz"
        _build_tarball(req, target)
    else:
        target = _build_rpm(req, output_dir, arch)
    md5, size = md5_file(target)
    return BuiltPackage(target, req.format, md5, size, req.name, req.version, req.release, arch)


def _build_rpm(req: PackageRequest, output_dir: Path, arch: str) -> Path:
    with tempfile.TemporaryDirectory(prefix="boincvm-rpm-") as d:
        top = Path(d)
        src = top / "src"
        shutil.copytree(req.program_dir, src, symlinks=True)
        for path in [src, *src.rglob("*")]:
            # Times and umask differ between checkouts: normalise what lands in the payload.
            if not path.is_symlink():
                path.chmod((path.stat().st_mode & 0o7755) | (0o755 if path.is_dir() else 0o644))
            os.utime(path, (SOURCE_DATE_EPOCH, SOURCE_DATE_EPOCH), follow_symlinks=False)
        post = None
        if req.post_install:
            # Read by "%post -f": its lines are never taken for spec sections (a "%files"
            # line in the script stays a line of the script); macros are still expanded.
            post = top / "post-install.sh"
            post.write_text(_spec_text(req.post_install), encoding="utf-8")
        spec = top / f"{req.name}.spec"
        spec.write_text(
            render(
                "package/rpm.spec.j2",
                name=req.name,
                version=req.version,
                release=req.release,
                summary=_spec_text(req.summary or f"{req.name} for boincvm"),
                license="unspecified",
                arch=arch,
                requires=req.requires,
                prefix=req.install_prefix,
                source=str(src),
                entry_point=req.entry_point,
                post_install_file=str(post) if post else None,
                epoch=SOURCE_DATE_EPOCH,
            ),
            encoding="utf-8",
        )
        defines = {
            "_topdir": str(top),
            "_binary_payload": "w9.gzdio",
            "_buildhost": "boincvm",
            "use_source_date_epoch_as_buildtime": "1",
            "clamp_mtime_to_source_date_epoch": "1",
            "_build_id_links": "none",
        }
        cmd: list[str] = ["rpmbuild", "-bb", "--quiet"]
        for k, v in defines.items():
            cmd += ["--define", f"{k} {v}"]
        proc.run(
            [*cmd, str(spec)], timeout=600, env={"SOURCE_DATE_EPOCH": str(SOURCE_DATE_EPOCH), "TZ": "UTC"}
        )
        built = list((top / "RPMS").rglob("*.rpm"))
        if len(built) != 1:
            raise PackageError(f"rpmbuild made {len(built)} packages, expected one")
        target = output_dir / built[0].name
        tmp = output_dir / f".{built[0].name}.part"
        shutil.copyfile(built[0], tmp)
        tmp.replace(target)
        return target


def entry_point_script(target: str) -> bytes:
    """The launcher installed as /usr/local/bin/NAME (a script: busybox rpm makes no symlinks)."""
    return f'#!/bin/sh\nexec "{target}" "$@"\n'.encode()


def _build_tarball(req: PackageRequest, target: Path) -> None:
    prefix = req.install_prefix.lstrip("/")
    tmp = target.with_name(f".{target.name}.part")

    def add(tar: tarfile.TarFile, path: Path, arcname: str) -> None:
        info = tar.gettarinfo(str(path), arcname)
        info.uid = info.gid = 0
        info.uname = info.gname = "root"
        info.mtime = SOURCE_DATE_EPOCH
        info.mode = (info.mode & 0o7755) | (0o755 if info.isdir() or info.mode & 0o100 else 0o644)
        if info.isfile():
            with path.open("rb") as f:
                tar.addfile(info, f)
        else:
            tar.addfile(info)

    try:
        with tmp.open("wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=0) as gz:
            with tarfile.open(fileobj=gz, mode="w", format=tarfile.PAX_FORMAT) as tar:
                # Parent directories (opt/, usr/local/bin/) are not members: tar makes them when
                # needed, and removing the package must not remove them.
                add(tar, req.program_dir, prefix)
                for path in sorted(req.program_dir.rglob("*")):
                    add(tar, path, f"{prefix}/{path.relative_to(req.program_dir).as_posix()}")
                if req.entry_point:
                    script = entry_point_script(f"/{prefix}/{req.entry_point}")
                    launcher = tarfile.TarInfo(f"usr/local/bin/{req.name}")
                    launcher.size, launcher.mode, launcher.mtime = len(script), 0o755, SOURCE_DATE_EPOCH
                    launcher.uname = launcher.gname = "root"
                    tar.addfile(launcher, io.BytesIO(script))
        tmp.replace(target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
