"""Magpie's pre-query template, derived from the model's own chat template.

Magpie (Xu et al., "Alignment Data Synthesis from Scratch by Prompting Aligned LLMs
with Nothing", ICLR 2025; magpie-align/magpie) samples instructions from an aligned
chat model by giving it only the *pre-query template*: the chat's text up to where
the user's words begin. The model then writes a user turn itself.

The reference keeps a hand-written table of these strings, one per model. Here the
string comes from the tokenizer's chat template: a conversation of one user turn
whose content is a marker is rendered (``add_generation_prompt=False``) and cut at
the marker. So:

- a template that adds a default system turn (Qwen2.5, SmolLM2, Llama-3.1's dated
  system block) keeps it in the pre-query, as the model saw it in training (without
  Qwen2.5's, the model writes fragments: the reference's issue #28);
- a given system prompt is rendered the way the template renders system turns;
- ``date_string`` is pinned to Llama-3.x's own default, so a template that would
  print today's date gives the same prefix every day (the prefix is part of every
  cache key and every created row's origin).

What ends the user turn (``end_of_turn``: Llama-3's ``<|eot_id|>``, ChatML's
``<|im_end|>``, Gemma's ``<end_of_turn>``, Phi-3's ``<|end|>``, Mistral's ``[/INST]``)
comes from the same rendering: the first piece of text the template writes after the
user's content. Sampling stops there.

A template that cannot be cut this way (it drops, repeats or rewrites the user's
text, refuses a lone user turn or a system turn, or the model has no chat template)
raises :class:`TemplateError` saying why: never a wrong prefix.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from thresher.generators.base import ModelError

#: the user content whose position marks where the pre-query template ends
MARKER = "MAGPIEQUERYMARKER"
#: what a template that prints the date prints (Llama-3.1's own default date_string)
PINNED_DATE = "26 Jul 2024"


class TemplateError(ModelError):
    """The chat template gives no pre-query template (see the module docstring)."""


@dataclass(frozen=True)
class PreQuery:
    """A model's pre-query template and what ends the user turn it opens."""

    text: str  # the prompt instructions are sampled from
    end_of_turn: str  # the template's text right after a user turn's content ("" if none)
    end_of_turn_ids: tuple[int, ...]  # its token id when it is one token of the vocabulary
    system_prompt: str | None


def render(tokenizer: Any, messages: list[dict[str, str]]) -> str:
    """The chat template's text for ``messages`` (no generation prompt), date pinned."""
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=False,
                                         date_string=PINNED_DATE)


def _cut(tokenizer: Any, messages: list[dict[str, str]], what: str) -> tuple[str, str]:
    try:
        text = render(tokenizer, messages)
    except Exception as err:  # jinja's raise_exception and template errors vary
        raise TemplateError(f"the chat template refuses {what}: {err}") from err
    count = text.count(MARKER)
    if count != 1:
        problem = "drops or rewrites" if count == 0 else f"repeats ({count} times)"
        raise TemplateError(f"the chat template {problem} the user's text in {what}, so there is no "
                            "point where the user's words begin: no pre-query template")
    before, after = text.split(MARKER)
    return before, after


def end_of_turn(after_user: str, eos_token: str | None) -> str:
    """The first piece the template writes after a user turn's content, else the EOS token."""
    pieces = after_user.strip().split()
    return pieces[0] if pieces else (eos_token or "")


def pre_query_template(tokenizer: Any, system_prompt: str | None = None) -> PreQuery:
    """The pre-query template of ``tokenizer``'s chat template (see the module docstring)."""
    if not getattr(tokenizer, "chat_template", None):
        raise TemplateError("the model has no chat template: Magpie needs an aligned chat model "
                            "(a base model has no user turn to imitate)")
    messages = [{"role": "user", "content": MARKER}]
    what = "a conversation of one user turn"
    if system_prompt is not None:
        messages.insert(0, {"role": "system", "content": system_prompt})
        what = "a system turn followed by a user turn"
    before, after = _cut(tokenizer, messages, what)
    if system_prompt and system_prompt not in before:
        raise TemplateError("the chat template does not render the system prompt before the user turn")
    eot = end_of_turn(after, getattr(tokenizer, "eos_token", None))
    ids: tuple[int, ...] = ()
    if eot:
        token_id = tokenizer.convert_tokens_to_ids(eot)
        unk = getattr(tokenizer, "unk_token_id", None)
        if isinstance(token_id, int) and token_id >= 0 and token_id != unk:
            ids = (token_id,)
    return PreQuery(text=before, end_of_turn=eot, end_of_turn_ids=ids, system_prompt=system_prompt)
