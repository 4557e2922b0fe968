"""DDP for real: 2 CPU processes (gloo) under torchrun, the launcher `accelerate launch --multi_gpu` uses."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from test_training import tiny_config


@pytest.mark.skipif(shutil.which("torchrun", path=str(Path(sys.executable).parent)) is None, reason="no torchrun")
def test_two_process_ddp_trains_gathers_and_writes_once(tmp_path, tiny_qwen3):
    cfg = tiny_config(tmp_path, tiny_qwen3, max_steps=4, eval_steps=2, save_steps=2, gradient_accumulation_steps=1,
                      per_device_eval_batch_size=5, report_to="tensorboard")
    config_file = tmp_path / "ddp.yaml"
    config_file.write_text("\n".join(f"{k}: {json.dumps(v)}" for k, v in cfg.to_dict().items() if v is not None))
    torchrun = str(Path(sys.executable).parent / "torchrun")
    r = subprocess.run([torchrun, "--nproc_per_node", "2", "--master_port", "29533", "scripts/finetune_lora.py",
                        "--config", str(config_file)], capture_output=True, text=True, timeout=600)
    log = r.stdout + r.stderr
    assert r.returncode == 0, log[-3000:]
    assert "this is rank 0" in log and "this is rank 1" in log
    out = Path(cfg.train.output_dir)
    summary = json.loads((out / "training_summary.json").read_text())
    # 48 train examples, 2 ranks x batch 4 = 8 per step: 4 steps = 32 examples = 2/3 epoch (1/3 on one process)
    assert summary["epoch"] == pytest.approx(4 * 8 / 48)
    assert summary["final_eval"]["eval_n"] == 16  # eval examples gathered from both ranks, none duplicated
    assert log.count("Training complete") == 1  # only rank 0 reports and writes
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]
    assert len(list((out / "logs").glob("events.out.tfevents*"))) == 1
