"""Readers: every shared data file in the right format with the right counts, every quarantine reason."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from thresher.schemas.readers import (
    NoInputError, UnreadableFileError, discover_inputs, read_file,
)
from thresher.schemas.records import group_id, row_id

# file -> (format, rows read, canonical records, rejected at ingest)
SHARED_FILES = {
    "alpaca_eval/gpt4_1106_preview.json": ("alpaca", 805, 805, 0),
    "alpaca_eval/NullModel.json": ("alpaca", 805, 805, 0),
    "alpaca_eval/llama-2-70b-chat-hf.json": ("alpaca", 804, 804, 0),
    "codealpaca/code_alpaca_2k.json": ("alpaca", 2017, 2015, 2),
    "codealpaca/new_codealpaca.json": ("alpaca", 4535, 4535, 0),
    "gsm8k/train.jsonl": ("gsm8k", 7473, 7473, 0),
    "gsm8k/test.jsonl": ("gsm8k", 1319, 1319, 0),
    "sharegpt/dummy_conversation.json": ("sharegpt", 500, 500, 0),
    "self_instruct/seed_tasks.jsonl": ("self_instruct", 175, 175, 0),
}


@pytest.mark.parametrize("name", sorted(SHARED_FILES))
def test_shared_files_read_with_the_right_reader(shared_data, name):
    fmt, n_rows, n_records, n_rejected = SHARED_FILES[name]
    result = read_file(shared_data / name)
    assert result.format == fmt
    assert len(result.records) == n_records
    assert len(result.rejected) == n_rejected
    raw = json.loads((shared_data / name).read_text()) if name.endswith(".json") else (
        (shared_data / name).read_text().splitlines())
    assert len(raw) == n_rows
    assert len({r["row_id"] for r in result.records}) == n_records  # ids unique
    for record in result.records[:50]:
        assert record["messages"][-1]["role"] == "assistant"
        assert record["source"] == name


def test_every_alpaca_eval_model_file_reads(shared_data):
    files = sorted((shared_data / "alpaca_eval").glob("*.json"))
    assert len(files) == 9
    groups = Counter()
    for file in files:
        result = read_file(file)
        assert result.format == "alpaca" and not result.rejected
        generators = {row["generator"] for row in json.loads(file.read_text())}
        assert {r["candidate"] for r in result.records} == generators  # NullModel's says "example"
        groups.update(r["group_id"] for r in result.records)
    # 805 instructions; every file answers each once (llama-2-70b misses one row)
    assert len(groups) == 805
    assert Counter(groups.values()) == {9: 804, 8: 1}


def test_code_alpaca_empty_outputs_are_quarantined_with_their_row(shared_data):
    result = read_file(shared_data / "codealpaca/code_alpaca_2k.json")
    data = json.loads((shared_data / "codealpaca/code_alpaca_2k.json").read_text())
    for rejected in result.rejected:
        assert rejected["reason"] == "empty_field"
        assert "output" in rejected["detail"]
        assert not data[rejected["source_row"]]["output"].strip()
        assert json.loads(rejected["raw"]) == data[rejected["source_row"]]


def test_self_instruct_expands_instances(shared_data):
    result = read_file(shared_data / "self_instruct/seed_tasks.jsonl")
    lines = [json.loads(l) for l in (shared_data / "self_instruct/seed_tasks.jsonl").read_text().splitlines()]
    assert len(result.records) == sum(len(l["instances"]) for l in lines)


def test_sharegpt_roles_are_mapped(shared_data):
    result = read_file(shared_data / "sharegpt/dummy_conversation.json")
    roles = Counter(m["role"] for r in result.records for m in r["messages"])
    assert set(roles) == {"user", "assistant"} and roles["user"] == roles["assistant"] == 1000


# --------------------------------------------------------------------------- quarantine


def _write_jsonl(path: Path, lines: list[bytes]) -> Path:
    path.write_bytes(b"\n".join(lines) + b"\n")
    return path


GOOD = json.dumps({"instruction": "Say hi", "output": "Hi!"}).encode()


@pytest.mark.parametrize(
    "line, reason, detail_part",
    [
        (b'{"instruction": "x", "output": ', "malformed_json", "column"),
        (b'{"instruction": "caf\xe9", "output": "y"}', "invalid_utf8", "UTF-8"),
        (b'{"instruction": "x"}', "missing_field", "output"),
        (b'{"instruction": "   ", "output": "y"}', "empty_field", "instruction"),
        (b'{"instruction": 42, "output": "y"}', "wrong_type", "instruction"),
        (b'[1, 2, 3]', "not_an_object", "list"),
        (b'{"instruction": "' + b"x" * 500 + b'", "output": "y"}', "too_large", "over the limit"),
    ],
)
def test_each_row_problem_is_quarantined_and_the_file_goes_on(tmp_path, line, reason, detail_part):
    path = _write_jsonl(tmp_path / "mixed.jsonl", [GOOD, line, GOOD.replace(b"hi", b"hello")])
    result = read_file(path, max_row_bytes=400)
    assert len(result.records) == 2
    assert [r["reason"] for r in result.rejected] == [reason]
    rejected = result.rejected[0]
    assert rejected["source"] == f"{tmp_path.name}/mixed.jsonl"
    assert rejected["source_row"] == 1
    assert detail_part in rejected["detail"]
    assert rejected["raw"]  # the original text is kept


def test_unknown_role_and_duplicate_id_are_quarantined(tmp_path):
    rows = [
        {"id": "a", "conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello"}]},
        {"id": "b", "conversations": [{"from": "wizard", "value": "hi"}, {"from": "gpt", "value": "hello"}]},
        {"id": "a", "conversations": [{"from": "human", "value": "other"}, {"from": "gpt", "value": "text"}]},
    ]
    path = tmp_path / "chats.json"
    path.write_text(json.dumps(rows))
    result = read_file(path)
    assert result.format == "sharegpt"
    assert len(result.records) == 1
    assert [(r["source_row"], r["reason"]) for r in result.rejected] == [(1, "unknown_role"), (2, "duplicate_id")]
    assert "wizard" in result.rejected[0]["detail"]


def test_lone_surrogate_in_json_file_is_invalid_utf8(tmp_path):
    path = tmp_path / "bad.json"
    path.write_bytes(b'[{"instruction": "ok", "output": "fine"}, {"instruction": "bad \xff byte", "output": "x"}]')
    result = read_file(path)
    assert len(result.records) == 1
    assert [r["reason"] for r in result.rejected] == ["invalid_utf8"]
    assert "\\xff" in result.rejected[0]["raw"]


def test_unrecognized_format_is_quarantined(tmp_path):
    path = _write_jsonl(tmp_path / "odd.jsonl", [b'{"foo": 1}', GOOD])
    result = read_file(path)
    assert [r["reason"] for r in result.rejected] == ["unrecognized_format"]
    assert len(result.records) == 1


def test_unreadable_file_is_a_clear_error(tmp_path):
    path = tmp_path / "broken.json"
    path.write_text('[{"instruction": "x", "output": "y"},')
    with pytest.raises(UnreadableFileError, match="broken.json.*malformed JSON"):
        read_file(path)
    bad_parquet = tmp_path / "broken.parquet"
    bad_parquet.write_bytes(b"not parquet at all")
    with pytest.raises(UnreadableFileError, match="broken.parquet"):
        read_file(bad_parquet)


def test_openai_messages_and_candidates_formats(tmp_path):
    path = tmp_path / "rows.jsonl"
    rows = [
        {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"},
                      {"role": "assistant", "content": "4"}]},
        {"messages": [{"role": "tool", "content": "x"}]},
    ]
    path.write_text("\n".join(json.dumps(r) for r in rows))
    result = read_file(path)
    assert result.format == "openai" and len(result.records) == 1
    assert result.rejected[0]["reason"] == "unknown_role"

    cands = tmp_path / "cands.json"
    cands.write_text(json.dumps([{"instruction": "Name a color.", "candidates": [
        "Red.", {"response": "Blue.", "model": "m2"}, {"output": "Green.", "generator": "m3"}]}]))
    result = read_file(cands)
    assert result.format == "candidates"
    assert [r["candidate"] for r in result.records] == [None, "m2", "m3"]
    assert len({r["group_id"] for r in result.records}) == 1
    assert len({r["row_id"] for r in result.records}) == 3


def test_parquet_and_datasets_folder_and_globs(tmp_path, shared_data):
    import datasets

    rows = json.loads((shared_data / "alpaca_eval/claude-2.json").read_text())[:20]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "claude.parquet")
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "claude_ds"))
    from_json = read_file(shared_data / "alpaca_eval/claude-2.json").records[:20]
    from_parquet = read_file(tmp_path / "claude.parquet").records
    from_folder = read_file(tmp_path / "claude_ds").records
    assert [r["messages"] for r in from_parquet] == [r["messages"] for r in from_json]
    assert [r["messages"] for r in from_folder] == [r["messages"] for r in from_json]
    found = discover_inputs([str(tmp_path)])
    assert {p.name for p in found} == {"claude.parquet", "claude_ds"}
    assert len(discover_inputs([str(shared_data / "alpaca_eval" / "*.json")])) == 9
    with pytest.raises(NoInputError, match="matches no file"):
        discover_inputs([str(tmp_path / "nothing-*.json")])


def test_ids_are_stable_and_groups_follow_the_prompt():
    a = [{"role": "user", "content": "Hello  there"}, {"role": "assistant", "content": "Hi"}]
    b = [{"role": "user", "content": "Hello there "}, {"role": "assistant", "content": "Bye"}]
    assert group_id(a) == group_id(b)  # same normalized prompt
    assert row_id(a, "x/f.json") == row_id(a, "x/f.json")
    assert row_id(a, "x/f.json") != row_id(a, "x/g.json")
    assert row_id(a, "x/f.json", 0) != row_id(a, "x/f.json", 1)


# --------------------------------------------------------------------------- streaming


def test_a_file_read_in_batches_gives_the_rows_read_whole(tmp_path):
    """Batches of 3 raw rows: malformed line, repeated id and repeated content (across batches)
    are judged on the whole file; ingest writes the same rows batch by batch."""
    from thresher.flows.ingest import ingest_file
    from thresher.flows.store import Store
    from thresher.schemas.config import IngestConfig
    from thresher.schemas.readers import iter_file_batches

    def row(i, instruction, output="ok"):
        return json.dumps({"id": i, "instruction": instruction, "output": output}).encode()

    lines = [row(1, "a"), b'{"id": 9, "instruction": ', row(2, "b"), row(1, "again"), b"",
             row(3, "c"), row(4, "d"), row(5, "  ", "x"), row(6, "a"), b"[1]", row(7, "b")]
    path = _write_jsonl(tmp_path / "stream.jsonl", lines)
    whole = read_file(path)
    batches = list(iter_file_batches(path, batch_rows=3))
    assert len(batches) == 4 and batches[-1].format == whole.format == "alpaca"
    assert [r for b in batches for r in b.records] == whole.records
    assert [r for b in batches for r in b.rejected] == whole.rejected
    assert [(r["source_row"], r["reason"]) for r in whole.rejected] == [
        (1, "malformed_json"), (3, "duplicate_id"), (7, "empty_field"), (9, "not_an_object")]
    first_a, again_a = whole.records[0], whole.records[4]  # row 8 repeats row 0's content in a later batch
    assert (again_a["source_row"], again_a["content_id"]) == (8, first_a["content_id"])
    assert again_a["row_id"] == row_id(again_a["messages"], again_a["source"], 1) != first_a["row_id"]

    store = str(tmp_path / "store")
    info = ingest_file(str(path), IngestConfig(), store, batch_rows=3)
    assert (info["format"], info["records"], info["rejected"]) == ("alpaca", len(whole.records), 4)
    file = Store(store).path("ingest", info["key"]) / "records.parquet"
    assert pq.ParquetFile(file).num_row_groups > 1  # written batch by batch
    assert Store(store).read_table("ingest", info["key"], "records").to_pylist() == whole.records
    assert Store(store).read_table("ingest", info["key"], "rejected").to_pylist() == whole.rejected
