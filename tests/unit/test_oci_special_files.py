"""Device nodes and FIFOs in a container image's layers: dropped with a note, as a
distribution's root (``mmdebstrap --format=tar``) carries them; escaping names still refused."""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from pathlib import Path

import pytest

from boincvm.errors import PathEscapeError
from boincvm.image.oci import RootTree, apply_layers, load_image
from tests.oci_images import M, image_config, write_layout

_HEAD = "dropped from the image's layers: "
_TAIL = " (the guest mounts its own /dev, a devtmpfs)"
DEVICES = ["console", "null", "zero", "tty", "ptmx", "random", "urandom", "full"]


def _member(name: str, kind: bytes, *, data: bytes = b"", link: str = "") -> tuple[tarfile.TarInfo, bytes]:
    ti = tarfile.TarInfo(name)
    ti.type, ti.linkname, ti.mode, ti.mtime = kind, link, 0o666, 1700000000
    ti.size = len(data) if kind == tarfile.REGTYPE else 0
    if kind in (tarfile.CHRTYPE, tarfile.BLKTYPE):
        ti.devmajor, ti.devminor = 1, 3
    return ti, data


def _layer(members: list[tuple[tarfile.TarInfo, bytes]]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as t:
        for ti, data in members:
            t.addfile(ti, io.BytesIO(data) if ti.isreg() else None)
    return buf.getvalue()


def _archive(path: Path, *layers: bytes) -> Path:
    """A docker-save tarball holding ``layers`` (raw tar bytes, as mmdebstrap writes a root)."""
    config = image_config()
    files: dict[str, bytes] = {}
    for i, raw in enumerate(layers):
        config["rootfs"]["diff_ids"].append("sha256:" + hashlib.sha256(raw).hexdigest())
        files[f"layer{i}/layer.tar"] = raw
    cdata = json.dumps(config).encode()
    cname = hashlib.sha256(cdata).hexdigest() + ".json"
    files[cname] = cdata
    names = [n for n in files if n.endswith("layer.tar")]
    files["manifest.json"] = json.dumps([{"Config": cname, "Layers": names}]).encode()
    with tarfile.open(path, "w") as t:
        for name, data in files.items():
            ti = tarfile.TarInfo(name)
            ti.size = len(data)
            t.addfile(ti, io.BytesIO(data))
    return path


def _apply(tmp_path: Path, source: Path, said: list[str] | None = None) -> RootTree:
    root = tmp_path / "root"
    root.mkdir()
    return apply_layers(load_image(source), root, progress=None if said is None else said.append)


def _debian_like_root() -> bytes:
    """What ``mmdebstrap --format=tar`` puts in ``./dev`` and around it, names ``./``-prefixed."""
    return _layer(
        [
            _member("./", tarfile.DIRTYPE),
            _member("./dev/", tarfile.DIRTYPE),
            *(_member(f"./dev/{d}", tarfile.CHRTYPE) for d in DEVICES),
            _member("./dev/loop0", tarfile.BLKTYPE),
            _member("./dev/fd", tarfile.SYMTYPE, link="/proc/self/fd"),
            _member("./dev/stdout", tarfile.SYMTYPE, link="/proc/self/fd/1"),
            _member("./dev/null-again", tarfile.LNKTYPE, link="./dev/null"),
            _member("./run/", tarfile.DIRTYPE),
            _member("./run/initctl", tarfile.FIFOTYPE),
            _member("./usr/", tarfile.DIRTYPE),
            _member("./usr/bin/", tarfile.DIRTYPE),
            _member("./usr/bin/perl5.36.0", tarfile.REGTYPE, data=b"perl"),
            _member("./usr/bin/perl", tarfile.LNKTYPE, link="./usr/bin/perl5.36.0"),
        ]
    )


def test_device_nodes_and_fifos_of_a_distribution_root_are_dropped_with_a_note(tmp_path: Path) -> None:
    app = _layer([_member("app/", tarfile.DIRTYPE), _member("app/job", tarfile.REGTYPE, data=b"#!")])
    said: list[str] = []
    tree = _apply(tmp_path, _archive(tmp_path / "img.tar", _debian_like_root(), app), said)
    root = tree.root
    assert sorted(p.name for p in (root / "dev").iterdir()) == ["fd", "stdout"]
    assert (root / "dev/fd").readlink() == Path("/proc/self/fd")
    assert not (root / "run/initctl").exists()
    assert (root / "usr/bin/perl").stat().st_ino == (root / "usr/bin/perl5.36.0").stat().st_ino
    assert (root / "app/job").read_bytes() == b"#!"
    assert not [k for k in tree.meta if k.startswith("dev/") and k not in ("dev/fd", "dev/stdout")]
    assert "run/initctl" not in tree.meta
    (note,) = tree.notes
    assert note.startswith(_HEAD + "9 device nodes (/dev/console, /dev/null, /dev/zero, /dev/tty,")
    assert "/dev/loop0)" in note
    assert "1 FIFO (/run/initctl)" in note
    assert "1 hard link to a dropped node (/dev/null-again)" in note
    assert note.endswith("(/dev/null-again)" + _TAIL)
    assert said == ["applying layer 1 of 2", "applying layer 2 of 2", f"note: {note}"]


def test_a_long_list_of_dropped_names_is_cut_short(tmp_path: Path) -> None:
    layer = [M("dev", "dir"), *(M(f"dev/tty{i}", "chardev") for i in range(40))]
    tree = _apply(tmp_path, write_layout(tmp_path / "img", [layer]))
    (note,) = tree.notes
    assert note.startswith(_HEAD + "40 device nodes (/dev/tty0, /dev/tty1,")
    assert "/dev/tty11 and 28 more)" in note
    assert "/dev/tty12" not in note


def test_a_device_node_hides_what_a_lower_layer_had_at_its_name(tmp_path: Path) -> None:
    lower = [M("etc", "dir"), M("etc/thing", data=b"lower"), M("etc/dir", "dir"), M("etc/dir/f", data=b"x")]
    upper = [M("etc/thing", "chardev"), M("etc/dir", "fifo")]
    tree = _apply(tmp_path, write_layout(tmp_path / "img", [lower, upper]))
    assert sorted(p.name for p in (tree.root / "etc").iterdir()) == []
    assert sorted(tree.meta) == ["etc"]
    assert "1 device node (/etc/thing)" in tree.notes[0]


def test_a_file_put_back_over_a_dropped_node_is_kept_and_linkable(tmp_path: Path) -> None:
    lower = [M("dev", "dir"), M("dev/null", "chardev")]
    upper = [M("dev/null", data=b"plain"), M("dev/also", "hardlink", link="dev/null")]
    tree = _apply(tmp_path, write_layout(tmp_path / "img", [lower, upper]))
    assert (tree.root / "dev/also").read_bytes() == b"plain"
    assert tree.notes == [_HEAD + "1 device node (/dev/null)" + _TAIL]


def test_an_image_without_special_files_has_no_note(tmp_path: Path) -> None:
    tree = _apply(tmp_path, write_layout(tmp_path / "img", [[M("a", data=b"1")]]))
    assert tree.notes == []


@pytest.mark.parametrize(
    ("members", "sentence"),
    [
        ([_member("../dev/mem", tarfile.CHRTYPE)], "leaves the root"),
        ([_member("./dev/../../mem", tarfile.CHRTYPE)], "leaves the root"),
        ([_member("/dev/mem", tarfile.CHRTYPE)], "absolute name"),
        ([_member("../fifo", tarfile.FIFOTYPE)], "leaves the root"),
        ([_member("../escaped", tarfile.REGTYPE, data=b"x")], "leaves the root"),
        ([_member("h", tarfile.LNKTYPE, link="../outside")], "outside the destination"),
        (
            [_member("out", tarfile.SYMTYPE, link="../.."), _member("out/dev/mem", tarfile.CHRTYPE)],
            "outside the root",
        ),
    ],
    ids=[
        "device-dotdot",
        "device-dotdot-deep",
        "device-absolute",
        "fifo-dotdot",
        "file-dotdot",
        "hardlink-out",
        "device-through-symlink-out",
    ],
)
def test_escaping_names_are_still_refused_devices_included(
    tmp_path: Path, members: list[tuple[tarfile.TarInfo, bytes]], sentence: str
) -> None:
    source = _archive(tmp_path / "img.tar", _layer(members))
    with pytest.raises(PathEscapeError, match=sentence):
        _apply(tmp_path, source)
    assert not (tmp_path / "mem").exists() and not (tmp_path / "escaped").exists()
