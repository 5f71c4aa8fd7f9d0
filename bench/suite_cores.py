"""Every core busy, seen from the test suite: flow tests with model stages, ``fill_cores`` off then on.

Run: ``python bench/suite_cores.py [--repeat 1] [--order off,on]``

Issue 19 asks that the test suite get faster for ``execution.fill_cores``. This runs a fixed
selection of the suite's flow tests that run model stages on a local Dask cluster, in one
invocation, as two pytest sessions (each with the suite's own conftest: its Prefect server, its
environment; one pytest process, ``-n 0``: ``bench/suite_workers.py`` measures the workers),
once with ``THRESHER_FILL_CORES=0`` (the ``ExecutionConfig`` default turned off:
shards planned by ``shard_rows`` alone, every task at the worker's ``cores / workers`` threads)
and once with it on (the default). The tests set no ``fill_cores`` of their own, so the
environment decides for every run they make, in-process and through the CLI alike.

Printed per session: wall seconds of the pytest process, the sum of the selected tests' own
times (setup + call + teardown, from pytest's JUnit XML: the session's start-up left out),
each test's time; then off / on for both (above 1: ``fill_cores`` is faster). Every test must
pass in both sessions: results do not depend on ``fill_cores``.

What decides the outcome is printed too: each selected flow's ``execution.workers``. With one
local worker, ``fill_cores`` plans at least one shard per worker thread (one) and gives a lone
task ``cores / tasks`` threads, which is the worker's own ``cores / workers`` already: it can
change nothing there.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

#: flow tests that run model stages on a local Dask cluster (GRAPE, deita, CLEAR, Magpie + KD, the demo),
#: each with the local workers its flows run on (as written in the test)
SELECTION = {
    "tests/test_grape.py::test_one_row_per_instruction_each_the_argmax": "1 (its module's GRAPE flow run)",
    "tests/test_grape.py::test_example_config_runs_on_other_candidate_sets": "1",
    "tests/test_deita.py::test_deita_pipeline_writes_the_budgeted_selection_with_attributes_and_report": "1",
    "tests/test_clear.py::test_auto_filter_on_nullmodel_mix_through_the_flow": "1",
    "tests/test_magpie_flow.py::test_magpie_killed_during_generation_resumes_and_equals_a_clean_run":
        "1 (the CLI run), then a cluster given by address: 2, then 1",
    "tests/test_flow.py::test_demo_config_runs_from_the_cli_on_other_inputs": "1",
}


def session(fill: bool, xml: Path) -> dict:
    env = {**os.environ, "THRESHER_FILL_CORES": "1" if fill else "0"}
    started = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "pytest", *SELECTION, "-q", "-p", "no:cacheprovider", "-n", "0",
                           f"--junitxml={xml}"], cwd=REPO, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - started
    if proc.returncode != 0:
        raise SystemExit(f"the selection failed with fill_cores={fill}:\n{proc.stdout[-4000:]}\n{proc.stderr[-2000:]}")
    per_test: dict[str, float] = {}
    for case in ET.parse(xml).getroot().iter("testcase"):
        per_test[case.get("name")] = per_test.get(case.get("name"), 0.0) + float(case.get("time"))
    return {"fill_cores": fill, "wall_s": round(wall, 1), "tests_s": round(sum(per_test.values()), 1),
            "per_test_s": {k: round(v, 1) for k, v in per_test.items()}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=1, help="sessions per setting, alternated (off, on, off, on...)")
    parser.add_argument("--order", default="off,on", help="which setting goes first: off,on or on,off")
    args = parser.parse_args()
    order = [part.strip() == "on" for part in args.order.split(",")]
    print(f"{len(SELECTION)} tests, {os.cpu_count()} cores, load average {os.getloadavg()[0]:.2f} at the start; "
          f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', '(unset: tests/conftest.py sets PASSIVE)')}",
          flush=True)
    for test_id, workers in SELECTION.items():
        print(f"  {test_id.split('::')[-1]}: local workers {workers}")
    results: dict[bool, list[dict]] = {False: [], True: []}
    with tempfile.TemporaryDirectory(prefix="thresher-suite-cores-") as tmp:
        for i in range(args.repeat):
            for fill in order:
                result = session(fill, Path(tmp) / f"{i}-{fill}.xml")
                results[fill].append(result)
                print(json.dumps(result), flush=True)
    off, on = results[False], results[True]
    mean = lambda rows, key: sum(r[key] for r in rows) / len(rows)  # noqa: E731
    print(json.dumps({
        "off_wall_s": round(mean(off, "wall_s"), 1), "on_wall_s": round(mean(on, "wall_s"), 1),
        "off_tests_s": round(mean(off, "tests_s"), 1), "on_tests_s": round(mean(on, "tests_s"), 1),
        "ratio_wall_off_over_on": round(mean(off, "wall_s") / mean(on, "wall_s"), 3),
        "ratio_tests_off_over_on": round(mean(off, "tests_s") / mean(on, "tests_s"), 3),
        "load_average_at_end": round(os.getloadavg()[0], 2),
    }))


if __name__ == "__main__":
    main()
