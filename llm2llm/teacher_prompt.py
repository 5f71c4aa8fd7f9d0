"""The LLM2LLM teacher prompt: chat messages asking for ``m`` new examples like a wrong seed.

LLM2LLM (Lee et al. 2024, arXiv:2403.15042; reference code SqueezeAILab/LLM2LLM,
``GSM8K/generate_data.py`` and ``GSM8K/prompt_gsm.txt``) asks its teacher (gpt-3.5-turbo,
temperature 1.0) for new problems in four chat turns, and this module keeps that structure:

1. **system**: the teacher is an educational AI that turns problems a student got wrong into new
   practice problems, with rules: solvable by a language model (no images, audio or actions),
   in English, under 100 words, a numeric answer (a number, not a fraction, no units), the
   calculation shown, no mathematical mistakes, names and numbers changed rather than copied;
   and the output format ``1. Question: ...`` / ``Answer: <calculation>`` / ``#### <answer>``;
2. **user**: a one-shot example request (a question and its answer key, asking for 1 question);
3. **assistant**: the one-shot answer in that format;
4. **user**: the wrong seed's question and answer key, asking for ``m`` similar questions.

The wording here is thresher's own (the rules and their order are the reference's), and the
one-shot example is a different GSM8K-style problem. As in the reference, the student's wrong
answer is not shown to the teacher (the reference formats it into the template but never uses
it); pass ``student_answer`` to show it (an option the reference does not have).
:mod:`thresher.llm2llm.parse` reads the teacher's reply.
"""

from __future__ import annotations

from thresher.generators.base import Message

SYSTEM_PROMPT = """\
You are an educational AI. Students practise with math problems; you take a problem a student \
got wrong and write new problems that exercise the same skills and techniques, so the student \
can practise them.

Rules for every problem you write:
1. A language model must be able to solve it: do not ask for pictures, audio or any action \
(no drawings, no reminders).
2. Write it in English.
3. Keep the problem and its solution under 100 words.
4. The answer must be a number, not a fraction or words: write 0.5, not 1/2 or "one half".
5. Give the answer without units: for 6 cups, the answer is 6.
6. Always show the calculation that leads to the answer.
7. Make no mathematical mistakes.
8. Do not copy the original problem: change the names and the numbers, so the student is \
tested on understanding rather than memory.

Always write each problem in exactly this form:
1. Question: [QUESTION]
Answer: [CALCULATION]
#### [ANSWER]"""

EXAMPLE_QUESTION = (
    "A baker makes 24 muffins. She sells 3/4 of them in the morning and then bakes 10 more. "
    "How many muffins does she have now?"
)
EXAMPLE_ANSWER = (
    "She sells 24 * 3/4 = <<24*3/4=18>>18 muffins.\n"
    "She has 24 - 18 = <<24-18=6>>6 left.\n"
    "After baking she has 6 + 10 = <<6+10=16>>16 muffins.\n"
    "#### 16"
)
EXAMPLE_RESPONSE = (
    "Here is a new problem that practises the same skills, with its calculation:\n\n"
    "1. Question: A florist has 40 roses. He sells 5/8 of them before noon and then receives a "
    "delivery of 12 roses. How many roses does he have now?\n"
    "Answer: He sells 40 * 5/8 = 25 roses. He has 40 - 25 = 15 roses left. After the delivery "
    "he has 15 + 12 = 27 roses.\n"
    "#### 27"
)

_REQUEST = """\
The student was given this question:

{question}

The answer key gives this rationale and answer:

{answer}
{student}
Please write {m} similar question{s}, each with its correct calculation and rationale."""

_STUDENT = """
The student answered:

{student_answer}
"""


def teacher_request(question: str, answer: str, m: int = 1, student_answer: str | None = None) -> str:
    """The last user turn: the seed's question and answer key, asking for ``m`` similar questions."""
    if m < 1:
        raise ValueError(f"the teacher must be asked for at least 1 question, got m={m}")
    if not question.strip() or not answer.strip():
        raise ValueError("a teacher request needs the seed's question and its answer key (both non-empty)")
    student = _STUDENT.format(student_answer=student_answer.strip()) if student_answer else ""
    return _REQUEST.format(question=question.strip(), answer=answer.strip(), student=student,
                           m=m, s="" if m == 1 else "s")


def teacher_messages(
    question: str, answer: str, m: int = 1, student_answer: str | None = None
) -> list[Message]:
    """The chat the teacher answers: system rules, a one-shot pair, then the seed (see the module doc)."""
    return [
        {"role": "system", "content": SYSTEM_PROMPT},
        {"role": "user", "content": teacher_request(EXAMPLE_QUESTION, EXAMPLE_ANSWER, 1)},
        {"role": "assistant", "content": EXAMPLE_RESPONSE},
        {"role": "user", "content": teacher_request(question, answer, m, student_answer)},
    ]
