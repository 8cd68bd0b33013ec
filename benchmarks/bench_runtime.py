"""The bundled QEMU runtime: app version size with and without it (MB as downloaded), the
first start's unpack and a second start's cost, and packing the archive (xz)."""

from __future__ import annotations

import gzip
import shutil
import statistics
import tempfile
import time
from pathlib import Path

from boincvm.appversion.build import package_image
from boincvm.appversion.model import AppVersionRequest, RuntimeKind, parse_version_xml
from boincvm.appversion.runtime import cached_runtime_archive, collect_runtime, write_runtime_archive
from boincvm.hypervisor.qemu.runtime import unpack_once
from boincvm.image.guest import build_guest_image

REPEATS = 5


def _downloaded_mb(av: Path) -> float:
    """Bytes the client downloads: <gzip/> files as gzip -6 sends them, the others as they are."""
    vx, _ = parse_version_xml((av / "version.xml").read_bytes())
    total = 0
    for f in vx.files:
        data = (av / f.physical_name).read_bytes()
        total += len(gzip.compress(data, 6)) if f.gzip else len(data)
    return total / 1e6


def _span(xs: list[float], unit: str, scale: float = 1.0) -> str:
    lo, med, hi = (x * scale for x in (min(xs), statistics.median(xs), max(xs)))
    return f"{lo:.2f} / {med:.2f} / {hi:.2f} {unit} (min / median / max of {len(xs)}, TCG host)"


def main() -> None:
    """Print the figures."""
    print("== bundled QEMU runtime")
    guest = build_guest_image("minimal")
    with tempfile.TemporaryDirectory() as d:
        root = Path(d)
        sizes = {}
        for kind in (RuntimeKind.SYSTEM, RuntimeKind.BUNDLED):
            out = root / kind.value
            package_image(
                AppVersionRequest(image=guest, app_name="b", output_dir=out, version="1.00", runtime=kind)
            )
            sizes[kind] = _downloaded_mb(out)
        system, bundled = sizes[RuntimeKind.SYSTEM], sizes[RuntimeKind.BUNDLED]
        print(f"  app version as downloaded: {system:.1f} MB with --runtime system, {bundled:.1f} MB bundled")
        archive = cached_runtime_archive()
        firsts, seconds = [], []
        for i in range(REPEATS):
            parent = root / f"unpack{i}"
            parent.mkdir()
            t0 = time.perf_counter()
            rt = unpack_once(archive, parent)
            firsts.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            unpack_once(archive, parent)
            seconds.append(time.perf_counter() - t0)
            unpacked = sum(p.stat().st_size for p in rt.root.rglob("*") if p.is_file())
            shutil.rmtree(parent)
        print(f"  archive {archive.stat().st_size / 1e6:.1f} MB ({unpacked / 1e6:.0f} MB unpacked)")
        print(f"  first start's unpack: {_span(firsts, 's')}; a second start: {_span(seconds, 'ms', 1000)}")
        t0 = time.perf_counter()
        write_runtime_archive(collect_runtime(), root / "again.tar.xz")
        took = time.perf_counter() - t0
        print(f"  packing the archive (xz -6, 8 MiB streams, once per QEMU version): {took:.1f} s")


if __name__ == "__main__":
    main()
