"""GPU and launcher decisions, checked without a GPU: precision, flash-attn detection, 4-bit placement, launch checks.

The CUDA queries are monkeypatched (a pre-Ampere GPU, two GPUs, an FSDP launch); the logic under test is real.
"""

from __future__ import annotations

import logging
import sys
import types

import pytest
import torch

from recsft import callbacks, modeling, training
from recsft.config import ConfigError, TrainArgs


# --------------------------------------------------------------------------- bf16 vs fp16 on the GPU
@pytest.fixture
def gpu(monkeypatch):
    """A fake CUDA device: ``gpu(major)`` sets its compute capability; bf16 emulation is reported as supported."""

    def set_gpu(major: int):
        def is_bf16_supported(including_emulation: bool = True):
            return major >= 8 or including_emulation  # what torch answers on a T4 / V100

        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", is_bf16_supported)
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (major, 0))

    return set_gpu


def test_pre_ampere_gpu_gets_fp16_with_loss_scaling_not_emulated_bf16(gpu, caplog):
    gpu(7)  # V100 / T4: bf16 only emulated
    assert modeling.resolve_dtype("auto", "cuda") == torch.float16
    with caplog.at_level(logging.INFO, logger="recsft"):
        assert training.mixed_precision("auto", "cuda") == {"bf16": False, "fp16": True}
    assert "fp16 mixed precision" in caplog.text


def test_ampere_gpu_gets_bf16_and_cpu_neither(gpu):
    gpu(8)
    assert modeling.resolve_dtype("auto", "cuda") == torch.bfloat16
    assert training.mixed_precision("auto", "cuda") == {"bf16": True, "fp16": False}
    assert training.mixed_precision("auto", "cpu") == {"bf16": False, "fp16": False}
    assert training.mixed_precision("true", "cpu") == {"bf16": True, "fp16": False}
    assert training.mixed_precision("false", "cuda") == {"bf16": False, "fp16": False}


def test_sft_config_takes_extra_arguments_at_construction():
    args = training.sft_config(TrainArgs(output_dir="/tmp/x", report_to="none"), 256, "cpu", False,
                               torch_compile=True)
    assert args.torch_compile and args.torch_compile_backend == "inductor"
    late = training.sft_config(TrainArgs(output_dir="/tmp/x", report_to="none"), 256, "cpu", False)
    late.torch_compile = True  # what bench_train.py used to do: the Trainer then compiles nothing
    assert late.torch_compile_backend is None


# --------------------------------------------------------------------------- flash-attn detection
def test_broken_flash_attn_falls_back_to_sdpa_with_the_reason(gpu, monkeypatch, tmp_path, caplog):
    gpu(9)
    pkg = tmp_path / "flash_attn"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("raise ImportError('flash_attn_2_cuda.so: undefined symbol: _ZN3c10')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "flash_attn", raising=False)
    with caplog.at_level(logging.INFO, logger="recsft"):
        assert modeling.resolve_attn_implementation("auto", "cuda") == "sdpa"
    assert "flash-attn fails to import (ImportError: flash_attn_2_cuda.so: undefined symbol" in caplog.text
    from recsft.config import ConfigError

    with pytest.raises(ConfigError, match="flash_attention_2 requested but flash-attn fails to import"):
        modeling.resolve_attn_implementation("flash_attention_2", "cuda")


def test_working_flash_attn_is_used_on_sm80(gpu, monkeypatch):
    gpu(8)
    monkeypatch.setitem(sys.modules, "flash_attn", types.SimpleNamespace(flash_attn_varlen_func=lambda *a: None))
    monkeypatch.setattr(modeling.importlib.util, "find_spec", lambda name: object())
    assert modeling.resolve_attn_implementation("auto", "cuda") == "flash_attention_2"
    gpu(7)
    assert modeling.resolve_attn_implementation("auto", "cuda") == "sdpa"


# --------------------------------------------------------------------------- 4-bit placement and sharding
def test_kbit_support_by_device():
    pytest.importorskip("bitsandbytes")
    assert modeling.kbit_problem(4, "cuda") is None and modeling.kbit_problem(8, "cuda") is None
    assert modeling.kbit_problem(4, "cpu") is None
    assert "8-bit" in modeling.kbit_problem(8, "cpu") and "mps" in modeling.kbit_problem(4, "mps")


def test_4bit_weights_are_stored_in_the_compute_dtype_under_fsdp(monkeypatch):
    pytest.importorskip("bitsandbytes")
    captured = {}

    class FakeAuto:
        @staticmethod
        def from_pretrained(path, **kwargs):
            captured.update(kwargs)
            return torch.nn.Linear(1, 1)

    import transformers

    monkeypatch.setattr(transformers, "AutoModelForCausalLM", FakeAuto)
    monkeypatch.setattr(modeling, "local_model_path", lambda p: p)
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setattr(modeling, "choose_dtype", lambda d, dev: ("bfloat16", "set by the test"))
    monkeypatch.setattr(modeling, "resolve_attn_implementation", lambda f, d: "sdpa")
    modeling.load_model("m", "cuda", quantization_bit=4)
    q = captured["quantization_config"]
    assert q.bnb_4bit_quant_storage == torch.bfloat16 and q.bnb_4bit_compute_dtype == torch.bfloat16
    assert captured["device_map"] == {"": 1}
    monkeypatch.delenv("ACCELERATE_USE_FSDP")
    modeling.load_model("m", "cuda", quantization_bit=4)
    assert captured["quantization_config"].bnb_4bit_quant_storage == torch.uint8  # DDP: the compact default


def test_plain_model_stays_on_the_cpu_under_fsdp_and_moves_otherwise(monkeypatch):
    moved = []

    class FakeModel(torch.nn.Linear):
        def to(self, *a, **k):
            moved.append(a)
            return self

    import transformers

    monkeypatch.setattr(transformers, "AutoModelForCausalLM",
                        types.SimpleNamespace(from_pretrained=lambda p, **k: FakeModel(1, 1)))
    monkeypatch.setattr(modeling, "local_model_path", lambda p: p)
    monkeypatch.setattr(modeling, "choose_dtype", lambda d, dev: ("bfloat16", "set by the test"))
    monkeypatch.setattr(modeling, "resolve_attn_implementation", lambda f, d: "sdpa")
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    modeling.load_model("m", "cuda")
    assert moved == []  # the trainer shards it onto the GPUs
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "false")
    monkeypatch.setenv("LOCAL_RANK", "0")
    modeling.load_model("m", "cuda")
    assert moved == [("cuda:0",)]


# --------------------------------------------------------------------------- launch checks (before loading)
def test_several_gpus_without_a_launcher_say_how_to_pick_one(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    with pytest.raises(ConfigError, match="CUDA_VISIBLE_DEVICES=0 .* accelerate launch --multi_gpu --num_processes 4"):
        training.check_launch(None, gpu_count=4)
    training.check_launch(None, gpu_count=1)
    monkeypatch.setenv("WORLD_SIZE", "4")
    training.check_launch(None, gpu_count=4)  # under a launcher: fine


def test_finetune_fails_on_several_gpus_before_loading_anything(monkeypatch, tmp_path, capsys):
    import finetune_lora
    from conftest import tiny_config

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    cfg = tiny_config(tmp_path, str(tmp_path / "no_such_model"))  # would fail if anything were loaded
    with pytest.raises(ConfigError, match="2 GPUs are visible but no launcher"):
        finetune_lora.main(cfg)


def test_fsdp_launch_checks(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    monkeypatch.setenv("FSDP_STATE_DICT_TYPE", "SHARDED_STATE_DICT")
    with pytest.raises(ConfigError, match="saves no LoRA adapter; set fsdp_state_dict_type: FULL_STATE_DICT"):
        training.check_launch(None, gpu_count=2)
    monkeypatch.setenv("FSDP_STATE_DICT_TYPE", "FULL_STATE_DICT")
    training.check_launch(4, gpu_count=2)
    with pytest.raises(ConfigError, match="quantization_bit: 8 is not supported under FSDP"):
        training.check_launch(8, gpu_count=2)


def test_shipped_fsdp_config_uses_a_full_state_dict():
    import yaml

    from conftest import ROOT

    cfg = yaml.safe_load((ROOT / "configs" / "accelerate_fsdp.yaml").read_text())
    assert cfg["fsdp_config"]["fsdp_state_dict_type"] == "FULL_STATE_DICT"


# --------------------------------------------------------------------------- Ctrl-C under a launcher
def test_a_repeated_signal_within_the_window_is_ignored_a_later_one_stops_at_once(monkeypatch):
    import signal

    raised = []
    monkeypatch.setattr(signal, "raise_signal", raised.append)
    clock = [100.0]
    monkeypatch.setattr(callbacks.time, "monotonic", lambda: clock[0])
    stop = callbacks.GracefulStopCallback()
    stop._handle(signal.SIGINT, None)  # from the terminal
    clock[0] += 0.2
    stop._handle(signal.SIGTERM, None)  # the launcher's forwarded copy
    assert stop.requested == "SIGINT" and raised == []
    clock[0] += stop.REPEAT_WINDOW_S
    stop._handle(signal.SIGINT, None)  # the user again, seconds later: stop now
    assert raised == [signal.SIGINT]


def test_generation_eval_is_skipped_under_fsdp(monkeypatch, tmp_path, capsys):
    """Rank 0 alone would wait forever on a model sharded over every rank: the eval is skipped with a line."""
    from pathlib import Path
    from types import SimpleNamespace as NS

    from conftest import tiny_config
    from recsft import evaluation, report

    monkeypatch.setattr(modeling, "sharded_launch", lambda: "FSDP")
    called = []
    monkeypatch.setattr(evaluation, "generation_eval", lambda *a, **k: called.append(a))
    cfg = tiny_config(tmp_path, "unused", gen_eval_samples=4)
    Path(cfg.train.output_dir).mkdir(parents=True)
    state = NS(log_history=[], global_step=3, epoch=1.0, best_model_checkpoint=None, best_metric=None)
    trainer = NS(save_model=lambda out: None, is_world_process_zero=lambda: True, state=state, train_tokens=9,
                 train_answers=None, args=NS(world_size=2), time_budget=None, model=None)
    summary = report.finish_training(trainer, NS(save_pretrained=lambda out: None), cfg, cfg.data.eval_dataset,
                                     NS(metrics={"train_runtime": 1.0, "train_loss": 0.5}), 1.0, "cuda")
    assert not called and "gen_eval" not in summary and summary["global_step"] == 3
    assert "Generation eval skipped under FSDP" in capsys.readouterr().out


def test_dependency_check_reports_unmet_and_missing_requirements(monkeypatch):
    sys.path.insert(0, str(__import__("conftest").ROOT / "bench"))
    import check_deps

    class Dist:
        version, requires = "5.2.0", ["pyarrow>=9999", "surely-not-installed-pkg>=1", "fsspec<=2026.9.0",
                                       "pytest>=1; extra == 'tests'"]

    real = check_deps.md.distribution
    monkeypatch.setattr(check_deps.md, "distribution", lambda name: Dist if name == "datasets" else real(name))
    found = check_deps.problems(["datasets"])
    assert any("needs pyarrow>=9999: pyarrow" in p for p in found)
    assert any("surely-not-installed-pkg is not installed" in p for p in found)
    assert not any("fsspec" in p or "pytest" in p for p in found) and len(found) == 2
    assert check_deps.main(["datasets"]) == 1
