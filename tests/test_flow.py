"""The real flow: Prefect + a real local Dask cluster + Parquet, end to end."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from thresher.cli import app
from thresher.flows.curate import execute
from thresher.flows.registry import parse_config


def _config(tmp_path: Path, inputs: list, name: str = "t", workers: int = 1, shard_rows: int = 200, stages=None):
    return parse_config({
        "name": name,
        "inputs": [str(p) for p in inputs],
        "out": str(tmp_path / name),
        "shard_rows": shard_rows,
        "execution": {"workers": workers},
        "stages": stages if stages is not None else [
            {"stage": "validate"}, {"stage": "exact_dedup"},
        ],
    })


def _data(out: Path):
    return pq.read_table(sorted((out / "data").glob("*.parquet"))).to_pylist()


@pytest.fixture(scope="module")
def messy_input(tmp_path_factory, shared_data):
    """Real rows plus real malformed ones: one of each problem, and an exact duplicate."""
    folder = tmp_path_factory.mktemp("messy")
    good = json.loads((shared_data / "alpaca_eval/gpt4_1106_preview.json").read_text())[:30]
    lines = [json.dumps(r).encode() for r in good]
    lines += [
        b'{"instruction": "broken", ',
        b'{"instruction": "caf\xe9", "output": "x"}',
        b'{"instruction": "no output"}',
        json.dumps(good[0]).encode(),  # exact duplicate of row 0
        json.dumps({"instruction": good[1]["instruction"] + "  ", "output": good[1]["output"]}).encode(),
    ]
    path = folder / "messy.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n")
    return path


def test_run_writes_data_rejected_manifest_report(tmp_path, shared_data, messy_input):
    inputs = [messy_input, shared_data / "sharegpt/dummy_conversation.json"]
    manifest = execute(_config(tmp_path, inputs, shard_rows=100), show_progress=False)
    out = tmp_path / "t"
    c = manifest["counts"]
    assert c["input"] == 35 + 500
    assert c["input"] == c["output"] + c["rejected"]
    assert c["rejected_by_reason"] == {
        "malformed_json": 1, "invalid_utf8": 1, "missing_field": 1,
        "exact_duplicate": 2,  # a verbatim copy, and a copy equal after whitespace folding
    }
    rejected = pq.read_table(sorted((out / "rejected").glob("*.parquet"))).to_pylist()
    assert len(rejected) == c["rejected"]
    assert all(r["reason"] and r["source"] and r["raw"] for r in rejected)
    on_disk = json.loads((out / "manifest.json").read_text())
    assert on_disk["counts"] == c and on_disk["versions"]["thresher"]
    assert f"{c['input']} rows read = " in (out / "report.md").read_text()
    assert c["created"] == c["replaced"] == 0

    import datasets

    loaded = datasets.load_dataset("parquet", data_files=str(out / "data" / "*.parquet"), split="train")
    assert loaded.num_rows == c["output"]
    assert set(loaded[0]["messages"][0]) == {"role", "content"}
    attributes = pq.read_table(out / "attributes").num_rows if (out / "attributes").is_dir() else 0
    assert attributes == c["output"]


@pytest.mark.slow
def test_one_and_two_workers_write_the_same_rows(tmp_path, shared_data):
    inputs = [shared_data / "alpaca_eval" / f"{m}.json" for m in ("claude-2", "NullModel")]
    benchmark = tmp_path / "benchmark.json"  # 40 of the instructions, as if they were an eval set
    benchmark.write_text(json.dumps(json.loads(inputs[0].read_text())[:40]))
    stages = [{"stage": "validate"}, {"stage": "exact_dedup"}, {"stage": "near_dedup"},
              {"stage": "decontaminate", "benchmarks": [{"path": str(benchmark), "fields": ["instruction"]}]},
              {"stage": "select", "where": ["candidate != example"]}]
    one = execute(_config(tmp_path, inputs, "one", workers=1, shard_rows=500, stages=stages), show_progress=False)
    two = execute(_config(tmp_path, inputs, "two", workers=2, shard_rows=240, stages=stages), show_progress=False)
    assert one["counts"] == two["counts"]
    assert two["shards"]["count"] > one["shards"]["count"] > 1
    assert _data(tmp_path / "one") == _data(tmp_path / "two")
    assert _rejected(tmp_path / "one") == _rejected(tmp_path / "two")
    reasons = one["counts"]["rejected_by_reason"]
    assert set(reasons) == {"select_where", "near_duplicate", "contaminated"}
    assert reasons["near_duplicate"] > 0 and 20 < reasons["contaminated"] <= 2 * 40


def _rejected(out: Path) -> list[tuple]:
    table = pq.read_table(sorted((out / "rejected").glob("*.parquet")))
    return sorted(zip(*(table[c].to_pylist() for c in ("row_id", "reason", "kept_row_id", "value", "evidence"))))


@pytest.mark.slow
def test_rerun_recomputes_nothing(tmp_path, shared_data):
    """Also: one JSONL file and two workers, so it is read in two byte ranges (the rows those give
    are a whole read's: tests/test_ingest_split.py); a rerun finds the file's result whole."""
    config = _config(tmp_path, [shared_data / "gsm8k/test.jsonl"], workers=2, shard_rows=700,
                     stages=[{"stage": "validate"}, {"stage": "exact_dedup"}, {"stage": "select", "budget": 100}])
    config.ingest.split_min_bytes = 200_000
    first = execute(config, show_progress=False)
    assert len(list((tmp_path / "t" / ".thresher" / "ingest_range").iterdir())) == 2
    assert first["counts"]["input"] == 1319 and first["shards"]["count"] == 2
    assert all(s["computed"] > 0 and s["cached"] == 0 for s in first["stages"])
    second = execute(config, show_progress=False)
    assert all(s["computed"] == 0 and s["cached"] > 0 for s in second["stages"])
    assert all(i["cached"] for i in second["inputs"])
    assert second["counts"] == first["counts"]
    # a new budget re-runs the selection only
    changed = config.model_copy(deep=True)
    changed.stages[2] = parse_config({"stages": [{"stage": "select", "budget": 50}]}).stages[0]
    third = execute(changed, show_progress=False)
    assert [s["computed"] for s in third["stages"]] == [0, 0, 1]
    assert third["counts"]["output"] == 50


def _report_figures(out: Path) -> list[str]:
    """The figures report.md links, each checked to be a PNG file in the output."""
    figures = re.findall(r"!\[[^\]]*\]\((report/[^)]+\.png)\)", (out / "report.md").read_text())
    assert sorted(p.name for p in (out / "report").iterdir()) == sorted(Path(f).name for f in figures)
    assert all((out / f).read_bytes().startswith(b"\x89PNG\r\n\x1a\n") for f in figures)
    return figures


def _thresher(*args, **kwargs):
    return subprocess.run([sys.executable, "-m", "thresher.cli", *args], capture_output=True, text=True, **kwargs)


def _start_run(config: Path, out: Path, shared_data: Path, last_stage: str, shards_done: int,
               env: dict[str, str] | None = None):
    """Start `thresher run` on the first 1,800 rows of GSM8K train (30 shards) in its own process
    group; return once `shards_done` validate results are written, with the process still running."""
    rows = config.parent / "gsm8k_1800.jsonl"
    rows.write_text("".join((shared_data / "gsm8k/train.jsonl").read_text().splitlines(keepends=True)[:1800]))
    config.write_text(
        f"inputs: [{rows}]\nshard_rows: 60\nexecution: {{workers: 1}}\n"
        f"stages: [{{stage: validate}}, {{stage: exact_dedup}}, {last_stage}]\n"
    )
    proc = subprocess.Popen([sys.executable, "-m", "thresher.cli", "run", str(config), "--out", str(out), "-q"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True, env=env)
    validate_dir = out / ".thresher" / "validate"
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if validate_dir.is_dir() and len(list(validate_dir.iterdir())) >= shards_done:
            break
        time.sleep(0.05)
    assert proc.poll() is None, "the run finished before it could be stopped: " + proc.stderr.read().decode()[-500:]
    return proc, validate_dir


def test_cli_errors_are_one_line_and_nonzero(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("inputs: [x.json]\nstages: [{stage: select, budgt: 1}]\n")
    result = _thresher("run", str(bad), "--out", str(tmp_path / "o"))
    assert result.returncode == 1
    assert result.stderr.strip().count("\n") == 0
    assert "stages[0] (select).budgt: unknown key" in result.stderr
    result = _thresher("run", str(bad).replace("bad", "missing"))
    assert result.returncode == 1 and "does not exist" in result.stderr


def test_cli_ingest(tmp_path, shared_data, messy_input):
    result = _thresher("ingest", str(messy_input), str(shared_data / "self_instruct"), "--out", str(tmp_path / "ing"), "-q",
                       "--workers", "1")
    assert result.returncode == 0, result.stderr
    manifest = json.loads((tmp_path / "ing" / "manifest.json").read_text())
    assert manifest["counts"]["input"] == 35 + 175
    assert manifest["counts"]["rejected_by_stage"] == {"ingest": 3}
    assert "rows in" in result.stdout


@pytest.mark.slow
def test_unreadable_file_stops_or_is_skipped(tmp_path, shared_data):
    broken = tmp_path / "in" / "broken.json"
    broken.parent.mkdir()
    broken.write_text("[{")
    result = _thresher("ingest", str(broken.parent), "--out", str(tmp_path / "a"), "-q", "--workers", "1")
    assert result.returncode == 1 and "broken.json" in result.stderr
    result = _thresher("ingest", str(broken.parent), "--out", str(tmp_path / "b"), "-q", "--skip-unreadable",
                       "--workers", "1")
    assert result.returncode == 0, result.stderr
    manifest = json.loads((tmp_path / "b" / "manifest.json").read_text())
    assert manifest["counts"]["rejected_by_reason"] == {"unreadable_file": 1}


def test_local_cluster_shares_the_cores_and_offers_requested_resources(tmp_path, shared_data):
    """Dask's nanny pins numeric libraries to 1 thread; the local cluster hands out the cores instead."""
    from thresher.flows.curate import make_task_runner

    config = _config(tmp_path, [shared_data / "gsm8k/test.jsonl"], workers=1,
                     stages=[{"stage": "validate", "resources": {"GPU": 1}}])
    kwargs = make_task_runner(config).cluster_kwargs
    assert kwargs["env"]["OMP_NUM_THREADS"] == str(os.cpu_count() or 1)
    assert kwargs["resources"] == {"GPU": 1}
    pinned = parse_config({**config.to_dict(), "execution": {"workers": 2, "cpu_threads_per_worker": 3}})
    assert make_task_runner(pinned).cluster_kwargs["env"]["MKL_NUM_THREADS"] == "3"


@pytest.mark.slow
def test_demo_config_runs_from_the_cli_on_other_inputs(tmp_path, shared_data, repo_root):
    """The README's main job, narrowed with --input: embedded embeddings, diversity filter, outputs."""
    out = tmp_path / "demo"
    result = _thresher("run", str(repo_root / "examples/demo.yaml"), "--input",
                       str(shared_data / "self_instruct/seed_tasks.jsonl"), "--out", str(out), "--workers", "1",
                       env={**os.environ, "THRESHER_REPORT_FIGURES": "1"})  # its figures are checked below
    assert result.returncode == 0, result.stderr
    # stdout is not a terminal here: a progress line per stage instead of bars
    for stage in ("ingest", "validate", "deita_embed", "deita_filter"):
        assert f"thresher: {stage}: 1/1 tasks" in result.stdout, result.stdout
    manifest = json.loads((out / "manifest.json").read_text())
    counts = manifest["counts"]
    assert counts["input"] == 175 and counts["output"] + counts["rejected"] == 175
    attributes = pq.read_table(out / "attributes").to_pylist()
    assert len(attributes) == counts["output"] and all(a["deita_embedder"] for a in attributes)
    assert "deita_embedding" not in attributes[0]  # an intermediate wide column: only with output.keep_columns
    assert all(a["deita_max_similarity"] is None or a["deita_max_similarity"] <= 0.9 for a in attributes)
    assert manifest["summaries"]["deita_filter"]["order_by"] == "corpus order"

    # report.md's figures: PNGs beside it, linked relatively; `thresher report` renders them again
    figures = _report_figures(out)
    assert {"report/funnel.png", "report/attr-deita_max_similarity.png"} <= set(figures)
    assert not [f for f in figures if "embedding" in f]  # a list column is not plotted
    shutil.rmtree(out / "report")
    (out / "report.md").unlink()
    result = CliRunner().invoke(app, ["report", str(out)])
    assert result.exit_code == 0, result.output
    assert _report_figures(out) == figures


@pytest.mark.slow
def test_sigterm_stops_the_run_without_leaving_processes(tmp_path, shared_data):
    """`kill` (or a scheduler's SIGTERM) ends the run with cleanup: no orphaned workers or Prefect server."""
    out = tmp_path / "term"
    # no PREFECT_API_URL: the run starts its own temporary Prefect server, which must go too
    own_server = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    proc, _ = _start_run(tmp_path / "term.yaml", out, shared_data, "{stage: select}", 1, env=own_server)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 128 + signal.SIGTERM
    assert "run the same command again to resume" in proc.stderr.read().decode()
    deadline = time.time() + 30
    while time.time() < deadline:
        try:
            os.killpg(proc.pid, 0)  # anything left in the run's process group?
        except ProcessLookupError:
            break
        time.sleep(0.2)
    else:
        os.killpg(proc.pid, signal.SIGKILL)
        pytest.fail("processes of the stopped run were still alive 30 s after it exited")
    assert not (out / "manifest.json").exists()


def test_shards_fill_the_workers_without_splitting_a_group(tmp_path, shared_data):
    """fill_cores: at least one shard per worker thread when the groups allow it, shard_rows an upper bound."""
    from thresher.flows.ingest import ingest_file
    from thresher.flows.sharding import make_shards
    from thresher.flows.threads import task_threads
    from thresher.schemas.config import IngestConfig

    store = str(tmp_path / "store")
    ingested = [ingest_file(str(shared_data / "alpaca_eval" / f"{m}.json"), IngestConfig(), store)
                for m in ("claude-2", "vicuna-7b", "NullModel")]  # 805 groups of 3 candidates
    lone = make_shards(ingested, 5000, store)
    filled = make_shards(ingested, 5000, store, min_shards=4)
    capped = make_shards(ingested, 600, store, min_shards=2)
    assert [s["rows"] for s in lone["shards"]] == [2415]
    assert [s["rows"] for s in filled["shards"]] == [606, 603, 603, 603]
    assert len(capped["shards"]) == 5 and all(s["rows"] <= 600 for s in capped["shards"])  # shard_rows still bounds
    assert all(s["rows"] % 3 == 0 for s in filled["shards"])  # groups whole
    assert (task_threads(1, 2, 2), task_threads(2, 2, 2), task_threads(8, 2, 2), task_threads(1, 4, 16)) == (2, 1, 1, 16)


def test_bad_inputs_and_outputs_fail_in_one_line_before_any_work(tmp_path, shared_data):
    from thresher.schemas.config import ConfigError

    folder = tmp_path / "in"
    folder.mkdir()
    (folder / "rows.jsonl").write_text((shared_data / "gsm8k/test.jsonl").read_text().splitlines()[0] + "\n")
    a_file = tmp_path / "out.txt"
    a_file.write_text("not a folder")
    with pytest.raises(ConfigError, match="is a file; give --out a folder"):
        execute(_config(tmp_path, [folder], name="out.txt"), show_progress=False)
    inside = _config(tmp_path, [folder])
    inside.out = str(folder / "curated")
    with pytest.raises(ConfigError, match="is inside the input folder"):
        execute(inside, show_progress=False)
    assert not (folder / "curated").exists()  # nothing was started
    config = tmp_path / "nope.yaml"
    config.write_text(f"inputs: ['{tmp_path}/nope/*.jsonl']\nstages: [validate]\n")
    result = _thresher("run", str(config), "--out", str(tmp_path / "o"), "-q")
    assert result.returncode == 1 and result.stderr.strip().splitlines() == [
        f"thresher: error: input '{tmp_path}/nope/*.jsonl' matches no file or folder"]
