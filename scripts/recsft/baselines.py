"""Classical recommenders on the prepared split: Cornac models, plus two label rates no library has.

Every model is trained on the *training interactions* (every rating that is not an eval or test
candidate) and becomes a scorer ``scorer(example, items) -> scores`` (higher = more likely liked), used
pointwise (the example's own candidate) and for ranking (any candidate items). Models:

- hand-written (no recommender library computes a smoothed per-item / per-user *like* rate):
  item like-rate, user like-rate;
- Cornac (https://cornac.preferred.ai): MostPop, BaselineOnly (user + item biases), MF (biased matrix
  factorisation, SGD) on the star ratings; BPR on the liked ratings (rating >= threshold) as implicit
  feedback; the sequential SASRec on each user's liked movies in time order (one session per user). At
  scoring time SASRec reads the user's liked movies rated *before* the candidate (the same information the
  LLM prompt's history comes from), batched through the fitted network.
"""

from __future__ import annotations

import bisect
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from .io import DataError

logger = logging.getLogger(__name__)
Scorer = Callable[[dict, np.ndarray], np.ndarray]
MODELS = ("item-rate", "user-rate", "mostpop", "biases", "mf", "bpr", "sasrec")
SEQUENTIAL = ("sasrec",)
LABELS = {"item-rate": "item like-rate (hand-written)", "user-rate": "user like-rate (hand-written)",
          "mostpop": "MostPop (Cornac)", "biases": "BaselineOnly: user+item biases (Cornac)",
          "mf": "MF, biased matrix factorisation (Cornac)", "bpr": "BPR on liked (Cornac)",
          "sasrec": "SASRec, sequential (Cornac)"}
PER_USER_CONSTANT = ("user-rate",)
TEST_KEYS = {"user_id": (int, str), "candidate_movie_id": (int, str), "label": str, "candidate_timestamp": int}  # same score for every item of a user: chance when ranking


# --------------------------------------------------------------------------------------------- data
@dataclass
class Prepared:
    ratings: pd.DataFrame  # user_id, movie_id, rating, timestamp (every cleaned rating)
    titles: dict
    splits: dict  # train / eval / test examples (test format, with candidate_timestamp)
    params: dict
    source: str


def load_prepared(data_dir: str | Path) -> Prepared:
    """The ratings and split behind a folder written by prepare_data.py, checked against its test_raw.jsonl.

    Uses the folder's ``interactions.parquet`` / ``items.parquet`` when present (any source, e.g. a
    ratings CSV), else reloads the MovieLens source named in ``stats.json``; the split is rebuilt with the
    stats' parameters and must give the same test candidates as ``test_raw.jsonl``.
    """
    from . import movielens
    from .io import check_file_set, load_data, load_json, require_keys

    data = Path(data_dir)
    if data.exists() and not data.is_dir():
        raise DataError(f"--data_dir {str(data)!r}: is a file, not a folder; pass the folder prepare_data.py wrote "
                        f"(its --out-dir)")
    if not data.is_dir():
        raise DataError(f"--data_dir {str(data)!r}: folder does not exist; run `python scripts/prepare_data.py` "
                        f"or pass the folder it wrote")
    for name in ("stats.json", "test_raw.jsonl"):
        if not (data / name).is_file():
            raise DataError(f"{data / name} not found; run `python scripts/prepare_data.py --out-dir {data}` first")
    check_file_set(data)
    stats = movielens.check_stats(load_json(data / "stats.json"), data / "stats.json")
    p, source = stats["params"], stats["source"]
    if (data / "interactions.parquet").is_file() and (data / "items.parquet").is_file():
        ratings = pd.read_parquet(data / "interactions.parquet")
        items = pd.read_parquet(data / "items.parquet")
        titles = dict(zip(items.movie_id.tolist(), items.title.tolist()))
    else:  # a folder written before the parquet files existed: reload its MovieLens source
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
    if [e["candidate_movie_id"] for e in splits["test"]] != [e["candidate_movie_id"] for e in test]:
        raise DataError(f"{data}: test_raw.jsonl does not match the split rebuilt from stats.json; "
                        f"re-run prepare_data.py")
    return Prepared(ratings.reset_index(drop=True), titles, splits, p, str(source))


def train_ratings(ratings: pd.DataFrame, splits: dict) -> pd.DataFrame:
    """Ratings visible at training time: every rating that is not an eval or test candidate."""
    held = pd.MultiIndex.from_tuples([(e["user_id"], e["candidate_movie_id"]) for s in ("eval", "test")
                                      for e in splits[s]])
    keys = pd.MultiIndex.from_arrays([ratings.user_id, ratings.movie_id])
    return ratings[~keys.isin(held)].reset_index(drop=True)


def rated_sets(ratings: pd.DataFrame) -> dict:
    """user -> set of every movie the user rated (any split)."""
    return ratings.groupby("user_id").movie_id.agg(set).to_dict()


# ----------------------------------------------------------------------------------- hand-written
def smoothed_rate(liked: pd.Series, key: pd.Series, prior: float, strength: float = 5.0) -> dict:
    g = pd.DataFrame({"k": key.to_numpy(), "y": liked.to_numpy()}).groupby("k").y.agg(["sum", "count"])
    return ((g["sum"] + strength * prior) / (g["count"] + strength)).to_dict()


def rate_scorers(train: pd.DataFrame, threshold: float) -> dict[str, Scorer]:
    liked = (train.rating >= threshold).astype(float)
    prior = float(liked.mean())
    item_rate = smoothed_rate(liked, train.movie_id, prior)
    user_rate = smoothed_rate(liked, train.user_id, prior)
    return {"item-rate": lambda e, items: np.array([item_rate.get(i, prior) for i in items.tolist()]),
            "user-rate": lambda e, items: np.full(len(items), user_rate.get(e["user_id"], prior))}


# ----------------------------------------------------------------------------------------- Cornac
def _item_index(model, items: np.ndarray) -> np.ndarray:
    return np.array([model.iid_map.get(i, -1) for i in items.tolist()], dtype=int)


def _lookup(all_scores: np.ndarray, idx: np.ndarray) -> np.ndarray:
    """Scores of the mapped items; items unseen in training rank below every known item."""
    all_scores = np.asarray(all_scores, dtype=float).ravel()
    return np.where(idx >= 0, all_scores[np.maximum(idx, 0)], all_scores.min() - 1.0)


def user_scorer(model) -> Scorer:
    """Scorer of a Cornac user-item model: all known items scored once per user (cached)."""
    cache: dict = {}

    def scorer(e, items):
        u = e["user_id"]
        if u not in cache:
            uidx = model.uid_map.get(u)
            cache[u] = model.score(uidx) if uidx is not None else np.zeros(model.num_items)
        return _lookup(cache[u], _item_index(model, items))
    return scorer


def sasrec_scorer(model, histories: dict, batch_size: int = 256) -> Scorer:
    """Scorer of a fitted Cornac SASRec: the user's liked movies before the candidate, in time order.

    Cornac's ``score`` encodes one history at a time; ``scorer.warm(examples)`` encodes many at once
    through the same network (``model.model.predict``) and caches the scores.
    """
    import torch

    cache: dict = {}

    def key(e):
        return e["user_id"], e["candidate_timestamp"], e["candidate_movie_id"]

    def history(e) -> list[int]:
        order, movies = histories.get(e["user_id"], ([], []))
        n = bisect.bisect_left(order, (e["candidate_timestamp"], e["candidate_movie_id"]))
        return [model.iid_map[m] for m in movies[:n] if m in model.iid_map][-model.max_len:]

    def warm(examples, progress: bool = False) -> None:
        todo = list({key(e): e for e in examples if key(e) not in cache}.values())
        model.model.eval()
        for start in tqdm(range(0, len(todo), batch_size), desc="SASRec", disable=not progress, leave=False):
            chunk = todo[start:start + batch_size]
            hists = [history(e) for e in chunk]
            seqs = torch.tensor([[model.pad_idx] * (model.max_len - len(h)) + h for h in hists], dtype=torch.long)
            scores = np.asarray(model.model.predict(None, seqs), dtype=np.float32).reshape(len(chunk), -1)
            for e, h, row in zip(chunk, hists, scores):
                cache[key(e)] = row if h else np.zeros_like(row)  # no liked history: no information

    def scorer(e, items):
        if key(e) not in cache:
            warm([e])
        return _lookup(cache[key(e)], _item_index(model, items))

    scorer.warm = warm
    return scorer


def liked_histories(ratings: pd.DataFrame, threshold: float) -> dict:
    """user -> (sorted (timestamp, movie_id) keys, movie ids) of the user's liked ratings (all splits)."""
    liked = ratings[ratings.rating >= threshold].sort_values(["user_id", "timestamp", "movie_id"], kind="stable")
    out = {}
    for user, g in liked.groupby("user_id", sort=False):
        out[user] = (list(zip(g.timestamp.tolist(), g.movie_id.tolist())), g.movie_id.tolist())
    return out


def fit_cornac(name: str, train: pd.DataFrame, threshold: float, seed: int, progress: bool, epochs: int):
    """A fitted Cornac model for ``name`` on the training interactions."""
    import cornac
    from cornac.data import Dataset, SequentialDataset

    liked = train[train.rating >= threshold].sort_values(["user_id", "timestamp", "movie_id"], kind="stable")
    if name in SEQUENTIAL:
        data = list(zip(liked.user_id.tolist(), liked.user_id.tolist(), liked.movie_id.tolist(),
                        liked.timestamp.tolist()))
        dataset = SequentialDataset.build(data, fmt="USIT", seed=seed)
        model = cornac.models.SASRec(embedding_dim=64, n_epochs=epochs, max_len=20, batch_size=256, n_sample=256,
                                     seed=seed, verbose=progress)
        return model.fit(dataset)
    rows = liked if name == "bpr" else train
    dataset = Dataset.from_uir(list(zip(rows.user_id.tolist(), rows.movie_id.tolist(),
                                        rows.rating.astype(float).tolist())), seed=seed)
    model = {"mostpop": lambda: cornac.models.MostPop(),
             "biases": lambda: cornac.models.BaselineOnly(max_iter=30, seed=seed, verbose=progress),
             "mf": lambda: cornac.models.MF(k=20, max_iter=50, learning_rate=0.01, lambda_reg=0.02, seed=seed,
                                            verbose=progress),
             "bpr": lambda: cornac.models.BPR(k=50, max_iter=200, learning_rate=0.01, lambda_reg=0.01, seed=seed,
                                              verbose=progress)}[name]()
    return model.fit(dataset)


def fit_scorers(names, train: pd.DataFrame, ratings: pd.DataFrame, threshold: float, seed: int = 0,
                progress: bool = True, epochs: int = 5) -> dict[str, Scorer]:
    """``{model name: scorer}`` for the requested model names (see :data:`MODELS`)."""
    unknown = [n for n in names if n not in MODELS]
    if unknown:
        raise ValueError(f"--models: unknown {unknown}; choose from {', '.join(MODELS)}")
    out: dict[str, Scorer] = {}
    rates = rate_scorers(train, threshold)
    histories = liked_histories(ratings, threshold) if any(n in SEQUENTIAL for n in names) else {}
    for name in names:
        if name in rates:
            out[name] = rates[name]
            continue
        logger.info("fitting %s", LABELS[name])
        model = fit_cornac(name, train, threshold, seed, progress, epochs)
        out[name] = sasrec_scorer(model, histories) if name in SEQUENTIAL else user_scorer(model)
    return out


# -------------------------------------------------------------------------------------- pointwise
def pointwise_scores(scorer: Scorer, examples: list[dict], desc: str = "", progress: bool = False) -> np.ndarray:
    if hasattr(scorer, "warm"):
        scorer.warm(examples, progress)
    return np.array([float(scorer(e, np.array([e["candidate_movie_id"]]))[0])
                     for e in tqdm(examples, desc=desc, disable=not progress, leave=False)])


def evaluate_scores(eval_scores, eval_y, test_scores, test_y, test_users=None, keep_probs: bool = False) -> dict:
    """Platt-calibrate on eval, threshold on eval, metrics on test (the shared compute_metrics).

    ``keep_probs``: also return the calibrated test P(Yes) under ``p_yes`` (for a predictions file)."""
    from sklearn.linear_model import LogisticRegression

    from .metrics import best_threshold, compute_metrics

    ev, te = np.asarray(eval_scores, float).reshape(-1, 1), np.asarray(test_scores, float).reshape(-1, 1)
    if np.ptp(ev) == 0:
        p_eval, p_test = np.full(len(ev), np.mean(eval_y)), np.full(len(te), np.mean(eval_y))
    else:
        lr = LogisticRegression().fit(ev, eval_y)
        p_eval, p_test = lr.predict_proba(ev)[:, 1], lr.predict_proba(te)[:, 1]
    t = best_threshold([bool(y) for y in eval_y], p_eval) if np.ptp(ev) else 0.0
    labels = ["Yes" if y else "No" for y in test_y]
    m = compute_metrics(labels, ["Yes" if p >= t else "No" for p in p_test], p_test.tolist(), user_ids=test_users)
    m["accuracy_at_0.5"] = compute_metrics(labels, ["Yes" if p >= 0.5 else "No" for p in p_test])["accuracy"]
    m["threshold"] = float(t)
    if keep_probs:
        m["p_yes"] = p_test.tolist()
    return m


def prediction_files(test: list[dict], p_yes: list[float], metrics: dict) -> tuple[list[dict], dict]:
    """Per-example rows (``user_id``, ``candidate_movie_id``, ``label``, calibrated ``p_yes``) and a metrics
    summary whose ``at_eval_threshold`` holds the threshold chosen on eval, as ``infer_lora.py`` writes them."""
    rows = [{"user_id": e["user_id"], "candidate_movie_id": e["candidate_movie_id"], "label": e["label"],
             "p_yes": p} for e, p in zip(test, p_yes)]
    return rows, {**metrics, "at_eval_threshold": {"threshold": metrics["threshold"]}}
