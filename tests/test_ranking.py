"""Ranking evaluation: candidate sampling, tie-aware metrics, and shared-prefix scoring equal to full prompts."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import SMOLLM2_GGUF
from recsft import ranking as R


def test_rank_metrics_exact_and_ties():
    m = R.rank_metrics(0.9, np.array([0.1, 0.2, 0.95]))  # rank 2
    assert m["hr@1"] == 0 and m["hr@5"] == 1 and m["mrr"] == 0.5
    assert m["ndcg@10"] == pytest.approx(1 / np.log2(3))
    const = R.rank_metrics(1.0, np.ones(99))  # a constant scorer: expected chance, not a perfect rank
    assert const["hr@10"] == pytest.approx(0.10) and const["hr@1"] == pytest.approx(0.01)
    assert const["rank"] == pytest.approx(50.5)


def test_build_questions_negatives_unrated_and_deterministic(caplog):
    test = [{"user_id": 1, "candidate_movie_id": 10, "label": "Yes", "candidate_timestamp": 5},
            {"user_id": 1, "candidate_movie_id": 11, "label": "No", "candidate_timestamp": 6},
            {"user_id": 2, "candidate_movie_id": 12, "label": "No", "candidate_timestamp": 7},
            {"user_id": 3, "candidate_movie_id": 13, "label": "Yes", "candidate_timestamp": 8}]
    rated = {1: {10, 11, 1, 2}, 2: {12}, 3: {13, *range(1, 9)}}
    items = np.arange(1, 30)
    q, counts = R.build_questions(test, rated, items, n_negatives=5, seed=3)
    assert [x["user_id"] for x in q] == [1, 3] and counts["users_skipped_no_positive"] == 1
    for x in q:
        assert x["candidates"][0] == x["example"]["candidate_movie_id"] and len(set(x["candidates"])) == 6
        assert not set(x["candidates"][1:]) & rated[x["user_id"]]
    again, _ = R.build_questions(test, rated, items, n_negatives=5, seed=3, max_users=1)
    assert again[0]["candidates"] == q[0]["candidates"]  # --max-users keeps the first users' candidates
    pop, _ = R.build_questions(test, rated, items, 5, seed=3, sampling="popularity", popularity={20: 10**6})
    assert all(20 in x["candidates"] for x in pop)
    short, counts = R.build_questions(test, rated, items, n_negatives=25, seed=3)
    assert counts["questions_with_short_pool"] == 1 and len(short[1]["candidates"]) == 1 + 29 - 9  # user 3: 20 left
    assert "fewer than 25 unrated movies" in caplog.text
    with pytest.raises(ValueError, match="--sampling"):
        R.build_questions(test, rated, items, sampling="top")


def _examples(n=40):
    from recsft.io import load_data

    from conftest import ROOT

    path = ROOT / "data/movielens_qwen3/test_raw.jsonl"
    if path.is_file():
        return load_data(path)
    from recsft import movielens

    ratings, titles = movielens.load_bundled()
    ratings = movielens.clean_ratings(ratings, titles, "bundled")
    return movielens.build_examples(ratings[ratings.user_id <= 60], titles)["test"]


def _check_token_split(tok, examples):
    titles = sorted({e["candidate_title"] for e in examples})
    for e in examples[:2]:
        prefix, suffixes = R.question_texts(e, titles, tok)
        p_ids = tok(prefix, add_special_tokens=False)["input_ids"]
        for t, s in zip(titles, suffixes):
            full = R.question_texts(e, [t], tok)
            whole = tok(full[0] + full[1][0], add_special_tokens=False)["input_ids"]
            assert p_ids + tok(s, add_special_tokens=False)["input_ids"] == whole, t


def test_prefix_suffix_tokens_equal_whole_prompt_qwen3(qwen3_tokenizer):
    # every test candidate title, in the prompts of real test examples
    _check_token_split(qwen3_tokenizer, _examples())


@pytest.mark.slow  # loads (and once converts) the SmolLM2 GGUF to get its tokenizer
def test_prefix_suffix_tokens_equal_whole_prompt_smollm2():
    from recsft.modeling import load_tokenizer

    _check_token_split(load_tokenizer(SMOLLM2_GGUF), _examples())


def test_shared_prefix_equals_full_prompt_scoring(tiny_qwen3):
    import torch

    from recsft.inference import score
    from recsft.modeling import load_model, load_tokenizer

    tok = load_tokenizer(tiny_qwen3, padding_side="left")
    model = load_model(tiny_qwen3, "cpu", "float32", "sdpa").eval()
    example = _examples()[0]
    titles = [example["candidate_title"], "Fargo (1996)", "Star Wars (1977)", "12 Angry Men (1957)",
              '"Great Day in Harlem, A" (1994)', "M*A*S*H (1970)", "Heat (1995)"]
    margin, cut = R.llm_question_scores(model, tok, example, titles, batch_size=3)
    prefix, suffixes = R.question_texts(example, titles, tok)
    full = score(model, tok, [prefix + s for s in suffixes], batch_size=4, progress=False)
    assert not cut
    np.testing.assert_allclose(R.p_yes(margin), [r["p_yes"] for r in full], atol=1e-4)
    np.testing.assert_allclose(margin, [r["logit_yes"] - r["logit_no"] for r in full], atol=1e-4)
    assert torch.get_default_dtype() == torch.float32


def test_prefix_cut_keeps_budget(tiny_qwen3):
    from recsft.modeling import load_model, load_tokenizer

    tok = load_tokenizer(tiny_qwen3, padding_side="left")
    model = load_model(tiny_qwen3, "cpu", "float32", "sdpa").eval()
    example = _examples()[0]
    titles = [example["candidate_title"], "Fargo (1996)"]
    margin, cut = R.llm_question_scores(model, tok, example, titles, max_prompt_tokens=128)
    assert cut and margin.shape == (2,) and np.isfinite(margin).all()
