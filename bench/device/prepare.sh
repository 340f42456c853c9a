#!/usr/bin/env bash
# Fill .whl/ (git-ignored) with what the GPU run (bench/device/run.sh) needs and the device machine lacks:
#   .whl/*.whl      wheels of the versions aflora was tested with, where the machine's own are older or absent
#                   (it has transformers 5.17; aflora needs >= 5.24), fetched for its CPython 3.12 / x86-64
#   .whl/model/     SmolLM2-135M-Instruct's config.json and tokenizer, no weights (~270 MB would not travel:
#                   a call carries at most 64 MiB); run.sh builds the model from them with random weights
#   .whl/data/      the AG News files the benchmarks read
#   .whl/REVISION   the git revision prepared (the machine gets the tree without .git)
# Run it here, from anywhere, with network access; then call the device tool as docs/benchmarks.md says.
# Needs .venv (make demo / make test set it up) and ../shared/data/ag_news.
set -euo pipefail
cd "$(dirname "$0")/../.."
ROOT=$PWD
PYTHON=${PYTHON:-$ROOT/.venv/bin/python}
MAIN=$(git worktree list --porcelain | awk 'NR == 1 {print $2}')  # a worktree has no .venv: the main checkout's
[ -x "$PYTHON" ] || PYTHON=$MAIN/.venv/bin/python
DATA=${AFLORA_DATA_DIR:-$ROOT/../shared/data}
[ -d "$DATA/ag_news" ] || DATA=$MAIN/../shared/data
[ -d "$DATA/ag_news" ] || { echo "no ag_news under $DATA: set AFLORA_DATA_DIR to the folder that holds it" >&2; exit 2; }
# The versions of .venv (the suite's). The machine has every other package the benchmarks import, new enough
# (huggingface-hub 1.33, tokenizers 0.23.2, safetensors 0.8.0, accelerate 1.15 by KINDS.md); flwr and ray are not needed.
WHEELS="transformers==5.24.0 peft==0.21.2 regex==2026.11.19"  # regex: transformers 5.24 checks >= 2025.10.22 at import

[ -d .whl ] && chmod -R u+w .whl  # the data files may come read-only
rm -rf .whl && mkdir -p .whl/model .whl/data
python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl $WHEELS
cp -r "$DATA/ag_news" .whl/data/ && chmod -R u+w .whl/data
# Config and tokenizer exactly as aflora reads them for model.name = "smollm2" (random init reads no weights).
# torch is imported, so under the CPU lock where there is one.
LOCK=(); [ -e /tmp/aflora-cpu.lock ] && LOCK=(flock /tmp/aflora-cpu.lock)
PYTHONPATH=$ROOT/src "${LOCK[@]}" "$PYTHON" - <<'PY'
from aflora.models import load_model
model, tokenizer = load_model("smollm2", random_init=True, device="cpu")
model.config.save_pretrained(".whl/model")
tokenizer.save_pretrained(".whl/model")
print(f"SmolLM2 config and tokenizer: {sum(p.numel() for p in model.parameters()):,} parameters when built")
PY
git rev-parse --short HEAD > .whl/REVISION
git diff --quiet HEAD -- src bench || echo "$(cat .whl/REVISION)+uncommitted" > .whl/REVISION
du -sh .whl .whl/model .whl/data; ls -l .whl/*.whl
