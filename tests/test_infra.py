"""Every infra file parses; the compose file and manifests name the pieces the README promises."""

from pathlib import Path

import yaml

from thresher.flows.registry import load_config
from thresher.llm2llm.config import load_llm2llm_config


def _yaml_files(repo_root: Path):
    return sorted((repo_root / "infra").rglob("*.yaml")) + [repo_root / "prefect.yaml"]


def test_every_yaml_parses(repo_root):
    files = _yaml_files(repo_root)
    assert len(files) >= 6
    for path in files:
        docs = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
        assert docs, f"{path} is empty"


def test_compose_has_the_services(repo_root):
    compose = yaml.safe_load((repo_root / "infra/docker-compose.yaml").read_text())
    services = compose["services"]
    for name in ("prefect-server", "dask-scheduler", "dask-worker-cpu", "dask-worker-gpu", "vllm", "thresher-serve"):
        assert name in services, name
    assert "--resources GPU=1" in services["dask-worker-gpu"]["command"]


def test_prefect_yaml_deployments_load_their_flow(repo_root):
    from prefect.flows import load_flow_from_entrypoint

    config = yaml.safe_load((repo_root / "prefect.yaml").read_text())
    for deployment in config["deployments"]:
        flow = load_flow_from_entrypoint(deployment["entrypoint"])
        assert flow.name in ("thresher-curate", "thresher-llm2llm")
        assert set(deployment["parameters"]) <= set(flow.parameters.properties)
        config = repo_root / deployment["parameters"]["config_path"]
        if flow.name == "thresher-llm2llm":
            load_llm2llm_config(config)
        else:
            load_config(config)


def test_slurm_files_are_valid_python_and_bash(repo_root):
    import ast
    import subprocess

    ast.parse((repo_root / "infra/slurm/cluster.py").read_text())
    result = subprocess.run(["bash", "-n", str(repo_root / "infra/slurm/thresher.sbatch")], capture_output=True)
    assert result.returncode == 0, result.stderr
