"""make-workunit --batch: workunits per second and peak RSS, for 1,000 and 10,000 workunits.

Each workunit has a small unique input and shares one 10 MB input. The batch runs in a
child process so its peak RSS is its own (ru_maxrss of the child).
"""

from __future__ import annotations

import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

GOAL_WU_PER_S = 5000


def _prepare(root: Path, n: int) -> Path:
    shared = root / "shared.bin"
    if not shared.exists():
        shared.write_bytes(bytes(range(256)) * (10 * 1024 * 1024 // 256))
    params = root / "params"
    params.mkdir(exist_ok=True)
    rows = root / f"rows{n}.jsonl"
    with rows.open("w") as f:
        for i in range(n):
            p = params / f"p{i}.txt"
            if not p.exists():
                p.write_text(f"seed={i}\n")
            f.write(json.dumps({"seed": i, "param": str(p)}) + "\n")
    return rows


def _run(root: Path, rows: Path, n: int) -> tuple[float, float]:
    out = root / f"out{n}"
    cmd = [
        sys.executable,
        "-m",
        "boincvm",
        "-q",
        "make-workunit",
        "--app",
        "sim",
        "--application",
        "/opt/sim/bin/sim",
        "--command-line",
        "--seed {{ seed }}",
        "--input",
        f"shared={root / 'shared.bin'}",
        "--input",
        "param={{ param }}",
        "--output",
        "out:1000000",
        "--name",
        "sim_{{ seed }}",
        "--batch",
        str(rows),
        "-o",
        str(out),
        "--force",
    ]
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    elapsed = time.perf_counter() - t0
    rss_mb = max(before, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss) / 1024
    return elapsed, rss_mb


def main() -> None:
    """Print workunits/s and peak RSS for two batch sizes."""
    print("== make-workunit --batch (small unique input + shared 10 MB input per workunit)")
    with tempfile.TemporaryDirectory() as d:
        root = Path(d)
        results = {}
        for n in (1000, 10000):
            rows = _prepare(root, n)
            elapsed, rss = _run(root, rows, n)
            results[n] = (elapsed, rss)
            print(
                f"  {n:>6} workunits: {elapsed:6.2f} s (incl. interpreter start)  "
                f"{n / elapsed:8.0f} wu/s   peak RSS {rss:6.1f} MiB"
            )
        e1, r1 = results[1000]
        e2, r2 = results[10000]
        marginal = 9000 / max(e2 - e1, 1e-9)
        print(
            f"  marginal rate (10k - 1k): {marginal:8.0f} wu/s   goal >= {GOAL_WU_PER_S} wu/s "
            f"-> {'met' if marginal >= GOAL_WU_PER_S else 'NOT met'}"
        )
        print(f"  peak RSS ratio 10k/1k: {r2 / r1:.2f} (1.00 = does not grow with the batch)")


if __name__ == "__main__":
    main()
