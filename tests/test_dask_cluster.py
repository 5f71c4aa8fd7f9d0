"""An existing Dask cluster: real `dask scheduler` and `dask worker` processes on loopback.

One worker is started with ``--resources GPU=1``; the model stage asks for ``GPU: 1``, so
its tasks must run there only. The other worker is killed mid-run; the run must still
complete, with output identical to a clean run.
"""

from __future__ import annotations

import json
import signal
import subprocess
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from procs import BIN, free_port, stop_group

N_GROUPS = 8
MODELS = ("gpt4_1106_preview", "alpaca-7b", "NullModel")


def _start(*args: str) -> subprocess.Popen:
    return subprocess.Popen([str(BIN / args[0]), *args[1:]], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)


def _workers(address: str, timeout: float = 90) -> dict[str, str]:
    from distributed import Client

    with Client(address, timeout=timeout) as client:
        client.wait_for_workers(2, timeout=timeout)
        return {w["name"]: addr for addr, w in client.scheduler_info()["workers"].items()}


@pytest.fixture
def small_candidates(tmp_path, shared_data) -> list[Path]:
    paths = []
    for model in MODELS:
        rows = json.loads((shared_data / "alpaca_eval" / f"{model}.json").read_text())[:N_GROUPS]
        path = tmp_path / "cands" / f"{model}.json"
        path.parent.mkdir(exist_ok=True)
        path.write_text(json.dumps(rows))
        paths.append(path)
    return paths


def _config(tmp_path: Path, inputs: list[Path]) -> Path:
    config = tmp_path / "cluster.yaml"
    config.write_text(json.dumps({
        "name": "cluster",
        "inputs": [str(p) for p in inputs],
        "shard_rows": 6,
        "stages": [
            {"stage": "validate"},
            {"stage": "exact_dedup"},
            # SmolLM2 (a 49k vocabulary) as the target: placement and recovery are the point here,
            # and Gemma's 262k-entry LM head would make every candidate five times dearer
            {"stage": "grape", "model": "embedded:smollm2-135m-instruct", "max_tokens": 128, "resources": {"GPU": 1}},
            {"stage": "grape_select"},
        ],
    }))
    return config


def _data(out: Path):
    return pq.read_table(sorted((out / "data").glob("*.parquet"))).to_pylist()


@pytest.mark.slow
def test_gpu_tagged_worker_and_a_killed_worker(tmp_path, small_candidates):
    port = free_port()
    address = f"tcp://127.0.0.1:{port}"
    scheduler = _start("dask", "scheduler", "--host", "127.0.0.1", "--port", str(port), "--no-dashboard")
    cpu = _start("dask", "worker", address, "--name", "cpu-worker", "--nthreads", "1", "--no-dashboard")
    gpu = _start("dask", "worker", address, "--name", "gpu-worker", "--nthreads", "1", "--no-dashboard",
                 "--resources", "GPU=1")
    try:
        workers = _workers(address)
        config = _config(tmp_path, small_candidates)
        out = tmp_path / "cluster-out"
        run = subprocess.Popen([str(BIN / "thresher"), "run", str(config), "--out", str(out), "-q",
                                "--dask-address", address],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
        validate_dir = out / ".thresher" / "validate"
        deadline = time.time() + 300
        while time.time() < deadline and run.poll() is None:
            if validate_dir.is_dir() and len(list(validate_dir.iterdir())) >= 2:
                break
            time.sleep(0.05)
        assert run.poll() is None, "the run ended before the worker could be killed"
        stop_group(cpu, signal.SIGKILL)  # mid-run: its tasks and the results it held must be redone elsewhere
        stdout, stderr = run.communicate(timeout=600)
        assert run.returncode == 0, stderr.decode()[-3000:]

        manifest = json.loads((out / "manifest.json").read_text())
        assert manifest["counts"]["output"] == N_GROUPS
        grape_runs = [json.loads(p.read_text()) for p in (out / ".thresher" / "grape").glob("*/result.json")]
        assert len(grape_runs) == manifest["shards"]["count"]
        assert {r["worker"] for r in grape_runs} == {workers["gpu-worker"]}
        assert len({r["pid"] for r in grape_runs}) == 1  # one worker process: the model loaded once, reused
        loads = [e for e in manifest["model_lifecycle"] if e["event"] == "load"]
        assert [(e["worker"], e["model"]) for e in loads] == [(workers["gpu-worker"], "embedded:smollm2-135m-instruct")]
    finally:
        for proc in (cpu, gpu, scheduler):
            stop_group(proc, signal.SIGKILL)

    clean_out = tmp_path / "clean-out"  # a local cluster offers the GPU resource the stage asks for
    clean = subprocess.run([str(BIN / "thresher"), "run", str(_config(tmp_path, small_candidates)),
                            "--out", str(clean_out), "-q", "--workers", "1"], capture_output=True, text=True)
    assert clean.returncode == 0, clean.stderr[-3000:]
    assert _data(out) == _data(clean_out)
