"""What the two KD stages share: parameters, the teacher's metadata, the rendering, the summary.

Both stages label responses with the teacher's top-k log-probs (see
:mod:`thresher.schemas.kd` for the columns): ``kd_logprobs`` teacher-forces the
responses a row already has, ``kd_generate`` has the teacher write them.
"""

from __future__ import annotations

import json
from typing import Any

import pyarrow as pa
from pydantic import Field

from thresher.flows.stage import ModelStageParams, model_field, resource_knob
from thresher.generators.tokenizer_fingerprint import chat_template_digest, tokenizer_fingerprint
from thresher.schemas.kd import kd_metadata, teachers_of
from thresher.schemas.model_config import ModelConfig

#: the most top-k entries per position a stage may ask for (vLLM's engine here allows 64)
MAX_K = 256


class KDParams(ModelStageParams):
    model: ModelConfig = model_field("embedded:smollm2-135m-instruct", "the teacher")
    k: int = Field(20, ge=1, le=MAX_K, description="top-k entries per response token (vLLM's default max_logprobs is 20)")
    chunk_size: int = resource_knob(32, ge=1, description="rows per model call")


#: model identity -> its tokenizer's fingerprint: computed once per worker process, not per task
#: (digesting a 262k-entry vocabulary and its merges takes ~1.7 s)
_FINGERPRINTS: dict[str, dict[str, Any]] = {}


def teacher_json(backend: Any, k: int, mode: str, sampling: dict[str, Any] | None = None) -> str:
    """The ``kd_teacher`` value: identity, tokenizer fingerprint, template digest, k, mode."""
    tok = backend.tokenizer
    if backend.identity not in _FINGERPRINTS:
        _FINGERPRINTS[backend.identity] = tokenizer_fingerprint(tok)
    meta = kd_metadata(teacher=backend.identity, tokenizer=_FINGERPRINTS[backend.identity],
                       chat_template_digest=chat_template_digest(tok), k=k, mode=mode, sampling=sampling)
    return json.dumps(meta, sort_keys=True)


def render_prompt(backend: Any, messages: list[dict[str, str]]) -> str:
    """The conversation before the response, through the chat template, up to the assistant's turn."""
    return backend.apply_chat_template(messages, add_generation_prompt=True)


def kd_summary(kept: pa.Table) -> dict[str, Any]:
    """Manifest figures: rows and tokens labelled, and each teacher's metadata (fingerprint digest only)."""
    if "kd_token_ids" not in kept.column_names:
        return {}
    lengths = kept["kd_token_ids"].combine_chunks()
    labelled = lengths.drop_null()
    tokens = int(len(labelled.flatten())) if len(labelled) else 0
    truncated = int(kept["kd_truncated"].drop_null().to_numpy(zero_copy_only=False).sum())
    teachers = [{**t, "tokenizer": {"digest": t["tokenizer"]["digest"], "vocab_size": t["tokenizer"]["vocab_size"]}}
                for t in teachers_of(kept)]
    return {"rows labelled": len(labelled), "response tokens labelled": tokens,
            "responses cut to the context": truncated, "teachers": teachers}
