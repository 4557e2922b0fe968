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
import re
from typing import Callable

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from .cf import SEQUENTIAL, CFTable, fit_cf, fit_cornac

logger = logging.getLogger(__name__)
Scorer = Callable[[dict, np.ndarray], np.ndarray]
MODELS = ("item-rate", "user-rate", "mostpop", "biases", "mf", "bpr", "sasrec", "cf-biases", "cf-mf")
CF_MODELS = {"cf-biases": "biases", "cf-mf": "mf"}  # recsft.cf tables: scores are calibrated like-logits
LABELS = {"item-rate": "item like-rate (hand-written)", "user-rate": "user like-rate (hand-written)",
          "mostpop": "MostPop (Cornac)", "biases": "BaselineOnly: user+item biases (Cornac)",
          "mf": "MF, biased matrix factorisation (Cornac)", "bpr": "BPR on liked (Cornac)",
          "sasrec": "SASRec, sequential (Cornac)", "cf-biases": "CF residual alone: biases (recsft.cf)",
          "cf-mf": "CF residual alone: MF (recsft.cf)"}
PER_USER_CONSTANT = ("user-rate",)  # same score for every item of a user: chance when ranking


# --------------------------------------------------------------------------------------------- data
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


def cf_scorer(table: CFTable) -> Scorer:
    """Scorer of a CF table: its like-logit. ``scorer.calibrated``: the logit is already a calibrated P(Yes)
    logit; ``scorer.pointwise(examples)`` scores every example's own candidate in one call."""
    def scorer(e, items):
        return table.logit([e["user_id"]] * len(items), items)

    scorer.calibrated = True
    scorer.pointwise = lambda examples: table.logit([e["user_id"] for e in examples],
                                                    [e["candidate_movie_id"] for e in examples])
    return scorer


def liked_histories(ratings: pd.DataFrame, threshold: float) -> dict:
    """user -> (sorted (timestamp, movie_id) keys, movie ids) of the user's liked ratings (all splits)."""
    liked = ratings[ratings.rating >= threshold].sort_values(["user_id", "timestamp", "movie_id"], kind="stable")
    out = {}
    for user, g in liked.groupby("user_id", sort=False):
        out[user] = (list(zip(g.timestamp.tolist(), g.movie_id.tolist())), g.movie_id.tolist())
    return out


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
        if name in CF_MODELS:
            logger.info("fitting %s", LABELS[name])
            out[name] = cf_scorer(fit_cf(CF_MODELS[name], train, threshold, seed))
            continue
        logger.info("fitting %s", LABELS[name])
        model = fit_cornac(name, train, threshold, seed, progress, epochs)
        out[name] = sasrec_scorer(model, histories) if name in SEQUENTIAL else user_scorer(model)
    return out


# -------------------------------------------------------------------------------------- pointwise
def pointwise_scores(scorer: Scorer, examples: list[dict], desc: str = "", progress: bool = False) -> np.ndarray:
    if hasattr(scorer, "pointwise"):
        return np.asarray(scorer.pointwise(examples), dtype=float)
    if hasattr(scorer, "warm"):
        scorer.warm(examples, progress)
    return np.array([float(scorer(e, np.array([e["candidate_movie_id"]]))[0])
                     for e in tqdm(examples, desc=desc, disable=not progress, leave=False)])


def evaluate_scores(eval_scores, eval_y, test_scores, test_y, test_users=None, keep_probs: bool = False,
                    calibrated: bool = False) -> dict:
    """Platt-calibrate on eval, threshold on eval, metrics on test (the shared compute_metrics).

    ``keep_probs``: also return the calibrated test P(Yes) under ``p_yes`` (for a predictions file).
    ``calibrated``: the scores are already P(Yes) logits; P(Yes) = sigmoid(score), no Platt step."""
    from scipy.special import expit
    from sklearn.linear_model import LogisticRegression

    from .metrics import best_threshold, compute_metrics

    ev, te = np.asarray(eval_scores, float).reshape(-1, 1), np.asarray(test_scores, float).reshape(-1, 1)
    if calibrated:
        p_eval, p_test = expit(ev[:, 0]), expit(te[:, 0])
    elif np.ptp(ev) == 0:
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


# ------------------------------------------------------------------------------- what the prompt shows
PROMPT_MODELS = ("history-mean", "last-label", "prompt-lr")
PROMPT_LABELS = {"history-mean": "mean of the prompt's 15 history ratings",
                 "last-label": "the prompt's most recent history rating",
                 "prompt-lr": "logistic regression on the prompt's numbers"}
_RATING = re.compile(r"\(rating ≈ ([0-9.]+)\)$", re.M)
_RATE = re.compile(r"^(This user|Candidate movie, all users): (?:(\d+)% liked of (\d+) earlier ratings|no earlier ratings)$",
                   re.M)


def prompt_numbers(record: dict) -> dict:
    """``{(user_id, movie_id): features}`` of a candidate-block record, read from its text: history mean, last
    history rating, and (when the prompt shows them) the user's and the candidate's like-rate and log count."""
    ratings = [float(x) for x in _RATING.findall(record["prefix"])]
    base = [float(np.mean(ratings)) if ratings else 0.0, ratings[-1] if ratings else 0.0]
    out = {}
    for b in record["blocks"]:
        rates = {who: (0.0 if n is None or n == "" else int(pct) / 100, np.log1p(int(n or 0)))
                 for who, pct, n in _RATE.findall(record["prefix"] + "\n" + b["text"])}
        extra = [x for who in ("This user", "Candidate movie, all users") for x in rates.get(who, ())]
        out[(record["user_id"], b["candidate_movie_id"])] = np.array(base + extra, dtype=float)
    return out


def prompt_scorers(data_dir, names, seed: int = 0) -> dict[str, Scorer]:
    """Predictors from the numbers a candidate-block prompt shows (the folder's blocks files): the LR is fit on the
    training answers only. Pointwise: each scores only its example's own candidate."""
    from pathlib import Path

    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    from .io import load_data

    folder = Path(data_dir)
    files = {s: folder / f"blocks_{s}.{'jsonl' if s == 'test' else 'json'}" for s in ("train", "eval", "test")}
    missing = [str(f) for f in files.values() if not f.is_file()]
    if missing:
        raise DataError(f"--models {','.join(names)}: {missing[0]} not found; these predictors read the prompts of "
                        f"candidate-block data: run prepare_data.py --format blocks --out-dir {folder}")
    feats = {s: {k: v for r in load_data(f) for k, v in prompt_numbers(r).items()} for s, f in files.items()}
    table = {k: v for s in feats.values() for k, v in s.items()}
    out: dict[str, Scorer] = {}
    if "prompt-lr" in names:
        train = feats["train"]
        labels = {(r["user_id"], b["candidate_movie_id"]): b["answer"] == "Yes"
                  for r in load_data(files["train"]) for b in r["blocks"]}
        keys = list(train)
        lr = make_pipeline(StandardScaler(), LogisticRegression(max_iter=1000, random_state=seed))
        lr.fit(np.stack([train[k] for k in keys]), [labels[k] for k in keys])
        out["prompt-lr"] = lambda e, items: lr.decision_function(table[_own(e, items)][None])
    if "history-mean" in names:
        out["history-mean"] = lambda e, items: np.array([table[_own(e, items)][0]])
    if "last-label" in names:
        out["last-label"] = lambda e, items: np.array([table[_own(e, items)][1]])
    return out


def _own(example: dict, items: np.ndarray) -> tuple:
    """The (user, movie) key of a pointwise call (the example's own candidate, the only item)."""
    item = items[0]
    return example["user_id"], item.item() if isinstance(item, np.generic) else item
