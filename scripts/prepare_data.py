"""Build the MovieLens Yes/No datasets: train.json, eval.json (training format), test_raw.jsonl (test format).

Copy-paste:

    python scripts/prepare_data.py                                   # bundled MovieLens-100K, offline
    python scripts/prepare_data.py --raw-dir ~/Downloads/ml-1m       # an extracted ml-100k / ml-1m / ml-latest-small
    python scripts/prepare_data.py --source download                 # ml-100k from grouplens.org (online)
    python scripts/prepare_data.py --history-len 10 --like-threshold 4 --seed 1 --out-dir data/ml_h10
    python scripts/prepare_data.py --format session --session-len 16     # multi-turn runs of 16 candidates
    python scripts/prepare_data.py --features item_stats user_stats genres --out-dir data/movielens_feat
    python scripts/prepare_data.py --retrieval-history --out-dir data/movielens_retrieval

Each example: the user's last ``history_len`` rated movies (title with year, rating) before the candidate;
label Yes when the candidate's rating >= ``like_threshold``. Split per user by time (last 10% of each
user's candidates -> test, the 10% before -> eval), so no eval/test candidate precedes a training one.
Invalid raw rows (bad line, rating outside 0.5..5, unknown movie id) are dropped with one counted warning.
Writes ``<out-dir>/{train.json, eval.json, test_raw.jsonl, stats.json}`` as one set with a ``manifest.json``
(one build id, a sha256 per file) that readers check, so an interrupted run never leaves a mixed set;
errors exit with code 2, Ctrl-C with 130.
``--format session`` writes ``<out-dir>/{session_train.json, session_eval.json, session_test.jsonl,
session_stats.json}`` instead: one example per run of up to ``--session-len`` consecutive candidates of a
user, as a multi-turn chat (docs/data.md). ``--features`` adds prompt lines computed from earlier ratings only.
"""

from __future__ import annotations

import argparse
import time

from recsft.cli import ArgumentParser, finite_float, non_negative_int, output_dir, positive_int, run


def parse_args(argv: list[str] | None = None):
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out-dir", type=output_dir, default="data/movielens_qwen3")
    p.add_argument("--source", choices=["bundled", "download"], default="bundled")
    p.add_argument("--raw-dir", default=None, help="extracted ml-100k, ml-1m or ml-latest-small folder")
    p.add_argument("--history-len", type=positive_int, default=15)
    p.add_argument("--like-threshold", type=finite_float, default=4.0, help="label Yes when rating >= this (0.5-5]")
    p.add_argument("--eval-ratio", type=finite_float, default=0.1)
    p.add_argument("--test-ratio", type=finite_float, default=0.1)
    p.add_argument("--seed", type=non_negative_int, default=42)
    p.add_argument("--max-users", type=positive_int, default=None, help="only the first N users (quick runs)")
    p.add_argument("--format", choices=["single", "session"], default="single",
                   help="single: one question per example (default); session: multi-turn runs of candidates")
    p.add_argument("--session-len", type=int, default=16, help="--format session: candidates per example (max)")
    p.add_argument("--features", nargs="+", default=[], metavar="NAME",
                   help="prompt lines from earlier ratings: item_stats, user_stats, genres (space or comma list)")
    p.add_argument("--retrieval-history", action="store_true",
                   help="history = the earlier ratings most similar to the candidate (genres), not the most recent")
    return p.parse_args(argv)


def main(args) -> dict:
    from recsft.io import DataError
    from recsft.movielens import check_features, check_params, prepare
    from recsft.validate import writable_dir

    features = check_features([f for item in args.features for f in item.split(",") if f])
    if args.session_len < 1:
        raise DataError(f"--session-len must be >= 1, got {args.session_len}")
    writable_dir(args.out_dir, "--out-dir")
    check_params(args.history_len, args.eval_ratio, args.test_ratio, args.like_threshold, args.max_users)
    start = time.perf_counter()
    stats = prepare(args.out_dir, args.source, args.raw_dir, args.history_len, args.like_threshold,
                    args.eval_ratio, args.test_ratio, args.seed, args.max_users, args.format,
                    args.session_len, features, args.retrieval_history)
    print(f"MovieLens from {stats['source']}: {stats['ratings']:,} ratings, {stats['users']} users, "
          f"{stats['movies']} movies -> {args.out_dir} in {time.perf_counter() - start:.1f}s")
    for name, s in stats["splits"].items():
        answers = f" ({s['answers']:,d} answers)" if "answers" in s else ""
        print(f"  {name:5s}: {s['examples']:6,d} examples{answers}, Yes share {s['yes_share']:.1%}")
    return stats


if __name__ == "__main__":
    run(main, parse_args)
