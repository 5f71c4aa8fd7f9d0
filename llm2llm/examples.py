"""The loop's example sets as rows: reading the seeds and the held-out set, and the training set's table.

Seeds and held-out rows are read as ``thresher ingest`` reads any input (:func:`read_file`: every
format it knows, unreadable rows quarantined with their file, row and reason), then sampled with
a fixed seed (the reference samples its 1% of GSM8K without one). A seed must end with an
assistant turn: its answer is the gold answer the student is graded against, and a row without one
is rejected (``llm2llm_no_answer``), and so is one whose answer the grader cannot read
(``llm2llm_no_gold_answer``: a GSM8K answer without ``#### <number>``).

The training set of an iteration is the seeds (``iteration`` 0) followed by every augmentation
accepted so far (``iteration`` = the one that made it, ``teacher`` = the teacher's identity,
``parent_row_id`` = its seed), in the canonical record schema plus those two columns: the
Parquet a user would train on, and what the trainer reads.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
import pyarrow as pa

from thresher.llm2llm.config import ExamplesConfig
from thresher.llm2llm.graders import Grader
from thresher.schemas.readers import discover_inputs, read_file
from thresher.schemas.records import RECORD_SCHEMA, make_rejected, messages_text

READ_STAGE = "llm2llm_read"

TRAINING_SCHEMA = pa.schema([*RECORD_SCHEMA, pa.field("iteration", pa.int32()), pa.field("teacher", pa.string())])


@dataclass
class ExampleSet:
    """Rows read for one role (``seeds`` or ``held_out``): the sample, and what was read and rejected."""

    role: str
    records: list[dict[str, Any]] = field(default_factory=list)  # the sample, in file order
    n_read: int = 0  # raw rows in the files
    n_valid: int = 0  # rows that became records (before sampling)
    rejected: list[dict[str, Any]] = field(default_factory=list)

    @property
    def n_not_sampled(self) -> int:
        return self.n_valid - len(self.records)


def question(record: dict[str, Any]) -> str:
    """The last user turn: the question a seed asks."""
    return next(m["content"] for m in reversed(record["messages"]) if m["role"] == "user")


def gold_answer(record: dict[str, Any]) -> str:
    """The final assistant turn: the gold answer."""
    return record["messages"][-1]["content"]


def prompt(record: dict[str, Any]) -> list[dict[str, str]]:
    """The conversation the student answers: every turn before the gold answer."""
    return [dict(m) for m in record["messages"][:-1]]


def read_examples(config: ExamplesConfig, role: str, grader: Grader) -> ExampleSet:
    """Read ``config``'s files, quarantine what cannot be a graded example, sample ``limit`` rows."""
    out = ExampleSet(role)
    valid: list[dict[str, Any]] = []
    for path in discover_inputs(config.inputs):
        result = read_file(path, config.format, config.max_row_bytes)
        out.n_read += result.n_input
        out.rejected += result.rejected
        for record in result.records:
            messages = record["messages"]
            if len(messages) < 2 or messages[-1]["role"] != "assistant" or not any(
                    m["role"] == "user" for m in messages[:-1]):
                out.rejected.append(make_rejected(
                    source=record["source"], source_row=record["source_row"], stage=READ_STAGE,
                    reason="llm2llm_no_answer", row_id=record["row_id"], raw=messages_text(messages),
                    detail=f"a {role} row needs a user question and a final assistant answer (its gold answer)"))
                continue
            if grader.extract(messages[-1]["content"]) is None:
                out.rejected.append(make_rejected(
                    source=record["source"], source_row=record["source_row"], stage=READ_STAGE,
                    reason="llm2llm_no_gold_answer", row_id=record["row_id"], raw=messages_text(messages),
                    detail=f"the {grader.name} grader finds no answer in the row's final turn"))
                continue
            valid.append(record)
    out.n_valid = len(valid)
    if config.limit is not None and config.limit < len(valid):
        picked = np.random.default_rng(config.sample_seed).choice(len(valid), config.limit, replace=False)
        valid = [valid[i] for i in sorted(picked.tolist())]
    out.records = valid
    return out


def rows_digest(records: Sequence[dict[str, Any]]) -> str:
    """sha256 of the rows' ids and contents, in order: what a trained student or an evaluation depends on."""
    h = hashlib.sha256()
    for r in records:
        h.update(f"{r['row_id']}\x1f{r['content_id']}\x1e".encode())
    return h.hexdigest()


def training_table(seeds: Sequence[dict[str, Any]], augmentations: Sequence[dict[str, Any]]) -> pa.Table:
    """The training set: seeds (iteration 0) then the accepted augmentations, in the order accepted."""
    rows = [{**r, "iteration": 0, "teacher": None} for r in seeds] + list(augmentations)
    return pa.Table.from_pylist(rows, schema=TRAINING_SCHEMA)
