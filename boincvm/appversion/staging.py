"""The files of an app version directory being built: each staged, hashed and given its
physical name ``APP_VERSION_<md5>_<tail>`` (unique and immutable, as BOINC requires).

A file is read once: copied with its md5 and its gzip size computed on the way, runs of
zeros skipped rather than written (sparse files stay sparse). A disk is converted to a
qcow2 by ``qemu-img`` instead, which keeps holes and compresses clusters.
"""

from __future__ import annotations

import errno
import hashlib
import zlib
from pathlib import Path
from typing import TYPE_CHECKING

from boincvm.appversion.model import GZIP_MIN_SAVING, AppVersionFile, Progress
from boincvm.hashing import md5_file
from boincvm.image.for_app_version import ShippedFile, convert_disk
from boincvm.paths import open_regular
from boincvm.signing import sign_file

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric import rsa

_BLOCK = 1 << 20
_ZEROS = bytes(_BLOCK)
_FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


def copy_hashed(src: Path, dst: Path, *, what: str, estimate_gzip: bool) -> tuple[str, int, int | None]:
    """Copy ``src`` to ``dst`` in one pass: md5, size and (optionally) the gzip -6 size.

    Blocks of zeros are skipped with a seek, so holes stay holes (a preallocated flat
    extent is mostly zeros).

    Raises:
        InputError: ``src`` (called ``what`` in the message) is not a regular file.
    """
    md5 = hashlib.md5(usedforsecurity=False)
    comp = zlib.compressobj(6, zlib.DEFLATED, 31) if estimate_gzip else None
    size = packed = 0
    with open_regular(src, f"{what} {src}") as fi, dst.open("wb") as fo:
        try:
            while block := fi.read(_BLOCK):
                md5.update(block)
                size += len(block)
                if comp is not None:
                    packed += len(comp.compress(block))
                if block == _ZEROS[: len(block)]:
                    fo.seek(len(block), 1)
                else:
                    fo.write(block)
            fo.truncate(size)
        except OSError as exc:  # a full disk says nothing of the file it was writing
            if exc.filename is not None or exc.errno not in _FULL:
                raise
            raise OSError(exc.errno, exc.strerror, str(dst)) from exc
    if comp is not None:
        packed += len(comp.flush())
    return md5.hexdigest(), size, packed if comp is not None else None


def gzip_helps(size: int, packed: int | None) -> bool:
    """Whether BOINC's ``<gzip/>`` is worth it: it saves at least GZIP_MIN_SAVING of a file
    over 4 KiB (``packed`` None: not estimated)."""
    return packed is not None and size > 4096 and packed < size * (1 - GZIP_MIN_SAVING)


class StagedFiles:
    """The app-version files written so far into ``directory`` (the output being built).

    Args:
        directory: the app version directory being built.
        prefix: ``APP_VERSION``, the start of every physical name.
        progress: told of each step.
        gzip_downloads: mark files that compress well with ``<gzip/>``.
        compress: compress the clusters of converted disks.
    """

    def __init__(
        self,
        directory: Path,
        prefix: str,
        progress: Progress | None,
        *,
        gzip_downloads: bool,
        compress: bool,
    ) -> None:
        self.directory = directory
        self.prefix = prefix
        self.files: list[AppVersionFile] = []
        self._progress = progress
        self._gzip_downloads = gzip_downloads
        self._compress = compress

    def note(self, step: str) -> None:
        """Report a step."""
        if self._progress is not None:
            self._progress(step, 0, None)

    def add(self, shipped: ShippedFile) -> None:
        """Copy (or convert) ``shipped`` into the directory under its physical name.

        Raises:
            InputError, PathEscapeError: the source is not a regular file, or not a readable disk.
            ToolError: qemu-img is missing or failed.
        """
        staging = self.directory / f".{shipped.tail}.part"
        if shipped.convert:
            self.note("converting the disk")
            convert_disk(shipped.source, staging, compress=self._compress)
            self.note(f"adding {shipped.label}")
            md5, size = md5_file(staging)
            packed = None
        else:
            self.note(f"adding {shipped.label}")
            md5, size, packed = copy_hashed(
                shipped.source,
                staging,
                what=shipped.what,
                estimate_gzip=self._gzip_downloads and shipped.gzip_ok,
            )
        physical = self._place(staging, md5, shipped.tail)
        self.files.append(
            AppVersionFile(physical, shipped.logical_name, md5, size, gzip=gzip_helps(size, packed))
        )

    def add_bytes(self, data: bytes, logical_name: str, tail: str) -> None:
        """Write ``data`` as a file of the app version (the job defaults)."""
        md5 = hashlib.md5(data, usedforsecurity=False).hexdigest()
        physical = f"{self.prefix}_{md5[:12]}_{tail}"
        (self.directory / physical).write_bytes(data)
        self.files.append(AppVersionFile(physical, logical_name, md5, len(data)))

    def add_main_program(self, staging: Path, tail: str) -> None:
        """Name the main program (built at ``staging``), the first file of ``version.xml``."""
        physical, md5, size = self._name_built(staging, tail)
        self.files.insert(0, AppVersionFile(physical, None, md5, size, main_program=True))

    def add_program(self, staging: Path, tail: str) -> str:
        """Name a program the main program runs from the project directory (built at
        ``staging``, executable); return its physical name."""
        physical, md5, size = self._name_built(staging, tail)
        self.files.append(AppVersionFile(physical, None, md5, size))
        return physical

    def add_copied_program(self, staging: Path, tail: str, logical_name: str) -> None:
        """Name a program the main program runs (built at ``staging``): a ``<copy_file/>``,
        so the slot holds the program itself rather than a BOINC link file."""
        physical, md5, size = self._name_built(staging, tail)
        self.files.append(AppVersionFile(physical, logical_name, md5, size, copy_file=True))

    def _name_built(self, staging: Path, tail: str) -> tuple[str, str, int]:
        """Rename a file built at ``staging`` to its physical name; (that name, md5, size)."""
        md5, size = md5_file(staging)
        physical = f"{self.prefix}_{md5[:12]}_{tail}"
        staging.rename(self.directory / physical)
        return physical, md5, size

    def sign(self, key: rsa.RSAPrivateKey) -> None:
        """Write ``FILE.sig`` beside every file so far."""
        self.note("signing the files")
        for f in self.files:
            (self.directory / f"{f.physical_name}.sig").write_text(
                sign_file(self.directory / f.physical_name, key), encoding="ascii"
            )

    def _place(self, staging: Path, md5: str, tail: str) -> str:
        physical = f"{self.prefix}_{md5[:12]}_{tail}"
        (self.directory / physical).unlink(missing_ok=True)
        staging.rename(self.directory / physical)
        return physical
