"""Split ingest: one large JSONL file read by several tasks at once, with the very rows one task gives.

A JSONL file larger than ``ingest.split_min_bytes`` is cut into byte ranges at line starts
when the run has fewer files than worker threads (:func:`plan_ranges`); each range is read by
its own task (:func:`ingest_range`: JSON parsing, validation, normalization and the ids, the
costly part), and one task per file then joins the ranges into the file's ingest result
(:func:`join_ranges`), stored under the same key as a whole-file read, so everything after
ingest is unchanged and a later run reuses it whichever way it was read.

What a whole-file read decides over the whole file is made whole again when joining:

- ``source_row`` (the line number) and the row numbers in details get the lines of the
  ranges before;
- a conversation repeated in the same file gets its occurrence number counted over the whole
  file, so its ``row_id`` (which holds that number) is recomputed where earlier ranges held
  the same content;
- the format is the one the file's first good row shows, found before the ranges start
  (:func:`head_format`).

A file whose rows repeat an id across two ranges (a quarantine decision that would change
which rows count as repeats), or whose head shows no format, is read again whole, in the
joining task: the result is the same either way.
"""

from __future__ import annotations

import re
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from thresher.flows.ingest import _write_batches, ingest_file, ingest_key
from thresher.flows.store import Store, digest
from thresher.schemas.config import IngestConfig
from thresher.schemas.formats import REASON_DUPLICATE_ID
from thresher.schemas.readers import (
    BATCH_BYTES, BATCH_ROWS, INGEST_STAGE, FileReader, FileResult, iter_raw_records, source_name,
)
from thresher.schemas.records import RECORD_SCHEMA, REJECTED_SCHEMA, row_id

RANGE_STAGE = "ingest_range"
SPLIT_SUFFIXES = (".jsonl", ".ndjson")
#: lines read from a file's head to find its format before its ranges start
HEAD_LINES = 10_000


def plan_ranges(path: Path, parts: int) -> list[tuple[int, int]]:
    """``parts`` byte ranges of nearly equal size covering the file, each starting at a line start."""
    size = path.stat().st_size
    cuts = [0]
    with open(path, "rb") as handle:
        for part in range(1, parts):
            handle.seek(max(cuts[-1], size * part // parts))
            if handle.tell() > 0:
                handle.seek(handle.tell() - 1)
                handle.readline()  # to the end of the line the cut fell in
            if handle.tell() >= size:
                break
            if handle.tell() > cuts[-1]:
                cuts.append(handle.tell())
    return [(start, end) for start, end in zip(cuts, [*cuts[1:], size])]


def ranges_per_file(sizes: list[int], suffixes: list[str], slots: int, min_bytes: int) -> list[int]:
    """How many ranges each file is read in: enough that the ingest has a task per worker thread
    when the files are fewer, never a range under ``min_bytes``, only JSONL files split."""
    if len(sizes) >= slots:
        return [1] * len(sizes)
    total = sum(sizes) or 1
    return [max(1, min(size // max(1, min_bytes), -(-slots * size // total))) if suffix in SPLIT_SUFFIXES else 1
            for size, suffix in zip(sizes, suffixes)]


def head_format(path: Path, ingest: IngestConfig) -> str | None:
    """The format a whole-file read settles on: that of the first good row (None: none in the
    first :data:`HEAD_LINES` lines, and the file is read whole)."""
    reader = FileReader(path, ingest.format, ingest.max_row_bytes)
    scratch = FileResult(reader.source, reader.format)
    for n, raw in enumerate(iter_raw_records(path)):
        reader.read(raw, scratch)
        if reader.format is not None or n >= HEAD_LINES:
            break
    return reader.format


def plan_ingest(paths: list[str], ingest: IngestConfig, slots: int, store_root: str) -> list[dict[str, Any]]:
    """Per input: ``{"path"}`` (one task reads it whole) or ``{"path", "key", "ranges": [[start, end,
    format], ...]}`` (a task per range, then :func:`join_ranges`); a file already ingested is never split."""
    files = [Path(p) for p in paths]
    sizes = [f.stat().st_size if f.is_file() else 0 for f in files]
    parts = ranges_per_file(sizes, [f.suffix.lower() for f in files], slots, ingest.split_min_bytes)
    store = Store(store_root)
    plans: list[dict[str, Any]] = []
    for file, n in zip(files, parts):
        key = ingest_key(file, ingest) if n > 1 else None
        fmt = head_format(file, ingest) if key and not store.is_done(INGEST_STAGE, key) else None
        ranges = plan_ranges(file, n) if fmt else []
        if len(ranges) < 2:
            plans.append({"path": str(file)})
            continue
        plans.append({"path": str(file), "key": key,
                      "ranges": [[start, end, None if i == 0 else fmt] for i, (start, end) in enumerate(ranges)]})
    return plans


def _range_key(file_key: str, start: int, end: int, fmt: str | None) -> str:
    return digest({"file": file_key, "start": start, "end": end, "format": fmt})


def _count_lines(path: Path, start: int, end: int) -> int:
    """Lines in the byte range (a last line without its newline counted)."""
    lines, last = 0, b"\n"
    with open(path, "rb") as handle:
        handle.seek(start)
        left = end - start
        while left > 0:
            block = handle.read(min(left, 1 << 24))
            if not block:
                break
            lines += block.count(b"\n")
            last = block[-1:]
            left -= len(block)
    return lines + (last != b"\n" and end > start)


def ingest_range(path: str, start: int, end: int, fmt: str | None, file_key: str, ingest: IngestConfig,
                 store_root: str) -> dict[str, Any]:
    """Read one byte range of a JSONL file (rows numbered from 0 within it) into the store;
    ``fmt``: the file's format (:func:`head_format`), None for the first range (it finds it)."""
    store = Store(store_root)
    file = Path(path)
    key = _range_key(file_key, start, end, fmt)
    if store.is_done(RANGE_STAGE, key):
        return {**store.read_info(RANGE_STAGE, key), "cached": True}
    started = time.perf_counter()
    reader = FileReader(file, ingest.format if fmt is None else fmt, ingest.max_row_bytes, byte_range=(start, end))
    with store.staging(RANGE_STAGE, key) as tmp:
        _, n_records, n_rejected = _write_batches(reader.batches(BATCH_ROWS, BATCH_BYTES),
                                                  tmp / "records.parquet", tmp / "rejected.parquet")
        pq.write_table(pa.table({"id": pa.array(sorted(reader.seen_ids), pa.string())}), tmp / "ids.parquet")
        info = {"key": key, "start": start, "end": end, "format": reader.format, "records": n_records,
                "rejected": n_rejected, "lines": _count_lines(file, start, end),
                "seconds": round(time.perf_counter() - started, 3)}
        store.commit(RANGE_STAGE, key, tmp, info)
    return {**info, "cached": False}


def _ids_repeat_across(store: Store, ranges: list[dict]) -> bool:
    seen: set[str] = set()
    for r in ranges:
        ids = store.read_table(RANGE_STAGE, r["key"], "ids")["id"].to_pylist()
        if seen.intersection(ids):
            return True
        seen.update(ids)
    return False


_ROW_IN_DETAIL = re.compile(r"already used by row (\d+)$")


def _shift_rows(table: pa.Table, lines_before: int) -> pa.Table:
    """``table`` with its ``source_row`` (and a duplicate id's row in ``detail``) counted from the file's start."""
    if not lines_before or not table.num_rows:
        return table
    index = table.schema.get_field_index("source_row")
    table = table.set_column(index, "source_row", pc.add(table["source_row"], lines_before))
    if "detail" in table.column_names and "reason" in table.column_names:
        details = [(_ROW_IN_DETAIL.sub(lambda m: f"already used by row {int(m.group(1)) + lines_before}", d)
                    if r == REASON_DUPLICATE_ID else d)
                   for d, r in zip(table["detail"].to_pylist(), table["reason"].to_pylist())]
        table = table.set_column(table.schema.get_field_index("detail"), "detail", pa.array(details, pa.string()))
    return table


def _renumber_repeats(records: pa.Table, seen: Counter) -> pa.Table:
    """Give rows whose content earlier ranges held their occurrence over the whole file (new ``row_id``)."""
    contents = records["content_id"].to_pylist()
    earlier = [seen[c] for c in contents]
    local: Counter = Counter()
    occurrence = []
    for c in contents:
        occurrence.append(local[c])
        local[c] += 1
    seen.update(local)
    redo = np.flatnonzero(np.array(earlier, dtype=np.int64) > 0) if contents else np.array([], np.int64)
    if not redo.size:
        return records
    ids = records["row_id"].to_pylist()
    messages = records["messages"].take(pa.array(redo)).to_pylist()
    sources = records["source"].to_pylist()
    for i, m in zip(redo, messages):
        ids[i] = row_id(m, sources[i], earlier[i] + occurrence[i])
    return records.set_column(records.schema.get_field_index("row_id"), "row_id", pa.array(ids, pa.string()))


def join_ranges(path: str, ranges: list[dict], file_key: str, ingest: IngestConfig, store_root: str) -> dict[str, Any]:
    """The file's ingest result from its ranges' (or, when an id repeats across ranges, from reading it whole)."""
    store = Store(store_root)
    file = Path(path)
    if store.is_done(INGEST_STAGE, file_key):
        return {**store.read_info(INGEST_STAGE, file_key), "cached": True}
    if _ids_repeat_across(store, ranges):
        return {**ingest_file(path, ingest, store_root), "split": "read whole: an id repeats across ranges"}
    started = time.perf_counter()
    seen: Counter = Counter()
    lines_before = n_records = n_rejected = 0
    with store.staging(INGEST_STAGE, file_key) as tmp, \
            pq.ParquetWriter(tmp / "records.parquet", RECORD_SCHEMA) as records_out, \
            pq.ParquetWriter(tmp / "rejected.parquet", REJECTED_SCHEMA) as rejected_out:
        for r in ranges:
            records = _shift_rows(store.read_table(RANGE_STAGE, r["key"], "records"), lines_before)
            records_out.write_table(_renumber_repeats(records, seen))
            rejected_out.write_table(_shift_rows(store.read_table(RANGE_STAGE, r["key"], "rejected"), lines_before))
            lines_before += r["lines"]
            n_records += r["records"]
            n_rejected += r["rejected"]
        records_out.close()
        rejected_out.close()
        info = {"path": str(file), "source": source_name(file), "key": file_key,
                "format": next((r["format"] for r in ranges if r["format"]), None),
                "records": n_records, "rejected": n_rejected, "ranges": len(ranges),
                "seconds": round(sum(r["seconds"] for r in ranges) + time.perf_counter() - started, 3)}
        store.commit(INGEST_STAGE, file_key, tmp, info)
    return {**info, "cached": False}
