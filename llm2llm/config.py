"""The LLM2LLM loop's configuration: its shape as pydantic models, loaded from YAML.

Example (``examples/llm2llm_gsm8k.yaml`` is the full one)::

    name: llm2llm-gsm8k
    out: ../llm2llm-out
    seeds: {inputs: [../../shared/data/gsm8k/train.jsonl], limit: 32}
    held_out: {inputs: [../../shared/data/gsm8k/test.jsonl], limit: 100}
    student: embedded:gemma-3-270m
    teacher: {model: embedded:smollm2-135m-instruct, m: 1}
    iterations: 2
    grader: gsm8k
    trainer: {epochs: 3, learning_rate: 2.0e-5}

An unknown key or a wrong type is a :class:`~thresher.schemas.config.ConfigError` naming the key
path, as for pipeline configs; relative paths resolve against the config file's folder.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from thresher.llm2llm.graders import GraderError, make_grader
from thresher.llm2llm.novelty import HELD_OUT_THRESHOLD, NEAR_COPY_THRESHOLD
from thresher.llm2llm.trainer import TrainerError, trainer_config
from thresher.schemas.config import ConfigError, _explain, read_yaml_file
from thresher.schemas.formats import FORMATS
from thresher.schemas.model_config import ModelConfig
from thresher.schemas.secrets import secret_key_paths


class ExamplesConfig(BaseModel):
    """Where a set of examples (the seeds, the held-out set) comes from: files read as ``thresher
    ingest`` reads them (unreadable rows quarantined), then an optional seeded sample."""

    model_config = ConfigDict(extra="forbid")
    inputs: list[str] = Field(min_length=1, description="files, globs or folders")
    format: str = Field("auto", description="auto, or one of the reader formats")
    limit: int | None = Field(None, ge=1, description="sample this many rows (seeded); None: all of them")
    sample_seed: int = Field(1, description="the seed of that sample")
    max_row_bytes: int = Field(1_000_000, ge=1)

    @field_validator("format")
    @classmethod
    def _known_format(cls, value: str) -> str:
        if value != "auto" and value not in FORMATS:
            raise ValueError(f"unknown format '{value}'; choose auto or one of {sorted(FORMATS)}")
        return value


class TeacherConfig(BaseModel):
    """The teacher: which model, how many new examples per wrong seed, how it samples."""

    model_config = ConfigDict(extra="forbid")
    model: ModelConfig
    m: int = Field(1, ge=1, description="new examples asked for per wrong seed per iteration (reference: 1)")
    temperature: float = Field(1.0, ge=0, description="the reference's 1.0")
    top_p: float = Field(1.0, gt=0, le=1)
    max_tokens: int = Field(512, ge=16)
    stop: list[str] = Field(default_factory=list, description="stop strings, e.g. ['\\n\\n'] with m: 1: the reply "
                            "ends after its item instead of running on to max_tokens (a small teacher writes on)")
    max_retries: int = Field(2, ge=0, description="more requests for a wrong seed whose reply gave fewer than m "
                                                  "accepted examples (the reference retries without end)")
    show_student_answer: bool = Field(False, description="show the teacher the student's wrong answer "
                                                         "(the reference does not)")
    response_prefix: str | None = Field(None, description="make each reply begin with this text, e.g. "
                                        "'1. Question:' (helps a small teacher keep the format; off in the reference)")
    require_number: bool = Field(True, description="the final answer after '####' must be a number")


class EvaluationConfig(BaseModel):
    """How the student answers the seeds and the held-out set."""

    model_config = ConfigDict(extra="forbid")
    mode: Literal["greedy", "sampled"] = Field(
        "greedy", description="greedy; or sampled, the reference's (temperature 0.7, top_p 0.9)")
    temperature: float = Field(0.7, gt=0, description="sampled mode only")
    top_p: float = Field(0.9, gt=0, le=1, description="sampled mode only")
    max_tokens: int = Field(256, ge=1, description="new tokens per answer (the reference: 100)")
    seed: int = 0


class LLM2LLMConfig(BaseModel):
    """One LLM2LLM loop (see :mod:`thresher.flows.llm2llm`)."""

    model_config = ConfigDict(extra="forbid")
    name: str = "llm2llm"
    out: str | None = None
    cache_dir: str | None = Field(None, description="work store; default <out>/.thresher")
    seeds: ExamplesConfig
    held_out: ExamplesConfig | None = None
    student: ModelConfig = Field(description="the base model trained every iteration; its backend (hf or vllm) "
                                             "and knobs also serve the trained checkpoint's evaluation")
    teacher: TeacherConfig
    iterations: int = Field(10, ge=1, description="the reference's 10")
    grader: str | dict[str, Any] = "gsm8k"
    trainer: dict[str, Any] = Field(default_factory=dict, description="TRL SFTTrainer settings, or {command: ...}")
    evaluation: EvaluationConfig = Field(default_factory=EvaluationConfig)
    keep_checkpoints: bool = Field(True, description="false: delete each iteration's student once evaluated")
    near_copy_threshold: float = Field(NEAR_COPY_THRESHOLD, gt=0, le=1, description="ROUGE-L F1 above which an "
                                       "augmentation copies a seed or an earlier augmentation (reference: 0.95)")
    held_out_threshold: float = Field(HELD_OUT_THRESHOLD, gt=0, le=1,
                                      description="ROUGE-L F1 above which an augmentation overlaps a held-out question")
    seed: int = Field(0, description="the teacher's sampling seeds derive from it")
    figures: bool = Field(True, description="report.md's accuracy figure")

    @field_validator("grader")
    @classmethod
    def _known_grader(cls, value: Any) -> Any:
        try:
            make_grader(value)
        except GraderError as err:
            raise ValueError(str(err)) from None
        return value

    @field_validator("trainer")
    @classmethod
    def _valid_trainer(cls, value: dict[str, Any]) -> dict[str, Any]:
        try:
            trainer_config(value)
        except TrainerError as err:
            raise ValueError(str(err)) from None
        return value

    @field_validator("student")
    @classmethod
    def _trainable_student(cls, value: ModelConfig) -> ModelConfig:
        if value.backend == "openai":
            raise ValueError("the student is trained here and its checkpoint evaluated in-process: "
                             "use the hf or vllm backend (the teacher may be an openai-compatible server)")
        return value

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")


def _resolve(path: str, base: Path) -> str:
    p = Path(path).expanduser()
    return str(p if p.is_absolute() else (base / p).resolve())


def _resolve_model(model: ModelConfig, base: Path) -> None:
    """A student or teacher named by a relative folder path that exists there is resolved to it."""
    candidate = base / model.name
    if not model.name.startswith("embedded:") and not Path(model.name).is_absolute() and candidate.is_dir():
        model.name = str(candidate.resolve())


def validate_llm2llm_config(data: Any, base_dir: Path | None = None, origin: str = "config") -> LLM2LLMConfig:
    """Validate a loop config mapping; relative paths resolve against ``base_dir``."""
    if not isinstance(data, dict):
        raise ConfigError(f"{origin}: the top level must be a mapping of keys")
    secret = secret_key_paths(data)
    if secret:
        raise ConfigError(f"{origin}: {secret[0]}: a key in a config is refused (it is copied into the manifest); "
                          "put it in an environment variable and name it with 'api_key_env'")
    try:
        config = LLM2LLMConfig(**data)
    except ValidationError as err:
        raise ConfigError(f"{origin}: {_explain(err)}") from None
    if base_dir is not None:
        for examples in (config.seeds, config.held_out):
            if examples is not None:
                examples.inputs = [_resolve(p, base_dir) for p in examples.inputs]
        for attr in ("out", "cache_dir"):
            if getattr(config, attr):
                setattr(config, attr, _resolve(getattr(config, attr), base_dir))
        _resolve_model(config.student, base_dir)
        _resolve_model(config.teacher.model, base_dir)
    return config


def load_llm2llm_config(path: str | Path) -> LLM2LLMConfig:
    """Read and validate a YAML loop config (a clear :class:`ConfigError` on any problem)."""
    data = read_yaml_file(path)
    return validate_llm2llm_config(data, base_dir=Path(path).resolve().parent, origin=str(path))
