"""Parse an LLM2LLM teacher's reply into new examples, or typed reasons why not.

The teacher (see :mod:`thresher.llm2llm.teacher_prompt`) is asked for problems in the form::

    1. Question: <question>
    Answer: <calculation>
    #### <answer>

Following the reference (LLM2LLM, Lee et al. 2024, arXiv:2403.15042; SqueezeAILab/LLM2LLM
``GSM8K/generate_data.py``, ``post_process_gpt3_response``): the reply is split on the numbered
``Question:`` markers (``1. Question:`` ... ``99. Question:``); each item must hold exactly one
``Answer:`` and exactly one ``####``; the final answer is the rest of the ``####`` line (text
after that line is dropped); the answer written back is ``<calculation>\\n#### <final answer>``;
when the reply was cut at the token limit (``finish_reason == "length"``) its last item is
dropped, as it is likely cut short, unless its ``####`` line is complete (text after the
``####`` and then a line end): the reference drops that one too, and with one item asked for and
a teacher that goes on writing after it (small models do), that was every good item. Text before the first marker (a preamble such as "Sure, here
are...") is not an item and is ignored, as in the reference.

Where the reference silently drops an item, this parser returns a :class:`ParseFailure` with a
typed ``reason`` (data, never an exception), so the loop can write rejected rows:

==========================  ============================================================
``empty``                   the reply is empty or whitespace
``unparseable``             the reply has text but no numbered ``Question:`` marker
``truncated``               the last item of a reply cut at the token limit
``empty_question``          an item whose question text is empty
``no_answer``               no ``Answer:`` in the item
``multiple_answers``        more than one ``Answer:`` in the item
``no_final_answer``         no ``####`` in the item, or nothing after it on its line
``multiple_final_answers``  more than one ``####`` in the item
``non_numeric_answer``      the final answer holds no number (only with ``require_number``,
                            the default: the rules ask for a numeric answer)
``extra``                   an item beyond ``max_items`` (the teacher wrote more than asked)
==========================  ============================================================

Markdown bold around the markers (``1. **Question:**``) is accepted: small chat models write it.
Only the standard library's ``re`` is needed.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from thresher.generators.base import Message
from thresher.llm2llm.graders import parse_number

REASONS = (
    "empty", "unparseable", "truncated", "empty_question", "no_answer", "multiple_answers",
    "no_final_answer", "multiple_final_answers", "non_numeric_answer", "extra",
)

# "1. Question:", "12. **Question:**", "3.  Question :" (the reference: [0-9]{1,2}\.\s+Question:)
_QUESTION = re.compile(r"(?<!\d)\d{1,2}\.\s*(?:\*\*)?\s*Question\s*:(?:\*\*)?")
_ANSWER = re.compile(r"(?:\*\*)?\bAnswer\s*:(?:\*\*)?")
_FINAL = re.compile(r"####")
_COMPLETE = re.compile(r"####[^\n]*\S[^\n]*\n")  # a final-answer line that ended before the token limit


@dataclass(frozen=True)
class TeacherItem:
    """One new example the teacher wrote."""

    index: int  # its position among the reply's items (0-based)
    question: str
    answer: str  # "<calculation>\n#### <final answer>"
    final_answer: str

    def messages(self) -> list[Message]:
        """The example as a chat: the question from the user, the answer from the assistant."""
        return [{"role": "user", "content": self.question}, {"role": "assistant", "content": self.answer}]


@dataclass(frozen=True)
class ParseFailure:
    """Why a reply, or one item of it, is not a usable example."""

    reason: str  # one of REASONS
    detail: str
    index: int | None  # the item's position, None when the whole reply failed
    raw: str  # the item's text (or the whole reply)


@dataclass
class ParseResult:
    """What a reply gave: the usable items and the failures, in reply order."""

    items: list[TeacherItem] = field(default_factory=list)
    failures: list[ParseFailure] = field(default_factory=list)
    preamble: str = ""

    @property
    def reasons(self) -> list[str]:
        return [f.reason for f in self.failures]


def _one(text: str, regex: re.Pattern, none: str, many: str, what: str, index: int, raw: str):
    parts = regex.split(text)
    if len(parts) == 1:
        return None, ParseFailure(none, f"no {what}", index, raw)
    if len(parts) > 2:
        return None, ParseFailure(many, f"{len(parts) - 1} {what} markers, expected 1", index, raw)
    return parts, None


def parse_item(chunk: str, index: int, require_number: bool = True) -> TeacherItem | ParseFailure:
    """One item's text (after its ``N. Question:`` marker) as an example, or why not."""
    raw = chunk.strip()
    parts, fail = _one(chunk, _ANSWER, "no_answer", "multiple_answers", "'Answer:'", index, raw)
    if fail:
        return fail
    question, rest = parts[0].strip(), parts[1]
    if not question:
        return ParseFailure("empty_question", "nothing between 'Question:' and 'Answer:'", index, raw)
    parts, fail = _one(rest, _FINAL, "no_final_answer", "multiple_final_answers", "'####'", index, raw)
    if fail:
        return fail
    calculation = parts[0].strip()
    final = parts[1].split("\n", 1)[0].strip()
    if not final:
        return ParseFailure("no_final_answer", "nothing after '####' on its line", index, raw)
    if require_number and parse_number(final) is None:
        return ParseFailure("non_numeric_answer", f"final answer {final!r} holds no number", index, raw)
    answer = f"{calculation}\n#### {final}" if calculation else f"#### {final}"
    return TeacherItem(index=index, question=question, answer=answer, final_answer=final)


def parse_teacher_output(
    text: str,
    finish_reason: str = "stop",
    max_items: int | None = None,
    require_number: bool = True,
) -> ParseResult:
    """Split a teacher's reply into :class:`TeacherItem` s and :class:`ParseFailure` s (never raises).

    ``finish_reason`` is the generation's (``"length"``: cut at the token limit, so the last item
    is dropped as ``truncated``). ``max_items``: items past it are ``extra``.
    """
    result = ParseResult()
    if not text or not text.strip():
        result.failures.append(ParseFailure("empty", "the teacher's reply is empty", None, text or ""))
        return result
    chunks = _QUESTION.split(text)
    result.preamble = chunks[0].strip()
    chunks = chunks[1:]
    if not chunks:
        result.failures.append(ParseFailure(
            "unparseable", "no numbered 'Question:' marker (expected '1. Question: ...')", None, text))
        return result
    for i, chunk in enumerate(chunks):
        if i == len(chunks) - 1 and finish_reason == "length" and not _COMPLETE.search(chunk):
            result.failures.append(ParseFailure(
                "truncated", "the reply was cut at the token limit: its last item is dropped", i, chunk.strip()))
            continue
        if max_items is not None and i >= max_items:
            result.failures.append(ParseFailure(
                "extra", f"item {i + 1} of a reply asked for {max_items}", i, chunk.strip()))
            continue
        parsed = parse_item(chunk, i, require_number=require_number)
        if isinstance(parsed, TeacherItem):
            result.items.append(parsed)
        else:
            result.failures.append(parsed)
    return result
