"""Scoring order of candidate-block records: file order vs longest first (what ``infer_lora.py`` does), the same
records, the same batch size, one model, one process.

Copy-paste:

    OMP_NUM_THREADS=2 python bench/bench_block_order.py           # real SmolLM2-135M-Instruct (offline GGUF), float32
    python bench/bench_block_order.py --n 64 --batch 16 --json-out output/bench/block_order.json
    python bench/bench_block_order.py --quick                     # tiny random Qwen3; used by the smoke test

Records: the first ``--n`` records of ``--data`` (default ``data/movielens_blocks/blocks_test.jsonl`` of
``prepare_data.py --format blocks --history-from train --features item_stats user_stats genres``, else blocks
built in-process from the bundled MovieLens-100K), in file order: a user's records side by side, the last one
shorter. "file order" scores them in batches of ``--batch`` as they come; "longest first" is
``recsft.evaluation.evaluate``, the path ``infer_lora.py`` scores by (sorted by ``longest_first``, rows back in
file order). Reported: seconds and records/s of each, the padded tokens each order's batches hold per real token
(exact, from the tokenized records), the ratio of the two times and the largest |P(Yes) difference| between the
orders for the same answer (float32: expected < 1e-4).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from _common import (QWEN3_TOKENIZER, ROOT, SMOLLM2_GGUF, bench_main, device_info, print_table, quiet_logs,
                     random_qwen3_dir, versions, write_json)

BLOCKS_TEST = ROOT / "data/movielens_blocks/blocks_test.jsonl"


def block_records(path: str | None, n: int, bundled: bool = False) -> list[dict]:
    """The first ``n`` candidate-block records of ``path``, the prepared test split, or (``bundled``, or neither
    exists) blocks built from the bundled MovieLens-100K."""
    from recsft import movielens
    from recsft.io import load_data

    if path or (BLOCKS_TEST.is_file() and not bundled):
        return load_data(path or BLOCKS_TEST)[:n]
    ratings, titles = movielens.load_ratings("bundled")
    ratings = ratings[ratings.user_id <= 40]
    return movielens.build_blocks(ratings, titles, block_size=16, seed=42)["test"][:n]


def padding(records: list[dict], tok, batch: int, cutoff: int) -> float:
    """Tokens the batches of ``records`` (in this order) hold after right padding, per real token."""
    from recsft.preprocess import tokenize_blocks_to_arrow

    lens = [len(x) for x in tokenize_blocks_to_arrow(records, tok, cutoff).column("input_ids").to_pylist()]
    padded = sum(max(lens[i:i + batch]) * len(lens[i:i + batch]) for i in range(0, len(lens), batch))
    return padded / sum(lens)


def run(args) -> dict:
    import torch

    from recsft.evaluation import EvalSettings, evaluate, longest_first, prediction_rows
    from recsft.modeling import load_model, load_tokenizer

    quiet_logs()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.quick:
        tok = load_tokenizer(QWEN3_TOKENIZER)
        model = load_model(random_qwen3_dir("tiny", tok, "cpu"), "cpu", "float32", "sdpa").eval()
    else:
        tok, model = load_tokenizer(args.model), load_model(args.model, "cpu", "float32", "auto").eval()
    records = block_records(args.data, args.n, bundled=args.quick)
    ordered = [records[i] for i in longest_first(records)]
    settings = EvalSettings(batch_size=args.batch, cutoff_len=args.cutoff_len)
    start = time.perf_counter()
    rows, _ = prediction_rows(model, tok, records, "score", settings, progress=False)  # batches in file order
    secs = {"file": time.perf_counter() - start}
    start = time.perf_counter()
    back, _ = evaluate(model, tok, records, "score", settings, desc="longest first")  # infer_lora.py's path
    secs["sorted"] = time.perf_counter() - start
    diff = max(abs(a["p_yes"] - b["p_yes"]) for a, b in zip(rows, back))
    pads = {"file": padding(records, tok, args.batch, args.cutoff_len),
            "sorted": padding(ordered, tok, args.batch, args.cutoff_len)}
    res = {"records": len(records), "answers": len(back), "batch": args.batch, "device": device_info("cpu"),
           "threads": torch.get_num_threads(), "seconds": secs, "padding": pads,
           "speedup": secs["file"] / secs["sorted"], "max_abs_p_yes_diff": diff, "versions": versions()}
    print_table([{"mode": m, "s": secs[k], "rps": len(records) / secs[k], "pad": pads[k],
                  "r": secs["file"] / secs[k]} for m, k in (("file order", "file"), ("longest first", "sorted"))],
                [("mode", "order", ""), ("s", "seconds", ".1f"), ("rps", "records/s", ".3f"),
                 ("pad", "padded/real tokens", ".2f"), ("r", "ratio", ".2f")])
    print(f"\nRATIO block scoring file/longest-first = {res['speedup']:.2f}x [{len(records)} records, "
          f"{len(back)} answers, batch {args.batch}]; max |dP(Yes)| {diff:.1e}")
    write_json(args.json_out, res)
    return res


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=SMOLLM2_GGUF, help="model path or pkg:// GGUF (default: SmolLM2-135M)")
    p.add_argument("--data", default=None, help="candidate-block records (default: the prepared blocks test split)")
    p.add_argument("--n", type=int, default=64, help="records, from the file's start")
    p.add_argument("--batch", type=int, default=16, help="records per batch (16 = the config's infer_batch_size)")
    p.add_argument("--cutoff-len", type=int, default=1536)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--quick", action="store_true", help="tiny random Qwen3, 8 bundled records: seconds")
    p.add_argument("--json-out", default=None)
    args = p.parse_args(argv)
    if args.quick:
        args.n, args.batch = min(args.n, 8), min(args.batch, 4)
    return args


def main(argv=None) -> dict:
    return bench_main(run, parse_args, argv)


if __name__ == "__main__":
    main()
