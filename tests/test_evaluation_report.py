"""Evaluation helpers (dataset loading, settings, thresholds, mode comparison) and report outputs, without a model."""

from __future__ import annotations

import json
import math

import pytest

from conftest import tiny_config, write_data
from recsft import evaluation as E
from recsft import report as R
from recsft.formatting import load_records
from recsft.io import DataError


def test_load_records_resolves_validates_and_caps(tmp_path):
    train, _ = write_data(tmp_path, n_train=10)
    (tmp_path / "dataset_info.json").write_text(json.dumps({"mine": {"file_name": "train.json"}}))
    records, path = load_records("mine", str(tmp_path), max_samples=3)
    assert path == str(tmp_path / "train.json") and len(records) == 3
    assert len(load_records(train)[0]) == 10
    bad = json.loads((tmp_path / "train.json").read_text())
    bad[4]["output"] = "maybe"
    (tmp_path / "bad.json").write_text(json.dumps(bad))
    with pytest.raises(DataError, match=r"bad.json: record 5: output: 'maybe'"):
        load_records(str(tmp_path / "bad.json"), max_samples=2)  # every record is checked, not only the first N


def test_eval_settings_from_config(tmp_path):
    cfg = tiny_config(tmp_path, "m", infer_batch_size=3, max_new_tokens=5, system_prompt="be brief")
    s = E.EvalSettings.from_config(cfg)
    assert (s.batch_size, s.max_new_tokens, s.system_prompt, s.cutoff_len) == (3, 5, "be brief", 160)
    assert (s.temperature, s.top_p, s.enable_thinking) == (cfg.infer.temperature, cfg.infer.top_p, False)


def _rows(preds, labels, p_yes=None):
    return [{"label": lab, "prediction": p, **({"p_yes": q} if p_yes else {})}
            for p, lab, q in zip(preds, labels, p_yes or [None] * len(preds))]


def test_compare_modes_counts_agreement_where_generation_parsed(monkeypatch):
    gen = _rows(["Yes", None, "No", "No"], ["Yes", "No", "No", "Yes"])
    scored = _rows(["Yes", "No", "Yes", "No"], ["Yes", "No", "No", "Yes"], [0.9, 0.2, 0.6, 0.1])
    monkeypatch.setattr(E, "evaluate", lambda *a, **k: (scored, {"seconds": 1.0, "examples_per_s": 4.0}))
    out = E.compare_modes(None, None, [{}] * 4, "generate", (gen, {"seconds": 3.0, "examples_per_s": 1.3}),
                          E.EvalSettings())
    assert out["generation_parsed"] == 3 and out["agreement"] == pytest.approx(2 / 3)
    assert out["score_speedup"] == pytest.approx(3.0) and "score_metrics" in out


def test_evaluate_with_thresholds_adds_threshold_metrics_in_score_mode(monkeypatch):
    rows = _rows(["Yes", "No", "Yes", "No"], ["Yes", "No", "No", "No"], [0.9, 0.2, 0.6, 0.4])
    monkeypatch.setattr(E, "evaluate", lambda *a, **k: (rows, {"mode": "score"}))
    monkeypatch.setattr(E, "choose_threshold", lambda *a, **k: 0.7)
    _, m = E.evaluate_with_thresholds(None, None, [], "score", E.EvalSettings(), calibration_records=[{}])
    assert m["at_0.5"]["accuracy"] == 0.75 and m["at_eval_threshold"] == {"threshold": 0.7, "accuracy": 1.0,
                                                                          "f1": 1.0}
    _, m = E.evaluate_with_thresholds(None, None, [], "score", E.EvalSettings())
    assert "at_eval_threshold" not in m


def test_save_eval_writes_predictions_metrics_and_roc(tmp_path, capsys):
    rows = _rows(["Yes", "No", "No"], ["Yes", "No", "Yes"], [0.8, 0.3, 0.4])
    R.save_eval(tmp_path, "lora", rows, {"mode": "score", "accuracy": 2 / 3, "auc": math.nan})
    R.save_eval(tmp_path, "base", rows, {"mode": "generate", "accuracy": 0.5}, primary=False)
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["base_metrics.json", "base_predictions.jsonl", "lora_predictions.jsonl",
                     "metrics_summary.json", "roc_curve.png"]  # no temporary files left behind
    assert (tmp_path / "roc_curve.png").read_bytes()[:4] == b"\x89PNG"
    assert capsys.readouterr().out.splitlines() == ["[lora] accuracy 0.6667", "[base] accuracy 0.5"]


def test_training_curves_and_histogram_are_saved_atomically(tmp_path):
    log = [{"step": 1, "loss": 0.7}, {"step": 2, "eval_loss": 0.6, "eval_accuracy": 0.5, "eval_auc": math.nan}]
    R.plot_training_curves(log, tmp_path / "curves.png")
    R.plot_length_histogram([10, 20, 30, 400], 256, "tokens", tmp_path / "sub" / "hist.png")
    assert sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*.png")) == ["curves.png", "sub/hist.png"]


def test_best_and_final():
    log = [{"eval_loss": 0.5, "step": 1}, {"eval_loss": 0.3, "step": 2}, {"eval_loss": 0.4, "step": 3}]
    assert R.best_and_final(log, "loss") == (log[1], log[2])
    assert R.best_and_final(log, "f1") == ({}, {})


def test_normalize_label_is_shared_by_formatting_and_metrics():
    from recsft import formatting, metrics

    assert formatting.normalize_label is metrics.normalize_label
    cases = [("Yes", "Yes"), (" no ", "No"), ("TRUE", "Yes"), ("false", "No"), ("1", "Yes"), (0, "No"), (1.0, "Yes"),
             (True, "Yes"), (False, "No"), ("maybe", None), (2, None), (None, None), ("", None)]
    assert [(k, metrics.normalize_label(k)) for k, _ in cases] == cases


def test_category_and_agreement():
    base = _rows(["Yes", "No", "Yes", "No"], ["Yes", "Yes", "No", "No"])
    lora = _rows(["Yes", "Yes", "No", "Yes"], ["Yes", "Yes", "No", "No"])
    for b, lo in zip(base, lora):
        b["response"], lo["response"] = b["prediction"], lo["prediction"]
    rows = E.pair_rows(base, lora)
    assert [E.category(r) for r in rows] == ["both_right", "lora_right_base_wrong", "lora_right_base_wrong",
                                             "base_right_lora_wrong"]
    assert E.agreement(rows) == {"examples": 4, "agree": 1, "disagree": 3, "lora_right_base_wrong": 2,
                                 "base_right_lora_wrong": 1, "both_right": 1, "both_wrong": 0}


def test_the_same_records_are_rendered_once_per_run(monkeypatch):
    """The base model next to the adapter, or the other mode, reuses the prompts of the records just rendered."""
    from recsft import evaluation

    calls = []

    def prompts_for(records, tok, *args):
        calls.append(len(records))
        return [f"prompt {i}" for i in range(len(records))], ["Yes"] * len(records)

    monkeypatch.setattr(evaluation, "prompts_for", prompts_for)
    monkeypatch.setattr(evaluation, "predict", lambda model, tok, prompts, mode, *a, **k:
                        [{"response": "Yes", "prediction": "Yes", "p_yes": 0.6} for _ in prompts])
    records, other, tok, settings = [{"user_id": 1}, {"user_id": 2}], [{"user_id": 3}], object(), \
        evaluation.EvalSettings()
    for model in ("lora", "base"):
        evaluation.evaluate(model, tok, records, "score", settings, "test.jsonl")
    assert calls == [2]
    evaluation.evaluate("lora", tok, other, "score", settings, "test.jsonl")
    evaluation.evaluate("lora", tok, records, "score", evaluation.EvalSettings(cutoff_len=64), "test.jsonl")
    assert calls == [2, 1, 2]  # other records, other settings: rendered again
