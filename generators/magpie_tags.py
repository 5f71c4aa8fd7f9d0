"""Magpie's tags of an instruction, asked of any chat model: input quality, difficulty, task category.

Magpie (Xu et al., ICLR 2025; magpie-align/magpie ``exp/unitag.py``) tags each instruction
with a chat model answering a fixed prompt contract: a markdown brief ("# Instruction",
the query in a fenced block under "## User Query", the JSON to fill under "## Output
Format"), the assistant turn prefilled with ``{``, greedy decoding, generation stopped at
``}``. The answer is parsed as ``"{" + text + "}"`` (cut after its last ``}``) and its
label checked against the task's label set.

The reference turns every failure into a silent None (an external port measured about
48% failures with such prompts). Here every answer gives either a label or a failure
reason, never neither:

- ``tag_unparsable``: not JSON;
- ``tag_missing_field``: JSON without the label's field;
- ``tag_label_invalid``: a label outside the task's set (compared case- and
  space-insensitively; the canonical spelling is kept).

The prompts below are this project's wording of the reference's contracts (the label
sets and JSON fields are the reference's).

``language`` needs no model: the ``lingua`` library (lingua-language-detector, offline, the
reference's choice) over all its languages, as an ISO 639-1 code; text it cannot place gives
``language_undetected``. Its language models load lazily (about 6 s and 0.9 GB on the first call).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Sequence

from thresher.generators.base import SamplingParams

QUALITY_LABELS = ("very poor", "poor", "average", "good", "excellent")
DIFFICULTY_LABELS = ("very easy", "easy", "medium", "hard", "very hard")
TASK_CATEGORIES = (
    "Information seeking", "Reasoning", "Planning", "Editing", "Coding & Debugging", "Math", "Role playing",
    "Data analysis", "Creative writing", "Advice seeking", "Brainstorming", "Others",
)

FAIL_UNPARSABLE = "tag_unparsable"
FAIL_MISSING = "tag_missing_field"
FAIL_INVALID = "tag_label_invalid"
FAIL_LANGUAGE = "language_undetected"

_DETECTOR: Any = None


@dataclass(frozen=True)
class TagTask:
    """One tag: its label field, label set, the JSON it asks for, and its brief."""

    name: str
    label_field: str
    labels: tuple[str, ...]
    brief: str  # what to judge, ahead of the user query
    output: str  # the JSON to fill, placeholders in [...]

    def prompt(self, instruction: str) -> str:
        return (f"# Instruction\n\n{self.brief}\n\n## User Query\n```\n{instruction}\n```\n\n"
                f"## Output Format\nFill in the placeholders in [...] and answer with this JSON only:\n"
                f"```\n{self.output}\n```\n")


TASKS: dict[str, TagTask] = {
    "input_quality": TagTask(
        "input_quality", "input_quality", QUALITY_LABELS,
        "Rate the quality of the user query by its clarity, specificity and coherence:\n"
        "- very poor: unclear, vague or incoherent; essential context is missing.\n"
        "- poor: somewhat unclear, or missing important details; needs much clarification.\n"
        "- average: moderately clear and specific; may need some extra information.\n"
        "- good: clear, specific and mostly well-formed; enough context to answer.\n"
        "- excellent: very clear, specific and well-articulated; all the context needed.",
        '{\n    "explanation": "[what is strong or weak in the query]",\n'
        '    "input_quality": "[very poor/poor/average/good/excellent]"\n}',
    ),
    "difficulty": TagTask(
        "difficulty", "difficulty", DIFFICULTY_LABELS,
        "Say what the user wants, what a model must know to answer, and how hard the query is.",
        '{\n    "intent": "The user wants to [...]",\n'
        '    "knowledge": "To solve this problem, the models need to know [...]",\n'
        '    "difficulty": "[very easy/easy/medium/hard/very hard]"\n}',
    ),
    "task_category": TagTask(
        "task_category", "primary_tag", TASK_CATEGORIES,
        "Tag the user query with its primary task category and any other categories it touches, "
        "from: " + ", ".join(TASK_CATEGORIES) + ".",
        '{\n    "primary_tag": "[one category]",\n    "other_tags": ["[category]", ...]\n}',
    ),
}


@dataclass(frozen=True)
class TagResult:
    """A tag: its canonical label, or the failure reason (exactly one is set), and the raw answer."""

    label: str | None
    failure: str | None
    fields: dict[str, Any] = field(default_factory=dict)
    raw: str = ""


def _canonical(value: Any, labels: Sequence[str]) -> str | None:
    if not isinstance(value, str):
        return None
    wanted = " ".join(value.split()).lower()
    return next((label for label in labels if label.lower() == wanted), None)


def parse_tag(task: TagTask, answer: str) -> TagResult:
    """The tag in a model's answer to ``task``'s prompt (the answer follows the prefilled ``{``)."""
    if not answer.strip():
        return TagResult(None, FAIL_UNPARSABLE, raw=answer)
    text = "{" + answer
    if "}" not in text:
        text += "}"  # generation stopped at "}", which the backends leave out of the text
    try:
        data = json.loads(text[: text.rindex("}") + 1])
    except ValueError:
        return TagResult(None, FAIL_UNPARSABLE, raw=answer)
    if not isinstance(data, dict):
        return TagResult(None, FAIL_UNPARSABLE, raw=answer)
    if task.label_field not in data:
        return TagResult(None, FAIL_MISSING, data, answer)
    label = _canonical(data[task.label_field], task.labels)
    if label is None:
        return TagResult(None, FAIL_INVALID, data, answer)
    if task.name == "task_category":
        others = data.get("other_tags") or []
        canon = [_canonical(t, task.labels) for t in others] if isinstance(others, list) else [None]
        if any(c is None for c in canon):
            return TagResult(None, FAIL_INVALID, data, answer)
        data = {**data, "other_tags": canon}
    return TagResult(label, None, data, answer)


def tag_instructions(backend: Any, task_name: str, instructions: Sequence[str], max_tokens: int = 256) -> list[TagResult]:
    """Ask ``backend`` (any chat model) for ``task_name``'s tag of each instruction: greedy, ``{`` prefilled."""
    task = TASKS[task_name]
    prompts = [backend.apply_chat_template([{"role": "user", "content": task.prompt(text)}]) + "{"
               for text in instructions]
    params = SamplingParams(n=1, temperature=0.0, max_tokens=max_tokens, stop=("}",))
    return [parse_tag(task, g.completions[0].text) for g in backend.generate(prompts, params)]


def detect_languages(texts: Sequence[str]) -> list[TagResult]:
    """Each text's language as an ISO 639-1 code (lingua, all languages), or ``language_undetected``."""
    global _DETECTOR
    from lingua import LanguageDetectorBuilder

    if _DETECTOR is None:
        _DETECTOR = LanguageDetectorBuilder.from_all_languages().build()
    found = _DETECTOR.detect_languages_in_parallel_of(list(texts)) if texts else []
    return [TagResult(lang.iso_code_639_1.name.lower(), None, raw=text) if lang is not None
            else TagResult(None, FAIL_LANGUAGE, raw=text) for lang, text in zip(found, texts)]
