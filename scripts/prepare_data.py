"""Build the MovieLens Yes/No datasets: train.json, eval.json (training format), test_raw.jsonl (test format).

Copy-paste:

    python scripts/prepare_data.py                                   # bundled MovieLens-100K, offline
    python scripts/prepare_data.py --raw-dir ~/Downloads/ml-1m       # an extracted ml-100k / ml-1m / ml-latest-small
    python scripts/prepare_data.py --source download                 # ml-100k from grouplens.org (online)
    python scripts/prepare_data.py --history-len 10 --like-threshold 4 --seed 1 --out-dir data/ml_h10
    python scripts/prepare_data.py --format session --session-len 16     # multi-turn runs of 16 candidates
    python scripts/prepare_data.py --format blocks --history-from train --features item_stats user_stats genres
                                                     # 16 candidates per shared history, no eval/test rating shown
    python scripts/prepare_data.py --features item_stats user_stats genres --out-dir data/movielens_feat
    python scripts/prepare_data.py --retrieval-history --out-dir data/movielens_retrieval
    # your own ratings: a ratings table (user, item, rating, timestamp) and an items table (id, title[, genres])
    python scripts/prepare_data.py --ratings my/ratings.csv --items my/items.csv --user-col uid \
        --item-col sku --rating-col stars --time-col ts --title-col name --rating-scale 1,10 \
        --like-threshold 8 --out-dir data/my_ratings

Each example: the user's last ``history_len`` rated movies (title with year, rating) before the candidate;
label Yes when the candidate's rating >= ``like_threshold``. Split per user by time (last 10% of each
user's candidates -> test, the 10% before -> eval), so no eval/test candidate precedes a training one.
Invalid raw rows (bad line, rating outside 0.5..5, unknown movie id) are dropped with one counted warning.
With ``--ratings``/``--items`` (CSV, TSV or Parquet) the same examples, split and statistics are built from
your own tables (string ids allowed; items without a title and invalid rows dropped, duplicate ratings:
the latest wins, each with one counted warning).
Writes ``<out-dir>/{train.json, eval.json, test_raw.jsonl, stats.json, interactions.parquet, items.parquet}``
as one set with a ``manifest.json`` (one build id, a sha256 per file) that readers check, so an interrupted run never leaves a mixed set;
errors exit with code 2, Ctrl-C with 130.
``--format session`` writes ``<out-dir>/{session_train.json, session_eval.json, session_test.jsonl,
session_stats.json}`` instead, as their own set in the same manifest: one example per run of up to
``--session-len`` consecutive candidates of a user, as a multi-turn chat (docs/data.md). ``--format blocks``
adds ``<out-dir>/{blocks_train.json, blocks_eval.json, blocks_test.jsonl, blocks_stats.json}`` to the single
format's set: one shared history followed by up to ``--block-size`` candidates, each answered from the history
alone. ``--features`` adds prompt lines computed from earlier ratings only. Item ids with the same title and year
are merged into one id (MovieLens-100K has 18 such twins; counted in stats.json). Accepted time units, id types
and encodings of your own tables, and what happens to each kind of bad row: docs/data.md.
"""

from __future__ import annotations

import argparse
import math
import time

from utils import RATING_SCALE, ArgumentParser, finite_float, non_negative_int, output_dir, positive_int, run


def parse_args(argv: list[str] | None = None):
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out-dir", type=output_dir, default=None,
                   help="default: data/movielens_qwen3 (data/movielens_blocks for --format blocks)")
    p.add_argument("--source", choices=["bundled", "download"], default="bundled")
    p.add_argument("--raw-dir", default=None, help="extracted ml-100k, ml-1m or ml-latest-small folder")
    p.add_argument("--history-len", type=positive_int, default=15)
    p.add_argument("--like-threshold", type=finite_float, default=None,
                   help="label Yes when rating >= this (inside the rating scale; default 4, needed with a "
                        "--rating-scale whose highest rating is not 5)")
    p.add_argument("--eval-ratio", type=finite_float, default=0.1)
    p.add_argument("--test-ratio", type=finite_float, default=0.1)
    p.add_argument("--seed", type=non_negative_int, default=42)
    p.add_argument("--max-users", type=positive_int, default=None, help="only the first N users (quick runs)")
    p.add_argument("--format", choices=["single", "session", "blocks"], default="single",
                   help="single: one question per example (default); session: multi-turn runs of candidates; "
                        "blocks: one shared history and up to --block-size candidates, each asked on its own")
    p.add_argument("--session-len", type=int, default=None,
                   help="--format session: candidates per example (max; default 16)")
    p.add_argument("--block-size", type=int, default=16, help="--format blocks: candidates per example (max)")
    p.add_argument("--history-from", choices=["all", "train"], default="all",
                   help="--format blocks: all = the ratings before the candidates (online protocol); train = "
                        "training-split ratings only, so no eval/test rating is ever shown (static protocol)")
    p.add_argument("--shuffle-history-titles", type=non_negative_int, default=None, metavar="SEED",
                   help="--format blocks ablation: each history shows another user's titles (same split, seeded "
                        "permutation) with its own ratings, to measure what the titles add")
    p.add_argument("--negatives", type=non_negative_int, default=0, metavar="N",
                   help="--format blocks: N movies the user never rated added to every training record, answered "
                        "No and marked sampled (ranking training; eval/test keep rated candidates only)")
    p.add_argument("--negative-sampling", choices=["uniform", "popularity"], default="uniform",
                   help="--negatives: uniform, or in proportion to 1 + the movie's training ratings")
    p.add_argument("--features", nargs="+", default=[], metavar="NAME",
                   help="prompt lines from earlier ratings: item_stats, user_stats, genres (space or comma list)")
    p.add_argument("--retrieval-history", action="store_true",
                   help="history = the earlier ratings most similar to the candidate (genres), not the most recent")
    g = p.add_argument_group("your own ratings data (instead of MovieLens)")
    g.add_argument("--ratings", default=None, help="ratings table: .csv, .tsv or .parquet")
    g.add_argument("--items", default=None, help="items table: .csv, .tsv or .parquet (item id, title, optional genres)")
    g.add_argument("--user-col", default="user_id")
    g.add_argument("--item-col", default="item_id", help="item id column of the ratings table")
    g.add_argument("--rating-col", default="rating")
    g.add_argument("--time-col", default="timestamp", help="Unix seconds or dates")
    g.add_argument("--items-id-col", default=None, help="item id column of the items table (default: --item-col)")
    g.add_argument("--title-col", default="title")
    g.add_argument("--genres-col", default=None,
                   help="genres column of the items table (default: 'genres' when present; given: it must exist)")
    g.add_argument("--rating-scale", default=",".join(f"{x:g}" for x in RATING_SCALE),
                   help="lowest,highest valid rating (others dropped); kept in stats.json, where inference reads it")
    return p.parse_args(argv)


def table_spec(args):
    """The ratings-table settings, or None for MovieLens; a half-given or bad pair of flags is an error."""
    from utils import DataError, TableSpec

    if not args.ratings and not args.items:
        return None
    if not (args.ratings and args.items):
        raise DataError("--ratings and --items go together: give both tables (or neither, for MovieLens)")
    try:
        lo, hi = (float(x) for x in args.rating_scale.split(","))
    except ValueError:
        raise DataError(f"--rating-scale {args.rating_scale!r}: use lowest,highest (e.g. 1,5 or 0.5,5)") from None
    if not lo < hi:
        raise DataError(f"--rating-scale {args.rating_scale}: the lowest rating must be below the highest")
    if not all(map(math.isfinite, (lo, hi))):
        raise DataError(f"--rating-scale {args.rating_scale}: both ends must be finite numbers (e.g. 1,5 or 0.5,5)")
    return TableSpec(args.ratings, args.items, args.user_col, args.item_col, args.rating_col, args.time_col,
                     args.items_id_col, args.title_col, args.genres_col or "genres", (lo, hi),
                     genres_explicit=args.genres_col is not None)


def check_inputs(args, table) -> None:
    """Input paths are what they claim to be, and the output folder is not the folder of an input."""
    from pathlib import Path

    from utils import DataError

    out = Path(args.out_dir).resolve()
    if args.raw_dir:
        raw = Path(args.raw_dir)
        if raw.exists() and not raw.is_dir():
            raise DataError(f"--raw-dir {raw}: is a file, not a folder; pass the extracted MovieLens folder "
                            f"(e.g. ml-100k/, holding u.data and u.item)")
        if raw.resolve() == out:
            raise DataError(f"--out-dir {args.out_dir}: is the --raw-dir folder; write the prepared data to its own "
                            f"folder (e.g. --out-dir data/movielens_qwen3)")
    if table is not None:
        for flag, path in (("--ratings", table.ratings), ("--items", table.items)):
            if Path(path).resolve().parent == out:
                raise DataError(f"--out-dir {args.out_dir}: holds the {flag} table {path}, which the prepared "
                                f"files could overwrite; choose another --out-dir (e.g. {Path(args.out_dir) / 'prepared'})")
    if args.session_len is not None and args.format != "session":
        raise DataError(f"--session-len {args.session_len}: only used with --format session; add --format session "
                        f"or drop --session-len")
    if (args.ratings or args.items) and (args.raw_dir or args.source != "bundled"):
        raise DataError("--ratings/--items replace MovieLens: drop --raw-dir/--source, or drop the tables")


def main(args) -> dict:
    from utils import DataError, check_features, check_params, prepare, writable_dir

    args.out_dir = args.out_dir or ("data/movielens_blocks" if args.format == "blocks" else "data/movielens_qwen3")
    features = check_features([f for item in args.features for f in item.split(",") if f])
    if args.session_len is not None and args.session_len < 1:
        raise DataError(f"--session-len must be >= 1, got {args.session_len}")
    writable_dir(args.out_dir, "--out-dir")
    table = table_spec(args)
    check_inputs(args, table)
    if args.like_threshold is None:
        if table is not None and table.rating_scale[1] != 5:
            raise DataError(f"--rating-scale {args.rating_scale}: give --like-threshold too (its default, 4, is for "
                            f"ratings up to 5 stars), e.g. --like-threshold {table.rating_scale[1] * 0.8:g}")
        args.like_threshold = 4.0
    check_params(args.history_len, args.eval_ratio, args.test_ratio, args.like_threshold, args.max_users,
                 table.rating_scale if table else None)
    start = time.perf_counter()
    stats = prepare(args.out_dir, args.source, args.raw_dir, args.history_len, args.like_threshold,
                    args.eval_ratio, args.test_ratio, args.seed, args.max_users, table=table, fmt=args.format,
                    session_len=args.session_len or 16, features=features, retrieval=args.retrieval_history,
                    block_size=args.block_size, history_from=args.history_from,
                    shuffle_titles=args.shuffle_history_titles, negatives=args.negatives,
                    negative_sampling=args.negative_sampling)
    print(f"{'Ratings' if table else 'MovieLens'} from {stats['source']}: {stats['ratings']:,} ratings, "
          f"{stats['users']} users, {stats['movies']} movies -> {args.out_dir} in {time.perf_counter() - start:.1f}s")
    if stats.get("merged_ids"):
        print(f"  {stats['merged_ids']} twin item ids (same title and year) merged into one id each; "
              f"{stats['merged_duplicate_ratings']} duplicate ratings dropped")
    for name, s in stats["splits"].items():
        sampled = f", {s['sampled_negatives']:,d} of them sampled No" if s.get("sampled_negatives") else ""
        answers = f" ({s['answers']:,d} answers{sampled})" if "answers" in s else ""
        print(f"  {name:5s}: {s['examples']:6,d} examples{answers}, Yes share {s['yes_share']:.1%}")
    return stats


if __name__ == "__main__":
    run(main, parse_args)
