"""Size-based shards (shard_bytes): closed by the rows' messages JSON, groups whole, shard_rows a cap."""

from __future__ import annotations

import json

from thresher.flows.ingest import ingest_file
from thresher.flows.sharding import SHARDING_VERSION, make_shards, messages_json_bytes
from thresher.flows.store import Store, digest
from thresher.schemas.config import IngestConfig


def test_shard_bytes_closes_shards_by_size_without_splitting_a_group(tmp_path):
    # 7 groups of 2 candidates each (same instruction); group 3 is far larger than the rest
    rows = [{"instruction": f"Question {g}?", "output": ("long \"quoted\"\n" * 40 if g == 3 else f"A{g}") + f" #{c}"}
            for g in range(7) for c in range(2)]
    path = tmp_path / "data" / "rows.jsonl"
    path.parent.mkdir()
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    store_root = str(tmp_path / "store")
    ingested = [ingest_file(str(path), IngestConfig(), store_root)]
    records = Store(store_root).read_table("ingest", ingested[0]["key"], "records")
    size = messages_json_bytes(records["messages"])
    assert size.tolist() == [len(json.dumps(m, ensure_ascii=False).encode()) for m in records["messages"].to_pylist()]
    group_bytes = [int(size[i] + size[i + 1]) for i in range(0, 14, 2)]  # rows of a group are adjacent here
    limit = 3 * group_bytes[0] + 5  # three small groups fit, a fourth does not

    def shards(**kw):
        info = make_shards(ingested, store_root=store_root, **kw)
        tables = [Store(store_root).read_table("shards", s["key"], "records") for s in info["shards"]]
        return info, [t["group_id"].to_pylist() for t in tables], [int(messages_json_bytes(t["messages"]).sum())
                                                                    for t in tables]

    info, groups, sizes = shards(shard_rows=100, shard_bytes=limit)
    assert [s["rows"] for s in info["shards"]] == [6, 2, 6]  # the large group 3 stands alone
    assert sizes[1] == group_bytes[3] > limit and max(sizes[0], sizes[2]) <= limit
    owner = {}
    for index, shard_groups in enumerate(groups):
        for gid in shard_groups:
            assert owner.setdefault(gid, index) == index  # never split
    capped, _, _ = shards(shard_rows=4, shard_bytes=limit)
    assert [s["rows"] for s in capped["shards"]] == [4, 2, 2, 4, 2]  # shard_rows still caps
    rows_only, _, _ = shards(shard_rows=100)
    assert [s["rows"] for s in rows_only["shards"]] == [14]
    # without shard_bytes the key is the one earlier stores have: a resumed run finds its shards
    assert rows_only["key"] == digest({"version": SHARDING_VERSION, "inputs": [ingested[0]["key"]],
                                       "shard_rows": 100, "min_shards": 1}) != info["key"]
    filled, _, _ = shards(shard_rows=100, shard_bytes=limit, min_shards=2)  # balanced halves pass the limit
    assert [s["rows"] for s in filled["shards"]] == [6, 2, 6]
