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
- ``created``: new rows (:func:`thresher.schemas.records.make_created_record`, with
  ``parent_row_id`` and ``origin``). Rows are immutable: a stage that writes new
  content for a row (a response, a corrected response) creates a row and lists the
  old one in ``replaced``. A created row takes its parent's place in corpus order
  (right after it when the parent stays); ``attributes`` and ``rejected`` may name
  created rows.

A global stage may have a *per-shard step* (``maps_shards = True``, :meth:`Stage.map_shard`):
it runs on every shard in parallel on the workers and returns a small table (one row per
input row: ``row_id`` and what the global step needs, e.g. MinHash signatures), and the
global :meth:`Stage.process` then gets the concatenation of those tables, never whole rows.

A *source* stage (``kind = "source"``, :class:`SourceStage`) makes rows from nothing
(Magpie's instructions): the run splits its ``count`` rows into tasks with their own
seed ranges (:class:`SourceTask`), and each task's rows become a shard.

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
from thresher.schemas.records import REJECTION_FIELDS, conform, records_table

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
    """What a stage produced for its input rows (see the module docstring)."""

    attributes: pa.Table | None = None
    rejected: list[dict[str, Any]] = field(default_factory=list)
    created: list[dict[str, Any]] = field(default_factory=list)
    replaced: list[str] = field(default_factory=list)

    def created_table(self) -> pa.Table:
        return records_table(self.created)

    def replaced_table(self) -> pa.Table:
        return pa.table({"row_id": pa.array(self.replaced, pa.string())})

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
    kind: ClassVar[Literal["shard", "global", "source"]] = "shard"
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

    def origin(self, model: str | None, sampling: dict[str, Any], **extra: Any) -> dict[str, Any]:
        """The ``origin`` of a row this stage creates: stage, version, model identity, sampling."""
        return {"stage": self.name, "version": self.version, "model": model, "sampling": sampling, **extra}

    #: the columns a global stage reads besides ``row_id`` (None: every column of every row); the
    #: run hands it only those, so the corpus it holds is as narrow as it needs
    reads: ClassVar[tuple[str, ...] | None] = None
    #: a global stage with a per-shard step: :meth:`map_shard` runs on every shard (in parallel, on
    #: the workers) and :meth:`process` gets the concatenation of its small tables, never whole rows
    maps_shards: ClassVar[bool] = False
    #: wide columns the stage writes for later stages (embeddings): left out of ``attributes/``
    #: unless the config's ``output.keep_columns`` names them
    intermediate: ClassVar[tuple[str, ...]] = ()

    def map_shard(self, rows: pa.Table) -> pa.Table:
        """A global stage's per-shard step (when ``maps_shards``): one row per input row, keyed by
        ``row_id``, holding only what :meth:`process` needs (e.g. MinHash signatures)."""
        raise NotImplementedError(f"stage '{self.name}' has no per-shard step")

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


@dataclass(frozen=True)
class SourceTask:
    """One task of a source stage: ``count`` rows, the ``first`` of which is row ``first`` of the stage.

    Row ``i`` of the stage draws with seed ``params.seed + i``, so tasks own disjoint
    seed ranges: a task's rows do not depend on which other tasks ran, or how often.
    """

    index: int
    first: int
    count: int


class SourceParams(ModelStageParams):
    """Parameters every source stage has: how many rows, in tasks of how many, from which seed."""

    count: int = Field(ge=1, description="rows to make (before the stage's own rejections)")
    rows_per_task: int = Field(64, ge=1, description="rows per task (a task's rows become one shard)")
    seed: int = Field(0, ge=0, description="row i draws with seed + i: same seed, same rows")


class SourceStage(Stage):
    """A stage that makes rows from nothing; :meth:`create` makes one task's rows."""

    kind = "source"
    Params = SourceParams

    def tasks(self) -> list[SourceTask]:
        p: SourceParams = self.params
        return [SourceTask(index=i, first=first, count=min(p.rows_per_task, p.count - first))
                for i, first in enumerate(range(0, p.count, p.rows_per_task))]

    def task_identity(self, task: SourceTask) -> dict[str, Any]:
        """What decides one task's rows: the stage's identity but ``count``, and the task's seed range.

        Raising ``count`` keeps every finished task (its key does not change)."""
        identity = self.identity()
        params = {k: v for k, v in identity["params"].items() if k != "count"}
        return {**identity, "params": params, "first": task.first, "rows": task.count}

    def process(self, rows: pa.Table) -> StageOutput:
        raise TypeError(f"'{self.name}' is a source stage: it makes rows with create(task), it reads none")

    @abstractmethod
    def create(self, task: SourceTask) -> StageOutput:
        """The rows of one task, as ``created`` (and ``rejected`` for created rows it rejects)."""
