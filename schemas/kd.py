"""The KD columns: the teacher's top-k log-probs per response token, as compact Arrow columns.

The KD stages (``kd_logprobs``, ``kd_generate``) write these attribute columns, so they land
in ``OUT/attributes/`` beside ``row_id``::

    kd_prompt_token_ids  list<int32>                      the rendered prompt (chat template up to
                                                          the assistant turn) as the teacher saw it
    kd_prompt_tokens     int32                            its length (where the response starts)
    kd_token_ids         list<int32>                      the response's T tokens (teacher tokenizer)
    kd_topk_ids          list<fixed_size_list<int32>[k]>  T entries; entry t is the teacher's top-k at
    kd_topk_logprobs     list<fixed_size_list<float16>[k]>    response token t, most likely first
    kd_truncated         bool                             the response was cut to fit the context
    kd_teacher           string                           JSON: see :func:`kd_metadata` (one value
                                                          per run; Parquet dictionary-encodes it)

Entry t is the distribution that predicted ``kd_token_ids[t]`` from the prompt and
``kd_token_ids[:t]``: raw log-probs (temperature 1, before top-p), computed in float32,
stored as float16 (relative error <= 2^-11). A position with fewer than k entries (a
server returned fewer) is padded with id -1 and log-prob -inf.

Why this encoding: ``bench/kd.py`` measures bytes per token on disk for the candidates
(fixed-size vs flat lists, float16 vs float32, snappy vs zstd, with and without Parquet's
BYTE_STREAM_SPLIT): fixed-size lists cost the same as flat ones and keep the arrays'
shape in the schema; float16 halves float32; and zstd over byte-stream-split top-k columns
(:func:`kd_parquet_options`, what the writer uses) takes a quarter off snappy's size.
See the README, "KD output".

The same metadata (teacher identity, tokenizer fingerprint, chat template digest, k,
temperature, log-prob mode) is in the Parquet schema metadata under :data:`KD_METADATA_KEY`
and in the manifest.
"""

from __future__ import annotations

import json
from typing import Any, Sequence

import numpy as np
import pyarrow as pa

from thresher.generators.base import ContinuationTopK

#: the Parquet schema-metadata key holding the KD metadata (JSON: a list, one entry per teacher setting)
KD_METADATA_KEY = b"thresher.kd"

KD_COLUMNS = ("kd_prompt_token_ids", "kd_prompt_tokens", "kd_token_ids", "kd_topk_ids",
              "kd_topk_logprobs", "kd_truncated", "kd_teacher")


def kd_schema(k: int) -> pa.Schema:
    """``row_id`` + the KD columns for top-``k``."""
    return pa.schema([
        ("row_id", pa.string()),
        ("kd_prompt_token_ids", pa.list_(pa.int32())),
        ("kd_prompt_tokens", pa.int32()),
        ("kd_token_ids", pa.list_(pa.int32())),
        ("kd_topk_ids", pa.list_(pa.list_(pa.int32(), k))),
        ("kd_topk_logprobs", pa.list_(pa.list_(pa.float16(), k))),
        ("kd_truncated", pa.bool_()),
        ("kd_teacher", pa.string()),
    ])


def kd_metadata(*, teacher: str, tokenizer: dict[str, Any], chat_template_digest: str | None, k: int,
                mode: str, sampling: dict[str, Any] | None = None) -> dict[str, Any]:
    """What a student needs to know about the labels (the ``kd_teacher`` column, as a dict)."""
    return {
        "teacher": teacher,
        "tokenizer": tokenizer,
        "chat_template_digest": chat_template_digest,
        "k": k,
        "temperature": 1.0,
        "logprob_mode": "raw log_softmax of the logits, float32, before temperature and top-p",
        "mode": mode,  # "teacher_forced" or "generated"
        "sampling": sampling,
    }


def _offsets(lengths: Sequence[int]) -> pa.Array:
    return pa.array(np.concatenate([[0], np.cumsum(lengths, dtype=np.int64)]).astype(np.int32), pa.int32())


def _list_of(arrays: Sequence[np.ndarray], value_type: pa.DataType) -> pa.Array:
    """``list<value_type>`` from 1-d numpy arrays, with no Python objects per element."""
    flat = np.concatenate(arrays) if arrays else np.zeros(0)
    return pa.ListArray.from_arrays(_offsets([len(a) for a in arrays]), pa.array(flat, value_type))


def _list_of_rows(arrays: Sequence[np.ndarray], k: int, value_type: pa.DataType) -> pa.Array:
    """``list<fixed_size_list<value_type>[k]>`` from ``(T_i, k)`` numpy arrays."""
    flat = np.concatenate([a.reshape(-1) for a in arrays]) if arrays else np.zeros(0)
    rows = pa.FixedSizeListArray.from_arrays(pa.array(flat, value_type), k)
    return pa.ListArray.from_arrays(_offsets([len(a) for a in arrays]), rows)


def kd_table(row_ids: Sequence[str], results: Sequence[ContinuationTopK], k: int, teacher_json: str) -> pa.Table:
    """The KD columns of ``results`` (one per row id), built from the arrays directly."""
    for r in results:
        if r.topk.k != k or len(r.topk) != len(r.token_ids):
            raise ValueError(f"top-k of shape {r.topk.ids.shape} for {len(r.token_ids)} tokens, k={k}")
    n = len(row_ids)
    columns = [
        pa.array(list(row_ids), pa.string()),
        _list_of([r.prompt_ids.astype(np.int32) for r in results], pa.int32()),
        pa.array(np.asarray([len(r.prompt_ids) for r in results], np.int32), pa.int32()),
        _list_of([r.token_ids.astype(np.int32) for r in results], pa.int32()),
        _list_of_rows([r.topk.ids for r in results], k, pa.int32()),
        _list_of_rows([r.topk.logprobs.astype(np.float16) for r in results], k, pa.float16()),
        pa.array([bool(r.truncated) for r in results], pa.bool_()),
        pa.array([teacher_json] * n, pa.string()),
    ]
    return pa.Table.from_arrays(columns, schema=kd_schema(k))


#: the top-k columns: written with Parquet's BYTE_STREAM_SPLIT encoding (no dictionary)
TOPK_COLUMNS = ("kd_topk_ids", "kd_topk_logprobs")


def kd_parquet_options(table: pa.Table) -> dict[str, Any]:
    """``pq.write_table`` options for a table with top-k columns (none for other tables): zstd,
    and BYTE_STREAM_SPLIT on the top-k values (measured in ``bench/kd.py``: -25% against snappy)."""
    topk = [c for c in TOPK_COLUMNS if c in table.column_names]
    if not topk:
        return {}
    return {"compression": "zstd",
            "use_byte_stream_split": [f"{c}.list.element.list.element" for c in topk],
            "use_dictionary": [c for c in table.column_names if c not in topk]}


def teachers_of(table: pa.Table) -> list[dict[str, Any]]:
    """The distinct ``kd_teacher`` values of a table's rows, decoded (none when it has no KD column)."""
    if "kd_teacher" not in table.column_names:
        return []
    values = table["kd_teacher"].drop_null().unique().to_pylist()
    return [json.loads(v) for v in sorted(values)]


def with_kd_metadata(table: pa.Table) -> pa.Table:
    """``table`` with its rows' KD metadata in the schema metadata (unchanged when it has none)."""
    teachers = teachers_of(table)
    if not teachers:
        return table
    meta = dict(table.schema.metadata or {})
    meta[KD_METADATA_KEY] = json.dumps(teachers, sort_keys=True).encode()
    return table.replace_schema_metadata(meta)


def read_kd_metadata(schema: pa.Schema) -> list[dict[str, Any]]:
    """The KD metadata of a Parquet file's schema (``pq.read_schema(path)``); [] when none."""
    raw = (schema.metadata or {}).get(KD_METADATA_KEY)
    return json.loads(raw) if raw else []
