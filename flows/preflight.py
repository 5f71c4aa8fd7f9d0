"""Checks a run's inputs and output folder before any work starts, each failure in one line.

Without them a pattern that matches nothing surfaces as a Prefect traceback from inside the
flow, an ``--out`` that is a file as ``NotADirectoryError`` after ingest, and an output folder
inside an input folder is read back as input by the next run.
"""

from __future__ import annotations

from pathlib import Path

from thresher.schemas.config import ConfigError, PipelineConfig
from thresher.schemas.readers import NoInputError, discover_inputs


def _static_root(pattern: str) -> Path:
    """The folder part of an input pattern before its first wildcard."""
    parts = Path(pattern).expanduser().parts
    fixed = [p for p in parts[: next((i for i, p in enumerate(parts) if any(c in p for c in "*?[")), len(parts))]]
    return Path(*fixed) if fixed else Path(".")


def preflight(config: PipelineConfig) -> list[Path]:
    """The run's input files; :class:`ConfigError` (one line) when the inputs match nothing, the
    output is a file, or the output folder lies inside an input folder."""
    out = Path(config.out).expanduser().resolve() if config.out else None
    if out is not None and out.exists() and not out.is_dir():
        raise ConfigError(f"the output {out} is a file; give --out a folder")
    try:
        files = discover_inputs(config.inputs) if config.inputs else []
    except NoInputError as err:
        raise ConfigError(str(err)) from None
    if out is not None:
        for pattern in config.inputs:
            root = _static_root(pattern).resolve()
            recursive = Path(pattern).expanduser().is_dir() or "**" in pattern  # a folder is read whole
            if recursive and root.is_dir() and (out == root or root in out.parents):
                raise ConfigError(f"the output folder {out} is inside the input folder {root}: the next run would "
                                  "read this run's output as input; write it elsewhere")
    return files
