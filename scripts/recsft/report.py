"""What a run leaves behind for people: figures (written atomically), metric lines, example views,
prediction files and the training summary. The last stage of the pipeline: it may use every other one."""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any, Sequence

from .io import atomic_path, write_json_atomic, write_jsonl_atomic

logger = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------------- figures
def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: str | Path, dpi: int = 110) -> None:
    """Save a matplotlib figure as a PNG atomically (:func:`recsft.io.atomic_path`) and close it."""
    try:
        with atomic_path(path) as tmp:
            fig.savefig(tmp, dpi=dpi, format="png")
    finally:
        _pyplot().close(fig)


def plot_roc(labels: Sequence[str], p_yes: Sequence[float], path: str | Path, title: str = "ROC") -> None:
    """ROC curve PNG (written atomically)."""
    from sklearn.metrics import roc_auc_score, roc_curve

    plt = _pyplot()
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
    save_figure(fig, path)


def plot_training_curves(log_history: list[dict], path: str | Path) -> None:
    """Train loss and eval loss/accuracy/F1/AUC against steps, saved as a PNG."""
    plt = _pyplot()
    train = [(e["step"], e["loss"]) for e in log_history if "loss" in e and "step" in e]
    evals = [e for e in log_history if "eval_loss" in e]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    if train:
        ax1.plot(*zip(*train), label="train loss")
    if evals:
        ax1.plot([e["step"] for e in evals], [e["eval_loss"] for e in evals], "o-", label="eval loss")
        for key in ("eval_accuracy", "eval_f1", "eval_auc", "eval_uauc"):
            pts = [(e["step"], e[key]) for e in evals if key in e and not math.isnan(e[key])]
            if pts:
                ax2.plot(*zip(*pts), "o-", label=key.replace("eval_", ""))
    ax1.set(xlabel="step", ylabel="loss", title="Loss")
    ax2.set(xlabel="step", ylim=(0, 1), title="Eval metrics (answer token)")
    for ax in (ax1, ax2):
        if ax.get_legend_handles_labels()[0]:
            ax.legend()
        ax.grid(alpha=0.3)
    fig.tight_layout()
    save_figure(fig, path)


def plot_length_histogram(lengths, cutoff: int, unit: str, path: str | Path) -> None:
    """Histogram of sequence lengths with the p95 line (and ``cutoff_len`` when counting tokens)."""
    import numpy as np

    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.hist(lengths, bins=60, color="tab:blue", alpha=0.8)
    if unit == "tokens":
        ax.axvline(cutoff, color="tab:red", linestyle="--", label=f"cutoff_len = {cutoff}")
    ax.axvline(np.percentile(lengths, 95), color="tab:orange", linestyle=":", label="p95")
    ax.set(xlabel=f"sequence length ({unit})", ylabel="examples", title=f"Length distribution ({len(lengths)} examples)")
    ax.legend()
    fig.tight_layout()
    save_figure(fig, path)


# ------------------------------------------------------------------------------------- text and files
def format_metrics(metrics: dict) -> str:
    """``accuracy 0.75 | f1 0.7 | ...``: the headline metrics present in ``metrics`` (NaNs left out)."""
    keys = ("accuracy", "f1", "precision", "recall", "auc", "uauc", "log_loss", "unparseable", "n", "examples_per_s")
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


def save_eval(out_dir: str | Path, name: str, rows: list[dict], metrics: dict, primary: bool = True) -> None:
    """One evaluated model: ``<name>_predictions.jsonl``, ``metrics_summary.json`` (primary run) or
    ``<name>_metrics.json``, in score mode ``roc_curve.png`` / ``<name>_roc_curve.png``; prints one line."""
    out = Path(out_dir)
    if metrics.get("mode") == "score":
        plot_roc([r["label"] for r in rows], [r["p_yes"] for r in rows],
                 out / ("roc_curve.png" if primary else f"{name}_roc_curve.png"),
                 title=f"{name} ROC ({len(rows)} examples)")
    write_jsonl_atomic(out / f"{name}_predictions.jsonl", rows)
    write_json_atomic(out / ("metrics_summary.json" if primary else f"{name}_metrics.json"), metrics)
    print(f"[{name}] {format_metrics(metrics)}", flush=True)


# ---------------------------------------------------------------------------------- training summary
def best_and_final(log_history: list[dict], metric: str) -> tuple[dict, dict]:
    """The best eval entry by ``metric`` (lowest loss, highest otherwise) and the last one."""
    evals = [e for e in log_history if f"eval_{metric}" in e]
    if not evals:
        return {}, {}
    greater = metric != "loss"
    best = max(evals, key=lambda e: e[f"eval_{metric}"] * (1 if greater else -1))
    return best, evals[-1]


def data_stats(dataset: str, dataset_dir: str) -> dict:
    """Format and prompt features of the training data, from the stats file prepare_data wrote next to it."""
    from .formatting import resolve_dataset
    from .io import load_json

    train_file = Path(resolve_dataset(dataset, dataset_dir))
    kind = next((k for k in ("session", "blocks") if train_file.name.startswith(f"{k}_")), None)
    stats_file = train_file.with_name(f"{kind}_stats.json" if kind else "stats.json")
    stats = load_json(stats_file) if stats_file.is_file() else None
    if not isinstance(stats, dict):
        return {}
    params, train = stats.get("params", {}), stats.get("splits", {}).get("train", {})
    per_example = train.get("answers", train.get("examples", 1)) / train["examples"] if train.get("examples") else 1.0
    return {"format": stats.get("format", "single"), "features": params.get("features") or [],
            "retrieval_history": bool(params.get("retrieval_history")), "answers_per_example": per_example}


def finish_training(trainer, tokenizer, cfg, eval_path: str | None, result, wall: float, device: str,
                    cf_fit: dict | None = None) -> dict:
    """Save the final (best) adapter, run the optional generation eval, write summary and curves (``cf_fit``: a
    stacked CF residual's fit, recorded in the summary)."""
    from .evaluation import EvalSettings, generation_eval

    out = cfg.train.output_dir
    trainer.save_model(out)
    summary: dict[str, Any] = {}
    if trainer.is_world_process_zero():
        tokenizer.save_pretrained(out)
        state = trainer.state
        best, final = best_and_final(state.log_history, cfg.train.metric_for_best_model)
        tokens = float(trainer.train_tokens)
        runtime = float(result.metrics.get("train_runtime", 0.0)) or 1e-9
        summary = {"model": cfg.model.model_name_or_path, "device": device, "global_step": state.global_step,
                   "epoch": state.epoch, "train_loss": result.metrics.get("train_loss"),
                   "train_runtime_s": runtime, "wall_time_s": wall, "train_tokens": tokens,
                   "tokens_per_s": tokens / runtime,
                   "train_examples_seen": state.global_step * cfg.train.per_device_train_batch_size
                   * cfg.train.gradient_accumulation_steps * trainer.args.world_size,
                   "train_labels_seen": trainer.train_answers,
                   "data_stats": data_stats(cfg.data.dataset, cfg.data.dataset_dir),
                   "budget_minutes_used": (trainer.time_budget.used_s / 60 if trainer.time_budget else None),
                   "budget_clock": cfg.train.budget_clock, "best_checkpoint": state.best_model_checkpoint,
                   "best_metric": state.best_metric, "metric_for_best_model": cfg.train.metric_for_best_model,
                   "best_eval": best, "final_eval": final, "config": cfg.to_dict(),
                   "log_history": state.log_history, **({"cf_residual_fit": cf_fit} if cf_fit else {})}
        from .modeling import sharded_launch

        sharded = sharded_launch()
        if cfg.train.gen_eval_samples and eval_path and sharded:
            # rank 0 alone cannot run a model whose weights are sharded over every rank (it would wait forever)
            print(f"Generation eval skipped under {sharded}: run scripts/infer_lora.py on the saved adapter",
                  flush=True)
        elif cfg.train.gen_eval_samples and eval_path:
            settings = EvalSettings(batch_size=cfg.train.per_device_eval_batch_size,
                                    system_prompt=cfg.data.system_prompt, enable_thinking=cfg.model.enable_thinking,
                                    cutoff_len=cfg.data.cutoff_len)  # greedy, max_new_tokens=8
            gen = generation_eval(trainer.model, tokenizer, eval_path, cfg.train.gen_eval_samples, settings)
            summary["gen_eval"] = gen
            print("Generation eval (greedy, max_new_tokens=8): " +
                  " | ".join(f"{k} {v:.4g}" for k, v in gen.items()), flush=True)
        write_json_atomic(Path(out) / "training_summary.json", summary)
        plot_training_curves(state.log_history, Path(out) / "training_curves.png")
        print(f"Training complete: {state.global_step} steps in {wall:.0f}s; adapter saved to {out}; "
              f"best {cfg.train.metric_for_best_model} = {state.best_metric}", flush=True)
    return summary


# --------------------------------------------------------------------------------------- run comparison
RESULT_COLUMNS = ("model", "format", "features", "loss", "train examples", "train tokens", "train wall time",
                  "device", "test examples", "accuracy", "F1", "AUC", "UAUC", "log-loss")


def _fmt(value: Any, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def result_row(label: str, metrics: dict, training: dict | None = None, data: dict | None = None) -> dict:
    """One row of the results table from an eval's metrics, the run's training summary and its data stats."""
    training, data = training or {}, data or {}
    cfg = training.get("config", {})  # the flat effective config
    budget = training.get("budget_minutes_used")
    wall = training.get("wall_time_s")
    seen = training.get("train_labels_seen")
    examples = training.get("train_examples_seen")
    if seen:
        seen_text = f"{seen:,}"
    elif examples and data.get("answers_per_example", 1.0) != 1.0:  # runs from before answers were counted
        seen_text = f"≈{examples * data['answers_per_example']:,.0f} ({examples:,} sessions)"
    else:
        seen_text = f"{examples:,}" if examples else "–"
    at = metrics.get("at_eval_threshold") or {}  # accuracy/F1 at the threshold chosen on eval data
    return {
        "model": label,
        "format": data.get("format", "single") if training else "–",
        "features": ", ".join(data.get("features") or []) or ("none" if training else "–"),
        "loss": cfg.get("loss_type", "nll") if training else "–",
        "train examples": seen_text,
        "train tokens": f"{int(training['train_tokens']):,}" if training.get("train_tokens") else "–",
        "train wall time": (f"{wall / 60:.0f} min" + (f" ({budget:.0f} CPU-min of steps)" if budget else ""))
        if wall else "–",
        "device": training.get("device", "–"),
        "test examples": f"{int(metrics.get('n', 0)):,}",
        "accuracy": _fmt(at.get("accuracy", metrics.get("accuracy"))),
        "F1": _fmt(at.get("f1", metrics.get("f1"))),
        "AUC": _fmt(metrics.get("auc")),
        "UAUC": _fmt(metrics.get("uauc")),
        "log-loss": _fmt(metrics.get("log_loss")),
    }


def results_table(rows: list[dict]) -> str:
    """A markdown table of :func:`result_row` rows (plus any extra columns the rows carry, e.g. bootstrap deltas)."""
    columns = list(RESULT_COLUMNS) + [c for c in dict.fromkeys(k for r in rows for k in r) if c not in RESULT_COLUMNS]
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(str(r.get(c, "")) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def delta_columns(reference: str, d: dict) -> dict:
    """Table cells of a paired bootstrap (:func:`recsft.metrics.paired_user_bootstrap`) against ``reference``."""
    pct = f"{d['confidence']:.0%}"
    return {f"ΔAUC vs {reference} [{pct} CI]": f"{d['delta_auc']:+.3f} [{d['delta_auc_low']:+.3f}, {d['delta_auc_high']:+.3f}]",
            f"ΔUAUC vs {reference} [{pct} CI]":
                f"{d['delta_uauc']:+.3f} [{d['delta_uauc_low']:+.3f}, {d['delta_uauc_high']:+.3f}]"}


def auc_curve(log_history: list[dict], examples_per_step: int,
              answers_per_example: float = 1.0) -> list[tuple[int, float]]:
    """(training answers seen, eval AUC) at every evaluation of a run.

    Answers are counted by the trainer (``num_answers`` in the log); for runs logged without that count they
    are estimated as steps x examples per step x the data's mean answers per example."""
    points, answers = [], None
    for e in log_history:
        answers = e.get("num_answers", answers)
        if "eval_auc" in e and "step" in e:
            seen = answers if answers is not None else e["step"] * examples_per_step * answers_per_example
            points.append((int(seen), float(e["eval_auc"])))
    return points


def uauc_curve(log_history: list[dict]) -> list[tuple[int, float]]:
    """(training answers seen, eval UAUC) at every evaluation that logged both (see :func:`auc_curve`)."""
    points, answers = [], None
    for e in log_history:
        answers = e.get("num_answers", answers)
        if "eval_uauc" in e and answers is not None:
            points.append((int(answers), float(e["eval_uauc"])))
    return points


def plot_auc_curves(curves: dict[str, list[tuple[int, float]]], path: str | Path,
                    uauc_curves: dict[str, list[tuple[int, float]]] | None = None) -> None:
    """Eval AUC (and, when given, UAUC in a second panel) against training answers seen, one line per run (PNG)."""
    plt = _pyplot()
    panels = [("eval AUC", curves)] + ([("eval UAUC", uauc_curves)] if uauc_curves else [])
    fig, axes = plt.subplots(1, len(panels), figsize=(7 * len(panels), 4.5), squeeze=False)
    for ax, (what, lines) in zip(axes[0], panels):
        for name, points in lines.items():
            if points:
                xs, ys = zip(*points)
                ax.plot(xs, ys, marker="o", label=name)
        ax.axhline(0.5, color="k", ls="--", alpha=0.4, label="chance")
        ax.set(xlabel="training examples (answers) seen", ylabel=what, title=f"{what.capitalize()} during training")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    save_figure(fig, path)
