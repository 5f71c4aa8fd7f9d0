"""Every core busy: the GRAPE run on 240 candidates, before and after core-filling, in one run.

Run: ``python bench/cores.py [--instructions 40] [--max-tokens 512] [--workers 2]``

Input: the first ``--instructions`` AlpacaEval instructions answered by six models
(``../shared/data/alpaca_eval``: gpt4_1106_preview, claude-2, Mixtral, Mistral, alpaca-7b,
NullModel): 240 candidates at the defaults, the example GRAPE config's stages (validate ->
grape on Gemma-3-270M -> grape_select) with ``shard_rows: 900``, on a local cluster of
``--workers`` workers, request cache off, each run in its own folder.

(a) before: ``execution.fill_cores: false``: shards planned by ``shard_rows`` alone (one
    shard here) and ``cores / workers`` torch threads per task: one task on one worker;
(b) after (the default): at least one shard per worker thread (groups whole) and a stage's
    tasks sharing the machine's cores among themselves.

Printed per run: wall seconds, CPU seconds of the run's processes (``getrusage`` of the
children), utilisation = CPU seconds / (wall x cores), the mean 1-minute load average
sampled every 5 s, and the shard count; then the speed-up and whether the two outputs are
identical (they must be).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data" / "alpaca_eval"
MODELS = ("gpt4_1106_preview", "claude-2", "Mixtral-8x7B-Instruct-v0.1", "Mistral-7B-Instruct-v0.2",
          "alpaca-7b", "NullModel")


def write_inputs(folder: Path, instructions: int) -> list[str]:
    paths = []
    for model in MODELS:
        path = folder / f"{model}.json"
        path.write_text(json.dumps(json.loads((DATA / f"{model}.json").read_text())[:instructions]))
        paths.append(str(path))
    return paths


def run(folder: Path, inputs: list[str], fill: bool, args) -> dict:
    config = folder / f"grape-{'after' if fill else 'before'}.json"
    out = folder / f"out-{'after' if fill else 'before'}"
    config.write_text(json.dumps({
        "name": f"cores-{'after' if fill else 'before'}", "inputs": inputs, "out": str(out), "shard_rows": 900,
        "execution": {"workers": args.workers, "fill_cores": fill},
        "stages": [{"stage": "validate"},
                   {"stage": "grape", "model": "embedded:gemma-3-270m", "max_tokens": args.max_tokens,
                    "request_cache": False},
                   {"stage": "grape_select"}],
    }))
    loads: list[float] = []
    done = threading.Event()

    def sample() -> None:
        while not done.wait(5):
            loads.append(os.getloadavg()[0])

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "thresher.cli", "run", str(config), "-q"],
                          capture_output=True, text=True)
    wall = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    done.set()
    if proc.returncode != 0:
        raise SystemExit(proc.stderr[-3000:])
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    manifest = json.loads((out / "manifest.json").read_text())
    cores = os.cpu_count() or 1
    return {"fill_cores": fill, "wall_s": round(wall, 1), "cpu_s": round(cpu, 1),
            "utilisation": round(cpu / (wall * cores), 3),
            "mean_load_1min": round(sum(loads) / len(loads), 2) if loads else None,
            "shards": manifest["shards"]["count"], "output_rows": manifest["counts"]["output"],
            "data": sorted((out / "data").glob("*.parquet"))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--instructions", type=int, default=40)
    parser.add_argument("--max-tokens", type=int, default=512)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    import pyarrow.parquet as pq

    with tempfile.TemporaryDirectory(prefix="thresher-cores-") as tmp:
        folder = Path(tmp)
        inputs = write_inputs(folder, args.instructions)
        print(f"{args.instructions * len(MODELS)} candidates, {args.workers} workers, {os.cpu_count()} cores", flush=True)
        results = []
        for fill in (False, True):
            result = run(folder, inputs, fill, args)
            results.append(result)
            print(json.dumps({k: v for k, v in result.items() if k != "data"}), flush=True)
        same = pq.read_table(results[0]["data"]).equals(pq.read_table(results[1]["data"]))
        print(json.dumps({"speedup": round(results[0]["wall_s"] / results[1]["wall_s"], 2),
                          "identical_output": same}))


if __name__ == "__main__":
    main()
