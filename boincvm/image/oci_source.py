"""The pieces of a container image as read: its config, its layers, and the files they come from.

:class:`Source` reads the files of an OCI image layout or a docker-archive (a directory or a
tarball) by relative name, never following one outside it; :class:`HashingReader` checks a
stream against its digest as it is read. :mod:`boincvm.image.oci` builds an :class:`OciImage`
from them and :mod:`boincvm.image.oci_layers` applies its layers.
"""

from __future__ import annotations

import hashlib
import io
import json
import re
import tarfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import IO, Any, BinaryIO

from boincvm.errors import ChecksumError, InputError, PathEscapeError
from boincvm.paths import open_regular

#: The largest manifest, index or config read (they are JSON documents of a few KiB).
MAX_JSON_BYTES = 4 * 1024 * 1024

_DIGEST = re.compile(r"(sha256):([a-f0-9]{64})|(sha512):([a-f0-9]{128})")
HINT_LAYOUT = (
    "give an OCI image layout (skopeo copy docker-daemon:IMG oci:DIR, podman save --format oci-dir) "
    "or a docker save / podman save tarball"
)
_HINT_DAMAGED = "the image is damaged or was altered; copy it again from its registry or build"


@dataclass(frozen=True)
class ImageConfig:
    """What a container image's config says about running it (``config`` in the OCI config).

    Attributes:
        entrypoint: ``Entrypoint``: the program and its fixed arguments.
        cmd: ``Cmd``: default arguments (or the program, without an entrypoint), replaced
            by the arguments a run gives, as ``docker run IMAGE ARGS`` does.
        env: ``Env``: ``NAME=VALUE`` items.
        working_dir: ``WorkingDir`` (absolute; ``/`` when unset).
        user: ``User``: ``uid``, ``name``, ``uid:gid`` or ``name:group`` (empty: root).
        architecture: the config's ``architecture``.
        os: the config's ``os``.
    """

    entrypoint: tuple[str, ...] = ()
    cmd: tuple[str, ...] = ()
    env: tuple[str, ...] = ()
    working_dir: str = "/"
    user: str = ""
    architecture: str = "amd64"
    os: str = "linux"


@dataclass(frozen=True)
class Layer:
    """One layer: how to read it and what it must hash to.

    ``digest`` is checked on the bytes as stored (OCI layouts); ``diff_id`` on the
    uncompressed tar stream (docker-archives, whose layer files carry no digest of their own).
    """

    name: str
    media_type: str
    digest: str | None = None
    diff_id: str | None = None


@dataclass(frozen=True)
class OciImage:
    """A container image read from a layout or an archive: its config, layers and identity.

    ``identity`` is the digest of the manifest (layouts) or of the config (archives): the
    same image gives the same identity, so builds can be cached by it.
    """

    source: Path
    config: ImageConfig
    layers: tuple[Layer, ...]
    identity: str
    _open: Callable[[Layer], BinaryIO] = field(repr=False, compare=False)

    @contextmanager
    def open_layer(self, layer: Layer) -> Iterator[BinaryIO]:
        """The layer's stored bytes as a stream (closed afterwards)."""
        f = self._open(layer)
        try:
            yield f
        finally:
            f.close()


# -- reading the source (a directory or a tarball) -----------------------------------------


class Source:
    """Files of an image layout or archive, read by relative name, never followed outside it."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.tar: tarfile.TarFile | None = None
        if path.is_file():
            try:
                self.tar = tarfile.open(path, "r:")  # noqa: SIM115 - lives as long as the image
            except tarfile.TarError as exc:
                raise InputError(f"{path} is not a tar archive ({exc})", hint=HINT_LAYOUT) from None
        elif not path.is_dir():
            raise InputError(f"{path} does not exist", hint=HINT_LAYOUT)

    def _member(self, name: str) -> tarfile.TarInfo | None:
        assert self.tar is not None
        norm = str(PurePosixPath(name))
        for candidate in (norm, f"./{norm}"):
            try:
                return self.tar.getmember(candidate)
            except KeyError:
                continue
        return None

    def exists(self, name: str) -> bool:
        if self.tar is not None:
            return self._member(name) is not None
        return (self.path / name).is_file()

    def open(self, name: str) -> BinaryIO:
        """The file ``name`` (relative, no ``..``) of the source.

        Raises:
            PathEscapeError: the name is absolute or has ``..``.
            InputError: missing or not a regular file.
        """
        parts = PurePosixPath(name).parts
        if not parts or name.startswith("/") or ".." in parts or "\0" in name:
            raise PathEscapeError(f"{self.path} names {name!r}, which is not a file inside it")
        if self.tar is None:
            return open_regular(self.path / name, f"{name} in {self.path}")
        member = self._member(name)
        f = self.tar.extractfile(member) if member is not None else None
        if f is None:
            raise InputError(f"{self.path} has no file {name}", hint=HINT_LAYOUT)
        return f  # type: ignore[return-value]

    def read_json(self, name: str, *, digest: str | None = None) -> Any:
        with self.open(name) as f:
            data = f.read(MAX_JSON_BYTES + 1)
        if len(data) > MAX_JSON_BYTES:
            raise InputError(f"{name} in {self.path} is larger than {MAX_JSON_BYTES} bytes", hint=HINT_LAYOUT)
        if digest is not None:
            check_digest(data, digest, f"{name} in {self.path}")
        try:
            return json.loads(data)
        except ValueError:
            raise InputError(f"{name} in {self.path} is not JSON", hint=HINT_LAYOUT) from None


def blob_name(digest: Any, what: str) -> str:
    m = _DIGEST.fullmatch(digest) if isinstance(digest, str) else None
    if not m:
        raise InputError(f"{what} has the digest {digest!r}, which is not sha256:HEX or sha512:HEX")
    alg, hexa = (m.group(1), m.group(2)) if m.group(1) else (m.group(3), m.group(4))
    return f"blobs/{alg}/{hexa}"


def _hasher(digest: str) -> Any:
    return hashlib.new(digest.split(":", 1)[0])


def check_digest(data: bytes, digest: str, what: str) -> None:
    h = _hasher(digest)
    h.update(data)
    if f"{digest.split(':', 1)[0]}:{h.hexdigest()}" != digest:
        raise ChecksumError(
            f"{what} does not match its digest {digest[:19]}...",
            hint=_HINT_DAMAGED,
        )


class HashingReader(io.RawIOBase):
    """Passes a stream through, hashing what is read; :meth:`verify` reads to the end and compares."""

    def __init__(self, raw: IO[bytes], digest: str, what: str) -> None:
        self.raw, self.digest, self.what = raw, digest, what
        self.h = _hasher(digest)

    def readable(self) -> bool:
        return True

    def readinto(self, b: Any) -> int:
        data = self.raw.read(len(b))
        self.h.update(data)
        b[: len(data)] = data
        return len(data)

    def verify(self, *, limit: int | None = None) -> None:
        """Read what is left (at most ``limit`` bytes), then compare the digest.

        Raises:
            ChecksumError: the bytes do not match (or more than ``limit`` were left).
        """
        left = 0
        while block := self.raw.read(1 << 20):
            self.h.update(block)
            left += len(block)
            if limit is not None and left > limit:
                break
        if f"{self.digest.split(':', 1)[0]}:{self.h.hexdigest()}" != self.digest:
            raise ChecksumError(
                f"{self.what} does not match its digest {self.digest[:19]}...",
                hint=_HINT_DAMAGED,
            )

    def close(self) -> None:
        self.raw.close()
        super().close()
