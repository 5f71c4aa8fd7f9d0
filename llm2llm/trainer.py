"""Train the LLM2LLM student on the pipeline's Parquet: TRL in-process, or an external command.

LLM2LLM (Lee et al. 2024, arXiv:2403.15042; reference code SqueezeAILab/LLM2LLM, ``train.py``
and ``GSM8K/templates_gsm.py``) fine-tunes the student *from its base model* every iteration on
the seeds plus every augmentation so far: 3 epochs, learning rate 2e-5, cosine schedule, warmup
ratio 0.03, weight decay 0, max length 1024, loss on the response only. Those are the defaults
of :class:`SFTTrainerConfig`.

Both trainers have one interface, :func:`train` ``(train_parquet, base_model, out_dir, config)
-> checkpoint folder``. The training data is the Parquet thresher writes: a ``messages``
column, ``list<struct<role, content>>``; the student trains on exactly what a user would.

**In-process** (:class:`SFTTrainerConfig`, ``trainer: {type: sft, ...}``): TRL's ``SFTTrainer``
(Hugging Face's own SFT trainer, what thresher's output is made for; trl 1.16 installs without
changing torch or transformers). Each conversation becomes a TRL conversational
prompt-completion example (the prompt: every turn before the last; the completion: the last,
assistant, turn), so the loss is on the response only, as in the reference, without needing a
chat template with ``{% generation %}`` marks. Full fine-tuning by default; ``lora: {r, alpha,
dropout, target_modules}`` trains LoRA adapters through ``peft`` and merges them into the
weights on save (``merge_lora: false`` keeps the adapter folder instead), so the checkpoint loads
with ``AutoModelForCausalLM.from_pretrained`` either way when merged. A base model without a chat
template (Gemma-3-270M's GGUF) is given :data:`PLAIN_CHAT_TEMPLATE` (``Question: ...`` /
``Answer: ...``), saved with the checkpoint, so evaluating the checkpoint through thresher's model
layer prompts it the way it was trained. The base model is named as any thresher model is
(``embedded:...``, a local folder, a Hugging Face id already on disk: nothing is downloaded).

**External command** (:class:`CommandTrainerConfig`, ``trainer: {command: "..."}``): run with
``bash -c``; ``{data}``, ``{out}``, ``{base_model}`` (the resolved local folder) and
``{base_model_name}`` (the name as configured) in the command are replaced by the
shell-quoted values, and the same values are in the environment as ``THRESHER_TRAIN_DATA``,
``THRESHER_TRAIN_OUT``, ``THRESHER_BASE_MODEL``, ``THRESHER_BASE_MODEL_NAME``. A non-zero exit
status, a time-out, or an empty output folder is a :class:`TrainerError` carrying the end of the
command's stderr.

Both write into a staging folder beside ``out_dir`` (``{out}`` is that folder) and rename it to
``out_dir`` only when training succeeded: a folder at ``out_dir`` is always a finished
checkpoint, so a killed loop can trust it (``out_dir`` existing already is an error; the loop
decides what to reuse). ``thresher_train.json`` in the checkpoint records the trainer, its
config, the base model's identity, the data's sha256 and (in-process) the logged losses.
"""

from __future__ import annotations

import hashlib
import json
import os
import shlex
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any, Literal, Mapping

from pydantic import BaseModel, ConfigDict, Field, ValidationError

PLAIN_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ message['content'] + '\n\n' }}"
    "{% elif message['role'] == 'user' %}{{ 'Question: ' + message['content'] + '\n' }}"
    "{% else %}{{ 'Answer: ' + message['content'] + eos_token + '\n' }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ 'Answer: ' }}{% endif %}"
)
RECORD = "thresher_train.json"


class TrainerError(RuntimeError):
    """Training failed, or the trainer is misconfigured."""


class LoraSettings(BaseModel):
    """LoRA adapters through peft (``peft.LoraConfig``)."""

    model_config = ConfigDict(extra="forbid")
    r: int = Field(16, ge=1)
    alpha: int = Field(32, ge=1)
    dropout: float = Field(0.05, ge=0.0, lt=1.0)
    target_modules: str | list[str] = "all-linear"


class SFTTrainerConfig(BaseModel):
    """In-process TRL ``SFTTrainer``; the defaults are the LLM2LLM reference's."""

    model_config = ConfigDict(extra="forbid")
    type: Literal["sft"] = "sft"
    epochs: float = Field(3.0, gt=0)
    learning_rate: float = Field(2e-5, gt=0)
    lr_scheduler: str = "cosine"
    warmup_ratio: float = Field(0.03, ge=0, lt=1)
    weight_decay: float = Field(0.0, ge=0)
    max_length: int = Field(1024, ge=8)
    batch_size: int = Field(1, ge=1)
    gradient_accumulation_steps: int = Field(1, ge=1)
    max_steps: int | None = Field(None, ge=1)  # caps the steps (tests, smoke runs); None: epochs decide
    seed: int = 0
    lora: LoraSettings | None = None
    merge_lora: bool = True
    bf16: bool | None = None  # None: on a CUDA GPU that supports it
    logging_steps: int = Field(1, ge=1)


class CommandTrainerConfig(BaseModel):
    """A user's own training command (see the module doc for its placeholders and environment)."""

    model_config = ConfigDict(extra="forbid")
    type: Literal["command"] = "command"
    command: str = Field(min_length=1)
    timeout_s: float | None = Field(None, gt=0)
    env: dict[str, str] = Field(default_factory=dict)


TrainerConfig = SFTTrainerConfig | CommandTrainerConfig


def trainer_config(config: Mapping[str, Any] | TrainerConfig | None) -> TrainerConfig:
    """The trainer config a mapping describes: with a ``command`` the external trainer, else TRL."""
    if isinstance(config, (SFTTrainerConfig, CommandTrainerConfig)):
        return config
    config = dict(config or {})
    cls = CommandTrainerConfig if ("command" in config or config.get("type") == "command") else SFTTrainerConfig
    try:
        return cls(**config)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'trainer'}: {e['msg']}" for e in exc.errors())
        raise TrainerError(f"trainer config ({cls.__name__}): {problems}") from None


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def train(
    train_parquet: Path | str,
    base_model: str,
    out_dir: Path | str,
    config: Mapping[str, Any] | TrainerConfig | None = None,
) -> Path:
    """Train ``base_model`` on ``train_parquet``'s ``messages``; return the checkpoint folder ``out_dir``."""
    from thresher.generators.model_files import resolve_model_path

    cfg = trainer_config(config)
    data = Path(train_parquet).resolve()
    out = Path(out_dir).resolve()
    if not data.is_file():
        raise TrainerError(f"training data {data} does not exist")
    if out.exists():
        raise TrainerError(f"{out} exists already: a trainer writes a new checkpoint folder")
    model_path, kind, identity = resolve_model_path(base_model)
    if kind != "causal-lm":
        raise TrainerError(f"base model {base_model!r} is a {kind}, not a causal language model")
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    record: dict[str, Any] = {
        "trainer": cfg.type, "config": cfg.model_dump(mode="json"), "base_model": base_model,
        "base_model_identity": identity, "data": str(data), "data_sha256": file_sha256(data),
    }
    t0 = time.monotonic()
    try:
        if isinstance(cfg, CommandTrainerConfig):
            record.update(_run_command(cfg, data, base_model, model_path, staging))
        else:
            record.update(_train_sft(cfg, data, model_path, staging))
        record["seconds"] = round(time.monotonic() - t0, 3)
        (staging / RECORD).write_text(json.dumps(record, indent=2, sort_keys=True))
        staging.rename(out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out


# --------------------------------------------------------------------------- external command


def _tail(text: str | bytes | None, n: int = 2000) -> str:
    if isinstance(text, bytes):
        text = text.decode("utf-8", "replace")
    text = (text or "").strip()
    return text if len(text) <= n else "..." + text[-n:]


def _run_command(cfg: CommandTrainerConfig, data: Path, name: str, model_path: Path, staging: Path) -> dict:
    values = {"data": str(data), "out": str(staging), "base_model": str(model_path), "base_model_name": name}
    try:
        command = cfg.command.format(**{k: shlex.quote(v) for k, v in values.items()})
    except (KeyError, IndexError, ValueError) as exc:
        raise TrainerError(f"trainer command {cfg.command!r}: bad placeholder {exc}; use {{data}}, {{out}}, "
                           f"{{base_model}}, {{base_model_name}} (and {{{{ }}}} for a literal brace)") from None
    env = {**os.environ, **cfg.env, "THRESHER_TRAIN_DATA": values["data"], "THRESHER_TRAIN_OUT": values["out"],
           "THRESHER_BASE_MODEL": values["base_model"], "THRESHER_BASE_MODEL_NAME": name}
    try:
        proc = subprocess.run(["bash", "-c", command], env=env, capture_output=True, timeout=cfg.timeout_s)
    except subprocess.TimeoutExpired as exc:
        raise TrainerError(f"trainer command timed out after {cfg.timeout_s} s: {command}\n"
                           f"stderr (end):\n{_tail(exc.stderr)}") from None
    if proc.returncode != 0:
        raise TrainerError(f"trainer command exited with status {proc.returncode}: {command}\n"
                           f"stderr (end):\n{_tail(proc.stderr)}")
    if not any(staging.iterdir()):
        raise TrainerError(f"trainer command exited 0 but wrote nothing into its output folder {{out}}: {command}\n"
                           f"stderr (end):\n{_tail(proc.stderr)}")
    return {"command": command, "returncode": proc.returncode, "stdout_tail": _tail(proc.stdout, 1000)}


# --------------------------------------------------------------------------- TRL SFTTrainer


def _prompt_completion(messages: list[dict]) -> dict:
    if not messages or messages[-1].get("role") != "assistant":
        raise TrainerError(f"a training conversation must end with an assistant turn, got "
                           f"{[m.get('role') for m in messages or []]}")
    turns = [{"role": m["role"], "content": m["content"]} for m in messages]
    return {"prompt": turns[:-1], "completion": turns[-1:]}


def _train_sft(cfg: SFTTrainerConfig, data: Path, model_path: Path, staging: Path) -> dict:
    import datasets
    import torch
    from transformers import AutoModelForCausalLM
    from trl import SFTConfig, SFTTrainer

    from thresher.generators.model_files import load_tokenizer

    ds = datasets.load_dataset("parquet", data_files=str(data), split="train")
    if "messages" not in ds.column_names:
        raise TrainerError(f"{data} has no 'messages' column (columns: {ds.column_names})")
    if len(ds) == 0:
        raise TrainerError(f"{data} has no rows to train on")
    ds = ds.map(lambda row: _prompt_completion(row["messages"]), remove_columns=ds.column_names)

    tokenizer = load_tokenizer(model_path)
    if not tokenizer.chat_template:
        tokenizer.chat_template = PLAIN_CHAT_TEMPLATE
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    cuda = torch.cuda.is_available()
    bf16 = cfg.bf16 if cfg.bf16 is not None else bool(cuda and torch.cuda.is_bf16_supported())
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32, local_files_only=True)

    peft_config = None
    if cfg.lora is not None:
        from peft import LoraConfig

        peft_config = LoraConfig(r=cfg.lora.r, lora_alpha=cfg.lora.alpha, lora_dropout=cfg.lora.dropout,
                                 target_modules=cfg.lora.target_modules, task_type="CAUSAL_LM")
    args = SFTConfig(
        output_dir=str(staging / "_trainer"),
        num_train_epochs=cfg.epochs,
        max_steps=cfg.max_steps or -1,
        learning_rate=cfg.learning_rate,
        lr_scheduler_type=cfg.lr_scheduler,
        warmup_steps=cfg.warmup_ratio,  # transformers 5: a float in [0, 1) is a ratio of the steps
        weight_decay=cfg.weight_decay,
        per_device_train_batch_size=cfg.batch_size,
        gradient_accumulation_steps=cfg.gradient_accumulation_steps,
        max_length=cfg.max_length,
        completion_only_loss=True,
        seed=cfg.seed,
        data_seed=cfg.seed,
        bf16=bf16,
        logging_steps=cfg.logging_steps,
        save_strategy="no",
        report_to=[],
        disable_tqdm=True,
        use_cpu=not cuda,
        dataloader_num_workers=0,
    )
    trainer = SFTTrainer(model=model, args=args, train_dataset=ds, processing_class=tokenizer,
                         peft_config=peft_config)
    trainer.train()
    losses = [{"step": h["step"], "epoch": h.get("epoch"), "loss": h["loss"]}
              for h in trainer.state.log_history if "loss" in h]
    trained = trainer.model
    if cfg.lora is not None and cfg.merge_lora:
        trained = trained.merge_and_unload()
    trained.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    shutil.rmtree(staging / "_trainer", ignore_errors=True)
    return {"losses": losses, "steps": trainer.state.global_step, "bf16": bf16, "device": "cuda" if cuda else "cpu"}
