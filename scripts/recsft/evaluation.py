"""Evaluation shared by infer_lora, compare_base_vs_lora and the benchmarks: load, predict, score, save."""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path
from typing import Any, Sequence

from .inference import generate, max_prompt_tokens, prompts_for, score
from .io import write_json_atomic, write_jsonl_atomic
from .metrics import best_threshold, compute_metrics, extract_answer

logger = logging.getLogger(__name__)
KEEP_FIELDS = ("user_id", "history_titles", "candidate_title", "candidate_movie_id", "instruction", "input")


def load_for_eval(model_args, adapter_dir: str | None, device: str | None = None, merge: bool = False):
    """``(model, tokenizer)`` for inference: the base model, with the LoRA adapter when ``adapter_dir`` is set.

    The adapter is checked first (folder, adapter_config.json, same base model), before the model loads.
    ``merge`` folds the adapter into the weights (faster; not for quantized models, and it removes the
    ability to switch the adapter off for a base-model comparison).
    """
    from .modeling import check_adapter, get_device, is_kbit, load_adapter, load_model, load_tokenizer

    device = device or get_device()
    if adapter_dir:
        check_adapter(adapter_dir, model_args.model_name_or_path)
    tok = load_tokenizer(model_args.tokenizer_name_or_path or model_args.model_name_or_path,
                         model_args.trust_remote_code, padding_side="left")
    model = load_model(model_args.model_name_or_path, device, model_args.dtype, model_args.flash_attn,
                       model_args.quantization_bit, model_args.trust_remote_code)
    if adapter_dir:
        model = load_adapter(model, adapter_dir, model_args.model_name_or_path)
        if merge and is_kbit(model):
            logger.info("Adapter not merged: the base is %d-bit and merging would re-quantize the LoRA update; "
                        "running it unmerged (same outputs, slightly slower)", 4 if model.is_loaded_in_4bit else 8)
        elif merge:
            model = model.merge_and_unload()
    return model.eval(), tok


def predict(model, tok, prompts: Sequence[str], mode: str, batch_size: int = 16, max_new_tokens: int = 8,
            temperature: float = 0.0, top_p: float = 1.0, desc: str = "",
            cutoff_len: int | None = None) -> list[dict[str, Any]]:
    """Per prompt: ``response`` and parsed ``prediction`` (generate), plus ``p_yes`` (score).

    Prompts are cut from the left to fit ``cutoff_len`` exactly as in training.
    """
    budget = max_prompt_tokens(tok, cutoff_len)
    if mode == "score":
        rows = score(model, tok, prompts, batch_size, desc=desc or "Scoring", max_prompt_tokens=budget)
        return [{"response": r["top_token"], "prediction": "Yes" if r["p_yes"] >= 0.5 else "No",
                 "p_yes": r["p_yes"]} for r in rows]
    responses = generate(model, tok, prompts, max_new_tokens, temperature, top_p, batch_size,
                         desc=desc or "Generating", max_prompt_tokens=budget)
    return [{"response": r, "prediction": extract_answer(r)} for r in responses]


def evaluate(model, tok, records: Sequence[dict], mode: str, batch_size: int = 16, system_prompt: str | None = None,
             enable_thinking: bool = False, source: str = "data", desc: str = "",
             **gen_kwargs) -> tuple[list[dict], dict[str, float]]:
    """Predictions (one row per record, with its ids and label) and metrics on labelled records."""
    prompts, labels = prompts_for(records, tok, system_prompt, enable_thinking, source)
    start = time.perf_counter()
    preds = predict(model, tok, prompts, mode, batch_size, desc=desc, **gen_kwargs)
    seconds = time.perf_counter() - start
    rows = []
    for rec, label, pred in zip(records, labels, preds):
        row = {k: rec[k] for k in KEEP_FIELDS if k in rec}
        rows.append({**row, "label": label, **pred})
    p_yes = [r["p_yes"] for r in rows] if mode == "score" else None
    metrics = compute_metrics(labels, [r["prediction"] for r in rows], p_yes)
    metrics.update({"mode": mode, "seconds": seconds, "examples_per_s": len(rows) / max(seconds, 1e-9)})
    return rows, metrics


def threshold_metrics(labels: Sequence[str], p_yes: Sequence[float], threshold: float) -> dict[str, float]:
    preds = ["Yes" if p >= threshold else "No" for p in p_yes]
    m = compute_metrics(labels, preds)
    return {"threshold": threshold, "accuracy": m["accuracy"], "f1": m["f1"]}


def choose_threshold(model, tok, eval_records: Sequence[dict], batch_size: int, system_prompt: str | None,
                     enable_thinking: bool, cutoff_len: int | None = None) -> float:
    """P(Yes) threshold maximising accuracy on eval records (never on the test records)."""
    rows, _ = evaluate(model, tok, eval_records, "score", batch_size, system_prompt, enable_thinking,
                       desc="Scoring eval (threshold)", cutoff_len=cutoff_len)
    return best_threshold([r["label"] == "Yes" for r in rows], [r["p_yes"] for r in rows])


def plot_roc(labels: Sequence[str], p_yes: Sequence[float], path: str | Path, title: str = "ROC") -> None:
    """ROC curve PNG (written atomically)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.metrics import roc_auc_score, roc_curve

    y = [int(lab == "Yes") for lab in labels]
    if len(set(y)) < 2:
        logger.warning("ROC curve needs both classes; skipped")
        return
    fpr, tpr, _ = roc_curve(y, p_yes)
    fig, ax = plt.subplots(figsize=(5, 5))
    ax.plot(fpr, tpr, label=f"AUC = {roc_auc_score(y, p_yes):.3f}")
    ax.plot([0, 1], [0, 1], "k--", alpha=0.4, label="chance")
    ax.set(xlabel="false positive rate", ylabel="true positive rate", title=title)
    ax.legend(loc="lower right")
    ax.grid(alpha=0.3)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)


def save(out_dir: str | Path, name: str, rows: list[dict], metrics: dict, primary: bool = True) -> None:
    """``<name>_predictions.jsonl`` and ``metrics_summary.json`` (primary run) or ``<name>_metrics.json``."""
    out = Path(out_dir)
    write_jsonl_atomic(out / f"{name}_predictions.jsonl", rows)
    write_json_atomic(out / ("metrics_summary.json" if primary else f"{name}_metrics.json"), metrics)


def format_metrics(metrics: dict) -> str:
    keys = ("accuracy", "f1", "precision", "recall", "auc", "log_loss", "unparseable", "n", "examples_per_s")
    return " | ".join(f"{k} {metrics[k]:.4g}" for k in keys
                      if k in metrics and not (isinstance(metrics[k], float) and math.isnan(metrics[k])))


def display_example(row: dict, width: int = 300) -> str:
    """Readable lines for one prediction row, per data format."""
    if "candidate_title" in row:
        head = [f"user_id: {row.get('user_id')}", f"candidate: {row['candidate_title']}",
                f"history: {'; '.join(row.get('history_titles', []))}"]
    else:
        text = row.get("input", "")
        head = [f"input: {text[:width]}{'...' if len(text) > width else ''}"]
    return "\n".join(head)
