"""report.md's figures (schemas/report_plots.py) on a small real output folder, and `thresher report`."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from thresher.cli import app
from thresher.schemas import report_plots
from thresher.schemas.records import RECORD_SCHEMA, make_record, records_table, rejected_table
from thresher.schemas.report import render_report

PNG = b"\x89PNG\r\n\x1a\n"


def split_output(rows: pa.Table) -> tuple[pa.Table, pa.Table]:
    """(data, attributes) as the output has them: the canonical columns, and row_id + the rest."""
    return rows.select(RECORD_SCHEMA.names), rows.select(["row_id", *(c for c in rows.column_names
                                                                      if c not in RECORD_SCHEMA.names)])


def _manifest(n_out: int, n_grape_rejected: int) -> dict:
    counts = {"input": n_out + n_grape_rejected + 1, "created": 0, "output": n_out,
              "rejected": n_grape_rejected + 1, "replaced": 0,
              "rejected_by_reason": {"near_duplicate": 1, "grape_not_best": n_grape_rejected},
              "rejected_by_stage": {"near_dedup": 1, "grape_select": n_grape_rejected},
              "created_by_stage": {}, "replaced_by_stage": {}, "groups_output": n_out}
    stage = {"created": 0, "replaced": 0, "computed": 1, "cached": 0, "seconds": 0.1}
    return {
        "name": "tiny", "finished_at": "2026-11-27T00:00:00", "counts": counts,
        "inputs": [{"source": "a.jsonl", "format": "alpaca", "records": counts["input"], "rejected": 0}],
        "stages": [{"stage": "near_dedup", "in": counts["input"], "rejected": 1, "out": counts["input"] - 1, **stage},
                   {"stage": "grape_select", "in": counts["input"] - 1, "rejected": n_grape_rejected,
                    "out": n_out, **stage}],
        "summaries": {"grape_select": {"instructions kept (one row each)": n_out}},
        "timings": {"total_seconds": 1.0},
    }


@pytest.fixture
def tiny_out(tmp_path) -> tuple[Path, dict]:
    """Two sources; three models (m1, m2, and b.jsonl's rows without a candidate); two non-contiguous
    part files; numeric, list, boolean, string, constant and all-null attribute columns; grape_select's
    rejections (their score in `value`) and another stage's (not a score)."""
    out = tmp_path / "out"
    rows, n = [], 0
    for part, count in (("part-00000.parquet", 5), ("part-00007.parquet", 4)):
        records = []
        for i in range(count):
            source = "a.jsonl" if n % 3 else "b.jsonl"
            candidate = None if source == "b.jsonl" else ("m1" if n % 2 else "m2")
            records.append(make_record([{"role": "user", "content": f"q{n}"}, {"role": "assistant", "content": f"a{n}"}],
                                       source, n, candidate=candidate))
            n += 1
        table = records_table(records)
        k = table.num_rows
        base = n - k
        table = (table.append_column("grape_logprob_mean", pa.array([-1.0 - 0.1 * (base + i) for i in range(k)]))
                 .append_column("tokens", pa.array([10 + base + i for i in range(k)], pa.int32()))
                 .append_column("embedding", pa.array([[0.1, 0.2]] * k, pa.list_(pa.float32())))
                 .append_column("flag", pa.array([True] * k))
                 .append_column("tag", pa.array(["x"] * k))
                 .append_column("constant", pa.array([0.5] * k))
                 .append_column("empty", pa.nulls(k, pa.float64())))
        data, attributes = split_output(table)
        for folder, t in (("data", data), ("attributes", attributes)):
            (out / folder).mkdir(parents=True, exist_ok=True)
            pq.write_table(t, out / folder / part)
        rows += records
    rejected = [{"row_id": f"r{i}", "source": "a.jsonl", "candidate": f"m{1 + i % 2}", "stage": "grape_select",
                 "reason": "grape_not_best", "value": -3.0 - i} for i in range(3)]
    rejected += [{"row_id": "r9", "source": "a.jsonl", "candidate": "m1", "stage": "near_dedup",
                  "reason": "near_duplicate", "value": 0.95}]
    (out / "rejected").mkdir()
    pq.write_table(rejected_table(rejected), out / "rejected" / "part-00000.parquet")
    manifest = _manifest(len(rows), 3)
    (out / "manifest.json").write_text(json.dumps(manifest))
    return out, manifest


def test_report_figures_read_only_narrow_columns_and_replace_the_folder(tiny_out, monkeypatch):
    out, manifest = tiny_out
    (out / "report").mkdir()
    (out / "report" / "stale.png").write_bytes(PNG)  # an earlier run's figure
    read_columns = []
    real_read = pq.ParquetFile.read

    def spy(self, columns=None, **kwargs):
        read_columns.append(columns)
        return real_read(self, columns=columns, **kwargs)

    monkeypatch.setattr(pq.ParquetFile, "read", spy)
    markdown = render_report(manifest, out)

    assert all(c is not None for c in read_columns)  # never a whole file
    assert {c for cols in read_columns for c in cols} == {"source", "candidate", "grape_logprob_mean", "tokens",
                                                          "constant", "empty", "stage", "value"}
    figures = re.findall(r"!\[[^\]]*\]\((report/[^)]+)\)", markdown)
    assert sorted(figures) == ["report/attr-grape_logprob_mean.png", "report/attr-tokens.png", "report/funnel.png",
                               "report/models-grape_logprob_mean.png"]
    assert sorted(p.name for p in (out / "report").iterdir()) == sorted(Path(f).name for f in figures)  # no stale.png
    assert all((out / f).read_bytes().startswith(PNG) for f in figures)
    assert not [p for p in out.iterdir() if p.name.startswith(".report")]  # no staging folder left
    assert markdown.index("report/funnel.png") < markdown.index("## Rejected rows by reason")
    attributes = markdown[markdown.index("## Attributes by source"):markdown.index("## Stages")]
    assert "report/attr-tokens.png" in attributes
    assert "- constant: not plotted (constant 0.5)\n- empty: not plotted (no values)\n" in attributes
    assert markdown.index("### grape_select") < markdown.index("report/models-grape_logprob_mean.png")

    per, left_out = report_plots.attribute_samples(out)
    assert left_out == [] and list(per) == ["grape_logprob_mean", "tokens", "constant", "empty"]
    by_source = {label: (n, sorted(v.tolist())) for label, n, v in per["tokens"].grouped("source")}
    assert by_source == {"a.jsonl": (6, [11, 12, 14, 15, 17, 18]), "b.jsonl": (3, [10, 13, 16])}

    seen, kept = report_plots.model_samples(manifest, out, "grape_logprob_mean", "grape_select")
    assert {label: n for label, n, _ in kept.grouped("model")} == {"m1": 3, "m2": 3, "b.jsonl": 3}
    seen_models = {label: sorted(v.tolist()) for label, _, v in seen.grouped("model")}
    assert seen_models["m1"] == pytest.approx([-5.0, -3.0, -1.7, -1.5, -1.1])  # + its rejections; not near_dedup's
    assert seen_models["m2"] == pytest.approx([-4.0, -1.8, -1.4, -1.2])


def test_plots_of_an_output_without_rows_or_attributes(tiny_out):
    out, manifest = tiny_out
    for folder in ("data", "attributes"):
        for part in (out / folder).iterdir():
            part.unlink()
    empty, _ = split_output(records_table([]).append_column("grape_logprob_mean", pa.array([], pa.float64())))
    pq.write_table(empty, out / "data" / "part-00000.parquet")
    pq.write_table(pa.table({"row_id": pa.array([], pa.string()), "score": pa.array([], pa.float64())}),
                   out / "attributes" / "part-00000.parquet")
    assert [f.path for f in report_plots.make_plots(manifest, out).figures] == ["report/funnel.png"]
    for folder in ("data", "attributes", "rejected"):
        for part in (out / folder).iterdir():
            part.unlink()
        (out / folder).rmdir()
    assert [f.path for f in report_plots.make_plots(manifest, out).figures] == ["report/funnel.png"]


def test_plots_sample_large_columns_and_group_small_sources(tmp_path, monkeypatch):
    monkeypatch.setattr(report_plots, "MAX_VALUES", 100)
    monkeypatch.setattr(report_plots, "MAX_SERIES", 2)
    (tmp_path / "data").mkdir()
    (tmp_path / "attributes").mkdir()
    n = 2000
    sources = ["big"] * (n - 20) + ["small1"] * 10 + ["small2"] * 10
    pq.write_table(pa.table({"row_id": [str(i) for i in range(n)], "source": sources}),
                   tmp_path / "data" / "part-00003.parquet")
    pq.write_table(pa.table({"row_id": [str(i) for i in range(n)], "x": [float(i) for i in range(n)]}),
                   tmp_path / "attributes" / "part-00003.parquet")
    per, _ = report_plots.attribute_samples(tmp_path)
    series = per["x"].grouped("source")
    assert [(label, count) for label, count, _ in series] == [("big", n - 20), ("2 other sources", 20)]
    assert 50 <= sum(v.size for _, _, v in series) <= 150  # about MAX_VALUES of the 2,000 values
    assert per["x"].rate == pytest.approx(0.05)


def test_report_command_needs_a_manifest(tmp_path):
    result = CliRunner().invoke(app, ["report", str(tmp_path)])
    assert result.exit_code == 1
    assert result.stderr.strip() == f"thresher: error: {tmp_path / 'manifest.json'} not found: is {tmp_path} " \
                                    "the output folder of a finished run?"
