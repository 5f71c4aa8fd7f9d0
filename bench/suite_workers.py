"""Every core busy, seen from the test suite: the whole suite one test at a time, then on every core.

Run: ``python bench/suite_workers.py [--workers auto] [--order serial,parallel]``

The suite alone keeps about one core busy: much of a test is waiting on something (the Prefect
server, a CLI run in a subprocess, a Dask cluster starting, a vLLM engine loading). This runs the
whole suite twice in one invocation, with the suite's own settings (``pyproject.toml``,
``tests/conftest.py``): once in one pytest process (``-n 0``, the baseline), once with
pytest-xdist's workers (``-n auto``: one per core, at most 4, whole files per worker, the longest
files first). For each: wall seconds, the machine's CPU utilisation over the run (from
``/proc/stat``: every process, the suite's servers and subprocesses included; 100% = all cores
busy), its load average at the end, and the tests passed. Then serial / parallel (above 1: the
workers are faster). Both runs must pass every test. Run it on an otherwise idle machine: the
utilisation is the machine's.

The parallel run orders files by their seconds in the serial run before it (pytest's cache, kept
in a temporary folder here, so the repository's own ``.pytest_cache`` is left alone): pass
``--order parallel,serial`` to measure a fresh clone's order (by the files' ``slow`` tests).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def cpu_ticks() -> tuple[int, int]:
    """(busy, total) jiffies of all cores since boot."""
    fields = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    idle = fields[3] + fields[4]  # idle + iowait
    return sum(fields) - idle, sum(fields)


def run_suite(workers: str, cache_dir: Path) -> dict:
    busy0, total0 = cpu_ticks()
    started = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-n", workers, "-o", f"cache_dir={cache_dir}"],
                          cwd=REPO, capture_output=True, text=True)
    wall = time.perf_counter() - started
    busy1, total1 = cpu_ticks()
    summary = proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else ""
    if proc.returncode != 0:
        raise SystemExit(f"the suite failed with -n {workers}:\n{proc.stdout[-4000:]}\n{proc.stderr[-2000:]}")
    passed = re.search(r"(\d+) passed", summary)
    return {"workers": workers, "wall_s": round(wall, 1),
            "cpu_busy_pct": round(100 * (busy1 - busy0) / (total1 - total0), 1),
            "load_average_at_end": round(os.getloadavg()[0], 2),
            "passed": int(passed.group(1)) if passed else None, "summary": summary}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", default="auto", help="the parallel run's -n (default auto: one per core, at most 4)")
    parser.add_argument("--order", default="serial,parallel", help="which run goes first: serial,parallel or parallel,serial")
    args = parser.parse_args()
    print(f"{len(os.sched_getaffinity(0))} cores, load average {os.getloadavg()[0]:.2f} at the start", flush=True)
    results = {}
    with tempfile.TemporaryDirectory(prefix="thresher-suite-workers-") as tmp:
        for which in [part.strip() for part in args.order.split(",")]:
            results[which] = run_suite("0" if which == "serial" else args.workers, Path(tmp) / "pytest-cache")
            print(json.dumps({which: results[which]}), flush=True)
    serial, parallel = results["serial"], results["parallel"]
    print(json.dumps({"serial_wall_s": serial["wall_s"], "parallel_wall_s": parallel["wall_s"],
                      "speedup_serial_over_parallel": round(serial["wall_s"] / parallel["wall_s"], 2),
                      "cpu_busy_pct": {"serial": serial["cpu_busy_pct"], "parallel": parallel["cpu_busy_pct"]}}))


if __name__ == "__main__":
    main()
