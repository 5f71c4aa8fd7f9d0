"""Canonical records: the one row shape every stage reads.

Every input row, whatever its format, becomes::

    row_id        string   stable id: hash of normalized content + source (+ occurrence)
    group_id      string   hash of the normalized prompt: rows answering the same
                           instruction (GRAPE's candidates) share it
    content_id    string   hash of the normalized conversation alone (exact dedup key)
    messages      list<struct<role: string, content: string>>
    source        string   the input file, as ``<parent folder>/<file name>``
    source_row    int64    0-based position of the record in its file (JSONL: line)
    candidate     string   who wrote the response (a model name), when known
    meta          string   JSON object: the record's other fields, provenance

Rows that cannot be read go to the rejected table (:data:`REJECTED_SCHEMA`) with
their reason and raw text; nothing is dropped silently.
"""

from __future__ import annotations

import hashlib
import json
import re
import unicodedata
from typing import Any, Iterable, Sequence

import pyarrow as pa

MESSAGE_TYPE = pa.struct([("role", pa.string()), ("content", pa.string())])
MESSAGES_TYPE = pa.list_(MESSAGE_TYPE)

RECORD_SCHEMA = pa.schema(
    [
        ("row_id", pa.string()),
        ("group_id", pa.string()),
        ("content_id", pa.string()),
        ("messages", MESSAGES_TYPE),
        ("source", pa.string()),
        ("source_row", pa.int64()),
        ("candidate", pa.string()),
        ("meta", pa.string()),
    ]
)

REJECTED_SCHEMA = pa.schema(
    [
        ("row_id", pa.string()),
        ("source", pa.string()),
        ("source_row", pa.int64()),
        ("stage", pa.string()),
        ("reason", pa.string()),
        ("detail", pa.string()),
        ("value", pa.float64()),
        ("raw", pa.string()),
    ]
)

ROLES = ("system", "user", "assistant")
_WHITESPACE = re.compile(r"\s+")
ID_HEX_CHARS = 24


def normalize_text(text: str) -> str:
    """Unicode NFC, whitespace runs folded to one space, stripped (case kept)."""
    return _WHITESPACE.sub(" ", unicodedata.normalize("NFC", text)).strip()


def _digest(*parts: str) -> str:
    h = hashlib.sha256()
    for part in parts:
        h.update(part.encode("utf-8", "surrogatepass"))
        h.update(b"\x00")
    return h.hexdigest()[:ID_HEX_CHARS]


def _normalized_turns(messages: Sequence[dict[str, str]]) -> str:
    return json.dumps(
        [[m["role"], normalize_text(m["content"])] for m in messages], ensure_ascii=False
    )


def content_id(messages: Sequence[dict[str, str]]) -> str:
    """Hash of the normalized conversation: equal for exact duplicates from any source."""
    return _digest("content", _normalized_turns(messages))


def prompt_messages(messages: Sequence[dict[str, str]]) -> list[dict[str, str]]:
    """The conversation up to (not including) its final assistant turn."""
    if messages and messages[-1]["role"] == "assistant":
        return list(messages[:-1])
    return list(messages)


def group_id(messages: Sequence[dict[str, str]]) -> str:
    """Hash of the normalized prompt: every candidate answer to one instruction shares it."""
    return _digest("group", _normalized_turns(prompt_messages(messages)))


def row_id(messages: Sequence[dict[str, str]], source: str, occurrence: int = 0) -> str:
    """Stable id from normalized content + source; ``occurrence`` separates exact repeats."""
    return _digest("row", source, _normalized_turns(messages), str(occurrence))


def make_record(
    messages: list[dict[str, str]],
    source: str,
    source_row: int,
    occurrence: int = 0,
    candidate: str | None = None,
    meta: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """One canonical record (a dict matching :data:`RECORD_SCHEMA`)."""
    return {
        "row_id": row_id(messages, source, occurrence),
        "group_id": group_id(messages),
        "content_id": content_id(messages),
        "messages": messages,
        "source": source,
        "source_row": source_row,
        "candidate": candidate,
        "meta": json.dumps(meta or {}, ensure_ascii=False, sort_keys=True, default=str),
    }


def make_rejected(
    *,
    source: str,
    source_row: int,
    stage: str,
    reason: str,
    detail: str,
    raw: str | None,
    row_id: str | None = None,
    value: float | None = None,
) -> dict[str, Any]:
    """One rejected-row entry (a dict matching :data:`REJECTED_SCHEMA`)."""
    return {
        "row_id": row_id,
        "source": source,
        "source_row": source_row,
        "stage": stage,
        "reason": reason,
        "detail": detail,
        "value": value,
        "raw": raw,
    }


def records_table(records: Iterable[dict[str, Any]]) -> pa.Table:
    return pa.Table.from_pylist(list(records), schema=RECORD_SCHEMA)


def rejected_table(rows: Iterable[dict[str, Any]]) -> pa.Table:
    return pa.Table.from_pylist(list(rows), schema=REJECTED_SCHEMA)


def messages_text(messages: Sequence[dict[str, str]]) -> str:
    """A readable rendering of a conversation, for raw columns and reports."""
    return json.dumps(list(messages), ensure_ascii=False)
