"""QLoRA end to end on the CPU: bitsandbytes 4-bit NF4 base (tiny random Qwen3, real tokenizer) + LoRA.

Train with the label-position loss and eval, resume, save the adapter, load it onto a 4-bit base for score and
generate inference; LoRA weights stay float32 through TRL's trainer; an eval does not corrupt training gradients.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest
import torch

import finetune_lora
import infer_lora
from conftest import build_tiny_qwen3, tiny_config, write_config_yaml

pytest.importorskip("bitsandbytes")
pytestmark = pytest.mark.slow  # every test here loads a 4-bit model and most train it


@pytest.fixture(scope="module")
def tiny64(tmp_path_factory, qwen3_tokenizer) -> str:
    """Hidden size 64: bitsandbytes' CPU 4-bit kernels work on blocks of 64 inputs."""
    return build_tiny_qwen3(tmp_path_factory.mktemp("tiny64"), qwen3_tokenizer, yes_no_head=True, shape="tiny64")


def step_losses(checkpoint: Path) -> dict[int, float]:
    state = json.loads((checkpoint / "trainer_state.json").read_text())
    return {e["step"]: e["loss"] for e in state["log_history"] if "loss" in e}


def test_qlora_trains_resumes_saves_and_serves(tmp_path, tiny64, caplog):
    caplog.set_level(logging.INFO, logger="recsft")
    cfg = tiny_config(tmp_path / "a", tiny64, quantization_bit=4, max_steps=4, eval_steps=2, save_steps=2,
                      learning_rate=1e-2, gen_eval_samples=4)
    summary = finetune_lora.main(cfg)
    assert "QLoRA: loading the base model in 4-bit (NF4) with bitsandbytes on cpu" in caplog.text
    assert summary["global_step"] == 4 and summary["final_eval"]["eval_n"] == 16
    assert summary["gen_eval"]["n"] == 4  # generation eval ran on the 4-bit model (this toy head never emits EOS)
    out = Path(cfg.train.output_dir)
    from safetensors.torch import load_file

    saved = load_file(str(out / "adapter_model.safetensors"))
    assert saved and all(t.dtype == torch.float32 for t in saved.values())
    assert not any("base_layer" in k for k in saved), "only the adapter is saved, not the 4-bit base"

    # resume from checkpoint-2 in a fresh folder: steps 3 and 4 repeat the same losses
    resumed = tiny_config(tmp_path / "b", tiny64, quantization_bit=4, max_steps=4, eval_steps=2, save_steps=2,
                          learning_rate=1e-2)
    Path(resumed.train.output_dir).mkdir(parents=True)
    shutil.copytree(out / "checkpoint-2", Path(resumed.train.output_dir) / "checkpoint-2")
    finetune_lora.main(resumed, resume=True)
    a, b = step_losses(out / "checkpoint-4"), step_losses(Path(resumed.train.output_dir) / "checkpoint-4")
    for step in (3, 4):
        assert b[step] == pytest.approx(a[step], rel=1e-4, abs=1e-5), step

    # inference on a 4-bit base with the adapter: scoring and generation agree; no merge into 4-bit weights
    cfg_file = write_config_yaml(cfg, tmp_path / "cfg.yaml")
    caplog.clear()
    score = infer_lora.main(infer_lora.parse_args(["--config", str(cfg_file), "--test_file", cfg.data.eval_dataset,
                                                   "--output_dir", str(tmp_path / "infer"), "--eval_mode", "score",
                                                   "--compare_modes", "max_new_tokens=1"]))
    assert "Adapter not merged: the base is 4-bit" in caplog.text
    assert "QLoRA: loading the base model in 4-bit" in caplog.text
    assert score["lora"]["n"] == 16 and score["modes"]["generation_parsed"] == 16
    assert score["modes"]["agreement"] == 1.0


def trainer_for(tmp_path, model_path: str, lr: float, **overrides):
    from recsft import training as T
    from recsft.modeling import model_for, tokenizer_for
    from recsft.preprocess import datasets_for, resolve_data

    cfg = tiny_config(tmp_path, model_path, quantization_bit=4, learning_rate=lr, eval_strategy="no",
                      save_strategy="no", load_best_model_at_end="false", **overrides)
    train_path, _ = resolve_data(cfg.data)
    tok = tokenizer_for(cfg.model)
    train_ds, _ = datasets_for(cfg.data, False, tok, train_path, None, False, cpu=True)
    model, device = model_for(cfg.model, cfg.lora, cfg.train.gradient_checkpointing, cfg.train.seed)
    trainer, _ = T.build_trainer(model, tok, train_ds, None, cfg, device)
    return trainer


def test_lora_weights_stay_float32_and_learn_at_a_small_learning_rate(tmp_path, tiny64):
    """TRL casts a quantized model's trainable weights to bf16; at lr 1e-5 AdamW's updates (~1e-5) are below bf16's
    resolution for weights of ~0.05, so a bf16 lora_A would never change."""
    trainer = trainer_for(tmp_path, tiny64, 1e-5, max_steps=3, warmup_ratio=0.0, lr_scheduler_type="constant")
    lora = {n: p for n, p in trainer.model.named_parameters() if p.requires_grad}
    assert lora and all(p.dtype == torch.float32 for p in lora.values()), {p.dtype for p in lora.values()}
    before = {n: p.detach().clone() for n, p in lora.items() if "lora_A" in n}
    trainer.train()
    after = dict(trainer.model.named_parameters())
    unchanged = [n for n, p in before.items() if torch.equal(p, after[n].detach())]
    assert not unchanged, f"lora_A weights not updated at lr 1e-5: {unchanged[:3]}"
    assert all(after[n].dtype == torch.float32 for n in before)


def test_no_fp32_upcast_of_embeddings_and_norms(tmp_path, tiny64):
    """peft's prepare_model_for_kbit_training would put embeddings, norms and the head in float32."""
    from recsft.modeling import apply_lora, load_model

    model = apply_lora(load_model(tiny64, "cpu", "bfloat16", "sdpa", 4), 8, 16, 0.0, "all", True)
    base = model.get_base_model()
    assert base.model.embed_tokens.weight.dtype == torch.bfloat16
    assert base.model.norm.weight.dtype == torch.bfloat16 and base.lm_head.weight.dtype == torch.bfloat16
    assert all(not p.requires_grad for n, p in model.named_parameters() if "lora_" not in n)
    assert all(p.dtype == torch.float32 for n, p in model.named_parameters() if "lora_" in n)


def test_an_eval_forward_leaves_4bit_training_gradients_exact(tmp_path, tiny64):
    """bitsandbytes repacks 4-bit CPU weights for a forward-only kernel in eval mode (AVX512-BF16 CPUs); training
    models keep the trainable layout, so gradients after an evaluation equal those before it."""
    from recsft.modeling import apply_lora, load_model

    model = apply_lora(load_model(tiny64, "cpu", "float32", "sdpa", 4), 4, 8, 0.0, "all")
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.02)  # non-zero B: gradients flow into every lora_A
    ids = torch.randint(0, 5000, (2, 24), generator=torch.Generator().manual_seed(0))

    def grads():
        model.train()
        model.zero_grad()
        model(input_ids=ids, labels=ids).loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    first = grads()
    model.eval()
    with torch.no_grad():
        model(input_ids=ids)
    second = grads()
    assert first.keys() == second.keys()
    worst = max((first[k] - second[k]).abs().max().item() for k in first)
    assert worst < 1e-6, worst
