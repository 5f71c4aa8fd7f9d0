"""Graders: is the student's answer to a seed right? One small interface and four graders.

LLM2LLM (Lee et al. 2024, arXiv:2403.15042; reference code SqueezeAILab/LLM2LLM) evaluates
the student on the seed examples and keeps the ones it gets wrong as parents for the
teacher. A grader decides "wrong": :meth:`Grader.extract` pulls the answer out of a text (the
student's output, or the gold answer), :meth:`Grader.correct` compares a prediction with the
gold answer.

================  ==========================================================================
``gsm8k``         the number after ``####``; commas, ``$`` and spaces ignored; compared as
                  exact decimals (``3.50 == 3.5``), **sign-aware** (``-5 != 5``); an answer
                  that holds no number is compared as normalized text
``exact``         the whole output against the whole gold text (whitespace collapsed, case
                  folded unless ``case_sensitive``)
``regex``         ``pattern`` (exactly one group) applied to both texts, the groups compared
                  as ``exact`` compares
``label``         ``labels``: the label of the set found earliest in the output against the
                  gold label; a gold label outside the set is a :class:`GraderError`
================  ==========================================================================

What the reference does, and where this differs (``GSM8K/filter.py``):

- gold = the text after ``#### ``; prediction = the first ``#+ (.*)`` match; both reduced to
  their digits and dots and compared as floats, falling back to case-folded string equality.
  Reducing to digits drops the sign (``-5`` equals ``5``) and joins separate numbers
  (``3 + 2 = 5`` becomes ``325``). Here the *first number* of the answer is taken, with its sign.
- ``#+ `` takes any Markdown heading (``# Solution``) as the answer; here the prediction is
  the first ``####`` answer, the format the student is trained on (GSM8K's own).
- Numbers compare as :class:`decimal.Decimal`, exactly (no float rounding).

A grader with no gold answer to compare with raises :class:`GraderError` (a seed whose gold
cannot be read is a data error, not a wrong student); a prediction with no answer is simply
wrong. Add a grader by subclassing :class:`Grader` and decorating it with
:func:`register_grader`; :func:`make_grader` builds one from a config (``"gsm8k"`` or
``{"name": "regex", "pattern": "..."}``).

Only the standard library (``re``, ``decimal``) is used: the formats are simple and exact.
"""

from __future__ import annotations

import re
from abc import ABC, abstractmethod
from decimal import Decimal, InvalidOperation
from typing import Any, Callable, ClassVar, Mapping, Sequence, TypeVar


class GraderError(ValueError):
    """A grader was misconfigured, or a gold answer cannot be read."""


class Grader(ABC):
    """Extracts answers from texts and decides whether a prediction matches the gold answer."""

    #: the registry name (``gsm8k``, ``exact``...)
    name: ClassVar[str]

    @abstractmethod
    def extract(self, text: str) -> str | None:
        """The answer in ``text`` (a student's output or a gold answer), or ``None`` when it has none."""

    def extract_gold(self, gold_text: str) -> str:
        """The gold answer; :class:`GraderError` when ``gold_text`` holds none."""
        gold = self.extract(gold_text)
        if gold is None:
            raise GraderError(f"{self.name} grader: no answer in the gold text {_preview(gold_text)}")
        return gold

    @abstractmethod
    def same(self, prediction: str, gold: str) -> bool:
        """Whether two *extracted* answers are equal."""

    def correct(self, prediction_text: str, gold_text: str) -> bool:
        """Whether the answer in ``prediction_text`` is the gold answer in ``gold_text``."""
        gold = self.extract_gold(gold_text)
        prediction = self.extract(prediction_text)
        return prediction is not None and self.same(prediction, gold)

    def params(self) -> dict[str, Any]:
        """The grader's name and options: what identifies its verdicts (cache keys, manifests)."""
        return {"name": self.name}


_G = TypeVar("_G", bound=type[Grader])
GRADERS: dict[str, type[Grader]] = {}


def register_grader(name: str) -> Callable[[_G], _G]:
    """Class decorator: make a :class:`Grader` subclass available to :func:`make_grader` as ``name``."""

    def deco(cls: _G) -> _G:
        if name in GRADERS and GRADERS[name] is not cls:
            raise GraderError(f"a grader named {name!r} is already registered ({GRADERS[name].__name__})")
        cls.name = name
        GRADERS[name] = cls
        return cls

    return deco


def make_grader(config: str | Mapping[str, Any] | Grader) -> Grader:
    """A grader from its name, or a mapping ``{"name": ..., **options}``, or a grader as is."""
    if isinstance(config, Grader):
        return config
    if isinstance(config, str):
        name, options = config, {}
    elif isinstance(config, Mapping):
        options = dict(config)
        name = options.pop("name", None)
        if not isinstance(name, str):
            raise GraderError(f"a grader config needs a 'name' (one of {sorted(GRADERS)}), got {dict(config)!r}")
    else:
        raise GraderError(f"a grader is a name or a mapping with a 'name', got {type(config).__name__}")
    cls = GRADERS.get(name)
    if cls is None:
        raise GraderError(f"unknown grader {name!r}; known: {sorted(GRADERS)}")
    try:
        return cls(**options)
    except TypeError as exc:
        raise GraderError(f"grader {name!r}: bad options {options!r}: {exc}") from None


def _preview(text: str, n: int = 80) -> str:
    return repr(text if len(text) <= n else text[: n - 3] + "...")


def normalize_text(text: str, case_sensitive: bool = False) -> str:
    """Whitespace collapsed to single spaces and stripped; case folded unless ``case_sensitive``."""
    text = " ".join(text.split())
    return text if case_sensitive else text.casefold()


# --------------------------------------------------------------------------- gsm8k

_FINAL = re.compile(r"#{4,}[ \t]*([^\n]*)")
# a sign (ASCII hyphen-minus or U+2212), then digits with an optional fraction, or a bare fraction
_NUMBER = re.compile(r"([-\u2212]?)\s*(\d+(?:\.\d+)?|\.\d+)")


def parse_number(answer: str) -> Decimal | None:
    """The first number in ``answer`` with its sign, commas, ``$`` and spaces ignored; ``None`` if none.

    ``"$1,234.50"`` -> 1234.50, ``"-5"`` and ``"-$5"`` -> -5, ``"18 dollars"`` -> 18, ``"18."`` -> 18.
    """
    cleaned = answer.replace(",", "").replace("$", "")
    m = _NUMBER.search(cleaned)
    if m is None:
        return None
    try:
        value = Decimal(m.group(2))
    except InvalidOperation:  # pragma: no cover - the pattern only matches decimal literals
        return None
    return -value if m.group(1) else value


@register_grader("gsm8k")
class GSM8KGrader(Grader):
    """GSM8K: the first ``#### <answer>`` of a text, compared as a signed number (else as text)."""

    def extract(self, text: str) -> str | None:
        m = _FINAL.search(text)
        if m is None:
            return None
        answer = m.group(1).strip()
        return answer or None

    def same(self, prediction: str, gold: str) -> bool:
        p, g = parse_number(prediction), parse_number(gold)
        if p is not None and g is not None:
            return p == g
        return normalize_text(prediction.replace(",", "")) == normalize_text(gold.replace(",", ""))


# --------------------------------------------------------------------------- exact / regex


@register_grader("exact")
class ExactGrader(Grader):
    """The whole output equals the whole gold text (normalized: see :func:`normalize_text`)."""

    def __init__(self, case_sensitive: bool = False, normalize_whitespace: bool = True):
        self.case_sensitive = bool(case_sensitive)
        self.normalize_whitespace = bool(normalize_whitespace)

    def _norm(self, text: str) -> str:
        if self.normalize_whitespace:
            return normalize_text(text, self.case_sensitive)
        return text if self.case_sensitive else text.casefold()

    def extract(self, text: str) -> str | None:
        out = text.strip() if self.normalize_whitespace else text
        return out if out else None

    def same(self, prediction: str, gold: str) -> bool:
        return self._norm(prediction) == self._norm(gold)

    def params(self) -> dict[str, Any]:
        return {"name": self.name, "case_sensitive": self.case_sensitive,
                "normalize_whitespace": self.normalize_whitespace}


@register_grader("regex")
class RegexGrader(Grader):
    """``pattern`` (one capturing group) finds the answer in both texts; the first match counts."""

    def __init__(self, pattern: str, case_sensitive: bool = False, flags: Sequence[str] = ()):
        flag_bits = 0
        for f in flags:
            bit = getattr(re, str(f).upper(), None)
            if not isinstance(bit, re.RegexFlag):
                raise GraderError(f"regex grader: unknown flag {f!r} (use e.g. 'IGNORECASE', 'DOTALL', 'MULTILINE')")
            flag_bits |= bit
        try:
            self.regex = re.compile(pattern, flag_bits)
        except re.error as exc:
            raise GraderError(f"regex grader: {pattern!r} is not a regular expression: {exc}") from None
        if self.regex.groups != 1:
            raise GraderError(f"regex grader: {pattern!r} must have exactly one capturing group, "
                              f"it has {self.regex.groups}")
        self.pattern = pattern
        self.flags = tuple(str(f).upper() for f in flags)
        self.case_sensitive = bool(case_sensitive)

    def extract(self, text: str) -> str | None:
        m = self.regex.search(text)
        if m is None or m.group(1) is None:
            return None
        answer = m.group(1).strip()
        return answer or None

    def same(self, prediction: str, gold: str) -> bool:
        return normalize_text(prediction, self.case_sensitive) == normalize_text(gold, self.case_sensitive)

    def params(self) -> dict[str, Any]:
        return {"name": self.name, "pattern": self.pattern, "flags": list(self.flags),
                "case_sensitive": self.case_sensitive}


# --------------------------------------------------------------------------- label


@register_grader("label")
class LabelGrader(Grader):
    """Classification: the label of ``labels`` found earliest in the output (whole words).

    Matching is case-insensitive unless ``case_sensitive``. Where two labels start at the same
    place (``positive`` / ``positive mixed``) the longer one wins. The gold text must be one of
    the labels (whitespace and, by default, case aside): anything else is a :class:`GraderError`.
    """

    def __init__(self, labels: Sequence[str], case_sensitive: bool = False):
        if isinstance(labels, str) or not labels:
            raise GraderError("label grader: 'labels' must be a non-empty list of labels")
        self.case_sensitive = bool(case_sensitive)
        self.labels = [" ".join(str(lab).split()) for lab in labels]
        if any(not lab for lab in self.labels):
            raise GraderError(f"label grader: empty label in {list(labels)!r}")
        keys = [self._key(lab) for lab in self.labels]
        if len(set(keys)) != len(keys):
            raise GraderError(f"label grader: labels repeat (case {'kept' if self.case_sensitive else 'folded'}): "
                              f"{self.labels!r}")
        self._by_key = dict(zip(keys, self.labels))
        # longest first: at one position, the longer label wins the alternation
        alts = sorted(self.labels, key=len, reverse=True)
        body = "|".join(r"\s+".join(re.escape(w) for w in lab.split()) for lab in alts)
        self.regex = re.compile(rf"(?<!\w)(?:{body})(?!\w)", 0 if self.case_sensitive else re.IGNORECASE)

    def _key(self, text: str) -> str:
        return normalize_text(text, self.case_sensitive)

    def extract(self, text: str) -> str | None:
        m = self.regex.search(text)
        return None if m is None else self._by_key[self._key(m.group(0))]

    def extract_gold(self, gold_text: str) -> str:
        label = self._by_key.get(self._key(gold_text))
        if label is None:
            raise GraderError(f"label grader: gold label {_preview(gold_text)} is not one of {self.labels!r}")
        return label

    def same(self, prediction: str, gold: str) -> bool:
        return self._key(prediction) == self._key(gold)

    def params(self) -> dict[str, Any]:
        return {"name": self.name, "labels": list(self.labels), "case_sensitive": self.case_sensitive}
