"""Classical recommenders on exactly the same split and test examples as the LLM, with the same metrics.

Copy-paste:

    python scripts/baselines.py                                  # bundled MovieLens-100K, full test split
    python scripts/baselines.py --max_samples 300 --output_dir output/baselines

The split is rebuilt from the data folder's stats.json (same source, history_len, threshold, ratios, seed),
so the training interactions are exactly the ratings that are not eval/test candidates, and the test
examples are those of test_raw.jsonl. Each model outputs a score per example; it is Platt-calibrated on the
eval split (for log-loss and the 0.5 threshold), and accuracy/F1 use the threshold chosen on eval, like
`infer_lora.py --eval_mode score --calibration_samples`.

Models: always-Yes / popularity (item like-rate), user like-rate, user+item biases (regularised
least squares), and matrix factorisation (scikit-learn TruncatedSVD on the bias residuals).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pandas as pd

from recsft.cli import ArgumentParser, output_dir, positive_int, run
from recsft.io import DataError

TEST_KEYS = {"user_id": int, "candidate_movie_id": int, "label": str}


def parse_args(argv: list[str] | None = None):
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data_dir", default="data/movielens_qwen3", help="folder written by prepare_data.py")
    p.add_argument("--max_samples", type=positive_int, default=None, help="first N test examples (as infer_lora)")
    p.add_argument("--output_dir", type=output_dir, default="output/baselines")
    p.add_argument("--svd_rank", type=positive_int, default=20)
    return p.parse_args(argv)


def train_ratings(ratings: pd.DataFrame, splits: dict) -> pd.DataFrame:
    """Ratings visible at training time: every rating that is not an eval or test candidate."""
    held = {(e["user_id"], e["candidate_movie_id"]) for name in ("eval", "test") for e in splits[name]}
    keys = list(zip(ratings.user_id, ratings.movie_id))
    return ratings[[k not in held for k in keys]]


def smoothed_rate(liked: pd.Series, key: pd.Series, prior: float, strength: float = 5.0) -> dict:
    g = pd.DataFrame({"k": key, "y": liked}).groupby("k").y.agg(["sum", "count"])
    return ((g["sum"] + strength * prior) / (g["count"] + strength)).to_dict()


def fit_biases(train: pd.DataFrame, reg: float = 5.0, iters: int = 10):
    """mu + b_user + b_item by alternating regularised least squares."""
    mu = train.rating.mean()
    bu = pd.Series(0.0, index=train.user_id.unique())
    bi = pd.Series(0.0, index=train.movie_id.unique())
    for _ in range(iters):
        r = train.rating - mu - bu.reindex(train.user_id).values
        bi = r.groupby(train.movie_id.values).sum() / (train.groupby("movie_id").size() + reg)
        r = train.rating - mu - bi.reindex(train.movie_id).values
        bu = r.groupby(train.user_id.values).sum() / (train.groupby("user_id").size() + reg)
    return mu, bu.to_dict(), bi.to_dict()


def fit_svd(train: pd.DataFrame, mu: float, bu: dict, bi: dict, rank: int, seed: int = 0):
    """TruncatedSVD of the sparse user x item residual matrix (scikit-learn)."""
    from scipy.sparse import csr_matrix
    from sklearn.decomposition import TruncatedSVD

    users = {u: k for k, u in enumerate(sorted(train.user_id.unique()))}
    items = {m: k for k, m in enumerate(sorted(train.movie_id.unique()))}
    resid = train.rating - mu - train.user_id.map(bu) - train.movie_id.map(bi)
    mat = csr_matrix((resid.values, (train.user_id.map(users), train.movie_id.map(items))),
                     shape=(len(users), len(items)))
    svd = TruncatedSVD(n_components=min(rank, min(mat.shape) - 1), random_state=seed)
    u_factors = svd.fit_transform(mat)
    return users, items, u_factors, svd.components_.T


def scorers(train: pd.DataFrame, threshold: float, rank: int) -> dict:
    """name -> function(example) -> score (higher = more likely to be liked)."""
    liked = (train.rating >= threshold).astype(float)
    prior = liked.mean()
    item_rate = smoothed_rate(liked, train.movie_id, prior)
    user_rate = smoothed_rate(liked, train.user_id, prior)
    mu, bu, bi = fit_biases(train)
    users, items, uf, itf = fit_svd(train, mu, bu, bi, rank)

    def bias(e):
        return mu + bu.get(e["user_id"], 0.0) + bi.get(e["candidate_movie_id"], 0.0)

    def mf(e):
        u, i = users.get(e["user_id"]), items.get(e["candidate_movie_id"])
        return bias(e) + (float(uf[u] @ itf[i]) if u is not None and i is not None else 0.0)

    return {"always Yes (majority of train)": lambda e: 1.0,
            "popularity (item like-rate)": lambda e: item_rate.get(e["candidate_movie_id"], prior),
            "user like-rate": lambda e: user_rate.get(e["user_id"], prior),
            "user+item biases": bias,
            f"matrix factorisation (TruncatedSVD r={rank})": mf}


def evaluate_scores(eval_scores, eval_y, test_scores, test_y, test_users=None) -> dict:
    """Platt-calibrate on eval, threshold on eval, metrics on test (shared compute_metrics)."""
    from sklearn.linear_model import LogisticRegression

    from recsft.metrics import best_threshold, compute_metrics

    ev, te = np.asarray(eval_scores, float).reshape(-1, 1), np.asarray(test_scores, float).reshape(-1, 1)
    if np.ptp(ev) == 0:
        p_eval, p_test = np.full(len(ev), np.mean(eval_y)), np.full(len(te), np.mean(eval_y))
    else:
        lr = LogisticRegression().fit(ev, eval_y)
        p_eval, p_test = lr.predict_proba(ev)[:, 1], lr.predict_proba(te)[:, 1]
    t = best_threshold([bool(y) for y in eval_y], p_eval) if np.ptp(ev) else 0.0
    labels = ["Yes" if y else "No" for y in test_y]
    m = compute_metrics(labels, ["Yes" if p >= t else "No" for p in p_test], p_test.tolist(), test_users)
    m["accuracy_at_0.5"] = compute_metrics(labels, ["Yes" if p >= 0.5 else "No" for p in p_test])["accuracy"]
    m["threshold"] = float(t)
    return m


def main(args) -> dict:
    from recsft import movielens
    from recsft.io import check_file_set, load_data, load_json, require_keys, write_json_atomic
    from recsft.validate import writable_dir

    writable_dir(args.output_dir, "--output_dir")
    data = Path(args.data_dir)
    if not data.is_dir():
        raise DataError(f"--data_dir {str(data)!r}: folder does not exist; run `python scripts/prepare_data.py` "
                        f"or pass the folder it wrote")
    check_file_set(data)
    stats = movielens.check_stats(load_json(data / "stats.json"), data / "stats.json")
    p = stats["params"]
    source = stats["source"]
    if source not in ("bundled", "download") and not Path(source).is_dir():
        raise DataError(f"{data / 'stats.json'}: the data was prepared from {source!r}, which no longer exists; "
                        f"restore that folder or re-run prepare_data.py")
    ratings, titles = movielens.load_ratings("bundled" if source == "bundled" else "download",
                                             None if source in ("bundled", "download") else source)
    if p.get("max_users"):
        ratings = ratings[ratings.user_id.isin(sorted(ratings.user_id.unique())[: p["max_users"]])]
    splits = movielens.build_examples(ratings, titles, p["history_len"], p["like_threshold"], p["eval_ratio"],
                                      p["test_ratio"], p["seed"])
    test = load_data(data / "test_raw.jsonl")
    require_keys(test, TEST_KEYS, data / "test_raw.jsonl", "re-run `python scripts/prepare_data.py`")
    test = test[: args.max_samples] if args.max_samples else test
    if [e["candidate_movie_id"] for e in splits["test"][: len(test)]] != [e["candidate_movie_id"] for e in test]:
        raise DataError(f"{data}: test_raw.jsonl does not match the split rebuilt from stats.json; "
                        f"re-run prepare_data.py")
    train = train_ratings(ratings, splits)
    results = {}
    eval_y = [e["label"] == "Yes" for e in splits["eval"]]
    test_y = [e["label"] == "Yes" for e in test]
    for name, fn in scorers(train, p["like_threshold"], args.svd_rank).items():
        results[name] = evaluate_scores([fn(e) for e in splits["eval"]], eval_y, [fn(e) for e in test], test_y,
                                        [e["user_id"] for e in test])
    print(f"{'model':45s} {'accuracy':>8s} {'F1':>6s} {'AUC':>6s} {'UAUC':>6s} {'logloss':>7s}  (n={len(test)})")
    for name, m in results.items():
        print(f"{name:45s} {m['accuracy']:8.4f} {m['f1']:6.4f} {m['auc']:6.4f} {m['uauc']:6.4f} {m['log_loss']:7.4f}")
    write_json_atomic(Path(args.output_dir) / "baselines.json",
                      {"test_examples": len(test), "train_ratings": len(train), "results": results})
    return results


if __name__ == "__main__":
    run(main, parse_args)
