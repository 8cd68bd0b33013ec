"""Run every benchmark and print its figures: ``python benchmarks/run.py [NAME ...]``."""

from __future__ import annotations

import importlib
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

BENCHES = (
    "bench_workunits",
    "bench_qemu",
    "bench_package_image",
    "bench_run_local",
    "bench_wrapper",
    "bench_oci",
    "bench_guest_api",
)


def main() -> None:
    """Import each benchmark module and call its main()."""
    chosen = sys.argv[1:] or list(BENCHES)
    for name in chosen:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name == name:
                print(f"== {name}: not present")
                continue
            raise
        t0 = time.perf_counter()
        module.main()
        print(f"   ({name} took {time.perf_counter() - t0:.1f} s)\n")


if __name__ == "__main__":
    main()
