"""CPU dtype and threads: is ``dtype: auto`` + ``num_threads: auto`` as fast as the best fixed choice?

A few LoRA training steps of the real SmolLM2-135M-Instruct (recsft's trainer, batch 2, cutoff_len 256) in each of
{float32, bfloat16} x {1, 2 threads} and with both knobs on ``auto``; then all of it again next to one competing
busy process (a pure-Python spin loop, the kind of neighbour a shared machine has). Every run is a fresh
subprocess (threads, OpenMP pool, allocator start clean); seconds per optimizer step are the median over the
timed steps after ``--warmup``. Printed: each run's s/step and its ratio to the best fixed choice of its condition,
and ``RATIO auto/best`` (target <= 1.2).

Copy-paste (heavy: run it once, under nice, on an otherwise quiet machine if you can):

    nice -n 10 python bench/bench_cpu_dtype.py --json-out output/bench/cpu_dtype.json
    python bench/bench_cpu_dtype.py --steps 2 --warmup 1 --no-busy       # quicker, no competing process
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

from _common import SMOLLM2_GGUF, as_json_file, default_data, device_info, median, print_table, write_json

FIXED = [("float32", "1"), ("float32", "2"), ("bfloat16", "1"), ("bfloat16", "2")]


def worker(args) -> dict:
    """One run in this process: train ``warmup + steps`` steps, return the per-step seconds and the choices made."""
    import logging

    from _step_timer import StepTimer
    from recsft.config import load_config
    from recsft.modeling import choose_dtype, model_for, tokenizer_for
    from recsft.preprocess import datasets_for, resolve_data
    from recsft.runtime import _chosen
    from recsft.training import build_trainer

    logging.basicConfig(level=logging.WARNING)
    data, tmp = as_json_file(default_data(args.data))
    cfg = load_config(None, [
        f"model_name_or_path={args.model}", "quantization_bit=null", f"dtype={args.dtype}",
        f"num_threads={args.threads}", f"dataset={data}", "eval_dataset=", "cutoff_len=256",
        f"max_samples={2 * (args.warmup + args.steps)}", "per_device_train_batch_size=2",
        "gradient_accumulation_steps=1", f"max_steps={args.warmup + args.steps}", "eval_strategy=no",
        "save_strategy=no", "load_best_model_at_end=false", "report_to=none", "logging_steps=1000",
        f"output_dir={args.out}", f"preprocessing_cache_dir={args.out}/cache", "early_stopping_patience=0"])
    tok = tokenizer_for(cfg.model)
    train_path, _ = resolve_data(cfg.data)
    train_ds, _ = datasets_for(cfg.data, False, tok, train_path, None, False, cpu=True)
    model, device = model_for(cfg.model, cfg.lora, False)
    trainer, _ = build_trainer(model, tok, train_ds, None, cfg, device)
    timer = StepTimer(device)
    timer.trainer = trainer
    trainer.add_callback(timer)
    trainer.train()
    times = [b[0] - a[0] for a, b in zip(timer.marks, timer.marks[1:])][args.warmup:]
    import torch

    return {"dtype": choose_dtype(args.dtype, "cpu")[0], "threads": torch.get_num_threads(),
            "why": _chosen.get("threads", ""), "step_s": times, "s_per_step": median(times)}


def run_one(dtype: str, threads: str, args, busy: bool) -> dict:
    env = dict(os.environ)
    env.pop("OMP_NUM_THREADS", None)  # auto must decide by itself; fixed runs pass the count explicitly
    if threads != "auto":
        env["OMP_NUM_THREADS"] = threads
    cmd = [sys.executable, __file__, "--worker", "--dtype", dtype, "--threads", threads, "--model", args.model,
           "--steps", str(args.steps), "--warmup", str(args.warmup), "--out", f"{args.out}/{dtype}-{threads}"]
    if args.data:
        cmd += ["--data", args.data]
    spinner = subprocess.Popen([sys.executable, "-c", "while True: pass"]) if busy else None
    try:
        out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=args.timeout)
    finally:
        if spinner is not None:
            spinner.kill()
            spinner.wait()
    if out.returncode != 0:
        raise RuntimeError(f"worker {dtype}/{threads} failed:\n{out.stderr[-3000:]}")
    res = json.loads(out.stdout.strip().splitlines()[-1])
    return {"condition": "busy neighbour" if busy else "alone", "setting": f"{dtype}/{threads}", **res}


def run(args) -> dict:
    print(f"device: {device_info('cpu')}; load average before: {os.getloadavg()[0]:.1f}", flush=True)
    conditions = [False] + ([] if args.no_busy else [True])
    rows, verdict = [], []
    for busy in conditions:
        cond = []
        for dtype, threads in FIXED + [("auto", "auto")]:
            t = time.perf_counter()
            r = run_one(dtype, threads, args, busy)
            print(f"  {r['condition']:>14} {r['setting']:>15}: {r['s_per_step']:.2f} s/step "
                  f"({r['dtype']}, {r['threads']} threads; run {time.perf_counter() - t:.0f} s)", flush=True)
            cond.append(r)
        best = min(cond[:-1], key=lambda r: r["s_per_step"])
        for r in cond:
            r["vs_best"] = r["s_per_step"] / best["s_per_step"]
        auto = cond[-1]
        verdict.append({"condition": auto["condition"], "auto": f"{auto['dtype']}/{auto['threads']}",
                        "best": best["setting"], "ratio": auto["vs_best"]})
        rows += cond
    print()
    print_table(rows, [("condition", "condition", ""), ("setting", "dtype/threads", ""),
                       ("dtype", "ran as", ""), ("threads", "threads", "d"), ("s_per_step", "s/step", ".2f"),
                       ("vs_best", "vs best fixed", ".2f")])
    print()
    for v in verdict:
        print(f"RATIO auto/best [{v['condition']}] = {v['ratio']:.2f} (target <= 1.2): auto ran {v['auto']}, "
              f"best fixed {v['best']}")
    res = {"device": device_info("cpu"), "model": args.model, "batch": 2, "cutoff_len": 256, "steps": args.steps,
           "warmup": args.warmup, "runs": rows, "verdict": verdict}
    write_json(args.json_out, res)
    return res


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=SMOLLM2_GGUF)
    p.add_argument("--data", default=None, help="training records (default: data/movielens_qwen3/train.json)")
    p.add_argument("--steps", type=int, default=3, help="timed optimizer steps per run")
    p.add_argument("--warmup", type=int, default=1, help="untimed first steps per run")
    p.add_argument("--no-busy", action="store_true", help="skip the runs next to a competing busy process")
    p.add_argument("--timeout", type=int, default=1800, help="seconds per run")
    p.add_argument("--out", default="output/bench/cpu_dtype_runs")
    p.add_argument("--json-out", default=None)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--dtype", default="auto", help=argparse.SUPPRESS)
    p.add_argument("--threads", default="auto", help=argparse.SUPPRESS)
    return p.parse_args(argv)


if __name__ == "__main__":
    parsed = parse_args()
    if parsed.worker:
        print(json.dumps(worker(parsed)))
    else:
        run(parsed)
