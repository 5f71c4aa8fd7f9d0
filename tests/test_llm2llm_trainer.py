"""LLM2LLM student trainers (thresher.llm2llm.trainer): TRL SFTTrainer in-process, and an external command.

The in-process trainer is tested on a freshly initialised, very small model of SmolLM2's
architecture (LlamaForCausalLM, SmolLM2-135M-Instruct's config with 2 layers of width 32) and
SmolLM2's real tokenizer and chat template, saved as a local model folder: the embedded
SmolLM2-135M itself takes ~15 s for 4 steps of 2 x 96 tokens on 2 CPU cores (measured), too much
for the suite. The training code path (TRL, the Parquet, the template, the save) is the same.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from thresher.llm2llm.trainer import PLAIN_CHAT_TEMPLATE, RECORD, TrainerError, train, trainer_config
from thresher.schemas.records import MESSAGES_TYPE
from tiny_models import tiny_smollm2 as make_tiny_smollm2


@pytest.fixture(scope="module")
def tiny_smollm2(tmp_path_factory) -> Path:
    """A randomly initialised 2-layer SmolLM2-architecture model with SmolLM2's tokenizer, as a folder."""
    return make_tiny_smollm2(tmp_path_factory.mktemp("tiny-smollm2"))


@pytest.fixture(scope="module")
def gsm8k_parquet(shared_data, tmp_path_factory) -> Path:
    """8 GSM8K train rows as thresher writes them: a `messages` column of {role, content} structs."""
    with open(shared_data / "gsm8k" / "train.jsonl", encoding="utf-8") as f:
        rows = [json.loads(next(f)) for _ in range(8)]
    messages = [[{"role": "user", "content": r["question"]}, {"role": "assistant", "content": r["answer"]}]
                for r in rows]
    table = pa.table({"row_id": pa.array([f"r{i}" for i in range(8)]), "messages": pa.array(messages, MESSAGES_TYPE)})
    path = tmp_path_factory.mktemp("llm2llm-data") / "part-00000.parquet"
    pq.write_table(table, path)
    return path


def _generates(folder: Path) -> str:
    """The checkpoint loads as any thresher model does (``model: <folder>``) and answers a chat."""
    from thresher.generators.base import SamplingParams
    from thresher.generators.registry import borrowed_model

    # released afterwards (this block loaded it); the session's shared models stay
    with borrowed_model({"name": str(folder)}, cache=False) as model:
        chat = [{"role": "user", "content": "What is 2 + 2?"}]
        completion = model.chat([chat], SamplingParams(max_tokens=4))[0].completions[0]
        assert len(completion.token_ids) == 4 or completion.finish_reason == "stop"
        return model.apply_chat_template(chat)


def _epoch_means(losses: list[dict], steps_per_epoch: int) -> list[float]:
    values = [h["loss"] for h in losses]
    return [sum(values[i:i + steps_per_epoch]) / steps_per_epoch for i in range(0, len(values), steps_per_epoch)]


def test_sft_trainer_loss_falls_and_checkpoint_loads(tiny_smollm2, gsm8k_parquet, tmp_path):
    # the reference's defaults but a learning rate a random 2-layer model learns from in 6 steps
    config = {"epochs": 3, "batch_size": 4, "max_length": 128, "learning_rate": 2e-2, "seed": 0}
    defaults = trainer_config({})
    assert (defaults.epochs, defaults.learning_rate, defaults.lr_scheduler, defaults.warmup_ratio,
            defaults.max_length) == (3, 2e-5, "cosine", 0.03, 1024)
    out = train(gsm8k_parquet, str(tiny_smollm2), tmp_path / "student", config)
    assert out == (tmp_path / "student").resolve()
    record = json.loads((out / RECORD).read_text())
    assert record["trainer"] == "sft" and record["steps"] == 6 and record["base_model_identity"].startswith(str(tiny_smollm2))
    first, _, last = _epoch_means(record["losses"], 2)
    assert last < first - 1.0, record["losses"]  # the same 8 rows each epoch: the loss on them falls
    prompt = _generates(out)
    assert "<|im_start|>assistant" in prompt  # SmolLM2's own template went with the checkpoint
    assert [p.name for p in tmp_path.iterdir()] == ["student"]  # the staging folder was renamed
    with pytest.raises(TrainerError, match="exists already"):
        train(gsm8k_parquet, str(tiny_smollm2), out, config)


def test_lora_on_a_base_model_without_a_chat_template(tiny_smollm2, gsm8k_parquet, tmp_path):
    import shutil

    base = tmp_path / "base"
    shutil.copytree(tiny_smollm2, base)
    (base / "chat_template.jinja").unlink(missing_ok=True)
    tok_cfg = json.loads((base / "tokenizer_config.json").read_text())
    tok_cfg.pop("chat_template", None)
    (base / "tokenizer_config.json").write_text(json.dumps(tok_cfg))
    config = {"max_steps": 2, "batch_size": 4, "max_length": 64, "learning_rate": 1e-3, "lora": {"r": 4}}
    out = train(gsm8k_parquet, str(base), tmp_path / "student", config)
    assert json.loads((out / RECORD).read_text())["steps"] == 2
    assert not (out / "adapter_config.json").exists()  # merged: a plain model folder
    prompt = _generates(out)
    assert prompt == "Question: What is 2 + 2?\nAnswer: "  # PLAIN_CHAT_TEMPLATE, saved with it
    assert "Answer: " in PLAIN_CHAT_TEMPLATE


def test_command_trainer(gsm8k_parquet, tmp_path):
    py = sys.executable
    script = ("import os, shutil, sys; shutil.copy(sys.argv[1], os.path.join(sys.argv[2], 'seen.parquet')); "
              "open(os.path.join(os.environ['THRESHER_TRAIN_OUT'], 'base.txt'), 'w').write(os.environ['THRESHER_BASE_MODEL'])")
    cmd = f"{py} -c \"{script}\" {{data}} {{out}}"
    out = train(gsm8k_parquet, "embedded:smollm2-135m-instruct", tmp_path / "ckpt", {"command": cmd})
    assert (out / "seen.parquet").read_bytes() == gsm8k_parquet.read_bytes()
    assert "smollm2-135m-instruct" in (out / "base.txt").read_text()  # the resolved local folder
    record = json.loads((out / RECORD).read_text())
    assert record["trainer"] == "command" and record["returncode"] == 0 and len(record["data_sha256"]) == 64

    failing = f"{py} -c \"import sys; sys.stderr.write('CUDA out of memory at step 7'); sys.exit(3)\""
    with pytest.raises(TrainerError, match=r"(?s)status 3.*CUDA out of memory at step 7"):
        train(gsm8k_parquet, "embedded:smollm2-135m-instruct", tmp_path / "a", {"command": failing})
    with pytest.raises(TrainerError, match="wrote nothing"):
        train(gsm8k_parquet, "embedded:smollm2-135m-instruct", tmp_path / "b", {"command": "true"})
    with pytest.raises(TrainerError, match="bad placeholder"):
        train(gsm8k_parquet, "embedded:smollm2-135m-instruct", tmp_path / "c", {"command": "cp {data} {outdir}"})
    with pytest.raises(TrainerError, match="timed out"):
        train(gsm8k_parquet, "embedded:smollm2-135m-instruct", tmp_path / "d", {"command": "sleep 5", "timeout_s": 0.2})
    with pytest.raises(TrainerError, match=r"epochs: Input should be greater than 0"):
        trainer_config({"epochs": 0})
    with pytest.raises(TrainerError, match="epochs: Extra inputs are not permitted"):
        trainer_config({"command": "true", "epochs": 3})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]  # failed runs leave nothing behind
