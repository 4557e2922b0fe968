"""Training throughput: stock TRL SFTTrainer settings vs ours (RecSFTTrainer + recsft's sft_config), same
model, same pre-tokenized MovieLens data and labels, same effective batch, same number of steps.

Copy-paste:

    python bench/bench_train.py                                   # CPU: small Qwen3 shape, real 151,936 vocab
    python bench/bench_train.py --repeats 2 --json-out output/bench/train_cpu.json
    python bench/bench_train.py --quick                           # a few seconds; used by tests/test_bench_smoke.py
    # GPU (H100): random weights in the exact Qwen3-0.6B shape, bf16 LoRA, plus QLoRA (needs bitsandbytes)
    python bench/bench_train.py --device cuda --shape qwen3-0.6b --qlora --json-out $OUT/train_gpu.json

Variants (each one a fresh model loaded from the same random weights, the same LoRA init and data order):

* ``stock``        -- ``trl.SFTTrainer`` + ``SFTConfig`` defaults: gradient checkpointing on, padded batches,
  TRL's fused LM head + NLL (every position on CPU; label positions in Triton tiles on GPU).
* ``stock_nogc``   -- the same with gradient checkpointing off (separates the two levers).
* ``ours``         -- ``recsft.trainer.RecSFTTrainer`` + ``recsft.training.sft_config`` (no checkpointing,
  the LM head run only at label positions via ``logits_to_keep``), padded batches.
* ``ours_padfree`` -- ours with padding-free batches (one row, ``position_ids``; no pad tokens).
* ``ours_pack``    -- ours with ``packing: true`` (BFD packing, padding-free; rows of up to cutoff_len).
* ``*_qlora``      -- with ``--qlora``: the base in 4-bit NF4 (bitsandbytes; CUDA, or CPU), stock vs ours.
* ``ours_fa2``     -- with flash-attn installed: ours_padfree with ``attn_implementation=flash_attention_2``.
* ``ours_liger``   -- with liger-kernel installed: ours + ``use_liger_kernel`` (RMSNorm/SwiGLU/RoPE kernels).
* ``ours_compile`` -- with ``--compile``: ours_padfree + ``torch_compile``; run last, with its own time budget
  (``--compile-budget``); reports the frames compiled, the graph breaks by reason and the first step's time.

Differences other than those levers are kept equal: dtype (``auto``: fp32 on CPU, bf16 where the CPU computes
it natively; bf16 weights + bf16 autocast on CUDA -- TRL's default bf16=True is turned off on CPU), learning
rate, batch, steps, seed. Tokens/s counts real (non-pad) tokens over the steps after ``--warmup`` steps. Before
timing, a correctness check runs stock and ours on the same batch (in fp32 on CPU) and compares the loss and
every LoRA gradient.

MFU (GPU): model FLOPs per trained token, the same for every variant (recomputation is not counted):
    4 * N_body  +  6 * N_lora  +  12 * L * n_heads * head_dim * ctx  +  4 * d_model * V * f_label
(frozen linear layers: 2 fwd + 2 backward-to-activations; LoRA: + weight grads; causal attention with ctx =
mean attended length = sum(len^2)/(2 sum len), fwd 4*h*ctx per layer, backward 2x; the LM head only where a
label is trained, f_label = label tokens / tokens). MFU = tokens/s * FLOPs/token / peak (H100 bf16 dense 989 TFLOP/s).
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import shutil
import tempfile
import time
import traceback
from dataclasses import dataclass, field

from _common import (QWEN3_SHAPES, QWEN3_TOKENIZER, QWEN3_VOCAB, bench_main, default_data, device_info,
                     load_records, median, print_table, quiet_logs, random_qwen3_dir, versions, write_json)
PEAK_TFLOPS = {"cuda": 989.0}  # H100 SXM dense bf16


@dataclass
class Variant:
    name: str
    ours: bool
    gc: bool = False
    padding_free: bool = False
    packing: bool = False
    qlora: bool = False
    attn: str = "sdpa"
    liger: bool = False
    compile: bool = False
    note: str = ""
    results: list = field(default_factory=list)


def build_variants(args) -> list[Variant]:
    cuda = args.device == "cuda"
    # most important first: a time budget cuts the tail
    vs = [Variant("stock", ours=False, gc=True, note="TRL defaults: checkpointing, padded, fused head"),
          Variant("ours", ours=True, note="RecSFTTrainer + sft_config, padded"),
          Variant("ours_padfree", ours=True, padding_free=True, note="ours, padding-free batches"),
          Variant("stock_nogc", ours=False, gc=False, note="stock, checkpointing off"),
          Variant("ours_pack", ours=True, packing=True, note="ours, packing: true (BFD)")]
    if args.quick:
        vs = [v for v in vs if v.name in ("stock", "ours")]
    if args.qlora:
        from recsft.modeling import kbit_problem

        why = kbit_problem(4, args.device)
        if why:
            print(f"--qlora: skipped ({why})")
        else:
            vs += [Variant("stock_qlora", ours=False, gc=True, qlora=True, note="stock, 4-bit NF4 base"),
                   Variant("ours_qlora", ours=True, qlora=True, note="ours, 4-bit NF4 base"),
                   Variant("ours_padfree_qlora", ours=True, padding_free=True, qlora=True,
                           note="ours padding-free, 4-bit NF4 base")]
    fa_problem = None
    if cuda:
        from recsft.modeling import flash_attn_problem

        fa_problem = flash_attn_problem()  # the import is tried: an installed but broken wheel is skipped too
    if cuda and fa_problem is None:
        vs.append(Variant("ours_fa2", ours=True, padding_free=True, attn="flash_attention_2",
                          note="ours padding-free, flash-attn 2 varlen"))
    elif cuda:
        print(f"flash-attn: {fa_problem}; flash_attention_2 variant skipped")
    if importlib.util.find_spec("liger_kernel") is not None and cuda:
        vs.append(Variant("ours_liger", ours=True, padding_free=True, liger=True,
                          note="ours padding-free + liger kernels"))
    elif cuda:
        print("liger-kernel: not installed, liger variant skipped")
    if args.compile:
        vs.append(Variant("ours_compile", ours=True, padding_free=True, compile=True,
                          note="ours padding-free + torch.compile"))
    if args.variants:
        wanted = args.variants.split(",")
        vs = [v for v in vs if v.name in wanted]
    return vs


# ------------------------------------------------------------------------------------------ model/data
def body_params(config) -> int:
    h, L = config.hidden_size, config.num_hidden_layers
    hd = getattr(config, "head_dim", None) or h // config.num_attention_heads
    q, kv = config.num_attention_heads * hd, config.num_key_value_heads * hd
    attn = h * q + 2 * h * kv + q * h
    mlp = 3 * h * config.intermediate_size
    return L * (attn + mlp)


def lora_params(config, rank: int) -> int:
    h, L = config.hidden_size, config.num_hidden_layers
    hd = getattr(config, "head_dim", None) or h // config.num_attention_heads
    q, kv, inter = config.num_attention_heads * hd, config.num_key_value_heads * hd, config.intermediate_size
    shapes = [(h, q), (h, kv), (h, kv), (q, h), (h, inter), (h, inter), (inter, h)]
    return L * sum(rank * (i + o) for i, o in shapes)


def flops_per_token(config, rank: int, ctx: float, label_frac: float) -> dict:
    hd = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    parts = {"linear": 4 * body_params(config), "lora": 6 * lora_params(config, rank),
             "attention": 12 * config.num_hidden_layers * config.num_attention_heads * hd * ctx,
             "lm_head": 4 * config.hidden_size * config.vocab_size * label_frac}
    parts["total"] = sum(parts.values())
    return parts


# ------------------------------------------------------------------------------------------- trainers
def make_trainer(v: Variant, model_dir: str, tok, train_ds, args, max_steps: int, callbacks=(), lora_dropout=None,
                 dtype: str = "auto"):
    """A fresh model (same weights, same LoRA init) and the trainer of variant ``v``."""
    from transformers import set_seed

    from recsft.modeling import apply_lora, load_model

    set_seed(args.seed)
    model = load_model(model_dir, args.device, dtype, v.attn, 4 if v.qlora else None)
    model = apply_lora(model, args.lora_rank, args.lora_alpha,
                       args.lora_dropout if lora_dropout is None else lora_dropout, "all", v.gc)
    out = tempfile.mkdtemp(prefix=f"bench_{v.name}_")
    if v.ours:
        from recsft.config import TrainArgs
        from recsft.trainer import RecSFTTrainer
        from recsft.training import sft_config

        train = TrainArgs(output_dir=out, per_device_train_batch_size=args.batch,
                          gradient_accumulation_steps=args.accum, max_steps=max_steps, learning_rate=args.lr,
                          logging_steps=1, eval_strategy="no", save_strategy="no", load_best_model_at_end=False,
                          early_stopping_patience=None, gradient_checkpointing=v.gc, packing=v.packing,
                          report_to="none", seed=args.seed)
        # every option at construction: SFTConfig derives settings from them (torch_compile set afterwards
        # leaves torch_compile_backend unset, and the Trainer then compiles nothing)
        extra = dict(use_liger_kernel=v.liger, torch_compile=v.compile, disable_tqdm=True)
        if v.padding_free:  # the data is already cut to cutoff_len; TRL refuses max_length without packing
            extra.update(padding_free=True, max_length=None)
        targs = sft_config(train, args.cutoff_len, args.device, has_eval=False, **extra)
        trainer = RecSFTTrainer(model=model, args=targs, train_dataset=train_ds, processing_class=tok,
                                callbacks=list(callbacks))
    else:
        from trl import SFTConfig, SFTTrainer

        # stock: SFTConfig defaults for everything that affects speed; batch/steps/dtype/seed and the LR schedule
        # (not a speed lever) are aligned with ours, so both runs see the same updates and losses
        targs = SFTConfig(output_dir=out, per_device_train_batch_size=args.batch,
                          gradient_accumulation_steps=args.accum, max_steps=max_steps, learning_rate=args.lr,
                          lr_scheduler_type="cosine", warmup_steps=0.03,
                          max_length=args.cutoff_len, logging_steps=1, save_strategy="no", report_to="none",
                          seed=args.seed, use_cpu=args.device == "cpu", bf16=args.device == "cuda",
                          gradient_checkpointing=v.gc, disable_tqdm=True)
        trainer = SFTTrainer(model=model, args=targs, train_dataset=train_ds, processing_class=tok,
                             callbacks=list(callbacks))
    from transformers.trainer_callback import PrinterCallback

    trainer.remove_callback(PrinterCallback)  # no per-step log dicts on stdout (losses stay in log_history)
    trainer._bench_out = out
    return trainer


def dispose(trainer) -> None:
    import torch

    shutil.rmtree(getattr(trainer, "_bench_out", ""), ignore_errors=True)
    trainer.model = trainer.model_wrapped = trainer.optimizer = trainer.lr_scheduler = None
    try:
        trainer.accelerator.free_memory()  # drops the accelerator's references, gc.collect + empty_cache
    except Exception:  # noqa: BLE001
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def train_once(v: Variant, model_dir, tok, train_ds, args) -> dict:
    import torch

    gc.collect()
    resident = torch.cuda.memory_allocated() / 2**30 if args.device == "cuda" else None  # leak check
    from _step_timer import StepTimer

    timer = StepTimer(args.device)
    trainer = make_trainer(v, model_dir, tok, train_ds, args, args.warmup + args.steps, callbacks=[timer])
    timer.trainer = trainer
    if args.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    if v.compile:
        torch._dynamo.reset()
        torch._dynamo.utils.counters.clear()
    try:
        result = trainer.train()
        (t0, n0), (t1, n1) = timer.marks[args.warmup], timer.marks[-1]
        steps = len(timer.marks) - 1 - args.warmup
        step_times = [b[0] - a[0] for a, b in zip(timer.marks[args.warmup:], timer.marks[args.warmup + 1:])]
        losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
        out = {"tokens_per_s": (n1 - n0) / (t1 - t0), "s_per_step": median(step_times), "timed_steps": steps,
               "tokens_per_step": (n1 - n0) / max(steps, 1), "train_loss": float(result.training_loss),
               "first_loss": losses[0] if losses else None, "last_loss": losses[-1] if losses else None}
        if args.device == "cuda":
            out["peak_mem_gib"] = torch.cuda.max_memory_allocated() / 2**30
            out["resident_before_gib"] = resident
        if v.compile:
            out.update(compile_report(timer.marks))
        return out
    finally:
        timer.trainer = None
        dispose(trainer)


def compile_report(marks) -> dict:
    """What torch.compile did: frames compiled, graph breaks by reason, and the first (compiling) step's time."""
    from torch._dynamo.utils import counters

    breaks = dict(counters["graph_break"])
    return {"first_step_s": marks[1][0] - marks[0][0] if len(marks) > 1 else None,
            "frames_compiled": int(counters["stats"].get("unique_graphs", 0)),
            "graph_breaks": int(sum(breaks.values())),
            "graph_break_reasons": dict(sorted(breaks.items(), key=lambda kv: -kv[1])[:5])}


# ------------------------------------------------------------------------------------------ check
def loss_check(model_dir, tok, train_ds, args) -> dict:
    """Stock and ours (padded and padding-free) on the same batch: loss and every LoRA gradient compared."""
    examples = [train_ds[i] for i in range(args.batch)]
    out = {}
    for v in (Variant("stock", ours=False, gc=True), Variant("ours", ours=True),
              Variant("ours_padfree", ours=True, padding_free=True)):
        # fp32 on CPU: the tolerance below is for fp32 (dtype auto picks bf16 on CPUs with native bf16)
        trainer = make_trainer(v, model_dir, tok, train_ds, args, 1, lora_dropout=0.0,
                               dtype="float32" if args.device == "cpu" else "auto")
        try:
            model = trainer.model
            model.train()
            inputs = trainer._prepare_inputs(trainer.data_collator(examples))
            with trainer.compute_loss_context_manager():
                loss = trainer.compute_loss(model, inputs)
            loss.backward()
            grads = {n.replace("base_model.model.", ""): p.grad.detach().float().cpu().clone()
                     for n, p in model.named_parameters() if p.requires_grad and p.grad is not None}
            out[v.name] = (float(loss.detach().float()), grads)
        finally:
            dispose(trainer)
    ref_loss, ref_grads = out["stock"]
    tol = 1e-4 if args.device == "cpu" else 2e-2
    res = {"stock_loss": ref_loss, "tolerance": tol}
    ok = True
    for name in ("ours", "ours_padfree"):
        loss, grads = out[name]
        scale = max(g.abs().max().item() for g in ref_grads.values())
        gdiff = max((grads[k] - g).abs().max().item() for k, g in ref_grads.items()) / max(scale, 1e-30)
        ldiff = abs(loss - ref_loss) / max(abs(ref_loss), 1e-30)
        same_keys = set(grads) == set(ref_grads)
        res[name] = {"loss": loss, "loss_rel_diff": ldiff, "grad_max_rel_diff": gdiff, "same_params": same_keys}
        ok &= ldiff < tol and gdiff < tol * 10 and same_keys
    res["ok"] = ok
    return res


# ------------------------------------------------------------------------------------------ main
@dataclass
class Setup:
    """What every variant shares: tokenizer, data, the random model folder, and the run description."""

    tok: object
    train_ds: object
    model_dir: str
    flops: dict
    info: dict
    variants: list


def prepare(args) -> Setup:
    """Tokenized data, the random model, FLOPs per token and the header of the results."""
    from datasets import Dataset
    from transformers import AutoConfig

    from recsft.modeling import load_tokenizer
    from recsft.preprocess import tokenize_to_arrow

    tok = load_tokenizer(QWEN3_TOKENIZER)
    data = default_data(args.data)
    need = args.batch * args.accum * (args.warmup + args.steps) * 3  # packing puts ~2 examples in a row
    records = load_records(data)[:need]
    train_ds = Dataset(tokenize_to_arrow(records, tok, args.cutoff_len))
    lens = [len(x) for x in train_ds["input_ids"]]
    labels = sum(sum(1 for t in lab if t != -100) for lab in train_ds["labels"])
    ctx = sum(n * n for n in lens) / (2 * sum(lens))
    label_frac = labels / sum(lens)
    model_dir = random_qwen3_dir(args.shape, tok, args.device)
    gc.freeze()  # tokenizer, data, modules: out of every later gc.collect (0.3 s each on this heap)
    config = AutoConfig.from_pretrained(model_dir)
    flops = flops_per_token(config, args.lora_rank, ctx, label_frac)
    variants = build_variants(args)
    info = {"device": device_info(args.device), "versions": versions(), "shape": args.shape,
            "shape_dims": dict(zip(["hidden", "intermediate", "layers", "heads", "kv_heads", "head_dim"],
                                   QWEN3_SHAPES[args.shape])), "vocab": QWEN3_VOCAB,
            "batch": args.batch, "grad_accum": args.accum, "warmup_steps": args.warmup, "timed_steps": args.steps,
            "repeats": args.repeats, "cutoff_len": args.cutoff_len, "data": data, "examples": len(records),
            "mean_len": sum(lens) / len(lens), "label_frac": label_frac, "ctx_mean": ctx,
            "body_params": body_params(config), "lora_params": lora_params(config, args.lora_rank),
            "flops_per_token": flops, "variants": {}}
    print(f"device: {info['device']}")
    print(f"shape {args.shape} {info['shape_dims']} vocab {QWEN3_VOCAB}; batch {args.batch} x accum {args.accum}; "
          f"{args.warmup} warm-up + {args.steps} timed steps; mean example {info['mean_len']:.0f} tokens, "
          f"{100 * label_frac:.2f}% label tokens")
    return Setup(tok, train_ds, model_dir, flops, info, variants)


def measure(setup: Setup, args, started: float) -> None:
    """The loss check, then interleaved rounds over the variants; results go into ``setup.info``."""
    info, flops = setup.info, setup.flops
    if not args.skip_check:
        info["loss_check"] = check = loss_check(setup.model_dir, setup.tok, setup.train_ds, args)
        print(f"loss check (same batch, dropout off): stock {check['stock_loss']:.6f} | "
              + " | ".join(f"{n} {check[n]['loss']:.6f} (loss rel diff {check[n]['loss_rel_diff']:.1e}, "
                           f"grad max rel diff {check[n]['grad_max_rel_diff']:.1e})"
                           for n in ("ours", "ours_padfree")) + f" -> {'OK' if check['ok'] else 'MISMATCH'}")
    peak = args.peak_tflops or PEAK_TFLOPS.get(args.device)
    plain = [v for v in setup.variants if not v.compile]
    compiled = [v for v in setup.variants if v.compile]
    plan = [(r, v, started, args.time_budget) for r in range(args.repeats) for v in plain]
    plan += [(r, v, None, args.compile_budget) for r in range(args.repeats) for v in compiled]
    compile_start = None
    for r, v, t0, budget in plan:
        if t0 is None:  # torch.compile: its own budget, from the first compiled variant on (compiling takes minutes)
            compile_start = compile_start or time.perf_counter()
            t0 = compile_start
        if time.perf_counter() - t0 > budget:
            print(f"time budget {budget}s spent: {v.name} round {r + 1} skipped")
            continue
        try:
            res = train_once(v, setup.model_dir, setup.tok, setup.train_ds, args)
            v.results.append(res)
            print(f"  round {r + 1} {v.name:>20}: {res['tokens_per_s']:9.1f} tokens/s, "
                  f"{res['s_per_step']:.3f} s/step"
                  + (f", peak {res['peak_mem_gib']:.2f} GiB" if "peak_mem_gib" in res else "")
                  + (f", MFU {res['tokens_per_s'] * flops['total'] / 1e12 / peak:.1%}" if peak else ""),
                  flush=True)
            if "graph_breaks" in res:
                print(f"  {'':>28}compiled {res['frames_compiled']} graph(s), first step {res['first_step_s']:.1f} s,"
                      f" {res['graph_breaks']} graph break(s): {res['graph_break_reasons'] or '-'}", flush=True)
        except Exception as e:  # noqa: BLE001 - one failing option must not lose the others' numbers
            v.results.append({"error": f"{type(e).__name__}: {e}"})
            print(f"  round {r + 1} {v.name:>20}: FAILED {type(e).__name__}: {e}", flush=True)
            if args.verbose:
                traceback.print_exc()
        info["variants"][v.name] = summarize(v, flops["total"], args)
        write_json(args.json_out, info, quiet=True)  # after every variant: a timeout keeps the rest


def report(info: dict, flops: dict, args) -> dict:
    """The table, the RATIO lines (against stock, measured in the same run) and the JSON file."""
    rows = [dict(name=n, **s) for n, s in info["variants"].items()]
    ref = "stock" if "stock" in info["variants"] else next(iter(info["variants"]), None)
    ref_tps = info["variants"].get(ref, {}).get("tokens_per_s")
    for row in rows:
        row["ratio"] = row.get("tokens_per_s") / ref_tps if ref_tps and row.get("tokens_per_s") else None
    base = info["variants"].get("stock", {}).get("tokens_per_s")
    print()
    print_table(rows, [("name", "variant", ""), ("tokens_per_s", "tokens/s", ",.1f"),
                       ("s_per_step", "s/step", ".3f"), ("ratio", f"vs {ref}", ".2f"),
                       ("peak_mem_gib", "peak GiB", ".2f"), ("mfu", "MFU", ".1%"),
                       ("tflops", "model TFLOP/s", ".2f"), ("last_loss", "last loss", ".4f"), ("note", "", "")])
    ours = info["variants"].get("ours", {}).get("tokens_per_s")
    best = max((r for r in rows if r.get("tokens_per_s") and r["name"].startswith("ours")
                and not r["name"].endswith("qlora")), key=lambda r: r["tokens_per_s"], default=None)
    if base and ours:
        info["speedup_ours_vs_stock"] = ours / base
        info["best_ours"] = best["name"]
        info["speedup_best_vs_stock"] = best["tokens_per_s"] / base
        print(f"\nRATIO train ours/stock = {ours / base:.2f}x; best ({best['name']}) = "
              f"{best['tokens_per_s'] / base:.2f}x (target >= 1.3x); loss check "
              + ("skipped" if "loss_check" not in info else "OK" if info["loss_check"]["ok"] else "MISMATCH"))
    sq, oq = (info["variants"].get(k, {}).get("tokens_per_s") for k in ("stock_qlora", "ours_qlora"))
    if sq and oq:
        info["speedup_qlora_ours_vs_stock"] = oq / sq
        print(f"RATIO train QLoRA ours/stock = {oq / sq:.2f}x")
    print(f"FLOPs/token = {flops['total'] / 1e9:.3f} GFLOP (linear {flops['linear'] / 1e9:.3f}, lora "
          f"{flops['lora'] / 1e9:.3f}, attention {flops['attention'] / 1e9:.3f}, lm_head {flops['lm_head'] / 1e9:.3f})")
    write_json(args.json_out, info)
    return info


def run(args) -> dict:
    quiet_logs()
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device")
    started = time.perf_counter()
    setup = prepare(args)
    try:
        measure(setup, args, started)
    finally:
        shutil.rmtree(setup.model_dir, ignore_errors=True)
    return report(setup.info, setup.flops, args)


def summarize(v: Variant, flops_total: float, args) -> dict:
    ok = [r for r in v.results if "error" not in r]
    s = {"note": v.note, "runs": v.results}
    if not ok:
        s["error"] = v.results[-1].get("error") if v.results else "not run"
        return s
    for key in ("tokens_per_s", "s_per_step", "tokens_per_step", "peak_mem_gib", "last_loss", "first_loss"):
        vals = [r[key] for r in ok if r.get(key) is not None]
        if vals:
            s[key] = median(vals)
    s["tflops"] = s["tokens_per_s"] * flops_total / 1e12
    peak = args.peak_tflops or PEAK_TFLOPS.get(args.device)
    if peak:
        s["mfu"] = s["tflops"] / peak
    return s


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--shape", choices=list(QWEN3_SHAPES), default=None, help="default: small on CPU, qwen3-0.6b on CUDA")
    p.add_argument("--data", default=None)
    p.add_argument("--batch", type=int, default=2, help="per-device train batch size (the configs' 2)")
    p.add_argument("--accum", type=int, default=None, help="gradient accumulation (default: 2 on CPU, 8 on CUDA)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps (default: 1 on CPU, 2 on CUDA)")
    p.add_argument("--steps", type=int, default=None, help="timed steps (default: 3 on CPU, 8 on CUDA)")
    p.add_argument("--repeats", type=int, default=1, help="interleaved rounds over all variants (medians)")
    p.add_argument("--cutoff-len", type=int, default=1024)
    p.add_argument("--lora-rank", type=int, default=16)
    p.add_argument("--lora-alpha", type=int, default=64)
    p.add_argument("--lora-dropout", type=float, default=0.05)
    p.add_argument("--lr", type=float, default=1.5e-4)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--qlora", action="store_true", help="add 4-bit NF4 variants (bitsandbytes, CUDA or CPU)")
    p.add_argument("--compile", action="store_true", help="add a torch.compile variant")
    p.add_argument("--variants", default=None, help="comma list of variant names to run (default: all)")
    p.add_argument("--skip-check", action="store_true", help="skip the stock-vs-ours loss/gradient check")
    p.add_argument("--peak-tflops", type=float, default=None, help="for MFU (default: 989 on CUDA)")
    p.add_argument("--time-budget", type=float, default=1e9, help="seconds; later variants are skipped after it")
    p.add_argument("--compile-budget", type=float, default=600,
                   help="seconds for the torch.compile variants, counted from the first of them (they run last)")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads for torch (default: torch's). On a shared, oversubscribed CPU use 1: with more "
                        "threads than free cores every op waits on descheduled threads")
    p.add_argument("--quick", action="store_true", help="tiny shape, 128 tokens, 2 steps, stock vs ours, 1 thread")
    p.add_argument("--verbose", action="store_true")
    p.add_argument("--json-out", default=None)
    args = p.parse_args(argv)
    cuda = args.device == "cuda"
    args.shape = args.shape or ("qwen3-0.6b" if cuda else "small")
    args.accum = args.accum or (8 if cuda else 2)
    args.warmup = args.warmup if args.warmup is not None else (2 if cuda else 1)
    args.steps = args.steps or (8 if cuda else 3)
    if args.quick:
        args.shape, args.batch, args.accum, args.warmup, args.steps = "tiny", 2, 1, 1, 2
        args.cutoff_len, args.threads = min(args.cutoff_len, 128), args.threads or 1
    return args


def main(argv=None) -> dict:
    """Run with command-line ``argv`` (a list, or None for sys.argv) or an already parsed Namespace."""
    return bench_main(run, parse_args, argv)


if __name__ == "__main__":
    main()
