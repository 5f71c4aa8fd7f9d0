#!/usr/bin/env bash
# Install llama-cpp-python[server] (a real OpenAI-compatible llama.cpp server) into the
# ACTIVE virtual environment, for tests/test_openai_backend.py. Idempotent: does nothing
# when `import llama_cpp.server` already works.
#
# - A prebuilt wheel is used when one is found in $LLAMA_WHEEL_DIR (default /work/wheels).
# - Otherwise pip builds it from source (about 9 minutes on a new machine; pip caches the
#   wheel afterwards) with a portable CPU build: a native (-march=native / AVX-512 / AMX)
#   build crashes on some CPUs.
# - fastapi stays below 0.155 (pinned by thresher); nothing else already installed is upgraded.
set -euo pipefail

PY="${PYTHON:-python}"

if "$PY" -c "import llama_cpp.server" >/dev/null 2>&1; then
  echo "llama-cpp-python[server] already installed: $("$PY" -c 'import llama_cpp; print(llama_cpp.__version__)')"
  exit 0
fi

CONSTRAINTS="$(mktemp)"
trap 'rm -f "$CONSTRAINTS"' EXIT
echo "fastapi<0.155" > "$CONSTRAINTS"

export CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX512=OFF -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF"
export FORCE_CMAKE=1

WHEEL_DIR="${LLAMA_WHEEL_DIR:-/work/wheels}"
WHEEL=""
if [ -d "$WHEEL_DIR" ]; then
  WHEEL="$(ls -1 "$WHEEL_DIR"/llama_cpp_python-*.whl 2>/dev/null | sort -V | tail -n 1 || true)"
fi

if [ -n "$WHEEL" ]; then
  echo "installing $WHEEL with its server extras"
  "$PY" -m pip install --constraint "$CONSTRAINTS" "${WHEEL}[server]"
else
  echo "building llama-cpp-python[server] from source (CMAKE_ARGS=$CMAKE_ARGS); this takes minutes"
  "$PY" -m pip install --constraint "$CONSTRAINTS" "llama-cpp-python[server]"
fi

"$PY" -c "import llama_cpp.server, llama_cpp; print('llama-cpp-python', llama_cpp.__version__, 'installed')"
