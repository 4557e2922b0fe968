"""Integration test on a real model through the shared loader (quantization, attention, padding).

    pytest tests/test_integration_model.py --integration-model-path Qwen/Qwen3-8B -v -s
    pytest tests/test_integration_model.py --integration-config-path configs/qwen3_7b_movielens_qlora.yaml -v -s

Without options it uses the model of ``configs/qwen3_7b_movielens_qlora.yaml`` when that model is available
locally (Hugging Face cache or folder), else the embedded offline SmolLM2-135M-Instruct GGUF, so it always
exercises a real pretrained model. It logs the raw input JSON, the templated text and the model response (-s).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from conftest import SMOLLM2_GGUF
from recsft.config import load_config
from recsft.formatting import INSTRUCTION, build_input_text
from recsft.inference import generate, prompts_for
from recsft.metrics import extract_answer
from recsft.modeling import get_device, load_model, load_tokenizer
from recsft.preprocess import tokenize_func

pytestmark = pytest.mark.slow  # loads a real model

RECORD = {"instruction": INSTRUCTION, "output": "Yes", "input": build_input_text(
    ["Star Wars (1977)", "Return of the Jedi (1983)", "Raiders of the Lost Ark (1981)", "Toy Story (1995)"],
    [5, 5, 4, 4], "The Empire Strikes Back (1980)")}


def _available(model: str) -> bool:
    if model.startswith("pkg://") or Path(model).exists():
        return True
    try:
        from huggingface_hub import try_to_load_from_cache

        return isinstance(try_to_load_from_cache(model, "config.json"), str)
    except Exception:
        return False


@pytest.fixture(scope="module")
def model_setup(request):
    path = request.config.getoption("--integration-model-path")
    cfg_path = request.config.getoption("--integration-config-path") or "configs/qwen3_7b_movielens_qlora.yaml"
    cfg = load_config(cfg_path)
    model_id = path or cfg.model.model_name_or_path
    if not _available(model_id):
        if path:
            pytest.skip(f"model {model_id!r} cannot be resolved offline")
        model_id = SMOLLM2_GGUF
    device = get_device()
    tok = load_tokenizer(model_id, cfg.model.trust_remote_code)
    model = load_model(model_id, device, cfg.model.dtype, cfg.model.flash_attn,
                       cfg.model.quantization_bit, cfg.model.trust_remote_code)
    return model_id, tok, model, cfg


def test_forward_with_masked_labels_and_greedy_generation(model_setup):
    model_id, tok, model, cfg = model_setup
    print(f"\nmodel: {model_id}\nraw input JSON:\n{json.dumps(RECORD, indent=2, ensure_ascii=False)}")
    ex = tokenize_func(RECORD, tok, cfg.data.cutoff_len, enable_thinking=cfg.model.enable_thinking)
    n_trained = sum(x != -100 for x in ex["labels"])
    assert 1 <= n_trained <= 8 and ex["labels"][0] == -100
    device = next(model.parameters()).device
    batch = {k: torch.tensor([v], device=device) for k, v in ex.items()}
    with torch.no_grad():
        loss = model(**batch).loss
    assert torch.isfinite(loss), loss
    prompts, labels = prompts_for([RECORD], tok, enable_thinking=cfg.model.enable_thinking)
    print(f"templated text:\n{prompts[0]}")
    response = generate(model, tok, prompts, max_new_tokens=8, progress=False)[0]
    print(f"model response: {response!r} -> {extract_answer(response)}; loss on answer tokens {loss.item():.3f}")
    assert isinstance(response, str) and len(response) > 0
