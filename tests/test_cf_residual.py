"""The CF residual in training and scoring: P(Yes) = sigmoid(c + a * margin + b), saved with the adapter."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from recsft import movielens
from recsft.io import DataError, load_data
from recsft.preprocess import tokenize_any

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def block_records():
    ratings, titles = movielens.load_ratings("bundled")
    splits = movielens.build_blocks(ratings[ratings.user_id <= 8], titles, block_size=6, history_from="train")
    return splits["train"][:3]


def _trainer(model_path, tmp_path, ds, table):
    from recsft import training as T
    from recsft.config import load_config
    from recsft.modeling import model_for, tokenizer_for

    cfg = load_config(None, [f"model_name_or_path={model_path}", "quantization_bit=null", "dtype=float32",
                             "report_to=none", "eval_strategy=no", "load_best_model_at_end=false", "eval_dataset=",
                             f"output_dir={tmp_path / 'out'}", "max_steps=1", "loss_type=yes_no",
                             "cf_residual=biases", "cutoff_len=2048", "lora_dropout=0.0"])
    model, device = model_for(cfg.model, cfg.lora, False)
    trainer, _ = T.build_trainer(model, tokenizer_for(cfg.model), ds, None, cfg, device, cf_table=table)
    return trainer, model


def test_residual_loss_is_bce_of_c_plus_a_margin_plus_b(tiny_qwen3, qwen3_tokenizer, block_records, tmp_path):
    from datasets import Dataset

    table = tokenize_any(block_records, qwen3_tokenizer, 2048).to_pydict()
    rng = np.random.default_rng(0)
    table["cf"] = [rng.normal(size=len(k)).tolist() for k in table["answer_keys"]]
    ds = Dataset.from_dict(table)
    trainer, model = _trainer(tiny_qwen3, tmp_path, ds, table=object())
    batch = dict(trainer.data_collator([ds[i] for i in range(len(ds))]))
    gold = torch.tensor([b["answer"] == "Yes" for r in block_records for b in r["blocks"]], dtype=torch.float32)
    c = torch.tensor([x for row in table["cf"] for x in row], dtype=torch.float32)
    with torch.no_grad():
        model.cf_head.a.fill_(0.0)
        model.cf_head.b.fill_(0.3)
        loss = trainer.compute_loss(model, dict(batch)).item()
    assert loss == pytest.approx(torch.nn.functional.binary_cross_entropy_with_logits(c + 0.3, gold).item(), rel=1e-5)
    with torch.no_grad():
        model.cf_head.a.fill_(1.0)
        model.cf_head.b.fill_(0.0)
        with_margin = trainer.compute_loss(model, dict(batch)).item()
        preds = trainer.prediction_step(model, dict(batch), False)[1]
    logit = preds[..., 1][preds[..., 1] != -100]
    ref = torch.nn.functional.binary_cross_entropy_with_logits(logit, gold).item()
    assert with_margin == pytest.approx(ref, rel=1e-5) and not torch.allclose(logit, c)
    model.cf_head.a.data.fill_(0.01)
    trainer.compute_loss(model, dict(batch)).backward()
    lora = [p.grad for n, p in model.named_parameters() if "lora_" in n and p.grad is not None]
    assert model.cf_head.a.grad is not None and lora and any(g.abs().sum() > 0 for g in lora)


def test_residual_needs_block_data(tmp_path):
    from datasets import Dataset

    from recsft import training as T
    from recsft.config import ConfigError

    ds = Dataset.from_dict({"input_ids": [[1, 2]], "labels": [[-100, 2]]})
    with pytest.raises(ConfigError, match="candidate-block data"):
        T.residual_datasets("biases", str(tmp_path / "train.json"), ds, None, 0)


@pytest.mark.slow
def test_residual_trains_saves_and_scores_end_to_end(tmp_path, tiny_qwen3, residual_run):
    data, out, common, run = residual_run(tmp_path, tiny_qwen3)
    p = subprocess.run([sys.executable, "scripts/finetune_lora.py", *common, "max_steps=4", "eval_steps=2",
                        "save_steps=2", "max_samples=8", "max_eval_samples=4", "max_train_minutes=null"], **run)
    assert p.returncode == 0, p.stderr[-3000:]
    for folder in (out, out / "checkpoint-4"):
        assert {"cf_residual.json", "cf_residual.safetensors", "cf_head.safetensors"} <= {f.name for f in folder.iterdir()}
    summary = json.loads((out / "training_summary.json").read_text())
    assert 0.0 <= summary["final_eval"]["eval_auc"] <= 1.0
    p = subprocess.run([sys.executable, "scripts/infer_lora.py", *common, "--test_file", str(data / "blocks_test.jsonl"),
                        "--eval_mode", "score", "--max_samples", "5", "--output_dir", str(tmp_path / "eval")], **run)
    assert p.returncode == 0, p.stderr[-3000:]
    rows = load_data(tmp_path / "eval" / "lora_predictions.jsonl")
    metrics = json.loads((tmp_path / "eval" / "metrics_summary.json").read_text())
    assert metrics["cf_residual"]["kind"] == "biases"
    a, b = metrics["cf_residual"]["a"], metrics["cf_residual"]["b"]
    for r in rows:
        assert r["p_yes"] == pytest.approx(1 / (1 + np.exp(-(r["cf_logit"] + a * r["margin"] + b))), rel=1e-9)
    # the single training format has no user or movie ids: refused before the model loads, one line
    p = subprocess.run([sys.executable, "scripts/infer_lora.py", *common, "--test_file", str(data / "eval.json"),
                        "--eval_mode", "score", "--output_dir", str(tmp_path / "eval2")], **run)
    assert p.returncode == 2 and "user_id / candidate_movie_id" in p.stderr and "Traceback" not in p.stderr
    # resume from the checkpoint reloads the head
    p = subprocess.run([sys.executable, "scripts/finetune_lora.py", *common, "max_steps=6", "eval_steps=2",
                        "save_steps=2", "max_samples=8", "max_eval_samples=4", "max_train_minutes=null", "--resume"],
                       **run)
    assert p.returncode == 0, p.stderr[-3000:]


def test_residual_head_has_its_own_learning_rate(tiny_qwen3, qwen3_tokenizer, block_records, tmp_path):
    from datasets import Dataset

    table = tokenize_any(block_records, qwen3_tokenizer, 2048).to_pydict()
    table["cf"] = [[0.0] * len(k) for k in table["answer_keys"]]
    trainer, model = _trainer(tiny_qwen3, tmp_path, Dataset.from_dict(table), table=object())
    optimizer = trainer.create_optimizer()
    head = {id(p) for p in model.cf_head.parameters()}
    groups = [g for g in optimizer.param_groups if any(id(p) in head for p in g["params"])]
    assert len(groups) == 1 and len(groups[0]["params"]) == 2 and groups[0]["lr"] == trainer.args.cf_head_lr == 1e-2
    assert sum(len(g["params"]) for g in optimizer.param_groups) == sum(p.requires_grad for p in model.parameters())


# ------------------------------------------------------------------------------- two stages (cf_fit: stacked)
def test_fit_head_recovers_a_and_b_with_c_as_offset():
    from recsft.cf import fit_head

    rng = np.random.default_rng(0)
    c, m = rng.normal(0, 1, 20000), rng.normal(0, 2, 20000)
    y = rng.random(20000) < 1 / (1 + np.exp(-(c + 0.7 * m - 0.3)))
    a, b = fit_head(c, m, y)
    assert a == pytest.approx(0.7, abs=0.05) and b == pytest.approx(-0.3, abs=0.05)
    a0, _ = fit_head(c, rng.normal(0, 2, 20000), y)  # a margin without information gets a ~ 0
    assert abs(a0) < 0.03
    with pytest.raises(DataError, match="both labels"):
        fit_head(c[:5], m[:5], np.ones(5, bool))


def test_stacked_fit_needs_a_residual():
    from recsft.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="cf_fit: stacked fits a CF residual's head; set cf_residual=biases"):
        load_config("configs/smollm2_movielens_blocks.yaml", ["cf_fit=stacked"])
    with pytest.raises(ConfigError, match="cf_fit: 'twice' is not one of joint, stacked"):
        load_config("configs/smollm2_movielens_blocks.yaml", ["cf_fit=twice", "cf_residual=biases"])


@pytest.mark.slow
def test_stacked_residual_trains_text_then_fits_the_head_on_eval(tmp_path, tiny_qwen3, residual_run):
    data, out, common, run = residual_run(tmp_path, tiny_qwen3, "cf_fit=stacked")
    p = subprocess.run([sys.executable, "scripts/finetune_lora.py", *common, "max_steps=2", "eval_steps=2",
                        "save_steps=2", "max_samples=4", "max_eval_samples=3", "cf_fit_samples=6",
                        "max_train_minutes=null"], **run)
    assert p.returncode == 0, p.stderr[-3000:]
    assert {"cf_residual.json", "cf_head.safetensors"} <= {f.name for f in out.iterdir()}
    assert not (out / "checkpoint-2" / "cf_head.safetensors").exists()  # stage 1 trains the text alone
    fit = json.loads((out / "training_summary.json").read_text())["cf_residual_fit"]
    evals = load_data(data / "blocks_eval.json")[:6]
    assert fit["fit"] == "stacked" and fit["eval_answers"] == sum(len(r["blocks"]) for r in evals)
    p = subprocess.run([sys.executable, "scripts/infer_lora.py", *common, "--test_file", str(data / "blocks_test.jsonl"),
                        "--eval_mode", "score", "--max_samples", "3", "--output_dir", str(tmp_path / "eval")], **run)
    assert p.returncode == 0, p.stderr[-3000:]
    metrics = json.loads((tmp_path / "eval" / "metrics_summary.json").read_text())
    assert metrics["cf_residual"]["a"] == pytest.approx(fit["a"]) and metrics["cf_residual"]["b"] == pytest.approx(fit["b"])
