"""Your own ratings data: a ratings table and an items table (CSV, TSV or Parquet) -> the MovieLens layout.

Ratings table: one row per rating with user, item, rating and timestamp columns (names set by flags).
Items table: item id, title, optional genres. Ids are text (surrounding spaces removed); ids that are
all canonical integers (``7``, not ``007``) become integers (so a MovieLens export gives exactly the
MovieLens outputs). Times: :func:`normalize_times` (seconds, milliseconds, microseconds, nanoseconds or
dates -> Unix seconds). Text files: UTF-8, or UTF-16/32 with a byte-order mark. Cleaning, each with one
counted warning: invalid rows (missing id, non-numeric or out-of-scale rating, unreadable time, unknown
item) dropped; items without a title dropped with their ratings; an id repeated with the same title kept
once (with another title: an error); duplicate (user, item) ratings: the latest wins.
"""

from __future__ import annotations

import codecs
import gzip
import io
import logging
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
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
    genres_explicit: bool = False  # --genres-col given: the column must exist


def _decode(path: Path, flag: str) -> str:
    """The text of a CSV/TSV file: UTF-8 (a byte-order mark is skipped), or UTF-16/UTF-32 with a byte-order mark.

    Anything else (Latin-1, Windows-1252, UTF-16 without a byte-order mark) is refused: guessing would put
    replacement characters or NUL bytes into titles and column names without a word."""
    raw = path.read_bytes()
    if path.suffix.lower() == ".gz":
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError) as e:
            raise DataError(f"{flag} {path}: not a readable gzip file ({e}); check the file") from None
    for bom, codec in ((codecs.BOM_UTF32_LE, "utf-32"), (codecs.BOM_UTF32_BE, "utf-32"), (codecs.BOM_UTF8, "utf-8-sig"),
                       (codecs.BOM_UTF16_LE, "utf-16"), (codecs.BOM_UTF16_BE, "utf-16")):
        if raw.startswith(bom):
            break
    else:
        codec = "utf-8"
    fix = "re-save it as UTF-8 (or UTF-16 with a byte-order mark)"
    try:
        text = raw.decode(codec)
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise DataError(f"{flag} {path}: line {line}: not valid {codec.upper().replace('-SIG', '')} (byte {e.start}: "
                        f"{raw[e.start:e.start + 1]!r}); {fix}") from None
    if "\x00" in text:
        line = text[: text.index("\x00")].count("\n") + 1
        raise DataError(f"{flag} {path}: line {line}: NUL bytes in the text (UTF-16 without a byte-order mark, or a "
                        f"binary file); {fix}")
    return text


def read_table(path: str | Path, flag: str) -> pd.DataFrame:
    """CSV / TSV / Parquet by extension (a folder named ``*.parquet``: its Parquet parts), every column as text
    (Parquet keeps its types)."""
    path = Path(path)
    parquet = path.suffix.lower() in (".parquet", ".pq")
    if path.is_dir() and not parquet:  # a folder named *.parquet is a partitioned Parquet data set (Spark, ...)
        raise DataError(f"{flag} {path}: is a folder, not a file; give the table file (.csv, .tsv or .parquet, or a "
                        f"folder named *.parquet holding Parquet parts)")
    if not path.exists():
        raise DataError(f"{flag} {path}: file does not exist; check the path")
    try:
        if parquet:
            return pd.read_parquet(path)
        inner = Path(path.stem).suffix.lower() if path.suffix.lower() == ".gz" else path.suffix.lower()
        sep = "\t" if inner in (".tsv", ".tab") else ","
        table = pd.read_csv(io.StringIO(_decode(path, flag)), sep=sep, dtype=str, keep_default_na=False)
        return table.rename(columns=lambda c: c.strip() if isinstance(c, str) else c)  # "rating " -> "rating"
    except (ValueError, OSError, pd.errors.ParserError) as e:
        raise DataError(f"{flag} {path}: cannot read it as {'Parquet' if parquet else 'CSV'} "
                        f"({(str(e).splitlines() or [type(e).__name__])[0][:200]}); check the file") from None


def require_columns(df: pd.DataFrame, path: str, wanted: dict[str, str]) -> None:
    """``wanted``: flag -> column name; the first missing one is an error naming the flag and the file."""
    for flag, col in wanted.items():
        if col not in df.columns:
            hint = ""
            if len(df.columns) == 1:
                sep = next((s for s in (";", "\t", "|", ",") if s in str(df.columns[0])), None)
                if sep:
                    hint = (f"; the file has one column whose name holds {sep!r}: it is separated by {sep!r}, not by "
                            f"what its extension says (.csv: ',', .tsv: tab); re-save it or rename it")
            raise DataError(f"{flag} {col!r}: no such column in {path} (columns: {', '.join(map(str, df.columns))}); "
                            f"set {flag} to the right name{hint}")


CANONICAL_INT = r"-?(0|[1-9][0-9]*)"  # what becomes an integer id: no sign '+', no leading zeros, no spaces
INTEGRAL_FLOAT = r"-?(0|[1-9][0-9]*)(\.0+)?"  # 13 or 13.0: a whole number written by a float column


def _ids(values: pd.Series) -> pd.Series:
    """Ids as text with surrounding spaces removed, "" for a missing one. Integral floats lose their ``.0``: a
    Parquet float column of whole numbers, or a text column whose every id reads like ``13.0`` or ``13`` (an
    integer column with gaps, written to CSV by pandas)."""
    if pd.api.types.is_float_dtype(values.dtype):
        finite = values.dropna()
        if bool((finite == finite.round()).all()):
            values = values.astype("Int64")
    text = values.astype(object).map(lambda v: "" if v is None or (not isinstance(v, str) and pd.isna(v))
                                     else str(v).strip()).astype(object)
    filled = text[text != ""]
    if len(filled) and filled.str.fullmatch(INTEGRAL_FLOAT).all() and filled.str.contains(".", regex=False).any():
        text = text.str.replace(r"\.0+$", "", regex=True).astype(object)
    return text


def _as_int_if_possible(*columns: pd.Series) -> list[pd.Series]:
    """Integer ids when every non-empty id of every column is a canonical integer (``7``, not ``007`` or ``+7``),
    else the strings unchanged: so ``007`` and ``7`` stay two ids."""
    def is_int(s: pd.Series) -> bool:
        s = s[s != ""]
        return bool(s.str.fullmatch(CANONICAL_INT).all())

    if all(is_int(c) for c in columns):
        return [pd.to_numeric(c.where(c != ""), errors="coerce").astype("Int64") for c in columns]
    return list(columns)


TIME_UNITS = ((1e11, "seconds", 1), (1e14, "milliseconds", 10 ** 3), (1e17, "microseconds", 10 ** 6),
              (math.inf, "nanoseconds", 10 ** 9))  # median |value| below the bound -> that unit
MAX_SECONDS = 1e11  # about the year 5138: a converted time beyond it is unreadable


def normalize_times(values: pd.Series, what: str = "time") -> tuple[pd.Series, str]:
    """Any time column -> integer Unix seconds (``Int64``, NA where unreadable), and the unit it was read in.

    - datetime columns (Parquet timestamps, with or without a time zone; no zone = UTC): seconds, floored;
    - numbers (or text that is mostly numbers): Unix time whose unit is chosen once for the whole column by
      the median magnitude: below 1e11 seconds, below 1e14 milliseconds, below 1e17 microseconds, else
      nanoseconds; fractions are floored; ``inf``/``nan`` and values beyond the year 5138 are unreadable;
    - other text: ISO 8601 dates (``2021-03-04``, ``2021-03-04 10:00:00``, ``2021-03-04T10:00:00Z``; no zone =
      UTC); anything else (``03/04/2021``: day or month first?) is unreadable rather than guessed.
    """
    epoch = pd.Timestamp("1970-01-01", tz="UTC")
    if pd.api.types.is_datetime64_any_dtype(values.dtype):
        dates = values.dt.tz_localize("UTC") if values.dt.tz is None else values.dt.tz_convert("UTC")
        return ((dates - epoch) // pd.Timedelta(seconds=1)).astype("Int64"), "dates"
    if pd.api.types.is_bool_dtype(values.dtype):
        return pd.Series(pd.NA, index=values.index, dtype="Int64"), "booleans"
    text = values if pd.api.types.is_numeric_dtype(values.dtype) else values.astype(object).map(
        lambda v: v.strip() if isinstance(v, str) else v)
    num = pd.to_numeric(text, errors="coerce").astype(float)
    present = values.notna() & (values.astype(object).map(lambda v: not (isinstance(v, str) and not v.strip())))
    if num.notna().sum() >= present.sum() * 0.5 and num.notna().any():
        num = num.where(np.isfinite(num))
        median = float(num.abs().median()) if num.notna().any() else 0.0
        unit, div = next((u, d) for bound, u, d in TIME_UNITS if median < bound)
        kinds = np.searchsorted([b for b, _, _ in TIME_UNITS[:-1]], num.abs().dropna().to_numpy(), side="right")
        if len(set(kinds.tolist())) > 1:
            counts = {TIME_UNITS[k][1]: int((kinds == k).sum()) for k in sorted(set(kinds.tolist()))}
            raise DataError(f"{what}: Unix times of different units in one column ("
                            f"{', '.join(f'{n} look like {u}' for u, n in counts.items())}); convert the column to "
                            f"one unit (or to ISO 8601 dates)")
        seconds = np.floor(num / div)
        seconds = seconds.where(seconds.abs() < MAX_SECONDS)
        return seconds.astype("Int64"), unit
    dates = pd.to_datetime(text.where(present, None), errors="coerce", utc=True, format="ISO8601")
    return ((dates - epoch) // pd.Timedelta(seconds=1)).astype("Int64"), "dates"


MAX_BAD_RATING_SHARE = 0.1  # more unreadable times or off-scale ratings than this: a flag or the format is wrong
MAX_UNKNOWN_ITEM_SHARE = 0.5  # more ratings of items missing from the items table: the ids do not match
CONTROL = r"[\x00-\x1f\x7f]+"  # newlines, tabs, ... inside a title would break the prompt's lines


def load_items(spec: TableSpec) -> tuple[pd.DataFrame, int]:
    """``(items [movie_id, title[, genres]], untitled dropped)``: ids as text (see :func:`_ids`), one row per id."""
    items = read_table(spec.items, "--items")
    id_col = spec.items_id_col or spec.item_col
    require_columns(items, spec.items, {"--items-id-col": id_col, "--title-col": spec.title_col})
    if spec.genres_explicit and spec.genres_col not in items.columns:
        require_columns(items, spec.items, {"--genres-col": spec.genres_col})
    genres = spec.genres_col if spec.genres_col and spec.genres_col in items.columns else None
    titles = items[spec.title_col].astype(object).map(lambda v: "" if v is None or (not isinstance(v, str) and pd.isna(v))
                                                      else str(v))
    controls = titles.str.contains(CONTROL, regex=True)
    if controls.any():
        logger.warning(f"{spec.items}: {int(controls.sum())} titles hold line breaks or other control characters "
                       f"(first: row {int(controls.idxmax()) + 2}); each run of them is replaced by one space")
        titles = titles.str.replace(CONTROL, " ", regex=True)
    out = pd.DataFrame({"movie_id": _ids(items[id_col]), "title": titles.astype(object)})  # otherwise verbatim
    if genres:
        out["genres"] = items[genres].astype(object).map(lambda v: "" if v is None or (not isinstance(v, str)
                                                                                       and pd.isna(v)) else str(v))
    untitled = (out.title.str.strip() == "") | (out.movie_id == "")
    if untitled.any():
        logger.warning(f"{spec.items}: dropped {int(untitled.sum())} items without an id or title "
                       f"(first: row {int(untitled.idxmax()) + 2}); their ratings are dropped too")
    out = out[~untitled]
    if out.empty:
        raise DataError(f"--items {spec.items}: no item with both an id (column {id_col!r}) and a title (column "
                        f"{spec.title_col!r}); check --items-id-col and --title-col")
    dup = out.movie_id.duplicated(keep=False)
    if dup.any():
        first = out[dup].groupby("movie_id", sort=False)
        conflict = first.title.agg(lambda t: t.str.strip().nunique() > 1)
        if conflict.any():
            mid = conflict.index[conflict.to_numpy()][0]
            rows = out.index[out.movie_id == mid][:2]
            raise DataError(f"--items {spec.items}: id {mid!r} (column {id_col!r}) is given twice with different "
                            f"titles (rows {rows[0] + 2} and {rows[1] + 2}: {out.title[rows[0]]!r}, "
                            f"{out.title[rows[1]]!r}); give each item one id (ids are compared as text, so "
                            f"'007' and '7' are two ids)")
        n = int(out.movie_id.duplicated().sum())
        logger.warning(f"{spec.items}: {n} repeated rows of an id with the same title (first id: "
                       f"{out.movie_id[out.movie_id.duplicated()].iloc[0]!r}); each id kept once")
        out = out.drop_duplicates("movie_id", keep="first")
    return out.reset_index(drop=True), int(untitled.sum())


def _share(mask: pd.Series) -> float:
    return float(mask.fillna(False).astype(bool).sum()) / len(mask) if len(mask) else 0.0


def load_table(spec: TableSpec) -> tuple[pd.DataFrame, dict, pd.DataFrame]:
    """``(ratings [user_id, movie_id, rating, timestamp], {movie_id: title}, items)`` from the two tables."""
    flags = {"--user-col": spec.user_col, "--item-col": spec.item_col, "--rating-col": spec.rating_col,
             "--time-col": spec.time_col}
    same = [(a, b) for i, a in enumerate(flags) for b in list(flags)[i + 1:] if flags[a] == flags[b]]
    if same:
        a, b = same[0]
        raise DataError(f"{a} and {b} both name column {flags[a]!r}; each must name its own column of --ratings "
                        f"{spec.ratings}")
    raw = read_table(spec.ratings, "--ratings")
    require_columns(raw, spec.ratings, flags)
    items, _ = load_items(spec)
    users, movies, item_ids = _as_int_if_possible(_ids(raw[spec.user_col]), _ids(raw[spec.item_col]), items.movie_id)
    if str(movies.dtype) != str(item_ids.dtype):  # one side has string ids: compare as strings
        movies, item_ids = _ids(raw[spec.item_col]), items.movie_id
    items = items.assign(movie_id=item_ids.astype("int64") if str(item_ids.dtype) == "Int64" else item_ids)
    times, unit = normalize_times(raw[spec.time_col], f"--time-col {spec.time_col!r} of {spec.ratings}")
    if unit not in ("seconds", "dates"):
        logger.warning(f"{spec.ratings}: --time-col {spec.time_col!r} holds Unix time in {unit} (by the size of its "
                       f"values); converted to seconds")
    rating = pd.to_numeric(raw[spec.rating_col], errors="coerce").astype(float)
    df = pd.DataFrame({"user_id": users, "movie_id": movies, "rating": rating, "timestamp": times})
    lo, hi = spec.rating_scale
    known = df.movie_id.isin(set(items.movie_id.tolist()))
    ok = (df.user_id.notna() & (df.user_id.astype(str) != "") & df.movie_id.notna() & (df.movie_id.astype(str) != "")
          & df.rating.between(lo, hi) & df.timestamp.notna() & known)
    named = df.movie_id.notna() & (df.movie_id.astype(str) != "")
    unknown_rows = named & ~known
    if _share(unknown_rows) > MAX_UNKNOWN_ITEM_SHARE:
        raise DataError(f"--item-col {spec.item_col!r}: {int(unknown_rows.sum())} of {len(df)} ratings in {spec.ratings} "
                        f"name an item that is not in --items {spec.items} (e.g. {str(df.movie_id[unknown_rows].iloc[0])!r}; "
                        f"its ids look like {str(items.movie_id.iloc[0]) if len(items) else None!r}); ids are compared as "
                        f"text without surrounding spaces ('7.0', '007' and '7' differ): make the ids match, or set "
                        f"--item-col / --items-id-col")
    bad_time = times.isna()
    if _share(bad_time) > MAX_BAD_RATING_SHARE:
        first = raw[spec.time_col][bad_time].iloc[0]
        raise DataError(f"--time-col {spec.time_col!r}: {int(bad_time.sum())} of {len(times)} times in {spec.ratings} "
                        f"are missing or unreadable (first: {first!r}); fill them or drop those rows, and use Unix "
                        f"time (seconds, milliseconds, ...) or ISO 8601 dates (2021-03-04 or 2021-03-04T10:00:00Z), "
                        f"or set --time-col to the time column")
    bad_rating = ~rating.between(lo, hi)
    if _share(bad_rating) > MAX_BAD_RATING_SHARE:
        seen = rating[rating.notna() & np.isfinite(rating)]
        span = f"they range from {seen.min():g} to {seen.max():g}" if len(seen) else "none is a number"
        raise DataError(f"--rating-scale {lo:g},{hi:g}: {int(bad_rating.sum())} of {len(rating)} ratings in column "
                        f"{spec.rating_col!r} of {spec.ratings} are missing, not numbers or off the scale ({span}); "
                        f"set --rating-scale (and --like-threshold) to the data's scale, or --rating-col to the "
                        f"ratings column")
    if (~ok).any():
        unknown = int((~known & df.movie_id.notna()).sum())
        bad_time = int(df.timestamp.isna().sum())
        logger.warning(f"{spec.ratings}: dropped {int((~ok).sum())} invalid rating rows ({unknown} of an item without "
                       f"a title or not in --items, {bad_time} with an unreadable time; ratings must lie in "
                       f"{lo:g}..{hi:g}; first: row {int((~ok).to_numpy().argmax()) + 2})")
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
