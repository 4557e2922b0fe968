"""DDP for real: `accelerate launch --multi_gpu --num_processes 2` on CPU (torchrun underneath, gloo backend).

With CUDA hidden, accelerate's multi-GPU launcher starts 2 CPU processes; the Trainer then runs DDP over gloo.
(`accelerate launch --cpu --num_processes 2` would start a single process: accelerate's multi-CPU path needs MPI.)
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import tiny_config, write_config_yaml

ACCELERATE = Path(sys.executable).parent / "accelerate"
pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not ACCELERATE.is_file(), reason="accelerate CLI not installed in this venv")]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_cmd(config_file: Path, *extra: str) -> list[str]:
    return [str(ACCELERATE), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
            "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(free_port()),
            "scripts/finetune_lora.py", "--config", str(config_file), *extra]


ENV = dict(os.environ, CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1")  # CPU ranks, even on a GPU machine


ERROR_LINE = re.compile(r"^error: |Traceback|\w+(Error|Exception)\b|exitcode|Failures:|Root Cause|rank: \d")


def failure(log: str, tail: int = 2000) -> str:
    """Every rank's error lines (a short tail alone can hide the rank that failed first), then the log's tail."""
    errors = [line for line in log.splitlines() if ERROR_LINE.search(line)]
    return "\n".join(["--- error lines of every rank ---", *errors[:80], "--- log tail ---", log[-tail:]])


def write_config(tmp_path: Path, name: str, tiny_qwen3: str, **overrides) -> tuple[Path, object]:
    cfg = tiny_config(tmp_path, tiny_qwen3, **overrides)
    return write_config_yaml(cfg, tmp_path / name), cfg


def test_two_process_ddp_trains_gathers_and_writes_once(tmp_path, tiny_qwen3):
    config_file, cfg = write_config(tmp_path, "ddp.yaml", tiny_qwen3, max_steps=4, eval_steps=2, save_steps=2,
                                    gradient_accumulation_steps=1, per_device_eval_batch_size=4,
                                    max_eval_samples=15, report_to="tensorboard")
    r = subprocess.run(launch_cmd(config_file), capture_output=True, text=True, timeout=400, env=ENV)
    log = r.stdout + r.stderr
    assert r.returncode == 0, failure(log)
    assert "2 processes (ParallelMode.DISTRIBUTED); this is rank 0" in log and "this is rank 1" in log
    # rank 0 builds the preprocessing cache first, rank 1 then loads it (no two writers racing on one folder)
    assert log.count("Tokenized train") == 1 and log.count("Loading preprocessed datasets from cache") == 2, failure(log)
    out = Path(cfg.train.output_dir)
    summary = json.loads((out / "training_summary.json").read_text())
    # 48 train examples, 2 ranks x batch 4 = 8 per step: 4 steps = 32 examples = 2/3 epoch (1/3 on one process)
    assert summary["global_step"] == 4 and summary["epoch"] == pytest.approx(4 * 8 / 48)
    # 15 eval examples split 8 + 7 (one padded duplicate): gathered from both ranks, the duplicate dropped
    assert summary["final_eval"]["eval_n"] == 15 and summary["best_eval"]["eval_n"] == 15
    assert log.count("Training complete") == 1  # only rank 0 reports and writes
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]
    assert len(list((out / "logs").glob("events.out.tfevents*"))) == 1
    assert (out / "adapter_model.safetensors").is_file() and (out / "training_curves.png").is_file()


def rank_pid(launcher_pid: int, rank: str) -> int:
    import psutil

    for child in psutil.Process(launcher_pid).children(recursive=True):
        try:
            if child.environ().get("RANK") == rank and "finetune_lora.py" in " ".join(child.cmdline()):
                return child.pid
        except psutil.Error:
            continue
    raise AssertionError(f"no rank {rank} worker under the launcher")


def start_40_step_run(tmp_path, name: str, tiny_qwen3):
    """A 2-process, 40-step run without evaluation, launched in its own session (to signal it as a group)."""
    config_file, cfg = write_config(tmp_path, name, tiny_qwen3, max_steps=40, eval_strategy="no",
                                    save_steps=1000, load_best_model_at_end="false",
                                    per_device_train_batch_size=2, gradient_accumulation_steps=2)
    proc = subprocess.Popen(launch_cmd(config_file), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=ENV, start_new_session=True)
    return config_file, cfg, proc


def test_sigterm_on_one_rank_stops_every_rank_at_the_same_step_then_resumes(tmp_path, tiny_qwen3):
    """SIGTERM reaches rank 1 only, twice (like pkill + the launcher forwarding it): all ranks checkpoint and stop."""
    config_file, cfg, proc = start_40_step_run(tmp_path, "kill.yaml", tiny_qwen3)
    lines: list[str] = []
    try:
        for line in proc.stdout:
            lines.append(line)
            if "Step 1/40" in line:
                os.kill(rank_pid(proc.pid, "1"), signal.SIGTERM)
            if "Received SIGTERM" in line:
                try:  # the launcher's forwarded copy: must not kill the rank mid-checkpoint
                    os.kill(rank_pid(proc.pid, "1"), signal.SIGTERM)
                except (AssertionError, ProcessLookupError):
                    pass
                break
        lines.append(proc.stdout.read())
        rc = proc.wait(timeout=300)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    log = "".join(lines)
    assert rc == 0, failure(log)  # both ranks left training together and exited cleanly
    out = Path(cfg.train.output_dir)
    ckpts = list(out.glob("checkpoint-*"))
    assert len(ckpts) == 1, failure(log)
    step = int(ckpts[0].name.split("-")[1])
    assert 1 <= step < 40 and json.loads((ckpts[0] / "trainer_state.json").read_text())["global_step"] == step
    assert f"Training stopped by SIGTERM at step {step}" in log  # rank 1, which got the signal
    assert f"Training stopped by SIGTERM (on another rank) at step {step}" in log  # rank 0, told by rank 1
    assert not (out / "adapter_model.safetensors").exists()

    r = subprocess.run(launch_cmd(config_file, "--resume"), capture_output=True, text=True, timeout=400, env=ENV)
    assert r.returncode == 0, failure(r.stdout + r.stderr)
    assert f"Last completed step: {step}" in r.stdout
    summary = json.loads((out / "training_summary.json").read_text())
    assert summary["global_step"] == 40


def test_sigterm_to_the_launcher_saves_one_checkpoint_then_resume_continues(tmp_path, tiny_qwen3):
    """`kill <launcher>` (or Ctrl-C): the elastic agent forwards SIGTERM to every worker and SIGKILLs them 30 s
    later; the workers agree on the step, save one checkpoint within that time and exit."""
    config_file, cfg, proc = start_40_step_run(tmp_path, "term.yaml", tiny_qwen3)
    lines: list[str] = []
    try:
        for line in proc.stdout:
            lines.append(line)
            if "Step 2/40" in line:
                proc.send_signal(signal.SIGTERM)
                break
        lines.append(proc.stdout.read())
        proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    log = "".join(lines)
    out = Path(cfg.train.output_dir)
    ckpts = list(out.glob("checkpoint-*"))
    assert len(ckpts) == 1, failure(log)
    step = int(ckpts[0].name.split("-")[1])
    assert 2 <= step < 40 and (ckpts[0] / "adapter_model.safetensors").is_file(), failure(log)
    assert log.count(f"Training stopped by SIGTERM") == 2, failure(log)  # both ranks, the same step
    assert f"at step {step}; checkpoint saved" in log

    r = subprocess.run(launch_cmd(config_file, "--resume"), capture_output=True, text=True, timeout=400, env=ENV)
    assert r.returncode == 0, failure(r.stdout + r.stderr)
    assert f"Last completed step: {step}" in r.stdout
    assert json.loads((out / "training_summary.json").read_text())["global_step"] == 40
