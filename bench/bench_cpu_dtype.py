"""CPU dtype and threads: is ``dtype: auto`` + ``num_threads: auto`` as fast as the best fixed choice?

A few LoRA training steps of the real SmolLM2-135M-Instruct (recsft's trainer, batch 2, cutoff_len 256) in each of
{float32, bfloat16} x {1, 2 threads} and with both knobs on ``auto``; then all of it again next to one competing
busy process (a pure-Python spin loop, the kind of neighbour a shared machine has). Every run is a fresh
subprocess (threads, OpenMP pool, allocator start clean); seconds per optimizer step are the median over the
timed steps after ``--warmup``. Printed: each run's s/step and its ratio to the best fixed choice of its condition,
and ``RATIO auto/best`` (target <= 1.2).

Copy-paste (heavy: run it once, under nice, on an otherwise quiet machine if you can):

    nice -n 10 python bench/bench_cpu_dtype.py --json-out output/bench/cpu_dtype.json
    python bench/bench_cpu_dtype.py --steps 2 --warmup 1 --conditions alone   # quicker, no competing process
    python bench/bench_cpu_dtype.py --omp-only      # OpenMP wait policy: libgomp default vs PASSIVE (seconds)
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


OMP_PROBE = """
import time, torch
torch.set_num_threads(2)
x = torch.randn(256, 256)
def serial():  # 0.5 ms of single-threaded work between two parallel regions
    t = time.perf_counter()
    while time.perf_counter() - t < 0.0005:
        pass
w, c = time.perf_counter(), time.process_time()
for _ in range(1000):
    x @ x
    serial()
print(time.perf_counter() - w, time.process_time() - c)
"""


def omp_wait_policy(repeats: int = 2) -> list[dict]:
    """1,000 x (2-thread 256x256 matmul + 0.5 ms serial work): libgomp's default wait policy vs PASSIVE."""
    rows = []
    for _ in range(repeats):
        for policy in ("default", "PASSIVE"):
            env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
            if policy != "default":
                env["OMP_WAIT_POLICY"] = policy
            out = subprocess.run([sys.executable, "-c", OMP_PROBE], env=env, capture_output=True, text=True,
                                 timeout=600, check=True)
            wall, cpu = map(float, out.stdout.split())
            rows.append({"policy": policy, "wall_s": wall, "cpu_s": cpu})
    return rows


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
    condition = "busy neighbour" if busy else "alone"
    try:
        out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=args.timeout)
    except subprocess.TimeoutExpired:  # a run this slow is a result too: more than the limit
        return {"condition": condition, "setting": f"{dtype}/{threads}", "dtype": dtype, "threads": threads,
                "s_per_step": float("inf"), "timed_out_s": args.timeout}
    finally:
        if spinner is not None:
            spinner.kill()
            spinner.wait()
    if out.returncode != 0:
        raise RuntimeError(f"worker {dtype}/{threads} failed:\n{out.stderr[-3000:]}")
    res = json.loads(out.stdout.strip().splitlines()[-1])
    return {"condition": condition, "setting": f"{dtype}/{threads}", **res}


def run_omp(args) -> dict:
    rows = omp_wait_policy()
    print_table(rows, [("policy", "OMP_WAIT_POLICY", ""), ("wall_s", "wall s", ".2f"), ("cpu_s", "CPU s", ".2f")])
    wall = {p: median([r["wall_s"] for r in rows if r["policy"] == p]) for p in ("default", "PASSIVE")}
    print(f"RATIO wall default/PASSIVE = {wall['default'] / wall['PASSIVE']:.1f}x")
    res = {"device": device_info("cpu"), "omp_wait_policy": rows}
    write_json(args.json_out, res)
    return res


def run(args) -> dict:
    print(f"device: {device_info('cpu')}; load average before: {os.getloadavg()[0]:.1f}", flush=True)
    if args.omp_only:
        return run_omp(args)
    conditions = [c == "busy" for c in args.conditions.split(",")]
    settings = [tuple(x.split("/")) for x in args.settings.split(",")]
    rows, verdict = [], []
    for busy in conditions:
        cond = []
        for dtype, threads in settings:
            t = time.perf_counter()
            r = run_one(dtype, threads, args, busy)
            print(f"  {r['condition']:>14} {r['setting']:>15}: {r['s_per_step']:.2f} s/step "
                  f"({r['dtype']}, {r['threads']} threads; run {time.perf_counter() - t:.0f} s)", flush=True)
            cond.append(r)
        fixed = [r for r in cond if r["setting"] != "auto/auto"]
        autos = [r for r in cond if r["setting"] == "auto/auto"]
        if not fixed:
            rows += cond
            continue
        best = min(fixed, key=lambda r: r["s_per_step"])
        for r in cond:
            r["vs_best"] = r["s_per_step"] / best["s_per_step"]
        rows += cond
        if not autos:
            continue
        auto = autos[0]
        verdict.append({"condition": auto["condition"], "auto": f"{auto['dtype']}/{auto['threads']}",
                        "best": best["setting"], "ratio": auto["vs_best"]})
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
    p.add_argument("--settings", default=",".join(f"{d}/{t}" for d, t in FIXED) + ",auto/auto",
                   help="dtype/threads runs, comma list (default: the 4 fixed ones and auto/auto)")
    p.add_argument("--conditions", default="alone,busy", help="alone, busy (next to one spinning process), or both")
    p.add_argument("--timeout", type=int, default=1800, help="seconds per run (a slower run is reported as inf)")
    p.add_argument("--out", default="output/bench/cpu_dtype_runs")
    p.add_argument("--json-out", default=None)
    p.add_argument("--omp-only", action="store_true",
                   help="only the OpenMP wait-policy probe (default policy vs PASSIVE; seconds)")
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
