"""Split ingest: one JSONL file read in byte ranges by several tasks gives the rows one task gives."""

from __future__ import annotations

import json

import pyarrow.parquet as pq

from thresher.flows.ingest import ingest_file, ingest_key
from thresher.flows.ingest_split import head_format, ingest_range, join_ranges, plan_ranges, ranges_per_file
from thresher.flows.store import Store
from thresher.schemas.config import IngestConfig
from thresher.schemas.readers import INGEST_STAGE


def _tables(store_root, key):
    store = Store(store_root)
    return [store.read_table(INGEST_STAGE, key, name).to_pylist() for name in ("records", "rejected")]


def _read_in_ranges(path, parts, store_root):
    ingest = IngestConfig()
    key = ingest_key(path, ingest)
    fmt = head_format(path, ingest)
    ranges = plan_ranges(path, parts)
    done = [ingest_range(str(path), start, end, None if i == 0 else fmt, key, ingest, store_root)
            for i, (start, end) in enumerate(ranges)]
    return len(ranges), join_ranges(str(path), done, key, ingest, store_root)


def test_a_file_read_in_ranges_gives_the_rows_read_whole(tmp_path, shared_data):
    lines = [json.loads(line) for line in (shared_data / "gsm8k/test.jsonl").read_text().splitlines()[:12]]
    rows = [{**r, "id": f"q{i}"} for i, r in enumerate(lines)]
    text = [json.dumps(r) for r in rows]
    text += ["", "{not json"]  # a blank line, a malformed one
    text += [json.dumps({**rows[2], "id": "r1"}), json.dumps({**rows[5], "id": "r2"})]  # content repeated later
    text += [json.dumps({**rows[2], "id": "r3"}), json.dumps({**rows[7], "id": "r3"})]  # an id repeated nearby
    path = tmp_path / "big.jsonl"
    path.write_text("\n".join(text))  # no newline after the last line
    whole = ingest_file(str(path), IngestConfig(), str(tmp_path / "whole"))
    parts, split = _read_in_ranges(path, 4, str(tmp_path / "split"))
    assert parts == 4 and split["ranges"] == 4 and split["key"] == whole["key"]
    assert _tables(tmp_path / "split", split["key"]) == _tables(tmp_path / "whole", whole["key"])
    records, rejected = _tables(tmp_path / "split", split["key"])
    assert len({r["row_id"] for r in records}) == len(records) == 15  # row 2 three times: occurrences 0, 1, 2
    assert sorted(r["source_row"] for r in rejected) == [13, 17]

    # an id that repeats across two ranges: the file is read again whole, the rows are the same
    path.write_text("\n".join([json.dumps({**rows[0], "id": "same"}), *text[1:12], json.dumps({**rows[3], "id": "same"})]))
    whole = ingest_file(str(path), IngestConfig(), str(tmp_path / "whole2"))
    _, split = _read_in_ranges(path, 3, str(tmp_path / "split2"))
    assert split["split"].startswith("read whole")
    assert _tables(tmp_path / "split2", split["key"]) == _tables(tmp_path / "whole2", whole["key"])
    assert pq.read_table(Store(tmp_path / "split2").path(INGEST_STAGE, split["key"]) / "rejected.parquet").num_rows == 1


def test_files_split_only_when_there_are_fewer_than_the_workers():
    assert ranges_per_file([100, 100], [".jsonl", ".jsonl"], 2, 10) == [1, 1]
    assert ranges_per_file([100], [".jsonl"], 4, 10) == [4]
    assert ranges_per_file([100], [".jsonl"], 4, 40) == [2]  # never a range under split_min_bytes
    assert ranges_per_file([100], [".json"], 4, 10) == [1]  # one JSON document: read whole
    assert ranges_per_file([300, 100], [".jsonl", ".parquet"], 4, 10) == [3, 1]
