"""Training on the tiny random Qwen3 (real tokenizer): resume, early stopping, best model, eval metrics."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

import finetune_lora
from conftest import tiny_config

pytestmark = pytest.mark.slow  # every test here trains or runs the tiny model


def losses(output_dir: str) -> dict[int, float]:
    state = json.loads((Path(output_dir) / "checkpoint-8" / "trainer_state.json").read_text())
    return {e["step"]: e["loss"] for e in state["log_history"] if "loss" in e}


def adapter_weights(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(folder / "adapter_model.safetensors"))


def test_resume_continues_to_the_same_losses(tmp_path, tiny_qwen3, capsys):
    full = tiny_config(tmp_path / "a", tiny_qwen3)
    summary = finetune_lora.main(full)
    assert summary["global_step"] == 8 and Path(full.train.output_dir, "logs").exists() is False
    # a run stopped after step 4 leaves checkpoint-4: resume a copy of it in a fresh output_dir
    resumed = tiny_config(tmp_path / "b", tiny_qwen3)
    Path(resumed.train.output_dir).mkdir(parents=True)
    shutil.copytree(Path(full.train.output_dir) / "checkpoint-4", Path(resumed.train.output_dir) / "checkpoint-4")
    finetune_lora.main(resumed, resume=True)
    out = capsys.readouterr().out
    assert "RESUMING TRAINING FROM CHECKPOINT" in out and "Last completed step: 4" in out
    assert "Next step will be: 5" in out
    a, b = losses(full.train.output_dir), losses(resumed.train.output_dir)
    assert sorted(k for k in b if k > 4) == [5, 6, 7, 8]
    for step in (5, 6, 7, 8):
        assert b[step] == pytest.approx(a[step], rel=1e-4, abs=1e-5), step
    wa, wb = adapter_weights(Path(full.train.output_dir)), adapter_weights(Path(resumed.train.output_dir))
    assert all(torch.allclose(wa[k], wb[k], atol=1e-5) for k in wa)


def test_extra_epochs_and_explicit_checkpoint(tmp_path, tiny_qwen3, capsys):
    cfg = tiny_config(tmp_path, tiny_qwen3, max_steps=-1, num_train_epochs=1, eval_strategy="epoch",
                      save_strategy="epoch")
    first = finetune_lora.main(cfg)
    steps_per_epoch = first["global_step"]
    ckpt = str(Path(cfg.train.output_dir) / f"checkpoint-{steps_per_epoch}")
    more = finetune_lora.main(cfg, resume_from_checkpoint=ckpt, extra_epochs=1)
    assert more["global_step"] == 2 * steps_per_epoch and more["epoch"] == pytest.approx(2.0)
    assert f"Last completed step: {steps_per_epoch}" in capsys.readouterr().out


def test_resume_without_checkpoint_starts_fresh(tmp_path, tiny_qwen3, capsys):
    cfg = tiny_config(tmp_path, tiny_qwen3, max_steps=2, eval_steps=2, save_steps=2)
    assert finetune_lora.main(cfg, resume=True)["global_step"] == 2
    assert "No checkpoint found" in capsys.readouterr().out


def test_early_stopping_and_best_model_by_f1(tmp_path, tiny_qwen3):
    cfg = tiny_config(tmp_path, tiny_qwen3, max_steps=30, eval_steps=1, save_steps=1, early_stopping_patience=2,
                      learning_rate=1e-5, report_to="tensorboard", gen_eval_samples=4)
    summary = finetune_lora.main(cfg)
    out = Path(cfg.train.output_dir)
    assert summary["global_step"] < 30, "early stopping did not trigger"
    best = Path(summary["best_checkpoint"])
    assert summary["best_metric"] == summary["best_eval"]["eval_f1"]
    wb, wf = adapter_weights(best), adapter_weights(out)
    assert all(torch.equal(wb[k], wf[k]) for k in wb), "final adapter is not the best checkpoint"
    assert list((out / "logs").glob("events.out.tfevents*")) and (out / "training_curves.png").is_file()
    saved = json.loads((out / "training_summary.json").read_text())
    assert saved["tokens_per_s"] > 0 and saved["gen_eval"]["n"] == 4


def test_eval_metrics_match_an_independent_forward(tmp_path, tiny_qwen3):
    """The answer-position metrics equal a plain full-logits forward decoded by the shared extractor."""
    from recsft import training as T
    from recsft.inference import answer_token_ids, prompts_for
    from recsft.modeling import model_for, tokenizer_for
    from recsft.preprocess import datasets_for, resolve_data
    from recsft.io import load_data
    from recsft.metrics import compute_metrics, extract_answer

    # float32: the reference below reads the model's own logits (dtype auto is bf16 on a CPU with native bf16,
    # where bf16 logits tie and the trainer's float32 Yes/No re-projection would rightly differ)
    cfg = tiny_config(tmp_path, tiny_qwen3, max_steps=1, dtype="float32")
    train_path, eval_path = resolve_data(cfg.data)
    tok = tokenizer_for(cfg.model)
    train_ds, eval_ds = datasets_for(cfg.data, False, tok, train_path, eval_path, False, cpu=True)
    model, device = model_for(cfg.model, cfg.lora, False)
    trainer, _ = T.build_trainer(model, tok, train_ds, eval_ds, cfg, device)
    metrics = trainer.evaluate()
    records = load_data(eval_path)
    prompts, labels = prompts_for(records, tok)
    yes, no = answer_token_ids(tok)
    preds, p_yes = [], []
    with torch.no_grad():
        for prompt in prompts:
            ids = tok(prompt, return_tensors="pt", add_special_tokens=False)["input_ids"]
            logits = model(input_ids=ids).logits[0, -1]
            preds.append(extract_answer(tok.decode([int(logits.argmax())])))
            p_yes.append(float(torch.softmax(logits[[yes, no]], -1)[0]))
    ref = compute_metrics(labels, preds, p_yes)
    for key in ("accuracy", "f1", "auc", "unparseable"):
        assert metrics[f"eval_{key}"] == pytest.approx(ref[key], abs=1e-6), key


def test_packing_and_gradient_checkpointing_knobs_train(tmp_path, tiny_qwen3):
    cfg = tiny_config(tmp_path, tiny_qwen3, max_steps=2, eval_steps=2, save_steps=2, packing="true",
                      gradient_checkpointing="true", flash_attn="sdpa", lora_target="qv", lora_rank=4)
    summary = finetune_lora.main(cfg)
    assert summary["global_step"] == 2 and summary["config"]["packing"] is True
    assert summary["final_eval"]["eval_n"] == 16 and 0 < summary["train_loss"] < 20
    adapter = json.loads((Path(cfg.train.output_dir) / "adapter_config.json").read_text())
    assert sorted(adapter["target_modules"]) == ["q_proj", "v_proj"] and adapter["r"] == 4


def test_time_budget_stops_with_eval_and_checkpoint(tmp_path, tiny_qwen3):
    cfg = tiny_config(tmp_path, tiny_qwen3, max_steps=50, max_train_minutes=1e-6, budget_clock="cpu",
                      load_best_model_at_end="false")
    summary = finetune_lora.main(cfg)
    assert summary["global_step"] == 1  # the first step already spends the tiny budget
    assert summary["budget_minutes_used"] > 0 and summary["budget_clock"] == "cpu"
    # single-question data: one answer per example; the data's format is recorded for result tables
    assert summary["train_labels_seen"] == summary["train_examples_seen"]
    assert summary["data_stats"].get("format", "single") == "single"
    assert summary["final_eval"].get("eval_auc") is not None  # the stop evaluated
    assert Path(cfg.train.output_dir, "checkpoint-1").is_dir()  # ... and saved


def test_time_budget_survives_resume(tmp_path, tiny_qwen3):
    """A resumed run counts the training time its checkpoint already used against the budget."""
    first = tiny_config(tmp_path / "a", tiny_qwen3, max_steps=2, save_steps=1, eval_steps=1,
                        max_train_minutes=1000, budget_clock="cpu", load_best_model_at_end="false")
    used = finetune_lora.main(first)["budget_minutes_used"]
    state = json.loads(Path(first.train.output_dir, "checkpoint-2", "trainer_state.json").read_text())
    saved = state["stateful_callbacks"]["TimeBudgetCallback"]
    saved = saved[0] if isinstance(saved, list) else saved
    assert saved["attributes"]["used_s"] == pytest.approx(used * 60) and used > 0
    # the same budget, already spent: the resumed run stops after its first step, not at max_steps
    resumed = tiny_config(tmp_path / "b", tiny_qwen3, max_steps=6, save_steps=1, eval_steps=1,
                          max_train_minutes=used, budget_clock="cpu", load_best_model_at_end="false")
    Path(resumed.train.output_dir).mkdir(parents=True)
    shutil.copytree(Path(first.train.output_dir) / "checkpoint-2", Path(resumed.train.output_dir) / "checkpoint-2")
    summary = finetune_lora.main(resumed, resume=True)
    assert summary["global_step"] == 3 and summary["budget_minutes_used"] > used
    # token and answer counts continue from the checkpoint's log instead of restarting at zero
    first_summary = json.loads(Path(first.train.output_dir, "training_summary.json").read_text())
    assert summary["train_tokens"] > first_summary["train_tokens"]
    assert summary["train_labels_seen"] > first_summary["train_labels_seen"]
