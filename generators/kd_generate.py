"""``kd_generate``: the teacher writes each row's response and its top-k is kept at every position.

Sequence-level KD (Kim & Rush, 2016, "Sequence-Level Knowledge Distillation": train on
the teacher's outputs) and logit-level KD (Hinton et al., 2015) in one pass: the
teacher answers the conversation before the row's final assistant turn (all of it when
there is none) through its chat template, with the given sampling parameters, and the
top-k of its raw ``log_softmax`` (temperature 1, before top-p, float32) at each
generated position is stored in the columns of :mod:`thresher.schemas.kd`. The stored
``kd_token_ids`` are the ids the teacher generated (an end-of-turn token it stopped at
included), so the labels describe exactly the sequence it wrote.

Rows are immutable: each answer is a new row ``[..., user, assistant]`` whose
``parent_row_id`` is the row it answers and whose ``origin`` names the stage, the
teacher and the sampling; the old row is replaced (``OUT/replaced/``). An empty answer
is rejected (``kd_empty_response``, the old row).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa
from pydantic import Field

from thresher.flows.stage import Stage, StageOutput
from thresher.generators.backend_common import PromptEncoder
from thresher.generators.base import ContinuationTopK, SamplingParams
from thresher.generators.kd_common import KDParams, kd_summary, render_prompt, teacher_json
from thresher.schemas.kd import KD_COLUMNS, kd_table
from thresher.schemas.records import RECORD_SCHEMA, make_created_record, prompt_messages
from thresher.selectors.chunked import call_in_chunks

REASON_EMPTY = "kd_empty_response"


class KDGenerateParams(KDParams):
    temperature: float = Field(0.0, ge=0, description="0: greedy")
    top_p: float = Field(1.0, gt=0, le=1)
    max_tokens: int = Field(512, ge=1, description="longest response; longer ones are cut and flagged kd_truncated")
    seed: int = Field(0, ge=0, description="sampling seed when temperature > 0")


class KDGenerateStage(Stage):
    """The teacher answers every row, with its top-k recorded (see the module docstring)."""

    name = "kd_generate"
    version = "1"
    Params = KDGenerateParams
    provides = KD_COLUMNS

    def process(self, rows: pa.Table) -> StageOutput:
        p: KDGenerateParams = self.params
        records = rows.select(RECORD_SCHEMA.names).to_pylist()
        if not records:
            return StageOutput()
        backend = p.load()
        sampling = {"temperature": p.temperature, "top_p": p.top_p, "max_tokens": p.max_tokens, "seed": p.seed}
        params = SamplingParams(n=1, temperature=p.temperature, top_p=p.top_p, max_tokens=p.max_tokens,
                                seed=p.seed, top_logprobs=p.k)
        prompts = [render_prompt(backend, prompt_messages(r["messages"])) for r in records]
        generations = call_in_chunks(prompts, lambda chunk: backend.generate(chunk, params), p.chunk_size,
                                     progress="kd_generate: answered")
        prompt_ids = PromptEncoder(backend.tokenizer).encode_prompts(prompts)
        origin = self.origin(backend.identity, sampling, top_logprobs=p.k)
        created, replaced, rejected, labels, label_ids = [], [], [], [], []
        for parent, generation, ids in zip(records, generations, prompt_ids):
            completion = generation.completions[0]
            text = completion.text.strip()
            if not text:
                rejected.append({"row_id": parent["row_id"], "reason": REASON_EMPTY,
                                 "detail": "the teacher wrote an empty response"})
                continue
            row = make_created_record([*prompt_messages(parent["messages"]), {"role": "assistant", "content": text}],
                                      origin, parent=parent, candidate=p.model.name)
            created.append(row)
            replaced.append(parent["row_id"])
            label_ids.append(row["row_id"])
            labels.append(ContinuationTopK(
                prompt_ids=np.asarray(ids, np.int32), token_ids=np.asarray(completion.token_ids, np.int32),
                topk=completion.top_logprobs, truncated=completion.finish_reason == "length"))
        table = kd_table(label_ids, labels, p.k, teacher_json(backend, p.k, "generated", sampling))
        return StageOutput(attributes=table, created=created, replaced=replaced, rejected=rejected)

    def summarize(self, kept: pa.Table, rejected: pa.Table) -> dict[str, Any]:
        return kd_summary(kept)
