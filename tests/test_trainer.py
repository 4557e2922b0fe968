"""The trainer on a tiny model and a tiny batch (fast): compute_loss, the eval step, the extra columns, resume.

Each check calls the trainer's own methods and compares them with a plain full-logits forward of the same model,
so a change that breaks the loss or the eval step fails here, in the fast tier.
"""

from __future__ import annotations

import json

import pytest
import torch

from conftest import tiny_config, yes_no_reference


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_qwen3):
    """A tiny LoRA model, its tokenizer and a tiny train/eval set whose eval records carry string user ids."""
    from datasets import Dataset

    from recsft.io import load_data
    from recsft.modeling import model_for, tokenizer_for
    from recsft.preprocess import tokenize_to_arrow

    tmp = tmp_path_factory.mktemp("trainer")
    cfg = tiny_config(tmp, tiny_qwen3, dtype="float32", lora_dropout=0.0, per_device_train_batch_size=2,
                      gradient_accumulation_steps=1, max_steps=2, save_steps=1, eval_steps=1, logging_steps=1,
                      load_best_model_at_end="false", eval_strategy="no")
    tok = tokenizer_for(cfg.model)
    records = load_data(cfg.data.dataset)[:6]
    users = ["ann", "bob", "ann", "cy", "bob", "ann"]
    evals = [dict(r, user_id=u) for r, u in zip(records, users)]
    train_ds = Dataset(tokenize_to_arrow(records[:4], tok, cfg.data.cutoff_len))
    eval_ds = Dataset(tokenize_to_arrow(evals, tok, cfg.data.cutoff_len))
    model, _ = model_for(cfg.model, cfg.lora, False, cfg.train.seed)
    model.eval()
    return cfg, tok, model, train_ds, eval_ds


def trainer_for(setup, eval_ds=None, **extra):
    from recsft.training import build_trainer

    cfg, tok, model, train_ds, _ = setup
    trainer, _ = build_trainer(model, tok, train_ds, eval_ds, cfg, "cpu", **extra)
    model.eval()  # no dropout: the reference forward must see the same network
    return trainer


def full_logits(model, row) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=torch.tensor([row["input_ids"]])).logits[0].float()


def test_compute_loss_equals_the_full_logits_loss_padded_masked_and_padding_free(setup):
    cfg, tok, model, train_ds, _ = setup
    rows = [train_ds[i] for i in range(len(train_ds))]

    def reference(row):  # one example, no padding, full logits, plain shifted cross-entropy
        labels = torch.tensor(row["labels"])
        return torch.nn.functional.cross_entropy(full_logits(model, row)[:-1], labels[1:], reduction="sum")

    n_labels = sum(sum(1 for x in r["labels"][1:] if x != -100) for r in rows)
    expected = (sum(reference(r) for r in rows) / n_labels).item()
    fixed = trainer_for(setup)
    assert fixed.answer_width == 3  # Yes<|im_end|>\n: the fixed-size (sync-free) path
    masked = trainer_for(setup, answer_width=0)  # the boolean-mask path
    free = trainer_for(setup, padding_free=True, max_length=None)  # one flattened row
    for trainer in (fixed, masked, free):
        batch = trainer.data_collator([{k: r[k] for k in ("input_ids", "labels")} for r in rows])
        with torch.no_grad():
            got = trainer.compute_loss(model, dict(batch)).item()
        assert got == pytest.approx(expected, rel=1e-4), trainer.args.padding_free


def test_yes_no_loss_equals_bce_on_the_full_logits_margin(setup):
    cfg, tok, model, train_ds, _ = setup
    trainer = trainer_for(setup, answer_loss="yes_no")
    batch = trainer.data_collator([train_ds[i] for i in range(len(train_ds))])
    with torch.no_grad():
        got = trainer.compute_loss(model, dict(batch)).item()
    ref, _ = yes_no_reference(model, batch, trainer.yes_id, trainer.no_id)
    assert got == pytest.approx(ref, rel=1e-4)


def test_eval_step_returns_the_answer_logits_and_the_rows_users(setup):
    from recsft.trainer import make_compute_metrics

    cfg, tok, model, _, eval_ds = setup
    trainer = trainer_for(setup, eval_ds)
    loader = trainer.get_eval_dataloader()
    batch = next(iter(loader))
    assert batch["user_id"].tolist() == [0, 1, 0, 2, 1, 0][:len(batch["user_id"])]  # codes, first appearance
    loss, preds, labels = trainer.prediction_step(model, batch, prediction_loss_only=False)
    assert preds.shape[1] == labels.shape[1] == 1  # grouped by row: (rows, answers per row, ...)
    preds, labels = preds[:, 0], labels[:, 0]
    rows = [eval_ds[i] for i in range(len(batch["user_id"]))]
    for row, pred, label in zip(rows, preds, labels):
        first = next(t for t in range(len(row["labels"]) - 1) if row["labels"][t + 1] != -100)
        ref = full_logits(model, row)[first]
        assert int(pred[0]) == int(ref.argmax()) and int(label[0]) == row["labels"][first + 1]
        assert pred[1:].tolist() == pytest.approx([ref[trainer.yes_id].item(), ref[trainer.no_id].item()], abs=1e-4)
        assert int(label[1]) == row["user_id"]
    metrics = trainer.evaluate()
    assert metrics["eval_n"] == len(eval_ds) and "eval_uauc" in metrics and metrics["eval_uauc_users"] >= 0
    # rows without users (the single format's eval file): no UAUC, the other metrics unchanged
    compute = make_compute_metrics(tok)
    anonymous = labels.clone()
    anonymous[:, 1] = -1
    from transformers.trainer_utils import EvalPrediction

    with_users = compute(EvalPrediction(preds.numpy(), labels.numpy()))
    without = compute(EvalPrediction(preds.numpy(), anonymous.numpy()))
    assert "uauc" in with_users and "uauc" not in without
    assert {k: v for k, v in with_users.items() if "uauc" not in k} == without


def test_the_collator_keeps_extra_columns_per_row_and_per_token(setup):
    from recsft.trainer import RecDataCollator

    rows = [{"input_ids": [5, 6, 7], "labels": [-100, 6, 7], "user_id": 3},
            {"input_ids": [8, 9], "labels": [-100, 9], "user_id": 4}]
    padded = RecDataCollator(pad_token_id=0)(rows)
    assert padded["user_id"].tolist() == [3, 4] and padded["input_ids"].shape == (2, 3)
    free = RecDataCollator(pad_token_id=0, padding_free=True)(rows)
    assert free["user_id"].tolist() == [[3, 3, 3, 4, 4]] and free["input_ids"].shape == (1, 5)
    tokens = RecDataCollator(pad_token_id=0)([dict(r, block_ids=[1] * len(r["input_ids"]), answer_keys=["x"])
                                              for r in rows])
    assert tokens["block_ids"].tolist() == [[1, 1, 1], [1, 1, -1]]  # per-token columns padded like input_ids
    assert "answer_keys" not in tokens  # only the declared extra columns travel (the Trainer drops the others)
    cf = RecDataCollator(pad_token_id=0)([dict(r, cf=[0.5] * k) for r, k in zip(rows, (2, 1))])["cf"]
    assert cf[0].tolist() == [0.5, 0.5] and cf[1, 0] == 0.5 and cf[1, 1].isnan()  # per-answer floats: NaN-padded


def test_resume_continues_to_the_same_loss_and_counts(setup, tmp_path):
    from recsft.resume import ResumePlan

    cfg, tok, model, train_ds, _ = setup
    first_out, second_out = tmp_path / "a", tmp_path / "b"
    initial = {k: v.detach().clone() for k, v in model.named_parameters() if v.requires_grad}

    def run(out, checkpoint=None):
        with torch.no_grad():  # the same fresh adapter for both runs
            for k, v in model.named_parameters():
                if v.requires_grad:
                    v.copy_(initial[k])
        trainer = trainer_for(setup, output_dir=str(out), disable_tqdm=True)
        ResumePlan(checkpoint=checkpoint).train(trainer)
        return trainer

    full = run(first_out)
    saved = json.loads((first_out / "checkpoint-1" / "trainer_state.json").read_text())
    counters = saved["stateful_callbacks"]["TrainCounters"]
    assert counters["attributes"]["answers"] == 2 and counters["attributes"]["tokens"] > 0
    resumed = run(second_out, str(first_out / "checkpoint-1"))
    loss = {e["step"]: e["loss"] for e in full.state.log_history if "loss" in e}
    again = {e["step"]: e["loss"] for e in resumed.state.log_history if "loss" in e}
    assert again[2] == pytest.approx(loss[2], rel=1e-4, abs=1e-6)
    assert (resumed.train_tokens, resumed.train_answers) == (full.train_tokens, full.train_answers) == \
        (sum(len(r) for r in train_ds["input_ids"]), 4)


def test_resume_reads_older_checkpoints_counts_from_the_log(tmp_path):
    """A checkpoint written before the counters were saved: the counts continue from its last log line."""
    from types import SimpleNamespace as NS

    from recsft.callbacks import TrainCounters
    from recsft.resume import restore_progress

    ckpt = tmp_path / "checkpoint-4"
    ckpt.mkdir()
    (ckpt / "trainer_state.json").write_text(json.dumps({"global_step": 4, "log_history": [
        {"step": 2, "num_tokens": 100, "num_answers": 4}, {"step": 4, "num_tokens": 210, "num_answers": 8}]}))
    trainer = NS(counters=TrainCounters(), time_budget=None)
    restore_progress(trainer, str(ckpt))
    assert (trainer.counters.tokens, trainer.counters.answers) == (210, 8)


def test_every_train_key_reaches_the_trainer_arguments():
    """A TrainArgs field is passed to the trainer's arguments under its own (or its metadata's) name."""
    from recsft.config import TrainArgs, trainer_arguments
    from recsft.training import sft_config

    train = TrainArgs(output_dir="/tmp/x", report_to="none", lr_scheduler_type="constant_with_warmup",
                      weight_decay=0.1, loss_type="yes_no", max_train_minutes=5.0, budget_clock="cpu",
                      gradient_checkpointing=True, warmup_ratio=0.1, save_total_limit=None)
    args = sft_config(train, 256, "cpu", has_eval=True)
    passed = trainer_arguments(train)
    assert {"answer_loss", "activation_checkpointing", "warmup_steps"} <= set(passed)
    assert not {"loss_type", "gen_eval_samples", "early_stopping_patience"} & set(passed)
    assert {k: getattr(args, k) for k in passed} == passed


def test_optimizer_and_scheduler_names_are_checked_against_transformers():
    from recsft.config import ConfigError, TrainArgs
    from recsft.validate import check_trainer_choices

    check_trainer_choices(TrainArgs(lr_scheduler_type="cosine_with_min_lr", optim="adamw_torch_fused"))
    with pytest.raises(ConfigError, match="lr_scheduler_type: 'cosin' is not a Trainer learning-rate scheduler "
                                          r"\(did you mean 'cosine'\?\)"):
        check_trainer_choices(TrainArgs(lr_scheduler_type="cosin"))
    with pytest.raises(ConfigError, match=r"optim: 'adamw_torhc' .* \(did you mean 'adamw_torch'\?\)"):
        check_trainer_choices(TrainArgs(optim="adamw_torhc"))
