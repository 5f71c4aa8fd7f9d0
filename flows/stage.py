"""What a stage is: a small typed unit with declared columns, run per shard or globally.

A stage reads the surviving rows of a shard (``kind = "shard"``) or of the whole
corpus (``kind = "global"``) as one Arrow table — the canonical columns plus every
attribute column earlier stages wrote — and returns a :class:`StageOutput`:

- ``attributes``: a table keyed by ``row_id`` with the columns in ``provides``.
  Scorers never rewrite rows; they add attributes.
- ``rejected``: the rows this stage removes, one dict each with the keys of
  :data:`STAGE_REJECTED_SCHEMA`: ``row_id`` and ``reason``, and optionally
  ``code`` (a machine-readable sub-reason), ``detail`` (words, for people only),
  ``value`` (the number that decided it) and ``kept_row_id`` (the row it lost to).
  Anything code reads back goes in a typed column, never in ``detail``.

Adding a stage is one small module: subclass :class:`Stage`, give it a
``Params`` model (:class:`ModelStageParams` when it runs a model), and name it in
:mod:`thresher.flows.registry`.
Params fields marked ``resource_knob()`` (batch sizes, devices, resources) stay
out of cache keys; every other field is semantic and enters them.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import pyarrow as pa
from pydantic import BaseModel, ConfigDict, Field
from pydantic_core import PydanticUndefined

from thresher.schemas.model_config import ModelConfig
from thresher.schemas.records import REJECTION_FIELDS, conform

#: what a stage's ``rejected`` rows hold (the run adds source, candidate, stage and raw text)
STAGE_REJECTED_SCHEMA = pa.schema([pa.field("row_id", pa.string()), *REJECTION_FIELDS])


def resource_knob(default: Any = PydanticUndefined, **kwargs: Any) -> Any:
    """A params field that tunes speed or placement, never results: kept out of cache keys."""
    return Field(default, json_schema_extra={"resource": True}, **kwargs)


class StageParams(BaseModel):
    """Base for every stage's parameters: unknown keys are errors."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    resources: dict[str, float] = resource_knob(
        default_factory=dict,
        description="Dask worker resources each task of this stage needs, e.g. {GPU: 1}",
    )
    retries: int = resource_knob(default=2, ge=0, description="task retries on failure")

    def semantic(self) -> dict[str, Any]:
        """The parameters that change results: these enter the cache key."""
        out: dict[str, Any] = {}
        for name, info in type(self).model_fields.items():
            extra = info.json_schema_extra if isinstance(info.json_schema_extra, dict) else {}
            if extra.get("resource"):
                continue
            value = getattr(self, name)
            out[name] = _semantic_value(value)
        return out


def model_field(default: str, description: str) -> Any:
    """A params field naming a model (a :class:`ModelConfig`), ``default`` when the config gives none."""
    return Field(default_factory=lambda: ModelConfig(name=default), description=description)


class ModelStageParams(StageParams):
    """Base for the parameters of a stage that runs a model: ``model`` and its request cache.

    Subclasses redeclare ``model`` with :func:`model_field` (their default and
    description). The request-cache fields never change results, so they stay out
    of cache keys.
    """

    model: ModelConfig = Field(description="the model this stage runs")
    request_cache: bool = resource_knob(True, description="reuse model results from the on-disk request cache")
    request_cache_path: str | None = resource_knob(
        None, description="request cache file (default $THRESHER_CACHE_DIR/requests.sqlite)")

    def load(self, model: ModelConfig | None = None) -> Any:
        """The backend for ``model`` (default: this stage's), through the request cache when it is on."""
        from thresher.generators.registry import load_model  # torch only where a model runs

        return load_model(model or self.model, cache=self.request_cache, cache_path=self.request_cache_path)


def _semantic_value(value: Any) -> Any:
    if isinstance(value, ModelConfig):
        return value.semantic_fields()
    if isinstance(value, StageParams):
        return value.semantic()
    if isinstance(value, BaseModel):
        return value.model_dump(mode="json")
    if isinstance(value, (list, tuple)):
        return [_semantic_value(v) for v in value]
    if isinstance(value, dict):
        return {k: _semantic_value(v) for k, v in value.items()}
    return value


@dataclass
class StageOutput:
    """What a stage produced for its input rows."""

    attributes: pa.Table | None = None
    rejected: list[dict[str, Any]] = field(default_factory=list)

    def rejected_table(self) -> pa.Table:
        """``rejected`` as a table of :data:`STAGE_REJECTED_SCHEMA` (an unknown key is an error)."""
        for r in self.rejected:
            unknown = set(r) - set(STAGE_REJECTED_SCHEMA.names)
            if unknown:
                raise KeyError(f"a rejected row has keys {sorted(unknown)} that are not rejection columns "
                               f"({', '.join(STAGE_REJECTED_SCHEMA.names)})")
        return pa.Table.from_pylist([{"detail": "", **r} for r in self.rejected], schema=STAGE_REJECTED_SCHEMA)


def conform_rejected(table: pa.Table) -> pa.Table:
    """A stored stage-rejected table in :data:`STAGE_REJECTED_SCHEMA` (columns added since then read as null)."""
    return conform(table, STAGE_REJECTED_SCHEMA)


class Stage(ABC):
    """Base class. Subclasses set the class attributes and implement :meth:`process`."""

    name: ClassVar[str]
    version: ClassVar[str] = "1"
    kind: ClassVar[Literal["shard", "global"]] = "shard"
    Params: ClassVar[type[StageParams]] = StageParams
    #: attribute columns this stage needs from earlier stages
    requires: ClassVar[tuple[str, ...]] = ()
    #: attribute columns this stage writes
    provides: ClassVar[tuple[str, ...]] = ()

    def __init__(self, params: StageParams | None = None):
        self.params = params if params is not None else self.Params()

    def identity(self) -> dict[str, Any]:
        """Everything that decides this stage's results (enters the cache key)."""
        return {"stage": self.name, "version": self.version, "params": self.params.semantic()}

    @abstractmethod
    def process(self, rows: pa.Table) -> StageOutput:
        """Score, filter or select ``rows``; return attributes and/or rejections."""

    def finalize_output(self, kept: pa.Table) -> pa.Table:
        """The final output rows as the writer should write them (default: unchanged).

        Stages never rewrite rows while the pipeline runs (their results are
        attributes); a stage whose result *is* a rewrite, like CLEAR's
        Auto-Correct, applies it here, once, on the joined output table.
        """
        return kept

    def summarize(self, kept: pa.Table, rejected: pa.Table) -> dict[str, Any]:
        """Figures for the manifest and report once the run is over (optional).

        ``kept`` is the final output rows with all attributes; ``rejected`` is the
        rows this stage rejected as ``OUT/rejected`` holds them (``row_id, source,
        source_row, candidate``, the rejection columns, ``raw``). Read the typed
        columns (``code``, ``value``, ``kept_row_id``), never ``detail``.
        """
        return {}

    def check_columns(self, rows: pa.Table) -> None:
        missing = [c for c in self.requires if c not in rows.column_names]
        if missing:
            raise ValueError(
                f"stage '{self.name}' needs the attribute columns {missing}; "
                "add the stage that writes them earlier in the pipeline"
            )
