"""OCI layouts and docker-save tarballs: reading, applying layers, the job defaults of an image's config."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest

from boincvm.errors import ChecksumError, InputError
from boincvm.image.container import LAUNCHER, container_task, resolve_user
from boincvm.image.oci import apply_layers, load_image
from tests.oci_images import M, image_config, manifest_blob, write_docker_archive, write_layout


def unpack(tmp_path: Path, source: Path) -> tuple[Path, dict[str, tuple[int, int, int]]]:
    root = tmp_path / "root"
    root.mkdir()
    tree = apply_layers(load_image(source), root)
    return root, tree.meta


def test_layers_apply_in_order_with_whiteouts_opaque_dirs_links_and_modes(tmp_path: Path) -> None:
    lower = [
        M("etc", "dir", mode=0o755),
        M("etc/keep", data=b"lower\n"),
        M("etc/gone", data=b"x"),
        M("opq", "dir"),
        M("opq/old", data=b"old"),
        M("bin", "dir"),
        M("bin/su", data=b"#!", mode=0o4755, uid=0, gid=0),
        M("home", "dir"),
        M("home/u", "dir", mode=0o700, uid=1000, gid=1000),
        M("was-dir", "dir"),
        M("was-dir/inner", data=b"i"),
    ]
    upper = [
        M("etc/.wh.gone"),
        M("opq/.wh..wh..opq"),
        M("opq/new", data=b"new"),
        M("etc/abs", "symlink", link="/etc/keep", mode=0o777),
        M("etc/hard", "hardlink", link="etc/keep"),
        M("was-dir", data=b"now a file"),
    ]
    layout = write_layout(tmp_path / "img", [lower, upper])
    root, meta = unpack(tmp_path, layout)
    assert (root / "etc/keep").read_bytes() == b"lower\n"
    assert not (root / "etc/gone").exists()
    assert sorted(p.name for p in (root / "opq").iterdir()) == ["new"]
    assert (root / "etc/abs").readlink() == Path("/etc/keep")  # kept: read inside the container
    assert (root / "etc/hard").stat().st_ino == (root / "etc/keep").stat().st_ino
    assert (root / "was-dir").read_bytes() == b"now a file"
    # The host copy carries no set-id bit; the recorded mode and owner go on the disk.
    assert not (root / "bin/su").stat().st_mode & stat.S_ISUID
    assert meta["bin/su"] == (stat.S_IFREG | 0o4755, 0, 0)
    assert meta["home/u"] == (stat.S_IFDIR | 0o700, 1000, 1000)
    assert "etc/gone" not in meta and "opq/old" not in meta and "was-dir/inner" not in meta


def test_an_index_gives_its_linux_amd64_image_and_refuses_other_platforms(tmp_path: Path) -> None:
    layers = [[M("a", data=b"1")]]
    multi = write_layout(tmp_path / "multi", layers, platforms=("linux/arm64", "linux/amd64"))
    assert load_image(multi).layers
    arm = write_layout(tmp_path / "arm", layers, platforms=("linux/arm64", "linux/s390x"))
    with pytest.raises(InputError, match=r"no linux/amd64 image \(it has linux/arm64, linux/s390x\)"):
        load_image(arm)


def test_a_manifest_that_does_not_match_its_digest_is_refused(tmp_path: Path) -> None:
    layout = write_layout(tmp_path / "img", [[M("a", data=b"1")]])
    blob = manifest_blob(layout)
    blob.chmod(0o644)
    blob.write_bytes(blob.read_bytes().replace(b'"schemaVersion": 2', b'"schemaVersion":  2'))
    with pytest.raises(ChecksumError, match="does not match its digest"):
        load_image(layout)


def test_docker_save_tarballs_are_read_and_their_diff_ids_checked(tmp_path: Path) -> None:
    archive = write_docker_archive(
        tmp_path / "img.tar", [[M("a", data=b"1")], [M("b", data=b"2")]], image_config(Cmd=["/a"])
    )
    root, _ = unpack(tmp_path, archive)
    assert (root / "a").read_bytes() == b"1" and (root / "b").read_bytes() == b"2"
    assert load_image(archive).config.cmd == ("/a",)


def test_the_config_becomes_the_launcher_its_words_and_the_environment(tmp_path: Path) -> None:
    config = image_config(
        Entrypoint=["/usr/bin/python3", "-u"],
        Cmd=["/app/run.py", "--steps", "a b"],
        Env=["LANG=C.UTF-8"],
        WorkingDir="/app",
        User="runner",
    )
    passwd = b"root:x:0:0:root:/root:/bin/sh\nrunner:x:1001:1002::/home/runner:/bin/sh\n"
    layout = write_layout(tmp_path / "img", [[M("etc", "dir"), M("etc/passwd", data=passwd)]], config)
    image = load_image(layout)
    root, _ = unpack(tmp_path, layout)
    run_as = resolve_user(root, image.config.user)
    task = container_task(image.config, run_as)
    assert task.application == LAUNCHER
    assert task.command_line == "1001:1002 /app 2 /usr/bin/python3 -u 3 /app/run.py --steps 'a b'"
    assert task.exec_dir == "/container/app"
    assert task.setenv[0].startswith("PATH=") and "LANG=C.UTF-8" in task.setenv
    assert "HOME=/home/runner" in task.setenv
    assert resolve_user(root, "7:8") == type(run_as)(7, 8, "/")
    with pytest.raises(InputError, match="not in its /etc/passwd"):
        resolve_user(root, "nobody")
