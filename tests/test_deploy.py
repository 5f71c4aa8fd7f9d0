"""A real Prefect server on loopback, a process serving the deployment, a run triggered by the CLI."""

from __future__ import annotations

import json
import os
import re
import subprocess
import time
from pathlib import Path

import httpx
import pytest
from procs import BIN, free_port, stop_group


def _wait_until(check, timeout: float, what: str, procs=()):
    deadline = time.time() + timeout
    while time.time() < deadline:
        for proc in procs:
            if proc.poll() is not None:
                raise AssertionError(f"{what}: a process exited early:\n{proc.stdout.read().decode()[-3000:]}")
        try:
            if check():
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise AssertionError(f"timed out waiting for {what}")


def _check_artifacts(api: str, run_output: str, manifest: dict) -> None:
    """The run's funnel table and report markdown, read back from the server: they belong to the
    `thresher-pipeline` subflow run of the triggered `thresher-curate` run."""
    parent = re.search(r"UUID: ([0-9a-f-]{36})", run_output).group(1)
    children = httpx.post(f"{api}/flow_runs/filter", timeout=10, json={
        "flows": {"name": {"any_": ["thresher-pipeline"]}},
        "flow_runs": {"parent_flow_run_id": {"any_": [parent]}}}).json()
    assert len(children) == 1, children
    artifacts = httpx.post(f"{api}/artifacts/filter", timeout=10, json={
        "artifacts": {"flow_run_id": {"any_": [children[0]["id"]]}}}).json()
    by_key = {a["key"]: a for a in artifacts}
    assert set(by_key) == {"thresher-funnel", "thresher-report"}
    assert by_key["thresher-funnel"]["type"] == "table" and by_key["thresher-report"]["type"] == "markdown"
    table = json.loads(by_key["thresher-funnel"]["data"])
    assert [(r["stage"], r["rows in"], r["created"], r["rejected"], r["replaced"], r["rows out"]) for r in table] == [
        (s["stage"], s["in"], s["created"], s["rejected"], s["replaced"], s["out"]) for s in manifest["stages"]]
    assert [r["stage"] for r in table] == ["validate", "exact_dedup", "select"]
    c = manifest["counts"]
    report = by_key["thresher-report"]["data"]
    assert f"**{c['input']} rows read = {c['output']} rows out + {c['rejected']} rejected**" in report
    funnel = Path(manifest["config"]["out"]) / "report" / "funnel.png"
    assert f"*Figure: rows per stage (`{funnel}`)*" in report and "](report/" not in report  # no broken image
    assert funnel.read_bytes().startswith(b"\x89PNG")


@pytest.fixture
def prefect_server(tmp_path, prefect_api):
    """The session's real Prefect server (tests/conftest.py); this test's own client home."""
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "prefect-home")}
    yield prefect_api, env


@pytest.mark.slow
def test_served_deployment_runs_when_triggered(tmp_path, shared_data, prefect_server):
    """Also the deployment half of issue 20: a key in the serving process's environment, a run of a
    config whose openai model fails on an unreachable port (retries and errors logged): the key
    is in no output, no log line and nowhere in the Prefect home (its database included)."""
    from test_secrets import files_holding, new_key

    api, env = prefect_server
    key = new_key()
    env = {**env, "PREFECT_API_URL": api, "PREFECT_LOGGING_LEVEL": "WARNING", "OPENAI_API_KEY": key,
           "THRESHER_REPORT_FIGURES": "1",
           "PREFECT_RUNNER_POLL_FREQUENCY": "1"}  # the served process picks a triggered run up within 1 s
    config = tmp_path / "nightly.yaml"
    config.write_text(
        f"name: nightly\ninputs: [{shared_data / 'gsm8k/test.jsonl'}]\nout: {tmp_path / 'default-out'}\n"
        "shard_rows: 400\nexecution: {workers: 1}\n"
        "stages: [{stage: validate}, {stage: exact_dedup}, {stage: select, budget: 100}]\n"
    )
    server = subprocess.Popen([str(BIN / "thresher"), "serve", str(config), "--name", "test", "--cron", "0 3 * * *"],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        def registered() -> bool:
            r = httpx.get(f"{api}/deployments/name/thresher-curate/test", timeout=5)
            return r.status_code == 200 and r.json()["schedules"][0]["schedule"]["cron"] == "0 3 * * *"

        _wait_until(registered, 120, "the deployment to register", [server])
        out = tmp_path / "adhoc-out"
        run = subprocess.run(
            [str(BIN / "prefect"), "deployment", "run", "thresher-curate/test",
             "--param", f"out={out}", "--watch", "--watch-interval", "1", "--watch-timeout", "300"],
            env=env, capture_output=True, text=True, timeout=360,
        )
        assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
        assert "Completed" in run.stdout + run.stderr
        manifest = json.loads((out / "manifest.json").read_text())
        assert manifest["counts"]["output"] == 100
        assert manifest["counts"]["input"] == 1319
        assert not (tmp_path / "default-out").exists()  # the --param override was used
        _check_artifacts(api, run.stdout, manifest)

        keyed = tmp_path / "keyed.yaml"  # the same deployment, another config: an openai model, the key from the env
        keyed.write_text(
            "name: keyed\nexecution: {workers: 1}\nstages:\n"
            "  - {stage: magpie, count: 1, retries: 0, request_cache: false, model: {name: embedded:smollm2-135m-instruct,"
            f" backend: openai, base_url: 'http://127.0.0.1:{free_port()}/v1', max_retries: 1, timeout_s: 2}}}}\n")
        failed = subprocess.run(
            [str(BIN / "prefect"), "deployment", "run", "thresher-curate/test", "--param", f"config_path={keyed}",
             "--param", f"out={tmp_path / 'keyed-out'}", "--watch", "--watch-interval", "1", "--watch-timeout", "300"],
            env=env, capture_output=True, text=True, timeout=360,
        )
        assert failed.returncode != 0 and "Failed" in failed.stdout + failed.stderr
        assert key not in failed.stdout + failed.stderr
    finally:
        stop_group(server)
    served_log = server.stdout.read().decode()
    assert "failed after 2 attempts" in served_log  # the retry and error lines were logged
    assert key not in served_log
    assert files_holding(key, tmp_path, Path(os.environ["PREFECT_HOME"])) == []
