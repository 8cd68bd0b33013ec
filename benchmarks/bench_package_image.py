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


if __name__ == "__main__":
    main()
