"""Validation: structural checks on canonical rows, per shard (model-free).

Quarantine reasons:

- ``bad_turn_order`` — a system turn after the first position, or user and
  assistant turns that do not alternate starting with the user;
- ``no_response`` — the conversation does not end with an assistant turn
  (when ``require_response``);
- ``too_long`` — more characters than ``max_chars`` in all turns together;
- ``too_many_turns`` — more than ``max_turns`` user/assistant turns.
"""

from __future__ import annotations

import pyarrow as pa
from pydantic import Field

from thresher.flows.stage import Stage, StageOutput, StageParams
from thresher.schemas.records import split_response


class ValidateParams(StageParams):
    require_response: bool = Field(True, description="reject rows whose last turn is not the assistant's")
    max_chars: int | None = Field(None, ge=1, description="reject rows longer than this many characters")
    max_turns: int | None = Field(None, ge=1, description="reject rows with more user+assistant turns")


def turn_order_problem(messages: list[dict]) -> str | None:
    """Why the roles are out of order, or None when they are fine."""
    roles = [m["role"] for m in messages]
    if "system" in roles[1:]:
        return f"a system turn at position {roles.index('system', 1)} (only the first turn may be system)"
    chat = roles[1:] if roles and roles[0] == "system" else roles
    for i, role in enumerate(chat):
        expected = "user" if i % 2 == 0 else "assistant"
        if role != expected:
            return f"turn {i} is '{role}', expected '{expected}' (user and assistant must alternate, user first)"
    return None


class ValidateStage(Stage):
    name = "validate"
    version = "1"
    kind = "shard"
    Params = ValidateParams

    def process(self, rows: pa.Table) -> StageOutput:
        p: ValidateParams = self.params
        rejected = []
        for row_id, messages in zip(rows["row_id"].to_pylist(), rows["messages"].to_pylist()):
            reason, detail = self._check(messages, p)
            if reason:
                rejected.append({"row_id": row_id, "reason": reason, "detail": detail})
        return StageOutput(rejected=rejected)

    @staticmethod
    def _check(messages: list[dict], p: ValidateParams) -> tuple[str | None, str]:
        problem = turn_order_problem(messages)
        if problem:
            return "bad_turn_order", problem
        if p.require_response and split_response(messages) is None:
            return "no_response", "the last turn is not an assistant response"
        n_turns = sum(m["role"] != "system" for m in messages)
        if p.max_turns is not None and n_turns > p.max_turns:
            return "too_many_turns", f"{n_turns} turns, over the limit of {p.max_turns}"
        n_chars = sum(len(m["content"]) for m in messages)
        if p.max_chars is not None and n_chars > p.max_chars:
            return "too_long", f"{n_chars} characters, over the limit of {p.max_chars}"
        return None, ""
