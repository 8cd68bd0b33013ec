"""Hostile container images: writes outside the root (devices too), bad whiteouts, tampered blobs, bombs.

Each image is a layout written by code (tests/oci_images.py) into the sandbox's work
directory and handed to ``build-image --from-oci``; the refusal must be one sentence with
a hint, exit 3, and leave the sandbox exactly as it was (no output directory, no half-built
work directory, no byte written through a link to the canary).
"""

from __future__ import annotations

import gzip
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.hostile.harness import Sandbox
from tests.oci_images import M, manifest_blob, write_layout

Build = Callable[[Sandbox], list[list[M]]]


def _escape_through_link(sb: Sandbox) -> list[list[M]]:
    return [[M("evil", "symlink", link=str(sb.canary))], [M("evil/secret", data=b"overwritten")]]


def _relative_escape_through_link(sb: Sandbox) -> list[list[M]]:
    return [[M("up", "symlink", link="../../canary"), M("up/new", data=b"x")]]


CASES: dict[str, tuple[Build, str]] = {
    "dotdot": (lambda sb: [[M("../escaped", data=b"x")]], r"leaves the root"),
    "dotdot-deep": (lambda sb: [[M("a/../../escaped", data=b"x")]], r"leaves the root"),
    "absolute": (lambda sb: [[M("/etc/evil", data=b"x")]], r"absolute name"),
    "absolute-symlink-then-write": (_escape_through_link, r"outside the root"),
    "relative-symlink-then-write": (_relative_escape_through_link, r"outside the root"),
    "hardlink-out": (lambda sb: [[M("h", "hardlink", link="../canary/secret")]], r"outside the destination"),
    # Device nodes and FIFOs are dropped with a note (tests/unit/test_oci_special_files.py),
    # but their names are checked first, as any member's.
    "device-node-dotdot": (lambda sb: [[M("../mem", "chardev")]], r"leaves the root"),
    "fifo-absolute": (lambda sb: [[M("/p", "fifo")]], r"absolute name"),
    "whiteout-dotdot": (lambda sb: [[M("a", "dir")], [M("a/.wh...")]], r"whiteout of '\.\.'"),
    "control-chars": (lambda sb: [[M("a\nb", data=b"x")]], r"control characters"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_hostile_layer_is_refused_and_nothing_written(sandbox: Sandbox, case: str) -> None:
    build, sentence = CASES[case]
    write_layout(sandbox.work / "img", build(sandbox))
    outcome = sandbox.run(["build-image", "--from-oci", "img", "--output", "out"])
    sandbox.assert_refused(outcome, 3, sentence)


def test_tampered_manifest_is_refused(sandbox: Sandbox) -> None:
    layout = write_layout(sandbox.work / "img", [[M("a", data=b"1")]])
    blob = manifest_blob(layout)
    blob.write_bytes(blob.read_bytes().replace(b'"size": ', b'"size":  ', 1))
    outcome = sandbox.run(["build-image", "--from-oci", "img", "--output", "out"])
    sandbox.assert_refused(outcome, 3, r"does not match its digest")


def test_tampered_layer_is_refused(sandbox: Sandbox) -> None:
    layout = write_layout(sandbox.work / "img", [[M("a", data=b"ORIGINAL")]])
    layer = next(p for p in (layout / "blobs/sha256").iterdir() if p.read_bytes()[:2] == b"\x1f\x8b")
    layer.write_bytes(
        gzip.compress(gzip.decompress(layer.read_bytes()).replace(b"ORIGINAL", b"TAMPERED"), mtime=0)
    )
    outcome = sandbox.run(["build-image", "--from-oci", "img", "--output", "out"])
    sandbox.assert_refused(outcome, 3, r"does not match its digest")


def test_layer_bomb_beyond_the_bound_is_refused(sandbox: Sandbox) -> None:
    # 64 MiB of zeros: a few dozen KiB compressed, refused from its header before a byte is written.
    write_layout(sandbox.work / "img", [[M("zeros", data=bytes(64 << 20))]])
    outcome = sandbox.run(["build-image", "--from-oci", "img", "--output", "out", "--max-root-size", "16M"])
    sandbox.assert_refused(outcome, 3, r"unpack to more than 16777216 bytes")


def test_not_an_image_is_refused(sandbox: Sandbox) -> None:
    (sandbox.work / "img").mkdir()
    (sandbox.work / "img" / "README").write_text("hello")
    outcome = sandbox.run(["build-image", "--from-oci", "img", "--output", "out"])
    sandbox.assert_refused(outcome, 3, r"neither an OCI image layout nor a docker save tarball")


def test_canary_is_untouched(sandbox: Sandbox) -> None:
    write_layout(sandbox.work / "img", _escape_through_link(sandbox))
    sandbox.run(["build-image", "--from-oci", "img", "--output", "out"])
    assert Path(sandbox.secret).read_bytes().startswith(b"CANARY")
