"""Unit tests of the shared utilities on the real Qwen3 tokenizer (offline asset)."""

from __future__ import annotations

import json

import pytest

import utils
from recsft import config as C
from recsft.formatting import DEFAULT_SYSTEM_PROMPT, INSTRUCTION, build_input_text, chat_texts
from recsft.preprocess import tokenize_records

TITLES = ["Toy Story (1995)", "Heat (1995)", "Fargo (1996)"]
RATINGS = [5.0, 3.0, 4.0]


def train_record(label="Yes", system=None):
    rec = {"instruction": INSTRUCTION, "input": build_input_text(TITLES, RATINGS, "Scream (1996)"), "output": label}
    if system:
        rec["system"] = system
    return rec


def make_test_record(label="No"):
    return {"user_id": 7, "history_titles": TITLES, "history_ratings": RATINGS, "candidate_title": "Scream (1996)",
            "candidate_movie_id": 288, "label": label}


# ------------------------------------------------------------------------------------ formatting
def test_both_formats_render_the_same_prompt():
    a, b = utils.format_prompt(train_record()), utils.format_prompt(make_test_record())
    assert a["user"] == b["user"] and a["system"] == b["system"] == DEFAULT_SYSTEM_PROMPT
    assert (a["answer"], b["answer"]) == ("Yes", "No")
    assert "1. Toy Story (1995) (rating ≈ 5.0)" in a["user"] and "Candidate movie: Scream (1996)" in a["user"]


def test_to_chat_messages_roles_and_system_override():
    msgs = utils.to_chat_messages(train_record(system="custom"))
    assert [m["role"] for m in msgs] == ["system", "user", "assistant"] and msgs[0]["content"] == "custom"
    assert utils.to_chat_messages(train_record(system="custom"), system_prompt="forced")[0]["content"] == "forced"
    assert len(utils.to_chat_messages(make_test_record(), include_answer=False)) == 2


@pytest.mark.parametrize("label", ["maybe", "", 3])
def test_bad_label_names_the_key(label):
    with pytest.raises(utils.DataError, match="output"):
        utils.format_prompt(train_record(label=label))


# ------------------------------------------------------------------------------------ tokenization
def test_labels_mask_every_prompt_token(qwen3_tokenizer):
    tok = qwen3_tokenizer
    out = utils.tokenize_func(train_record("No"), tok, cutoff_len=1024)
    prompt, answer = chat_texts(tok, DEFAULT_SYSTEM_PROMPT, utils.format_prompt(train_record())["user"], "No")
    n_prompt = len(tok(prompt, add_special_tokens=False)["input_ids"])
    assert out["labels"][:n_prompt] == [-100] * n_prompt
    trained = [i for i, lab in zip(out["input_ids"], out["labels"]) if lab != -100]
    assert tok.decode(trained) == "No<|im_end|>\n" == answer
    assert tok.eos_token_id in trained and len(out["attention_mask"]) == len(out["input_ids"])


def test_thinking_disabled_template_matches_inference_prompt(qwen3_tokenizer):
    tok = qwen3_tokenizer
    msgs = utils.to_chat_messages(train_record())
    prompt, _ = chat_texts(tok, msgs[0]["content"], msgs[1]["content"], "Yes")
    assert prompt.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    full = tok.apply_chat_template(msgs, tokenize=False, enable_thinking=False)
    assert full == prompt + "Yes<|im_end|>\n"


@pytest.mark.parametrize("cutoff", [16, 40, 100])
def test_left_truncation_keeps_the_answer(qwen3_tokenizer, cutoff):
    tok = qwen3_tokenizer
    full = utils.tokenize_func(train_record("Yes"), tok, cutoff_len=4096)
    out = utils.tokenize_func(train_record("Yes"), tok, cutoff_len=cutoff)
    assert len(out["input_ids"]) == cutoff
    assert out["input_ids"] == full["input_ids"][-cutoff:]  # cut from the left only
    trained = [i for i, lab in zip(out["input_ids"], out["labels"]) if lab != -100]
    assert tok.decode(trained).startswith("Yes<|im_end|>")


def test_cutoff_too_small_for_the_answer_is_a_clear_error(qwen3_tokenizer):
    with pytest.raises(utils.DataError, match="cutoff_len=3 cannot hold the answer"):
        utils.tokenize_func(train_record(), qwen3_tokenizer, cutoff_len=3)


def test_batched_fast_path_equals_reference(qwen3_tokenizer):
    records = [train_record("Yes"), make_test_record("No"), train_record("No", system="Another system prompt."),
               make_test_record("Yes")] * 5
    cols = tokenize_records(records, qwen3_tokenizer, cutoff_len=120)
    for i, rec in enumerate(records):
        ref = utils.tokenize_func(rec, qwen3_tokenizer, cutoff_len=120)
        assert cols["input_ids"][i] == ref["input_ids"] and cols["labels"][i] == ref["labels"]


def test_cache_reused_when_valid_and_rebuilt_when_settings_change(qwen3_tokenizer, tmp_path, caplog):
    data = tmp_path / "train.json"
    data.write_text(json.dumps([train_record("Yes"), train_record("No")] * 4))
    kw = dict(cache_dir=str(tmp_path / "cache"))
    a, _ = utils.load_tokenized_datasets(str(data), None, qwen3_tokenizer, 1024, **kw)
    with caplog.at_level("INFO"):
        b, _ = utils.load_tokenized_datasets(str(data), None, qwen3_tokenizer, 1024, **kw)
    assert "from cache" in caplog.text and b["input_ids"] == a["input_ids"]
    c, _ = utils.load_tokenized_datasets(str(data), None, qwen3_tokenizer, 40, **kw)  # new cutoff_len
    assert max(len(x) for x in c["input_ids"]) == 40
    data.write_text(json.dumps([train_record("No")] * 3))  # data file changed
    d, _ = utils.load_tokenized_datasets(str(data), None, qwen3_tokenizer, 1024, **kw)
    assert len(d) == 3
    assert len(list((tmp_path / "cache").glob("train_preprocessed-*"))) == 3


# ------------------------------------------------------------------------------------ answers & metrics
@pytest.mark.parametrize("text,expected", [
    ("Yes", "Yes"), ("No<|im_end|>", "No"), (" yes.", "Yes"), ("no, the user dislikes it", "No"),
    ("<think>\nThe user likes dramas, so yes... but no\n</think>\n\nNo", "No"),
    ("<think>\n\n</think>\n\nYes<|im_end|>", "Yes"), ("<think>still thinking yes", None),
    ("assistant\nYes", "Yes"), ("I think they will, yes", "Yes"), ("I don't know", None), ("", None),
    ("Yes or no? Hard to say", "Yes"), ("Hard to say: yes or no", None), ("Notably good", None),
])
def test_extract_answer(text, expected):
    assert utils.extract_answer(text) == expected


def test_compute_metrics_counts_unparseable_as_wrong():
    m = utils.compute_metrics(["Yes", "Yes", "No", "No", "Yes"], ["Yes", None, "No", "Yes", "No"])
    assert m["accuracy"] == pytest.approx(2 / 5) and m["unparseable"] == 1 and m["n"] == 5
    assert m["precision"] == pytest.approx(1 / 2) and m["recall"] == pytest.approx(1 / 3)
    assert m["f1"] == pytest.approx(2 * (1 / 2) * (1 / 3) / (1 / 2 + 1 / 3))


def test_compute_metrics_with_scores_and_degenerate_cases():
    m = utils.compute_metrics([1, 0, 1, 0], [1, 0, 0, 0], p_yes=[0.9, 0.2, 0.4, 0.3])
    assert m["accuracy"] == 0.75 and m["auc"] == pytest.approx(1.0) and m["log_loss"] > 0
    assert utils.compute_metrics(["No"], [None])["f1"] == 0.0
    with pytest.raises(ValueError, match="not Yes/No"):
        utils.compute_metrics(["maybe"], ["Yes"])


def test_best_threshold_maximises_accuracy():
    from recsft.metrics import best_threshold

    t = best_threshold([True, True, False, False], [0.9, 0.8, 0.7, 0.1])
    assert 0.7 < t < 0.8


# ------------------------------------------------------------------------------------ config
def test_unknown_key_lists_valid_keys_and_suggests(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("lora_rnak: 8\ncutoff_len: abc\nlearning_rate: -1\n")
    with pytest.raises(C.ConfigError) as e:
        C.load_config(cfg)
    msg = str(e.value)
    assert "did you mean 'lora_rank'" in msg and "Valid keys:" in msg and "cutoff_len: expected an integer" in msg
    assert "learning_rate: must be > 0" in msg and "3 config problem(s)" in msg


def test_overrides_are_typed_and_shipped_configs_load():
    cfg = C.load_config("configs/qwen3_movielens_qlora.yaml", ["cutoff_len=512", "packing=true", "max_samples=null"])
    assert cfg.data.cutoff_len == 512 and cfg.train.packing is True and cfg.data.max_samples is None
    assert cfg.model.model_name_or_path == utils.BASE_MODEL and cfg.lora.lora_rank == 16
    assert C.load_config("configs/qwen3_7b_movielens_qlora.yaml").model.model_name_or_path == "Qwen/Qwen3-8B"
    assert C.load_config("configs/smollm2_movielens_lora.yaml").model.quantization_bit is None


def test_yaml_syntax_error_names_the_line(tmp_path):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("cutoff_len: 512\nlora_rank: [1,\n")
    with pytest.raises(C.ConfigError, match=r"line \d+"):
        C.load_config(cfg)


# ------------------------------------------------------------------------------------ data loading
def test_load_data_json_and_jsonl(tmp_path):
    (tmp_path / "a.json").write_text(json.dumps([train_record()]))
    (tmp_path / "b.jsonl").write_text(json.dumps(make_test_record()) + "\n\n" + json.dumps(make_test_record()) + "\n")
    assert len(utils.load_data(tmp_path / "a.json")) == 1 and len(utils.load_data(tmp_path / "b.jsonl")) == 2
    (tmp_path / "c.jsonl").write_text(json.dumps(make_test_record()) + "\n{oops\n")
    with pytest.raises(utils.DataError, match=r"c.jsonl:2"):
        utils.load_data(tmp_path / "c.jsonl")


def test_dataset_names_resolve_through_dataset_info():
    assert utils.resolve_dataset("movielens_train", ".") == "data/movielens_qwen3/train.json"
    with pytest.raises(utils.DataError, match="known names"):
        utils.resolve_dataset("nope", ".")


@pytest.mark.parametrize("cuda,mps,expected", [(True, True, "cuda"), (False, True, "mps"), (False, False, "cpu")])
def test_get_device_prefers_cuda_then_mps_then_cpu(monkeypatch, cuda, mps, expected):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: mps)
    assert utils.get_device() == expected


def test_paired_user_bootstrap_brackets_the_difference_and_is_zero_for_a_copy():
    import numpy as np

    from recsft.metrics import paired_user_bootstrap, uauc
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(0)
    users = np.repeat(np.arange(60), 10)
    y = rng.random(600) < 0.5
    good = y + rng.normal(0, 0.8, 600)
    weak = y + rng.normal(0, 2.0, 600)
    r = paired_user_bootstrap(y, good, weak, users, n_resamples=100)
    assert r["delta_auc"] == pytest.approx(roc_auc_score(y, good) - roc_auc_score(y, weak))
    assert r["delta_uauc"] == pytest.approx(uauc(y, good, users) - uauc(y, weak, users))
    assert 0 < r["delta_auc_low"] < r["delta_auc"] < r["delta_auc_high"] and r["delta_uauc_low"] > 0
    same = paired_user_bootstrap(y, good, good, users, n_resamples=30)
    assert same["delta_auc_low"] == same["delta_auc_high"] == 0.0


def test_paired_user_mean_bootstrap_weights_questions_and_keeps_users_together():
    import numpy as np

    from recsft.metrics import paired_user_mean_bootstrap

    rng = np.random.default_rng(0)
    users = np.repeat(np.arange(50), rng.integers(1, 8, 50))  # users with 1..7 questions
    ref = rng.random(len(users))
    better = ref + 0.1 + rng.normal(0, 0.05, len(users))
    r = paired_user_mean_bootstrap(better, ref, users, n_resamples=200)
    assert r["delta"] == pytest.approx(np.mean(better - ref))  # a mean over questions, not over users
    assert 0 < r["delta_low"] < r["delta"] < r["delta_high"] and r["users"] == 50
    same = paired_user_mean_bootstrap(ref, ref, users, n_resamples=100)
    assert same["delta_low"] == same["delta_high"] == 0.0
