"""QLoRA on the CPU: step time and memory of a 4-bit NF4 base (bitsandbytes) against plain LoRA, same model,
same data, same LoRA init, our trainer (RecSFTTrainer, label-position loss). Each variant runs in its own
process, so its peak resident memory (ru_maxrss) is its own.

Copy-paste:

    nice -n 10 python bench/bench_qlora_cpu.py                      # SmolLM2-135M, bf16, 1 thread, ~5 min
    python bench/bench_qlora_cpu.py --quick                         # tiny random Qwen3, a few seconds (tests)
    python bench/bench_qlora_cpu.py --variants lora,qlora --dtype float32 --json-out output/bench/qlora_cpu.json

Variants:

* ``lora``         -- plain LoRA on the ``--dtype`` weights (the CPU demo's set-up).
* ``qlora``        -- the base in 4-bit NF4 (double quantization), compute in ``--dtype``: ``recsft.modeling``.
* ``qlora_upcast`` -- the same plus peft's ``prepare_model_for_kbit_training`` (embeddings, norms and the LM
  head upcast to float32), which recsft no longer calls: shows what that upcast costs.

Reported per variant: median seconds per optimizer step (wall and this process's CPU time: the CPU time is
the fair figure on a machine shared with other jobs), tokens/s, the model's tensor bytes (parameters +
buffers) and the peak resident memory of the process; ratios against ``lora`` from the same run.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import resource
import shutil
import tempfile
import time

from _common import (QWEN3_TOKENIZER, SMOLLM2_GGUF, bench_main, default_data, device_info, load_records, median,
                     print_table, quiet_logs, random_qwen3_dir, versions, write_json)

VARIANTS = {"lora": dict(bits=None, upcast=False), "qlora": dict(bits=4, upcast=False),
            "qlora_upcast": dict(bits=4, upcast=True)}


def tensor_bytes(model) -> int:
    return sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()))


def one_variant(name: str, model_path: str, args, queue) -> None:
    """Load, wrap, train ``warmup + steps`` optimizer steps; put the measurements on ``queue``."""
    import torch

    quiet_logs()
    torch.set_num_threads(args.threads)
    from datasets import Dataset
    from transformers import TrainerCallback

    from recsft.config import TrainArgs
    from recsft.modeling import apply_lora, load_model, load_tokenizer
    from recsft.preprocess import tokenize_to_arrow
    from recsft.trainer import RecSFTTrainer
    from recsft.training import sft_config

    spec = VARIANTS[name]
    tok = load_tokenizer(model_path)
    per_step = args.batch * args.accum
    records = load_records(default_data(args.data))[:per_step * (args.warmup + args.steps)]
    train_ds = Dataset(tokenize_to_arrow(records, tok, args.cutoff_len))
    torch.manual_seed(0)
    model = load_model(model_path, "cpu", args.dtype, "sdpa", spec["bits"])
    if spec["upcast"]:
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    model = apply_lora(model, 16, 64, 0.0, "all")
    model_bytes = tensor_bytes(model)
    out = tempfile.mkdtemp(prefix=f"bench_qlora_{name}_")
    train = TrainArgs(output_dir=out, per_device_train_batch_size=args.batch, gradient_accumulation_steps=args.accum,
                      max_steps=args.warmup + args.steps, learning_rate=1e-4, logging_steps=1, eval_strategy="no",
                      save_strategy="no", load_best_model_at_end=False, early_stopping_patience=None,
                      report_to="none", seed=0)
    marks: list[tuple[float, float, int]] = []

    class Marks(TrainerCallback):
        def on_train_begin(self, *a, **k):
            marks.append((time.perf_counter(), time.process_time(), 0))

        def on_step_end(self, *a, **k):
            marks.append((time.perf_counter(), time.process_time(), int(trainer.train_tokens)))

    trainer = RecSFTTrainer(model=model, args=sft_config(train, args.cutoff_len, "cpu", has_eval=False,
                                                         disable_tqdm=True),
                            train_dataset=train_ds, processing_class=tok, callbacks=[Marks()])
    from transformers.trainer_callback import PrinterCallback

    trainer.remove_callback(PrinterCallback)  # no per-step log dicts on stdout
    try:
        trainer.train()
    finally:
        shutil.rmtree(out, ignore_errors=True)
    timed = marks[args.warmup:]
    wall = [b[0] - a[0] for a, b in zip(timed, timed[1:])]
    cpu = [b[1] - a[1] for a, b in zip(timed, timed[1:])]
    tokens = timed[-1][2] - timed[0][2]
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    queue.put({"s_per_step": median(wall), "cpu_s_per_step": median(cpu), "tokens_per_s": tokens / sum(wall),
               "model_mib": model_bytes / 2**20, "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
               / 1024, "last_loss": losses[-1] if losses else None,
               "lora_dtypes": sorted({str(p.dtype) for p in model.parameters() if p.requires_grad})})


def run(args) -> dict:
    quiet_logs()
    if args.quick:
        from recsft.modeling import load_tokenizer

        model_path = random_qwen3_dir("tiny64", load_tokenizer(QWEN3_TOKENIZER), "cpu")
    else:
        from recsft.modeling import local_model_path

        model_path = local_model_path(args.model)
    info = {"device": device_info("cpu"), "versions": versions(), "model": "tiny64 random Qwen3" if args.quick
            else args.model, "dtype": args.dtype, "batch": args.batch, "grad_accum": args.accum,
            "cutoff_len": args.cutoff_len, "threads": args.threads, "warmup_steps": args.warmup,
            "timed_steps": args.steps, "variants": {}}
    print(f"device: {info['device']}\nmodel {info['model']}, {args.dtype}, batch {args.batch} x accum {args.accum}, "
          f"cutoff {args.cutoff_len}, {args.threads} thread(s), {args.warmup} warm-up + {args.steps} timed steps")
    ctx = mp.get_context("spawn")
    try:
        for name in args.variants.split(","):
            queue = ctx.Queue()
            proc = ctx.Process(target=one_variant, args=(name, model_path, args, queue))
            proc.start()
            proc.join()
            res = queue.get(timeout=5) if proc.exitcode == 0 else {"error": f"exit code {proc.exitcode}"}
            info["variants"][name] = res
            print(f"  {name:>13}: " + ("FAILED " + res["error"] if "error" in res else
                  f"{res['s_per_step']:.2f} s/step (CPU {res['cpu_s_per_step']:.2f} s), model {res['model_mib']:.0f} "
                  f"MiB, peak RSS {res['peak_rss_mib']:.0f} MiB"), flush=True)
            write_json(args.json_out, info, quiet=True)
    finally:
        if args.quick:
            shutil.rmtree(model_path, ignore_errors=True)
    return report(info, args)


def report(info: dict, args) -> dict:
    rows = [dict(name=n, **r) for n, r in info["variants"].items() if "error" not in r]
    ref = info["variants"].get("lora", {})
    for row in rows:
        if ref.get("cpu_s_per_step"):
            row["cpu_ratio"] = row["cpu_s_per_step"] / ref["cpu_s_per_step"]
            row["mem_ratio"] = row["peak_rss_mib"] / ref["peak_rss_mib"]
    print()
    print_table(rows, [("name", "variant", ""), ("s_per_step", "s/step", ".2f"), ("cpu_s_per_step", "CPU s/step", ".2f"),
                       ("cpu_ratio", "CPU time vs lora", ".2f"), ("tokens_per_s", "tokens/s", ",.1f"),
                       ("model_mib", "model MiB", ",.0f"), ("peak_rss_mib", "peak RSS MiB", ",.0f"),
                       ("mem_ratio", "RSS vs lora", ".2f"), ("last_loss", "last loss", ".4f")])
    for name in ("qlora", "qlora_upcast"):
        r = next((x for x in rows if x["name"] == name), None)
        if r and "cpu_ratio" in r:
            info[f"{name}_cpu_time_vs_lora"] = r["cpu_ratio"]
            print(f"RATIO {name}/lora CPU time per step = {r['cpu_ratio']:.2f}x, peak RSS = {r['mem_ratio']:.2f}x")
    write_json(args.json_out, info)
    return info


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=SMOLLM2_GGUF, help="model path/id (default: the offline SmolLM2-135M GGUF)")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    p.add_argument("--data", default=None)
    p.add_argument("--variants", default="lora,qlora,qlora_upcast")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--accum", type=int, default=1)
    p.add_argument("--cutoff-len", type=int, default=256)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--quick", action="store_true", help="tiny random Qwen3 (hidden 64), 64 tokens, 2 steps")
    p.add_argument("--json-out", default=None)
    args = p.parse_args(argv)
    if args.quick:
        args.cutoff_len, args.warmup, args.steps = min(args.cutoff_len, 64), 1, 2
    bad = set(args.variants.split(",")) - set(VARIANTS)
    if bad:
        p.error(f"--variants: unknown {sorted(bad)}; choose from {', '.join(VARIANTS)}")
    return args


def main(argv=None) -> dict:
    """Run with command-line ``argv`` (a list, or None for sys.argv) or an already parsed Namespace."""
    return bench_main(run, parse_args, argv)


if __name__ == "__main__":
    main()
