"""Exact answer scores: float32 Yes/No logits on a bf16 model, greedy's tie rule, one prompt budget, thresholds."""

from __future__ import annotations

import math
import random
from pathlib import Path

import pytest

from conftest import build_tiny_qwen3, tiny_config, write_data


# ------------------------------------------------------------------------------ one prompt budget
@pytest.mark.parametrize("cutoff", [16, 64, 256, 1024])
def test_inference_prompt_ids_equal_training_prompt_ids(qwen3_tokenizer, tmp_path, cutoff):
    from recsft.inference import _encode, _left_padding, prompts_for
    from recsft.io import load_data
    from recsft.preprocess import prompt_budget, tokenize_func, tokenize_records

    tok = qwen3_tokenizer
    records = load_data(write_data(tmp_path, n_train=6, n_eval=1)[0])
    records += [{**records[0], "input": records[0]["input"] * 12, "output": "No"}]  # > 1024 tokens
    cols = tokenize_records(records, tok, cutoff)
    trained = [[i for i, lab in zip(ids, labels) if lab == -100] for ids, labels in zip(cols["input_ids"], cols["labels"])]
    assert trained[0] == [i for i, lab in zip(*(tokenize_func(records[0], tok, cutoff)[k] for k in ("input_ids", "labels")))
                          if lab == -100]
    prompts, _ = prompts_for(records, tok)
    with _left_padding(tok):
        enc = _encode(tok, prompts, "cpu", prompt_budget(tok, cutoff))
    served = [ids[mask.bool()].tolist() for ids, mask in zip(enc["input_ids"], enc["attention_mask"])]
    assert served == trained
    assert max(len(ids) for ids in cols["input_ids"]) == cutoff  # the long record fills cutoff_len exactly


# ------------------------------------------------------------------------------ thresholds
def accuracy_at(t, y, p):
    return sum((pi >= t) == yi for yi, pi in zip(y, p)) / len(y)


def test_best_threshold_can_say_all_no_above_a_score_of_one():
    from recsft.metrics import best_threshold

    y, p = [False, False, True], [1.0, 1.0, 0.3]
    t = best_threshold(y, p)
    assert t > 1.0 and accuracy_at(t, y, p) == pytest.approx(2 / 3)
    lo = 0.5
    hi = math.nextafter(lo, 1.0)  # adjacent floats: the threshold must still separate them
    t = best_threshold([False, True], [lo, hi])
    assert lo < t <= hi


def test_best_threshold_reaches_the_best_accuracy_of_any_cut():
    from recsft.metrics import best_threshold

    rng = random.Random(0)
    for _ in range(200):
        n = rng.randint(1, 12)
        p = [rng.choice([0.0, 0.25, 0.5, 0.75, 1.0, rng.random()]) for _ in range(n)]
        y = [rng.random() < 0.5 for _ in range(n)]
        best = max(accuracy_at(t, y, p) for t in [*p, math.inf])
        assert accuracy_at(best_threshold(y, p), y, p) == pytest.approx(best), (y, p)


# ------------------------------------------------------------------------------ float32 scores, tie rule
def near_tie_model(path: Path, tokenizer) -> str:
    """A tiny Qwen3 whose Yes and No logits are both ≈ 28 and differ by a few tenths across prompts: in bf16
    (step 0.125 there) P(Yes) collapses to a few values and some prompts tie exactly. Every other logit is 0."""
    import torch
    from transformers import AutoModelForCausalLM

    from recsft.inference import answer_token_ids, prompts_for
    from recsft.io import load_data

    src = build_tiny_qwen3(path / "base", tokenizer, yes_no_head=True)
    model = AutoModelForCausalLM.from_pretrained(src).eval()
    prompts, _ = prompts_for(load_data(write_data(path / "probe", n_train=16, n_eval=1)[0]), tokenizer)
    with torch.no_grad():
        hidden = torch.cat([model.model(**tokenizer(p, return_tensors="pt", add_special_tokens=False))
                            .last_hidden_state[:, -1] for p in prompts])
    u = hidden.mean(0) / hidden.mean(0).norm()  # the shared direction of the last hidden state
    r = torch.randn(u.numel(), generator=torch.Generator().manual_seed(0))
    r -= (r @ u) * u  # what varies between prompts
    yes, no = answer_token_ids(tokenizer)
    with torch.no_grad():
        model.lm_head.weight.zero_()
        model.lm_head.weight[yes], model.lm_head.weight[no] = 5 * u + 0.5 * r, 5 * u - 0.5 * r
    model.save_pretrained(path / "near_tie")
    tokenizer.save_pretrained(path / "near_tie")
    return str(path / "near_tie")


@pytest.fixture(scope="module")
def near_tie(tmp_path_factory, qwen3_tokenizer):
    tmp = tmp_path_factory.mktemp("near_tie")
    from recsft.inference import prompts_for
    from recsft.io import load_data

    model = near_tie_model(tmp, qwen3_tokenizer)
    train, evals = write_data(tmp / "data")
    prompts, _ = prompts_for(load_data(train) + load_data(evals), qwen3_tokenizer)
    return model, prompts


@pytest.mark.slow
def test_bf16_scores_are_as_fine_as_float32_and_decide_like_greedy_generation(near_tie, qwen3_tokenizer):
    import torch

    from recsft.inference import answer_token_ids, generate, score
    from recsft.modeling import load_model

    path, prompts = near_tie
    tok = qwen3_tokenizer
    yes, no = answer_token_ids(tok)
    distinct = {}
    for dtype in ("float32", "bfloat16"):
        model = load_model(path, "cpu", dtype, "sdpa")
        seen = []  # the model's own logits at the answer position
        hook = model.lm_head.register_forward_hook(lambda m, a, out: seen.append(out[:, -1, [yes, no]].float()))
        rows = score(model, tok, prompts, batch_size=16, progress=False)
        hook.remove()
        own = torch.cat(seen)
        distinct[dtype] = len({r["p_yes"] for r in rows})
        greedy = [g.strip() for g in generate(model, tok, prompts, 1, 0.0, 1.0, 16, progress=False)]
        assert set(greedy) <= {"Yes", "No"}
        assert [r["answer"] for r in rows] == greedy, dtype  # exact ties included
        if dtype == "bfloat16":
            ties = int((own[:, 0] == own[:, 1]).sum())
            assert ties > 0, "the bf16 model should produce exact ties (else this test checks nothing)"
            assert len(set(torch.softmax(own, -1)[:, 0].tolist())) < len(prompts) // 2  # bf16 P(Yes): coarse
            tie_answer = "Yes" if yes < no else "No"
            assert all(r["answer"] == tie_answer for r, o in zip(rows, own) if o[0] == o[1])
    assert distinct["bfloat16"] == distinct["float32"] == len(prompts)


@pytest.mark.slow
def test_training_eval_scores_are_float32_on_a_bf16_model(near_tie, tmp_path):
    import numpy as np
    import torch

    from recsft import training as T
    from recsft.modeling import model_for, tokenizer_for
    from recsft.preprocess import datasets_for, resolve_data

    path, _ = near_tie
    cfg = tiny_config(tmp_path, path, dtype="bfloat16", max_steps=1, max_eval_samples=16)
    train_path, eval_path = resolve_data(cfg.data)
    tok = tokenizer_for(cfg.model)
    train_ds, eval_ds = datasets_for(cfg.data, False, tok, train_path, eval_path, False, cpu=True)
    model, device = model_for(cfg.model, cfg.lora, False)
    assert next(model.parameters()).dtype == torch.bfloat16
    trainer, _ = T.build_trainer(model, tok, train_ds, eval_ds, cfg, device)
    preds = np.asarray(trainer.predict(eval_ds).predictions).reshape(-1, 3)
    gap = preds[:, 1] - preds[:, 2]
    assert len(preds) == 16 and len(set(gap.tolist())) == 16  # bf16 logits would give a few values
    assert np.all(np.abs(preds[:, 1] - 28) < 3)
