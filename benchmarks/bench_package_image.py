"""package-image of a 2 GiB sparse raw image versus `qemu-img convert -c` + `md5sum` on the same
file; then the example app version's bytes as a volunteer's client downloads them."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def _sparse_image(path: Path) -> None:
    subprocess.run(["qemu-img", "create", "-f", "raw", str(path), "2G"], check=True, capture_output=True)
    # 64 MiB of data spread over the disk: a filesystem-like mix of text and random blocks.
    with path.open("r+b") as f:
        for i in range(64):
            f.seek(i * 32 * 1024 * 1024)
            f.write(os.urandom(512 * 1024) + (b"boincvm benchmark line\n" * 22800)[: 512 * 1024])


def main() -> None:
    """Print seconds and output bytes for both ways, and their ratio."""
    print("== package-image of a 2 GiB sparse raw image (64 MiB of data)")
    with tempfile.TemporaryDirectory() as d:
        root = Path(d)
        img = root / "base.img"
        _sparse_image(img)
        t0 = time.perf_counter()
        subprocess.run(
            ["qemu-img", "convert", "-c", "-O", "qcow2", str(img), str(root / "ref.qcow2")], check=True
        )
        subprocess.run(["md5sum", str(root / "ref.qcow2")], check=True, capture_output=True)
        t_ref = time.perf_counter() - t0
        ref_size = (root / "ref.qcow2").stat().st_size
        t0 = time.perf_counter()
        subprocess.run(
            [
                sys.executable,
                "-m",
                "boincvm",
                "-q",
                "package-image",
                str(img),
                "--app",
                "bench",
                "-o",
                str(root / "av"),
            ],
            check=True,
            stdout=subprocess.DEVNULL,
        )
        t_ours = time.perf_counter() - t0
        ours = next((root / "av").glob("*vm_disk.qcow2")).stat().st_size
        print(f"  qemu-img convert -c + md5sum: {t_ref:6.2f} s  {ref_size / 1e6:8.1f} MB")
        print(f"  boincvm package-image:        {t_ours:6.2f} s  {ours / 1e6:8.1f} MB (+ wrapper, startup)")
        print(f"  time ratio ours/reference: {t_ours / t_ref:.2f}   size ratio: {ours / ref_size:.2f}")
    download_size()


def download_size() -> None:
    """The example app version (the bundled minimal guest) as the client downloads it: each
    file's bytes, gzip-compressed where version.xml says <gzip/> (update_versions then serves
    NAME.gz and the client inflates it; compressed here at gzip's default level, as BOINC's
    server does)."""
    import gzip

    from boincvm.appversion.build import package_image
    from boincvm.appversion.model import AppVersionRequest, parse_version_xml
    from boincvm.image.guest import build_guest_image

    print("== the example app version as the client downloads it (minimal guest, frozen wrapper)")
    with tempfile.TemporaryDirectory() as d:
        av = Path(d) / "av"
        package_image(
            AppVersionRequest(
                image=build_guest_image("minimal"), app_name="hello", output_dir=av, version="1.00"
            )
        )
        vx, _ = parse_version_xml((av / "version.xml").read_bytes())
        total = raw_total = 0
        for f in vx.files:
            data = (av / f.physical_name).read_bytes()
            sent = len(gzip.compress(data, 6)) if f.gzip else len(data)
            total, raw_total = total + sent, raw_total + len(data)
            what = f.logical_name or "main program"
            how = " (gzip)" if f.gzip else ""
            print(f"  {what:24} {len(data) / 1e6:8.2f} MB  downloaded {sent / 1e6:8.2f} MB{how}")
        print(f"  total                    {raw_total / 1e6:8.2f} MB  downloaded {total / 1e6:8.2f} MB")


if __name__ == "__main__":
    main()
    download_size()
