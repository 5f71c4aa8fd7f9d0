"""Prompt texts for CLEAR (arXiv 2403.12776) and its confidence, BSDetector (arXiv 2308.16175).

Self-reflection (BSDetector, Figure 6b) asks the model twice, with two differently
worded prompts, whether a proposed answer is correct: "(A) Correct (B) Incorrect
(C) I am not sure". BSDetector lets the model write ``explanation: ..., answer: X``
and parses the letter; here the letter's probability is read from the next-token
distribution instead (no sampling), so each prompt asks for the letter alone and
the assistant turn is pre-filled with :data:`REFLECTION_PREFILL`, after which the
next token is the letter. BSDetector's second prompt is a follow-up turn in the same
chat; here it is a standalone prompt repeating the question and answer, so both
prompts can be scored in one batched call.

Templates use ``{question}`` and ``{answer}`` placeholders, filled with
``str.replace`` (braces in the data are left alone).
"""

from __future__ import annotations

REFLECTION_PROMPTS: tuple[str, ...] = (
    "Question: {question}\n"
    "Proposed Answer: {answer}\n"
    "Is the proposed answer: (A) Correct (B) Incorrect (C) I am not sure.\n"
    "Reply with one letter from among choices A through C.",
    "Question: {question}\n"
    "Proposed Answer: {answer}\n"
    "Are you really sure the proposed answer is correct? "
    "Choose again: (A) Correct (B) Incorrect (C) I am not sure.\n"
    "Reply with one letter from among choices A through C.",
)

#: the start of the assistant's reply; the next token is the chosen letter
REFLECTION_PREFILL = "Answer: ("

#: the letters read from the next-token distribution and their scores (BSDetector: A=1, B=0, C=0.5)
REFLECTION_LETTERS: tuple[str, ...] = ("A", "B", "C")
REFLECTION_VALUES: tuple[float, ...] = (1.0, 0.0, 0.5)

#: LLM-as-judge for CLEAR's auto-correct: which of two responses is better
JUDGE_PROMPT = (
    "Question: {question}\n\n"
    "Response (A): {first}\n\n"
    "Response (B): {second}\n\n"
    "Which response answers the question better: (A) or (B)?\n"
    "Reply with one letter, A or B."
)
JUDGE_PREFILL = "Answer: ("
JUDGE_LETTERS: tuple[str, ...] = ("A", "B")


def fill(template: str, **fields: str) -> str:
    """Put ``fields`` into ``{name}`` placeholders (plain replacement, no format spec)."""
    out = template
    for name, value in fields.items():
        out = out.replace("{" + name + "}", value)
    return out


def check_template(template: str, names: tuple[str, ...]) -> str:
    """A template must name every placeholder it will be filled with."""
    missing = [n for n in names if "{" + n + "}" not in template]
    if missing:
        raise ValueError(f"prompt template lacks the placeholders {['{' + n + '}' for n in missing]}: {template[:80]!r}")
    return template
