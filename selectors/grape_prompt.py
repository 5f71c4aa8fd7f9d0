"""How GRAPE turns a conversation's history into the prompt its response is scored under.

GRAPE (arXiv 2502.04194) scores a candidate response ``y`` to an instruction
``x`` by the target model's mean log-probability of ``y`` given ``x``; the paper
asks that ``x`` be formatted *exactly as supervised fine-tuning will format it*,
so the score measures how well the response fits the model as it will be
trained. This module offers three ways to format it (parameter ``template``):

- ``"chat"`` — the target's own chat template
  (``tokenizer.apply_chat_template(history, add_generation_prompt=True)``),
  for targets that have one (instruct models, or a base model you will fine-tune
  with a chat template set on its tokenizer). Its label is
  ``chat_template@<sha256(template)[:12]>``.
- ``"plain"`` — the documented plain template, for base models without one::

      {system}\\n\\n                    (only when the conversation has a system turn)
      ### Instruction:\\n{user 1}\\n\\n### Response:\\n{assistant 1}\\n\\n
      ### Instruction:\\n{user 2}\\n\\n### Response:\\n          <- the scored response follows

  i.e. :data:`PLAIN_TEMPLATE` per user turn, each earlier assistant turn written
  after its template and followed by ``turn_separator`` (default ``"\\n\\n"``),
  a system turn written with ``system_format`` (default ``"{system}\\n\\n"``).
- any other string — a user template with one ``{instruction}`` field, used the
  same way as the plain one (e.g. ``"<|user|>\\n{instruction}\\n<|assistant|>\\n"``).
  Literal braces are written ``{{`` and ``}}``. Its label is the template itself.

``"auto"`` (the default) is ``"chat"`` when the target's tokenizer has a chat
template, else ``"plain"``. The scored response is always the final assistant
turn's text, tokenized on its own and appended to the prompt's tokens (done by
:meth:`~thresher.generators.base.ModelBackend.continuation_logprobs`).
"""

from __future__ import annotations

import hashlib
import string
from dataclasses import dataclass
from typing import Any, Callable, Sequence

PLAIN_TEMPLATE = "### Instruction:\n{instruction}\n\n### Response:\n"
DEFAULT_TURN_SEPARATOR = "\n\n"
DEFAULT_SYSTEM_FORMAT = "{system}\n\n"
TEMPLATE_MODES = ("auto", "chat", "plain")


def template_fields(template: str) -> list[str]:
    """The ``{field}`` names a format string uses (``ValueError`` if it does not parse)."""
    try:
        return [name for _, name, _, _ in string.Formatter().parse(template) if name is not None]
    except ValueError as err:
        raise ValueError(f"template {template!r} is not a valid format string ({err}); "
                         "write literal braces as {{ and }}") from None


def check_text_template(template: str, field: str = "instruction") -> str:
    """A user template must use exactly one field, ``{instruction}`` (or ``{system}`` for the system format)."""
    fields = template_fields(template)
    if fields != [field]:
        raise ValueError(
            f"template {template!r} must contain the field {{{field}}} exactly once and no other "
            f"field (found {fields}); write literal braces as {{{{ and }}}}"
        )
    return template


def check_template_param(value: str) -> str:
    """Validate the stage's ``template`` parameter (a mode name or a user template)."""
    if value in TEMPLATE_MODES:
        return value
    if "{" not in value:
        raise ValueError(f"template must be one of {list(TEMPLATE_MODES)} or a format string "
                         f"with an {{instruction}} field, not {value!r}")
    return check_text_template(value)


@dataclass(frozen=True)
class PromptFormat:
    """A resolved prompt format: renders a history (the messages before the scored turn)."""

    kind: str  # "chat" or "text"
    label: str  # what the attribute table records in grape_template
    template: str = PLAIN_TEMPLATE
    turn_separator: str = DEFAULT_TURN_SEPARATOR
    system_format: str = DEFAULT_SYSTEM_FORMAT
    chat: Callable[[list[dict[str, str]]], str] | None = None

    def render(self, history: Sequence[dict[str, str]]) -> str:
        """The prompt text for ``history`` (every message before the scored assistant turn)."""
        history = [{"role": m["role"], "content": m["content"]} for m in history]
        if self.kind == "chat":
            return self.chat(history)
        return render_text(history, self.template, self.turn_separator, self.system_format)


def render_text(history: Sequence[dict[str, str]], template: str, turn_separator: str, system_format: str) -> str:
    """The plain / user-template rendering described in the module docstring."""
    parts: list[str] = []
    for m in history:
        if m["role"] == "system":
            parts.append(system_format.format(system=m["content"]))
        elif m["role"] == "user":
            parts.append(template.format(instruction=m["content"]))
        else:  # an earlier assistant turn: its text, then the separator before the next turn
            parts.append(m["content"] + turn_separator)
    return "".join(parts)


def chat_template_of(tokenizer: Any) -> str | None:
    """The tokenizer's chat template text, if it has one."""
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, dict):  # several named templates: the default one
        template = template.get("default")
    return template if isinstance(template, str) and template.strip() else None


def resolve_format(
    template: str, backend: Any, turn_separator: str = DEFAULT_TURN_SEPARATOR,
    system_format: str = DEFAULT_SYSTEM_FORMAT,
) -> PromptFormat:
    """The :class:`PromptFormat` for the ``template`` parameter and the target ``backend``."""
    chat_template = chat_template_of(backend.tokenizer)
    mode = template
    if mode == "auto":
        mode = "chat" if chat_template else "plain"
    if mode == "chat":
        if not chat_template:
            raise ValueError(
                f"grape: template 'chat' asks for the target's chat template, but {backend.identity} has "
                "none (a base model?); use template: plain, or a template string matching your SFT format"
            )
        sha = hashlib.sha256(chat_template.encode("utf-8")).hexdigest()[:12]
        return PromptFormat(
            kind="chat", label=f"chat_template@{sha}",
            chat=lambda history: backend.apply_chat_template(history, add_generation_prompt=True),
        )
    text = PLAIN_TEMPLATE if mode == "plain" else check_text_template(mode)
    check_text_template(system_format, "system")
    label = text
    if (turn_separator, system_format) != (DEFAULT_TURN_SEPARATOR, DEFAULT_SYSTEM_FORMAT):
        label += f" [turn_separator={turn_separator!r}, system_format={system_format!r}]"
    return PromptFormat(kind="text", label=label, template=text,
                        turn_separator=turn_separator, system_format=system_format)
