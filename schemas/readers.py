"""Read input files into canonical records, quarantining every row that cannot be read.

Accepted inputs: JSON (a list of objects, or an object holding one such list),
JSONL, Parquet, and ``datasets`` ``save_to_disk`` folders; given as files, globs
or directories (searched recursively). A row that cannot be read (malformed
JSON line, invalid UTF-8, wrong type, missing or empty field, unknown role,
duplicated id, over the size limit) becomes a rejected entry with its file, row,
reason and raw text; it never stops the file. A file that cannot be read at all
raises :class:`UnreadableFileError` (or, by option, becomes one rejected entry).

A file is read in batches (:func:`iter_file_batches`): JSONL, Parquet and ``datasets``
folders never need the whole file in memory; :func:`read_file` collects the batches.
"""

from __future__ import annotations

import glob
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from thresher.schemas import formats as F
from thresher.schemas.records import make_record, make_rejected, with_occurrence

READER_VERSION = "1"
DATA_SUFFIXES = (".json", ".jsonl", ".ndjson", ".parquet")
INGEST_STAGE = "ingest"


class UnreadableFileError(RuntimeError):
    """A whole input file cannot be read (names the file and why)."""

    def __init__(self, path: Path | str, reason: str):
        super().__init__(f"cannot read {path}: {reason}")
        self.path = str(path)
        self.reason = reason


class NoInputError(RuntimeError):
    """An input pattern matched no file."""


@dataclass
class RawRecord:
    index: int
    raw: str | None
    value: Any = None
    error: F.RowError | None = None


@dataclass
class FileResult:
    """What reading one file produced."""

    source: str
    format: str | None
    records: list[dict] = field(default_factory=list)
    rejected: list[dict] = field(default_factory=list)

    @property
    def n_input(self) -> int:
        return len(self.records) + len(self.rejected)


def is_datasets_folder(path: Path) -> bool:
    return path.is_dir() and (
        (path / "dataset_info.json").exists()
        or (path / "state.json").exists()
        or (path / "dataset_dict.json").exists()
    )


def discover_inputs(patterns: list[str]) -> list[Path]:
    """Expand files, globs and directories into a sorted, de-duplicated list of inputs."""
    found: dict[Path, None] = {}
    for pattern in patterns:
        matches = [Path(p) for p in sorted(glob.glob(str(pattern), recursive=True))]
        if not matches:
            raise NoInputError(f"input '{pattern}' matches no file or folder")
        for match in matches:
            for path in _expand(match):
                found.setdefault(path.resolve(), None)
    if not found:
        raise NoInputError(f"inputs {patterns} hold no .json/.jsonl/.parquet file or datasets folder")
    return sorted(found)


def _expand(path: Path) -> Iterator[Path]:
    if path.is_file():
        yield path
    elif is_datasets_folder(path):
        yield path
    elif path.is_dir():
        for child in sorted(path.iterdir()):
            if child.name.startswith("."):
                continue
            if child.is_dir() or child.suffix.lower() in DATA_SUFFIXES:
                yield from _expand(child)


def source_name(path: Path) -> str:
    """``<parent folder>/<file name>``: stable wherever the data set is stored."""
    return f"{path.parent.name}/{path.name}"


# --------------------------------------------------------------------------- raw records


def _has_lone_surrogate(value: Any) -> bool:
    if isinstance(value, str):
        try:  # only a lone surrogate (a byte that was not UTF-8, read back) fails to encode
            value.encode("utf-8")
            return False
        except UnicodeEncodeError:
            return True
    if isinstance(value, dict):
        return any(_has_lone_surrogate(k) or _has_lone_surrogate(v) for k, v in value.items())
    if isinstance(value, list):
        return any(_has_lone_surrogate(v) for v in value)
    return False


def _printable(text: str) -> str:
    """Readable text: undecodable input bytes shown as ``\\xNN``, lone surrogates as ``\\udXXX``."""
    try:
        data = text.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:
        return text.encode("utf-8", "backslashreplace").decode("utf-8")
    return data.decode("utf-8", "backslashreplace")


def _dump(value: Any) -> str:
    return _printable(json.dumps(value, ensure_ascii=False, default=str))


def _iter_jsonl(path: Path, start: int = 0, end: int | None = None) -> Iterator[RawRecord]:
    """The lines of a JSONL file, or of its byte range [start, end) (which starts at a line start;
    its lines numbered from 0)."""
    with open(path, "rb") as handle:
        handle.seek(start)
        position = start
        for index, line in enumerate(handle):
            if end is not None and position >= end:
                break
            position += len(line)
            if not line.strip():
                continue
            try:
                text = line.decode("utf-8")
            except UnicodeDecodeError as err:
                raw = line.decode("utf-8", "backslashreplace").rstrip("\r\n")
                detail = f"invalid UTF-8 byte at column {err.start + 1}"
                yield RawRecord(index, raw, error=F.RowError(F.REASON_INVALID_UTF8, detail))
                continue
            text = text.rstrip("\r\n")
            try:
                yield RawRecord(index, text, json.loads(text))
            except json.JSONDecodeError as err:
                detail = f"{err.msg} at column {err.colno}"
                yield RawRecord(index, text, error=F.RowError(F.REASON_MALFORMED_JSON, detail))


def _iter_json(path: Path) -> Iterator[RawRecord]:
    # One JSON document: parsed whole (json has no incremental parser); its rows are still
    # handed on one by one. Large inputs belong in JSONL or Parquet, which stream.
    text = path.read_bytes().decode("utf-8", "surrogateescape")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        first = text.lstrip().split("\n", 1)[0]
        if first.startswith("{"):  # a JSONL file named .json
            yield from _iter_jsonl(path)
            return
        raise UnreadableFileError(path, f"malformed JSON: {err.msg} at line {err.lineno}, column {err.colno}")
    if isinstance(data, dict):
        lists = [v for v in data.values() if isinstance(v, list)]
        if len(lists) != 1:
            raise UnreadableFileError(path, "a JSON file must hold a list of rows (or an object with one list)")
        data = lists[0]
    if not isinstance(data, list):
        raise UnreadableFileError(path, f"a JSON file must hold a list of rows, found {type(data).__name__}")
    for index, value in enumerate(data):
        yield RawRecord(index, None, value)


def _iter_parquet(path: Path) -> Iterator[RawRecord]:
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(path)
    except Exception as err:  # pyarrow raises several types for a broken file
        raise UnreadableFileError(path, f"not a readable Parquet file ({err})") from err
    index = 0
    for batch in parquet.iter_batches(batch_size=4096):
        for value in batch.to_pylist():
            yield RawRecord(index, None, value)
            index += 1


def _iter_datasets_folder(path: Path) -> Iterator[RawRecord]:
    import datasets

    try:
        loaded = datasets.load_from_disk(str(path))
    except Exception as err:
        raise UnreadableFileError(path, f"not a readable datasets folder ({err})") from err
    splits = [loaded[name] for name in sorted(loaded)] if isinstance(loaded, datasets.DatasetDict) else [loaded]
    index = 0
    for split in splits:
        for batch in split.data.table.to_batches(max_chunksize=4096):
            for value in batch.to_pylist():
                yield RawRecord(index, None, value)
                index += 1


def iter_raw_records(path: Path) -> Iterator[RawRecord]:
    """Every record of a file, in order, parsed or carrying the error that stopped it."""
    if is_datasets_folder(path):
        return _iter_datasets_folder(path)
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".ndjson"):
        return _iter_jsonl(path)
    if suffix == ".json":
        return _iter_json(path)
    if suffix == ".parquet":
        return _iter_parquet(path)
    raise UnreadableFileError(path, f"unknown file type '{suffix}' (expected .json, .jsonl, .parquet or a datasets folder)")


# --------------------------------------------------------------------------- one file

#: Raw rows (lines of a JSONL file, rows of a Parquet file) per batch when a file is read in
#: batches: ingest holds about one batch of records in memory, whatever the file's size.
BATCH_ROWS = 4096
#: A batch also closes once its raw rows reach this many bytes (rows can be large).
BATCH_BYTES = 64 << 20


class FileReader:
    """Turns one file's raw records into canonical records and rejected entries.

    Holds the state that spans the whole file, whatever the batches: the format (detected
    on the first good row), the ids seen (a repeated id is quarantined) and how often each
    content was seen (its occurrence number goes into the ``row_id``). Both maps grow with
    the file; content ids (24 hex digits) are kept as 96-bit ints, 40 bytes each instead of
    the string's 73.
    """

    def __init__(self, path: Path, fmt: str, max_row_bytes: int, byte_range: tuple[int, int] | None = None):
        if fmt != "auto" and fmt not in F.FORMATS:
            raise ValueError(f"unknown format '{fmt}'; choose one of: auto, {', '.join(F.FORMATS)}")
        self.path = path
        self.source = source_name(path)
        self.format: str | None = None if fmt == "auto" else fmt
        self.max_row_bytes = max_row_bytes
        self.seen_ids: dict[str, int] = {}
        self.occurrences: dict[int, int] = {}
        self.byte_range = byte_range  # a JSONL file's lines in [start, end) only (thresher.flows.ingest_split)

    def batches(self, batch_rows: int, batch_bytes: int) -> Iterator[FileResult]:
        """The file's records and rejected entries, one :class:`FileResult` per ``batch_rows``
        raw rows (or ``batch_bytes`` of them), in file order (at least one, empty for an empty
        file); ``format`` is the format known so far."""
        if not self.path.exists():
            raise UnreadableFileError(self.path, "no such file")
        batch = FileResult(self.source, self.format)
        rows = size = 0
        first = True
        raws = _iter_jsonl(self.path, *self.byte_range) if self.byte_range else iter_raw_records(self.path)
        for raw in raws:
            size += self.read(raw, batch)
            rows += 1
            if rows >= batch_rows or size >= batch_bytes:
                batch.format = self.format
                yield batch
                batch = FileResult(self.source, self.format)
                rows = size = 0
                first = False
        if rows or first:  # an empty file gives one empty batch
            batch.format = self.format
            yield batch

    def _reject(self, raw: RawRecord, out: FileResult, reason: str, detail: str) -> None:
        raw_text = raw.raw if raw.raw is not None else _dump(raw.value)
        out.rejected.append(
            make_rejected(source=self.source, source_row=raw.index, stage=INGEST_STAGE,
                          reason=reason, detail=detail, raw=raw_text)
        )

    def read(self, raw: RawRecord, out: FileResult) -> int:
        """Add what one raw record gives to ``out``; returns its size in bytes (for batching)."""
        if raw.error is not None:
            self._reject(raw, out, raw.error.reason, raw.error.detail)
            return len(raw.raw or "")
        size = len(raw.raw.encode("utf-8", "surrogateescape")) if raw.raw is not None else len(
            json.dumps(raw.value, ensure_ascii=False, default=str).encode("utf-8", "surrogateescape"))
        if size > self.max_row_bytes:
            self._reject(raw, out, F.REASON_TOO_LARGE, f"row is {size} bytes, over the limit of {self.max_row_bytes}")
            return size
        if not isinstance(raw.value, dict):
            self._reject(raw, out, F.REASON_NOT_AN_OBJECT, f"row is a JSON {type(raw.value).__name__}, not an object")
            return size
        if (raw.raw is None or "\\u" in raw.raw) and _has_lone_surrogate(raw.value):  # only a \\u escape makes one in JSON text
            self._reject(raw, out, F.REASON_INVALID_UTF8, "text holds bytes that are not valid UTF-8")
            return size
        if self.format is None:
            self.format = F.detect_format(raw.value)
            if self.format is None:
                self._reject(raw, out, F.REASON_UNRECOGNIZED, f"no known format has the fields {sorted(raw.value)}")
                return size
        own_id = F.record_id(raw.value)
        if own_id is not None:
            if own_id in self.seen_ids:
                self._reject(raw, out, F.REASON_DUPLICATE_ID,
                             f"id {own_id!r} already used by row {self.seen_ids[own_id]}")
                return size
            self.seen_ids[own_id] = raw.index
        try:
            parsed = F.FORMATS[self.format](raw.value)
        except F.RowError as err:
            self._reject(raw, out, err.reason, err.detail)
            return size
        for item in parsed:
            record = make_record(item.messages, self.source, raw.index, 0, item.candidate, item.meta)
            key = int(record["content_id"], 16)
            occurrence = self.occurrences.get(key, 0)
            self.occurrences[key] = occurrence + 1
            if occurrence:
                record = with_occurrence(record, occurrence)
            out.records.append(record)
        return size


def iter_file_batches(path: Path, fmt: str = "auto", max_row_bytes: int = 1_000_000,
                      batch_rows: int = BATCH_ROWS, batch_bytes: int = BATCH_BYTES) -> Iterator[FileResult]:
    """Read one file in batches: a :class:`FileResult` per ``batch_rows`` raw rows (or
    ``batch_bytes`` of raw text), in file order, with the records and rejected entries those
    rows gave and the format known so far (see module doc).

    JSONL files, Parquet files and ``datasets`` folders are read a batch at a time. A
    ``.json`` file is one JSON document and is parsed whole before the first batch.
    The rows are those :func:`read_file` gives, in the same order, whatever the batch size:
    duplicate ids and repeated content are tracked across the whole file.
    """
    return FileReader(path, fmt, max_row_bytes).batches(max(1, batch_rows), max(1, batch_bytes))


def read_file(path: Path, fmt: str = "auto", max_row_bytes: int = 1_000_000) -> FileResult:
    """Read one file into canonical records and rejected entries (see module doc), all at once."""
    reader = FileReader(path, fmt, max_row_bytes)
    result = FileResult(reader.source, reader.format)
    for batch in reader.batches(BATCH_ROWS, BATCH_BYTES):
        result.records += batch.records
        result.rejected += batch.rejected
    result.format = reader.format
    return result
