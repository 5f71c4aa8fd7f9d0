"""KD labels on the embedded SmolLM2, checked against transformers' own ``log_softmax``.

``kd_logprobs`` (teacher-forced) and ``kd_generate`` (the teacher writes) run as stages on
real rows; their Parquet columns are read back and compared with a direct forward pass of
the same checkpoint in transformers. The flow (kill, resume, 1 vs 2 workers) is tested in
tests/test_magpie_flow.py, whose pipeline ends with ``kd_logprobs``.
"""

from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from thresher.generators.kd_generate import KDGenerateStage
from thresher.generators.kd_logprobs import KDLogprobsStage
from thresher.schemas.kd import KD_METADATA_KEY, read_kd_metadata, with_kd_metadata
from thresher.schemas.records import make_record, prompt_messages, records_table

SMOL = "embedded:smollm2-135m-instruct"
K = 6
CONVERSATIONS = [
    [{"role": "user", "content": "What is 2 + 2?"}, {"role": "assistant", "content": "2 + 2 equals 4."}],
    [{"role": "system", "content": "You answer in one word."}, {"role": "user", "content": "Sky colour?"},
     {"role": "assistant", "content": "Blue."}],
    [{"role": "user", "content": "Name a fruit."}],  # nothing to label: rejected by kd_logprobs
]


def _rows():
    return records_table([make_record(m, "kd-test.jsonl", i) for i, m in enumerate(CONVERSATIONS)])


@pytest.fixture(scope="module")
def labelled(tmp_path_factory):
    """kd_logprobs' output for the rows, written as OUT/attributes/ is (schema metadata included)."""
    out = tmp_path_factory.mktemp("kd-out")
    output = KDLogprobsStage(KDLogprobsStage.Params(k=K, request_cache=False)).process(_rows())
    (out / "attributes").mkdir()
    pq.write_table(with_kd_metadata(output.attributes), out / "attributes" / "part-00000.parquet")
    return out, output


@pytest.fixture(scope="module")
def transformers_model():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from thresher.generators.model_files import resolve_model_path

    path = resolve_model_path(SMOL)[0]
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, local_files_only=True).eval()
    return model, AutoTokenizer.from_pretrained(path, local_files_only=True)


def test_kd_logprobs_are_transformers_log_softmax_top_k(labelled, transformers_model):
    out, output = labelled
    model, tok = transformers_model
    assert [r["reason"] for r in output.rejected] == ["kd_no_response"]
    table = pq.read_table(out / "attributes" / "part-00000.parquet")
    assert table.num_rows == 2 and table.schema.field("kd_topk_logprobs").type.value_type.list_size == K
    for row, messages in zip(table.to_pylist(), CONVERSATIONS):
        # the stored ids are the chat template's rendering: prompt, then the response with its end of turn
        assert tok.decode(row["kd_prompt_token_ids"]) == tok.apply_chat_template(
            messages[:-1], tokenize=False, add_generation_prompt=True)
        assert tok.decode(row["kd_token_ids"]) == messages[-1]["content"] + "<|im_end|>\n"
        assert row["kd_prompt_tokens"] == len(row["kd_prompt_token_ids"]) and not row["kd_truncated"]
        ids = row["kd_prompt_token_ids"] + row["kd_token_ids"]
        with torch.inference_mode():
            logprobs = torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), dim=-1)
        first = row["kd_prompt_tokens"] - 1  # position p predicts token p + 1
        assert len(row["kd_topk_ids"]) == len(row["kd_token_ids"])
        for t, (top_ids, top_lps) in enumerate(zip(row["kd_topk_ids"], row["kd_topk_logprobs"])):
            want = torch.topk(logprobs[first + t], K)
            want_ids, want_lps = want.indices.tolist(), want.values.numpy()
            kth = float(want_lps[-1])
            for token in set(top_ids) ^ set(want_ids):  # ties at the cut aside
                assert abs(float(logprobs[first + t, token]) - kth) < 1e-4
            # float16 storage: relative error 2^-11, plus the backends' last-bit differences
            exact = logprobs[first + t, top_ids].numpy()
            np.testing.assert_allclose(top_lps, exact, rtol=2 ** -11, atol=1e-4)
            assert list(top_lps) == sorted(top_lps, reverse=True)

    (teacher,) = read_kd_metadata(pq.read_schema(out / "attributes" / "part-00000.parquet"))
    assert teacher["k"] == K and teacher["mode"] == "teacher_forced" and teacher["temperature"] == 1.0
    assert teacher["teacher"].startswith("hf:embedded:smollm2-135m-instruct@")
    assert teacher["tokenizer"]["vocab_size"] == len(tok) and teacher["chat_template_digest"]
    assert json.loads(table["kd_teacher"][0].as_py()) == teacher and KD_METADATA_KEY in table.schema.metadata


def test_kd_generate_greedy_token_is_top_1_of_the_stored_top_k():
    rows = _rows()
    output = KDGenerateStage(KDGenerateStage.Params(k=K, max_tokens=12, request_cache=False)).process(rows)
    assert output.replaced == rows["row_id"].to_pylist() and len(output.created) == 3
    labels = {r["row_id"]: r for r in output.attributes.to_pylist()}
    for parent, row in zip(rows.to_pylist(), output.created):
        assert row["parent_row_id"] == parent["row_id"] and json.loads(row["origin"])["stage"] == "kd_generate"
        assert row["messages"][:-1] == prompt_messages(parent["messages"])  # an old answer is not kept
        label = labels[row["row_id"]]
        assert 0 < len(label["kd_token_ids"]) == len(label["kd_topk_ids"]) <= 12
        for token, top_ids, top_lps in zip(label["kd_token_ids"], label["kd_topk_ids"], label["kd_topk_logprobs"]):
            # greedy: the generated token is the most likely one (a float16 tie with the runner-up aside)
            assert token == top_ids[0] or top_lps[1] >= top_lps[0] - 1e-3


def _train_kd():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "examples" / "train_kd.py"
    spec = importlib.util.spec_from_file_location("train_kd", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_train_kd_lowers_the_loss_and_another_tokenizer_is_refused_first(labelled, capsys):
    from typer.testing import CliRunner

    from thresher.cli import app

    out, _ = labelled
    train_kd = _train_kd()
    assert train_kd.main([str(out), "--student", SMOL, "--fresh", "--steps", "6", "--batch-size", "2"]) == 0
    losses = [float(line.split()[-1]) for line in capsys.readouterr().out.splitlines() if line.startswith("step ")]
    assert len(losses) == 6 and losses[-1] < losses[0]

    # Gemma-3's tokenizer gives other ids: refused before any model is loaded or any step is run
    # (by check_student_tokenizer, which `thresher kd-check` runs alone)
    assert train_kd.main([str(out), "--student", "embedded:gemma-3-270m", "--fresh", "--steps", "2"]) == 2
    printed = capsys.readouterr()
    assert "step " not in printed.out and "vocabulary (49152 vs 262144 entries)" in printed.err
    accepted = CliRunner().invoke(app, ["kd-check", str(out), "--student", SMOL])
    assert accepted.exit_code == 0 and accepted.output.startswith(f"ok: {SMOL} shares the tokenizer of hf:embedded")
