"""Ranking with candidate blocks (a user's candidates scored after one shared prefix) and sampled negatives."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import tiny_config  # noqa: F401  (fixtures of conftest)
from recsft import movielens
from recsft.formatting import block_question, render_records
from recsft.inference import score
from recsft.io import DataError
from recsft.ranking import block_candidate_scores, block_groups, build_questions

ROOT = Path(__file__).resolve().parents[1]
FEATURES = ["item_stats", "user_stats", "genres"]


@pytest.fixture(scope="module")
def ml():
    ratings, titles = movielens.load_ratings("bundled")
    return ratings[ratings.user_id <= 40].reset_index(drop=True), titles, movielens.load_genres("bundled")


@pytest.fixture(scope="module")
def static(ml):
    ratings, titles, genres = ml
    return movielens.build_blocks(ratings, titles, 15, features=FEATURES, genres=genres, history_from="train")


def _train(ratings, titles):
    return movielens.train_ratings(ratings, movielens.build_examples(ratings, titles, 15))


# --------------------------------------------------------------------------------- candidate texts
def test_rebuilt_candidate_texts_equal_every_eval_and_test_block(ml, static):
    ratings, titles, genres = ml
    texts = movielens.static_candidate_texts(_train(ratings, titles), titles, sorted(titles), FEATURES, 4.0, genres)
    seen = [(b["candidate_movie_id"], b["text"]) for s in ("eval", "test") for r in static[s] for b in r["blocks"]]
    assert len(seen) > 300 and all(texts[m] == t for m, t in seen)
    # a movie nobody in these users rated still gets a text: no earlier ratings
    unrated = sorted(set(titles) - set(ratings.movie_id))[0]
    assert "no earlier ratings" in texts[unrated]


def test_a_users_test_records_share_one_static_prefix(static):
    by_user: dict = {}
    for r in static["test"]:
        by_user.setdefault(r["user_id"], set()).add(r["prefix"])
    assert all(len(p) == 1 for p in by_user.values())


def _questions(ml, static, n_negatives=20):
    ratings, titles, genres = ml
    single = movielens.build_examples(ratings, titles, 15)
    rated = ratings.groupby("user_id").movie_id.agg(set).to_dict()
    questions, _ = build_questions(single["test"], rated, sorted(ratings.movie_id.unique()), n_negatives, seed=0)
    texts = movielens.static_candidate_texts(_train(ratings, titles), titles, sorted(titles), FEATURES, 4.0, genres)
    return questions, texts


def test_block_groups_share_one_prefix_per_user_and_check_the_positive(ml, static):
    questions, texts = _questions(ml, static)
    groups = block_groups(questions, static["test"], texts, "blocks_test.jsonl")
    assert len(groups) == len({q["user_id"] for q in questions})
    assert sorted(i for g in groups for i in g["questions"]) == list(range(len(questions)))
    for g in groups:
        want = {m for i in g["questions"] for m in questions[i]["candidates"]}
        assert set(g["movies"]) == want and len(g["movies"]) == len(want)
    bad = dict(texts)
    bad[questions[0]["candidates"][0]] += "\nGenres: other"
    with pytest.raises(DataError, match=r"blocks_test.jsonl: the block of \(user"):
        block_groups(questions, static["test"], bad, "blocks_test.jsonl")
    with pytest.raises(DataError, match="no candidate block"):
        block_groups(questions, [r for r in static["test"] if r["user_id"] != questions[0]["user_id"]], texts,
                     "blocks_test.jsonl")


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_block_ranking_scores_equal_single_prompts(ml, static, tiny_qwen3, qwen3_tokenizer, attn):
    """P(Yes) of a candidate ranked as a block = P(Yes) of prefix + candidate asked as one ordinary question."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_qwen3, dtype=torch.float32, attn_implementation=attn).eval()
    questions, texts = _questions(ml, static, n_negatives=6)
    g = block_groups(questions, static["test"], texts, "t")[0]
    movies = g["movies"][:9]
    margin, cut = block_candidate_scores(model, qwen3_tokenizer, g["record"], [texts[m] for m in movies],
                                         batch_size=4)
    rec = {**g["record"], "blocks": [{"text": texts[m], "answer": "Yes"} for m in movies]}
    prompts, _ = render_records([block_question(rec, j) for j in range(len(movies))], qwen3_tokenizer)
    ref = score(model, qwen3_tokenizer, prompts, batch_size=4, progress=False)
    p = 1 / (1 + np.exp(-np.asarray(margin)))
    assert not cut and np.abs(p - np.array([r["p_yes"] for r in ref])).max() < 1e-4


# ------------------------------------------------------------------------------------ sampled negatives
def test_negatives_are_unrated_no_answers_in_training_records_only(ml):
    ratings, titles, genres = ml
    kw = dict(features=FEATURES, genres=genres, history_from="train")
    plain = movielens.build_blocks(ratings, titles, 15, **kw)
    neg = movielens.build_blocks(ratings, titles, 15, negatives=5, **kw)
    rated = ratings.groupby("user_id").movie_id.agg(set).to_dict()
    for split in ("eval", "test"):
        assert neg[split] == plain[split]
    assert len(neg["train"]) == len(plain["train"])
    for a, b in zip(plain["train"], neg["train"]):
        assert b["blocks"][:len(a["blocks"])] == a["blocks"] and b["prefix"] == a["prefix"]
        extra = b["blocks"][len(a["blocks"]):]
        assert len(extra) == 5 and all(x["sampled"] and x["answer"] == "No" for x in extra)
        movies = [x["candidate_movie_id"] for x in extra]
        assert len(set(movies)) == 5 and not set(movies) & rated[b["user_id"]]
    again = movielens.build_blocks(ratings, titles, 15, negatives=5, **kw)
    assert again["train"] == neg["train"]  # seeded


def test_negative_feature_lines_count_ratings_before_the_record(ml):
    ratings, titles, genres = ml
    neg = movielens.build_blocks(ratings, titles, 15, features=["item_stats"], genres=genres, negatives=3,
                                 history_from="all")
    rec = neg["train"][0]
    t0 = rec["blocks"][0]["candidate_timestamp"]
    for x in rec["blocks"][-3:]:
        before = ratings[(ratings.movie_id == x["candidate_movie_id"]) & (ratings.timestamp < t0)]
        n = len(before)
        want = "no earlier ratings" if n == 0 else f"{(before.rating >= 4).sum() / n:.0%} liked of {n} earlier"
        assert want in x["text"]


def test_popularity_negatives_prefer_popular_movies(ml):
    ratings, titles, _ = ml
    counts = ratings.movie_id.value_counts()
    mean_pop = {}
    for sampling in ("uniform", "popularity"):
        out = movielens.build_blocks(ratings, titles, 15, negatives=10, negative_sampling=sampling)
        movies = [x["candidate_movie_id"] for r in out["train"] for x in r["blocks"] if x.get("sampled")]
        mean_pop[sampling] = counts.reindex(movies, fill_value=0).mean()
    assert mean_pop["popularity"] > 1.3 * mean_pop["uniform"]


@pytest.mark.slow  # subprocesses
@pytest.mark.parametrize("flags, message", [
    (["--negatives", "4"], "--negatives adds sampled candidates to training blocks; add --format blocks"),
    (["--format", "blocks", "--negatives", "-1"], "--negatives"),
    (["--format", "blocks", "--negatives", "2", "--negative-sampling", "often"], "--negative-sampling"),
])
def test_bad_negative_flags_exit_2(tmp_path, flags, message):
    p = subprocess.run([sys.executable, "scripts/prepare_data.py", "--max-users", "5", "--out-dir",
                        str(tmp_path / "d"), *flags], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and message in p.stderr and "Traceback" not in p.stderr
    assert not (tmp_path / "d").exists()


@pytest.mark.slow  # subprocesses
def test_prepared_negatives_are_counted_and_genres_kept(tmp_path):
    out = tmp_path / "d"
    p = subprocess.run([sys.executable, "scripts/prepare_data.py", "--format", "blocks", "--history-from", "train",
                        "--features", "genres", "--negatives", "3", "--max-users", "8", "--out-dir", str(out)],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    stats = json.loads((out / "blocks_stats.json").read_text())
    train = json.loads((out / "blocks_train.json").read_text())
    assert stats["params"]["negatives"] == 3 and stats["splits"]["train"]["sampled_negatives"] == 3 * len(train)
    assert "sampled No" in p.stdout
    prepared = movielens.load_prepared(out)
    assert prepared.genres and prepared.genres[1] == ["Animation", "Children's", "Comedy"]


# ------------------------------------------------------------------------------------------- rank_eval
def _rank(tmp_path, data, *extra):
    return subprocess.run([sys.executable, "scripts/rank_eval.py", "--data_dir", str(data), "--output_dir",
                           str(tmp_path / "rank"), "--models", "biases", "--no-full-ranking", *extra],
                          cwd=ROOT, capture_output=True, text=True, timeout=900)


@pytest.mark.slow  # subprocesses
def test_rank_eval_refuses_online_blocks_before_fitting(tmp_path, tiny_qwen3):
    data = tmp_path / "online"
    subprocess.run([sys.executable, "scripts/prepare_data.py", "--format", "blocks", "--max-users", "8",
                    "--out-dir", str(data)], cwd=ROOT, check=True, capture_output=True, timeout=300)
    p = _rank(tmp_path, data, "--llm", "--config", "configs/smollm2_movielens_blocks.yaml",
              f"model_name_or_path={tiny_qwen3}")
    assert p.returncode == 2 and "--history-from train" in p.stderr and "Traceback" not in p.stderr
    assert not (tmp_path / "rank").exists()


@pytest.mark.slow
def test_rank_eval_ranks_blocks_with_one_prefix_per_user(tmp_path, tiny_qwen3):
    data = tmp_path / "static"
    subprocess.run([sys.executable, "scripts/prepare_data.py", "--format", "blocks", "--history-from", "train",
                    "--features", "item_stats", "user_stats", "genres", "--max-users", "6", "--out-dir", str(data)],
                   cwd=ROOT, check=True, capture_output=True, timeout=300)
    p = _rank(tmp_path, data, "--llm", "--config", "configs/smollm2_movielens_blocks.yaml", "--n-negatives", "9",
              f"model_name_or_path={tiny_qwen3}", "dtype=float32")
    assert p.returncode == 0, p.stderr[-3000:]
    out = json.loads((tmp_path / "rank" / "rank_metrics.json").read_text())
    assert "candidate block" in out["protocol"]["llm"]
    row = next(v["sampled"] for k, v in out["results"].items() if "zero-shot" in k)
    assert row["n"] == out["counts"]["questions"] > 0 and 0 <= row["hr@10"] <= 1


@pytest.mark.slow
def test_rank_eval_hybrid_fits_a_blend_on_eval_questions_and_resumes(tmp_path, tiny_qwen3):
    """--hybrid: eval questions of --fit-users users are scored by the LLM too (journaled beside the test units),
    the blend row is ranked on the test questions, and --resume scores nothing again."""
    data = tmp_path / "static"
    subprocess.run([sys.executable, "scripts/prepare_data.py", "--format", "blocks", "--history-from", "train",
                    "--max-users", "6", "--out-dir", str(data)], cwd=ROOT, check=True, capture_output=True, timeout=300)
    flags = ["--llm", "--config", "configs/smollm2_movielens_blocks.yaml", "--n-negatives", "9", "--hybrid", "biases",
             "--fit-users", "3", "--reference", "biases", "--resamples", "100", f"model_name_or_path={tiny_qwen3}",
             "dtype=float32"]
    p = _rank(tmp_path, data, *flags)
    assert p.returncode == 0, p.stderr[-3000:]
    out = json.loads((tmp_path / "rank" / "rank_metrics.json").read_text())
    label = next(k for k in out["results"] if k.endswith("(weights fit on eval questions)"))
    blend = out["results"][label]["blend"]
    assert 0 < blend["fit_users"] <= 3 and blend["fit_questions"] >= blend["fit_users"]
    assert out["results"][label]["sampled"]["n"] == out["counts"]["questions"]
    assert "vs_reference" in out["results"][label] and out["protocol"]["hybrid"].startswith("w1 * biases score")
    lines = (tmp_path / "rank" / "llm_margins.jsonl").read_text().splitlines()
    assert len(lines) - 1 == out["counts"]["users"] + blend["fit_users"]  # one unit per user and split
    again = _rank(tmp_path, data, *flags, "--resume")
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"--resume: {len(lines) - 1} units already scored" in again.stderr
    assert (tmp_path / "rank" / "llm_margins.jsonl").read_text().splitlines() == lines  # nothing scored again
    assert json.loads((tmp_path / "rank" / "rank_metrics.json").read_text())["results"][label] == out["results"][label]
