"""Magpie's responses (``magpie_response``): the model answers each instruction, as a new row.

Magpie (Xu et al., ICLR 2025; magpie-align/magpie ``exp/gen_res.py``): the instruction goes
through the model's full chat template and the model writes the assistant turn, greedy by
default. Rows are immutable, so each answer is a *new* row, ``[..., user, assistant]``, whose
``parent_row_id`` is the instruction row and whose ``origin`` names the stage, the model and
the sampling; the instruction row is replaced (``OUT/replaced/``). A row that already ends
with an assistant turn has nothing to answer and passes on as it is.

An empty answer is rejected (``magpie_empty_response``, the instruction row). Attributes of
each new row: ``magpie_response_tokens`` (what a budget of the longest responses ranks),
``magpie_response_truncated`` (1 when cut at ``max_tokens``) and
``magpie_instruction_ends_with_colon`` (1 for an instruction ending in ``:``, which the
reference filters out).
"""

from __future__ import annotations

import pyarrow as pa
from pydantic import Field

from thresher.flows.stage import ModelStageParams, Stage, StageOutput, model_field, resource_knob
from thresher.generators.base import SamplingParams
from thresher.schemas.model_config import ModelConfig
from thresher.schemas.records import RECORD_SCHEMA, first_user_turn, make_created_record
from thresher.selectors.chunked import call_in_chunks

REASON_EMPTY_RESPONSE = "magpie_empty_response"


class MagpieResponseParams(ModelStageParams):
    model: ModelConfig = model_field("embedded:smollm2-135m-instruct", "the chat model that answers")
    temperature: float = Field(0.0, ge=0, description="0: greedy (Magpie's default for responses)")
    top_p: float = Field(1.0, gt=0, le=1)
    max_tokens: int = Field(512, ge=1, description="longest response; longer ones are cut and flagged")
    seed: int = Field(0, ge=0, description="sampling seed when temperature > 0")
    chunk_size: int = resource_knob(32, ge=1, description="conversations per model call")


class MagpieResponseStage(Stage):
    """Answer every row that ends with a user turn (see the module docstring)."""

    name = "magpie_response"
    version = "1"
    Params = MagpieResponseParams
    provides = ("magpie_response_tokens", "magpie_response_truncated", "magpie_instruction_ends_with_colon")

    def process(self, rows: pa.Table) -> StageOutput:
        p: MagpieResponseParams = self.params
        records = rows.select(RECORD_SCHEMA.names).to_pylist()
        todo = [r for r in records if r["messages"] and r["messages"][-1]["role"] == "user"]
        if not todo:
            return StageOutput()
        backend = p.load()
        params = SamplingParams(n=1, temperature=p.temperature, top_p=p.top_p, max_tokens=p.max_tokens, seed=p.seed)
        sampling = {"temperature": p.temperature, "top_p": p.top_p, "max_tokens": p.max_tokens, "seed": p.seed}
        generations = call_in_chunks([r["messages"] for r in todo], lambda chunk: backend.chat(chunk, params),
                                     p.chunk_size, progress="magpie_response: answered")
        origin = self.origin(backend.identity, sampling)
        created, replaced, rejected, attributes = [], [], [], []
        for parent, generation in zip(todo, generations):
            completion = generation.completions[0]
            text = completion.text.strip()
            if not text:
                rejected.append({"row_id": parent["row_id"], "reason": REASON_EMPTY_RESPONSE,
                                 "detail": "the model wrote an empty response"})
                continue
            row = make_created_record([*parent["messages"], {"role": "assistant", "content": text}], origin,
                                      parent=parent, candidate=p.model.name)
            created.append(row)
            replaced.append(parent["row_id"])
            attributes.append({"row_id": row["row_id"], "magpie_response_tokens": len(completion.token_ids),
                               "magpie_response_truncated": int(completion.finish_reason == "length"),
                               "magpie_instruction_ends_with_colon":
                                   int(first_user_turn(parent["messages"]).rstrip().endswith(":"))})
        table = pa.Table.from_pylist(attributes, schema=pa.schema([
            ("row_id", pa.string()), ("magpie_response_tokens", pa.int64()),
            ("magpie_response_truncated", pa.int64()), ("magpie_instruction_ends_with_colon", pa.int64())]))
        return StageOutput(attributes=table, created=created, replaced=replaced, rejected=rejected)

    def summarize(self, kept: pa.Table, rejected: pa.Table) -> dict:
        if "magpie_response_tokens" not in kept.column_names:
            return {}
        tokens = [t for t in kept["magpie_response_tokens"].to_pylist() if t is not None]
        truncated = sum(t or 0 for t in kept["magpie_response_truncated"].to_pylist())
        return {"responder": self.params.model.name, "responses in the output": len(tokens),
                "response tokens (min / mean / max)":
                    f"{min(tokens)} / {sum(tokens) / len(tokens):.1f} / {max(tokens)}" if tokens else "none",
                "responses cut at max_tokens": truncated}
