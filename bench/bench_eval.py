"""Evaluation speed: scoring mode (one forward pass, P(Yes) vs P(No)) vs greedy generate(max_new_tokens=8),
the same templated prompts, the same batches, one process, interleaved.

Copy-paste:

    python bench/bench_eval.py                                    # real SmolLM2-135M-Instruct (offline GGUF), CPU
    python bench/bench_eval.py --n 64 --repeats 2 --json-out output/bench/eval_cpu.json
    python bench/bench_eval.py --quick                            # tiny random Qwen3; used by the smoke test
    # GPU: random weights in the exact Qwen3-0.6B shape; EOS is disabled so generation runs exactly
    # max_new_tokens steps (8 = the generation eval's default; 2 = what a trained adapter emits: "Yes<|im_end|>")
    python bench/bench_eval.py --device cuda --model qwen3-0.6b-random --n 512 --batch 16,64 --max-new-tokens 2,8

Both modes go through ``recsft.inference`` (``score`` and ``generate``) exactly as ``infer_lora.py`` does:
left padding, prompts cut from the left to the training budget, batch ``--batch``. Reported: examples/s of
each, their ratio, the mean number of tokens generated, and label agreement (generation's parsed answer vs the
Yes/No that scoring picks; and each one's accuracy against the gold labels).
"""

from __future__ import annotations

import argparse
import time

from _common import (QWEN3_TOKENIZER, SMOLLM2_GGUF, bench_main, default_data, device_info, load_records, median,
                     print_table, quiet_logs, random_qwen3_dir, versions, write_json)


def load(model: str, device: str):
    """``(model, tokenizer, cleanup folder)``; ``<shape>-random`` builds random weights in a Qwen3 shape."""
    from recsft.modeling import load_model, load_tokenizer

    if model.endswith("-random"):
        tok = load_tokenizer(QWEN3_TOKENIZER)
        path = random_qwen3_dir(model.removesuffix("-random"), tok, device)
        m = load_model(path, device, "auto", "sdpa")
        m.generation_config.pad_token_id, m.generation_config.eos_token_id = tok.pad_token_id, tok.eos_token_id
        return m.eval(), tok, path
    tok = load_tokenizer(model)
    return load_model(model, device, "auto", "auto").eval(), tok, None


def run(args) -> dict:
    quiet_logs()
    import shutil

    import torch

    from recsft.inference import generate, prompts_for, score
    from recsft.preprocess import prompt_budget
    from recsft.metrics import extract_answer

    if args.threads:
        torch.set_num_threads(args.threads)
    batches = [int(b) for b in str(args.batch).split(",")]
    new_tokens_list = [int(k) for k in str(args.max_new_tokens).split(",")]
    sync = torch.cuda.synchronize if args.device == "cuda" else (lambda: None)
    model, tok, tmp = load(args.model, args.device)
    counts: list[int] = []
    real_generate = model.generate

    def counting_generate(*a, **kw):  # records how many tokens each sequence really generated
        ids = real_generate(*a, **kw)
        new = ids[:, kw["input_ids"].shape[1]:]
        counts.extend((new != tok.pad_token_id).sum(dim=1).tolist())
        return ids

    model.generate = counting_generate
    random_weights = args.model.endswith("-random")
    if random_weights:  # no early stop: exactly max_new_tokens decode steps (a fixed, stated workload)
        model.generation_config.eos_token_id = None
    runs = []
    try:
        data = default_data(args.data, split="eval")
        records = load_records(data)[: args.n]
        prompts, gold = prompts_for(records, tok)
        budget = prompt_budget(tok, args.cutoff_len)
        n = len(prompts)
        print(f"device: {device_info(args.device)}")
        print(f"model {args.model}; {n} prompts from {data}; batch {batches}; max_new_tokens {new_tokens_list}"
              + ("; random weights: EOS disabled, every generation runs max_new_tokens steps"
                 if random_weights else ""))
        for batch in batches:
            for max_new in new_tokens_list:
                def do_generate(ps):
                    return generate(model, tok, ps, max_new, 0.0, 1.0, batch, progress=False,
                                    max_prompt_tokens=budget)

                def do_score(ps):
                    return score(model, tok, ps, batch, progress=False, max_prompt_tokens=budget)

                do_generate(prompts[:batch])  # warm-up: kernels, allocator, caches
                do_score(prompts[:batch])
                gen_s, score_s = [], []
                counts.clear()
                for _ in range(args.repeats):  # interleaved
                    sync()
                    t = time.perf_counter()
                    gen = do_generate(prompts)
                    sync()
                    gen_s.append(time.perf_counter() - t)
                    t = time.perf_counter()
                    sc = do_score(prompts)
                    sync()
                    score_s.append(time.perf_counter() - t)
                runs.append(summarize(gen, sc, gold, gen_s, score_s, counts[-n:], batch, max_new, extract_answer))
    finally:
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)

    rows = []
    for r in runs:
        rows.append({"mode": f"generate(max_new_tokens={r['max_new_tokens']})", "batch": r["batch"],
                     "s": r["generate_s"], "eps": r["generate_ex_per_s"], "ratio": 1.0,
                     "acc": r["accuracy_generate"], "tok": r["mean_generated_tokens"]})
        rows.append({"mode": "score (one forward)", "batch": r["batch"], "s": r["score_s"], "eps": r["score_ex_per_s"],
                     "ratio": r["speedup"], "acc": r["accuracy_score"], "agree": r["agreement"]})
    print()
    print_table(rows, [("mode", "mode", ""), ("batch", "batch", "d"), ("s", "seconds", ".2f"),
                       ("eps", "examples/s", ",.1f"), ("ratio", "vs generate", ".1f"),
                       ("tok", "gen tokens", ".1f"), ("acc", "acc vs gold", ".3f"), ("agree", "agreement", ".3f")])
    print()
    for r in runs:
        agree = "n/a" if r["agreement"] is None else f"{r['agreement']:.3f}"
        print(f"RATIO eval score/generate = {r['speedup']:.1f}x (target >= 5x) [batch {r['batch']}, max_new_tokens "
              f"{r['max_new_tokens']}, {r['mean_generated_tokens']:.1f} tokens generated on average]; "
              f"label agreement {agree} "
              f"on {r['generation_parsed']}/{n} parsed generations")
    res = {"model": args.model, "device": device_info(args.device), "versions": versions(), "prompts": n,
           "repeats": args.repeats, "random_weights": random_weights, **runs[0], "runs": runs}
    write_json(args.json_out, res)
    return res


def summarize(gen, sc, gold, gen_s, score_s, new_tokens, batch, max_new, extract_answer) -> dict:
    n = len(gen)
    gen_ans = [extract_answer(g) for g in gen]
    score_ans = [s["answer"] for s in sc]  # greedy's pick between Yes and No (ties: lower token id)
    parsed = [i for i, a in enumerate(gen_ans) if a in ("Yes", "No")]
    labelled = [i for i, g in enumerate(gold) if g in ("Yes", "No")]
    return {"batch": batch, "max_new_tokens": max_new, "generate_s": median(gen_s), "score_s": median(score_s),
            "generate_ex_per_s": n / median(gen_s), "score_ex_per_s": n / median(score_s),
            "speedup": median(gen_s) / median(score_s),
            "mean_generated_tokens": sum(new_tokens) / max(len(new_tokens), 1),
            "generation_parsed": len(parsed),
            "agreement": (sum(gen_ans[i] == score_ans[i] for i in parsed) / len(parsed)) if parsed else None,
            "accuracy_generate": (sum(gen_ans[i] == gold[i] for i in labelled) / len(labelled)) if labelled else None,
            "accuracy_score": (sum(score_ans[i] == gold[i] for i in labelled) / len(labelled)) if labelled else None}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--model", default=SMOLLM2_GGUF,
                   help="model path / hub id / .gguf, or <shape>-random (tiny, small, qwen3-0.6b) for random weights")
    p.add_argument("--data", default=None, help="records with labels (default: data/movielens_qwen3/eval.json)")
    p.add_argument("--n", type=int, default=64)
    p.add_argument("--batch", default="16", help="batch size(s), comma list (16 = the configs' infer_batch_size)")
    p.add_argument("--max-new-tokens", default="8", help="comma list; 8 = the default of the generation eval (max_new_tokens)")
    p.add_argument("--cutoff-len", type=int, default=1024)
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--threads", type=int, default=None, help="CPU threads for torch (1 on a busy shared CPU)")
    p.add_argument("--quick", action="store_true", help="tiny random Qwen3, 8 prompts: a few seconds")
    p.add_argument("--json-out", default=None)
    args = p.parse_args(argv)
    if args.quick:
        args.model, args.n, args.batch, args.repeats = "tiny-random", 8, "4", 1
        args.threads = args.threads or 1
    return args


def main(argv=None) -> dict:
    """Run with command-line ``argv`` (a list, or None for sys.argv) or an already parsed Namespace."""
    return bench_main(run, parse_args, argv)


if __name__ == "__main__":
    main()
