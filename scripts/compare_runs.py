"""Put evaluated runs side by side: one results table (markdown + JSON) and a PNG of eval AUC during training.

Copy-paste:

    # each --row is LABEL=EVAL_DIR (zero-shot, baselines) or LABEL=EVAL_DIR@TRAIN_DIR (a fine-tuned run)
    python scripts/compare_runs.py --out output/compare_runs \
        --row "SmolLM2-135M zero-shot=output/eval_base" \
        --row "SmolLM2-135M + LoRA=output/eval_lora@output/smollm2-movielens-lora"

A row ending in ``#llm`` (``LABEL=EVAL_DIR@TRAIN_DIR#llm``) scores an adapter trained with a CF residual by its
LLM alone (``llm_p_yes`` of the same predictions): the text-only row of a two-stage run, without scoring twice.

EVAL_DIR is an ``infer_lora.py --output_dir`` (or a ``baselines.py`` per-model folder): its predictions file
(``*predictions.jsonl`` with ``label``, ``p_yes`` and ``user_id``) is re-scored here with the toolkit's one
metrics function, so every row is computed the same way; accuracy and F1 use the threshold the eval chose on
eval data (``metrics_summary.json``), not one tuned on the test rows. TRAIN_DIR is a ``finetune_lora.py``
output_dir: its ``training_summary.json`` gives the training budget columns (examples or answers seen, tokens,
wall time, CPU minutes of steps, device) and its last checkpoint's log the AUC-vs-examples curve. Rows that
are compared must be evaluated on the same test file: the script refuses rows whose test rows (user, movie
and label) differ, so data prepared with another --like-threshold cannot slip in. ``--users``: a JSON list of
user ids (integers or strings) naming at least one test row. A folder holding several predictions files
(``infer_lora.py --compare_base`` writes lora_ and base_) is refused: name the file,
``LABEL=EVAL_DIR/base_predictions.jsonl`` (its ``base_metrics.json`` gives the threshold). Each row needs
its own label.

With ``--reference LABEL`` every other row also gets ΔAUC and ΔUAUC against that row with a 95% interval from a
paired bootstrap over users (the same resampled users score both rows; ``scipy.stats.bootstrap``, BCa).

Outputs in --out: results.md, results.json, auc_vs_examples.png (eval AUC and UAUC against answers trained).
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

from utils import ArgumentParser, DataError, output_dir, run

PREDICTION_KEYS = {"label": str, "p_yes": (int, float)}
LLM_ONLY = "#llm"  # a row suffix: score an adapter trained with a CF residual by its LLM alone (llm_p_yes)


def parse_args(argv: list[str] | None = None):
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--row", action="append", required=True, metavar="LABEL=EVAL_DIR[@TRAIN_DIR]")
    p.add_argument("--out", type=output_dir, default="output/compare_runs")
    p.add_argument("--reference", default=None, metavar="LABEL",
                   help="a row's label: every other row gets ΔAUC and ΔUAUC against it with a 95%% interval from a "
                        "paired bootstrap over users (scipy.stats.bootstrap, --resamples)")
    p.add_argument("--resamples", type=int, default=1000, help="bootstrap resamples (with --reference)")
    p.add_argument("--users", default=None, help="JSON list of user ids: keep only these users' test rows in "
                                                 "every row (a fixed subset when some rows are too slow for all)")
    return p.parse_args(argv)


def parse_row(spec: str) -> tuple[str, Path, Path | None, str]:
    """``(label, eval_dir, train_dir or None, score column)``; a trailing ``#llm`` scores the row by ``llm_p_yes``."""
    label, sep, paths = spec.partition("=")
    column = "p_yes"
    if paths.endswith(LLM_ONLY):
        paths, column = paths[: -len(LLM_ONLY)], "llm_p_yes"
    if not sep or not label.strip() or not paths:
        raise DataError(f"--row {spec!r}: expected LABEL=EVAL_DIR or LABEL=EVAL_DIR@TRAIN_DIR (+ #llm)")
    eval_dir, _, train_dir = paths.partition("@")
    for folder in (eval_dir, train_dir):
        if folder == eval_dir and Path(folder).is_file() and folder.endswith("predictions.jsonl"):
            continue  # one predictions file of a folder that holds several
        if folder and Path(folder).exists() and not Path(folder).is_dir():
            raise DataError(f"--row {spec!r}: {folder!r} is a file, not a folder; give the output folder of "
                            f"{'infer_lora.py (or one of its *predictions.jsonl)' if folder == eval_dir else 'finetune_lora.py'}")
        if folder and not Path(folder).is_dir():
            raise DataError(f"--row {spec!r}: folder {folder!r} does not exist")
    return label.strip(), Path(eval_dir), Path(train_dir) if train_dir else None, column


def predictions_file(eval_dir: Path) -> Path:
    """The one ``*predictions.jsonl`` of ``eval_dir`` (or ``eval_dir`` itself when it is such a file). A folder
    holding several (``infer_lora.py --compare_base``: lora_ and base_) is ambiguous: the row must name the file."""
    if eval_dir.is_file():
        return eval_dir
    found = sorted(eval_dir.glob("*predictions.jsonl"))
    if not found:
        raise DataError(f"{eval_dir}: no *predictions.jsonl; run infer_lora.py --eval_mode score "
                        f"--output_dir {eval_dir} first")
    if len(found) > 1:
        raise DataError(f"{eval_dir}: holds {len(found)} predictions files ({', '.join(f.name for f in found)}); name "
                        f"the one this row shows, e.g. --row 'LABEL={found[0]}'")
    return found[0]


def summary_file(predictions: Path) -> Path:
    """``metrics_summary.json`` of the folder's primary run, or ``<name>_metrics.json`` of a secondary one."""
    name = predictions.name[: -len("predictions.jsonl")].rstrip("_")
    own = predictions.parent / f"{name}_metrics.json"
    return own if name and own.is_file() else predictions.parent / "metrics_summary.json"


def load_run(label: str, eval_dir: Path, train_dir: Path | None, keep_users: set | None = None,
             keep_users_file: str | None = None, column: str = "p_yes"):
    """(row, (AUC curve, UAUC curve), test keys, {(user, movie): (label, p_yes)}) of one run (only the test rows of
    ``keep_users`` when given). ``column="llm_p_yes"``: the LLM's own P(Yes) of a run with a CF residual, with
    accuracy/F1 at 0.5 (the eval's threshold was chosen for the residual's P(Yes))."""
    from utils import (auc_curve, compute_metrics, load_data, load_json, normalize_label, require_keys, result_row,
                       uauc_curve)

    path = predictions_file(eval_dir)
    rows = load_data(path)
    if keep_users is not None:
        rows = [r for r in rows if r.get("user_id") in keep_users]
    if not rows:
        raise DataError(f"--users {keep_users_file}: none of these users has a test row in {path}; give user ids "
                        f"of the evaluated test file (as they appear in its user_id field)")
    if column != "p_yes":
        if any(r.get(column) is None for r in rows):
            raise DataError(f"--row {label!r}: {path} has no {column} (written only for an adapter trained with a CF "
                            f"residual); drop {LLM_ONLY} from the row")
        rows = [{**r, "p_yes": r[column]} for r in rows]
    if any(r.get("p_yes") is None for r in rows):
        raise DataError(f"{eval_dir}: predictions without p_yes; evaluate with --eval_mode score")
    require_keys(rows, PREDICTION_KEYS, path, "re-run infer_lora.py --eval_mode score")
    bad = next((i for i, r in enumerate(rows, 1) if normalize_label(r["label"]) is None
                or not 0.0 <= r["p_yes"] <= 1.0), None)
    if bad:
        raise DataError(f"{path}: record {bad}: label must be Yes/No and p_yes in [0, 1], got "
                        f"{rows[bad - 1]['label']!r} / {rows[bad - 1]['p_yes']!r}; re-run infer_lora.py")
    summary_path = summary_file(path)
    summary = load_json(summary_path) if summary_path.is_file() else {}
    if not isinstance(summary, dict) or not isinstance(summary.get("at_eval_threshold") or {}, dict):
        raise DataError(f"{summary_path}: expected an infer_lora.py metrics object; re-run infer_lora.py")
    threshold = (summary.get("at_eval_threshold") or {}).get("threshold") if column == "p_yes" else None
    if threshold is not None and (not isinstance(threshold, (int, float)) or isinstance(threshold, bool)
                                  or not math.isfinite(threshold)):
        raise DataError(f"{summary_path}: at_eval_threshold.threshold must be a finite number, got {threshold!r}; "
                        f"re-run infer_lora.py")
    labels, p_yes = [r["label"] for r in rows], [float(r["p_yes"]) for r in rows]
    users = [r.get("user_id") for r in rows]
    cut = 0.5 if threshold is None else threshold  # 0.0 is a threshold (every row Yes), not a missing one
    metrics = compute_metrics(labels, ["Yes" if p >= cut else "No" for p in p_yes], p_yes,
                              user_ids=users if None not in users else None)
    metrics["at_eval_threshold"] = ({"accuracy": metrics["accuracy"], "f1": metrics["f1"]} if threshold is not None
                                    else {})
    training, data, curve, ucurve = None, None, [], []
    if train_dir is not None:
        if not (train_dir / "training_summary.json").is_file():
            raise DataError(f"--row {label!r}: {train_dir / 'training_summary.json'} not found: {train_dir} is not the "
                            f"output_dir of a finished finetune_lora.py run (the summary is written when training "
                            f"ends); finish the run (finetune_lora.py --resume) or drop @{train_dir}")
        training = load_json(train_dir / "training_summary.json")
        if not isinstance(training, dict):
            raise DataError(f"{train_dir / 'training_summary.json'}: expected a JSON object (finetune_lora.py output)")
        data = training.get("data_stats") or {}
        cfg = training.get("config", {})  # flat: every key of the effective config
        sizes = [cfg.get("per_device_train_batch_size", 1), cfg.get("gradient_accumulation_steps", 1)]
        if not all(isinstance(x, int) and not isinstance(x, bool) and x > 0 for x in sizes):
            raise DataError(f"{train_dir / 'training_summary.json'}: config.per_device_train_batch_size and "
                            f"gradient_accumulation_steps must be positive integers, got {sizes}; use the file "
                            f"finetune_lora.py wrote")
        per_step = sizes[0] * sizes[1]
        history = training.get("log_history") or last_log_history(train_dir)
        curve = auc_curve(history, per_step, data.get("answers_per_example", 1.0))
        ucurve = uauc_curve(history)
    keys = sorted(((r.get("user_id"), r.get("candidate_movie_id"), normalize_label(r["label"])) for r in rows),
                  key=repr)
    scores = {(r.get("user_id"), r.get("candidate_movie_id")): float(r["p_yes"]) for r in rows}
    return result_row(label, metrics, training, data), (curve, ucurve), keys, scores


def add_deltas(results: list[dict], scores: dict, keys: list, reference: str, resamples: int) -> dict:
    """In place: each row but the reference gets ΔAUC / ΔUAUC against it (paired user bootstrap on the same test
    rows, ``keys`` = (user, movie, label)); returns the bootstrap results by row label."""
    from utils import delta_columns, paired_user_bootstrap

    y = [k[2] == "Yes" for k in keys]
    ref = [scores[reference][k[:2]] for k in keys]
    out = {}
    for row in results:
        if row["model"] == reference:
            continue
        d = paired_user_bootstrap(y, [scores[row["model"]][k[:2]] for k in keys], ref, [k[0] for k in keys],
                                  n_resamples=resamples)
        row.update(delta_columns(reference, d))
        out[row["model"]] = d
    return out


def last_log_history(train_dir: Path) -> list[dict]:
    from utils import load_json

    states = sorted(train_dir.glob("checkpoint-*/trainer_state.json"), key=lambda p: int(p.parent.name.split("-")[1]))
    return load_json(states[-1]).get("log_history", []) if states else []


def main(args) -> dict:
    from utils import load_json, plot_auc_curves, results_table, writable_dir, write_json_atomic, write_text_atomic

    writable_dir(args.out, "--out")
    specs = [parse_row(s) for s in args.row]
    labels = [label for label, *_ in specs]
    twice = next((x for x in labels if labels.count(x) > 1), None)
    if twice is not None:
        raise DataError(f"--row {twice!r}: this label is given to {labels.count(twice)} rows; give each row its own "
                        f"label")
    if args.reference is not None and args.reference not in labels:
        raise DataError(f"--reference {args.reference!r}: no --row has that label; give one of {', '.join(labels)}")
    out = Path(args.out)
    if args.users and not Path(args.users).is_file():
        raise DataError(f"--users {args.users}: {'is a folder, not' if Path(args.users).is_dir() else 'no such'} "
                        f"file; give a JSON file holding a list of user ids")
    users = load_json(args.users) if args.users else None
    if users is not None and (not isinstance(users, list) or not users or not all(
            isinstance(u, (int, str)) and not isinstance(u, bool) for u in users)):
        raise DataError(f"--users {args.users}: expected a non-empty JSON list of user ids (integers or strings)")
    users = set(users) if users is not None else None
    results, curves, ucurves, first_keys, scores = [], {}, {}, None, {}
    for label, eval_dir, train_dir, column in specs:
        row, (curve, ucurve), keys, scores[label] = load_run(label, eval_dir, train_dir, users, args.users, column)
        if first_keys is not None and keys != first_keys:
            pairs, first_pairs = [k[:2] for k in keys], [k[:2] for k in first_keys]
            if pairs == first_pairs:
                n = sum(a != b for a, b in zip(keys, first_keys))
                raise DataError(f"--row {label!r}: same (user, movie) test rows as the first row, but {n} labels "
                                f"differ (data prepared with another --like-threshold or --rating-scale?); compare "
                                f"runs evaluated on the same test file")
            raise DataError(f"--row {label!r}: its test rows differ from the first row's; compare runs evaluated "
                            "on the same test file")
        first_keys = keys
        results.append(row)
        if curve:
            curves[label] = curve
        if ucurve:
            ucurves[label] = ucurve
    deltas = add_deltas(results, scores, first_keys, args.reference, args.resamples) if args.reference else {}
    table = results_table(results)
    write_text_atomic(out / "results.md", table + "\n")
    write_json_atomic(out / "results.json", {"rows": results, "curves": curves, "uauc_curves": ucurves,
                                             "bootstrap": {"reference": args.reference, "rows": deltas}})
    if curves:
        plot_auc_curves(curves, out / "auc_vs_examples.png", ucurves)
    print(table)
    return {"rows": results}


if __name__ == "__main__":
    run(main, parse_args)
