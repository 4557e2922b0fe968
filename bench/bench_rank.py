"""Ranking speed: shared-prefix scoring (history run once, KV cache reused for the N+1 candidate suffixes) vs
scoring each full prompt separately, the same model, the same candidates, one process, interleaved.

Copy-paste:

    OMP_NUM_THREADS=1 python bench/bench_rank.py                      # real SmolLM2-135M-Instruct (offline GGUF), float32
    python bench/bench_rank.py --questions 2 --candidates 100 --json-out output/bench/rank_cpu.json
    python bench/bench_rank.py --quick                                # tiny random Qwen3; used by the smoke test
    python bench/bench_rank.py --device cuda --model qwen3-0.6b-random --questions 8 --batch 100
    OMP_NUM_THREADS=1 python bench/bench_rank.py --users 3      # per-question prefix vs one prefix per user (blocks)

One question = a real test example's prompt (its history) with ``--candidates`` movie titles swapped in (its
own candidate first, then other test candidates' titles). "full" is ``recsft.inference.score`` on the N
full prompts (left-padded batches of ``--batch``), as ``infer_lora.py --eval_mode score`` scores; "shared"
is ``recsft.ranking.llm_question_scores``. Reported: candidates/s of each, their ratio, and the largest
|P(Yes) difference| between the two (float32: expected < 1e-4).

``--users U`` measures the two LLM paths of ``rank_eval.py`` instead, on the real questions of the first U test
users (bundled MovieLens-100K prepared in a temporary folder, 99 uniform negatives, seed 0): "per question" is
today's single-format path (the test prompt with each candidate swapped in, one prefix pass per question);
"blocks" scores the same candidates as candidate blocks after the user's static-protocol prefix, one prefix pass
per user (``--features`` as in the blocks config). Reported: candidates/s, suffix tokens per candidate, ratio.
"""

from __future__ import annotations

import argparse
import random
import time
from pathlib import Path

from _common import (QWEN3_TOKENIZER, ROOT, SMOLLM2_GGUF, bench_main, device_info, median, print_table, quiet_logs,
                     random_qwen3_dir, versions, write_json)

TEST_JSONL = ROOT / "data/movielens_qwen3/test_raw.jsonl"


def test_examples(path: str | None) -> list[dict]:
    """Test-format examples: ``path``, the prepared test split, or a small split built from bundled MovieLens."""
    from recsft import movielens
    from recsft.io import load_data

    if path or TEST_JSONL.is_file():
        return load_data(path or TEST_JSONL)
    ratings, titles = movielens.load_bundled()
    ratings = movielens.clean_ratings(ratings, titles, "bundled MovieLens-100K")
    return movielens.build_examples(ratings[ratings.user_id <= 60], titles)["test"]


def load(model: str, device: str):
    """``(model, tokenizer, temp folder)``; float32 on CPU (the two paths must agree to 1e-4), ``auto`` on CUDA."""
    from recsft.modeling import load_model, load_tokenizer

    dtype = "float32" if device == "cpu" else "auto"
    if model.endswith("-random"):
        tok = load_tokenizer(QWEN3_TOKENIZER)
        path = random_qwen3_dir(model.removesuffix("-random"), tok, device)
        return load_model(path, device, dtype, "sdpa").eval(), tok, path
    return load_model(model, device, dtype, "auto").eval(), load_tokenizer(model), None


def questions(examples: list[dict], n_questions: int, n_candidates: int, seed: int = 0) -> list[tuple[dict, list[str]]]:
    pool = sorted({e["candidate_title"] for e in examples})
    rng = random.Random(seed)
    out = []
    for e in examples[:n_questions]:
        others = rng.sample([t for t in pool if t != e["candidate_title"]], min(n_candidates - 1, len(pool) - 1))
        out.append((e, [e["candidate_title"], *others]))
    return out


def run(args) -> dict:
    quiet_logs()
    import shutil

    import torch

    if args.quick:
        args.model, args.questions, args.candidates, args.batch, args.repeats = "tiny-random", 2, 12, 6, 1
    torch.set_num_threads(args.threads)
    sync = torch.cuda.synchronize if args.device == "cuda" else (lambda: None)
    model, tok, tmp = load(args.model, args.device)
    try:
        return measure_users(args, model, tok, sync) if args.users else measure(args, model, tok, sync)
    finally:
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)


def measure(args, model, tok, sync) -> dict:
    """Both scoring paths on the same questions, interleaved; throughput, ratio and largest P(Yes) difference."""
    import numpy as np

    from recsft import ranking as R
    from recsft.inference import score

    qs = questions(test_examples(args.data), args.questions, args.candidates)
    texts = [R.question_texts(e, titles, tok) for e, titles in qs]
    n = sum(len(t) for _, t in qs)
    print(f"device: {device_info(args.device)}")
    print(f"model {args.model} ({next(model.parameters()).dtype}); {len(qs)} questions x {args.candidates} "
          f"candidates; batch {args.batch}; prompt ~{len(tok(texts[0][0] + texts[0][1][0])['input_ids'])} tokens, "
          f"prefix {len(tok(texts[0][0])['input_ids'])}")

    def full():
        return [np.array([r["p_yes"] for r in score(model, tok, [p + s for s in sufs], args.batch, progress=False)])
                for p, sufs in texts]

    def shared():
        return [R.p_yes(R.llm_question_scores(model, tok, e, titles, args.batch)[0]) for e, titles in qs]

    p0, s0 = texts[0]
    score(model, tok, [p0 + s for s in s0[: args.batch]], args.batch, progress=False)  # warm-up: one batch each
    R.llm_question_scores(model, tok, qs[0][0], qs[0][1][: args.batch], args.batch)
    full_s, shared_s = [], []
    for _ in range(args.repeats):  # interleaved
        sync()
        t = time.perf_counter()
        ref = full()
        sync()
        full_s.append(time.perf_counter() - t)
        t = time.perf_counter()
        ours = shared()
        sync()
        shared_s.append(time.perf_counter() - t)
    diff = float(max(np.abs(a - b).max() for a, b in zip(ref, ours)))
    res = {"model": args.model, "device": device_info(args.device), "versions": versions(), "questions": len(qs),
           "candidates_per_question": args.candidates, "batch": args.batch, "repeats": args.repeats,
           "full_s": median(full_s), "shared_s": median(shared_s), "full_cand_per_s": n / median(full_s),
           "shared_cand_per_s": n / median(shared_s), "speedup": median(full_s) / median(shared_s),
           "max_abs_p_yes_diff": diff, "dtype": str(next(model.parameters()).dtype)}
    print()
    print_table([{"mode": "full prompt each (score)", "s": res["full_s"], "cps": res["full_cand_per_s"], "r": 1.0},
                 {"mode": "shared prefix (KV cache)", "s": res["shared_s"], "cps": res["shared_cand_per_s"],
                  "r": res["speedup"]}],
                [("mode", "mode", ""), ("s", "seconds", ".2f"), ("cps", "candidates/s", ",.1f"),
                 ("r", "vs full", ".1f")])
    print(f"\nRATIO rank shared-prefix/full = {res['speedup']:.1f}x (target >= 5x) [{n} candidates]; "
          f"max |P(Yes) diff| = {diff:.2e}")
    write_json(args.json_out, res)
    return res


def user_questions(n_users: int, features: list[str], folder: str):
    """``(questions, texts, groups)`` of the first ``n_users`` test users: rank_eval's questions and block plan."""
    from recsft import movielens
    from recsft.io import load_data
    from recsft.ranking import block_groups, build_questions

    movielens.prepare(folder, fmt="blocks", history_from="train", features=features)
    data = movielens.load_prepared(folder)
    rated = data.ratings.groupby("user_id").movie_id.agg(set).to_dict()
    items = sorted(data.ratings.movie_id.unique().tolist())
    questions, _ = build_questions(data.splits["test"], rated, items, 99, 0, max_users=n_users)
    texts = movielens.static_candidate_texts(movielens.train_ratings(data.ratings, data.splits), data.titles, items,
                                             features, data.params["like_threshold"], data.genres)
    groups = block_groups(questions, load_data(Path(folder) / "blocks_test.jsonl"), texts, "blocks_test.jsonl")
    return questions, texts, groups, data.titles


def measure_users(args, model, tok, sync) -> dict:
    """Per-question prefix (today's single-format path) vs one prefix per user (candidate blocks), interleaved by
    user on the same questions; candidates/s counts every question's candidates."""
    import tempfile

    import numpy as np

    from recsft.formatting import block_texts
    from recsft.ranking import block_candidate_scores, llm_question_scores, question_texts

    with tempfile.TemporaryDirectory() as folder:
        questions, texts, groups, titles = user_questions(args.users, args.features, folder)
    n = sum(len(q["candidates"]) for q in questions)
    q0 = questions[0]
    _, sufs = question_texts(q0["example"], [titles[c] for c in q0["candidates"]], tok)
    rec = {**groups[0]["record"], "blocks": [{"text": texts[m], "answer": "Yes"} for m in groups[0]["movies"]]}
    blocks = block_texts([rec], tok)[0][1]
    tokens = {"question": float(np.mean([len(x) for x in tok(sufs)["input_ids"]])),
              "blocks": float(np.mean([len(x) for x in tok([b for b, _ in blocks])["input_ids"]]))}
    print(f"device: {device_info(args.device)}")
    print(f"model {args.model} ({next(model.parameters()).dtype}); {len(questions)} questions of {len(groups)} users, "
          f"{n} candidates; features {args.features or 'none'}; batch {args.batch}")
    llm_question_scores(model, tok, q0["example"], [titles[c] for c in q0["candidates"][:args.batch]], args.batch)
    secs = {"question": 0.0, "blocks": 0.0}
    for g in groups:  # interleaved by user
        sync()
        t = time.perf_counter()
        for i in g["questions"]:
            q = questions[i]
            llm_question_scores(model, tok, q["example"], [titles[c] for c in q["candidates"]], args.batch)
        sync()
        secs["question"] += time.perf_counter() - t
        t = time.perf_counter()
        block_candidate_scores(model, tok, g["record"], [texts[m] for m in g["movies"]], args.batch)
        sync()
        secs["blocks"] += time.perf_counter() - t
    res = {"model": args.model, "device": device_info(args.device), "versions": versions(), "users": len(groups),
           "questions": len(questions), "candidates": n, "features": args.features, "batch": args.batch,
           "dtype": str(next(model.parameters()).dtype), "suffix_tokens": tokens,
           "block_candidates_scored": sum(len(g["movies"]) for g in groups),
           **{f"{k}_s": v for k, v in secs.items()}, **{f"{k}_cand_per_s": n / v for k, v in secs.items()},
           "speedup": secs["question"] / secs["blocks"]}
    print()
    print_table([{"mode": "per question (single format)", "s": secs["question"], "cps": res["question_cand_per_s"],
                  "tok": tokens["question"], "r": 1.0},
                 {"mode": "per user (candidate blocks)", "s": secs["blocks"], "cps": res["blocks_cand_per_s"],
                  "tok": tokens["blocks"], "r": res["speedup"]}],
                [("mode", "mode", ""), ("s", "seconds", ".1f"), ("cps", "candidates/s", ",.1f"),
                 ("tok", "suffix tokens", ".1f"), ("r", "vs per question", ".2f")])
    print(f"\nRATIO rank blocks/per-question = {res['speedup']:.2f}x [{n} candidates, {len(groups)} users]")
    write_json(args.json_out, res)
    return res


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--model", default=SMOLLM2_GGUF, help="model path / hub id / .gguf, or <shape>-random")
    p.add_argument("--data", default=None, help="test-format JSONL (default: data/movielens_qwen3/test_raw.jsonl)")
    p.add_argument("--questions", type=int, default=2)
    p.add_argument("--candidates", type=int, default=100, help="candidates per question (1 positive + N)")
    p.add_argument("--batch", type=int, default=25, help="prompts / candidate suffixes per forward pass")
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--threads", type=int, default=1, help="CPU threads for torch (1 on a busy shared CPU)")
    p.add_argument("--users", type=int, default=0, help="rank_eval's two LLM paths on the first U test users")
    p.add_argument("--features", nargs="*", default=["item_stats", "user_stats", "genres"],
                   help="--users: prompt features of the blocks folder (none: --features with no names)")
    p.add_argument("--quick", action="store_true", help="tiny random Qwen3, 2 x 12 candidates: seconds")
    p.add_argument("--json-out", default=None)
    return p.parse_args(argv)


def main(argv=None) -> dict:
    """Run with command-line ``argv`` (a list, or None for sys.argv) or an already parsed Namespace."""
    return bench_main(run, parse_args, argv)


if __name__ == "__main__":
    main()
