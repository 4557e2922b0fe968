"""scripts/rank_eval.py and the library baselines on real MovieLens users: same questions for every model."""

from __future__ import annotations

import json

import numpy as np
import pytest

import prepare_data
import rank_eval
from conftest import tiny_config, write_config_yaml
from recsft import baselines as B
from recsft import movielens
from recsft.metrics import compute_metrics, uauc


@pytest.fixture(scope="module")
def small_data(tmp_path_factory):
    out = tmp_path_factory.mktemp("rank_data")
    prepare_data.main(prepare_data.parse_args(["--out-dir", str(out), "--max-users", "40"]))
    return out


def test_uauc_is_the_mean_of_per_user_aucs():
    y = [1, 0, 1, 0, 1, 1]
    s = [0.9, 0.1, 0.2, 0.8, 0.5, 0.6]
    users = ["a", "a", "b", "b", "c", "c"]  # a: AUC 1, b: AUC 0, c: one class only (left out)
    assert uauc(y, s, users) == 0.5
    m = compute_metrics(["Yes" if v else "No" for v in y], ["Yes"] * 6, s, user_ids=users)
    assert m["uauc"] == 0.5 and "uauc" not in compute_metrics(["Yes"], ["Yes"], [0.3])


def test_rank_eval_baselines_same_questions(small_data, tmp_path):
    args = rank_eval.parse_args(["--data_dir", str(small_data), "--output_dir", str(tmp_path),
                                 "--models", "item-rate,user-rate,mostpop,biases", "--n-negatives", "20"])
    res = rank_eval.main(args)
    assert set(res["results"]) == {B.LABELS[n] for n in ("item-rate", "mostpop", "biases")}  # user-rate: chance
    pop = res["results"][B.LABELS["mostpop"]]
    assert pop["sampled"]["hr@10"] > 10 / 21  # popularity beats chance among unrated movies (real data)
    assert pop["full"]["hr@10"] <= pop["sampled"]["hr@10"]  # ranking among all unrated movies is harder
    data = movielens.load_prepared(small_data)
    rated = B.rated_sets(data.ratings)
    saved = [json.loads(line) for line in (tmp_path / "questions.jsonl").read_text().splitlines()]
    assert len(saved) == res["counts"]["questions"] == sum(e["label"] == "Yes" for e in data.splits["test"])
    assert all(len(q["candidates"]) == 21 and not set(q["candidates"][1:]) & rated[q["user_id"]] for q in saved)
    assert json.loads((tmp_path / "rank_metrics.json").read_text())["protocol"]["n_negatives"] == 20
    table = (tmp_path / "rank_table.md").read_text()
    assert table.startswith("| model | HR@1") and "| MostPop (Cornac) | " in table
    again = rank_eval.main(rank_eval.parse_args([*_argv(args), "--max-users", "5", "--no-full-ranking"]))
    assert again["counts"]["users"] <= 5 and "full" not in again["results"][B.LABELS["mostpop"]]


def _argv(args):
    return ["--data_dir", args.data_dir, "--output_dir", args.output_dir, "--models", args.models,
            "--n-negatives", str(args.n_negatives)]


@pytest.mark.parametrize("flags,message", [(["--n-negatives", "0"], "--n-negatives"),
                                           (["--models", "svd"], "--models: unknown"),
                                           (["--max-users", "0"], "--max-users"),
                                           (["--models", "bpr", "--hybrid", "bpr"], "--hybrid blends"),
                                           (["--models", "mostpop", "--hybrid", "bpr", "--llm"], "--hybrid 'bpr'")])
def test_rank_eval_bad_arguments(small_data, tmp_path, flags, message):
    with pytest.raises(ValueError, match=message):
        rank_eval.main(rank_eval.parse_args(["--data_dir", str(small_data), "--output_dir", str(tmp_path / "o"),
                                             *flags]))
    assert not (tmp_path / "o").exists()


def test_rank_eval_refuses_a_soft_token_adapter_on_single_format_data(small_data, tmp_path, tiny_qwen3):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from recsft.cf import TOKENS_FILE
    from recsft.io import DataError

    adapter = tmp_path / "adapter"
    lora = LoraConfig(r=2, target_modules=["q_proj"], task_type="CAUSAL_LM")
    get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_qwen3), lora).save_pretrained(adapter)
    (adapter / TOKENS_FILE).write_bytes(b"")  # only its presence matters: checked before the model loads
    with pytest.raises(DataError, match="trained with soft CF tokens"):
        rank_eval.main(rank_eval.parse_args(["--data_dir", str(small_data), "--output_dir", str(tmp_path / "o"),
                                             "--adapter_dir", str(adapter), "--models", "mostpop",
                                             f"model_name_or_path={tiny_qwen3}"]))


def test_rank_blend_weights_follow_the_informative_score():
    """The blend is fit by the positive's softmax likelihood within each question: a score that puts the positive
    first gets the larger weight, and a per-question offset of either score (a user bias) changes nothing."""
    from recsft.ranking import fit_rank_blend

    rng = np.random.default_rng(0)
    questions = []
    for _ in range(60):
        good = rng.normal(size=21)
        good[0] += 2.0  # the positive (row 0) is ahead on the informative score
        noise = rng.normal(size=21) * 3
        questions.append(np.column_stack([noise, good]))
    w = fit_rank_blend(questions)
    assert w[1] > 0 and abs(w[0]) < 0.3 * w[1]
    shifted = fit_rank_blend([q + rng.normal(size=2) * 50 for q in questions])
    assert np.allclose(shifted, w, rtol=0.05, atol=0.02)
    with pytest.raises(ValueError, match="no question"):
        fit_rank_blend([])


def test_sasrec_scores_follow_history(small_data):
    data = movielens.load_prepared(small_data)
    train = movielens.train_ratings(data.ratings, data.splits)
    scorer = B.fit_scorers(["sasrec"], train, data.ratings, 4.0, epochs=1, progress=False)["sasrec"]
    test = data.splits["test"][:20]
    scores = B.pointwise_scores(scorer, test)
    items = np.array(sorted(data.ratings.movie_id.unique()))
    assert np.isfinite(scores).all() and scorer(test[0], items).shape == items.shape
    assert scorer(test[0], np.array([test[0]["candidate_movie_id"]]))[0] == pytest.approx(scores[0])


def test_margin_journal_resumes_only_the_same_run(tmp_path):
    from recsft.io import DataError
    from recsft.ranking import MarginJournal, unit_key

    path, header = tmp_path / "llm_margins.jsonl", {"model": "m", "cutoff_len": 1024}
    a, b = unit_key(1, "history of 1", [5, 6]), unit_key(2, "history of 2", [7])
    assert unit_key(1, "history of 1", [5, 7]) != a  # other candidates: another unit
    journal = MarginJournal(path, header)
    journal.add(a, np.array([1.5, -2.0]), cut=False)
    journal.add(b, np.array([0.25]), cut=True)
    with path.open("a") as f:
        f.write('{"unit": "c", "cut": false, "margins": [0.1')  # a stop in the middle of a line
    again = MarginJournal(path, header, resume=True)
    assert sorted(again.done) == sorted([a, b]) and again.done[a][0].tolist() == [1.5, -2.0] and again.done[b][1]
    assert path.read_text().count("\n") == 3  # header + two whole units: the cut line is gone
    with pytest.raises(DataError, match="another cutoff_len"):
        MarginJournal(path, {**header, "cutoff_len": 512}, resume=True)
    assert not MarginJournal(path, header).done  # without --resume: a fresh start


def test_rank_eval_reference_and_resume_flags_checked_first():
    from recsft.io import DataError

    for argv, match in ((["--models", "mf", "--reference", "bpr"], "--reference 'bpr'"),
                        (["--models", "bpr", "--reference", "user-rate"], "--reference"),
                        (["--resume"], "--resume continues an LLM"),
                        (["--resamples", "5"], "--resamples")):
        with pytest.raises(DataError, match=match):
            rank_eval.check_args(rank_eval.parse_args(argv))


@pytest.mark.slow  # loads an LLM
def test_rank_eval_llm_row_resumes_and_compares(small_data, tmp_path, tiny_qwen3, monkeypatch):
    import utils

    cfg = write_config_yaml(tiny_config(tmp_path, tiny_qwen3), tmp_path / "c.yaml")
    argv = ["--data_dir", str(small_data), "--output_dir", str(tmp_path / "o"), "--models", "mostpop", "--llm",
            "--config", str(cfg), "--max-users", "3", "--n-negatives", "9", "--no-full-ranking",
            "--reference", "mostpop", "--resamples", "100"]
    first = rank_eval.main(rank_eval.parse_args(argv))
    label = next(k for k in first["results"] if k.endswith("zero-shot"))
    delta = first["results"][label]["vs_reference"]["ndcg@10"]
    assert delta["delta_low"] <= delta["delta"] <= delta["delta_high"]
    assert "ΔNDCG@10 vs" in (tmp_path / "o" / "rank_table.md").read_text()
    lines = (tmp_path / "o" / "question_metrics.jsonl").read_text().splitlines()
    assert len(lines) == first["counts"]["questions"] and label in json.loads(lines[0])["rows"]
    monkeypatch.setattr(utils, "llm_question_scores", lambda *a, **k: pytest.fail("scored a question again"),
                        raising=False)
    again = rank_eval.main(rank_eval.parse_args([*argv, "--resume"]))  # every question is in the journal
    assert again["results"][label]["sampled"] == first["results"][label]["sampled"]
    fewer = rank_eval.main(rank_eval.parse_args([*argv, "--resume", "--max-users", "2"]))  # a subset: reused too
    assert 0 < fewer["counts"]["questions"] <= first["counts"]["questions"]


@pytest.mark.slow  # loads an LLM
def test_rank_eval_llm_row(small_data, tmp_path, tiny_qwen3):
    cfg = write_config_yaml(tiny_config(tmp_path, tiny_qwen3), tmp_path / "c.yaml")
    res = rank_eval.main(rank_eval.parse_args(["--data_dir", str(small_data), "--output_dir", str(tmp_path / "o"),
                                               "--models", "none", "--llm", "--config", str(cfg), "--max-users", "3",
                                               "--n-negatives", "9"]))
    (label, m), = res["results"].items()
    assert label.endswith("zero-shot") and m["sampled"]["n"] == res["counts"]["questions"] > 0
    assert f"| {label} |" in (tmp_path / "o" / "rank_table.md").read_text()
    from recsft.io import DataError

    with pytest.raises(DataError, match="adapter_dir"):
        rank_eval.main(rank_eval.parse_args(["--data_dir", str(small_data), "--models", "none", "--config", str(cfg),
                                             "--adapter", str(tmp_path / "missing")]))
