"""Run the benchmarks and print their figures.

``python benchmarks/run.py [--quick] [--only peers,host_full,checkpoint_scaling] [NAME ...]``:
names may drop the ``bench_`` prefix; ``--quick`` asks the benchmarks that take it for
fewer repetitions and shorter jobs.
"""

from __future__ import annotations

import argparse
import importlib
import inspect
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
    "bench_peers",
    "bench_hello",
    "bench_host_full",
    "bench_checkpoint_scaling",
    "bench_runtime",
    "bench_first_task",
    "bench_bare_host",
    "bench_guest_api",
    "bench_server",
    "bench_download",
)


def main() -> None:
    """Import each chosen benchmark module and call its main()."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("names", nargs="*", help="benchmarks to run (default: all)")
    ap.add_argument("--only", default="", help="comma-separated benchmarks to run")
    ap.add_argument("--quick", action="store_true", help="fewer repetitions, shorter jobs")
    args = ap.parse_args()
    chosen = [*args.names, *(n for n in args.only.split(",") if n)] or list(BENCHES)
    for raw in chosen:
        name = raw if raw.startswith("bench_") else f"bench_{raw}"
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name == name:
                print(f"== {name}: not present")
                continue
            raise
        t0 = time.perf_counter()
        if "quick" in inspect.signature(module.main).parameters:
            module.main(quick=args.quick)
        else:
            module.main()
        print(f"   ({name} took {time.perf_counter() - t0:.1f} s)\n")


if __name__ == "__main__":
    main()
