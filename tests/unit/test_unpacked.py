"""Runtime archives unpacked once: the xz streams decoded in parallel, one-stream archives, and
damaged or truncated archives refused with a clear error, nothing left in place."""

from __future__ import annotations

import dataclasses
import lzma
import os
from pathlib import Path

import pytest

from boincvm import unpacked
from boincvm.appversion import runtime as av_runtime
from boincvm.unpacked import MANIFEST, ArchiveError, Kind, unpack_once, xz_streams

KIND = Kind(
    label="the test runtime", prefix="test-runtime-", format=1, required=frozenset({"bin/a"}), parallel=True
)


def _members(root: Path) -> list[tuple[str, Path, int]]:
    """Files of some hundred KiB each, half of them random (xz cannot shrink those)."""
    out = []
    for i in range(6):
        f = root / f"f{i}"
        f.write_bytes(os.urandom(150_000) if i % 2 else bytes([i]) * 200_000)
        out.append((f"data/f{i}", f, 0o644))
    (root / "a").write_bytes(b"#!/bin/sh\n")
    return [*out, ("bin/a", root / "a", 0o755)]


@pytest.fixture
def archive(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setattr(av_runtime, "XZ_CHUNK", 256 << 10)
    src = tmp_path / "src"
    src.mkdir()
    return av_runtime.write_archive(_members(src), {"format": 1}, tmp_path / "rt.tar.xz", preset=0)


def _unpacked_files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def test_streams_are_found_and_decoded_in_parallel(archive: Path, tmp_path: Path) -> None:
    data = archive.read_bytes()
    streams = xz_streams(data)
    assert streams is not None and len(streams) >= 4
    assert streams[0][0] == 0 and streams[-1][1] == len(data)
    assert all(a[1] == b[0] for a, b in zip(streams[:-1], streams[1:], strict=True))
    plain = lzma.decompress(data)
    assert sum(u for _, _, u in streams) == len(plain)
    out = tmp_path / "out"
    out.mkdir()
    root, manifest = unpack_once(archive, KIND, out)
    assert manifest["format"] == 1
    files = _unpacked_files(root)
    src = tmp_path / "src"
    for i in range(6):
        assert files[f"data/f{i}"] == (src / f"f{i}").read_bytes()
    assert MANIFEST in files and (root / "bin/a").stat().st_mode & 0o111


def test_one_stream_archive_unpacks_the_same(archive: Path, tmp_path: Path) -> None:
    single = tmp_path / "single.tar.xz"
    single.write_bytes(lzma.compress(lzma.decompress(archive.read_bytes())))
    assert xz_streams(single.read_bytes()) == [
        (0, single.stat().st_size, len(lzma.decompress(single.read_bytes())))
    ]
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    root_multi, _ = unpack_once(archive, KIND, a)
    root_single, _ = unpack_once(single, KIND, b)
    assert _unpacked_files(root_multi) == _unpacked_files(root_single)


@pytest.mark.parametrize("how", ["one CPU", "not a parallel kind"])
def test_streams_decoded_one_after_another(
    archive: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, how: str
) -> None:
    kind = KIND
    if how == "one CPU":
        monkeypatch.setattr(os, "cpu_count", lambda: 1)
    else:
        kind = dataclasses.replace(KIND, parallel=False)
    root, _ = unpack_once(archive, kind, tmp_path)
    assert (root / "bin/a").is_file() and len(_unpacked_files(root)) == 8


@pytest.mark.parametrize(
    "damage", ["truncated", "stream dropped", "bytes flipped", "footer garbled", "not xz"]
)
def test_damaged_archive_is_a_clear_error_and_leaves_nothing(
    archive: Path, tmp_path: Path, damage: str
) -> None:
    data = bytearray(archive.read_bytes())
    streams = xz_streams(bytes(data))
    assert streams is not None
    if damage == "truncated":
        data = data[: len(data) - 1000]
    elif damage == "stream dropped":
        start, end, _ = streams[1]
        del data[start:end]
    elif damage == "bytes flipped":
        start, end, _ = streams[2]
        for i in range(start + 100, start + 140):
            data[i] ^= 0xFF
    elif damage == "footer garbled":
        data[-1] ^= 0xFF
    else:
        data = bytearray(b"not an archive" * 100)
    bad = tmp_path / "bad.tar.xz"
    bad.write_bytes(bytes(data))
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(ArchiveError) as exc:
        unpack_once(bad, KIND, out)
    message = str(exc.value)
    assert "\n" not in message and message.startswith("the test runtime")
    assert "reinstall" in exc.value.hint
    assert [p.name for p in out.iterdir()] == [f".{KIND.directory_name(bad)}.lock"]


def test_archive_problem_reads_multi_stream_archives(archive: Path) -> None:
    assert unpacked.archive_problem(archive, KIND) is None


def test_a_stream_is_decoded_to_no_more_than_its_index_says() -> None:
    raw = os.urandom(1000) + bytes(1 << 20)
    packed = lzma.compress(raw)
    assert unpacked._decode_stream(packed, len(raw)) == raw
    for size in (len(raw) - 1, len(raw) + 1, 10):
        with pytest.raises(lzma.LZMAError, match="does not match its index"):
            unpacked._decode_stream(packed, size)
