"""Output writers: the Parquet data set, the rejected rows, the attributes, the manifest.

Layout of ``OUT/``::

    data/part-00000.parquet        row_id, group_id, content_id, messages, source, source_row, candidate,
                                   meta, parent_row_id, origin (see schemas.records)
    attributes/part-00000.parquet  row_id + every attribute column stages wrote (kept rows)
    rejected/part-00000.parquet    row_id, source, source_row, candidate, stage, reason, code, detail,
                                   value, kept_row_id, evidence, raw (see schemas.records.REJECTION_FIELDS)
    replaced/part-00000.parquet    the rows a stage replaced with a row it created (a response, a
                                   corrected response), as they were, + replaced_by (the stage)
    manifest.json                  counts, config, versions, timings
    report.md                      the funnel, for people

``data/`` loads as-is with ``datasets.load_dataset("parquet", data_files="OUT/data/*.parquet")``
and TRL's ``SFTTrainer`` (the ``messages`` column). The folders are written to a
temporary folder first and swapped in, so a crash never leaves half an output.
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

from thresher.schemas.kd import kd_parquet_options, with_kd_metadata
from thresher.schemas.records import RECORD_SCHEMA
from thresher.schemas.secrets import redact

OUTPUT_FOLDERS = ("data", "attributes", "rejected", "replaced")


def _write_parts(table: pa.Table, folder: Path, rows_per_file: int) -> list[str]:
    folder.mkdir(parents=True, exist_ok=True)
    names = []
    n_parts = max(1, -(-table.num_rows // rows_per_file))
    for part in range(n_parts):
        name = f"part-{part:05d}.parquet"
        pq.write_table(table.slice(part * rows_per_file, rows_per_file), folder / name, **kd_parquet_options(table))
        names.append(name)
    return names


def split_output(rows: pa.Table) -> tuple[pa.Table, pa.Table]:
    """(canonical data columns, row_id + attribute columns) of the kept rows."""
    data = rows.select(RECORD_SCHEMA.names).cast(RECORD_SCHEMA)
    extra = [c for c in rows.column_names if c not in RECORD_SCHEMA.names]
    return data, rows.select(["row_id", *extra])


def write_outputs(out: Path, kept: pa.Table, rejected: pa.Table, replaced: pa.Table,
                  rows_per_file: int) -> dict[str, list[str]]:
    """Write data/, attributes/, rejected/ and replaced/ atomically (swap in whole folders)."""
    out.mkdir(parents=True, exist_ok=True)
    staging = out / f".staging-{uuid.uuid4().hex[:8]}"
    data, attributes = split_output(kept)
    attributes = with_kd_metadata(attributes)  # the teacher of KD labels, in the schema metadata
    data = data.replace_schema_metadata({**(data.schema.metadata or {}), **(attributes.schema.metadata or {})})
    files = {
        "data": _write_parts(data, staging / "data", rows_per_file),
        "attributes": _write_parts(attributes, staging / "attributes", rows_per_file),
        "rejected": _write_parts(rejected, staging / "rejected", rows_per_file),
        "replaced": _write_parts(replaced, staging / "replaced", rows_per_file),
    }
    for folder in OUTPUT_FOLDERS:
        target = out / folder
        old = out / f".old-{folder}-{uuid.uuid4().hex[:8]}"
        if target.exists():
            os.rename(target, old)
        os.rename(staging / folder, target)
        shutil.rmtree(old, ignore_errors=True)
    shutil.rmtree(staging, ignore_errors=True)
    return files


def write_json_atomic(path: Path, value: Any) -> None:
    """``value`` as JSON, credentials redacted (:func:`thresher.schemas.secrets.redact`), atomically."""
    write_text_atomic(path, json.dumps(value, indent=2, sort_keys=False, default=str, ensure_ascii=False))


def write_text_atomic(path: Path, text: str) -> None:
    """``text``, credentials redacted, atomically (temp file + rename)."""
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}")
    tmp.write_text(redact(text))
    os.replace(tmp, path)
