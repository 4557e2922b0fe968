"""The training step keeps its logged counters on the device: the logged numbers are those of the reference path."""

from __future__ import annotations

import pytest

from conftest import tiny_config

pytestmark = pytest.mark.slow  # trains the tiny model

TIMING = ("runtime", "per_second", "_time")


def train_and_log(cfg, answer_width: int | None) -> tuple[list[dict], object]:
    from recsft import training as T
    from recsft.modeling import model_for, tokenizer_for
    from recsft.preprocess import datasets_for, resolve_data

    train_path, _ = resolve_data(cfg.data)
    tok = tokenizer_for(cfg.model)
    train_ds, _ = datasets_for(cfg.data, False, tok, train_path, None, False, cpu=True)
    model, device = model_for(cfg.model, cfg.lora, False)
    extra = {} if answer_width is None else {"answer_width": answer_width}
    trainer, _ = T.build_trainer(model, tok, train_ds, None, cfg, device, **extra)
    trainer.train()
    hist = [{k: v for k, v in e.items() if not any(t in k for t in TIMING)} for e in trainer.state.log_history]
    return hist, trainer


def test_sync_free_label_positions_log_the_same_numbers_as_the_boolean_mask(tmp_path, tiny_qwen3):
    from recsft.io import load_data
    from recsft.preprocess import tokenize_records
    from recsft.modeling import tokenizer_for

    cfg = tiny_config(tmp_path, tiny_qwen3, max_steps=6, logging_steps=2, eval_strategy="no", save_strategy="no",
                      load_best_model_at_end="false")
    fast, trainer = train_and_log(cfg, None)
    assert trainer.answer_width == 3  # Yes<|im_end|>\n: the sort path ran
    mask, _ = train_and_log(cfg, 0)  # the boolean-mask path
    assert fast == mask
    logged = [e for e in fast if "loss" in e]
    assert [e["step"] for e in logged] == [1, 2, 4, 6] and all(0 <= e["mean_token_accuracy"] <= 1 for e in logged)
    # 6 steps x batch 4 x accumulation 2 = the 48 training examples once: every one of their tokens counted
    cols = tokenize_records(load_data(cfg.data.dataset), tokenizer_for(cfg.model), cfg.data.cutoff_len)
    assert logged[-1]["num_tokens"] == trainer.train_tokens == sum(len(i) for i in cols["input_ids"])
