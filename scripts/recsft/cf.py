"""Collaborative-filtering residual: a Cornac model of the training interactions as plain arrays and a like-logit.

The LLM's score can be ``P(Yes) = sigmoid(c(u, i) + a * (logit Yes - logit No) + b)``, where ``c`` is
:meth:`CFTable.logit` and ``a``, ``b`` are the two scalars of :class:`ResidualHead`. The CF model (``biases``:
Cornac BaselineOnly; ``mf``: Cornac MF) is fit on the training interactions only (every rating that is not an
eval or test candidate). A training row's ``c`` comes from a model that did not see that rating
(:func:`cross_fit_logits`), so the LLM never learns to lean on an in-sample CF score.

``c`` = ``slope * r + intercept``, where ``r`` is the model's predicted star rating and the calibration is a 1-D
logistic regression of ``rating >= like_threshold`` on the out-of-fold predicted ratings.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd

from .io import DataError, atomic_path, write_json_atomic

KINDS = ("biases", "mf")
SEQUENTIAL = ("sasrec",)
RESIDUAL_TABLE = "cf_residual"  # stem of the residual's table files (CFTable.save)
ARRAYS_FILE, META_FILE = f"{RESIDUAL_TABLE}.safetensors", f"{RESIDUAL_TABLE}.json"
HEAD_FILE = "cf_head.safetensors"
TOKENS_FILE, TOKENS_TABLE = "cf_tokens.safetensors", "cf_tokens_table"  # soft CF tokens: network, CF table stem
ARRAYS = ("user_bias", "item_bias", "user_factors", "item_factors")
FORMAT = 1
# a at step 0: the margin of a zero-shot chat model is a few logits, so 0.01 * margin moves c by a few
# hundredths (the step-0 ranking is the CF ranking up to near-ties), while d logit / d margin = a != 0 lets
# the LoRA weights learn from the first step (with a = 0 only a itself would get a gradient at step 0).
INIT_A = 0.01
SAVE_FIX = "save it again with recsft.cf.fit_cf(...).save(folder)"


# ----------------------------------------------------------------------------------------- Cornac
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


# ----------------------------------------------------------------------------------------- the table
def _index(ids: Sequence) -> pd.Index:
    return pd.Index(list(ids), dtype=object)


def _rows(index: pd.Index, ids) -> np.ndarray:
    """Row of each id in ``index`` (-1 when unknown); ints and strs never match each other."""
    ids = list(ids.tolist() if hasattr(ids, "tolist") else ids)
    return index.get_indexer(pd.Index(ids, dtype=object)) if ids else np.zeros(0, dtype=int)


@dataclass(eq=False)
class CFTable:
    """A fitted CF model as arrays: row ``j`` of the user arrays belongs to ``user_ids[j]`` (items alike).

    ``user_factors`` / ``item_factors`` have 0 columns for ``biases``. ``slope``/``intercept`` turn a predicted
    rating into a like-logit. Ids are kept as in the data (int or str; ``1`` and ``"1"`` are different ids).
    """

    kind: str
    user_ids: list
    item_ids: list
    global_bias: float
    user_bias: np.ndarray
    item_bias: np.ndarray
    user_factors: np.ndarray
    item_factors: np.ndarray
    slope: float = 1.0
    intercept: float = 0.0
    like_threshold: float = 4.0
    seed: int = 0
    build_id: str | None = None
    _users: pd.Index = field(init=False, repr=False, compare=False)
    _items: pd.Index = field(init=False, repr=False, compare=False)

    def __post_init__(self):
        self._users, self._items = _index(self.user_ids), _index(self.item_ids)

    def rating(self, user_ids, item_ids) -> np.ndarray:
        """Predicted star ratings from the known parts: global bias, + user bias (known user), + item bias
        (known item), + factor dot product (both known). Unknown user and item: the global bias."""
        u, i = _rows(self._users, user_ids), _rows(self._items, item_ids)
        if len(u) != len(i):
            raise ValueError(f"{len(u)} user ids but {len(i)} item ids")
        ku, ki = u >= 0, i >= 0
        out = np.full(len(u), float(self.global_bias))
        out[ku] += self.user_bias[u[ku]]
        out[ki] += self.item_bias[i[ki]]
        both = ku & ki
        out[both] += np.einsum("nk,nk->n", self.user_factors[u[both]], self.item_factors[i[both]])
        return out

    def logit(self, user_ids, item_ids) -> np.ndarray:
        """Like-logit ``slope * rating + intercept`` per (user, item) pair (float64; see :meth:`rating`)."""
        return self.slope * self.rating(user_ids, item_ids) + self.intercept

    def vectors(self, user_ids, item_ids) -> tuple[np.ndarray, np.ndarray]:
        """User and item factor vectors ``(n, k)`` (zeros for an unknown id; ``k = 0`` for ``biases``)."""
        return (_gather(self.user_factors, _rows(self._users, user_ids)),
                _gather(self.item_factors, _rows(self._items, item_ids)))

    def save(self, folder: str | Path, stem: str = RESIDUAL_TABLE) -> None:
        """Write ``<stem>.safetensors`` (arrays) then ``<stem>.json`` (ids, calibration), each atomically; the json
        holds the arrays file's sha256, so a folder mixing two saves fails to load. ``stem``: ``cf_residual`` (the
        residual's table) or ``cf_tokens_table`` (the soft tokens')."""
        from safetensors.numpy import save_file

        arrays, meta = _files(folder, stem)
        with atomic_path(arrays) as tmp:
            save_file({k: np.ascontiguousarray(getattr(self, k), dtype=np.float64) for k in ARRAYS}, str(tmp))
        write_json_atomic(meta, self._meta(_sha256(arrays)))

    def _meta(self, sha: str) -> dict:
        return {"format": FORMAT, "kind": self.kind, "global_bias": float(self.global_bias),
                "calibration": {"slope": float(self.slope), "intercept": float(self.intercept)},
                "like_threshold": float(self.like_threshold), "seed": int(self.seed), "build_id": self.build_id,
                "arrays_sha256": sha, "user_ids": _plain_ids(self.user_ids, "user"),
                "item_ids": _plain_ids(self.item_ids, "item")}

    @classmethod
    def load(cls, folder: str | Path, fix: str = SAVE_FIX, stem: str = RESIDUAL_TABLE) -> "CFTable":
        """The table saved in ``folder`` (:meth:`save`); a missing, corrupt or mismatched file is a DataError naming
        it and ``fix``."""
        arrays_file, meta_file = _files(folder, stem)
        meta = _read_meta(meta_file, fix)
        arrays = _read_arrays(arrays_file, meta["arrays_sha256"], fix)
        table = cls(meta["kind"], meta["user_ids"], meta["item_ids"], meta["global_bias"], **arrays,
                    slope=meta["calibration"]["slope"], intercept=meta["calibration"]["intercept"],
                    like_threshold=meta["like_threshold"], seed=meta["seed"], build_id=meta["build_id"])
        _check_shapes(table, arrays_file, fix)
        return table


def _files(folder: str | Path, stem: str) -> tuple[Path, Path]:
    return Path(folder) / f"{stem}.safetensors", Path(folder) / f"{stem}.json"


def _gather(matrix: np.ndarray, rows: np.ndarray) -> np.ndarray:
    out = np.zeros((len(rows), matrix.shape[1]))
    out[rows >= 0] = matrix[rows[rows >= 0]]
    return out


def _plain_ids(ids: list, what: str) -> list:
    """Ids as JSON keeps them: int or str (numpy ints become ints); anything else is a DataError."""
    out = [i.item() if isinstance(i, np.integer) else i for i in ids]
    bad = next((i for i in out if isinstance(i, bool) or not isinstance(i, (int, str))), None)
    if bad is not None:
        raise DataError(f"{what} id {bad!r} ({type(bad).__name__}): CF ids must be int or str; "
                        f"convert the {what}_id column of the ratings")
    return out


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


META_KEYS = {"format": int, "kind": str, "global_bias": float, "calibration": dict, "like_threshold": float,
             "seed": int, "arrays_sha256": str, "user_ids": list, "item_ids": list}


def _read_meta(path: Path, fix: str) -> dict:
    if not path.is_file():
        raise DataError(f"{path}: not found; {fix}")
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DataError(f"{path}: corrupt ({type(e).__name__}); {fix}") from None
    if not isinstance(meta, dict):
        raise DataError(f"{path}: corrupt (not a JSON object); {fix}")
    for key, kind in META_KEYS.items():
        ok = isinstance(meta.get(key), (int, float) if kind is float else kind) and not isinstance(meta[key], bool)
        if not ok:
            raise DataError(f"{path}: key {key!r} missing or not {kind.__name__}; {fix}")
    cal = meta["calibration"]
    if not all(isinstance(cal.get(k), (int, float)) for k in ("slope", "intercept")) or meta["kind"] not in KINDS:
        raise DataError(f"{path}: bad 'kind' or 'calibration' (slope, intercept); {fix}")
    if meta["format"] != FORMAT:
        raise DataError(f"{path}: format {meta['format']}, this version reads format {FORMAT}; {fix}")
    _plain_ids(meta["user_ids"], "user")
    _plain_ids(meta["item_ids"], "item")
    meta.setdefault("build_id", None)
    return meta


def _read_arrays(path: Path, sha: str, fix: str) -> dict:
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    if not path.is_file():
        raise DataError(f"{path}: not found; {fix}")
    if _sha256(path) != sha:
        raise DataError(f"{path}: not the file {path.with_suffix('.json').name} was saved with; {fix}")
    try:
        arrays = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise DataError(f"{path}: corrupt ({type(e).__name__}); {fix}") from None
    missing = [k for k in ARRAYS if k not in arrays]
    if missing:
        raise DataError(f"{path}: arrays {missing} missing; {fix}")
    return {k: arrays[k] for k in ARRAYS}


def _check_shapes(t: CFTable, path: Path, fix: str) -> None:
    nu, ni = len(t.user_ids), len(t.item_ids)
    ok = (t.user_bias.shape == (nu,) and t.item_bias.shape == (ni,) and t.user_factors.ndim == 2
          and t.user_factors.shape[0] == nu and t.item_factors.shape == (ni, t.user_factors.shape[1]))
    if not ok:
        raise DataError(f"{path}: array shapes do not match {nu} users and {ni} items; {fix}")
    if not (t._users.is_unique and t._items.is_unique):
        raise DataError(f"{path.with_suffix('.json')}: repeated user or item ids; {fix}")


# ---------------------------------------------------------------------------------------- fitting
def _check_train(kind: str, train: pd.DataFrame, folds: int) -> None:
    if kind not in KINDS:
        raise DataError(f"CF kind {kind!r}: choose from {', '.join(KINDS)}")
    missing = [c for c in ("user_id", "movie_id", "rating", "timestamp") if c not in train]
    if missing:
        raise DataError(f"training ratings: columns {missing} missing; pass the training interactions "
                        f"(recsft.movielens.train_ratings)")
    if folds < 2 or len(train) < folds:
        raise DataError(f"folds={folds}: need 2 <= folds <= the {len(train)} training ratings")


def _ids(mapping: dict) -> list:
    """Raw ids in row order from a Cornac ``uid_map`` / ``iid_map`` (raw id -> row)."""
    out = [None] * len(mapping)
    for raw, row in mapping.items():
        out[row] = raw
    return out


def fit_table(kind: str, train: pd.DataFrame, seed: int) -> CFTable:
    """The Cornac ``kind`` model fit on ``train`` as an uncalibrated table (logit = predicted rating)."""
    model = fit_cornac(kind, train, 0.0, seed, False, 1)  # threshold and epochs: unused by biases and mf
    n_users = len(model.uid_map)
    factors = (np.asarray(model.u_factors, float), np.asarray(model.i_factors, float)) if kind == "mf" else \
        (np.zeros((n_users, 0)), np.zeros((len(model.iid_map), 0)))
    return CFTable(kind, _ids(model.uid_map), _ids(model.iid_map), float(model.global_mean),
                   np.asarray(model.u_biases, float).reshape(-1), np.asarray(model.i_biases, float).reshape(-1),
                   *factors, seed=seed)


def calibrate(predicted: np.ndarray, liked: np.ndarray) -> tuple[float, float]:
    """``(slope, intercept)`` of a logistic regression of ``liked`` on the predicted rating."""
    from sklearn.linear_model import LogisticRegression

    if liked.all() or not liked.any():
        raise DataError("training ratings: every rating is on one side of like_threshold; choose a like_threshold "
                        "inside the ratings' range")
    lr = LogisticRegression().fit(np.asarray(predicted, float).reshape(-1, 1), liked)
    return float(lr.coef_[0, 0]), float(lr.intercept_[0])


def fit_head(cf_logit, margin, liked) -> tuple[float, float]:
    """``(a, b)`` of P(Yes) = sigmoid(c + a * margin + b) by maximum likelihood, ``c`` a fixed offset: the second
    stage of a two-stage residual (``cf_fit: stacked``), on answers the LLM was not trained on."""
    from scipy.optimize import minimize
    from scipy.special import expit

    c, m, y = (np.asarray(v, dtype=np.float64) for v in (cf_logit, margin, liked))
    if not len(y) or y.all() or not y.any():
        raise DataError(f"cf_fit: stacked needs eval answers of both labels to fit a and b, got {len(y)} answers "
                        f"({int(y.sum())} Yes); use more eval records (cf_fit_samples)")

    def nll(theta):
        z = c + theta[0] * m + theta[1]
        err = expit(z) - y
        return float(np.mean(np.logaddexp(0.0, z) - y * z)), np.array([np.mean(err * m), np.mean(err)])

    res = minimize(nll, np.zeros(2), jac=True, method="BFGS")
    return float(res.x[0]), float(res.x[1])


def fold_of(n: int, folds: int, seed: int) -> np.ndarray:
    """A fold number per row: a seeded permutation dealt round-robin (fold sizes differ by at most one)."""
    fold = np.empty(n, dtype=int)
    fold[np.random.default_rng(seed).permutation(n)] = np.arange(n) % folds
    return fold


@dataclass
class CrossFit:
    """Out-of-fold like-logits aligned with the training rows, the table fit on all of them, each row's fold and
    the table fit without each fold (``fold_tables[k]`` never saw fold ``k``)."""

    logits: np.ndarray
    table: CFTable
    fold: np.ndarray
    fold_tables: list


def cross_fit(kind: str, train: pd.DataFrame, like_threshold: float, seed: int = 0, folds: int = 5) -> CrossFit:
    """Each row's logit from a model fit on the other ``folds - 1`` folds; one calibration, fit on those
    out-of-fold predictions, serves the logits and every table (the full one is used for eval/test rows)."""
    _check_train(kind, train, folds)
    fold = fold_of(len(train), folds, seed)
    predicted = np.empty(len(train))
    fold_tables = []
    for k in range(folds):
        held = fold == k
        rows = train[held]
        fold_tables.append(fit_table(kind, train[~held], seed))
        predicted[held] = fold_tables[-1].rating(rows.user_id, rows.movie_id)
    slope, intercept = calibrate(predicted, (train.rating >= like_threshold).to_numpy())
    cal = dict(slope=slope, intercept=intercept, like_threshold=float(like_threshold))
    table = replace(fit_table(kind, train, seed), **cal)
    return CrossFit(slope * predicted + intercept, table, fold, [replace(t, **cal) for t in fold_tables])


def cross_fit_logits(kind: str, train: pd.DataFrame, like_threshold: float, seed: int = 0,
                     folds: int = 5) -> tuple[np.ndarray, CFTable]:
    """Out-of-fold like-logits aligned with ``train``'s rows, and the table fit on all of ``train``
    (:func:`cross_fit`)."""
    fit = cross_fit(kind, train, like_threshold, seed, folds)
    return fit.logits, fit.table


def fit_cf(kind: str, train: pd.DataFrame, like_threshold: float, seed: int = 0, folds: int = 5) -> CFTable:
    """The full-fit table of :func:`cross_fit_logits` (calibrated on out-of-fold predictions)."""
    return cross_fit_logits(kind, train, like_threshold, seed, folds)[1]


def cf_lookups(data_dir: str | Path, kind: str, seed: int = 0, folds: int = 5) -> tuple[dict, CFTable]:
    """For a folder written by prepare_data.py: ``{(user_id, movie_id): c}`` of every training interaction
    (out-of-fold logits), and the full-fit table (carrying the folder's build id) for every other row."""
    fit = cf_cross_fit(data_dir, kind, seed, folds)
    return fit[0], fit[1].table


def cf_cross_fit(data_dir: str | Path, kind: str, seed: int = 0, folds: int = 5) -> tuple[dict, CrossFit, dict]:
    """:func:`cf_lookups`' logit lookup, the whole :class:`CrossFit` (its table carrying the folder's build id),
    and ``{(user_id, movie_id): fold}`` of every training interaction."""
    from .movielens import load_prepared, train_ratings

    data = load_prepared(data_dir)
    train = train_ratings(data.ratings, data.splits)
    fit = cross_fit(kind, train, data.params["like_threshold"], seed, folds)
    fit.table.build_id = data.build_id
    pairs = list(zip(train.user_id.tolist(), train.movie_id.tolist()))
    return dict(zip(pairs, fit.logits.tolist())), fit, dict(zip(pairs, fit.fold.tolist()))


# ------------------------------------------------------------------------------------ soft CF tokens
@dataclass(eq=False)
class TokenIds:
    """Token ids of the soft CF tokens (``cf_tokens``): ids at or above ``offset`` (the tokenizer's length) are
    not text but rows of :func:`token_features`. Table 0 is the full CF table; table ``k + 1`` the one fit without
    training fold ``k`` (a training answer's item token comes from the table that never saw that rating)."""

    table: CFTable
    offset: int

    @property
    def width(self) -> int:
        """Rows per table: users, items, an unknown user and an unknown item."""
        return len(self.table.user_ids) + len(self.table.item_ids) + 2

    @functools.cached_property
    def _user_rows(self) -> dict:
        return {u: j for j, u in enumerate(self.table._users)}  # dict lookups match pd.Index's (1 != "1")

    @functools.cached_property
    def _item_rows(self) -> dict:
        return {m: j for j, m in enumerate(self.table._items)}

    def user(self, user_id, table: int = 0) -> int:
        row = self._user_rows.get(user_id, -1)
        return self.offset + table * self.width + (row if row >= 0 else self.width - 2)

    def item(self, item_id, table: int = 0) -> int:
        row = self._item_rows.get(item_id, -1)
        return self.offset + table * self.width + (len(self.table.user_ids) + row if row >= 0 else self.width - 1)


def _features(t: CFTable, users: pd.Index, items: pd.Index) -> tuple[np.ndarray, np.ndarray]:
    """``[bias, factors...]`` of ``users`` / ``items`` in table ``t`` (zeros where ``t`` lacks the id)."""
    u, i = _rows(t._users, users), _rows(t._items, items)
    return (np.hstack([_gather(t.user_bias[:, None], u), _gather(t.user_factors, u)]),
            np.hstack([_gather(t.item_bias[:, None], i), _gather(t.item_factors, i)]))


def token_features(tables: Sequence[CFTable]) -> np.ndarray:
    """``(len(tables) * TokenIds.width, 1 + k)`` float32 inputs of the soft tokens, in :class:`TokenIds` order:
    per table its users' and items' ``[bias, factors]`` (aligned to ``tables[0]``'s ids), standardised by the
    mean and spread of ``tables[0]``'s users (items alike); unknown ids and the two unknown rows are 0 (the mean)."""
    full = tables[0]
    ref_u, ref_i = _features(full, full._users, full._items)
    stats = [(m.mean(0), m.std(0) + 1e-6) for m in (ref_u, ref_i)]
    out = []
    for t in tables:
        fu, fi = _features(t, full._users, full._items)
        ku, ki = _rows(t._users, full._users) >= 0, _rows(t._items, full._items) >= 0
        fu = np.where(ku[:, None], (fu - stats[0][0]) / stats[0][1], 0.0)
        fi = np.where(ki[:, None], (fi - stats[1][0]) / stats[1][1], 0.0)
        out.append(np.vstack([fu, fi, np.zeros((2, fu.shape[1]))]))
    return np.vstack(out).astype(np.float32)


# ------------------------------------------------------------------------------------------- head
@functools.cache
def _head_class():
    import torch

    class ResidualHead(torch.nn.Module):
        """``forward(cf_logit, margin) = cf_logit + a * margin + b``: two learned float32 scalars, a = 0.01 and
        b = 0 at the start (see ``INIT_A``). Saved as ``cf_head.safetensors`` next to the CF table."""

        def __init__(self, a: float = INIT_A, b: float = 0.0):
            super().__init__()
            self.a = torch.nn.Parameter(torch.tensor(float(a), dtype=torch.float32))
            self.b = torch.nn.Parameter(torch.tensor(float(b), dtype=torch.float32))

        def forward(self, cf_logit, margin):
            return cf_logit.float() + self.a * margin.float() + self.b

        def save(self, folder: str | Path) -> None:
            from safetensors.torch import save_file

            with atomic_path(Path(folder) / HEAD_FILE) as tmp:
                save_file({k: v.detach().float().cpu().contiguous() for k, v in self.state_dict().items()}, str(tmp))

        @classmethod
        def load(cls, folder: str | Path, fix: str = "save the head again with ResidualHead.save(folder)"):
            """The head saved in ``folder``; a missing or corrupt file is a DataError naming it and ``fix``."""
            from safetensors import SafetensorError
            from safetensors.torch import load_file

            path = Path(folder) / HEAD_FILE
            if not path.is_file():
                raise DataError(f"{path}: not found; {fix}")
            try:
                state = load_file(str(path))
            except (SafetensorError, OSError, ValueError) as e:
                raise DataError(f"{path}: corrupt ({type(e).__name__}); {fix}") from None
            if sorted(state) != ["a", "b"] or any(v.numel() != 1 for v in state.values()):
                raise DataError(f"{path}: expected two scalars 'a' and 'b', got {sorted(state)}; {fix}")
            return cls(float(state["a"]), float(state["b"]))

    ResidualHead.__qualname__ = "ResidualHead"  # pickle finds it as recsft.cf.ResidualHead
    ResidualHead.__module__ = __name__
    return ResidualHead


@functools.cache
def _tokens_class():
    import torch

    class CFTokenEmbedding(torch.nn.Module):
        """The model's input embedding with soft CF tokens: ids below ``offset`` are looked up in ``embed`` as usual;
        an id ``offset + r`` becomes ``mlp(features[r])``, a 2-layer network (GELU) from the CF model's
        ``[bias, factors]`` of a user or an item to one input embedding (CoLLM's mapping). ``features`` is
        :func:`token_features` (not saved: rebuilt from the CF table saved with the adapter); the network is
        saved as ``cf_tokens.safetensors``. The last layer starts scaled so a soft token has the typical size
        of a word embedding."""

        def __init__(self, embed, features: np.ndarray, offset: int):
            super().__init__()
            self.embed, self.offset = embed, int(offset)
            dim, width = embed.weight.shape[1], features.shape[1]
            self.register_buffer("features", torch.as_tensor(features, dtype=torch.float32), persistent=False)
            self.mlp = torch.nn.Sequential(torch.nn.Linear(width, dim), torch.nn.GELU(), torch.nn.Linear(dim, dim))
            self.to(embed.weight.device)
            with torch.no_grad():
                target = embed.weight[:self.offset].float().pow(2).mean().sqrt()
                scale = target / self.mlp(self.features).pow(2).mean().sqrt().clamp(min=1e-6)
                self.mlp[2].weight.mul_(scale)
                self.mlp[2].bias.mul_(scale)

        @property
        def weight(self):  # tied LM heads and resize_token_embeddings read the word embedding matrix
            return self.embed.weight

        def forward(self, input_ids):
            soft = input_ids >= self.offset
            out = self.embed(torch.where(soft, 0, input_ids))
            if bool(soft.any()):
                out = out.clone()
                out[soft] = self.mlp(self.features[input_ids[soft] - self.offset]).to(out.dtype)
            return out

        def save(self, folder: str | Path) -> None:
            from safetensors.torch import save_file

            state = {k: v.detach().float().cpu().contiguous() for k, v in self.mlp.state_dict().items()}
            with atomic_path(Path(folder) / TOKENS_FILE) as tmp:
                save_file(state, str(tmp), metadata={"offset": str(self.offset)})

        def load_mlp(self, folder: str | Path, fix: str) -> None:
            """The network saved in ``folder``; a missing, corrupt or mismatched file is a DataError naming it."""
            from safetensors import SafetensorError, safe_open

            path = Path(folder) / TOKENS_FILE
            if not path.is_file():
                raise DataError(f"{path}: not found; {fix}")
            try:
                with safe_open(str(path), framework="pt") as f:
                    offset = (f.metadata() or {}).get("offset")
                    state = {k: f.get_tensor(k) for k in f.keys()}
            except (SafetensorError, OSError, ValueError) as e:
                raise DataError(f"{path}: corrupt ({type(e).__name__}); {fix}") from None
            own = self.mlp.state_dict()
            if offset != str(self.offset) or sorted(state) != sorted(own) or any(
                    state[k].shape != own[k].shape for k in own):
                raise DataError(f"{path}: saved for another tokenizer or CF table (offset {offset}, this one "
                                f"{self.offset}); {fix}")
            self.mlp.load_state_dict({k: v.to(own[k].dtype) for k, v in state.items()})

    CFTokenEmbedding.__qualname__ = "CFTokenEmbedding"
    CFTokenEmbedding.__module__ = __name__
    return CFTokenEmbedding


def add_cf_tokens(model, tables: Sequence[CFTable], offset: int):
    """Give ``model`` soft CF tokens (:class:`CFTokenEmbedding`, ids from :class:`TokenIds`); returns the module."""
    module = _tokens_class()(model.get_input_embeddings(), token_features(tables), offset)
    model.set_input_embeddings(module)
    return module


def cf_token_ids(model) -> "TokenIds | None":
    """The :class:`TokenIds` of a model given soft CF tokens (``model.cf_token_ids``), else None."""
    return getattr(model, "cf_token_ids", None)


@contextlib.contextmanager
def without_cf_tokens(model):
    """Inside: ``model`` scores as if it had no soft CF tokens (none inserted; the base model of a comparison)."""
    tokens = model.__dict__.pop("cf_token_ids", None)
    try:
        yield model
    finally:
        if tokens is not None:
            model.cf_token_ids = tokens


def load_cf_tokens(model, folder: str | Path, offset: int, fix: str) -> bool:
    """Soft CF tokens saved with an adapter (``cf_tokens.safetensors`` + ``cf_tokens_table.*``): added to ``model``, which
    then carries ``cf_token_ids``; False (nothing done) when ``folder`` has none."""
    if not (Path(folder) / TOKENS_FILE).is_file():
        return False
    table = CFTable.load(folder, fix=fix, stem=TOKENS_TABLE)
    add_cf_tokens(model, [table], offset).load_mlp(folder, fix)
    model.cf_token_ids = TokenIds(table, offset)
    return True


def __getattr__(name: str):
    """``ResidualHead`` and ``CFTokenEmbedding`` are built on first use, so importing this module does not import
    torch."""
    if name == "ResidualHead":
        return _head_class()
    if name == "CFTokenEmbedding":
        return _tokens_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
