"""Input formats: turn one parsed record (a dict) into canonical conversations.

Each format is a function ``record -> list[Parsed]`` that raises :class:`RowError`
with a quarantine reason when the record does not fit. A record can yield
several conversations: one per candidate response (multi-candidate rows) or per
instance (self-instruct seeds).

Formats (auto-detected from a file's first object, or named in the config):

==============  =============================================================
alpaca          ``instruction`` [+ ``input``] -> user, ``output`` -> assistant
sharegpt        ``conversations: [{from, value}]``
openai          ``messages: [{role, content}]``
gsm8k           ``question`` -> user, ``answer`` -> assistant
self_instruct   ``instruction`` + ``instances: [{input, output}]`` (one row each)
candidates      ``instruction``/``prompt`` + ``candidates``/``responses``: a list of
                strings or ``{response|output|text, model|generator}`` objects
==============  =============================================================

Several files answering the same instructions (AlpacaEval's one file per model)
need no special format: the rows share a ``group_id`` because their prompts match.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

# Every reason a row can be quarantined for while it is read.
REASON_MALFORMED_JSON = "malformed_json"
REASON_INVALID_UTF8 = "invalid_utf8"
REASON_TOO_LARGE = "too_large"
REASON_NOT_AN_OBJECT = "not_an_object"
REASON_UNRECOGNIZED = "unrecognized_format"
REASON_MISSING_FIELD = "missing_field"
REASON_EMPTY_FIELD = "empty_field"
REASON_WRONG_TYPE = "wrong_type"
REASON_UNKNOWN_ROLE = "unknown_role"
REASON_DUPLICATE_ID = "duplicate_id"
REASON_UNREADABLE_FILE = "unreadable_file"

SHAREGPT_ROLES = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "chatgpt": "assistant",
    "bard": "assistant",
    "bing": "assistant",
    "model": "assistant",
    "system": "system",
}
OPENAI_ROLES = {"system", "user", "assistant"}
ID_FIELDS = ("id", "idx", "uid")


class RowError(ValueError):
    """A record that cannot become a canonical row; ``reason`` is the quarantine reason."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


@dataclass
class Parsed:
    messages: list[dict[str, str]]
    candidate: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)


def _field(record: dict, name: str, *, required: bool = True, allow_empty: bool = False) -> Any:
    if name not in record or record[name] is None:
        if required:
            raise RowError(REASON_MISSING_FIELD, f"field '{name}' is missing")
        return None
    value = record[name]
    if not isinstance(value, str):
        raise RowError(
            REASON_WRONG_TYPE, f"field '{name}' must be a string, got {type(value).__name__}"
        )
    if not allow_empty and not value.strip():
        raise RowError(REASON_EMPTY_FIELD, f"field '{name}' is empty")
    return value


def _list_field(record: dict, name: str) -> list:
    if name not in record or record[name] is None:
        raise RowError(REASON_MISSING_FIELD, f"field '{name}' is missing")
    value = record[name]
    if not isinstance(value, list):
        raise RowError(
            REASON_WRONG_TYPE, f"field '{name}' must be a list, got {type(value).__name__}"
        )
    if not value:
        raise RowError(REASON_EMPTY_FIELD, f"field '{name}' is an empty list")
    return value


def _meta(record: dict, used: set[str]) -> dict[str, Any]:
    return {k: v for k, v in record.items() if k not in used}


def _user_prompt(instruction: str, extra_input: str | None) -> str:
    if extra_input and extra_input.strip():
        return f"{instruction}\n\n{extra_input}"
    return instruction


def parse_alpaca(record: dict) -> list[Parsed]:
    instruction = _field(record, "instruction")
    extra_input = _field(record, "input", required=False, allow_empty=True)
    output = _field(record, "output")
    candidate = record.get("generator") if isinstance(record.get("generator"), str) else None
    messages = [
        {"role": "user", "content": _user_prompt(instruction, extra_input)},
        {"role": "assistant", "content": output},
    ]
    return [Parsed(messages, candidate, _meta(record, {"instruction", "input", "output"}))]


def _turns(record: dict, list_name: str, role_key: str, text_key: str, roles) -> list[dict]:
    turns = _list_field(record, list_name)
    messages = []
    for i, turn in enumerate(turns):
        where = f"{list_name}[{i}]"
        if not isinstance(turn, dict):
            raise RowError(REASON_WRONG_TYPE, f"{where} must be an object")
        role = _field(turn, role_key)
        mapped = roles.get(role) if isinstance(roles, dict) else (role if role in roles else None)
        if mapped is None:
            raise RowError(REASON_UNKNOWN_ROLE, f"{where}.{role_key} = {role!r} is not a known role")
        try:
            content = _field(turn, text_key)
        except RowError as err:
            raise RowError(err.reason, f"{where}: {err.detail}") from None
        messages.append({"role": mapped, "content": content})
    return messages


def parse_sharegpt(record: dict) -> list[Parsed]:
    messages = _turns(record, "conversations", "from", "value", SHAREGPT_ROLES)
    return [Parsed(messages, None, _meta(record, {"conversations"}))]


def parse_openai(record: dict) -> list[Parsed]:
    messages = _turns(record, "messages", "role", "content", OPENAI_ROLES)
    return [Parsed(messages, None, _meta(record, {"messages"}))]


def parse_gsm8k(record: dict) -> list[Parsed]:
    question = _field(record, "question")
    answer = _field(record, "answer")
    messages = [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
    return [Parsed(messages, None, _meta(record, {"question", "answer"}))]


def parse_self_instruct(record: dict) -> list[Parsed]:
    instruction = _field(record, "instruction")
    instances = _list_field(record, "instances")
    parsed = []
    base_meta = _meta(record, {"instruction", "instances"})
    for i, instance in enumerate(instances):
        if not isinstance(instance, dict):
            raise RowError(REASON_WRONG_TYPE, f"instances[{i}] must be an object")
        try:
            extra_input = _field(instance, "input", required=False, allow_empty=True)
            output = _field(instance, "output")
        except RowError as err:
            raise RowError(err.reason, f"instances[{i}]: {err.detail}") from None
        messages = [
            {"role": "user", "content": _user_prompt(instruction, extra_input)},
            {"role": "assistant", "content": output},
        ]
        parsed.append(Parsed(messages, None, {**base_meta, "instance": i}))
    return parsed


def parse_candidates(record: dict) -> list[Parsed]:
    prompt_key = "instruction" if "instruction" in record else "prompt"
    prompt = _user_prompt(
        _field(record, prompt_key), _field(record, "input", required=False, allow_empty=True)
    )
    list_key = "candidates" if "candidates" in record else "responses"
    candidates = _list_field(record, list_key)
    base_meta = _meta(record, {prompt_key, "input", list_key})
    parsed = []
    for i, cand in enumerate(candidates):
        where = f"{list_key}[{i}]"
        if isinstance(cand, str):
            text, who = cand, None
            if not text.strip():
                raise RowError(REASON_EMPTY_FIELD, f"{where} is empty")
        elif isinstance(cand, dict):
            text_key = next((k for k in ("response", "output", "text") if k in cand), "response")
            try:
                text = _field(cand, text_key)
            except RowError as err:
                raise RowError(err.reason, f"{where}: {err.detail}") from None
            who = next((cand[k] for k in ("model", "generator") if isinstance(cand.get(k), str)), None)
        else:
            raise RowError(REASON_WRONG_TYPE, f"{where} must be a string or an object")
        messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": text}]
        parsed.append(Parsed(messages, who, {**base_meta, "candidate_index": i}))
    return parsed


FORMATS: dict[str, Callable[[dict], list[Parsed]]] = {
    "alpaca": parse_alpaca,
    "sharegpt": parse_sharegpt,
    "openai": parse_openai,
    "gsm8k": parse_gsm8k,
    "self_instruct": parse_self_instruct,
    "candidates": parse_candidates,
}


def detect_format(record: Any) -> str | None:
    """The format a record's keys say it is in, or None."""
    if not isinstance(record, dict):
        return None
    keys = set(record)
    if "messages" in keys:
        return "openai"
    if "conversations" in keys:
        return "sharegpt"
    if "instances" in keys and "instruction" in keys:
        return "self_instruct"
    if keys & {"candidates", "responses"} and keys & {"instruction", "prompt"}:
        return "candidates"
    if {"question", "answer"} <= keys:
        return "gsm8k"
    if "instruction" in keys:
        return "alpaca"
    return None


def record_id(record: dict) -> str | None:
    """The record's own id field, when it has one (used to quarantine duplicated ids)."""
    for key in ID_FIELDS:
        value = record.get(key)
        if isinstance(value, (str, int)) and not isinstance(value, bool):
            return str(value)
    return None
