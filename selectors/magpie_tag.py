"""Magpie's tags as a stage: each row's instruction tagged by a chat model (``magpie_tag``).

Magpie (Xu et al., ICLR 2025; magpie-align/magpie ``exp/unitag.py``): the instruction (the
row's first user turn) is tagged for ``input_quality``, ``difficulty`` and
``task_category`` by a chat model answering the reference's prompt contracts
(:mod:`thresher.generators.magpie_tags`: the JSON prefilled with ``{``, temperature 0).

Attribute columns, for every tag asked for (``tags``): ``magpie_<tag>`` (the label, null
only when the tag failed) and ``magpie_<tag>_failure`` (null, or ``tag_unparsable`` /
``tag_missing_field`` / ``tag_label_invalid``; ``language_undetected`` for ``language``,
which the lingua library gives as an ISO 639-1 code, no model): a row never has neither. ``task_category``
also writes ``magpie_other_tags``; ``input_quality`` and ``difficulty`` also write
``magpie_<tag>_rank``, 1 to 5 in label order, so ``select`` can say
``magpie_input_quality_rank >= 4`` (good or better). ``magpie_tagger`` names the model.

``reward`` needs a reward model (``reward_model``: a local sequence-classification folder,
:mod:`thresher.generators.reward`): it writes ``magpie_reward`` for rows that end with a
response (``magpie_reward_failure = no_response`` for the others) and ``magpie_reward_model``.
None is embedded, so by default the stage does not compute it and its summary says so. The
filter is the declarative ``select`` (e.g. ``magpie_input_quality_rank >= 4``).
"""

from __future__ import annotations

from typing import Any, Literal

import numpy as np
import pyarrow as pa
from pydantic import Field

from thresher.flows.stage import ModelStageParams, Stage, StageOutput, model_field, resource_knob
from thresher.generators.magpie_tags import TASKS, detect_languages, tag_instructions
from thresher.generators.reward import RewardModel
from thresher.schemas.model_config import ModelConfig
from thresher.schemas.records import first_user_turn
from thresher.selectors.chunked import call_in_chunks

#: tags whose labels are ordered (``very poor`` .. ``excellent``, ``very easy`` .. ``very hard``)
ORDINAL_TAGS = ("input_quality", "difficulty")

TagName = Literal["input_quality", "difficulty", "task_category", "language"]


class MagpieTagParams(ModelStageParams):
    model: ModelConfig = model_field("embedded:smollm2-135m-instruct", "the chat model that tags (any chat model)")
    tags: list[TagName] = Field(default_factory=lambda: ["input_quality", "difficulty", "task_category", "language"],
                                min_length=1, description="the tags to ask for")
    max_tokens: int = Field(256, ge=16, description="the longest answer a tag may take")
    chunk_size: int = resource_knob(64, ge=1, description="instructions per model call")
    reward_model: ModelConfig | None = Field(
        None, description="a local sequence-classification reward model folder (none is embedded: "
                          "without one, no reward is computed and the summary says so)")


class MagpieTagStage(Stage):
    """Tag each row's instruction (see the module docstring)."""

    name = "magpie_tag"
    version = "1"
    Params = MagpieTagParams

    def process(self, rows: pa.Table) -> StageOutput:
        p: MagpieTagParams = self.params
        texts = [first_user_turn(m) for m in rows["messages"].to_pylist()]
        backend = p.load() if any(tag != "language" for tag in p.tags) else None
        columns: dict[str, pa.Array] = {"row_id": pa.array(rows["row_id"].to_pylist(), pa.string())}
        for tag in p.tags:
            if tag == "language":  # a library, no model
                results = detect_languages(texts)
            else:
                results = call_in_chunks(texts, lambda chunk, tag=tag: tag_instructions(backend, tag, chunk, p.max_tokens),
                                         p.chunk_size, progress=f"magpie_tag {tag}: tagged")
            columns[f"magpie_{tag}"] = pa.array([r.label for r in results], pa.string())
            columns[f"magpie_{tag}_failure"] = pa.array([r.failure for r in results], pa.string())
            if tag in ORDINAL_TAGS:  # 1 (very poor / very easy) .. 5, for select's thresholds
                labels = TASKS[tag].labels
                columns[f"magpie_{tag}_rank"] = pa.array(
                    [labels.index(r.label) + 1 if r.label else None for r in results], pa.int64())
            if tag == "task_category":
                columns["magpie_other_tags"] = pa.array(
                    [r.fields.get("other_tags") if r.label else None for r in results], pa.list_(pa.string()))
        tagger = backend.identity if backend is not None else None
        columns["magpie_tagger"] = pa.array([tagger] * rows.num_rows, pa.string())
        if p.reward_model is not None:
            columns.update(reward_columns(RewardModel(p.reward_model), rows["messages"].to_pylist()))
        return StageOutput(attributes=pa.table(columns))

    def summarize(self, kept: pa.Table, rejected: pa.Table) -> dict[str, Any]:
        p: MagpieTagParams = self.params
        summary: dict[str, Any] = {"tagger": p.model.name}
        for tag in p.tags:
            for column, title in ((f"magpie_{tag}", f"{tag}, kept rows"), (f"magpie_{tag}_failure", f"{tag} failures")):
                if column in kept.column_names:
                    counts: dict[str, int] = {}
                    for value in kept[column].to_pylist():
                        if value is not None:
                            counts[value] = counts.get(value, 0) + 1
                    summary[title] = dict(sorted(counts.items(), key=lambda kv: -kv[1]))
        rewards = [r for r in kept["magpie_reward"].to_pylist() if r is not None] \
            if "magpie_reward" in kept.column_names else []
        if p.reward_model is None:
            summary["reward"] = "not computed: no reward model is configured (none is embedded)"
        elif rewards:
            summary["reward of the kept rows (min / median / max)"] = \
                f"{min(rewards):.3f} / {float(np.median(rewards)):.3f} / {max(rewards):.3f}"
        return summary


def reward_columns(model: RewardModel, conversations: list[list[dict]]) -> dict[str, pa.Array]:
    """``magpie_reward`` of every conversation that ends with a response; the others get
    ``magpie_reward_failure = no_response`` (a reward scores an instruction *and* its answer)."""
    answered = [i for i, c in enumerate(conversations) if c and c[-1]["role"] == "assistant"]
    scores = model.scores([conversations[i] for i in answered]) if answered else []
    reward: list[float | None] = [None] * len(conversations)
    for i, score in zip(answered, scores):
        reward[i] = float(score)
    return {"magpie_reward": pa.array(reward, pa.float64()),
            "magpie_reward_failure": pa.array([None if r is not None else "no_response" for r in reward], pa.string()),
            "magpie_reward_model": pa.array([model.identity if r is not None else None for r in reward], pa.string())}



