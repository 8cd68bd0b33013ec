"""Container images made by code for the tests: OCI layouts and docker-save tarballs.

:func:`write_layout` writes an OCI image layout from layers given as lists of members, so
hostile layers (``../``, absolute names, devices, whiteouts of ``..``) can be made exactly;
:func:`umoci_layout` makes a real one with Debian's ``umoci`` from a layer tarball.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import subprocess
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

LONGJOB = Path(__file__).resolve().parents[1] / "examples/longjob/program/bin/longjob"


@dataclass(frozen=True)
class M:
    """One tar member: kind is file, dir, symlink, hardlink, chardev or fifo."""

    name: str
    kind: str = "file"
    data: bytes = b""
    mode: int = 0o644
    uid: int = 0
    gid: int = 0
    link: str = ""


_TYPES = {
    "file": tarfile.REGTYPE,
    "dir": tarfile.DIRTYPE,
    "symlink": tarfile.SYMTYPE,
    "hardlink": tarfile.LNKTYPE,
    "chardev": tarfile.CHRTYPE,
    "fifo": tarfile.FIFOTYPE,
}


def layer_tar(members: list[M]) -> bytes:
    """An uncompressed tar of ``members`` (PAX format, fixed times)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as t:
        for m in members:
            ti = tarfile.TarInfo(m.name)
            ti.type = _TYPES[m.kind]
            ti.mode, ti.uid, ti.gid, ti.linkname, ti.mtime = m.mode, m.uid, m.gid, m.link, 1700000000
            ti.size = len(m.data) if m.kind == "file" else 0
            if m.kind == "chardev":
                ti.devmajor, ti.devminor = 1, 3
            t.addfile(ti, io.BytesIO(m.data) if m.kind == "file" else None)
    return buf.getvalue()


def _blob(layout: Path, data: bytes) -> str:
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    path = layout / "blobs" / "sha256" / digest[7:]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return digest


def image_config(**config: Any) -> dict[str, Any]:
    return {
        "architecture": "amd64",
        "os": "linux",
        "config": config,
        "rootfs": {"type": "layers", "diff_ids": []},
    }


def write_layout(
    layout: Path,
    layers: list[list[M]],
    config: dict[str, Any] | None = None,
    *,
    platforms: tuple[str, ...] = ("linux/amd64",),
) -> Path:
    """An OCI layout with gzip layers; with several ``platforms`` an index lists one manifest each."""
    layout.mkdir(parents=True)
    (layout / "oci-layout").write_text('{"imageLayoutVersion": "1.0.0"}')
    config = config or image_config()
    descs = []
    for members in layers:
        raw = layer_tar(members)
        config["rootfs"]["diff_ids"].append("sha256:" + hashlib.sha256(raw).hexdigest())
        data = gzip.compress(raw, mtime=0)
        descs.append(
            {
                "mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
                "digest": _blob(layout, data),
                "size": len(data),
            }
        )
    cdata = json.dumps(config).encode()
    manifest = {
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {
            "mediaType": "application/vnd.oci.image.config.v1+json",
            "digest": _blob(layout, cdata),
            "size": len(cdata),
        },
        "layers": descs,
    }
    mdata = json.dumps(manifest).encode()
    mdigest = _blob(layout, mdata)
    entries = [
        {
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "digest": mdigest,
            "size": len(mdata),
            "platform": {"os": p.split("/")[0], "architecture": p.split("/")[1]},
        }
        for p in platforms
    ]
    (layout / "index.json").write_text(json.dumps({"schemaVersion": 2, "manifests": entries}))
    return layout


def manifest_blob(layout: Path) -> Path:
    """The manifest blob the index names (to tamper with it)."""
    index = json.loads((layout / "index.json").read_text())
    digest: str = index["manifests"][0]["digest"]
    return layout / "blobs" / "sha256" / digest[7:]


def write_docker_archive(path: Path, layers: list[list[M]], config: dict[str, Any] | None = None) -> Path:
    """A ``docker save``-style tarball: manifest.json, CONFIG.json, LAYER/layer.tar."""
    config = config or image_config()
    files: dict[str, bytes] = {}
    names = []
    for i, members in enumerate(layers):
        raw = layer_tar(members)
        config["rootfs"]["diff_ids"].append("sha256:" + hashlib.sha256(raw).hexdigest())
        names.append(f"layer{i}/layer.tar")
        files[names[-1]] = raw
    cdata = json.dumps(config).encode()
    cname = hashlib.sha256(cdata).hexdigest() + ".json"
    files[cname] = cdata
    files["manifest.json"] = json.dumps(
        [{"Config": cname, "RepoTags": ["t:latest"], "Layers": names}]
    ).encode()
    with tarfile.open(path, "w") as t:
        for name, data in files.items():
            ti = tarfile.TarInfo(name)
            ti.size = len(data)
            t.addfile(ti, io.BytesIO(data))
    return path


def busybox_members(*, user: tuple[int, int] = (1000, 1000)) -> list[M]:
    """A ``FROM scratch`` root: static busybox, applet links, the long job, /work owned by ``user``."""
    applets = ["sh", "awk", "sleep", "dd", "echo", "cat", "id", "pwd"]
    return [
        M("bin", "dir", mode=0o755),
        M("bin/busybox", data=Path("/bin/busybox").read_bytes(), mode=0o755),
        *(M(f"bin/{a}", "symlink", link="busybox", mode=0o777) for a in applets),
        M("app", "dir", mode=0o755),
        M("app/longjob", data=LONGJOB.read_bytes(), mode=0o755),
        M("work", "dir", mode=0o755, uid=user[0], gid=user[1]),
    ]


def umoci_layout(layout: Path, layer: Path, *config_args: str) -> Path:
    """A real OCI layout made by umoci from one layer tarball, configured by ``umoci config`` arguments."""

    def umoci(*args: str) -> None:
        subprocess.run(["umoci", *args], check=True, capture_output=True, timeout=600)

    umoci("init", "--layout", str(layout))
    umoci("new", "--image", f"{layout}:latest")
    umoci("raw", "add-layer", "--image", f"{layout}:latest", str(layer))
    umoci("config", "--image", f"{layout}:latest", "--os", "linux", "--architecture", "amd64", *config_args)
    return layout


def debian_rootfs_tar() -> Path:
    """A Debian root file system with python3 (``mmdebstrap --variant=essential --format=tar``),
    made once and cached under the boincvm cache, named by the command that made it."""
    from boincvm.cache import cache_root

    args = [
        "--variant=essential",
        "--include=python3-minimal",
        "--format=tar",
        "bookworm",
    ]
    name = hashlib.sha256(json.dumps(args).encode()).hexdigest()[:16]
    out = cache_root() / "test-images" / f"debian-python-{name}.tar"
    if not out.is_file():
        out.parent.mkdir(parents=True, exist_ok=True)
        part = out.with_suffix(".part")
        subprocess.run(["mmdebstrap", "-q", *args, str(part)], check=True, capture_output=True, timeout=1800)
        part.rename(out)
    return out
