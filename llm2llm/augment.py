"""One LLM2LLM augmentation step: the teacher writes new examples like each seed the student got wrong.

LLM2LLM (Lee et al. 2024, arXiv:2403.15042; SqueezeAILab/LLM2LLM ``GSM8K/generate_data.py``):
for every wrong seed the teacher (temperature 1.0) is asked for ``m`` similar examples
(:mod:`~thresher.llm2llm.teacher_prompt`); the reply is parsed (:mod:`~thresher.llm2llm.parse`),
and an example whose question is a near-copy (ROUGE-L F1 > 0.95) of any seed or any accepted
augmentation is dropped (:mod:`~thresher.llm2llm.novelty`). Only seeds are parents.

What thresher adds to the reference:

- **Capped retries.** A seed whose reply gave fewer than ``m`` accepted examples is asked again,
  for the ones missing, up to ``max_retries`` more times (the reference retries without end);
  each request's sampling seed is ``seed + 1000 * iteration + attempt``, so a retry samples anew
  and the same config gives the same replies (and the request cache can answer them on a rerun).
- **A reply prefix** (``teacher.response_prefix``, off by default): the teacher's reply is made
  to begin with, say, ``1. Question:``, the format's first marker. A small teacher (the embedded
  SmolLM2-135M) then answers in the format about half the time instead of rarely; a teacher
  that follows instructions (the reference's gpt-3.5-turbo) needs none. It needs a backend that
  continues raw prompts (hf, vllm, an OpenAI-compatible server's completions endpoint).
- **Held-out overlap.** An example whose question reproduces a held-out question is rejected.
- **Nothing is lost.** Every reply that is empty, unparseable, cut at the token limit or wrongly
  formatted, and every example rejected as a copy, becomes a rejected row with its reason (the
  parse reasons, ``near_copy``, ``held_out_exact``, ``held_out_overlap``), its seed
  (``parent_row_id``), iteration and attempt, and the raw text.

An accepted example is a new row (:func:`make_created_record`) whose parent is its seed, with
``iteration``, ``teacher`` (the teacher's identity) and ``origin`` (stage, iteration, attempt,
sampling) saying how it was made.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import pyarrow as pa

from thresher.generators.base import ModelBackend, SamplingParams
from thresher.llm2llm.config import TeacherConfig
from thresher.llm2llm.examples import gold_answer, question
from thresher.llm2llm.novelty import HeldOutIndex, NoveltyIndex
from thresher.llm2llm.parse import ParseFailure, TeacherItem, parse_teacher_output
from thresher.llm2llm.teacher_prompt import teacher_messages
from thresher.schemas.records import REJECTED_SCHEMA, make_created_record, make_rejected

AUGMENT_STAGE = "llm2llm_augment"

REJECTED_AUGMENT_SCHEMA = pa.schema([*REJECTED_SCHEMA, pa.field("parent_row_id", pa.string()),
                                     pa.field("iteration", pa.int32()), pa.field("attempt", pa.int32())])


@dataclass
class AugmentResult:
    """What one iteration's augmentation gave."""

    accepted: list[dict[str, Any]] = field(default_factory=list)  # training rows (record + iteration + teacher)
    rejected: list[dict[str, Any]] = field(default_factory=list)  # REJECTED_AUGMENT_SCHEMA rows
    requests: int = 0  # teacher requests sent (first tries + retries)
    retries: int = 0  # of those, the retries
    short: int = 0  # wrong seeds left with fewer than m accepted examples once retries ran out

    def stats(self) -> dict[str, Any]:
        reasons: dict[str, int] = {}
        for r in self.rejected:
            reasons[r["reason"]] = reasons.get(r["reason"], 0) + 1
        return {"accepted": len(self.accepted), "rejected": len(self.rejected),
                "rejected_by_reason": dict(sorted(reasons.items())), "requests": self.requests,
                "retries": self.retries, "seeds_short": self.short}


def request_seed(base_seed: int, iteration: int, attempt: int) -> int:
    """The sampling seed of an iteration's ``attempt``-th round of teacher requests."""
    return base_seed + 1000 * iteration + attempt


def teacher_sampling(config: TeacherConfig, seed: int) -> SamplingParams:
    return SamplingParams(temperature=config.temperature, top_p=config.top_p, max_tokens=config.max_tokens,
                          stop=tuple(config.stop), seed=seed)


class KeptQuestions:
    """The questions an augmentation must not copy (seeds, accepted augmentations), with their row ids."""

    def __init__(self, records: Sequence[dict[str, Any]], threshold: float):
        self.index = NoveltyIndex((question(r) for r in records), threshold=threshold)
        self.row_ids = [r["row_id"] for r in records]

    def add(self, record: dict[str, Any]) -> None:
        self.index.add(question(record))
        self.row_ids.append(record["row_id"])


def _rejection(seed: dict[str, Any], iteration: int, attempt: int, reason: str, detail: str, raw: str,
               value: float | None = None, kept_row_id: str | None = None, candidate: str | None = None,
               evidence: str | None = None) -> dict[str, Any]:
    row = make_rejected(source=seed["source"], source_row=seed["source_row"], stage=AUGMENT_STAGE, reason=reason,
                        detail=f"iteration {iteration}, attempt {attempt}: {detail}", raw=raw, value=value,
                        kept_row_id=kept_row_id, candidate=candidate, evidence=evidence)
    return {**row, "parent_row_id": seed["row_id"], "iteration": iteration, "attempt": attempt}


def augment(
    teacher: ModelBackend,
    wrong: Sequence[tuple[dict[str, Any], str]],
    config: TeacherConfig,
    iteration: int,
    kept: KeptQuestions,
    held_out: HeldOutIndex | None,
    base_seed: int,
) -> AugmentResult:
    """New examples for each ``(seed record, student's answer)`` in ``wrong`` (see the module doc).

    ``kept`` grows with every accepted example, so two near-identical replies cannot both pass.
    """
    result = AugmentResult()
    missing = {seed["row_id"]: config.m for seed, _ in wrong}
    pending = list(wrong)
    for attempt in range(config.max_retries + 1):
        if not pending:
            break
        seed_value = request_seed(base_seed, iteration, attempt)
        params = teacher_sampling(config, seed_value)
        conversations = [teacher_messages(question(s), gold_answer(s), missing[s["row_id"]],
                                          answer if config.show_student_answer else None) for s, answer in pending]
        replies = _ask(teacher, conversations, params, config.response_prefix)
        result.requests += len(pending)
        result.retries += len(pending) if attempt else 0
        origin_sampling = {"temperature": params.temperature, "top_p": params.top_p,
                           "max_tokens": params.max_tokens, "stop": list(params.stop), "seed": seed_value}
        for (seed, _), (text, finish_reason) in zip(pending, replies):
            parsed = parse_teacher_output(text, finish_reason,
                                          max_items=missing[seed["row_id"]], require_number=config.require_number)
            for failure in parsed.failures:
                result.rejected.append(_failure_row(seed, iteration, attempt, failure, teacher.identity))
            for item in parsed.items:
                row = _accept_or_reject(seed, item, iteration, attempt, kept, held_out, teacher.identity,
                                        origin_sampling, result)
                if row is not None:
                    result.accepted.append(row)
                    missing[seed["row_id"]] -= 1
        pending = [(s, a) for s, a in pending if missing[s["row_id"]] > 0]
    result.short = len(pending)
    return result


def _ask(teacher: ModelBackend, conversations: list[list[dict]], params: SamplingParams,
         prefix: str | None) -> list[tuple[str, str]]:
    """The teacher's ``(reply, finish reason)`` to each conversation; with ``prefix``, the reply is
    made to begin with it (the chat rendered by the teacher's template, the prefix appended, and the
    raw prompt continued), and the prefix is part of the reply that is parsed."""
    if not prefix:
        return [(g.completions[0].text, g.completions[0].finish_reason) for g in teacher.chat(conversations, params)]
    prompts = [teacher.apply_chat_template(c) + prefix for c in conversations]
    return [(prefix + g.completions[0].text, g.completions[0].finish_reason) for g in teacher.generate(prompts, params)]


def _failure_row(seed: dict, iteration: int, attempt: int, failure: ParseFailure, identity: str) -> dict:
    where = "the reply" if failure.index is None else f"item {failure.index + 1}"
    return _rejection(seed, iteration, attempt, failure.reason, f"{where}: {failure.detail}", failure.raw,
                      candidate=identity)


def _accept_or_reject(seed: dict, item: TeacherItem, iteration: int, attempt: int, kept: KeptQuestions,
                      held_out: HeldOutIndex | None, identity: str, sampling: dict,
                      result: AugmentResult) -> dict | None:
    raw = f"Question: {item.question}\nAnswer: {item.answer}"
    verdict = kept.index.check(item.question)
    if not verdict.ok:
        result.rejected.append(_rejection(
            seed, iteration, attempt, "near_copy",
            f"ROUGE-L F1 {verdict.score:.3f} > {kept.index.threshold} against a seed or an accepted augmentation",
            raw, value=verdict.score, kept_row_id=kept.row_ids[verdict.nearest], candidate=identity))
        return None
    if held_out is not None:
        verdict = held_out.check(item.question)
        if not verdict.ok:
            result.rejected.append(_rejection(
                seed, iteration, attempt, verdict.reason,
                f"reproduces held-out question {verdict.nearest} (ROUGE-L F1 {verdict.score:.3f})", raw,
                value=verdict.score, candidate=identity, evidence=held_out.questions[verdict.nearest]))
            return None
    origin = {"stage": AUGMENT_STAGE, "iteration": iteration, "attempt": attempt, "item": item.index,
              "teacher": identity, "sampling": sampling}
    record = make_created_record(item.messages(), origin, parent=seed, candidate=identity)
    kept.add(record)
    return {**record, "iteration": iteration, "teacher": identity}


def rejected_table(rows: Sequence[dict[str, Any]]) -> pa.Table:
    return pa.Table.from_pylist(list(rows), schema=REJECTED_AUGMENT_SCHEMA)
