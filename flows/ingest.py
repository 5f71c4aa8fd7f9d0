"""Ingest: read one input file into canonical records and rejected rows, stored under its key.

The key digests the file's bytes, the reader version and the ingest settings, so an
unchanged file is never read twice (a re-run or a resumed run reuses it).

The file is read in batches (:func:`~thresher.schemas.readers.iter_file_batches`) and each
batch is appended to ``records.parquet`` and ``rejected.parquet`` in the store's temporary
folder as it comes, so memory holds about one batch, not the file (a ``.json`` file, one
JSON document, is the exception: its text is parsed whole). The result appears only once
complete (:meth:`Store.staging` / :meth:`Store.commit`).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq

from thresher.flows.store import Store, digest, file_digest
from thresher.schemas.config import IngestConfig
from thresher.schemas.formats import REASON_UNREADABLE_FILE
from thresher.schemas.readers import (
    BATCH_ROWS, INGEST_STAGE, READER_VERSION, UnreadableFileError, iter_file_batches, source_name,
)
from thresher.schemas.records import (
    RECORD_SCHEMA, REJECTED_SCHEMA, make_rejected, records_table, rejected_table,
)


def ingest_key(file: Path, ingest: IngestConfig) -> str:
    """The key of a file's ingest result: its bytes, its source name, the reader and its settings."""
    return digest({
        "reader": READER_VERSION, "file": file_digest(file), "source": source_name(file),
        "format": ingest.format, "max_row_bytes": ingest.max_row_bytes,
    })


def ingest_file(path: str, ingest: IngestConfig, store_root: str, batch_rows: int = BATCH_ROWS) -> dict[str, Any]:
    """Read one input file into canonical records + rejected rows, stored under its key.

    ``batch_rows`` (raw rows read and written at a time) bounds memory; it is no part of
    the key: the stored rows are the same whatever it is.
    """
    store = Store(store_root)
    file = Path(path)
    key = ingest_key(file, ingest)
    if store.is_done(INGEST_STAGE, key):
        return {**store.read_info(INGEST_STAGE, key), "cached": True}
    started = time.perf_counter()
    with store.staging(INGEST_STAGE, key) as tmp:
        records_file, rejected_file = tmp / "records.parquet", tmp / "rejected.parquet"
        try:
            fmt, n_records, n_rejected = _write_batches(
                iter_file_batches(file, ingest.format, ingest.max_row_bytes, batch_rows=batch_rows),
                records_file, rejected_file)
        except UnreadableFileError as err:
            if ingest.on_unreadable_file == "error":
                raise
            # Whatever was written before the file failed is replaced: no record, one rejected entry.
            fmt, n_records, n_rejected = None, 0, 1
            pq.write_table(records_table([]), records_file)
            pq.write_table(rejected_table([make_rejected(
                source=source_name(file), source_row=-1, stage=INGEST_STAGE,
                reason=REASON_UNREADABLE_FILE, detail=err.reason, raw=None)]), rejected_file)
        info = {
            "path": str(file), "source": source_name(file), "key": key, "format": fmt,
            "records": n_records, "rejected": n_rejected,
            "seconds": round(time.perf_counter() - started, 3),
        }
        store.commit(INGEST_STAGE, key, tmp, info)
    return {**info, "cached": False}


def _write_batches(batches, records_file: Path, rejected_file: Path) -> tuple[str | None, int, int]:
    """Append every batch's records and rejected rows to their Parquet files (each written even
    when empty); returns (the file's format, records, rejected)."""
    fmt, n_records, n_rejected = None, 0, 0
    with pq.ParquetWriter(records_file, RECORD_SCHEMA) as records, \
            pq.ParquetWriter(rejected_file, REJECTED_SCHEMA) as rejected:
        for batch in batches:
            fmt = batch.format
            if batch.records:
                records.write_table(records_table(batch.records))
                n_records += len(batch.records)
            if batch.rejected:
                rejected.write_table(rejected_table(batch.rejected))
                n_rejected += len(batch.rejected)
    return fmt, n_records, n_rejected
