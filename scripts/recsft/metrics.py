"""The one Yes/No extractor, label normaliser and metrics function, shared by training, inference and comparison."""

from __future__ import annotations

import math
import numbers
import re
from typing import Any, Sequence

import numpy as np

_THINK_BLOCK = re.compile(r"<think>.*?(</think>|$)", flags=re.DOTALL | re.IGNORECASE)
_SPECIAL = re.compile(r"<\|[^|>]*\|>")
_YES = re.compile(r"\byes\b", re.IGNORECASE)
_NO = re.compile(r"\bno\b", re.IGNORECASE)


def extract_answer(text: str | None) -> str | None:
    """``"Yes"``/``"No"`` from a model response, or None when it cannot be parsed.

    Handles Qwen3 ``<think>…</think>`` blocks (an unterminated block counts as no answer), chat
    special tokens, a leading ``assistant`` role header, and answers like "Yes." or "no, because…".
    When the response mentions both words without starting with one, it is unparseable (counted, not guessed).
    """
    if not text:
        return None
    text = _THINK_BLOCK.sub(" ", text)
    text = _SPECIAL.sub(" ", text)
    text = re.sub(r"^\s*assistant\s*\n", "", text, flags=re.IGNORECASE).strip()
    text = text.lstrip(" \t\n\"'*`([{:-")
    low = text.lower()
    if re.match(r"yes\b", low):
        return "Yes"
    if re.match(r"no\b", low):
        return "No"
    has_yes, has_no = bool(_YES.search(text)), bool(_NO.search(text))
    if has_yes and not has_no:
        return "Yes"
    if has_no and not has_yes:
        return "No"
    return None


_LABEL_VALUES = {"yes": "Yes", "no": "No", "1": "Yes", "0": "No", "true": "Yes", "false": "No"}


def normalize_label(value: Any) -> str | None:
    """``"Yes"``/``"No"`` from a label value, else None: Yes/No in any case, true/false, 1/0 (as text or number)."""
    if isinstance(value, numbers.Number) and not isinstance(value, bool) and value in (0, 1):
        return "Yes" if value == 1 else "No"
    if value is None:
        return None
    return _LABEL_VALUES.get(str(value).strip().lower())


def compute_metrics(labels: Sequence[Any], preds: Sequence[Any], p_yes: Sequence[float] | None = None,
                    user_ids: Sequence[Any] | None = None) -> dict[str, float]:
    """Accuracy, precision, recall, F1 (positive class = Yes) and the unparseable count.

    ``labels``/``preds``: "Yes"/"No" (or 1/0); a pred of None is unparseable and counts as wrong.
    ``p_yes``: optional P(Yes) per example -> adds ``auc`` (ROC-AUC) and ``log_loss``; with ``user_ids``
    too, ``uauc`` (:func:`uauc`).
    """
    if len(labels) != len(preds):
        raise ValueError(f"labels ({len(labels)}) and preds ({len(preds)}) differ in length")
    gold = [normalize_label(x) for x in labels]
    if any(g is None for g in gold):
        bad = next(x for x, g in zip(labels, gold) if g is None)
        raise ValueError(f"label {bad!r} is not Yes/No")
    pred = [normalize_label(x) for x in preds]
    n = len(gold)
    tp = sum(g == "Yes" and p == "Yes" for g, p in zip(gold, pred))
    fp = sum(g == "No" and p == "Yes" for g, p in zip(gold, pred))
    fn = sum(g == "Yes" and p != "Yes" for g, p in zip(gold, pred))
    correct = sum(g == p for g, p in zip(gold, pred))
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    out = {"accuracy": correct / n if n else 0.0, "precision": precision, "recall": recall, "f1": f1,
           "unparseable": float(sum(p is None for p in pred)), "n": float(n),
           "yes_rate_pred": sum(p == "Yes" for p in pred) / n if n else 0.0,
           "yes_rate_label": sum(g == "Yes" for g in gold) / n if n else 0.0}
    if p_yes is not None:
        out.update(score_metrics([g == "Yes" for g in gold], p_yes))
        if user_ids is not None:
            out["uauc"], out["uauc_users"] = _user_aucs([g == "Yes" for g in gold], p_yes, user_ids)
    return out


def uauc(y_true: Sequence[bool], scores: Sequence[float], user_ids: Sequence[Any]) -> float:
    """User-averaged AUC: the mean of per-user ROC-AUCs over users with both classes (NaN when none).

    ``y_true``: booleans, 1/0, or labels ``"Yes"``/``"No"`` (:func:`normalize_label`); anything else, or a NaN
    score, is a ValueError (a truthy "No" must not count as a positive)."""
    return _user_aucs(y_true, scores, user_ids)[0]


def _user_aucs(y_true: Sequence[bool], scores: Sequence[float], user_ids: Sequence[Any]) -> tuple[float, float]:
    """``(uauc, uauc_users)``: the mean per-user AUC and the number of users it averages (both classes)."""
    from sklearn.metrics import roc_auc_score

    if not len(y_true) == len(scores) == len(user_ids):
        raise ValueError(f"y_true ({len(y_true)}), scores ({len(scores)}) and user_ids ({len(user_ids)}) differ in length")
    groups: dict[Any, tuple[list, list]] = {}
    for y, s, u in zip(y_true, scores, user_ids):
        label = normalize_label(bool(y) if isinstance(y, (bool, np.bool_)) else y)
        if label is None:
            raise ValueError(f"uauc: label {y!r} is not Yes/No, True/False or 1/0")
        if math.isnan(float(s)):
            raise ValueError(f"uauc: score {s!r} is NaN")
        groups.setdefault(u, ([], []))[0].append(int(label == "Yes"))
        groups[u][1].append(float(s))
    aucs = [roc_auc_score(y, s) for y, s in groups.values() if 0 < sum(y) < len(y)]
    return (float(sum(aucs) / len(aucs)) if aucs else math.nan), float(len(aucs))


def p_yes_from_logits(logit_yes, logit_no):
    """P(Yes) = softmax over the two answer logits = sigmoid(logit_yes - logit_no), in float64 numpy.

    The one formula for P(Yes) (scoring, ranking, eval during training); float64 because float32 saturates at
    1.0 past a gap of ~17.
    """
    import numpy as np

    gap = np.asarray(logit_yes, dtype=np.float64) - np.asarray(logit_no, dtype=np.float64)
    return 1.0 / (1.0 + np.exp(-gap))


def score_metrics(y_true: Sequence[bool], p_yes: Sequence[float]) -> dict[str, float]:
    """ROC-AUC and log-loss of P(Yes) scores (NaN AUC when only one class is present).

    AUC ranks the scores as given; only the log-loss clips them to [1e-7, 1 - 1e-7] (clipping first would tie
    every saturated score and change the AUC).
    """
    from sklearn.metrics import log_loss, roc_auc_score

    y = [int(v) for v in y_true]
    raw = [float(v) for v in p_yes]
    p = [min(max(v, 1e-7), 1 - 1e-7) for v in raw]
    auc = roc_auc_score(y, raw) if 0 < sum(y) < len(y) else math.nan
    return {"auc": float(auc), "log_loss": float(log_loss(y, p, labels=[0, 1]))}


def best_threshold(y_true: Sequence[bool], p_yes: Sequence[float]) -> float:
    """The P(Yes) threshold maximising accuracy (chosen on eval data, applied to test data).

    Predictions are ``Yes if p >= threshold``. Every cut is expressible: at most the lowest score (all Yes), between
    two distinct scores, and strictly above the highest one (all No, even when that score is exactly 1.0).
    Ties in accuracy keep the lowest threshold.
    """
    pairs = sorted(zip((float(v) for v in p_yes), (bool(t) for t in y_true)))
    n, pos = len(pairs), sum(t for _, t in pairs)
    best_acc = pos / n if n else 0.0  # threshold at or below everything: all Yes
    best_t = min(0.0, pairs[0][0]) if n else 0.0
    neg_below = pos_below = 0
    for i, (p, t) in enumerate(pairs):
        pos_below += t
        neg_below += not t
        if i + 1 < n and pairs[i + 1][0] == p:
            continue
        acc = (neg_below + (pos - pos_below)) / n
        if acc > best_acc:
            best_acc = acc
            if i + 1 < n:
                nxt = pairs[i + 1][0]
                mid = p + (nxt - p) / 2
                best_t = mid if p < mid <= nxt else nxt  # adjacent floats: the upper one still separates them
            else:
                best_t = math.nextafter(p, math.inf)  # above the highest score: all No
    return best_t


def paired_user_bootstrap(y_true: Sequence[bool], scores: Sequence[float], reference: Sequence[float],
                          user_ids: Sequence[Any], n_resamples: int = 1000, confidence: float = 0.95,
                          seed: int = 0) -> dict[str, float]:
    """ΔAUC and ΔUAUC (``scores`` minus ``reference`` on the same rows) with bootstrap intervals over users.

    Users are resampled with replacement (a user's rows stay together, both models are scored on the same
    resample: a paired, user-level bootstrap), by ``scipy.stats.bootstrap`` (BCa intervals). Returns
    ``delta_auc``, ``delta_auc_low``/``_high``, ``delta_uauc``, ``delta_uauc_low``/``_high`` and the resamples.
    """
    import numpy as np

    roc_auc_score = _rank_auc
    y = np.asarray([bool(v) for v in y_true], dtype=int)
    a, b = np.asarray(scores, dtype=float), np.asarray(reference, dtype=float)
    codes, users = _codes(user_ids)
    rows_of = [np.flatnonzero(codes == u) for u in range(len(users))]
    both = np.array([0 < y[r].sum() < len(r) for r in rows_of])
    per_a = np.array([roc_auc_score(y[r], a[r]) if ok else np.nan for r, ok in zip(rows_of, both)])
    per_b = np.array([roc_auc_score(y[r], b[r]) if ok else np.nan for r, ok in zip(rows_of, both)])

    def delta(idx):
        rows = np.concatenate([rows_of[u] for u in idx])
        d_auc = roc_auc_score(y[rows], a[rows]) - roc_auc_score(y[rows], b[rows])
        ok = idx[both[idx]]
        return np.array([d_auc, np.mean(per_a[ok]) - np.mean(per_b[ok])])

    point, low, high = _user_bootstrap(delta, len(users), n_resamples, confidence, seed)
    return {"delta_auc": float(point[0]), "delta_auc_low": float(low[0]), "delta_auc_high": float(high[0]),
            "delta_uauc": float(point[1]), "delta_uauc_low": float(low[1]), "delta_uauc_high": float(high[1]),
            "users": len(users), "resamples": n_resamples, "confidence": confidence}


def paired_user_mean_bootstrap(values: Sequence[float], reference: Sequence[float], user_ids: Sequence[Any],
                               n_resamples: int = 1000, confidence: float = 0.95, seed: int = 0) -> dict[str, float]:
    """Δ of a mean over questions (``values`` minus ``reference``, one pair per question, e.g. NDCG@10 of two
    rankers on the same questions) with a BCa interval from a paired bootstrap over users (a user's questions
    stay together; ``scipy.stats.bootstrap``). Returns ``delta``, ``delta_low``, ``delta_high``, ``users``."""
    import numpy as np

    diff = np.asarray(values, dtype=float) - np.asarray(reference, dtype=float)
    codes, users = _codes(user_ids)
    sums, counts = np.bincount(codes, weights=diff), np.bincount(codes)

    def delta(idx):
        return np.array([sums[idx].sum() / counts[idx].sum()])

    point, low, high = _user_bootstrap(delta, len(users), n_resamples, confidence, seed)
    return {"delta": float(point[0]), "delta_low": float(low[0]), "delta_high": float(high[0]),
            "users": len(users), "resamples": n_resamples, "confidence": confidence}


def _user_bootstrap(statistic, n_users: int, n_resamples: int, confidence: float, seed: int):
    """``(point, low, high)`` of ``statistic(user indices) -> array`` by ``scipy.stats.bootstrap`` (BCa) over users;
    where BCa is undefined (a constant bootstrap distribution) the percentile interval stands in."""
    import warnings

    import numpy as np
    from scipy.stats import bootstrap

    def stat(idx):
        return statistic(np.asarray(idx, dtype=int))

    with warnings.catch_warnings():  # the degenerate case is handled below
        warnings.simplefilter("ignore")
        res = bootstrap((np.arange(n_users),), stat, vectorized=False, n_resamples=n_resamples,
                        confidence_level=confidence, random_state=np.random.default_rng(seed))
    point = stat(np.arange(n_users))
    low, high = (np.asarray(x, dtype=float) for x in res.confidence_interval)
    if np.isnan(low).any() or np.isnan(high).any():
        tail = (1 - confidence) / 2
        q_low, q_high = np.quantile(res.bootstrap_distribution, [tail, 1 - tail], axis=-1)
        low, high = np.where(np.isnan(low), q_low, low), np.where(np.isnan(high), q_high, high)
    return point, np.atleast_1d(low), np.atleast_1d(high)


def _rank_auc(y, scores) -> float:
    """ROC-AUC as the Mann-Whitney statistic (average ranks on ties: equal to sklearn's roc_auc_score), fast."""
    import numpy as np
    from scipy.stats import rankdata

    y = np.asarray(y, dtype=bool)
    pos = int(y.sum())
    neg = len(y) - pos
    return float((rankdata(scores)[y].sum() - pos * (pos + 1) / 2) / (pos * neg))


def _codes(values: Sequence[Any]):
    import numpy as np

    index: dict = {}
    codes = np.array([index.setdefault(v, len(index)) for v in values], dtype=int)
    return codes, list(index)
