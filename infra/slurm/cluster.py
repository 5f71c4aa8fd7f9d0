"""Start a Dask cluster on Slurm with dask-jobqueue (CPU and GPU jobs) and run a pipeline on it.

    pip install dask-jobqueue
    python infra/slurm/cluster.py examples/grape.yaml --out /scratch/$USER/grape-out

The CPU workers come from ``SLURMCluster``; the GPU workers are plain Slurm jobs
that join the same scheduler with ``--resources GPU=1``, so model stages that
ask for ``resources: {GPU: 1}`` run only there.
"""

from __future__ import annotations

import subprocess
import sys

from dask_jobqueue import SLURMCluster
from distributed import Client

GPU_WORKER_JOB = """#!/bin/bash
#SBATCH --job-name=thresher-gpu-worker
#SBATCH --partition=gpu
#SBATCH --gres=gpu:1
#SBATCH --cpus-per-task=8
#SBATCH --mem=64G
#SBATCH --time=04:00:00
source .venv/bin/activate
dask worker {address} --nthreads 1 --resources GPU=1 --death-timeout 120
"""


def main(config: str, *thresher_args: str, gpu_jobs: int = 1) -> int:
    cluster = SLURMCluster(queue="cpu", cores=8, processes=4, memory="32GB", walltime="04:00:00")
    cluster.scale(jobs=2)
    for _ in range(gpu_jobs):
        subprocess.run(["sbatch"], input=GPU_WORKER_JOB.format(address=cluster.scheduler_address),
                       text=True, check=True)
    with Client(cluster) as client:
        client.wait_for_workers(1)
        return subprocess.call(["thresher", "run", config, "--dask-address", cluster.scheduler_address, *thresher_args])


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
