"""Ingest: read one input file into canonical records and rejected rows, stored under its key.

The key digests the file's bytes, the reader version and the ingest settings, so an
unchanged file is never read twice (a re-run or a resumed run reuses it).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from thresher.flows.store import Store, digest, file_digest
from thresher.schemas.config import IngestConfig
from thresher.schemas.formats import REASON_UNREADABLE_FILE
from thresher.schemas.readers import INGEST_STAGE, READER_VERSION, UnreadableFileError, read_file, source_name
from thresher.schemas.records import make_rejected, records_table, rejected_table


def ingest_file(path: str, ingest: IngestConfig, store_root: str) -> dict[str, Any]:
    """Read one input file into canonical records + rejected rows, stored under its key."""
    store = Store(store_root)
    file = Path(path)
    key = digest({
        "reader": READER_VERSION, "file": file_digest(file), "source": source_name(file),
        "format": ingest.format, "max_row_bytes": ingest.max_row_bytes,
    })
    if store.is_done(INGEST_STAGE, key):
        return {**store.read_info(INGEST_STAGE, key), "cached": True}
    started = time.perf_counter()
    try:
        result = read_file(file, ingest.format, ingest.max_row_bytes)
        records, rejected, fmt = result.records, result.rejected, result.format
    except UnreadableFileError as err:
        if ingest.on_unreadable_file == "error":
            raise
        records, fmt = [], None
        rejected = [make_rejected(source=source_name(file), source_row=-1, stage=INGEST_STAGE,
                                  reason=REASON_UNREADABLE_FILE, detail=err.reason, raw=None)]
    info = {
        "path": str(file), "source": source_name(file), "key": key, "format": fmt,
        "records": len(records), "rejected": len(rejected),
        "seconds": round(time.perf_counter() - started, 3),
    }
    store.write(INGEST_STAGE, key, {"records": records_table(records), "rejected": rejected_table(rejected)}, info)
    return {**info, "cached": False}
