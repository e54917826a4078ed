"""The newcomer's first command, timed: `saebench run toy` from a cold start.

Each repeat starts a fresh process in a new empty directory (so nothing of a previous run is
reused: import, collection, the engine, the report and its plots are all included), exactly
as the README's main command runs it, and records its wall-clock time and exit status. The
target (issue 20) is at most 120 s on 2 CPU cores; the full regression suite, `toy-full`,
can be timed the same way for comparison.

    python benchmarks/quick_suite.py --repeats 3              # the quick suite
    python benchmarks/quick_suite.py --suite toy-full --repeats 1
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TARGET_S = 120.0


def run_once(suite: str, threads: int | None) -> tuple[float, int, str]:
    """(seconds, exit status, pytest's last line) of one `saebench run SUITE` in a new
    empty directory."""
    env = dict(os.environ)
    if threads is not None:
        env["OMP_NUM_THREADS"] = str(threads)
    workdir = Path(tempfile.mkdtemp(prefix="saebench-quick-"))
    try:
        started = time.perf_counter()
        done = subprocess.run([shutil.which("saebench") or "saebench", "run", suite, "-q",
                               "-p", "no:cacheprovider"], cwd=workdir, env=env,
                              capture_output=True, text=True, check=False)
        seconds = time.perf_counter() - started
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    last = next((line for line in reversed(done.stdout.splitlines()) if line.strip()), "")
    return seconds, done.returncode, last


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--suite", default="toy", help="packaged suite (default toy)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None,
                        help="OMP_NUM_THREADS for the runs (default: torch's own choice)")
    args = parser.parse_args()
    times = []
    for i in range(args.repeats):
        seconds, status, last = run_once(args.suite, args.threads)
        times.append(seconds)
        print(f"run {i + 1}: {seconds:6.1f} s, exit {status}: {last}", flush=True)
        if status != 0:
            print(f"saebench run {args.suite} exited {status}", file=sys.stderr)
            return 1
    print(f"saebench run {args.suite}: min {min(times):.1f} s, median "
          f"{statistics.median(times):.1f} s, max {max(times):.1f} s over {len(times)} "
          f"cold runs on {os.cpu_count()} CPU(s); target <= {TARGET_S:.0f} s: "
          f"{'met' if max(times) <= TARGET_S else 'NOT met'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
