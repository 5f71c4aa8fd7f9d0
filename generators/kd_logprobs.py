"""``kd_logprobs``: the teacher's top-k log-probs at every token of each row's response (teacher-forced).

Logit-level knowledge distillation (Hinton et al., 2015, "Distilling the Knowledge in a
Neural Network"; for LMs, e.g. MiniLLM / GKD) trains a student on the teacher's
distribution at each response position. This stage renders each row with the
teacher's chat template — the conversation before the final assistant turn with the
generation prompt, then the full conversation; the difference is the response as SFT
trains on it, end-of-turn tokens included — and stores, per response token, the top-k
of the teacher's raw ``log_softmax`` (temperature 1, before top-p, float32) in the
columns of :mod:`thresher.schemas.kd`, with the prompt's token ids so a student can align.

Rows are labelled, not rewritten: the labels are attributes. A row with no final
assistant turn is rejected (``kd_no_response``), and so is one whose template
rendering of the prompt is not a prefix of the full rendering (``kd_template_mismatch``:
the response could not be cut out of it), and one whose prompt alone fills the context
or ``max_tokens`` (``kd_prompt_too_long``: no response token is left to label). Backends: ``hf`` (only response positions go
through the LM head), ``vllm`` (``prompt_logprobs=k``), ``openai`` against ``vllm serve``;
a server that cannot give prompt top-k is refused with a clear error.
"""

from __future__ import annotations

from typing import Any

import pyarrow as pa
from pydantic import Field

from thresher.flows.stage import Stage, StageOutput
from thresher.generators.kd_common import KDParams, kd_summary, render_prompt, teacher_json
from thresher.schemas.kd import KD_COLUMNS, kd_table
from thresher.schemas.records import split_response
from thresher.selectors.chunked import call_in_chunks

REASON_NO_RESPONSE = "kd_no_response"
REASON_TEMPLATE = "kd_template_mismatch"
REASON_NO_ROOM = "kd_prompt_too_long"


class KDLogprobsParams(KDParams):
    max_tokens: int | None = Field(None, ge=2, description="cap on prompt + response tokens (default: the "
                                   "teacher's context); longer responses are cut and flagged kd_truncated")


class KDLogprobsStage(Stage):
    """Label every row's response with the teacher's top-k (see the module docstring)."""

    name = "kd_logprobs"
    version = "1"
    Params = KDLogprobsParams
    provides = KD_COLUMNS

    def process(self, rows: pa.Table) -> StageOutput:
        p: KDLogprobsParams = self.params
        records = rows.select(["row_id", "messages"]).to_pylist()
        if not records:
            return StageOutput()
        backend = p.load()
        rejected: list[dict[str, Any]] = []
        todo: list[tuple[str, str, str]] = []  # row_id, rendered prompt, rendered response
        for r in records:
            split = split_response(r["messages"])
            if split is None:
                rejected.append({"row_id": r["row_id"], "reason": REASON_NO_RESPONSE,
                                 "detail": "the conversation does not end with an assistant turn"})
                continue
            prompt = render_prompt(backend, split[0])
            full = backend.apply_chat_template(r["messages"], add_generation_prompt=False)
            if not full.startswith(prompt) or len(full) == len(prompt):
                rejected.append({"row_id": r["row_id"], "reason": REASON_TEMPLATE,
                                 "detail": "the chat template's rendering of the prompt is not a prefix of the "
                                           "rendering of the whole conversation"})
                continue
            todo.append((r["row_id"], prompt, full[len(prompt):]))
        results = call_in_chunks(
            todo, lambda chunk: backend.continuation_topk([t[1] for t in chunk], [t[2] for t in chunk], p.k,
                                                          p.max_tokens),
            p.chunk_size, progress="kd_logprobs: labelled")
        labelled = []
        for (row_id, _, _), result in zip(todo, results):
            if len(result.token_ids):
                labelled.append((row_id, result))
            else:
                rejected.append({"row_id": row_id, "reason": REASON_NO_ROOM, "value": float(len(result.prompt_ids)),
                                 "detail": f"the prompt alone fills the {len(result.prompt_ids)} tokens allowed"})
        table = kd_table([r for r, _ in labelled], [x for _, x in labelled], p.k,
                         teacher_json(backend, p.k, "teacher_forced"))
        return StageOutput(attributes=table, rejected=rejected)

    def summarize(self, kept: pa.Table, rejected: pa.Table) -> dict:
        return kd_summary(kept)
