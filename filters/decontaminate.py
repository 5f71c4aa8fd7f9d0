"""Benchmark decontamination: reject rows that contain a benchmark's n-grams (shard stage).

An SFT set that holds the eval questions (or their answers) makes every later number on
that eval a lie. As NeMo Curator 0.x and datatrove do for pretraining data, a row is
contaminated when its normalized text shares a word n-gram with a benchmark text: 13-grams
for benchmark texts of 13 words or more, 8-grams for texts of 8 to 12 words (shorter texts
are skipped) — :mod:`thresher.filters.benchmark_index`. For instruction data the whole row
is rejected (``contaminated``), and both the prompt and the response are checked by default.
Numbers are kept (math variants differ only in them) unless ``keep_digits: false``.

The rejection names the benchmark (``code``), its row (``value``) and the matched n-gram as
the row spells it, normalized (``evidence``). What it misses: paraphrases, translations, and
any overlap shorter than the n-gram (a benchmark question cut to under 13 words inside a row
is caught only if the question itself is 8-12 words).
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import numpy as np
import pyarrow as pa
from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator

from thresher.filters.benchmark_index import load_index
from thresher.filters.text_ngrams import ngram_hashes
from thresher.flows.stage import Stage, StageOutput, StageParams
from thresher.schemas.records import split_response

REASON = "contaminated"


class Benchmark(BaseModel):
    """One benchmark file and the fields whose text is checked."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    path: str = Field(description="JSON list, JSONL or Parquet; relative to the config file")
    fields: list[str] = Field(min_length=1, description="text fields; a list field gives each element")
    name: str | None = Field(None, description="shown in rejections (default: the file's name)")

    @field_validator("path")
    @classmethod
    def _resolve(cls, value: str, info: ValidationInfo) -> str:
        path = Path(value).expanduser()
        base = (info.context or {}).get("base_dir")
        if not path.is_absolute() and base is not None:
            path = Path(base) / path
        if not path.is_file():
            raise ValueError(f"benchmark file {path} does not exist")
        return str(path)


class DecontaminateParams(StageParams):
    benchmarks: list[Benchmark] = Field(min_length=1, description="[{path, fields, name}]")
    ngram: int = Field(13, ge=1, description="words per n-gram for benchmark texts this long or longer")
    short_ngram: int = Field(8, ge=1, description="n-gram for shorter benchmark texts (down to this many words)")
    check: Literal["both", "prompt", "response"] = Field("both", description="which part of each row is checked")
    keep_digits: bool = Field(True, description="false: every digit counts as 0")


class DecontaminateStage(Stage):
    """Reject rows sharing an n-gram with a benchmark (see the module docstring)."""

    name = "decontaminate"
    version = "1"
    Params = DecontaminateParams

    def process(self, rows: pa.Table) -> StageOutput:
        p: DecontaminateParams = self.params
        if rows.num_rows == 0:
            return StageOutput()
        index = load_index([b.model_dump() for b in p.benchmarks], p.ngram, p.short_ngram, p.keep_digits)
        texts = [_checked_text(m, p.check) for m in rows["messages"].to_pylist()]
        row_ids = rows["row_id"].to_pylist()
        found: dict[int, tuple] = {}  # row -> (index entry, n, position of the n-gram, its NGrams)
        for n in sorted({p.ngram, p.short_ngram}, reverse=True):
            grams = ngram_hashes(texts, n, p.keep_digits, short_texts=False)
            hit = index.lookup(grams.hashes)
            for pos in np.flatnonzero(hit >= 0):
                row = int(np.searchsorted(grams.offsets, pos, side="right") - 1)
                if row not in found:
                    found[row] = (int(hit[pos]), n, int(pos - grams.offsets[row]), grams)
        rejected = []
        for row, (entry, n, start, grams) in sorted(found.items()):
            words = grams.words[row].as_py()[start:start + n]
            name, bench_row = index.names[index.benchmark[entry]], int(index.row[entry])
            gram = " ".join(words)
            rejected.append({"row_id": row_ids[row], "reason": REASON, "code": name, "value": float(bench_row),
                             "evidence": gram, "detail": f"shares the {n}-gram '{gram}' with {name} row {bench_row}"})
        return StageOutput(rejected=rejected)

    def summarize(self, kept: pa.Table, rejected: pa.Table) -> dict:
        by_benchmark: dict[str, int] = {}
        for name in rejected["code"].to_pylist():
            by_benchmark[name] = by_benchmark.get(name, 0) + 1
        return {"contaminated rows rejected": rejected.num_rows, "by benchmark": by_benchmark}


def _checked_text(messages: list[dict[str, str]], check: str) -> str:
    split = split_response(messages)
    prompt, response = (split[0], split[1]) if split is not None else (messages, "")
    parts = []
    if check in ("both", "prompt"):
        parts.extend(m["content"] for m in prompt)
    if check in ("both", "response"):
        parts.append(response)
    return "\n".join(parts)
