"""End to end: every inference/analysis script on the tiny random Qwen3 (real tokenizer) with a trained adapter."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

import analyze_differences
import check_seq_len
import compare_base_vs_lora
import finetune_lora
import infer_lora
from recsft.io import DataError, load_data
from recsft.movielens import to_train_record
from conftest import tiny_config, write_config_yaml

pytestmark = pytest.mark.slow  # every test here trains an adapter or runs a script end to end


@pytest.fixture(scope="module")
def trained(tmp_path_factory, yes_no_qwen3, movielens_dir):
    """A LoRA adapter trained for a few steps on real MovieLens records, and a config file pointing at it."""
    tmp = tmp_path_factory.mktemp("trained")
    cfg = tiny_config(tmp, yes_no_qwen3, max_steps=8, learning_rate=1e-2, eval_steps=4, save_steps=4)
    finetune_lora.main(cfg)
    test = load_data(movielens_dir / "test_raw.jsonl")[:12]
    (tmp / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in test))
    (tmp / "eval_train_format.json").write_text(json.dumps([to_train_record(r) for r in test[:6]]))
    write_config_yaml(cfg, tmp / "cfg.yaml", test_file=str(tmp / "test.jsonl"))
    return tmp, str(tmp / "cfg.yaml"), cfg.train.output_dir


def run_infer(cfg_path, *extra):
    return infer_lora.main(infer_lora.parse_args(["--config", cfg_path, *extra]))


def test_batch_generate_both_formats(trained):
    tmp, cfg, adapter = trained
    out = tmp / "gen"
    summary = run_infer(cfg, "--output_dir", str(out), "--compare_base")
    rows = load_data(out / "lora_predictions.jsonl")
    metrics = json.loads((out / "metrics_summary.json").read_text())
    assert len(rows) == 12 and {"user_id", "candidate_title", "label", "response", "prediction"} <= set(rows[0])
    assert {"accuracy", "f1", "precision", "recall", "unparseable"} <= set(metrics) and metrics["n"] == 12
    assert (out / "base_predictions.jsonl").is_file() and summary["base"]["n"] == 12
    out2 = tmp / "gen_train_format"
    run_infer(cfg, "--test_file", str(tmp / "eval_train_format.json"), "--max_samples", "1",
              "--output_dir", str(out2))
    assert len(load_data(out2 / "lora_predictions.jsonl")) == 1


def test_score_mode_agrees_with_generation_and_writes_roc(trained):
    tmp, cfg, adapter = trained
    out = tmp / "score"
    # max_new_tokens=1: this toy head never emits EOS, so longer responses ("YesNoYes...") are unparseable
    summary = run_infer(cfg, "--output_dir", str(out), "--eval_mode", "score", "--compare_modes",
                        "--calibration_samples", "8", "max_new_tokens=1")
    metrics = json.loads((out / "metrics_summary.json").read_text())
    assert {"auc", "log_loss", "at_0.5", "at_eval_threshold"} <= set(metrics)
    assert (out / "roc_curve.png").stat().st_size > 1000
    gen = summary["modes"]["generate_metrics"]
    assert gen["n"] == 12 and "score_speedup" in summary["modes"]
    assert summary["modes"]["generation_parsed"] == 12, "the yes/no-head model always starts with Yes or No"
    assert summary["modes"]["agreement"] == 1.0  # scoring compares the same two logits that greedy decoding does


def test_a_stopped_scoring_run_resumes_with_the_same_predictions(trained, monkeypatch, capsys):
    """Killed after two of three batches (adapter and base model): the same command without --resume refuses to
    overwrite the saved batches, with --resume scores only the rest, and the files equal an uninterrupted run's.
    Killed in the base model's pass: --resume does not score the adapter's finished pass again."""
    tmp, cfg, adapter = trained
    args = ["--eval_mode", "score", "--compare_base", "infer_batch_size=4"]
    run_infer(cfg, "--output_dir", str(tmp / "whole"), *args)
    out = stopped_run(monkeypatch, cfg, tmp / "stopped", args, model=None)
    assert not (out / "lora_predictions.jsonl").exists() and (out / "lora_predictions.partial.jsonl").is_file()
    with pytest.raises(DataError, match=r"lora_predictions.partial.jsonl: an unfinished scoring run is saved here "
                                        r"\(2 batches\); add --resume"):
        run_infer(cfg, "--output_dir", str(out), *args)
    capsys.readouterr()
    run_infer(cfg, "--output_dir", str(out), *args, "--resume")
    assert "RESUMING scoring (lora): 8 records" in capsys.readouterr().out
    same_files(out, tmp / "whole")

    out = stopped_run(monkeypatch, cfg, tmp / "stopped_in_base", args, model="base")
    capsys.readouterr()
    run_infer(cfg, "--output_dir", str(out), *args, "--resume")
    said = capsys.readouterr().out
    assert "RESUMING scoring (lora): 12 records" in said and "RESUMING scoring (base): 8 records" in said
    same_files(out, tmp / "whole")


def stopped_run(monkeypatch, cfg, out, args, model):
    """infer_lora.py killed once the journal of ``model`` (any, if None) holds 8 records (two batches of 4)."""
    from recsft.resume import ScoreJournal

    add = ScoreJournal.add

    def killed_in_third_batch(self, *batch):
        add(self, *batch)
        if self.records == 8 and model in (None, self.header["model"]):
            raise KeyboardInterrupt
    with monkeypatch.context() as patch:
        patch.setattr(ScoreJournal, "add", killed_in_third_batch)
        with pytest.raises(KeyboardInterrupt):
            run_infer(cfg, "--output_dir", str(out), *args)
    return out


def same_files(out, whole):
    """No journal left in ``out``, and its predictions equal the uninterrupted run's in ``whole``."""
    assert not list(out.glob("*.partial.jsonl"))
    for name in ("lora", "base"):
        got, want = load_data(out / f"{name}_predictions.jsonl"), load_data(whole / f"{name}_predictions.jsonl")
        assert [r["label"] for r in got] == [r["label"] for r in want] and len(got) == 12
        assert max(abs(a["p_yes"] - b["p_yes"]) for a, b in zip(got, want)) < 1e-6


def test_demo_mode_prints_base_and_lora(trained, capsys):
    tmp, cfg, adapter = trained
    answers = run_infer(cfg)
    assert set(answers) == {"lora", "base"} and "PROMPT" in capsys.readouterr().out


def test_compare_and_analyze(trained, capsys):
    tmp, cfg, adapter = trained
    out = tmp / "compare"
    summary = compare_base_vs_lora.main(compare_base_vs_lora.parse_args(
        ["--config", cfg, "--output_dir", str(out), "--eval_mode", "score"]))
    agreement = summary["agreement"]
    assert agreement["agree"] + agreement["disagree"] == 12
    assert sum(agreement[k] for k in ("both_right", "both_wrong", "lora_right_base_wrong",
                                      "base_right_lora_wrong")) == 12
    assert len(load_data(out / "comparisons.jsonl")) == 12
    result = analyze_differences.main(analyze_differences.parse_args(["--input_dir", str(out)]))
    assert sum(result["counts"].values()) == 12 and "12 examples" in capsys.readouterr().out


def test_check_seq_len_steps_stats_and_histogram(trained, capsys, tmp_path):
    tmp, cfg, adapter = trained
    stats = check_seq_len.main(check_seq_len.parse_args(
        ["--config", cfg, "--show-examples", "1", "--cutoff-len", "120", "--output-dir", str(tmp_path)]))
    out = capsys.readouterr().out
    for step in range(1, 7):
        assert f"[STEP {step}]" in out
    assert "removed from the LEFT" in out and stats["truncated"] > 0 and stats["p50"] > 120
    assert list(tmp_path.glob("*.png"))
    chars = check_seq_len.main(check_seq_len.parse_args(["--config", cfg, "--char-only", "--show-examples", "0",
                                                         "--output-dir", str(tmp_path)]))
    assert chars["mean"] > stats["mean"]


def test_missing_or_foreign_adapter_fails_before_loading(trained, tmp_path, tiny_qwen3, qwen3_tokenizer):
    tmp, cfg, adapter = trained
    r = subprocess.run([sys.executable, "scripts/infer_lora.py", "--config", cfg, "--output_dir", str(tmp_path),
                        "--adapter_dir", str(tmp_path / "nope")], capture_output=True, text=True)
    assert r.returncode == 2 and "does not exist" in r.stderr and "Traceback" not in r.stderr
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    cfg_json = json.loads((Path(adapter) / "adapter_config.json").read_text())
    cfg_json["base_model_name_or_path"] = "Qwen/Qwen3-8B"
    (foreign / "adapter_config.json").write_text(json.dumps(cfg_json))
    r = subprocess.run([sys.executable, "scripts/infer_lora.py", "--config", cfg, "--output_dir", str(tmp_path),
                        "--adapter_dir", str(foreign)], capture_output=True, text=True)
    assert r.returncode == 2 and "was trained on 'Qwen/Qwen3-8B'" in r.stderr


def test_baselines_on_the_same_split(tmp_path):
    import baselines
    import prepare_data

    prepare_data.main(prepare_data.parse_args(["--out-dir", str(tmp_path / "d"), "--max-users", "80"]))
    results = baselines.main(baselines.parse_args(["--data_dir", str(tmp_path / "d"), "--output_dir",
                                                   str(tmp_path / "o"), "--models", "item-rate,user-rate,biases,mf"]))
    assert len(results) == 5 and all(0 <= m["accuracy"] <= 1 for m in results.values())
    assert results["always Yes"]["auc"] == 0.5 and results["always Yes"]["uauc"] == 0.5
    biases = results["BaselineOnly: user+item biases (Cornac)"]
    assert biases["auc"] > 0.55 and 0.5 < biases["uauc"] < 1  # real signal on real data
    assert results["user like-rate (hand-written)"]["uauc"] == 0.5  # one score per user: no within-user signal
    saved = json.loads((tmp_path / "o" / "baselines.json").read_text())
    assert saved["test_examples"] == len(load_data(tmp_path / "d" / "test_raw.jsonl"))
