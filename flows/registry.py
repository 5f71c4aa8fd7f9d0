"""Every stage a pipeline config can name, as ``name -> "module:Class"``, and configs checked against them.

Modules are imported only when a config names their stage, so a CPU-only
pipeline never imports torch. To add a stage: write its module, add one line here.

:mod:`thresher.schemas.config` holds the config's shape; :func:`parse_config` and
:func:`load_config` here check it with every stage's parameters validated by the
stage's ``Params`` model, and :func:`build_stage` makes a configured stage.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

from thresher.flows.stage import Stage, StageParams
from thresher.schemas.config import ConfigError, PipelineConfig, StageEntry, load_config_file, validate_config

STAGES: dict[str, str] = {
    "validate": "thresher.filters.validate:ValidateStage",
    "exact_dedup": "thresher.filters.exact_dedup:ExactDedupStage",
    "select": "thresher.selectors.select:SelectStage",
    "grape": "thresher.selectors.grape:GrapeStage",
    "grape_select": "thresher.selectors.grape_select:GrapeSelectStage",
    "deita_complexity": "thresher.selectors.deita:DeitaComplexityStage",
    "deita_quality": "thresher.selectors.deita:DeitaQualityStage",
    "deita_score": "thresher.selectors.deita:DeitaScoreStage",
    "deita_embed": "thresher.selectors.deita_embed:DeitaEmbedStage",
    "deita_filter": "thresher.selectors.deita_filter:DeitaFilterStage",
    "clear": "thresher.selectors.clear:ClearStage",
    "clear_filter": "thresher.selectors.clear_filter:ClearFilterStage",
    "clear_correct": "thresher.selectors.clear_correct:ClearCorrectStage",
    "magpie": "thresher.generators.magpie_source:MagpieStage",
    "magpie_response": "thresher.generators.magpie_response:MagpieResponseStage",
    "magpie_tag": "thresher.selectors.magpie_tag:MagpieTagStage",
    "magpie_dedup": "thresher.filters.magpie_dedup:MagpieDedupStage",
    "near_dedup": "thresher.filters.near_dedup:NearDedupStage",
    "decontaminate": "thresher.filters.decontaminate:DecontaminateStage",
    "semantic_dedup": "thresher.filters.semantic_dedup:SemanticDedupStage",
    "kd_logprobs": "thresher.generators.kd_logprobs:KDLogprobsStage",
    "kd_generate": "thresher.generators.kd_generate:KDGenerateStage",
}


class UnknownStageError(KeyError):
    def __str__(self) -> str:  # KeyError quotes its message; this reads better
        return str(self.args[0])


def stage_class(name: str) -> type[Stage]:
    """The stage class registered under ``name``."""
    if name not in STAGES:
        raise UnknownStageError(f"unknown stage '{name}'; known stages: {', '.join(sorted(STAGES))}")
    module_name, class_name = STAGES[name].split(":")
    return getattr(importlib.import_module(module_name), class_name)


def stage_params(name: str) -> type[StageParams]:
    """The ``Params`` model of the stage registered under ``name``."""
    return stage_class(name).Params


def build_stage(entry: StageEntry) -> Stage:
    """The configured stage, ready to run."""
    return stage_class(entry.stage)(entry.params)


def source_entries(config: PipelineConfig) -> list[StageEntry]:
    """The config's source stages (they come first: :func:`check_stage_order`)."""
    return [e for e in config.stages if stage_class(e.stage).kind == "source"]


def check_stage_order(config: PipelineConfig, origin: str = "config") -> PipelineConfig:
    """Source stages (which make rows from nothing) must come before every stage that reads rows."""
    kinds = [stage_class(e.stage).kind for e in config.stages]
    for i, kind in enumerate(kinds):
        if kind == "source" and any(k != "source" for k in kinds[:i]):
            raise ConfigError(f"{origin}: stages[{i}] ({config.stages[i].stage}) makes rows from nothing; "
                              "put it before the stages that read rows")
    return config


def parse_config(data: dict[str, Any], base_dir: Path | None = None, origin: str = "config") -> PipelineConfig:
    """Validate a config mapping, stages included; relative paths are resolved against ``base_dir``."""
    return check_stage_order(validate_config(data, stage_params, base_dir, origin), origin)


def load_config(path: str | Path) -> PipelineConfig:
    """Read and validate a YAML pipeline config, stages included (a clear ``ConfigError`` on any problem)."""
    return check_stage_order(load_config_file(path, stage_params), str(path))
