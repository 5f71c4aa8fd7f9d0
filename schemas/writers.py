"""Output writers: the Parquet data set, the rejected rows, the attributes, the manifest.

Layout of ``OUT/``::

    data/part-NNNNN.parquet        row_id, group_id, content_id, messages, source, source_row, candidate,
                                   meta, parent_row_id, origin (see schemas.records)
    attributes/part-NNNNN.parquet  row_id + every attribute column stages wrote (kept rows), except
                                   intermediate wide columns (embeddings) unless output.keep_columns names them
    rejected/part-NNNNN.parquet    row_id, source, source_row, candidate, stage, reason, code, detail,
                                   value, kept_row_id, evidence, raw (see schemas.records.REJECTION_FIELDS)
    rejected/ingest.parquet        the rows reading and sharding rejected
    replaced/part-NNNNN.parquet    the rows a stage replaced with a row it created (a response, a
                                   corrected response), as they were, + replaced_by (the stage)
    manifest.json                  counts, config, versions, timings
    report.md                      the funnel, for people

``data/`` loads as-is with ``datasets.load_dataset("parquet", data_files="OUT/data/*.parquet")``
and TRL's ``SFTTrainer`` (the ``messages`` column). Each shard's rows are one part
(``NNNNN`` its index), written by the worker that holds them
(:mod:`thresher.flows.output_parts`); ``data/`` and ``attributes/`` parts of one name hold
the same rows in the same order. The folders are written to a staging folder first and
swapped in whole, so a crash never leaves half an output and no part of an earlier run stays.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from thresher.schemas.kd import kd_parquet_options
from thresher.schemas.secrets import redact

OUTPUT_FOLDERS = ("data", "attributes", "rejected", "replaced")


def write_part(table: pa.Table, folder: Path, stem: str, rows_per_file: int) -> list[str]:
    """``table`` as ``folder/<stem>.parquet``, or as ``<stem>-000.parquet``, ``<stem>-001.parquet``, ...
    when it holds more than ``rows_per_file`` rows (names sort in row order either way)."""
    folder.mkdir(parents=True, exist_ok=True)
    n_parts = max(1, -(-table.num_rows // rows_per_file))
    names = [f"{stem}.parquet"] if n_parts == 1 else [f"{stem}-{part:03d}.parquet" for part in range(n_parts)]
    for part, name in enumerate(names):
        pq.write_table(table.slice(part * rows_per_file, rows_per_file), folder / name, **kd_parquet_options(table))
    return names


def new_staging(out: Path) -> Path:
    """A fresh folder inside ``out`` for a run's output parts, swapped in whole by :func:`swap_in`
    (the staging folder of a run that was stopped before its swap goes first)."""
    for leftover in out.glob(".staging-*"):
        shutil.rmtree(leftover, ignore_errors=True)
    staging = out / f".staging-{uuid.uuid4().hex[:8]}"
    staging.mkdir(parents=True)
    return staging


def swap_in(out: Path, staging: Path) -> None:
    """Replace ``out``'s output folders with ``staging``'s, each whole (an earlier run's parts go)."""
    for folder in OUTPUT_FOLDERS:
        target = out / folder
        old = out / f".old-{folder}-{uuid.uuid4().hex[:8]}"
        if target.exists():
            os.rename(target, old)
        os.rename(staging / folder, target)
        shutil.rmtree(old, ignore_errors=True)
    shutil.rmtree(staging, ignore_errors=True)


def write_json_atomic(path: Path, value: Any) -> None:
    """``value`` as JSON, credentials redacted (:func:`thresher.schemas.secrets.redact`), atomically."""
    write_text_atomic(path, json.dumps(value, indent=2, sort_keys=False, default=str, ensure_ascii=False))


def write_text_atomic(path: Path, text: str) -> None:
    """``text``, credentials redacted, atomically (temp file + rename)."""
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}")
    tmp.write_text(redact(text))
    os.replace(tmp, path)
