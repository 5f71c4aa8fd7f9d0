"""Magpie's source stage (``magpie``): user turns written by an aligned chat model from nothing.

Magpie (Xu et al., "Magpie: Alignment Data Synthesis from Scratch by Prompting Aligned LLMs
with Nothing", ICLR 2025; magpie-align/magpie ``exp/gen_ins.py``). The prompt is only the
pre-query template (:mod:`thresher.generators.magpie_template`); the model continues it with
a user turn (:mod:`thresher.generators.magpie`: ``n_per_call`` samples per call, temperature
1.0, top_p 1.0, stop at the end of turn and, by default, the first newline).

The stage makes ``count`` rows in tasks of ``rows_per_task`` (each a shard). Row ``i`` is
drawn by the call with seed ``seed + i - (i - first) % n_per_call`` of its task, so a task's
rows depend only on its seed range: the same config makes the same rows, and a resumed run
redraws no finished task. Every row is ``[system turn when one is configured, user turn]``
with ``parent_row_id`` null and an ``origin`` naming the stage, the model, the sampling, the
call's seed and the sample's place in it. Degenerate samples are created and rejected, with a
reason (``magpie_empty``, ``magpie_truncated``, ``magpie_role_leak``): they are counted.

``system_prompts`` (optional) is a weighted list: each call draws one with a generator seeded
by its seed (a system prompt steers the kind of instruction; it stays in the row, so the
response is written under it too).
"""

from __future__ import annotations

import logging
import random
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator

from thresher.flows.stage import SourceParams, SourceStage, SourceTask, StageOutput, model_field
from thresher.generators.magpie import REASON_EMPTY, REASON_ROLE_LEAK, REASON_TRUNCATED, sample_instructions
from thresher.generators.magpie_template import PreQuery, pre_query_template
from thresher.schemas.model_config import ModelConfig
from thresher.schemas.records import make_created_record

log = logging.getLogger(__name__)

DEFAULT_MODEL = "embedded:smollm2-135m-instruct"
REASON_DETAILS = {
    REASON_EMPTY: "the model wrote an empty user turn",
    REASON_TRUNCATED: "cut at max_tokens before the user turn ended",
    REASON_ROLE_LEAK: "the sample carries the chat's turn markup (the model wrote past the user turn)",
}


class WeightedPrompt(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    text: str
    weight: float = Field(1.0, gt=0)


class MagpieParams(SourceParams):
    model: ModelConfig = model_field(DEFAULT_MODEL, "the aligned chat model that writes the instructions")
    n_per_call: int = Field(16, ge=1, description="samples per call of the one prompt (the prefix is shared)")
    temperature: float = Field(1.0, ge=0, description="Magpie: 1.0")
    top_p: float = Field(1.0, gt=0, le=1, description="Magpie: 1.0")
    max_tokens: int = Field(128, ge=1, description="longest instruction; longer samples are rejected (magpie_truncated)")
    stop_at_newline: bool = Field(True, description="end the instruction at its first newline (as the reference)")
    system_prompts: list[WeightedPrompt] = Field(
        default_factory=list, description="optional system prompts, each call draws one by weight")

    @model_validator(mode="after")
    def _distinct_prompts(self) -> "MagpieParams":
        texts = [p.text for p in self.system_prompts]
        if len(set(texts)) != len(texts):
            raise ValueError("system_prompts: each text once (give it a larger weight instead)")
        return self


def chat_tokenizer(backend: Any) -> Any:
    """The backend's local tokenizer (its chat template makes the pre-query), or a clear error."""
    try:
        return backend.tokenizer
    except Exception as err:  # an openai backend with no local tokenizer files
        raise ValueError(
            f"magpie: {backend.identity} has no local tokenizer, so its chat template is unknown ({err}). "
            "Magpie needs raw-text completions from a server that takes them (vllm serve, llama.cpp) and "
            "the model's tokenizer files (model.tokenizer: a local folder); hosted chat APIs cannot do "
            "Magpie: they apply their own template and never continue a raw prefix") from None


class MagpieStage(SourceStage):
    """Magpie instructions from the pre-query template alone (see the module docstring)."""

    name = "magpie"
    version = "1"
    Params = MagpieParams

    def system_prompt_for(self, call_seed: int) -> str | None:
        prompts = self.params.system_prompts
        if not prompts:
            return None
        rng = random.Random(call_seed)
        return rng.choices([p.text for p in prompts], weights=[p.weight for p in prompts])[0]

    def create(self, task: SourceTask) -> StageOutput:
        p: MagpieParams = self.params
        backend = p.load()
        tokenizer = chat_tokenizer(backend)
        pres: dict[str | None, PreQuery] = {}
        sampling = {"temperature": p.temperature, "top_p": p.top_p, "max_tokens": p.max_tokens,
                    "n_per_call": p.n_per_call, "stop_at_newline": p.stop_at_newline}
        created, rejected = [], []
        for start in range(0, task.count, p.n_per_call):
            n = min(p.n_per_call, task.count - start)
            call_seed = p.seed + task.first + start
            system = self.system_prompt_for(call_seed)
            if system not in pres:
                pres[system] = pre_query_template(tokenizer, system)
            samples = sample_instructions(backend, pres[system], n, n, call_seed, temperature=p.temperature,
                                          top_p=p.top_p, max_tokens=p.max_tokens, stop_at_newline=p.stop_at_newline)
            for sample in samples:
                messages = [{"role": "user", "content": sample.text}]
                if system is not None:
                    messages.insert(0, {"role": "system", "content": system})
                origin = self.origin(backend.identity, sampling, seed=call_seed, sample=sample.index)
                record = make_created_record(messages, origin, occurrence=task.first + start + sample.index)
                created.append(record)
                if sample.reason is not None:
                    rejected.append({"row_id": record["row_id"], "reason": sample.reason,
                                     "detail": REASON_DETAILS[sample.reason], "value": float(sample.n_tokens)})
            log.info("magpie task %d: %d/%d instructions sampled", task.index, start + n, task.count)
        return StageOutput(created=created, rejected=rejected)

    def summarize(self, kept, rejected) -> dict[str, Any]:
        p: MagpieParams = self.params
        reasons: dict[str, int] = {}
        for reason in rejected["reason"].to_pylist():
            reasons[reason] = reasons.get(reason, 0) + 1
        return {"model": p.model.name, "instructions sampled": p.count,
                "rejected samples by reason": reasons or "none"}
