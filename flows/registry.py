"""Every stage a pipeline config can name, as ``name -> "module:Class"``.

Modules are imported only when a config names their stage, so a CPU-only
pipeline never imports torch. To add a stage: write its module, add one line here.
"""

from __future__ import annotations

import importlib

from thresher.flows.stage import Stage

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
