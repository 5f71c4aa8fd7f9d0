"""deita's row representations for the Repr Filter: one embedding per conversation.

Liu et al., "What Makes Good Data for Alignment?" (ICLR 2024), reference code
hkust-nlp/deita (``src/deita/selection/embedder/{clm_embedder,utils,conversation}.py``):
the reference embeds a whole conversation with a causal LM (default
Mistral-7B-v0.1) as the last layer's hidden state at the last token, the
conversation rendered in the ``vicuna_v1.1`` format, tokenized with BOS and cut to
its first ``max_length = 2048`` tokens.

Two choices here, both configurable (``model``, ``format``):

- a causal LM (``hkust-nlp``'s setting: e.g. a local Mistral-7B, or the embedded
  SmolLM2 stand-in) with the vicuna rendering of :func:`vicuna_prompt`. The
  reference writes ``"</s>"`` after each assistant turn, which is LLaMA's and
  Mistral's EOS; here it is the embedding model's own EOS string (``eos`` to
  override), so the last token is an EOS for every model, as in the reference;
- a sentence-transformer (the default, ``embedded:all-minilm-l6-v2``) on the plain
  text: the turns' contents joined by newlines.

Writes ``deita_embedding`` (list<float32>, L2-normalized: the filter only uses
cosine similarity), ``deita_embedder`` (the model's identity) and
``deita_embedding_failure`` (null, or ``backend_error: ...`` / ``zero_vector``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import numpy as np
import pyarrow as pa
from pydantic import Field
from thresher.flows.stage import ModelStageParams, Stage, StageOutput, model_field, resource_knob
from thresher.schemas.model_config import ModelConfig
from thresher.selectors.chunked import call_in_chunks

DEFAULT_EMBEDDER = "embedded:all-minilm-l6-v2"
#: ``vicuna_v1.1``'s system prompt (FastChat ``conversation.py``, copied by deita)
VICUNA_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)
VICUNA_ROLES = {"user": "USER", "assistant": "ASSISTANT"}


def vicuna_prompt(messages: Sequence[dict[str, Any]], eos: str = "</s>") -> str:
    """A conversation in deita's ``vicuna_v1.1`` format (``SeparatorStyle.ADD_COLON_TWO``).

    ``system + " " + "USER: q1 ASSISTANT: a1</s>USER: q2 ASSISTANT: a2</s>"``; an
    empty message is written as ``"ROLE:"`` with no separator, as FastChat does.
    A leading system message replaces the default system prompt (the reference's
    ShareGPT inputs have none); a conversation that does not start with the user
    loses its first message, as in the reference ``preprocess``.
    """
    system = VICUNA_SYSTEM
    chat = list(messages)
    if chat and chat[0]["role"] == "system":
        system, chat = chat[0]["content"], chat[1:]
    chat = [m for m in chat if m["role"] in VICUNA_ROLES]
    if chat and chat[0]["role"] != "user":
        chat = chat[1:]
    seps = (" ", eos)
    out = system + seps[0]
    for i, message in enumerate(chat):
        role = VICUNA_ROLES[message["role"]]
        if message["content"]:
            out += f"{role}: {message['content']}{seps[i % 2]}"
        else:
            out += f"{role}:"
    return out


def plain_text(messages: Sequence[dict[str, Any]]) -> str:
    """The user and assistant turns' contents, joined by newlines (for sentence-transformers)."""
    return "\n".join(m["content"] for m in messages if m["role"] in VICUNA_ROLES)


def l2_normalize(vectors: np.ndarray) -> np.ndarray:
    """Rows divided by their float64 L2 norm, as float32 (zero rows stay zero)."""
    v = np.asarray(vectors, dtype=np.float64)
    norms = np.linalg.norm(v, axis=1, keepdims=True)
    return (v / np.where(norms > 0, norms, 1.0)).astype(np.float32)


class DeitaEmbedParams(ModelStageParams):
    model: ModelConfig = model_field(
        DEFAULT_EMBEDDER, "a sentence-transformer, or a causal LM (deita: Mistral-7B; last-token hidden state)")
    format: Literal["auto", "vicuna", "plain"] = Field(
        "auto", description="auto: vicuna for a causal LM, plain for a sentence-transformer",
    )
    max_tokens: int | None = Field(
        2048, ge=1,
        description="a causal LM sees the first max_tokens tokens (the reference's max_length); "
                    "sentence-transformers keep their own limit",
    )
    eos: str | None = Field(None, description="the vicuna end-of-turn string; default: the model's EOS")
    chunk_size: int = resource_knob(256, ge=1, description="texts per backend call")


EMBED_SCHEMA = pa.schema([
    ("row_id", pa.string()),
    ("deita_embedding", pa.list_(pa.float32())),
    ("deita_embedder", pa.string()),
    ("deita_embedding_failure", pa.string()),
])


class DeitaEmbedStage(Stage):
    """One normalized embedding per row, for the Repr Filter (per shard)."""

    name = "deita_embed"
    version = "1"
    kind = "shard"
    Params = DeitaEmbedParams
    provides = tuple(EMBED_SCHEMA.names[1:])
    intermediate = ("deita_embedding",)  # for deita_filter / semantic_dedup; output.keep_columns keeps it

    def model_config(self) -> ModelConfig:
        """The embedder's config, its context capped at ``max_tokens`` (first tokens kept)."""
        p: DeitaEmbedParams = self.params
        if p.max_tokens is None or (p.model.max_model_len and p.model.max_model_len <= p.max_tokens):
            return p.model
        return p.model.model_copy(update={"max_model_len": p.max_tokens})

    def texts(self, backend: Any, conversations: list[list[dict]]) -> list[str]:
        """Each conversation rendered for this embedder."""
        fmt = self.params.format
        if fmt == "auto":
            fmt = "vicuna" if backend.kind == "causal-lm" else "plain"
        if fmt == "plain":
            return [plain_text(c) for c in conversations]
        eos = self.params.eos or getattr(backend.tokenizer, "eos_token", None) or "</s>"
        return [vicuna_prompt(c, eos) for c in conversations]

    def process(self, rows: pa.Table) -> StageOutput:
        p: DeitaEmbedParams = self.params
        if not rows.num_rows:
            return StageOutput(attributes=EMBED_SCHEMA.empty_table())
        backend = p.load(self.model_config())
        texts = self.texts(backend, rows["messages"].to_pylist())
        vectors: list[np.ndarray | None] = [None] * len(texts)
        failures: list[str | None] = [None] * len(texts)

        def embed_chunk(chunk: list[str]) -> list[tuple[Any, str | None]]:
            return [(vec, None) for vec in backend.embed(chunk)]

        got = call_in_chunks(texts, embed_chunk, p.chunk_size, one=lambda text: self._embed_one(backend, text))
        for i, (vec, failure) in enumerate(got):
            if vec is None:
                failures[i] = failure
                continue
            vec = np.asarray(vec, dtype=np.float64)
            if not np.isfinite(vec).all() or not np.any(vec):
                failures[i] = "zero_vector" if np.isfinite(vec).all() else "non_finite"
            else:
                vectors[i] = l2_normalize(vec[None, :])[0]
        table = pa.table({
            "row_id": rows["row_id"],
            "deita_embedding": pa.array([None if v is None else v.tolist() for v in vectors], pa.list_(pa.float32())),
            "deita_embedder": pa.array([backend.identity] * len(texts), pa.string()),
            "deita_embedding_failure": pa.array(failures, pa.string()),
        }, schema=EMBED_SCHEMA)
        return StageOutput(attributes=table)

    @staticmethod
    def _embed_one(backend: Any, text: str) -> tuple[Any, str | None]:
        """(one text's embedding, None), or (None, why it failed)."""
        try:
            return backend.embed([text])[0], None
        except Exception as exc:  # noqa: BLE001 - a counted failure, not a crash
            return None, f"backend_error: {type(exc).__name__}: {str(exc)[:300]}"

    def summarize(self, kept: pa.Table, rejected: pa.Table) -> dict[str, Any]:
        if "deita_embedder" not in kept.column_names:
            return {}
        summary = {"embedder": sorted({v for v in kept["deita_embedder"].to_pylist() if v}),
                   "format": self.params.format}
        if "deita_embedding" in kept.column_names:  # the summary of a run's output never holds it
            summary["dimensions"] = sorted({len(v) for v in kept["deita_embedding"].to_pylist() if v is not None})
        return summary
