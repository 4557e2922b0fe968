"""Classical recommenders on exactly the split and test examples of a prepared data folder.

Copy-paste:

    python scripts/baselines.py                                   # all models, full test split (~2 min on CPU)
    python scripts/baselines.py --max_samples 200 --output_dir output/baselines_200
    python scripts/baselines.py --models item-rate,biases,mf,sasrec --epochs 5
    python scripts/baselines.py --data_dir data/movielens_blocks --predictions --output_dir output/rows/baselines \
        --models biases,mf,bpr,cf-biases,history-mean,last-label,prompt-lr

The split is rebuilt from the data folder (see ``recsft.movielens.load_prepared``) and checked against
test_raw.jsonl, so the training interactions are exactly the ratings that are not eval/test candidates and
the test examples are those of test_raw.jsonl. Each model's score is Platt-calibrated on the eval split (for
log-loss and the 0.5 threshold); accuracy/F1 use the threshold chosen on eval, like
``infer_lora.py --eval_mode score --calibration_samples``. Reported: accuracy, F1, AUC, UAUC (mean per-user
AUC over users with both classes), log-loss.

Models (``--models``): item-rate, user-rate (hand-written smoothed like-rates: no library has them),
mostpop, biases, mf, bpr, sasrec (Cornac); cf-biases, cf-mf: the collaborative-filtering residual alone
(``recsft.cf``: Cornac BaselineOnly / MF whose predicted rating is turned into a like-logit by a calibration
fitted on 5-fold out-of-fold predictions of the training interactions); their P(Yes) is sigmoid(logit), not
Platt-calibrated on eval. On a folder prepared with ``--format blocks`` also history-mean, last-label and
prompt-lr: predictors that read only the numbers the candidate-block prompts show (the history ratings, the
user's and the candidate's like-rates and counts), the logistic regression fit on the training answers.
Ranking metrics: scripts/rank_eval.py.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from utils import ArgumentParser, DataError, non_negative_int, output_dir, positive_int, run


def parse_args(argv: list[str] | None = None):
    from utils import MODELS, PROMPT_MODELS

    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data_dir", default="data/movielens_qwen3", help="folder written by prepare_data.py")
    p.add_argument("--max_samples", type=positive_int, default=None, help="first N test examples (as infer_lora)")
    p.add_argument("--output_dir", type=output_dir, default="output/baselines")
    p.add_argument("--models", default=",".join(MODELS),
                   help=f"comma list of {', '.join(MODELS)}; on candidate-block data also {', '.join(PROMPT_MODELS)}")
    p.add_argument("--epochs", type=positive_int, default=5, help="epochs of SASRec")
    p.add_argument("--seed", type=non_negative_int, default=0)
    p.add_argument("--predictions", action="store_true",
                   help="also write <output_dir>/<model>/predictions.jsonl + metrics_summary.json per model "
                        "(calibrated P(Yes) per test example; scripts/compare_runs.py reads them)")
    return p.parse_args(argv)


def main(args) -> dict:
    from utils import (LABELS, MODELS, PROMPT_LABELS, PROMPT_MODELS, atomic_path, evaluate_scores, fit_scorers,
                       load_prepared, pointwise_scores, prediction_files, prompt_scorers, train_ratings, writable_dir,
                       write_json_atomic, write_jsonl_atomic)

    writable_dir(args.output_dir, "--output_dir")
    names = [n.strip() for n in args.models.split(",") if n.strip()]
    unknown = [n for n in names if n not in MODELS + PROMPT_MODELS]
    if unknown:
        raise DataError(f"--models: unknown {unknown}; choose from {', '.join(MODELS + PROMPT_MODELS)}")
    if not names:
        raise DataError(f"--models {args.models!r}: no model named; give a comma list of {', '.join(MODELS)}")
    if args.predictions:  # every per-model folder is checked before any fitting
        for name in names:
            writable_dir(Path(args.output_dir) / name, "--predictions (--output_dir)")
    data = load_prepared(args.data_dir)
    test = data.splits["test"][: args.max_samples] if args.max_samples else data.splits["test"]
    train = train_ratings(data.ratings, data.splits)
    prompt = [n for n in names if n in PROMPT_MODELS]
    scorers = prompt_scorers(args.data_dir, prompt, args.seed) if prompt else {}
    scorers.update(fit_scorers([n for n in names if n not in prompt], train, data.ratings,
                               data.params["like_threshold"], args.seed, epochs=args.epochs))
    eval_y = [e["label"] == "Yes" for e in data.splits["eval"]]
    test_y = [e["label"] == "Yes" for e in test]
    users = [e["user_id"] for e in test]
    results = {"always Yes": evaluate_scores([1.0] * len(eval_y), eval_y, [1.0] * len(test), test_y, users)}
    files = {}
    for name, fn in scorers.items():
        ev = pointwise_scores(fn, data.splits["eval"], f"{name} eval", progress=True)
        te = pointwise_scores(fn, test, f"{name} test", progress=True)
        m = evaluate_scores(ev, eval_y, te, test_y, users, keep_probs=True, calibrated=getattr(fn, "calibrated", False))
        files[name] = prediction_files(test, m.pop("p_yes"), m)
        results[LABELS.get(name) or PROMPT_LABELS[name]] = m
    print(f"{'model':42s} {'accuracy':>8s} {'F1':>6s} {'AUC':>6s} {'UAUC':>6s} {'logloss':>7s}  (n={len(test)})")
    for name, m in results.items():
        print(f"{name:42s} {m['accuracy']:8.4f} {m['f1']:6.4f} {m['auc']:6.4f} {m['uauc']:6.4f} {m['log_loss']:7.4f}")
    if args.predictions:  # each model's folder is replaced as a whole (atomic_path), never left half-written
        for name, (rows, summary) in files.items():
            with atomic_path(Path(args.output_dir) / name) as tmp:
                tmp.mkdir()
                write_jsonl_atomic(tmp / "predictions.jsonl", rows)
                write_json_atomic(tmp / "metrics_summary.json", summary)
    write_json_atomic(Path(args.output_dir) / "baselines.json",
                      {"test_examples": len(test), "train_ratings": len(train), "results": results})
    return results


if __name__ == "__main__":
    run(main, parse_args)
