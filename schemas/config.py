"""Pipeline configuration: its shape as pydantic models, loaded from YAML, checked before any work starts.

An unknown key or a wrong type is a :class:`ConfigError` naming the key path
(``stages[1] (select).budgt: unknown key``). Relative paths in a config file are
resolved against the file's folder, so a config runs the same from any directory.

This module knows the config's shape, not which stages exist: :func:`validate_config`
and :func:`load_config_file` take a ``stage_params`` lookup (a stage name to its
``Params`` model). Use :func:`thresher.flows.registry.parse_config` and
:func:`thresher.flows.registry.load_config`, which pass the stage registry's.
(``schemas`` never imports ``flows``: a test guards it.)

Example::

    name: demo
    inputs: [../../shared/data/codealpaca/code_alpaca_2k.json]
    shard_rows: 500
    ingest: {format: auto, max_row_bytes: 200000}
    stages:
      - stage: validate
      - stage: exact_dedup
      - stage: select
        budget: 1000
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from thresher.schemas.formats import FORMATS
from thresher.schemas.secrets import secret_key_paths


class ConfigError(ValueError):
    """A configuration problem, with the file and key that caused it."""


#: a stage name -> its ``Params`` model; raises ``KeyError`` (with a readable message) for an unknown name
StageParamsLookup = Callable[[str], type[BaseModel]]

#: stage keys renamed since an earlier version: old -> new (an old key is an error naming the new one)
RENAMED_KEYS = {"chunk_rows": "chunk_size"}


class IngestConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    format: str = Field("auto", description="auto, or one of the reader formats")
    max_row_bytes: int = Field(1_000_000, ge=1, description="rows larger than this are quarantined")
    on_unreadable_file: Literal["error", "skip"] = Field(
        "error", description="error: stop with a clear message; skip: record it as rejected and go on"
    )
    split_min_bytes: int = Field(
        32 << 20, ge=1, description="a JSONL file is read by several tasks at once (byte ranges of at least this "
                                    "size) when the run has fewer files than worker threads; the rows are the same")

    @field_validator("format")
    @classmethod
    def _known_format(cls, value: str) -> str:
        if value != "auto" and value not in FORMATS:
            raise ValueError(f"unknown format '{value}'; choose auto or one of {sorted(FORMATS)}")
        return value


def fill_cores_default() -> bool:
    """``execution.fill_cores``' default: on, unless ``THRESHER_FILL_CORES=0`` (bench/suite_cores.py turns it off so)."""
    return os.environ.get("THRESHER_FILL_CORES", "1") != "0"


class ExecutionConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    dask_address: str | None = Field(None, description="an existing Dask scheduler, e.g. tcp://10.0.0.5:8786")
    workers: int = Field(2, ge=1, description="local cluster worker processes (when no dask_address)")
    threads_per_worker: int = Field(1, ge=1, description="Dask task threads per local worker")
    cpu_threads_per_worker: int | None = Field(
        None, ge=1, description="CPU threads each local worker's models and numeric libraries use "
                                "(default: this machine's cores / workers)")
    fill_cores: bool = Field(
        default_factory=fill_cores_default,
        description="keep every core busy: plan at least one shard per Dask worker thread (groups kept "
                    "whole; shard_rows stays the upper bound) and, on a local cluster, let a stage's tasks "
                    "share the machine's cores when they are fewer than the workers; default true, false "
                    "when THRESHER_FILL_CORES=0 is in the environment (a config's own value wins)")
    model_memory_gb: float | None = Field(
        None, gt=0, description="per local worker: loading a model releases the least recently used "
                                "others until their measured footprints fit (default: no budget; a "
                                "stage's models are released when it is over either way)")


class OutputConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    rows_per_file: int = Field(50_000, ge=1, description="rows per output Parquet file")
    figures: bool = Field(True, description="report.md's PNG figures (funnel, attributes, scores per model); "
                                            "THRESHER_REPORT_FIGURES=0 in the environment turns them off too")
    keep_columns: list[str] = Field(
        default_factory=list,
        description="intermediate wide columns to keep in attributes/ (e.g. deita_embedding): a stage writes "
                    "them for a later stage, and they are left out of the output unless named here")


class StageEntry(BaseModel):
    """One configured stage: its registered name and its parameters, validated by its ``Params`` model.

    :func:`thresher.flows.registry.build_stage` makes the stage itself.
    """

    model_config = ConfigDict(arbitrary_types_allowed=True)

    stage: str
    params: Any

    def to_dict(self) -> dict[str, Any]:
        return {"stage": self.stage, **self.params.model_dump(mode="json", exclude_defaults=True)}


class PipelineConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", arbitrary_types_allowed=True)

    name: str = "thresher"
    inputs: list[str] = Field(default_factory=list)
    out: str | None = None
    cache_dir: str | None = Field(None, description="work store; default <out>/.thresher")
    shard_rows: int = Field(2000, ge=1, description="rows per shard (a group is never split)")
    shard_bytes: int | None = Field(
        None, ge=1, description="bytes per shard: a shard closes before its rows' `messages` JSON would pass "
                                "this many bytes (a group is never split: a larger one is a shard of its own); "
                                "shard_rows stays an upper bound; None = rows only")
    ingest: IngestConfig = Field(default_factory=IngestConfig)
    execution: ExecutionConfig = Field(default_factory=ExecutionConfig)
    output: OutputConfig = Field(default_factory=OutputConfig)
    stages: list[StageEntry] = Field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        data = self.model_dump(mode="json", exclude={"stages"})
        data["stages"] = [s.to_dict() for s in self.stages]
        return data


def _where(loc: tuple) -> str:
    parts: list[str] = []
    for item in loc:
        if isinstance(item, int):
            parts.append(f"[{item}]")
        else:
            parts.append(("." if parts else "") + str(item))
    return "".join(parts) or "(top level)"


def _explain(err: ValidationError, prefix: str = "") -> str:
    lines = []
    for e in err.errors():
        where = prefix + _where(tuple(e["loc"]))
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            new = RENAMED_KEYS.get(str(e["loc"][-1])) if e["loc"] else None
            msg = f"unknown key (renamed: use '{new}')" if new else "unknown key"
        lines.append(f"{where}: {msg}")
    return "; ".join(lines)


def _stage_entries(raw_stages: Any, stage_params: StageParamsLookup,
                   base_dir: Path | None = None) -> list[StageEntry]:
    """Each stage's validated parameters; a parameter naming a file may resolve it against ``base_dir``
    (the config file's folder), which its validators find in the validation context."""
    if not isinstance(raw_stages, list):
        raise ConfigError("stages: must be a list of {stage: <name>, ...params}")
    entries = []
    for i, raw in enumerate(raw_stages):
        if isinstance(raw, str):
            raw = {"stage": raw}
        if not isinstance(raw, dict) or "stage" not in raw:
            raise ConfigError(f"stages[{i}]: each stage needs a 'stage: <name>' key")
        params = dict(raw)
        name = params.pop("stage")
        try:
            params_model = stage_params(name)
        except KeyError as err:
            raise ConfigError(f"stages[{i}].stage: {err}") from None
        try:
            entries.append(StageEntry(stage=name, params=params_model.model_validate(
                params, context={"base_dir": base_dir})))
        except ValidationError as err:
            raise ConfigError(_explain(err, prefix=f"stages[{i}] ({name}).")) from None
    return entries


def _resolve(path: str, base: Path) -> str:
    p = Path(path).expanduser()
    return str(p if p.is_absolute() else (base / p))


def validate_config(
    data: dict[str, Any], stage_params: StageParamsLookup, base_dir: Path | None = None, origin: str = "config",
) -> PipelineConfig:
    """Validate a config mapping, each stage's parameters by ``stage_params(name)``;
    relative paths are resolved against ``base_dir``."""
    if not isinstance(data, dict):
        raise ConfigError(f"{origin}: the top level must be a mapping of keys")
    secret = secret_key_paths(data)
    if secret:
        raise ConfigError(f"{origin}: {secret[0]}: '{secret[0].rsplit('.', 1)[-1]}' in a config is refused: a config "
                          "is copied into the manifest and Prefect's database; put the key in an environment "
                          "variable and name it with 'api_key_env' (default OPENAI_API_KEY)")
    data = dict(data)
    stages = _stage_entries(data.pop("stages", []), stage_params, base_dir)
    try:
        config = PipelineConfig(**data, stages=[])
    except ValidationError as err:
        raise ConfigError(f"{origin}: {_explain(err)}") from None
    config.stages = stages
    if base_dir is not None:
        config.inputs = [_resolve(p, base_dir) for p in config.inputs]
        if config.out:
            config.out = _resolve(config.out, base_dir)
        if config.cache_dir:
            config.cache_dir = _resolve(config.cache_dir, base_dir)
    return config


def read_yaml_file(path: str | Path) -> Any:
    """A YAML config file's contents (``{}`` when empty); a :class:`ConfigError` when it is missing or not YAML."""
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"config file {path} does not exist")
    try:
        return yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML ({err})") from None


def load_config_file(path: str | Path, stage_params: StageParamsLookup) -> PipelineConfig:
    """Read and validate a YAML pipeline config (a clear :class:`ConfigError` on any problem)."""
    data = read_yaml_file(path)
    return validate_config(data, stage_params, base_dir=Path(path).resolve().parent, origin=str(path))
