"""Magpie's pre-query template derived from published chat templates (``generators/magpie_template.py``).

The fixtures (``tests/fixtures/chat_templates/``, sources in their README) hold eleven models'
published chat templates and, where it has one, the Magpie reference's hand-written
pre-query string (``configs/model_configs.json``). Each template is loaded into a real
transformers tokenizer and rendered through ``apply_chat_template``, as a model folder's is.

The derived prefix equals the reference for Llama-3, Qwen2.5 and Mistral. Where it differs
it follows the template, on purpose (the README, "Magpie", says the same):

- Llama-3.1/3.3 and Qwen2: the template adds a default system turn that the reference
  leaves out; the model saw it in training (the reference's own issue #28 is Qwen2.5
  writing fragments without its system turn).
- Gemma-2: the reference has a second newline after ``user`` that the template never writes.
- Phi-3/3.5: the reference's ``<s> `` came from the April-2024 template, which wrote BOS
  itself; the current one leaves BOS to the tokenizer.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from thresher.generators.magpie_template import TemplateError, pre_query_template

FIXTURES = Path(__file__).parent / "fixtures" / "chat_templates"
LLAMA_31_SYSTEM = ("<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n"
                   "Cutting Knowledge Date: December 2023\nToday Date: 26 Jul 2024\n\n<|eot_id|>"
                   "<|start_header_id|>user<|end_header_id|>\n\n")

#: family -> (the derived pre-query, or "reference" where it must equal the reference's; end of turn)
EXPECTED = {
    "llama-3": ("reference", "<|eot_id|>"),
    "llama-3.1": (LLAMA_31_SYSTEM, "<|eot_id|>"),
    "llama-3.2": (LLAMA_31_SYSTEM, "<|eot_id|>"),  # prints today's date unless date_string is given: pinned
    "llama-3.3": (LLAMA_31_SYSTEM, "<|eot_id|>"),
    "qwen2": ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n", "<|im_end|>"),
    "qwen2.5": ("reference", "<|im_end|>"),
    "gemma-2": ("<bos><start_of_turn>user\n", "<end_of_turn>"),
    "phi-3": ("<|user|>\n", "<|end|>"),
    "phi-3.5": ("<|user|>\n", "<|end|>"),
    "mistral": ("reference", "[/INST]"),
    "mistral-v0.3": ("reference", "[/INST]"),
}


def fixture(family: str) -> dict:
    return json.loads((FIXTURES / f"{family}.json").read_text())


def tokenizer_for(chat_template: str | None, bos: str | None = "<s>", eos: str | None = "</s>"):
    """A real (tiny, word-level) transformers tokenizer carrying a published chat template."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(dict.fromkeys(["[UNK]", *(t for t in (bos, eos) if t)]))}
    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="[UNK]")),
                                  bos_token=bos, eos_token=eos, unk_token="[UNK]")
    tok.chat_template = chat_template
    return tok


def test_every_family_has_a_fixture():
    assert sorted(p.stem for p in FIXTURES.glob("*.json")) == sorted(EXPECTED)


@pytest.mark.parametrize("family", sorted(EXPECTED))
def test_pre_query_of_published_templates(family):
    fx = fixture(family)
    pre = pre_query_template(tokenizer_for(fx["chat_template"], fx["bos_token"], fx["eos_token"]))
    expected, eot = EXPECTED[family]
    if expected == "reference":
        assert pre.text == fx["reference_pre_query"]
    else:
        assert pre.text == expected and pre.text != fx["reference_pre_query"]
    assert pre.end_of_turn == eot and pre.system_prompt is None


def test_a_system_prompt_is_rendered_the_templates_way():
    fx = fixture("qwen2.5")
    pre = pre_query_template(tokenizer_for(fx["chat_template"], None, fx["eos_token"]), "You write questions.")
    assert pre.text == "<|im_start|>system\nYou write questions.<|im_end|>\n<|im_start|>user\n"
    llama = fixture("llama-3")
    pre = pre_query_template(tokenizer_for(llama["chat_template"], llama["bos_token"], llama["eos_token"]), "Be brief.")
    assert pre.text == ("<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>"
                        "<|start_header_id|>user<|end_header_id|>\n\n")


def test_templates_that_cannot_be_cut_are_clear_errors():
    gemma = fixture("gemma-2")
    with pytest.raises(TemplateError, match="refuses a system turn followed by a user turn.*System role"):
        pre_query_template(tokenizer_for(gemma["chat_template"], "<bos>", "<eos>"), "Be brief.")
    with pytest.raises(TemplateError, match="drops or rewrites the user's text"):
        pre_query_template(tokenizer_for("{% for m in messages %}{{ m['content'] | lower }}{% endfor %}"))
    with pytest.raises(TemplateError, match=r"repeats \(2 times\)"):
        pre_query_template(tokenizer_for("{% for m in messages %}{{ m['content'] }}|{{ m['content'] }}{% endfor %}"))
    with pytest.raises(TemplateError, match="no chat template: Magpie needs an aligned chat model"):
        pre_query_template(tokenizer_for(None))


def test_smollm2_keeps_its_default_system_turn_and_stops_at_im_end():
    from thresher.generators.model_files import load_tokenizer, resolve_model_path

    tok = load_tokenizer(resolve_model_path("embedded:smollm2-135m-instruct")[0])
    pre = pre_query_template(tok)
    assert pre.text == ("<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"
                        "<|im_end|>\n<|im_start|>user\n")
    assert pre.end_of_turn == "<|im_end|>" and pre.end_of_turn_ids == (tok.convert_tokens_to_ids("<|im_end|>"),)


def test_cli_prints_the_template_of_a_folder_of_tokenizer_files(tmp_path):
    from typer.testing import CliRunner

    from thresher.cli import app
    from thresher.generators.model_files import resolve_model_path

    model = resolve_model_path("embedded:smollm2-135m-instruct")[0]
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        shutil.copy(model / name, tmp_path / name)
    result = CliRunner().invoke(app, ["magpie-template", str(tmp_path), "--system-prompt", "Ask me anything."])
    assert result.exit_code == 0, result.output
    shown = json.loads(result.output[: result.output.rindex("}") + 1])
    assert shown["pre_query"] == "<|im_start|>system\nAsk me anything.<|im_end|>\n<|im_start|>user\n"
    assert shown["end_of_turn"] == "<|im_end|>" and shown["end_of_turn_ids"] == [2]
    assert "pre-query: '<|im_start|>system\\nAsk me anything." in result.output
    base = CliRunner().invoke(app, ["magpie-template", "embedded:gemma-3-270m"])
    assert base.exit_code == 1 and "no chat template" in base.output
