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
    parent_row_id string   the row a stage made this one from (null: read from a file, or
                           made from nothing by a source stage such as Magpie's)
    origin        string   JSON object, for rows a stage created: the stage, the model's
                           identity, the sampling parameters and seed (null for rows read)

Rows are immutable. A stage that writes new content (a response, a corrected response)
creates a new row with :func:`make_created_record`: its ``row_id`` and ``content_id``
always describe what is in it, and ``parent_row_id`` + ``origin`` say where it came from.

Rows that cannot be read, and rows a stage removes, go to the rejected table
(:data:`REJECTED_SCHEMA`) with their reason and raw text; nothing is dropped silently.
Why a row was rejected is said in typed columns (:data:`REJECTION_FIELDS`) that code
reads, and once more in words in ``detail``, which only people read.
"""

from __future__ import annotations

import hashlib
import json
import re
import unicodedata
from typing import Any, Iterable, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

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
        ("parent_row_id", pa.string()),
        ("origin", pa.string()),
    ]
)

#: Why a row was rejected, as every stage reports it (see the README's "Rejection columns"):
#: ``reason`` the reason code; ``code`` a machine-readable sub-reason (e.g. the scorer
#: failure ``complexity:truncated``), null when the reason says it all; ``detail`` the same
#: in words, for people only (code never parses it); ``value`` the number that decided it
#: (a score, a similarity), null when none; ``kept_row_id`` the row it was rejected in
#: favour of (the copy kept, the group's winner, the most similar accepted row), null when none;
#: ``evidence`` the text that decided it (the benchmark n-gram a row contains), null when none.
REJECTION_FIELDS = (
    pa.field("reason", pa.string()),
    pa.field("code", pa.string()),
    pa.field("detail", pa.string()),
    pa.field("value", pa.float64()),
    pa.field("kept_row_id", pa.string()),
    pa.field("evidence", pa.string()),
)

REJECTED_SCHEMA = pa.schema(
    [
        ("row_id", pa.string()),
        ("source", pa.string()),
        ("source_row", pa.int64()),
        ("candidate", pa.string()),
        ("stage", pa.string()),
        *REJECTION_FIELDS,
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


def split_response(messages: Sequence[dict[str, str]]) -> tuple[list[dict[str, str]], str] | None:
    """(the conversation before the final assistant turn, that turn's text), or None
    when the conversation does not end with an assistant turn (no response to score)."""
    if not messages or messages[-1]["role"] != "assistant":
        return None
    return list(messages[:-1]), messages[-1]["content"]


def first_user_turn(messages: Sequence[dict[str, str]]) -> str:
    """A row's instruction: its first user turn ("" when it has none)."""
    return next((m["content"] for m in messages if m["role"] == "user"), "")


def prompt_messages(messages: Sequence[dict[str, str]]) -> list[dict[str, str]]:
    """The conversation up to (not including) its final assistant turn (all of it when there is none)."""
    split = split_response(messages)
    return split[0] if split is not None else list(messages)


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
    """One canonical record (a dict matching :data:`RECORD_SCHEMA`); its ids are those of
    :func:`row_id`, :func:`group_id` and :func:`content_id`, each turn normalized once."""
    turns = [[m["role"], normalize_text(m["content"])] for m in messages]
    prompt_turns = turns[:-1] if messages and messages[-1]["role"] == "assistant" else turns  # prompt_messages
    normalized = json.dumps(turns, ensure_ascii=False)
    return {
        "row_id": _digest("row", source, normalized, str(occurrence)),
        "group_id": _digest("group", json.dumps(prompt_turns, ensure_ascii=False)),
        "content_id": _digest("content", normalized),
        "messages": messages,
        "source": source,
        "source_row": source_row,
        "candidate": candidate,
        "meta": _json(meta or {}),
        "parent_row_id": None,
        "origin": None,
    }


def with_occurrence(record: dict[str, Any], occurrence: int) -> dict[str, Any]:
    """``record`` as the ``occurrence``-th exact repeat of its content in its source (a new ``row_id``)."""
    return {**record, "row_id": row_id(record["messages"], record["source"], occurrence)}


def _json(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, sort_keys=True, default=str)


def make_created_record(
    messages: list[dict[str, str]],
    origin: dict[str, Any],
    parent: dict[str, Any] | None = None,
    occurrence: int = 0,
    candidate: str | None = None,
) -> dict[str, Any]:
    """A row a stage created: from ``parent`` (a record dict), or from nothing when it is None.

    ``origin`` says how it was made (the stage, the model's identity, the sampling
    parameters, the seed); ``occurrence`` tells apart rows with equal content made the
    same way (a source stage passes the sample's index). The ``row_id`` is a digest
    of the parent's id, the origin, the content and the occurrence, so the same run
    makes the same ids. A row made from a parent keeps its ``source``, ``source_row``
    and ``meta`` (where the data came from); a row made from nothing has the stage
    as its source and ``occurrence`` as its source row.
    """
    origin_json = _json(origin)
    parent_id = parent["row_id"] if parent is not None else None
    return {
        "row_id": _digest("created", parent_id or "", origin_json, _normalized_turns(messages), str(occurrence)),
        "group_id": group_id(messages),
        "content_id": content_id(messages),
        "messages": messages,
        "source": parent["source"] if parent is not None else str(origin.get("stage", "created")),
        "source_row": parent["source_row"] if parent is not None else occurrence,
        "candidate": candidate,
        "meta": parent["meta"] if parent is not None else "{}",
        "parent_row_id": parent_id,
        "origin": origin_json,
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
    code: str | None = None,
    kept_row_id: str | None = None,
    candidate: str | None = None,
    evidence: str | None = None,
) -> dict[str, Any]:
    """One rejected-row entry (a dict matching :data:`REJECTED_SCHEMA`)."""
    return {
        "row_id": row_id,
        "source": source,
        "source_row": source_row,
        "candidate": candidate,
        "stage": stage,
        "reason": reason,
        "code": code,
        "detail": detail,
        "value": value,
        "kept_row_id": kept_row_id,
        "evidence": evidence,
        "raw": raw,
    }


def with_position(rows: pa.Table, **columns: pa.Array) -> pa.Table:
    """``row_id``, ``source`` and ``source_row`` of ``rows`` (what :func:`corpus_order` sorts by)
    plus ``columns``: a global stage's per-shard step returns such a table."""
    return pa.table({"row_id": rows["row_id"], "source": rows["source"], "source_row": rows["source_row"],
                     **columns})


def corpus_order(table: pa.Table) -> np.ndarray:
    """Row positions of ``table`` (which has ``source``, ``source_row`` and ``row_id``) in corpus
    order: by source, then row in the source, then id. It does not depend on how the rows were
    sharded, so a global stage that keeps "the first" keeps the same row whatever the sharding."""
    keys = [("source", "ascending"), ("source_row", "ascending"), ("row_id", "ascending")]
    return pc.sort_indices(table, sort_keys=keys).to_numpy()


def records_table(records: Iterable[dict[str, Any]]) -> pa.Table:
    return pa.Table.from_pylist(list(records), schema=RECORD_SCHEMA)


def rejected_table(rows: Iterable[dict[str, Any]]) -> pa.Table:
    return pa.Table.from_pylist(list(rows), schema=REJECTED_SCHEMA)


def conform(table: pa.Table, schema: pa.Schema) -> pa.Table:
    """``table`` in ``schema``: a column it lacks (a result stored by an older thresher, before
    the column existed) reads as null."""
    columns = [table[f.name] if f.name in table.column_names else pa.nulls(table.num_rows, f.type)
               for f in schema]
    return pa.Table.from_arrays(columns, schema=schema)


def messages_text(messages: Sequence[dict[str, str]]) -> str:
    """A readable rendering of a conversation, for raw columns and reports."""
    return json.dumps(list(messages), ensure_ascii=False)
