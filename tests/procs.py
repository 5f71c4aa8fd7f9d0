"""Helpers for tests that start real server processes (Prefect, Dask) on loopback."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stop_group(proc: subprocess.Popen, sig: int = signal.SIGTERM, timeout: float = 20) -> None:
    """Stop a process started with ``start_new_session=True`` and everything it spawned."""
    if proc.poll() is not None:
        return
    os.killpg(proc.pid, sig)
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def start_prefect_server(home: Path) -> tuple[subprocess.Popen, str]:
    """Start ``prefect server start`` on a free loopback port with ``home`` as PREFECT_HOME."""
    port = free_port()
    env = {**os.environ, "PREFECT_HOME": str(home), "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
           "PREFECT_UI_ENABLED": "false", "PREFECT_LOGGING_LEVEL": "WARNING"}
    env.pop("PREFECT_API_URL", None)
    log = open(home / "server.log", "wb")
    proc = subprocess.Popen([str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
                            env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    return proc, f"http://127.0.0.1:{port}/api"


def wait_for_prefect_server(api: str, proc: subprocess.Popen | None, timeout: float = 180) -> None:
    """Return once ``api``/health answers; fail with the server's log if it exits or never answers."""
    import httpx

    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"the Prefect server exited with {proc.returncode}")
        try:
            if httpx.get(f"{api}/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.25)
    raise RuntimeError(f"the Prefect server at {api} did not answer in {timeout:.0f} s")


def serve_openai(name: str, cmd: list[str], log: Path, timeout: float, env: dict[str, str] | None = None,
                 api_key: str | None = None):
    """Start an OpenAI-compatible server (``cmd`` must listen where its ``--port`` says), wait until
    ``/v1/models`` answers (with ``api_key`` when the server wants one), yield its ``/v1`` URL, and
    stop its process group afterwards. A server that exits or never answers fails the test with
    the end of its log."""
    import httpx
    import pytest

    port = cmd[cmd.index("--port") + 1]
    url = f"http://127.0.0.1:{port}/v1"
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                                env={**os.environ, **(env or {})})
    try:
        deadline = time.monotonic() + timeout
        while True:
            if proc.poll() is not None:
                pytest.fail(f"{name} exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
            try:
                headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
                if httpx.get(f"{url}/models", timeout=2, headers=headers).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"{name} not ready after {timeout:.0f} s:\n{log.read_text()[-3000:]}")
            time.sleep(0.5)
        yield url
    finally:
        stop_group(proc)
