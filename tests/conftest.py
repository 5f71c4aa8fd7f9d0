"""Shared test setup: an isolated Prefect home, quiet libraries, the shared data folder."""

from __future__ import annotations

import atexit
import os
import signal
import sys
import tempfile
from pathlib import Path

import pytest

# Before Prefect is imported anywhere: its database and settings go to a temp folder.
_PREFECT_HOME = tempfile.mkdtemp(prefix="thresher-prefect-")
os.environ.setdefault("PREFECT_HOME", _PREFECT_HOME)
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
# report.md's figures cost a second a run; the tests of the figures turn them on (THRESHER_REPORT_FIGURES=1)
os.environ.setdefault("THRESHER_REPORT_FIGURES", "0")
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")  # a loaded machine starts it slowly
os.environ.setdefault("DO_NOT_TRACK", "1")
# torch's OpenMP threads (a lone local worker gets all the cores' threads) sleep when they wait
# instead of spinning: on 2 cores a flow's worker shares them with the flow process, the Prefect
# server and this one, and spinning threads made model tasks 2-5x slower there (the Magpie flow
# test 123 s -> 59 s, the GRAPE run 56 s -> 24 s). Inherited by every CLI run and Dask worker the
# tests start; results do not depend on it.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = (REPO.parent / "shared" / "data").resolve()

# One real Prefect server for the whole session, started now (it comes up while the tests are
# collected): every flow the tests run, in this process or through the CLI in a subprocess,
# reports to it instead of starting a temporary server of its own (~10 s each on 2 cores).
# Tests of the temporary server's own lifecycle drop PREFECT_API_URL from their subprocess.
sys.path.insert(0, str(Path(__file__).resolve().parent))
from procs import start_prefect_server, wait_for_prefect_server  # noqa: E402

if "PREFECT_API_URL" not in os.environ:
    _SERVER, _API = start_prefect_server(Path(_PREFECT_HOME))
    os.environ["PREFECT_API_URL"] = _API
    atexit.register(lambda: _SERVER.poll() is None and os.killpg(_SERVER.pid, signal.SIGTERM))
else:
    _SERVER, _API = None, os.environ["PREFECT_API_URL"]


@pytest.fixture(scope="session", autouse=True)
def prefect_api() -> str:
    """The session's Prefect API, once it answers."""
    wait_for_prefect_server(_API, _SERVER)
    return _API


@pytest.fixture(scope="session")
def shared_data() -> Path:
    assert SHARED_DATA.is_dir(), f"the shared data sets are expected at {SHARED_DATA}"
    return SHARED_DATA


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO


# ---- model fixtures (generators: hf backend, embedded models) -- begin ----
# Session-scoped real embedded models, loaded once through the registry (which
# memoizes per process, so tests calling load_model get these same objects).
# Converted GGUF copies persist in the user cache (~/.cache/thresher/models).


@pytest.fixture(scope="session")
def smollm2_backend():
    from thresher.generators.registry import load_model

    return load_model("embedded:smollm2-135m-instruct", cache=False)


@pytest.fixture(scope="session")
def gemma_backend():
    from thresher.generators.registry import load_model

    return load_model("embedded:gemma-3-270m", cache=False)


@pytest.fixture(scope="session")
def minilm_backend():
    from thresher.generators.registry import load_model

    return load_model("embedded:all-minilm-l6-v2", cache=False)


# ---- model fixtures -- end ----


# ---- running on every core: pytest-xdist (`-n auto --dist loadfile` in pyproject.toml) ----
# The suite alone kept one of 2 cores busy (44-55% CPU on 2 cores: much of a test is waiting on
# a server, a subprocess or a cluster); one pytest worker per core, each running whole files
# (a module's fixtures are built once), took it from 753 s to 450 s on 2 cores (bench/suite_workers.py).

_WORKER_GIB = 4  # the most a worker was seen to hold: its own embedded models and vLLM engines


def pytest_xdist_auto_num_workers(config) -> int:
    """``-n auto``: one worker per core this process may use, as many as memory allows, at most 4."""
    cores = len(os.sched_getaffinity(0))
    memory_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return max(1, min(cores, int(memory_gib // _WORKER_GIB), 4))


_FILE_SECONDS = "thresher/file_seconds"  # each test file's seconds on the last run (pytest's cache)


def pytest_collection_modifyitems(config, items) -> None:
    """The longest files first, so that no long file is left to run alone at the end on one
    worker while the others idle: by their seconds on the last run when pytest's cache has
    them, else by their count of ``slow`` tests. A file's own tests keep their order."""
    seconds = config.cache.get(_FILE_SECONDS, {}) if config.cache is not None else {}
    slow: dict[str, int] = {}
    for item in items:
        slow[item.location[0]] = slow.get(item.location[0], 0) + bool(item.get_closest_marker("slow"))
    items.sort(key=lambda item: -seconds.get(item.location[0], slow[item.location[0]]))


_durations: dict[str, float] = {}


def pytest_runtest_logreport(report) -> None:
    _durations[report.location[0]] = _durations.get(report.location[0], 0.0) + report.duration


def pytest_sessionfinish(session) -> None:
    config = session.config
    if config.cache is not None and not hasattr(config, "workerinput") and _durations:
        config.cache.set(_FILE_SECONDS, {**config.cache.get(_FILE_SECONDS, {}), **_durations})
