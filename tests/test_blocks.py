"""Candidate blocks: one shared history, many candidates each answered as if asked alone; the static protocol."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import prepare_data
from conftest import SMOLLM2_GGUF, tiny_config
from recsft import movielens
from recsft.formatting import block_question, render_records
from recsft.inference import block_attention, score, score_blocks
from recsft.io import DataError, load_data
from recsft.preprocess import IGNORE_INDEX, tokenize_any, tokenize_blocks_to_arrow

ROOT = Path(__file__).resolve().parents[1]
H, K = 15, 16
FEATURES = ["item_stats", "user_stats", "genres"]


@pytest.fixture(scope="module")
def ml():
    ratings, titles = movielens.load_ratings("bundled")
    return ratings[ratings.user_id <= 30], titles, movielens.load_genres("bundled")


@pytest.fixture(scope="module")
def blocks(ml):
    ratings, titles, genres = ml
    return {hf: movielens.build_blocks(ratings, titles, H, block_size=K, features=FEATURES, genres=genres,
                                       history_from=hf) for hf in ("all", "train")}


# ---------------------------------------------------------------------------------------------- data
def test_block_candidates_and_labels_equal_the_single_splits(ml, blocks):
    ratings, titles, _ = ml
    single = movielens.build_examples(ratings, titles, H)
    for hf, splits in blocks.items():
        for split in ("train", "eval", "test"):
            a = sorted((e["user_id"], e["candidate_movie_id"], e["label"]) for e in single[split])
            b = sorted((r["user_id"], x["candidate_movie_id"], x["answer"]) for r in splits[split] for x in r["blocks"])
            assert a == b, (hf, split)
            assert all(r["split"] == split and 1 <= len(r["blocks"]) <= K for r in splits[split])


def _history(prefix: str) -> list[str]:
    return re.findall(r"^\d+\. (.*)$", prefix, flags=re.M)


def test_online_prefix_is_the_history_before_the_first_candidate(ml, blocks):
    ratings, titles, _ = ml
    for r in blocks["all"]["test"][:10] + blocks["all"]["train"][:10]:
        line = ratings[ratings.user_id == r["user_id"]].sort_values(["timestamp", "movie_id"], kind="stable")
        movies = line.movie_id.tolist()
        pos = movies.index(r["blocks"][0]["candidate_movie_id"])
        expected = [f"{titles[m]} (rating ≈ {s:.1f})" for m, s in zip(movies[pos - H:pos], line.rating[pos - H:pos])]
        assert _history(r["prefix"]) == expected
        assert [movies.index(b["candidate_movie_id"]) for b in r["blocks"]] == list(range(pos, pos + len(r["blocks"])))


def _contexts(splits, names=("eval", "test")):
    return {(r["user_id"], r["blocks"][0]["candidate_movie_id"]): (r["prefix"], [b["text"] for b in r["blocks"]])
            for s in names for r in splits[s]}


@pytest.mark.parametrize("history_from, reveals", [("train", False), ("all", True)])
def test_static_protocol_shows_no_eval_or_test_label(ml, history_from, reveals):
    """Flip every eval/test rating: under the static protocol no eval/test context changes (no label shows)."""
    ratings, titles, genres = ml
    single = movielens.build_examples(ratings, titles, H)
    held = {(e["user_id"], e["candidate_movie_id"]) for s in ("eval", "test") for e in single[s]}
    key = list(zip(ratings.user_id, ratings.movie_id))
    flipped = ratings.assign(rating=[6 - r if k in held else r for k, r in zip(key, ratings.rating)])
    kw = dict(block_size=K, features=FEATURES, genres=genres, history_from=history_from)
    before = _contexts(movielens.build_blocks(ratings, titles, H, **kw))
    after = _contexts(movielens.build_blocks(flipped, titles, H, **kw))
    assert before.keys() == after.keys()
    assert (before != after) is reveals


def test_static_protocol_on_the_prepared_files(tmp_path):
    """The written eval/test files: histories and counts come from training-split ratings only."""
    movielens.prepare(tmp_path, max_users=25, fmt="blocks", history_from="train", features=["item_stats", "user_stats"])
    ratings = __import__("pandas").read_parquet(tmp_path / "interactions.parquet")
    titles = dict(zip(*(lambda t: (t.movie_id, t.title))(__import__("pandas").read_parquet(tmp_path / "items.parquet"))))
    single = movielens.build_examples(ratings, titles, H)
    held = {(e["user_id"], e["candidate_movie_id"]) for s in ("eval", "test") for e in single[s]}
    train = ratings[[k not in held for k in zip(ratings.user_id, ratings.movie_id)]]
    liked = train.rating >= 4.0
    for name in ("blocks_eval.json", "blocks_test.jsonl"):
        for r in load_data(tmp_path / name):
            mine = train[train.user_id == r["user_id"]].sort_values(["timestamp", "movie_id"], kind="stable")
            assert _history(r["prefix"]) == [f"{titles[m]} (rating ≈ {s:.1f})"
                                              for m, s in zip(mine.movie_id[-H:], mine.rating[-H:])]
            n, k = len(mine), int((mine.rating >= 4.0).sum())
            assert f"This user: {k / n:.0%} liked of {n} earlier ratings" in r["prefix"]
            for b in r["blocks"]:
                item = train.movie_id == b["candidate_movie_id"]
                n, k = int(item.sum()), int((item & liked).sum())
                assert b["text"].endswith("no earlier ratings" if n == 0 else f"{k / n:.0%} liked of {n} earlier ratings")
    stats = json.loads((tmp_path / "blocks_stats.json").read_text())
    assert stats["format"] == "blocks" and stats["params"]["history_from"] == "train"
    manifest = json.loads((tmp_path / "manifest.json").read_text())["files"]
    assert {"blocks_train.json", "blocks_eval.json", "blocks_test.jsonl", "blocks_stats.json", "test_raw.jsonl"} <= set(manifest)


def test_counts_before_matches_a_loop_with_any_time_unit():
    rng = np.random.default_rng(0)
    keys = rng.choice(["a", "b", "c"], 40)
    ts = rng.integers(0, 6, 40) * 10**12  # millisecond-like times, ties included
    liked = rng.random(40) < 0.5
    q_keys, q_ts = np.array(["a", "c", "z", "b"]), np.array([3 * 10**12, np.inf, 5.0, 0.0])
    n, k = movielens.counts_before(keys, ts, liked, q_keys, q_ts)
    for i in range(4):
        sel = (keys == q_keys[i]) & (ts < q_ts[i])
        assert (n[i], k[i]) == (sel.sum(), (sel & liked).sum())


def test_sorted_once_counts_equal_counts_before():
    rng = np.random.default_rng(1)
    keys = rng.choice([3, 7, 11, 20], 60)
    ts = rng.integers(0, 8, 60) * 10**12
    liked = rng.random(60) < 0.5
    before = movielens._CountsBefore(keys, ts, liked)
    for t in (0.0, 3 * 10**12, 7 * 10**12 + 1, np.inf):
        queries = [3, 20, 99, 7, 7]  # 99: a key with no reference row
        n, k = before(queries, t)
        want_n, want_k = movielens.counts_before(keys, ts, liked, np.array(queries), np.full(len(queries), t))
        assert n.tolist() == want_n.tolist() and k.tolist() == want_k.tolist()


def test_bad_block_flags_fail_before_any_work(tmp_path, monkeypatch):
    monkeypatch.setattr(movielens, "load_ratings", lambda *a: pytest.fail("loaded data before checking flags"))
    for argv, match in ((["--format", "blocks", "--block-size", "0"], "--block-size must be >= 1"),
                        (["--history-from", "train"], "setting of --format blocks"),
                        (["--format", "blocks", "--retrieval-history"], "drop one of the two flags")):
        with pytest.raises(DataError, match=match):
            prepare_data.main(prepare_data.parse_args(["--out-dir", str(tmp_path)] + argv))
    assert not any(tmp_path.iterdir())


# ------------------------------------------------------------------------------------------ tokenize
def test_blocks_tokenize_like_the_ordinary_question(blocks, qwen3_tokenizer):
    rec = blocks["train"]["train"][0]
    got = tokenize_any([rec], qwen3_tokenizer, 4096).to_pydict()
    ids, labels, bids = got["input_ids"][0], got["labels"][0], got["block_ids"][0]
    prefix = [t for t, b in zip(ids, bids) if b == 0]
    for j in range(len(rec["blocks"])):
        whole = tokenize_any([block_question(rec, j)], qwen3_tokenizer, 4096).to_pydict()
        mine = [t for t, b in zip(ids, bids) if b == j + 1]
        lab = [x for x, b in zip(labels, bids) if b == j + 1]
        assert prefix + mine == whole["input_ids"][0]
        assert [IGNORE_INDEX] * len(prefix) + lab == whole["labels"][0]


def test_long_records_split_between_blocks_with_the_whole_prefix(blocks, qwen3_tokenizer):
    recs = blocks["train"]["train"][:6]
    table = tokenize_blocks_to_arrow(recs, qwen3_tokenizer, 620).to_pydict()
    answers = sum(len(r["blocks"]) for r in recs)
    assert len(table["input_ids"]) > len(recs)  # split
    assert sum(max(b) for b in table["block_ids"]) == answers  # every block once
    for ids, bids in zip(table["input_ids"], table["block_ids"]):
        assert len(ids) <= 620 and bids[0] == 0 and bids == sorted(bids)
    with pytest.raises(DataError, match="raise cutoff_len"):
        tokenize_blocks_to_arrow(recs, qwen3_tokenizer, 30)


def test_block_attention_mask_and_positions():
    bids = torch.tensor([[0, 0, 1, 1, 2, 2, 2, -1], [0, 1, 2, 3, -1, -1, -1, -1]])
    mask, pos = block_attention(bids, torch.float32)
    allowed = mask[:, 0] == 0
    assert pos[0].tolist() == [0, 1, 2, 3, 2, 3, 4, 0] and pos[1].tolist() == [0, 1, 1, 1, 0, 0, 0, 0]
    assert allowed[0, 4].tolist() == [True, True, False, False, True, False, False, False]  # prefix + itself
    assert allowed[0, 7].tolist() == [False] * 7 + [True]  # padding attends to itself only
    assert allowed.any(-1).all() and not allowed[0].triu(1).any()


# -------------------------------------------------------------------------------------- exact scores
def _equal_to_single(model_path: str, tok, records, attn: str, dtype=torch.float32, atol=1e-4):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=dtype, attn_implementation=attn).eval()
    got = score_blocks(model, tok, records, cutoff_len=2048, batch_size=2, progress=False)
    prompts, _ = render_records([block_question(r, j) for r in records for j in range(len(r["blocks"]))], tok)
    ref = score(model, tok, prompts, batch_size=4, progress=False)
    assert len(got) == len(ref)
    diff = max(abs(a["p_yes"] - b["p_yes"]) for a, b in zip(got, ref))
    margin = max(abs((a["logit_yes"] - a["logit_no"]) - (b["logit_yes"] - b["logit_no"])) for a, b in zip(got, ref))
    assert diff < atol and margin < 1e-3, (diff, margin)
    return model


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_block_p_yes_equals_the_single_prompt(tiny_qwen3, qwen3_tokenizer, blocks, attn):
    records = [dict(r, blocks=r["blocks"][:5]) for r in blocks["train"]["test"][:1] + blocks["all"]["train"][:1]]
    model = _equal_to_single(tiny_qwen3, qwen3_tokenizer, records, attn)
    # control: without the block mask the later blocks see their siblings and their scores move
    from recsft.preprocess import tokenize_blocks_to_arrow as tb

    row = tb(records[1:], qwen3_tokenizer, 2048).to_pydict()
    ids = torch.tensor([row["input_ids"][0]])
    mask, pos = block_attention(torch.tensor([row["block_ids"][0]]), torch.float32)
    with torch.no_grad():
        a = model(input_ids=ids, attention_mask=mask, position_ids=pos).logits[0, -1]
        b = model(input_ids=ids).logits[0, -1]
    assert (a - b).abs().max() > 1e-3


def _trainer(model_path: str, tmp_path: Path, ds, loss_type: str):
    from recsft import training as T
    from recsft.config import load_config
    from recsft.modeling import model_for, tokenizer_for

    cfg = load_config(None, [f"model_name_or_path={model_path}", "quantization_bit=null", "dtype=float32",
                             "report_to=none", "eval_strategy=no", "load_best_model_at_end=false", "eval_dataset=",
                             f"output_dir={tmp_path / 'out'}", "max_steps=1", f"loss_type={loss_type}",
                             "cutoff_len=2048", "lora_dropout=0.0"])
    tok = tokenizer_for(cfg.model)
    model, device = model_for(cfg.model, cfg.lora, False)
    trainer, _ = T.build_trainer(model, tok, ds, None, cfg, device)
    return trainer, model, tok


def _block_and_single_losses(model_path: str, tok, rec: dict, tmp_path: Path, loss_type: str):
    """The trainer's loss on one block example, and on each of its blocks asked as an ordinary question."""
    from datasets import Dataset

    block_ds = Dataset.from_dict(tokenize_any([rec], tok, 2048).to_pydict())
    singles = [block_question(rec, j) for j in range(len(rec["blocks"]))]
    single_ds = Dataset.from_dict(tokenize_any(singles, tok, 2048).to_pydict())
    trainer, model, _ = _trainer(model_path, tmp_path, block_ds, loss_type)
    trainer.answer_width = 3 * len(singles)
    model.eval()
    with torch.no_grad():
        got = trainer.compute_loss(model, dict(trainer.data_collator([block_ds[0]]))).item()
        each = [trainer.compute_loss(model, dict(trainer.data_collator([single_ds[i]]))).item()
                for i in range(len(singles))]
    return got, float(np.mean(each))


@pytest.mark.parametrize("loss_type", ["nll", "yes_no"])
def test_block_loss_equals_the_mean_single_loss(tiny_qwen3, qwen3_tokenizer, blocks, tmp_path, loss_type):
    got, mean = _block_and_single_losses(tiny_qwen3, qwen3_tokenizer, blocks["train"]["test"][0], tmp_path, loss_type)
    assert got == pytest.approx(mean, rel=1e-4, abs=1e-5)


@pytest.mark.slow
def test_smollm2_block_scores_equal_single_prompts(blocks):
    from recsft.modeling import load_tokenizer, local_model_path

    path = local_model_path(SMOLLM2_GGUF)
    _equal_to_single(path, load_tokenizer(path), blocks["train"]["test"][:2], "sdpa")


@pytest.mark.slow
def test_smollm2_block_loss_equals_the_mean_single_loss(blocks, tmp_path):
    from recsft.modeling import load_tokenizer, local_model_path

    path = local_model_path(SMOLLM2_GGUF)
    rec = dict(blocks["train"]["test"][0], blocks=blocks["train"]["test"][0]["blocks"][:6])
    got, mean = _block_and_single_losses(path, load_tokenizer(path), rec, tmp_path, "nll")
    assert got == pytest.approx(mean, rel=1e-4)


# -------------------------------------------------------------------------------------------- end to end
@pytest.mark.slow
def test_blocks_config_trains_evaluates_and_scores_end_to_end(tmp_path, tiny_qwen3):
    data = tmp_path / "data"
    run = dict(cwd=ROOT, capture_output=True, text=True, timeout=900)
    p = subprocess.run([sys.executable, "scripts/prepare_data.py", "--format", "blocks", "--history-from", "train",
                        "--features", "item_stats", "user_stats", "genres", "--max-users", "12", "--out-dir",
                        str(data)], **run)
    assert p.returncode == 0, p.stderr
    out = tmp_path / "out"
    common = ["--config", "configs/smollm2_movielens_blocks.yaml", f"model_name_or_path={tiny_qwen3}",
              f"dataset={data / 'blocks_train.json'}", f"eval_dataset={data / 'blocks_eval.json'}",
              f"output_dir={out}", f"preprocessing_cache_dir={tmp_path / 'cache'}", "dtype=float32"]
    p = subprocess.run([sys.executable, "scripts/finetune_lora.py", *common, "max_steps=4", "eval_steps=2",
                        "save_steps=2", "max_samples=8", "max_eval_samples=4", "max_train_minutes=null"], **run)
    assert p.returncode == 0, p.stderr[-3000:]
    summary = json.loads((out / "training_summary.json").read_text())
    evals = load_data(data / "blocks_eval.json")[:4]
    assert summary["final_eval"]["eval_n"] == sum(len(r["blocks"]) for r in evals)
    assert "eval_uauc" in summary["final_eval"] and summary["data_stats"]["format"] == "blocks"
    p = subprocess.run([sys.executable, "scripts/infer_lora.py", *common, "--test_file", str(data / "blocks_test.jsonl"),
                        "--eval_mode", "score", "--max_samples", "5", "--output_dir", str(tmp_path / "eval")], **run)
    assert p.returncode == 0, p.stderr[-3000:]
    rows = load_data(tmp_path / "eval" / "lora_predictions.jsonl")
    assert len(rows) == sum(len(r["blocks"]) for r in load_data(data / "blocks_test.jsonl")[:5])
    assert all(0 <= r["p_yes"] <= 1 and "candidate_movie_id" in r for r in rows)


def test_shuffled_titles_ablation_keeps_ratings_labels_and_counts(ml):
    ratings, titles, genres = ml
    kw = dict(block_size=K, features=FEATURES, genres=genres, history_from="train")
    plain = movielens.build_blocks(ratings, titles, H, **kw)
    mixed = movielens.build_blocks(ratings, titles, H, shuffle_titles=3, **kw)
    for split in plain:
        a, b = plain[split], mixed[split]
        assert [r["blocks"] for r in a] == [r["blocks"] for r in b]  # candidates, features, labels unchanged
        strip = lambda p: re.sub(r"^\d+\. .* \(rating", "(rating", p, flags=re.M)  # noqa: E731
        assert [strip(r["prefix"]) for r in a] == [strip(r["prefix"]) for r in b]  # ratings and counts unchanged
        assert sorted(map(_history_titles, (r["prefix"] for r in a))) == \
            sorted(map(_history_titles, (r["prefix"] for r in b)))  # the same titles, moved between records
        moved = sum(_history_titles(x["prefix"]) != _history_titles(y["prefix"]) for x, y in zip(a, b))
        assert moved >= 0.9 * len(a)  # every record gets another's titles (equal only for a user's twin records)


def _history_titles(prefix: str) -> list[str]:
    return [re.sub(r" \(rating ≈ [0-9.]+\)$", "", h) for h in _history(prefix)]
