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

:func:`apply_layers` (:mod:`boincvm.image.oci_layers`) lays the layers into a directory in
order, as a container runtime would, refusing any member that would land outside it and
dropping device nodes and FIFOs with a note. Callers import from here; the readers live in
:mod:`boincvm.image.oci_source` and the layer rules in :mod:`boincvm.image.oci_layers`.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping
from pathlib import Path, PurePosixPath
from typing import Any, BinaryIO

from boincvm.errors import ChecksumError, InputError, PathEscapeError
from boincvm.image.oci_layers import (
    DEFAULT_MAX_ENTRIES,
    DEFAULT_MAX_ROOT_BYTES,
    RootTree,
    apply_layers,
)
from boincvm.image.oci_source import (
    HINT_LAYOUT,
    MAX_JSON_BYTES,
    HashingReader,
    ImageConfig,
    Layer,
    OciImage,
    Source,
    blob_name,
)

__all__ = [
    "DEFAULT_MAX_ENTRIES",
    "DEFAULT_MAX_ROOT_BYTES",
    "ImageConfig",
    "Layer",
    "OciImage",
    "RootTree",
    "apply_layers",
    "load_image",
    "parse_config",
]

_INDEX_TYPES = (
    "application/vnd.oci.image.index.v1+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
)

# -- loading -------------------------------------------------------------------------------


def _strings(value: Any, what: str) -> tuple[str, ...]:
    if value is None:
        return ()
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise InputError(f"{what} must be a list of strings", hint=HINT_LAYOUT)
    return tuple(value)


def parse_config(data: Any, what: str) -> ImageConfig:
    """The parts of an image config boincvm uses.

    Raises:
        InputError: a field has the wrong type, or the image is not linux/amd64.
    """
    if not isinstance(data, dict):
        raise InputError(f"{what} is not a JSON object", hint=HINT_LAYOUT)
    arch, os_name = data.get("architecture", "amd64"), data.get("os", "linux")
    if (os_name, arch) != ("linux", "amd64"):
        raise InputError(
            f"{what} is an image for {os_name}/{arch}; boincvm's guests run linux/amd64",
            hint="build or pull the image for linux/amd64 (--platform linux/amd64)",
        )
    conf = data.get("config") or {}
    if not isinstance(conf, dict):
        raise InputError(f"{what}.config is not a JSON object", hint=HINT_LAYOUT)
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


def _pick_manifest(src: Source, index: Any, what: str, depth: int = 0) -> tuple[str, Any]:
    """The linux/amd64 image manifest an index leads to: (digest, parsed manifest)."""
    if depth > 4:
        raise InputError(f"{what} nests indexes more than 4 deep", hint=HINT_LAYOUT)
    entries = index.get("manifests") if isinstance(index, dict) else None
    if not isinstance(entries, list) or not entries or not all(isinstance(e, dict) for e in entries):
        raise InputError(f"{what} lists no manifests", hint=HINT_LAYOUT)
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
    doc = src.read_json(blob_name(digest, what), digest=digest)
    if chosen.get("mediaType") in _INDEX_TYPES or (isinstance(doc, dict) and "manifests" in doc):
        return _pick_manifest(src, doc, f"index {str(digest)[:19]}", depth + 1)
    return str(digest), doc


def _load_layout(path: Path, src: Source) -> OciImage:
    index = src.read_json("index.json")
    digest, manifest = _pick_manifest(src, index, f"{path.name}/index.json")
    what = f"manifest {digest[:19]}"
    if not isinstance(manifest, dict) or not isinstance(manifest.get("config"), dict):
        raise InputError(f"{what} has no config", hint=HINT_LAYOUT)
    cdigest = manifest["config"].get("digest")
    config = parse_config(src.read_json(blob_name(cdigest, what), digest=cdigest), f"config of {path.name}")
    layers = []
    for i, desc in enumerate(manifest.get("layers") or []):
        if not isinstance(desc, dict):
            raise InputError(f"{what}.layers[{i}] is not an object", hint=HINT_LAYOUT)
        layers.append(
            Layer(
                blob_name(desc.get("digest"), f"{what}.layers[{i}]"),
                str(desc.get("mediaType", "")),
                digest=desc.get("digest"),
            )
        )

    def opener(layer: Layer) -> BinaryIO:
        assert layer.digest is not None
        return HashingReader(src.open(layer.name), layer.digest, f"layer {layer.digest[:19]}")  # type: ignore[return-value]

    return OciImage(path, config, tuple(layers), digest, opener)


def _load_archive(path: Path, src: Source) -> OciImage:
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
        raise InputError(f"{path.name}/manifest.json names no Config", hint=HINT_LAYOUT)
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
        raise InputError(f"{config_name} in {path.name} is not JSON", hint=HINT_LAYOUT) from None
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
    src = Source(path)
    if src.exists("oci-layout") and src.exists("index.json"):
        return _load_layout(path, src)
    if src.exists("manifest.json"):
        return _load_archive(path, src)
    raise InputError(f"{path} is neither an OCI image layout nor a docker save tarball", hint=HINT_LAYOUT)
