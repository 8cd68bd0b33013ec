# tarfile's filters take and give str paths, so this module works on them as os.path does.
# ruff: noqa: PTH110, PTH112, PTH114, PTH118, PTH119, PTH120
"""Container images as BUDA's admins have them: OCI image layouts and ``docker save`` tarballs.

:func:`load_image` reads, without a daemon and without the network,

* an **OCI image layout** directory (``oci-layout``, ``index.json``, ``blobs/ALG/HEX``), as
  ``skopeo copy ... oci:DIR``, ``buildah push ... oci:DIR``, ``umoci`` or ``podman save
  --format oci-dir`` write it, or the same layout in a tarball (``docker save`` since
  Docker 25 writes one, with a ``manifest.json`` beside it);
* a **docker-archive** tarball (``docker save`` before 25, ``podman save``):
  ``manifest.json`` naming a config file and layer tarballs.

An index may list several platforms: ``linux/amd64`` is taken, and anything else is
refused naming what was there. Every blob read from a layout is checked against its
digest (manifests and configs before they are used, layers while they stream); a
docker-archive's layers are checked against the config's ``rootfs.diff_ids``.

:func:`apply_layers` lays the layers into a directory in order, as a container runtime
would: whiteouts (``.wh.NAME``) delete what lower layers put there, an opaque marker
(``.wh..wh..opq``) empties a directory of lower layers' entries, a later entry replaces an
earlier one of another type. Extraction goes through the standard library's ``data``
filter, so a member whose name is absolute, contains ``..`` that leaves the root, or
resolves outside it through a link already there, a hard link to outside, and device
nodes and FIFOs are refused; symbolic links are kept as they are (their targets are read
inside the container at run time, where ``/`` is the container's root), and nothing is
ever written *through* one that points outside. The host tree holds plain files owned by
whoever runs boincvm; each entry's real mode (setuid bits included), owner and group are
recorded (:class:`RootTree`) and applied to the ext4 disk afterwards.
"""

from __future__ import annotations

import bz2
import copy
import gzip
import hashlib
import io
import json
import lzma
import os
import re
import shutil
import stat
import tarfile
import zlib
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import IO, Any, BinaryIO

from boincvm.errors import ChecksumError, InputError, PathEscapeError
from boincvm.paths import open_regular

#: The largest manifest, index or config read (they are JSON documents of a few KiB).
MAX_JSON_BYTES = 4 * 1024 * 1024
#: The default bound on the unpacked root file system (bytes of regular files).
DEFAULT_MAX_ROOT_BYTES = 32 * 1024**3
#: The default bound on the number of entries all layers may hold.
DEFAULT_MAX_ENTRIES = 2_000_000
#: What may follow a layer's tar end marker (padding) before the diff_id check gives up.
TAIL_LIMIT = 64 * 1024 * 1024
WHITEOUT = ".wh."
OPAQUE = ".wh..wh..opq"

_DIGEST = re.compile(r"(sha256):([a-f0-9]{64})|(sha512):([a-f0-9]{128})")
_INDEX_TYPES = (
    "application/vnd.oci.image.index.v1+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
)
_HINT_LAYOUT = (
    "give an OCI image layout (skopeo copy docker-daemon:IMG oci:DIR, podman save --format oci-dir) "
    "or a docker save / podman save tarball"
)


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


class _Source:
    """Files of an image layout or archive, read by relative name, never followed outside it."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.tar: tarfile.TarFile | None = None
        if path.is_file():
            try:
                self.tar = tarfile.open(path, "r:")  # noqa: SIM115 - lives as long as the image
            except tarfile.TarError as exc:
                raise InputError(f"{path} is not a tar archive ({exc})", hint=_HINT_LAYOUT) from None
        elif not path.is_dir():
            raise InputError(f"{path} does not exist", hint=_HINT_LAYOUT)

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
            raise InputError(f"{self.path} has no file {name}", hint=_HINT_LAYOUT)
        return f  # type: ignore[return-value]

    def read_json(self, name: str, *, digest: str | None = None) -> Any:
        with self.open(name) as f:
            data = f.read(MAX_JSON_BYTES + 1)
        if len(data) > MAX_JSON_BYTES:
            raise InputError(
                f"{name} in {self.path} is larger than {MAX_JSON_BYTES} bytes", hint=_HINT_LAYOUT
            )
        if digest is not None:
            _check_digest(data, digest, f"{name} in {self.path}")
        try:
            return json.loads(data)
        except ValueError:
            raise InputError(f"{name} in {self.path} is not JSON", hint=_HINT_LAYOUT) from None


def _blob_name(digest: Any, what: str) -> str:
    m = _DIGEST.fullmatch(digest) if isinstance(digest, str) else None
    if not m:
        raise InputError(f"{what} has the digest {digest!r}, which is not sha256:HEX or sha512:HEX")
    alg, hexa = (m.group(1), m.group(2)) if m.group(1) else (m.group(3), m.group(4))
    return f"blobs/{alg}/{hexa}"


def _hasher(digest: str) -> Any:
    return hashlib.new(digest.split(":", 1)[0])


def _check_digest(data: bytes, digest: str, what: str) -> None:
    h = _hasher(digest)
    h.update(data)
    if f"{digest.split(':', 1)[0]}:{h.hexdigest()}" != digest:
        raise ChecksumError(
            f"{what} does not match its digest {digest[:19]}...",
            hint="the image is damaged or was altered; copy it again from its registry or build",
        )


class _HashingReader(io.RawIOBase):
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
                hint="the image is damaged or was altered; copy it again from its registry or build",
            )

    def close(self) -> None:
        self.raw.close()
        super().close()


# -- loading -------------------------------------------------------------------------------


def _strings(value: Any, what: str) -> tuple[str, ...]:
    if value is None:
        return ()
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise InputError(f"{what} must be a list of strings", hint=_HINT_LAYOUT)
    return tuple(value)


def parse_config(data: Any, what: str) -> ImageConfig:
    """The parts of an image config boincvm uses.

    Raises:
        InputError: a field has the wrong type, or the image is not linux/amd64.
    """
    if not isinstance(data, dict):
        raise InputError(f"{what} is not a JSON object", hint=_HINT_LAYOUT)
    arch, os_name = data.get("architecture", "amd64"), data.get("os", "linux")
    if (os_name, arch) != ("linux", "amd64"):
        raise InputError(
            f"{what} is an image for {os_name}/{arch}; boincvm's guests run linux/amd64",
            hint="build or pull the image for linux/amd64 (--platform linux/amd64)",
        )
    conf = data.get("config") or {}
    if not isinstance(conf, dict):
        raise InputError(f"{what}.config is not a JSON object", hint=_HINT_LAYOUT)
    workdir = conf.get("WorkingDir") or "/"
    user = conf.get("User") or ""
    if not isinstance(workdir, str) or not workdir.startswith("/") or "\0" in workdir:
        raise InputError(f"{what}.config.WorkingDir must be an absolute path, got {workdir!r}")
    if ".." in PurePosixPath(workdir).parts:
        raise PathEscapeError(f"{what}.config.WorkingDir {workdir!r} has '..'")
    if not isinstance(user, str) or any(c in user for c in "\0\n"):
        raise InputError(f"{what}.config.User must be a string, got {user!r}")
    env = _strings(conf.get("Env"), f"{what}.config.Env")
    bad = [e for e in env if "=" not in e or not e.split("=", 1)[0]]
    if bad:
        raise InputError(f"{what}.config.Env has {bad[0]!r}, which is not NAME=VALUE")
    return ImageConfig(
        entrypoint=_strings(conf.get("Entrypoint"), f"{what}.config.Entrypoint"),
        cmd=_strings(conf.get("Cmd"), f"{what}.config.Cmd"),
        env=env,
        working_dir=str(PurePosixPath(workdir)),
        user=user,
        architecture=arch,
        os=os_name,
    )


def _descriptor_platform(desc: Mapping[str, Any]) -> str:
    plat = desc.get("platform")
    if not isinstance(plat, dict):
        return "unknown"
    return f"{plat.get('os', '?')}/{plat.get('architecture', '?')}"


def _pick_manifest(src: _Source, index: Any, what: str, depth: int = 0) -> tuple[str, Any]:
    """The linux/amd64 image manifest an index leads to: (digest, parsed manifest)."""
    if depth > 4:
        raise InputError(f"{what} nests indexes more than 4 deep", hint=_HINT_LAYOUT)
    entries = index.get("manifests") if isinstance(index, dict) else None
    if not isinstance(entries, list) or not entries or not all(isinstance(e, dict) for e in entries):
        raise InputError(f"{what} lists no manifests", hint=_HINT_LAYOUT)
    plain = [e for e in entries if _descriptor_platform(e) != "unknown/unknown"]  # attestations
    amd64 = [e for e in plain if _descriptor_platform(e) == "linux/amd64"]
    undeclared = [e for e in plain if "platform" not in e]
    if amd64:
        chosen = amd64[0]
    elif len(undeclared) == 1 and len(plain) == 1:
        chosen = undeclared[0]
    else:
        found = ", ".join(sorted({_descriptor_platform(e) for e in entries}))
        raise InputError(
            f"{what} has no linux/amd64 image (it has {found})",
            hint="build or copy the image for linux/amd64 (--platform linux/amd64)",
        )
    digest = chosen.get("digest")
    doc = src.read_json(_blob_name(digest, what), digest=digest)
    if chosen.get("mediaType") in _INDEX_TYPES or (isinstance(doc, dict) and "manifests" in doc):
        return _pick_manifest(src, doc, f"index {str(digest)[:19]}", depth + 1)
    return str(digest), doc


def _load_layout(path: Path, src: _Source) -> OciImage:
    index = src.read_json("index.json")
    digest, manifest = _pick_manifest(src, index, f"{path.name}/index.json")
    what = f"manifest {digest[:19]}"
    if not isinstance(manifest, dict) or not isinstance(manifest.get("config"), dict):
        raise InputError(f"{what} has no config", hint=_HINT_LAYOUT)
    cdigest = manifest["config"].get("digest")
    config = parse_config(src.read_json(_blob_name(cdigest, what), digest=cdigest), f"config of {path.name}")
    layers = []
    for i, desc in enumerate(manifest.get("layers") or []):
        if not isinstance(desc, dict):
            raise InputError(f"{what}.layers[{i}] is not an object", hint=_HINT_LAYOUT)
        layers.append(
            Layer(
                _blob_name(desc.get("digest"), f"{what}.layers[{i}]"),
                str(desc.get("mediaType", "")),
                digest=desc.get("digest"),
            )
        )

    def opener(layer: Layer) -> BinaryIO:
        assert layer.digest is not None
        return _HashingReader(src.open(layer.name), layer.digest, f"layer {layer.digest[:19]}")  # type: ignore[return-value]

    return OciImage(path, config, tuple(layers), digest, opener)


def _load_archive(path: Path, src: _Source) -> OciImage:
    manifest = src.read_json("manifest.json")
    if not isinstance(manifest, list) or len(manifest) != 1 or not isinstance(manifest[0], dict):
        count = len(manifest) if isinstance(manifest, list) else 0
        raise InputError(
            f"{path.name}/manifest.json lists {count} images; boincvm takes one",
            hint="save one image per tarball (docker save IMAGE -o FILE.tar)",
        )
    entry = manifest[0]
    config_name = entry.get("Config")
    if not isinstance(config_name, str):
        raise InputError(f"{path.name}/manifest.json names no Config", hint=_HINT_LAYOUT)
    with src.open(config_name) as f:
        raw = f.read(MAX_JSON_BYTES + 1)
    config_digest = "sha256:" + hashlib.sha256(raw).hexdigest()
    stem = PurePosixPath(config_name).name.removesuffix(".json")
    if re.fullmatch(r"[a-f0-9]{64}", stem) and stem != config_digest[7:]:
        raise ChecksumError(
            f"{config_name} in {path.name} does not match its digest sha256:{stem[:12]}...",
            hint="the image is damaged or was altered; save it again",
        )
    try:
        config_doc = json.loads(raw)
    except ValueError:
        raise InputError(f"{config_name} in {path.name} is not JSON", hint=_HINT_LAYOUT) from None
    config = parse_config(config_doc, f"config of {path.name}")
    names = _strings(entry.get("Layers"), f"{path.name}/manifest.json Layers")
    rootfs = config_doc.get("rootfs") if isinstance(config_doc, dict) else None
    diff_ids = _strings(rootfs.get("diff_ids") if isinstance(rootfs, dict) else None, "rootfs.diff_ids")
    if len(diff_ids) != len(names):
        raise ChecksumError(
            f"{path.name} has {len(names)} layers but its config lists {len(diff_ids)} diff_ids",
            hint="the image is damaged or was altered; save it again",
        )
    layers = tuple(
        Layer(n, "application/vnd.docker.image.rootfs.diff.tar", diff_id=d)
        for n, d in zip(names, diff_ids, strict=True)
    )

    def opener(layer: Layer) -> BinaryIO:
        return src.open(layer.name)

    return OciImage(path, config, layers, config_digest, opener)


def load_image(path: Path) -> OciImage:
    """Read the image in an OCI layout directory or a docker/podman save tarball.

    Raises:
        InputError: not such a layout, no linux/amd64 image, a malformed document.
        ChecksumError: a manifest or config does not match its digest.
        PathEscapeError: a name in the layout leaves it.
    """
    src = _Source(path)
    if src.exists("oci-layout") and src.exists("index.json"):
        return _load_layout(path, src)
    if src.exists("manifest.json"):
        return _load_archive(path, src)
    raise InputError(f"{path} is neither an OCI image layout nor a docker save tarball", hint=_HINT_LAYOUT)


# -- applying the layers -------------------------------------------------------------------


@dataclass
class RootTree:
    """What the unpacked root holds beyond what the host files show.

    Attributes:
        root: the directory the layers were applied to.
        meta: relative path -> (mode with type bits, uid, gid) as the layers said, for every
            entry that exists; the host files have safe modes and whatever owner extracted them.
        nbytes: bytes of regular files written.
    """

    root: Path
    meta: dict[str, tuple[int, int, int]] = field(default_factory=dict)
    nbytes: int = 0


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink()


def _relname(name: str, what: str) -> str:
    """The member's name relative to the root, refusing absolute names and control characters."""
    if any(ord(c) < 32 or c == "\x7f" for c in name):
        raise PathEscapeError(f"{what} has a member named {name!r}, with control characters")
    if name.startswith("/"):
        raise PathEscapeError(f"{what} has a member with the absolute name {name!r}")
    norm = os.path.normpath(name)
    if norm == ".":
        return ""
    if norm == ".." or norm.startswith("../"):
        raise PathEscapeError(f"{what} has a member {name!r} that leaves the root")
    return norm


class _Applier:
    def __init__(self, tree: RootTree, max_bytes: int, max_entries: int) -> None:
        self.tree, self.max_bytes, self.max_entries = tree, max_bytes, max_entries
        self.root = str(tree.root)
        self.entries = 0
        self.this_layer: set[str] = set()

    def _inside(self, rel: str, what: str) -> str:
        """The host path of ``rel``'s parent, resolved, once the data filter found it inside the root."""
        parent = os.path.dirname(rel)
        if parent:
            probe = tarfile.TarInfo(parent)
            probe.type = tarfile.DIRTYPE
            try:
                tarfile.data_filter(probe, self.root)
            except tarfile.FilterError as exc:
                raise PathEscapeError(f"{what}: {rel!r} would be written outside the root ({exc})") from None
        real_parent = os.path.realpath(os.path.join(self.root, parent))
        return os.path.join(real_parent, os.path.basename(rel))

    def _whiteout(self, rel: str, what: str) -> None:
        parent, base = os.path.split(rel)
        if base == OPAQUE:
            target = Path(self._inside(os.path.join(parent, "x"), what)).parent
            if target.is_dir() and not target.is_symlink():
                for child in target.iterdir():
                    crel = os.path.join(parent, child.name)
                    if crel not in self.this_layer:
                        self._forget(crel)
                        _remove(child)
            return
        name = base[len(WHITEOUT) :]
        if name in ("", ".", "..") or "/" in name:
            raise PathEscapeError(f"{what} has a whiteout of {name!r}, which names no entry of its directory")
        target_rel = os.path.join(parent, name)
        target = Path(self._inside(target_rel, what))
        if os.path.lexists(target):
            self._forget(target_rel)
            _remove(target)

    def _forget(self, rel: str) -> None:
        prefix = rel + "/"
        for key in [k for k in self.tree.meta if k == rel or k.startswith(prefix)]:
            del self.tree.meta[key]

    def filter(self, member: tarfile.TarInfo, dest: str, what: str) -> tarfile.TarInfo | None:
        self.entries += 1
        if self.entries > self.max_entries:
            raise InputError(
                f"the image's layers hold more than {self.max_entries} entries",
                hint="the image is not a sensible root file system; check what was saved",
            )
        rel = _relname(member.name, what)
        if not rel:
            return None  # the root itself ("./")
        base = os.path.basename(rel)
        if base.startswith(WHITEOUT):
            self._whiteout(rel, what)
            return None
        if member.isreg():
            self.tree.nbytes += member.size
            if self.tree.nbytes > self.max_bytes:
                raise InputError(
                    f"the image's layers unpack to more than {self.max_bytes} bytes",
                    hint="a root file system this large is refused; raise --max-root-size if it is meant",
                )
        if member.ischr() or member.isblk() or member.isfifo():
            special = "a FIFO" if member.isfifo() else "a device node"
            raise InputError(
                f"{what} has {special} {rel!r}; container images carry none (the guest makes /dev)",
                hint="remove it from the image (a runtime provides /dev)",
            )
        literal = self._inside(rel, what)
        if os.path.lexists(literal) and not (
            member.isdir() and os.path.isdir(literal) and not os.path.islink(literal)
        ):
            self._forget(rel)
            _remove(Path(literal))
        renamed = member.replace(name=rel, deep=False)
        try:
            if member.issym():
                # The target is read inside the container, where "/" is its root: kept as it
                # is. The name is checked as a plain file's would be.
                probe = copy.copy(renamed)
                probe.type, probe.linkname, probe.size = tarfile.REGTYPE, "", 0
                tarfile.data_filter(probe, dest)
                checked = renamed
            else:
                checked = tarfile.data_filter(renamed, dest)
        except tarfile.FilterError as exc:
            raise PathEscapeError(f"{what}: {rel!r} is refused ({exc})") from None
        if member.islnk():
            target = _relname(member.linkname, what)
            checked = checked.replace(linkname=target, deep=False)
        self.this_layer.add(rel)
        kind = stat.S_IFDIR if member.isdir() else stat.S_IFLNK if member.issym() else stat.S_IFREG
        if member.islnk():
            src_meta = self.tree.meta.get(os.path.normpath(member.linkname))
            self.tree.meta[rel] = src_meta or (stat.S_IFREG | (member.mode & 0o7777), member.uid, member.gid)
        else:
            self.tree.meta[rel] = (kind | (member.mode & 0o7777), member.uid, member.gid)
        # The host copy: owner-writable, nothing set-id; the recorded mode goes on the disk.
        safe = (member.mode & 0o755) | (0o700 if member.isdir() else 0o600)
        # None means "leave as it is" to tarfile (typeshed says int and str).
        unset: Any = None
        return checked.replace(
            mode=safe if not member.issym() else unset,
            uid=unset,
            gid=unset,
            uname=unset,
            gname=unset,
            deep=False,
        )


def _decompressed(buffered: IO[bytes], media_type: str) -> IO[bytes]:
    head = buffered.peek(8)[:8]  # type: ignore[attr-defined]
    if head[:2] == b"\x1f\x8b":
        return gzip.GzipFile(fileobj=buffered)  # type: ignore[return-value]
    if head[:4] == b"\x28\xb5\x2f\xfd" or media_type.endswith("zstd"):
        raise InputError(
            "a layer is zstd-compressed, which boincvm cannot read yet",
            hint="copy the image with gzip layers: skopeo copy --dest-compress-format gzip SRC oci:DIR",
        )
    if head[:3] == b"BZh":
        return bz2.BZ2File(buffered)
    if head[:6] == b"\xfd7zXZ\x00":
        return lzma.LZMAFile(buffered)
    return buffered


def apply_layers(
    image: OciImage,
    root: Path,
    *,
    max_bytes: int = DEFAULT_MAX_ROOT_BYTES,
    max_entries: int = DEFAULT_MAX_ENTRIES,
    progress: Callable[[str], None] | None = None,
) -> RootTree:
    """Apply the image's layers, in order, to the empty directory ``root``.

    Raises:
        PathEscapeError: a member is absolute, leaves the root, or goes through a link out of it;
            a whiteout names ``..``.
        InputError: a device node or FIFO, more than ``max_bytes`` of files or ``max_entries``
            entries, an unreadable or zstd layer.
        ChecksumError: a layer does not match its digest or diff_id.
    """
    tree = RootTree(root)
    applier = _Applier(tree, max_bytes, max_entries)
    for i, layer in enumerate(image.layers):
        what = f"layer {i + 1} of {len(image.layers)}"
        if progress is not None:
            progress(f"applying {what}")
        applier.this_layer = set()
        with image.open_layer(layer) as raw:
            buffered: IO[bytes] = io.BufferedReader(raw, 1 << 20)  # type: ignore[type-var]
            stream = _decompressed(buffered, layer.media_type)
            diff = None
            if layer.diff_id is not None:
                diff = _HashingReader(stream, layer.diff_id, what)
                stream = io.BufferedReader(diff, 1 << 20)
            try:
                with tarfile.open(fileobj=stream, mode="r|") as tar:
                    tar.extractall(  # noqa: S202 - every member passes applier.filter (the data filter)
                        root, filter=lambda m, d, w=what: applier.filter(m, d, w), numeric_owner=True
                    )
                if diff is not None:
                    diff.verify(limit=TAIL_LIMIT)
                if isinstance(raw, _HashingReader):
                    raw.verify()
            except (tarfile.TarError, EOFError, zlib.error, lzma.LZMAError, OSError) as exc:
                raise InputError(f"{what} is not a readable tar stream ({exc})", hint=_HINT_LAYOUT) from None
    return tree
