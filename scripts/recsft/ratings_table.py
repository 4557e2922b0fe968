"""Your own ratings data: a ratings table and an items table (CSV, TSV or Parquet) -> the MovieLens layout.

Ratings table: one row per rating with user, item, rating and timestamp columns (names set by flags).
Items table: item id, title, optional genres. Ids may be strings; ids that are all integers become
integers (so a MovieLens export gives exactly the MovieLens outputs). Cleaning, each with one counted
warning: invalid rows (missing id, non-numeric or out-of-scale rating, unreadable timestamp, unknown
item) dropped; items without a title dropped with their ratings; duplicate (user, item) ratings: the
latest wins.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from .formatting import RATING_SCALE
from .io import DataError

logger = logging.getLogger(__name__)


@dataclass
class TableSpec:
    ratings: str
    items: str
    user_col: str = "user_id"
    item_col: str = "item_id"
    rating_col: str = "rating"
    time_col: str = "timestamp"
    items_id_col: str | None = None  # default: item_col
    title_col: str = "title"
    genres_col: str | None = "genres"  # optional: used when present
    rating_scale: tuple[float, float] = RATING_SCALE


def read_table(path: str | Path, flag: str) -> pd.DataFrame:
    """CSV / TSV / Parquet by extension, every column as text (Parquet keeps its types)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{flag} {path}: file does not exist")
    try:
        if path.suffix.lower() in (".parquet", ".pq"):
            return pd.read_parquet(path)
        sep = "\t" if path.suffix.lower() in (".tsv", ".tab") else ","
        return pd.read_csv(path, sep=sep, dtype=str, keep_default_na=False, encoding_errors="replace")
    except (ValueError, OSError, pd.errors.ParserError) as e:
        raise DataError(f"{flag} {path}: cannot read it as {'Parquet' if path.suffix in ('.parquet', '.pq') else 'CSV'} "
                        f"({str(e).splitlines()[0]})") from None


def require_columns(df: pd.DataFrame, path: str, wanted: dict[str, str]) -> None:
    """``wanted``: flag -> column name; the first missing one is an error naming the flag and the file."""
    for flag, col in wanted.items():
        if col not in df.columns:
            raise DataError(f"{flag} {col!r}: no such column in {path} (columns: {', '.join(map(str, df.columns))}); "
                            f"set {flag} to the right name")


def _ids(values: pd.Series) -> pd.Series:
    return values.astype(str).str.strip().where(values.notna(), "")


def _as_int_if_possible(*columns: pd.Series) -> list[pd.Series]:
    """Integer ids when every non-empty id of every column is an integer, else the strings unchanged."""
    def is_int(s: pd.Series) -> bool:
        s = s[s != ""]
        return bool(s.str.fullmatch(r"[+-]?\d+").all())

    if all(is_int(c) for c in columns):
        return [pd.to_numeric(c.where(c != ""), errors="coerce").astype("Int64") for c in columns]
    return list(columns)


def _timestamps(values: pd.Series) -> pd.Series:
    """Numeric timestamps as integers; otherwise date strings -> Unix seconds; unreadable -> NA."""
    num = pd.to_numeric(values, errors="coerce")
    if num.notna().sum() >= values.notna().sum() * 0.5:
        return num
    dates = pd.to_datetime(values, errors="coerce", utc=True)
    return (dates - pd.Timestamp("1970-01-01", tz="UTC")) // pd.Timedelta(seconds=1)


def load_items(spec: TableSpec) -> tuple[pd.DataFrame, int]:
    items = read_table(spec.items, "--items")
    id_col = spec.items_id_col or spec.item_col
    require_columns(items, spec.items, {"--items-id-col": id_col, "--title-col": spec.title_col})
    genres = spec.genres_col if spec.genres_col and spec.genres_col in items.columns else None
    out = pd.DataFrame({"movie_id": _ids(items[id_col]),  # titles kept verbatim (as in the MovieLens files)
                        "title": items[spec.title_col].astype(str).where(items[spec.title_col].notna(), "")})
    if genres:
        out["genres"] = items[genres].astype(str).where(items[genres].notna(), "")
    untitled = (out.title.str.strip() == "") | (out.movie_id == "")
    if untitled.any():
        logger.warning(f"{spec.items}: dropped {int(untitled.sum())} items without an id or title "
                       f"(first: row {int(untitled.idxmax()) + 2}); their ratings are dropped too")
    return out[~untitled].drop_duplicates("movie_id", keep="last").reset_index(drop=True), int(untitled.sum())


def load_table(spec: TableSpec) -> tuple[pd.DataFrame, dict, pd.DataFrame]:
    """``(ratings [user_id, movie_id, rating, timestamp], {movie_id: title}, items)`` from the two tables."""
    raw = read_table(spec.ratings, "--ratings")
    require_columns(raw, spec.ratings, {"--user-col": spec.user_col, "--item-col": spec.item_col,
                                        "--rating-col": spec.rating_col, "--time-col": spec.time_col})
    items, _ = load_items(spec)
    users, movies, item_ids = _as_int_if_possible(_ids(raw[spec.user_col]), _ids(raw[spec.item_col]), items.movie_id)
    if str(movies.dtype) != str(item_ids.dtype):  # one side has string ids: compare as strings
        movies, item_ids = _ids(raw[spec.item_col]), items.movie_id
    items = items.assign(movie_id=item_ids.astype("int64") if str(item_ids.dtype) == "Int64" else item_ids)
    df = pd.DataFrame({"user_id": users, "movie_id": movies, "rating": pd.to_numeric(raw[spec.rating_col], errors="coerce"),
                       "timestamp": _timestamps(raw[spec.time_col])})
    lo, hi = spec.rating_scale
    known = df.movie_id.isin(set(items.movie_id.tolist()))
    ok = (df.user_id.notna() & (df.user_id.astype(str) != "") & df.movie_id.notna() & (df.movie_id.astype(str) != "")
          & df.rating.between(lo, hi) & df.timestamp.notna() & known)
    if (~ok).any():
        unknown = int((~known & df.movie_id.notna()).sum())
        logger.warning(f"{spec.ratings}: dropped {int((~ok).sum())} invalid rating rows ({unknown} of an item without "
                       f"a title or not in --items; ratings must lie in {lo:g}..{hi:g}; first: row {int((~ok).idxmax()) + 2})")
    df = df[ok].astype({"rating": float, "timestamp": "int64"})
    df = df.astype({c: (int if str(df[c].dtype) == "Int64" else object) for c in ("user_id", "movie_id")})
    before = len(df)
    df = df.sort_values("timestamp", kind="stable").drop_duplicates(["user_id", "movie_id"], keep="last")
    if len(df) < before:
        logger.warning(f"{spec.ratings}: {before - len(df)} duplicate (user, item) ratings; the latest of each kept")
    if df.empty:
        raise DataError(f"--ratings {spec.ratings}: no valid rating rows left after cleaning (check the column flags, "
                        f"--rating-scale {lo:g},{hi:g} and --items {spec.items})")
    df = df.sort_index().reset_index(drop=True)
    items = items[items.movie_id.isin(set(df.movie_id.tolist()))].reset_index(drop=True)
    return df, dict(zip(items.movie_id.tolist(), items.title.tolist())), items
