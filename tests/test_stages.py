"""Model-free stages and sharding, on real rows from the shared data."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from thresher.filters.exact_dedup import ExactDedupStage
from thresher.filters.validate import ValidateParams, ValidateStage
from thresher.flows.ingest import ingest_file
from thresher.flows.output_parts import write_shard_parts
from thresher.flows.pipeline import run_global_stage, run_shard_map
from thresher.flows.sharding import _pack_groups, make_shards, plan_shards
from thresher.flows.stage import STAGE_REJECTED_SCHEMA, StageOutput, conform_rejected
from thresher.flows.store import Store
from thresher.schemas.config import IngestConfig, StageEntry
from thresher.schemas.readers import read_file
from thresher.schemas.records import REJECTED_SCHEMA, make_record, prompt_messages, records_table, split_response
from thresher.selectors.chunked import call_in_chunks
from thresher.selectors.group_argmax import group_argmax
from thresher.selectors.nullable import float_or_none, floats, nullable_floats
from thresher.selectors.select import SelectParams, SelectStage


def _rows(conversations):
    return records_table(make_record(m, "t/t.json", i, occurrence=i) for i, m in enumerate(conversations))


def _turns(*pairs):
    return [{"role": r, "content": c} for r, c in pairs]


def test_validate_reasons():
    rows = _rows([
        _turns(("user", "q"), ("assistant", "a")),
        _turns(("assistant", "a"), ("user", "q")),
        _turns(("system", "s"), ("user", "q")),
        _turns(("user", "q"), ("system", "s"), ("assistant", "a")),
        _turns(("user", "q" * 50), ("assistant", "a")),
    ])
    out = ValidateStage(ValidateParams(max_chars=40)).process(rows)
    reasons = {r["row_id"]: r["reason"] for r in out.rejected}
    ids = rows["row_id"].to_pylist()
    assert ids[0] not in reasons
    assert [reasons[i] for i in ids[1:]] == ["bad_turn_order", "no_response", "bad_turn_order", "too_long"]


def test_exact_dedup_keeps_the_first_normalized_copy():
    rows = _rows([
        _turns(("user", "Hello  world"), ("assistant", "Hi")),
        _turns(("user", "Other"), ("assistant", "Hi")),
        _turns(("user", "Hello world "), ("assistant", "Hi")),
    ])
    out = ExactDedupStage().process(rows)
    ids = rows["row_id"].to_pylist()
    assert [r["row_id"] for r in out.rejected] == [ids[2]]
    assert out.rejected[0]["kept_row_id"] == ids[0]


def _scored(values, groups):
    rows = _rows([_turns(("user", f"q{g}"), ("assistant", f"a{i}")) for i, g in enumerate(groups)])
    return rows.append_column("score", pa.array(values, pa.float64()))


def test_select_where_argmax_budget():
    rows = _scored([1.0, 3.0, 3.0, 0.5, None, 2.0], [0, 0, 0, 1, 1, 2])
    ids = rows["row_id"].to_pylist()
    out = SelectStage(SelectParams(argmax_per_group="score")).process(rows)
    kept = [i for i in ids if i not in {r["row_id"] for r in out.rejected}]
    assert kept == [ids[1], ids[3], ids[5]]  # tie 3.0 vs 3.0: the first in corpus order; None loses
    assert {r["row_id"]: (r["kept_row_id"], r["value"]) for r in out.rejected} == {
        ids[0]: (ids[1], 1.0), ids[2]: (ids[1], 3.0), ids[4]: (ids[3], None)}
    all_null = _scored([None, None], [0, 0])
    out = SelectStage(SelectParams(argmax_per_group="score")).process(all_null)
    assert [r["row_id"] for r in out.rejected] == [all_null["row_id"][1].as_py()]  # no value at all: the first stays
    out = SelectStage(SelectParams(where=["score >= 1"], order_by="score", budget=2)).process(rows)
    by_reason = {}
    for r in out.rejected:
        by_reason.setdefault(r["reason"], []).append(r["row_id"])
    assert by_reason["select_where"] == [ids[3], ids[4]]
    assert by_reason["select_over_budget"] == [ids[0], ids[5]]


def test_groups_are_never_split(shared_data):
    records = []
    for name in ("gpt4_1106_preview", "claude-2", "NullModel"):
        records += read_file(shared_data / "alpaca_eval" / f"{name}.json").records[:40]
    groups = [r["group_id"] for r in records]
    plans = [_pack_groups(groups, shard_rows) for shard_rows in (1, 7, 50)]
    plans += [plan_shards(groups, 1_000, min_shards) for min_shards in (2, 3, 7)]  # fill_cores: balanced
    assert [len(s) for s in plans[3:]] == [2, 3, 7]
    for shards in plans:
        assert sorted(p for s in shards for p in s) == list(range(len(groups)))
        owner = {}
        for index, shard in enumerate(shards):
            for p in shard:
                assert owner.setdefault(groups[p], index) == index


# --------------------------------------------------------------------------- rejection columns


def test_rejected_rows_reach_the_output_with_typed_columns_each_part_from_its_shard(tmp_path, shared_data):
    """exact_dedup gets only the columns it declares, made shard by shard; its kept row travels to
    OUT/rejected with the row's canonical columns; each shard's parts hold that shard's rows only."""
    store_root = str(tmp_path / "store")
    path = shared_data / "codealpaca" / "code_alpaca_2k.json"
    twice = tmp_path / "twice.json"  # the first 5 rows, then the first 3 again under another source name
    rows = json.loads(path.read_text())[:5]
    twice.write_text(json.dumps(rows))
    (tmp_path / "again.json").write_text(json.dumps(rows[:3]))
    ingested = [ingest_file(str(p), IngestConfig(), store_root) for p in (twice, tmp_path / "again.json")]
    sharding = make_shards(ingested, 4, store_root)  # 8 rows: two shards
    entry = StageEntry(stage="exact_dedup", params=ExactDedupStage.Params())
    map_keys = [run_shard_map(entry, s, store_root) for s in sharding["shards"]]
    states = run_global_stage(entry, sharding["shards"], store_root, map_keys=map_keys)
    assert len(states) == 2 and states[0]["run"]["columns"] == ["row_id", "content_id"]  # never whole rows
    staging = tmp_path / "staging"
    parts = [write_shard_parts(s, store_root, str(staging), 100, []) for s in states]
    store = Store(store_root)
    for state, part in zip(states, parts):
        stem = f"part-{state['index']:05d}.parquet"
        base = set(store.read_table("shards", state["base"], "records")["row_id"].to_pylist())
        kept = pq.read_table(staging / "data" / stem)["row_id"].to_pylist()
        assert pq.read_table(staging / "attributes" / stem)["row_id"].to_pylist() == kept
        gone = pq.read_table(staging / "rejected" / stem)["row_id"].to_pylist() if part["files"]["rejected"] else []
        assert sorted(kept + gone) == sorted(base) and part["output"] == len(kept)  # this shard's rows, once each
    rejected = pq.read_table(sorted((staging / "rejected").glob("*.parquet")))
    assert rejected.schema == REJECTED_SCHEMA
    got = rejected.to_pylist()
    assert [r["reason"] for r in got] == ["exact_duplicate"] * 3
    base = pa.concat_tables([store.read_table("shards", s["base"], "records") for s in states]).to_pylist()
    kept_of = {r["content_id"]: r["row_id"] for r in base if r["source"].endswith("/again.json")}
    for r in got:
        assert r["source"].endswith("/twice.json") and r["code"] is None and r["value"] is None
        mine = next(b for b in base if b["row_id"] == r["row_id"])
        assert r["kept_row_id"] == kept_of[mine["content_id"]]  # again.json sorts first: its copy is kept


def test_a_shard_view_grows_by_one_layer_and_a_rerun_leaves_no_stale_part(tmp_path, shared_data):
    """The view a worker keeps after a stage is the next stage's start (one layer applied, not a
    replay) and equals the replay; a second run into the same OUT with fewer shards replaces the
    first run's parts whole."""
    from pathlib import Path

    from thresher.flows import view_cache
    from thresher.flows.output_parts import finish_output, write_ingest_rejected
    from thresher.flows.pipeline import run_shard_stage, shard_view
    from thresher.schemas.writers import new_staging

    store_root = str(tmp_path / "store")
    ingested = [ingest_file(str(shared_data / "gsm8k/test.jsonl"), IngestConfig(), store_root)]
    out = tmp_path / "out"
    for shard_rows, shards in ((700, 2), (2000, 1)):
        sharding = make_shards(ingested, shard_rows, store_root)
        view_cache.clear()
        entry = StageEntry(stage="validate", params=ValidateParams())
        states = [run_shard_stage(entry, s, store_root) for s in sharding["shards"]]
        assert len(states) == shards and all(len(s["keys"]) == 1 for s in states)
        depth, cached = view_cache.deepest(states[0]["keys"])
        assert depth == 1  # validate's view is kept for the shard's next stage
        view_cache.clear()
        assert cached.equals(shard_view(states[0], Store(store_root)))  # the replay gives the same rows
        out.mkdir(exist_ok=True)
        staging = new_staging(out)
        parts = [write_shard_parts(s, store_root, str(staging), 100_000, []) for s in states]
        files, totals = finish_output(out, staging, parts, write_ingest_rejected(ingested, sharding, store_root,
                                                                                 str(staging), 100_000), 100_000)
        assert sorted(p.name for p in (out / "data").iterdir()) == [f"part-{i:05d}.parquet" for i in range(shards)]
        assert totals["output"] == pq.read_table(out / "data").num_rows == sum(s["run"]["in"] - s["run"]["rejected"]
                                                                              for s in states)
        assert not list(Path(out).glob(".staging-*")) and not list(Path(out).glob(".old-*"))


def test_rejected_table_refuses_unknown_keys_and_old_results_conform():
    out = StageOutput(rejected=[{"row_id": "a", "reason": "x", "kept_row": "b"}])
    with pytest.raises(KeyError, match="kept_row"):
        out.rejected_table()
    table = StageOutput(rejected=[{"row_id": "a", "reason": "x", "kept_row_id": "b", "code": "c"}]).rejected_table()
    assert table.to_pylist() == [{"row_id": "a", "reason": "x", "code": "c", "detail": "", "value": None,
                                  "kept_row_id": "b", "evidence": None}]
    stored_by_v1 = pa.table({"row_id": ["a"], "reason": ["x"], "detail": ["d"], "value": pa.array([1.5])})
    assert conform_rejected(stored_by_v1).to_pylist() == [{"row_id": "a", "reason": "x", "code": None, "detail": "d",
                                                           "value": 1.5, "kept_row_id": None, "evidence": None}]
    assert conform_rejected(stored_by_v1).schema == STAGE_REJECTED_SCHEMA


# --------------------------------------------------------------------------- shared helpers


def test_group_argmax_ties_nan_and_groups_without_values():
    values = np.array([1.0, 3.0, 3.0, np.nan, 0.5, np.nan, np.nan, 2.0])
    groups = ["a", "a", "a", "b", "b", "c", "c", "a"]
    result = group_argmax(values, groups, [0, 1, 2, 3, 4, 5, 6])  # row 7 not alive
    assert result.best == {"a": 1, "b": 4, "c": None}
    assert result.members == {"a": [0, 1, 2], "b": [3, 4], "c": [5, 6]}


def test_null_and_nan_round_trip():
    column = pa.chunked_array([pa.array([1.5, None, 3], pa.float64())])
    values = floats(column)
    assert np.isnan(values[1]) and values[0] == 1.5 and values.dtype == np.float64
    assert nullable_floats(values).to_pylist() == [1.5, None, 3.0]
    assert float_or_none(np.float64("nan")) is None and float_or_none(None) is None and float_or_none(2) == 2.0
    with pytest.raises(ValueError):
        floats(["high"])


def test_call_in_chunks_keeps_order_and_isolates_failing_items():
    calls = []

    def call(chunk):
        calls.append(list(chunk))
        if "bad" in chunk:
            raise RuntimeError("the batch failed")
        return [x.upper() for x in chunk]

    items = ["a", "b", "bad", "c", "d"]
    got = call_in_chunks(items, call, 2, one=lambda x: "failed" if x == "bad" else x.upper())
    assert got == ["A", "B", "failed", "C", "D"]
    assert calls == [["a", "b"], ["bad", "c"], ["d"]]
    with pytest.raises(RuntimeError):
        call_in_chunks(items, call, 2)
    with pytest.raises(ValueError, match="2 items"):
        call_in_chunks(["a", "b"], lambda chunk: chunk[:1], 2)


def test_split_response_is_the_final_assistant_turn():
    convo = _turns(("system", "s"), ("user", "q1"), ("assistant", "a1"), ("user", "q2"), ("assistant", "a2"))
    history, response = split_response(convo)
    assert history == convo[:-1] and response == "a2"
    assert split_response(convo[:-1]) is None and split_response([]) is None
    assert prompt_messages(convo) == convo[:-1] and prompt_messages(convo[:-1]) == convo[:-1]
