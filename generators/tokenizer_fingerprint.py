"""A tokenizer's fingerprint: what must be equal for two models to share token ids (logit KD).

Logit-level KD compares the teacher's and the student's distributions id by id, so
the two tokenizers must map text to the same ids. The fingerprint digests the three
parts that decide that — the vocabulary (token -> id), the BPE merges, and the
added/special tokens — and :func:`compare_fingerprints` says in words which of them
differ. The chat template is digested apart (:func:`chat_template_digest`): a
different template changes the rendering of rows, not the meaning of ids.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any


def _digest(value: Any) -> str:
    text = json.dumps(value, ensure_ascii=False, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()[:16]


def _merges(tokenizer: Any) -> list[Any]:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return []
    model = json.loads(backend.to_str()).get("model") or {}
    return list(model.get("merges") or [])


def tokenizer_fingerprint(tokenizer: Any) -> dict[str, Any]:
    """``{"digest", "vocab_size", "parts": {"vocab", "merges", "special"}, "special_tokens"}``."""
    vocab = tokenizer.get_vocab()
    added = sorted((int(i), t.content, bool(t.special)) for i, t in tokenizer.added_tokens_decoder.items())
    special = sorted(tokenizer.all_special_tokens)
    parts = {
        "vocab": _digest(sorted(vocab.items(), key=lambda kv: kv[1])),
        "merges": _digest(_merges(tokenizer)),
        "special": _digest({"added": added, "special": special}),
    }
    return {"digest": _digest(parts), "vocab_size": len(vocab), "parts": parts, "special_tokens": special}


def chat_template_digest(tokenizer: Any) -> str | None:
    """sha256[:16] of the tokenizer's chat template (None when it has none)."""
    template = getattr(tokenizer, "chat_template", None)
    return _digest(template) if template else None


def compare_fingerprints(teacher: dict[str, Any], student: dict[str, Any]) -> list[str]:
    """What differs between two fingerprints, one phrase per part (empty: they match)."""
    if teacher["digest"] == student["digest"]:
        return []
    out = []
    if teacher["parts"]["vocab"] != student["parts"]["vocab"]:
        size = (f"{teacher['vocab_size']} vs {student['vocab_size']} entries"
                if teacher["vocab_size"] != student["vocab_size"] else "same size, other token -> id entries")
        out.append(f"vocabulary ({size})")
    if teacher["parts"]["merges"] != student["parts"]["merges"]:
        out.append("BPE merges")
    if teacher["parts"]["special"] != student["parts"]["special"]:
        only_t = sorted(set(teacher["special_tokens"]) - set(student["special_tokens"]))[:5]
        only_s = sorted(set(student["special_tokens"]) - set(teacher["special_tokens"]))[:5]
        out.append(f"special tokens (teacher only: {only_t}, student only: {only_s})")
    return out or ["fingerprint"]
