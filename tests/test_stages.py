"""Model-free stages and sharding, on real rows from the shared data."""

from __future__ import annotations

import pyarrow as pa

from thresher.filters.exact_dedup import ExactDedupStage
from thresher.filters.validate import ValidateParams, ValidateStage
from thresher.flows.pipeline import _pack_groups
from thresher.schemas.readers import read_file
from thresher.schemas.records import make_record, records_table
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
    assert ids[0] in out.rejected[0]["detail"]


def _scored(values, groups):
    rows = _rows([_turns(("user", f"q{g}"), ("assistant", f"a{i}")) for i, g in enumerate(groups)])
    return rows.append_column("score", pa.array(values, pa.float64()))


def test_select_where_argmax_budget():
    rows = _scored([1.0, 3.0, 3.0, 0.5, None, 2.0], [0, 0, 0, 1, 1, 2])
    ids = rows["row_id"].to_pylist()
    out = SelectStage(SelectParams(argmax_per_group="score")).process(rows)
    kept = [i for i in ids if i not in {r["row_id"] for r in out.rejected}]
    assert kept == [ids[1], ids[3], ids[5]]  # tie 3.0 vs 3.0: the first in corpus order; None loses
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
    for shard_rows in (1, 7, 50):
        shards = _pack_groups(groups, shard_rows)
        assert sorted(p for s in shards for p in s) == list(range(len(groups)))
        owner = {}
        for index, shard in enumerate(shards):
            for p in shard:
                assert owner.setdefault(groups[p], index) == index
