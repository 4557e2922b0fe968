"""Soft CF tokens (cf_tokens: true): the CF model's user and item vectors as one input embedding each."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from recsft import cf
from recsft.io import DataError, load_data
from recsft.preprocess import IGNORE_INDEX, insert_cf_tokens, with_cf_tokens

ROOT = Path(__file__).resolve().parents[1]


def _table(users=(1, 2), items=(10, 11, 12), k=0):
    rng = np.random.default_rng(0)
    return cf.CFTable("mf" if k else "biases", list(users), list(items), 3.5, rng.normal(size=len(users)),
                      rng.normal(size=len(items)), rng.normal(size=(len(users), k)), rng.normal(size=(len(items), k)))


def test_tokens_go_after_the_prefix_and_before_each_block():
    ids, labels, blocks = [1, 2, 3, 4, 5, 6, 7], [IGNORE_INDEX] * 3 + [IGNORE_INDEX, 50, IGNORE_INDEX, 51], \
        [0, 0, 0, 1, 1, 2, 2]
    out = insert_cf_tokens(ids, labels, blocks, 900, [901, 902])
    assert out[0] == [1, 2, 3, 900, 901, 4, 5, 902, 6, 7]
    assert out[1] == [IGNORE_INDEX] * 6 + [50, IGNORE_INDEX, IGNORE_INDEX, 51]
    assert out[2] == [0, 0, 0, 0, 1, 1, 1, 2, 2, 2]


def test_token_ids_and_features_line_up_with_the_table():
    full = _table(k=2)
    fold = cf.CFTable("mf", [2], [11], 3.0, np.array([0.5]), np.array([-0.5]), np.ones((1, 2)), np.ones((1, 2)))
    ids = cf.TokenIds(full, offset=1000)
    feats = cf.token_features([full, fold])
    assert ids.width == 2 + 3 + 2 and feats.shape == (2 * ids.width, 3)
    assert ids.user(1) == 1000 and ids.item(12) == 1000 + 4 and ids.user("nobody") == 1000 + 5
    assert ids.item(99) == 1000 + 6 and ids.item(11, table=1) == 1000 + ids.width + 3
    assert ids.user("1") == 1000 + 5 and ids.user(np.int64(2)) == 1000 + 1  # "1" is not user 1; a numpy int is user 2
    assert not feats[ids.user("nobody") - 1000].any() and not feats[ids.item(99) - 1000].any()
    users = feats[:2]
    assert np.allclose(users.mean(0), 0, atol=1e-6)  # standardised over the full table's users
    assert not feats[ids.width + 0].any() and feats[ids.width + 1].any()  # the fold table lacks user 1
    raw = np.hstack([full.item_bias[:, None], full.item_factors])
    assert np.allclose(feats[2:5], (raw - raw.mean(0)) / (raw.std(0) + 1e-6), atol=1e-5)


def test_with_cf_tokens_reads_the_answer_keys():
    tokens = cf.TokenIds(_table(), offset=100)
    table = {"input_ids": [[5, 6, 7, 8]], "labels": [[IGNORE_INDEX, IGNORE_INDEX, 9, 9]], "block_ids": [[0, 1, 1, 2]],
             "answer_keys": [[json.dumps([2, 10]), json.dumps([2, 12])]]}
    out = with_cf_tokens(table, tokens, table_of=lambda key: 1 if key == (2, 12) else 0)
    assert out["input_ids"] == [[5, tokens.user(2), tokens.item(10), 6, 7, tokens.item(12, 1), 8]]


def test_soft_tokens_replace_only_their_positions_and_learn(tiny_qwen3):
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_qwen3, dtype=torch.float32)
    embed = model.get_input_embeddings()
    offset = embed.weight.shape[0] - 10
    table = _table(k=3)
    module = cf.add_cf_tokens(model, [table], offset)
    assert model.get_input_embeddings() is module and module.weight is embed.weight
    ids = torch.tensor([[3, 4, offset + 1, 5, offset + 2]])
    out = module(ids)
    assert torch.equal(out[0, [0, 1, 3]], embed(ids[0, [0, 1, 3]]))
    feats = torch.as_tensor(cf.token_features([table]))
    assert torch.allclose(out[0, 2], module.mlp(feats[1]), atol=1e-6)
    # soft tokens start at the size of a word embedding
    size = (out[0, [2, 4]].pow(2).mean().sqrt() / embed.weight[:offset].pow(2).mean().sqrt()).detach()
    assert 0.2 < float(size) < 5
    model(input_ids=ids).logits[0, -1].sum().backward()
    assert module.mlp[0].weight.grad is not None and module.mlp[0].weight.grad.abs().sum() > 0


def test_soft_tokens_save_load_and_refuse_another_offset(tiny_qwen3, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM

    def fresh():
        return AutoModelForCausalLM.from_pretrained(tiny_qwen3, dtype=torch.float32)

    table = _table()
    table.save(tmp_path, stem=cf.TOKENS_TABLE)
    model = fresh()
    offset = model.get_input_embeddings().weight.shape[0] - 10
    module = cf.add_cf_tokens(model, [table], offset)
    with torch.no_grad():
        module.mlp[0].weight.add_(1.0)
    module.save(tmp_path)
    other = fresh()
    assert cf.load_cf_tokens(other, tmp_path, offset, "fix it")
    assert cf.cf_token_ids(other).offset == offset
    ids = torch.tensor([[1, offset, offset + 3]])
    assert torch.allclose(other.get_input_embeddings()(ids), module(ids), atol=1e-6)
    with pytest.raises(DataError, match="another tokenizer"):
        cf.load_cf_tokens(fresh(), tmp_path, offset - 1, "fix it")
    assert not cf.load_cf_tokens(fresh(), tmp_path / "none", offset, "fix it")


def test_ranking_and_block_scoring_place_the_tokens_alike(tiny_qwen3, qwen3_tokenizer):
    """The shared-prefix ranking path and the block scorer give the same margins with soft tokens on: the tokens
    sit at the same places (after the prefix, before each candidate) in both."""
    import torch
    from transformers import AutoModelForCausalLM

    from recsft import movielens
    from recsft.inference import score_blocks
    from recsft.ranking import block_candidate_scores

    ratings, titles = movielens.load_ratings("bundled")
    rec = movielens.build_blocks(ratings[ratings.user_id <= 3], titles, block_size=5, history_from="train")["test"][0]
    movies = [b["candidate_movie_id"] for b in rec["blocks"]]
    model = AutoModelForCausalLM.from_pretrained(tiny_qwen3, dtype=torch.float32).eval()
    table = _table(users=(rec["user_id"],), items=movies[:-1], k=2)  # the last candidate: an unknown item
    cf.add_cf_tokens(model, [table], len(qwen3_tokenizer))
    model.cf_token_ids = cf.TokenIds(table, len(qwen3_tokenizer))
    blocks = [r["logit_yes"] - r["logit_no"] for r in score_blocks(model, qwen3_tokenizer, [rec], progress=False)]
    ranked, _ = block_candidate_scores(model, qwen3_tokenizer, rec, [b["text"] for b in rec["blocks"]], movies=movies)
    assert np.allclose(ranked, blocks, atol=1e-4)
    with cf.without_cf_tokens(model):
        plain = [r["logit_yes"] - r["logit_no"] for r in score_blocks(model, qwen3_tokenizer, [rec], progress=False)]
        assert np.allclose(block_candidate_scores(model, qwen3_tokenizer, rec, [b["text"] for b in rec["blocks"]])[0],
                           plain, atol=1e-4)
    assert not np.allclose(plain, blocks, atol=1e-4)
    with pytest.raises(ValueError, match="movie id"):
        block_candidate_scores(model, qwen3_tokenizer, rec, [b["text"] for b in rec["blocks"]])


def test_cf_tokens_need_a_residual():
    p = subprocess.run([sys.executable, "scripts/finetune_lora.py", "--config", "configs/smollm2_movielens_blocks.yaml",
                        "cf_tokens=true"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and "cf_tokens" in p.stderr and "cf_residual=biases" in p.stderr
    assert "Traceback" not in p.stderr


@pytest.mark.slow
def test_cf_tokens_train_save_and_score_end_to_end(tmp_path, tiny_qwen3, residual_run):
    data, out, common, run = residual_run(tmp_path, tiny_qwen3, "cf_fit=stacked", "cf_tokens=true",
                                          "cf_tokens_kind=mf")
    train = [sys.executable, "scripts/finetune_lora.py", *common, "eval_steps=2", "save_steps=2", "max_samples=4",
             "max_eval_samples=3", "cf_fit_samples=6", "max_train_minutes=null", "load_best_model_at_end=false"]
    p = subprocess.run([*train, "max_steps=2"], **run)
    assert p.returncode == 0, p.stderr[-3000:]
    for folder in (out, out / "checkpoint-2"):
        assert {"cf_tokens.safetensors", "cf_tokens_table.json"} <= {f.name for f in folder.iterdir()}
    assert json.loads((out / "cf_tokens_table.json").read_text())["kind"] == "mf"
    assert json.loads((out / "cf_residual.json").read_text())["kind"] == "biases"
    assert (out / "cf_head.safetensors").is_file()
    test = ["--test_file", str(data / "blocks_test.jsonl"), "--eval_mode", "score", "--max_samples", "3"]
    p = subprocess.run([sys.executable, "scripts/infer_lora.py", *common, *test, "--output_dir", str(tmp_path / "e")],
                       **run)
    assert p.returncode == 0, p.stderr[-3000:]
    rows = load_data(tmp_path / "e" / "lora_predictions.jsonl")
    assert len(rows) == sum(len(r["blocks"]) for r in load_data(data / "blocks_test.jsonl")[:3])
    # the same adapter without its tokens scores differently: the tokens are read
    (out / "cf_tokens.safetensors").rename(tmp_path / "moved.safetensors")
    p = subprocess.run([sys.executable, "scripts/infer_lora.py", *common, *test, "--output_dir", str(tmp_path / "f")],
                       **run)
    assert p.returncode == 0, p.stderr[-3000:]
    plain = load_data(tmp_path / "f" / "lora_predictions.jsonl")
    assert max(abs(a["margin"] - b["margin"]) for a, b in zip(rows, plain)) > 1e-6
    (tmp_path / "moved.safetensors").rename(out / "cf_tokens.safetensors")
    # single-format records have no place for the tokens: refused before the model loads, one line
    p = subprocess.run([sys.executable, "scripts/infer_lora.py", *common, "--test_file", str(data / "eval.json"),
                        "--eval_mode", "score", "--output_dir", str(tmp_path / "g")], **run)
    assert p.returncode == 2 and "cf_tokens" in p.stderr and "Traceback" not in p.stderr
    # resume from the checkpoint reloads the mapping network
    p = subprocess.run([*train, "max_steps=4", "--resume"], **run)
    assert p.returncode == 0, p.stderr[-3000:]
