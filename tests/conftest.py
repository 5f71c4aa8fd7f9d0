"""Shared test setup: an isolated Prefect home, quiet libraries, the shared data folder."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

# Before Prefect is imported anywhere: its database and settings go to a temp folder.
_PREFECT_HOME = tempfile.mkdtemp(prefix="thresher-prefect-")
os.environ.setdefault("PREFECT_HOME", _PREFECT_HOME)
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")  # a loaded machine starts it slowly
os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = (REPO.parent / "shared" / "data").resolve()


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
