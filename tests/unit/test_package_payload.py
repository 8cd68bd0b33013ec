"""RPMs whose header and payload disagree, forged headers, and bombs: refused without a traceback.

busybox rpm installs what the payload holds and picks the decompressor by magic bytes, so
these packages are made by rewriting a well-built RPM's bytes the way an attacker would.
"""

from __future__ import annotations

import gzip
import io
import lzma
import struct
import tarfile
from pathlib import Path

import pytest

from boincvm.errors import PackageError
from boincvm.findings import Finding, has_errors
from boincvm.package import PackageFormat, PackageRequest, build_package, check_package, inspect_package
from boincvm.package.payload import Compression, read_payload

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
_TAG_SIZE = 1009
_TAG_FILESIZES = 1028
_TAG_FILEMODES = 1030


@pytest.fixture(scope="module")
def hello_rpm(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("rpm")
    return build_package(
        PackageRequest(EXAMPLES / "hello/program", "hello", "1.0", entry_point="bin/hello"), out
    ).path


def _header_span(data: bytes, start: int) -> tuple[int, int, int]:
    """(index start, store start, end) of the RPM header structure at ``start``."""
    assert data[start : start + 3] == b"\x8e\xad\xe8"
    nindex, hsize = struct.unpack_from("!ii", data, start + 8)
    index = start + 16
    store = index + 16 * nindex
    return index, store, store + hsize


def _main_header(data: bytes) -> tuple[int, int, int]:
    _, _, sig_end = _header_span(data, 96)
    return _header_span(data, sig_end + (-sig_end % 8))


def _patch_tag(data: bytes, tag: int, value: int | None = None, *, new_type: int | None = None) -> bytes:
    """Overwrite every int32 value of ``tag`` with ``value``, or change its declared type."""
    out = bytearray(data)
    index, store, end = _main_header(data)
    for pos in range(index, store, 16):
        t, ty, off, count = struct.unpack_from("!iiii", data, pos)
        if t != tag:
            continue
        if new_type is not None:
            struct.pack_into("!i", out, pos + 4, new_type)
        if value is not None:
            for i in range(count):
                struct.pack_into("!I", out, store + off + 4 * i, value)
        return bytes(out)
    raise AssertionError(f"tag {tag} not found")


def _newc(members: list[tuple[str, int, bytes]]) -> bytes:
    """A newc cpio archive of (name, mode, data) members."""
    out = io.BytesIO()

    def put(name: str, mode: int, data: bytes, ino: int) -> None:
        raw = name.encode() + b"\0"
        fields = [ino, mode, 0, 0, 1, 0, len(data), 0, 0, 0, 0, len(raw), 0]
        out.write(b"070701" + b"".join(b"%08X" % f for f in fields) + raw)
        out.write(b"\0" * (-(110 + len(raw)) % 4) + data + b"\0" * (-len(data) % 4))

    for i, (name, mode, data) in enumerate(members, 1):
        put(name, mode, data, i)
    put("TRAILER!!!", 0, b"", 0)
    return out.getvalue()


def _replace_payload(data: bytes, payload: bytes) -> bytes:
    _, _, end = _main_header(data)
    return data[:end] + payload


def _errors(findings: list[Finding]) -> str:
    assert has_errors(findings), findings
    return " | ".join(f.message for f in findings)


def test_the_payload_of_a_built_rpm_matches_its_header(hello_rpm: Path) -> None:
    info = inspect_package(hello_rpm)
    assert info.payload == "gzip" and info.declared_payload == "gzip"
    assert info.payload_entries is not None
    assert {e.path for e in info.payload_entries} == {e.path for e in info.entries}
    assert info.installed_size == info.declared_size
    assert info.complete


def test_payload_with_files_the_header_does_not_list(hello_rpm: Path, tmp_path: Path) -> None:
    evil = _newc([("./opt/hello/bin/hello", 0o100755, b"#!/bin/sh\n"), ("./etc/cron.d/evil", 0o100644, b"x")])
    forged = tmp_path / "forged.rpm"
    forged.write_bytes(_replace_payload(hello_rpm.read_bytes(), gzip.compress(evil, mtime=0)))
    text = _errors(check_package(forged))
    assert "header does not list" in text
    assert "outside the allowed prefixes" in text


def test_payload_traversal_and_device_and_setuid(hello_rpm: Path, tmp_path: Path) -> None:
    evil = _newc(
        [
            ("./opt/hello/../../etc/passwd", 0o100644, b"x"),
            ("./opt/hello/sda", 0o060600, b""),
            ("./opt/hello/su", 0o104755, b"x"),
            ("/etc/shadow", 0o100600, b"x"),
        ]
    )
    forged = tmp_path / "forged.rpm"
    forged.write_bytes(_replace_payload(hello_rpm.read_bytes(), gzip.compress(evil, mtime=0)))
    text = _errors(check_package(forged))
    for expected in ("leaves its directory", "device", "setuid", "absolute"):
        assert expected in text


def test_payload_compression_goes_by_magic_not_header(hello_rpm: Path, tmp_path: Path) -> None:
    # The header still says gzip; busybox looks at the bytes, and so do we.
    cpio = _newc([("./opt/hello/bin/hello", 0o100755, b"#!/bin/sh\n")])
    lz = tmp_path / "lzma.rpm"
    lz.write_bytes(_replace_payload(hello_rpm.read_bytes(), lzma.compress(cpio, format=lzma.FORMAT_ALONE)))
    findings = check_package(lz)
    assert any("lzma payload" in f.message and f.hint and "w9.gzdio" in f.hint for f in findings), findings
    zst = tmp_path / "zstd.rpm"
    zst.write_bytes(_replace_payload(hello_rpm.read_bytes(), b"\x28\xb5\x2f\xfd" + b"\0" * 64))
    assert any("zstd payload" in f.message for f in check_package(zst))
    xz = tmp_path / "xz.rpm"
    xz.write_bytes(_replace_payload(hello_rpm.read_bytes(), lzma.compress(cpio)))
    assert inspect_package(xz).payload == "xz"


def test_huge_declared_size_is_refused(hello_rpm: Path, tmp_path: Path) -> None:
    data = _patch_tag(hello_rpm.read_bytes(), _TAG_FILESIZES, 0xFFFFFFF0)
    data = _patch_tag(data, _TAG_SIZE, 0xFFFFFFF0)
    huge = tmp_path / "huge.rpm"
    huge.write_bytes(data)
    # Two files of almost 4 GiB each: more than the default 4 GiB limit.
    assert "declares" in _errors(check_package(huge))


def test_forged_header_types_give_a_sentence_not_a_traceback(hello_rpm: Path, tmp_path: Path) -> None:
    forged = tmp_path / "types.rpm"
    forged.write_bytes(_patch_tag(hello_rpm.read_bytes(), _TAG_FILEMODES, new_type=5))  # int64: unreadable
    findings = check_package(forged)
    assert len(findings) == 1 and "forged header" in findings[0].message
    with pytest.raises(PackageError, match="forged header"):
        inspect_package(forged)


@pytest.mark.parametrize("cut", [100, 2000, -40, -1])
def test_truncated_rpms_are_refused_with_one_sentence(hello_rpm: Path, tmp_path: Path, cut: int) -> None:
    data = hello_rpm.read_bytes()
    short = tmp_path / "short.rpm"
    short.write_bytes(data[:cut])
    findings = check_package(short)
    assert has_errors(findings)
    assert all("Traceback" not in f.message and "\n" not in f.message for f in findings)


def test_corrupt_gzip_payload(hello_rpm: Path, tmp_path: Path) -> None:
    bad = tmp_path / "bad.rpm"
    bad.write_bytes(_replace_payload(hello_rpm.read_bytes(), b"\x1f\x8b\x08\x00" + b"\xff" * 200))
    assert "cannot be decompressed" in _errors(check_package(bad))


def test_payload_bomb_stops_at_the_limit() -> None:
    # 64 MiB of zeros in one member compresses to some 64 KiB; reading stops at the limit.
    cpio = _newc([("./opt/x/zeros", 0o100644, b"\0" * (64 << 20))])
    payload = read_payload(io.BytesIO(gzip.compress(cpio, compresslevel=1)), max_bytes=1 << 20)
    assert payload.compression is Compression.GZIP and not payload.complete


def test_tarball_bomb_and_member_limits(tmp_path: Path) -> None:
    path = tmp_path / "bomb.tar.gz"
    with tarfile.open(path, "w:gz") as tar:
        m = tarfile.TarInfo("opt/x/zeros")
        m.size = 8 << 20
        tar.addfile(m, io.BytesIO(b"\0" * m.size))
    assert "more than the limit" in _errors(check_package(path, max_installed=1 << 20))


def test_tarball_must_be_gzip_for_the_guest(tmp_path: Path) -> None:
    path = tmp_path / "plain.tar"
    with tarfile.open(path, "w") as tar:
        m = tarfile.TarInfo("opt/x/f")
        m.size = 1
        tar.addfile(m, io.BytesIO(b"x"))
    assert "tar -xzf" in _errors(check_package(path))


def test_tarball_symlink_used_as_directory(tmp_path: Path) -> None:
    path = tmp_path / "through.tar.gz"
    with tarfile.open(path, "w:gz") as tar:
        link = tarfile.TarInfo("opt/x/lib")
        link.type, link.linkname = tarfile.SYMTYPE, "/opt/y"
        tar.addfile(link)
        m = tarfile.TarInfo("opt/x/lib/f")
        m.size = 1
        tar.addfile(m, io.BytesIO(b"x"))
    assert "goes through the package's own symlink" in _errors(check_package(path))


def test_built_tarball_passes(tmp_path: Path) -> None:
    built = build_package(
        PackageRequest(
            EXAMPLES / "hello/program", "hello", "1.0", entry_point="bin/hello", format=PackageFormat.TAR
        ),
        tmp_path,
    )
    findings = check_package(built.path)
    assert not has_errors(findings), findings
    assert inspect_package(built.path).payload == "gzip"
