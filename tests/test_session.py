"""Session format (multi-turn runs of candidates), collaborative features and the yes_no loss."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import prepare_data
from conftest import tiny_config, yes_no_reference
from recsft import movielens
from recsft.io import DataError
from recsft.preprocess import IGNORE_INDEX, tokenize_any, tokenize_func
from recsft.preprocess import answer_positions

ROOT = Path(__file__).resolve().parents[1]
H, K = 15, 16


@pytest.fixture(scope="module")
def data():
    ratings, titles = movielens.load_ratings("bundled")
    ratings = ratings[ratings.user_id <= 30]
    genres = movielens.load_genres("bundled")
    single = movielens.build_examples(ratings, titles, H, features=["item_stats", "user_stats", "genres"],
                                      genres=genres)
    sessions = movielens.build_sessions(ratings, titles, H, session_len=K,
                                        features=["item_stats", "user_stats", "genres"], genres=genres)
    return ratings, titles, single, sessions


def _timelines(ratings):
    out = {}
    for row in ratings.sort_values(["timestamp", "movie_id"], kind="stable").itertuples():
        out.setdefault(row.user_id, []).append((row.timestamp, row.movie_id, row.rating))
    return out


def test_session_candidates_and_labels_equal_the_single_splits(data):
    _, _, single, sessions = data
    for split in ("train", "eval", "test"):
        a = sorted((e["user_id"], e["candidate_movie_id"], e["label"]) for e in single[split])
        b = sorted((r["user_id"], t["candidate_movie_id"], t["answer"]) for r in sessions[split] for t in r["turns"])
        assert a == b, split
        assert all(r["split"] == split for r in sessions[split])
        assert all(1 <= len(r["turns"]) <= K for r in sessions[split])


def test_an_answer_sees_only_earlier_ratings_and_never_another_split(data):
    ratings, titles, single, sessions = data
    timelines = _timelines(ratings)
    split_of = {(e["user_id"], e["candidate_movie_id"]): s for s, ex in single.items() for e in ex}
    for split, records in sessions.items():
        for r in records:
            line = timelines[r["user_id"]]
            pos = [[m for _, m, _ in line].index(t["candidate_movie_id"]) for t in r["turns"]]
            assert pos == list(range(pos[0], pos[0] + len(pos)))  # consecutive candidates, in time order
            assert {split_of[(r["user_id"], t["candidate_movie_id"])] for t in r["turns"]} == {split}
            first = r["turns"][0]["start"]
            for _, m, stars in line[pos[0] - H:pos[0]]:  # the opening history: the 15 ratings just before
                assert f"{titles[m]} (rating ≈ {stars:.1f})" in first
            for i, t in enumerate(r["turns"][1:], 1):  # each later turn reveals exactly the previous rating
                ts, _, stars = line[pos[i - 1]]
                assert t["next"].startswith(f"Rated {stars:.1f}. Next candidate: {t['candidate_title']}")
                assert (ts, line[pos[i - 1]][1]) < (line[pos[i]][0], line[pos[i]][1])
            later = {titles[m] for _, m, _ in line[pos[-1] + 1:]} - {titles[m] for _, m, _ in line[:pos[-1] + 1]}
            text = first + "".join(t["next"] or "" for t in r["turns"])
            assert not any(f"{title} (rating" in text for title in later)


def test_features_use_only_strictly_earlier_ratings(data):
    ratings, _, single, _ = data
    full, _ = movielens.load_ratings("bundled")  # stats come from every user's ratings, here users <= 30
    sub = full[full.user_id <= 30]
    liked = sub.rating >= 4.0
    examples = [e for ex in single.values() for e in ex]
    for e in examples[::97]:
        before = sub.timestamp < e["candidate_timestamp"]
        item = before & (sub.movie_id == e["candidate_movie_id"])
        user = before & (sub.user_id == e["user_id"])
        lines = e["candidate_features"]
        assert lines[0].startswith("Genres: ")
        for line, mask in ((lines[1], item), (lines[2], user)):
            n, k = int(mask.sum()), int((mask & liked).sum())
            assert line.endswith("no earlier ratings" if n == 0 else f"{k / n:.0%} liked of {n} earlier ratings")


def test_earlier_counts_on_ties_and_unsorted_rows():
    keys = np.array([3, 1, 3, 3, 1, 3])
    ts = np.array([5, 2, 5, 1, 9, 7])
    liked = np.array([1, 1, 0, 1, 0, 1], dtype=bool)
    n, k = movielens.earlier_counts(keys, ts, liked)
    ref_n = [sum(keys[j] == keys[i] and ts[j] < ts[i] for j in range(6)) for i in range(6)]
    ref_k = [sum(keys[j] == keys[i] and ts[j] < ts[i] and liked[j] for j in range(6)) for i in range(6)]
    assert n.tolist() == ref_n and k.tolist() == ref_k


def test_unknown_features_and_bad_session_len_fail_before_any_work(tmp_path, monkeypatch):
    monkeypatch.setattr(movielens, "load_ratings", lambda *a: pytest.fail("loaded data before checking flags"))
    for argv, match in ((["--features", "item_stats,colour"], "--features: unknown feature"),
                        (["--format", "session", "--session-len", "0"], "--session-len must be >= 1")):
        with pytest.raises(DataError, match=match):
            prepare_data.main(prepare_data.parse_args(["--out-dir", str(tmp_path)] + argv))
    assert not any(tmp_path.iterdir())


def test_single_format_without_flags_is_unchanged(data):
    ratings, titles, _, _ = data
    plain = movielens.build_examples(ratings, titles, H)
    assert all("candidate_features" not in e for ex in plain.values() for e in ex)
    record = movielens.to_train_record(plain["test"][0])
    assert "Genres" not in record["input"] and record["input"].endswith("Answer Yes or No.")


# ------------------------------------------------------------------------------------------ tokenize
def _answers(labels: list[int]) -> list[list[int]]:
    runs, cur = [], []
    for x in labels + [IGNORE_INDEX]:
        if x != IGNORE_INDEX:
            cur.append(x)
        elif cur:
            runs.append(cur)
            cur = []
    return runs


def test_first_turn_tokenizes_exactly_like_the_single_format(data, qwen3_tokenizer):
    _, _, single, sessions = data
    by_key = {(e["user_id"], e["candidate_movie_id"]): e for e in single["train"]}
    rec = sessions["train"][0]
    one = dict(rec, turns=rec["turns"][:1])
    got = tokenize_any([one], qwen3_tokenizer, 1024).to_pydict()
    ref = tokenize_func(movielens.to_train_record(by_key[(rec["user_id"], rec["turns"][0]["candidate_movie_id"])]),
                        qwen3_tokenizer, 1024)
    assert got["input_ids"][0] == ref["input_ids"] and got["labels"][0] == ref["labels"]


@pytest.mark.parametrize("cutoff", [2048, 1024, 600, 300])
def test_every_answer_is_trained_once_and_never_truncated(data, qwen3_tokenizer, cutoff):
    _, _, _, sessions = data
    records = sessions["train"][:12]
    table = tokenize_any(records, qwen3_tokenizer, cutoff).to_pydict()
    yes, no = (qwen3_tokenizer(w, add_special_tokens=False)["input_ids"][0] for w in ("Yes", "No"))
    end = qwen3_tokenizer("<|im_end|>\n", add_special_tokens=False)["input_ids"]
    got = []
    for ids, labels in zip(table["input_ids"], table["labels"]):
        assert len(ids) == len(labels) <= cutoff
        runs = _answers(labels)
        assert all(run[1:] == end and run[0] in (yes, no) for run in runs)  # whole answers only
        got += ["Yes" if run[0] == yes else "No" for run in runs]
        keep, starts = answer_positions(torch.tensor([labels]))
        assert int(starts.sum()) == len(runs)  # the label-position head finds every answer
    assert got == [t["answer"] for r in records for t in r["turns"]]
    if cutoff >= 2048:
        assert len(table["input_ids"]) == len(records)  # nothing to split
    if cutoff <= 600:
        assert len(table["input_ids"]) > len(records)
    if cutoff == 300:  # shorter than one opening question: its history is cut from the left, as in single format
        assert all(len(ids) == 300 for ids in table["input_ids"][:3])


def test_session_and_single_records_do_not_mix(data, qwen3_tokenizer):
    _, _, single, sessions = data
    mixed = [sessions["train"][0], movielens.to_train_record(single["train"][0])]
    with pytest.raises(DataError, match="mixes session records"):
        tokenize_any(mixed, qwen3_tokenizer, 1024, source="x.json")
    bad = dict(sessions["train"][0], turns=[dict(sessions["train"][0]["turns"][0], answer="maybe")])
    with pytest.raises(DataError, match=r"x.json: record 1: turns\[0\].answer 'maybe'"):
        tokenize_any([bad], qwen3_tokenizer, 1024, source="x.json")


# ------------------------------------------------------------------------------------------ training
def _session_files(folder: Path, data, n_train=6, n_eval=3) -> tuple[str, str]:
    _, _, _, sessions = data
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "s_train.json").write_text(json.dumps(sessions["train"][:n_train]))
    (folder / "s_eval.json").write_text(json.dumps(sessions["eval"][:n_eval]))
    return str(folder / "s_train.json"), str(folder / "s_eval.json")


@pytest.mark.slow
def test_session_training_evaluates_every_answer(tmp_path, tiny_qwen3, data):
    import finetune_lora

    train, evals = _session_files(tmp_path / "d", data)
    cfg = tiny_config(tmp_path, tiny_qwen3, dataset=train, eval_dataset=evals, cutoff_len=1024, max_steps=2,
                      eval_steps=2, save_steps=2, per_device_train_batch_size=1, per_device_eval_batch_size=2)
    summary = finetune_lora.main(cfg)
    n_answers = sum(len(r["turns"]) for r in json.loads(Path(evals).read_text()))
    assert summary["final_eval"]["eval_n"] == n_answers and 0 < summary["train_loss"] < 20
    assert summary["train_labels_seen"] > summary["train_examples_seen"]  # every answer of a session counts


@pytest.mark.slow
def test_yes_no_loss_trains_and_matches_a_float32_reference(tmp_path, tiny_qwen3):
    from recsft import training as T
    from recsft.modeling import model_for, tokenizer_for
    from recsft.preprocess import datasets_for, resolve_data

    cfg = tiny_config(tmp_path, tiny_qwen3, loss_type="yes_no", max_steps=24, max_samples=8, learning_rate=3e-2,
                      gradient_accumulation_steps=1, eval_strategy="no", load_best_model_at_end="false",
                      save_strategy="no", dtype="float32")
    train_path, _ = resolve_data(cfg.data)
    tok = tokenizer_for(cfg.model)
    train_ds, _ = datasets_for(cfg.data, False, tok, train_path, None, False, cpu=True)
    model, device = model_for(cfg.model, cfg.lora, False)
    trainer, _ = T.build_trainer(model, tok, train_ds, train_ds, cfg, device)
    batch = trainer.data_collator([train_ds[i] for i in range(8)])

    def loss_now():
        model.eval()
        with torch.no_grad():
            return trainer.compute_loss(model, dict(batch)).item()

    # the trainer's loss == BCE on a plain full-logits forward's logit(Yes) - logit(No)
    ref, gold = yes_no_reference(model, batch, trainer.yes_id, trainer.no_id)
    before = loss_now()
    assert before == pytest.approx(ref, rel=1e-4)
    trainer.train()
    yes = float(gold.float().mean())
    prior = -(yes * np.log(yes) + (1 - yes) * np.log(1 - yes))  # best constant P(Yes); the tiny model gets there
    assert before - loss_now() > 0.02 and loss_now() < prior + 0.01


@pytest.mark.slow
def test_prepare_cli_bad_flags_exit_2_with_one_line(tmp_path):
    for argv in (["--features", "stars"], ["--format", "session", "--session-len", "0"]):
        r = subprocess.run([sys.executable, "scripts/prepare_data.py", "--out-dir", str(tmp_path / "o"), *argv],
                           capture_output=True, text=True, cwd=ROOT)
        assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
        assert len(r.stderr.strip().splitlines()) == 1 and r.stderr.startswith("error: --")
    assert not (tmp_path / "o").exists()


# ---------------------------------------------------------------------------------------- UAUC, scoring
def test_user_auc_is_the_mean_of_per_user_aucs():
    from recsft.metrics import compute_metrics

    y = [1, 0, 1, 0, 1, 1, 0]
    p = [0.9, 0.1, 0.2, 0.4, 0.8, 0.7, 0.75]
    users = ["a", "a", "b", "b", "c", "d", "d"]  # c has one class only: left out
    m = compute_metrics(["Yes" if v else "No" for v in y], ["Yes"] * 7, p, users)
    assert m["uauc"] == pytest.approx((1.0 + 0.0 + 0.0) / 3) and "auc" in m
    assert "uauc" not in compute_metrics(["Yes", "No"], ["Yes", "No"], [0.6, 0.4])


@pytest.mark.slow
def test_session_scores_equal_scoring_each_answer_prefix(tiny_qwen3, qwen3_tokenizer, data):
    from transformers import AutoModelForCausalLM

    from recsft.evaluation import EvalSettings, evaluate
    from recsft.inference import answer_token_ids, score_sessions
    from recsft.preprocess import tokenize_sessions_to_arrow

    _, _, single, sessions = data
    model = AutoModelForCausalLM.from_pretrained(tiny_qwen3, dtype=torch.float32).eval()
    records = sessions["test"][:3]
    cutoff = 700  # splits the longer runs: scores must still line up with every turn
    got = score_sessions(model, qwen3_tokenizer, records, cutoff, batch_size=2, progress=False)
    table = tokenize_sessions_to_arrow(records, qwen3_tokenizer, cutoff).to_pydict()
    assert len(table["input_ids"]) > len(records)
    yes, no = answer_token_ids(qwen3_tokenizer)
    ref = []
    with torch.no_grad():
        for ids, labels in zip(table["input_ids"], table["labels"]):
            for t in range(len(ids) - 1):
                if labels[t + 1] != IGNORE_INDEX and labels[t] == IGNORE_INDEX:  # the first token of an answer
                    logits = model(input_ids=torch.tensor([ids[:t + 1]])).logits[0, -1].float()
                    ref.append(float(torch.sigmoid(logits[yes] - logits[no])))
    assert len(got) == len(ref) == sum(len(r["turns"]) for r in records)
    assert [g["p_yes"] for g in got] == pytest.approx(ref, abs=1e-4)

    rows, metrics = evaluate(model, qwen3_tokenizer, records, "score", EvalSettings(batch_size=2, cutoff_len=cutoff))
    keys = {(e["user_id"], e["candidate_movie_id"]): e["label"] for e in single["test"]}
    assert all(keys[(r["user_id"], r["candidate_movie_id"])] == r["label"] for r in rows)  # joins one to one
    assert metrics["n"] == len(rows) and "uauc" in metrics and "auc" in metrics
    from recsft.evaluation import longest_first

    assert longest_first(records) != [0, 1, 2]  # evaluate scores them in another order ...
    assert [r["p_yes"] for r in rows] == pytest.approx([g["p_yes"] for g in got], abs=1e-5)  # ... rows in file order


# --------------------------------------------------------------------------------- retrieval history
def test_retrieval_history_picks_the_most_similar_earlier_ratings(data):
    ratings, titles, _, _ = data
    genres = movielens.load_genres("bundled")
    splits = movielens.build_examples(ratings, titles, H, genres=genres, retrieval=True)
    timelines = _timelines(ratings)

    def sim(a, b):
        a, b = set(genres.get(a, [])), set(genres.get(b, []))
        return len(a & b) / len(a | b) if a | b else 0.0

    examples = [e for ex in splits.values() for e in ex]
    for e in examples[::53]:
        line = timelines[e["user_id"]]
        pos = [m for _, m, _ in line].index(e["candidate_movie_id"])
        earlier = line[:pos]  # only ratings before the candidate may appear
        chosen = [i for i, (_, m, _) in enumerate(earlier) if titles[m] in e["history_titles"]]
        assert len(e["history_titles"]) == H and len(chosen) >= H - 1  # (titles can repeat across ids)
        picked = {titles[earlier[i][1]] for i in chosen}
        sims = {i: sim(earlier[i][1], e["candidate_movie_id"]) for i in range(len(earlier))}
        worst_in = min(sims[i] for i in chosen)
        best_out = max([sims[i] for i in sims if titles[earlier[i][1]] not in picked], default=-1)
        assert worst_in >= best_out
        assert record_text(e).startswith(f"User's {H} earlier movies most similar to the candidate:")


def record_text(e):
    return movielens.to_train_record(e)["input"]


def test_retrieval_history_without_genres_fails_before_any_work(tmp_path):
    raw = tmp_path / "ml"
    raw.mkdir()
    (raw / "u.data").write_text("".join(f"1\t{m}\t4\t{m}\n" for m in range(1, 21)))
    (raw / "u.item").write_text("".join(f"{m}|Movie {m} (1995)|01-Jan-1995||x\n" for m in range(1, 21)))
    with pytest.raises(DataError, match="^--retrieval-history: .* has no movie genres"):
        prepare_data.main(prepare_data.parse_args(["--raw-dir", str(raw), "--out-dir", str(tmp_path / "o"),
                                                   "--retrieval-history"]))
    assert not (tmp_path / "o").exists()
