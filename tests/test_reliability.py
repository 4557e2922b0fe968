"""Bad input fails at start with file/line/key and the fix, nothing half-written; SIGTERM checkpoints; caches heal."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest

import finetune_lora
from recsft import modeling
from recsft.config import ConfigError, load_config
from recsft.io import DataError
from conftest import tiny_config, write_config_yaml, write_data


@pytest.fixture
def no_model_load(monkeypatch):
    """Any attempt to load the model fails the test: input errors must surface before that."""
    def boom(*a, **k):
        raise AssertionError("the model was loaded before the bad input was detected")
    monkeypatch.setattr(modeling, "load_model", boom)


def bad_train_file(tmp_path: Path, name: str, content: bytes | str) -> str:
    path = tmp_path / name
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    return str(path)


GOOD = {"instruction": "Predict.", "input": "User's last 1 watched movies:\n1. A (1995) (rating ≈ 4.0)",
        "output": "Yes"}
CASES = {
    "malformed_jsonl_line": ("train.jsonl", json.dumps(GOOD) + "\n{\"instruction\": oops\n", r"train.jsonl:2: invalid JSON"),
    "malformed_json": ("train.json", '[{"instruction": "x",\n "input": }]', r"train.json:2:\d+: invalid JSON"),
    "missing_field": ("train.json", json.dumps([GOOD, {"instruction": "x", "output": "No"}]),
                      r"record 2: training record: missing or non-string field\(s\) \['input'\]"),
    "empty_file": ("train.json", "  \n", "file is empty"),
    "label_not_yes_no": ("train.json", json.dumps([GOOD, {**GOOD, "output": "Maybe"}]),
                         r"record 2: output: 'Maybe' is not a Yes/No label"),
    "non_utf8": ("train.json", "[{\"instruction\": \"caf\xe9\"}]".encode("latin-1"), r"train.json:1: not valid UTF-8"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_training_data_fails_before_the_model_and_writes_nothing(case, tmp_path, tiny_qwen3, no_model_load):
    name, content, message = CASES[case]
    cfg = tiny_config(tmp_path, tiny_qwen3, dataset=bad_train_file(tmp_path, name, content))
    with pytest.raises(DataError, match=message):
        finetune_lora.main(cfg)
    assert not Path(cfg.train.output_dir).exists()
    cache = Path(cfg.data.preprocessing_cache_dir)
    assert not cache.exists() or not any(cache.iterdir())


def test_bad_eval_data_also_fails_before_the_model(tmp_path, tiny_qwen3, no_model_load):
    bad = bad_train_file(tmp_path, "eval.json", json.dumps([{**GOOD, "output": "perhaps"}]))
    cfg = tiny_config(tmp_path, tiny_qwen3, eval_dataset=bad)
    with pytest.raises(DataError, match="eval.json: record 1: output: 'perhaps'"):
        finetune_lora.main(cfg)


def test_cutoff_len_too_small_for_the_answer(tmp_path, tiny_qwen3, no_model_load):
    cfg = tiny_config(tmp_path, tiny_qwen3, cutoff_len=16)
    cfg.data.cutoff_len = 2  # below the config's own floor, as a direct API caller could do
    with pytest.raises(DataError, match="cutoff_len=2 cannot hold the answer"):
        finetune_lora.main(cfg)


def test_missing_data_path(tmp_path, tiny_qwen3, no_model_load):
    cfg = tiny_config(tmp_path, tiny_qwen3, dataset=str(tmp_path / "nope.json"))
    with pytest.raises(DataError, match="nope.json: data file does not exist; run `python scripts/prepare_data.py`"):
        finetune_lora.main(cfg)


@pytest.mark.slow
def test_config_errors_are_collected_and_cli_exits_2(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("cutof_len: 512\nlora_rank: sixteen\nnum_train_epochs: 1\n")
    with pytest.raises(ConfigError) as e:
        load_config(cfg)
    assert "did you mean 'cutoff_len'" in str(e.value) and "lora_rank: expected an integer, got 'sixteen'" in str(e.value)
    r = subprocess.run([sys.executable, "scripts/finetune_lora.py", "--config", str(cfg)], capture_output=True, text=True)
    assert r.returncode == 2 and "2 config problem(s)" in r.stderr and "Traceback" not in r.stderr


def test_corrupt_or_partial_cache_is_rebuilt(tmp_path, qwen3_tokenizer, caplog):
    from recsft.preprocess import load_tokenized_datasets

    train, _ = write_data(tmp_path / "d")
    kw = dict(cache_dir=str(tmp_path / "cache"))
    first, _ = load_tokenized_datasets(train, None, qwen3_tokenizer, 160, **kw)
    first = first.to_dict()  # copy out of the memory-mapped file before corrupting it
    cache = next((tmp_path / "cache").glob("train_preprocessed-*"))
    for arrow in cache.glob("*.arrow"):
        arrow.write_bytes(arrow.read_bytes()[: arrow.stat().st_size // 2])  # a killed writer
    with caplog.at_level("WARNING"):
        again, _ = load_tokenized_datasets(train, None, qwen3_tokenizer, 160, **kw)
    assert "corrupt or partial" in caplog.text and again["input_ids"] == first["input_ids"]
    (cache / "recsft_cache.json").unlink()  # partial: never finished
    third, _ = load_tokenized_datasets(train, None, qwen3_tokenizer, 160, **kw)
    assert third["labels"] == first["labels"] and (cache / "recsft_cache.json").is_file()


def test_incomplete_checkpoint_is_skipped_by_resume(tmp_path):
    from recsft.resume import latest_checkpoint

    (tmp_path / "checkpoint-4").mkdir()
    (tmp_path / "checkpoint-4" / "trainer_state.json").write_text('{"global_step": 4}')
    (tmp_path / "checkpoint-4" / "adapter_model.safetensors").write_bytes(b"weights")
    (tmp_path / "checkpoint-8").mkdir()  # killed while saving: no trainer_state.json
    assert latest_checkpoint(str(tmp_path)).endswith("checkpoint-4")


@pytest.mark.slow
def test_sigterm_saves_a_checkpoint_and_resume_reaches_the_same_state(tmp_path, tiny_qwen3):
    import torch
    from safetensors.torch import load_file

    def cfg_file(sub: str) -> tuple[Path, Path]:
        cfg = tiny_config(tmp_path / sub, tiny_qwen3, max_steps=24, eval_strategy="no", save_strategy="steps",
                          save_steps=1000, load_best_model_at_end="false", per_device_train_batch_size=2,
                          gradient_accumulation_steps=1)
        return write_config_yaml(cfg, tmp_path / f"{sub}.yaml"), Path(cfg.train.output_dir)

    cmd = [sys.executable, "scripts/finetune_lora.py", "--config"]
    killed_cfg, killed_out = cfg_file("killed")
    proc = subprocess.Popen(cmd + [str(killed_cfg)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    for line in proc.stdout:
        if "Step 3/24" in line:
            proc.send_signal(signal.SIGTERM)
            break
    rest = proc.stdout.read()
    assert proc.wait(timeout=300) == 0, rest[-2000:]
    assert "Training stopped by SIGTERM" in rest
    ckpts = list(killed_out.glob("checkpoint-*"))
    assert len(ckpts) == 1 and 3 <= int(ckpts[0].name.split("-")[1]) < 24
    assert not (killed_out / "adapter_model.safetensors").exists()  # no final adapter from a killed run
    r = subprocess.run(cmd + [str(killed_cfg), "--resume"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and "RESUMING TRAINING FROM CHECKPOINT" in r.stdout
    full_cfg, full_out = cfg_file("full")
    assert subprocess.run(cmd + [str(full_cfg)], capture_output=True, timeout=300).returncode == 0
    a, b = load_file(str(killed_out / "adapter_model.safetensors")), load_file(str(full_out / "adapter_model.safetensors"))
    assert all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)


def test_tokenizer_fingerprint_ignores_the_last_calls_truncation(qwen3_tokenizer):
    """An encode with truncation leaves it set in the fast backend; the cache key must not change with it."""
    from recsft.preprocess import tokenizer_fingerprint

    before = tokenizer_fingerprint(qwen3_tokenizer)
    qwen3_tokenizer(["a b c d e f"], truncation=True, max_length=3)
    assert tokenizer_fingerprint(qwen3_tokenizer) == before
    qwen3_tokenizer(["a b c"], truncation=False)
