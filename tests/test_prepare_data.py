"""Data preparation on real MovieLens-100K (bundled offline) and on raw-folder formats."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

import prepare_data
from recsft import movielens
from recsft.formatting import format_prompt
from recsft.io import DataError, load_data

ROOT = Path(__file__).resolve().parents[1]
H = 15


@pytest.fixture(scope="module")
def slice_():
    ratings, titles = movielens.load_ratings("bundled")
    ratings = ratings[ratings.user_id <= 40]
    return ratings, titles, movielens.build_examples(ratings, titles, history_len=H, like_threshold=4.0)


def _timelines(ratings):
    """{user: [(timestamp, movie_id, rating), ...] in time order}."""
    out = {}
    for row in ratings.sort_values(["timestamp", "movie_id"], kind="stable").itertuples():
        out.setdefault(row.user_id, []).append((row.timestamp, row.movie_id, row.rating))
    return out


def test_split_by_time_has_no_leakage(slice_):
    ratings, _, splits = slice_
    times = {}
    for name, examples in splits.items():
        for e in examples:
            times.setdefault(e["user_id"], {}).setdefault(name, []).append(e["candidate_timestamp"])
    assert len(times) == 40  # every user of the slice has > 15 ratings
    for user, s in times.items():
        evals = s.get("eval", [])
        assert max(s["train"]) <= min(evals + s["test"]) and max(s["train"] + evals) <= min(s["test"]), user
        n = sum(map(len, s.values()))
        assert n == (ratings.user_id == user).sum() - H and len(s["test"]) == -(-n // 10), user


def test_labels_and_history_follow_the_timeline(slice_):
    ratings, titles, splits = slice_
    timelines = _timelines(ratings)
    for e in (e for examples in splits.values() for e in examples):
        line = timelines[e["user_id"]]
        pos = [m for _, m, _ in line].index(e["candidate_movie_id"])
        assert e["candidate_timestamp"] == line[pos][0] and e["candidate_title"] == titles[line[pos][1]]
        assert e["label"] == ("Yes" if line[pos][2] >= 4.0 else "No")
        assert pos >= H and e["history_titles"] == [titles[m] for _, m, _ in line[pos - H:pos]]
        assert e["history_ratings"] == [r for _, _, r in line[pos - H:pos]]
    assert any(e["label"] == "Yes" for e in splits["test"]) and any(e["label"] == "No" for e in splits["test"])


def test_deterministic_under_seed(slice_):
    ratings, titles, splits = slice_
    again = movielens.build_examples(ratings, titles, seed=42)
    other = movielens.build_examples(ratings, titles, seed=7)
    assert again == splits and other["train"] != splits["train"]
    assert sorted(map(json.dumps, other["train"])) == sorted(map(json.dumps, splits["train"]))


def test_users_with_too_few_ratings_are_skipped(slice_):
    ratings, titles, _ = slice_
    few = ratings[ratings.user_id == 1].sort_values("timestamp").head(H)
    assert movielens.build_examples(few, titles) == {"train": [], "eval": [], "test": []}


def test_both_formats_render_identical_prompts(slice_):
    _, _, splits = slice_
    for e in splits["test"][:20]:
        record = movielens.to_train_record(e)
        assert format_prompt(record) == format_prompt(e)
        assert "(rating ≈" in record["input"] and e["candidate_title"] in record["input"]


def test_main_writes_documented_schemas(tmp_path, capsys):
    stats = prepare_data.main(prepare_data.parse_args(["--out-dir", str(tmp_path), "--max-users", "30"]))
    train, evals = load_data(tmp_path / "train.json"), load_data(tmp_path / "eval.json")
    test = load_data(tmp_path / "test_raw.jsonl")
    assert json.loads((tmp_path / "train.json").read_text(encoding="utf-8"))[0] == train[0]  # a JSON array
    assert all(set(r) == {"instruction", "input", "output", "system"} for r in train + evals)
    assert all(set(r) == {"user_id", "history_titles", "history_ratings", "candidate_title",
                          "candidate_movie_id", "label", "candidate_timestamp"} for r in test)
    assert {r["output"] for r in train} == {"Yes", "No"} and {r["user_id"] for r in test} == set(range(1, 31))
    assert json.loads((tmp_path / "stats.json").read_text()) == stats
    assert [stats["splits"][k]["examples"] for k in ("train", "eval", "test")] == [len(train), len(evals), len(test)]
    assert stats["params"]["history_len"] == H and stats["source"] == "bundled"
    out = capsys.readouterr().out
    assert out.count("Yes share") == 3 and f"{len(train):6,d} examples" in out


# --------------------------------------------------------------------------------------- raw folders
ROWS = [(u, m, r, 1000 + 10 * m + u) for u in (1, 2) for m, r in zip(range(1, 21), [4, 2, 5, 3] * 5)]


def _write_raw(folder: Path, fmt: str) -> None:
    """20 ratings each for users 1 and 2, plus invalid rows; ml-1m titles are latin-1 with an accent."""
    folder.mkdir(parents=True)
    if fmt == "ml-100k":
        lines = ["\t".join(map(str, r)) for r in ROWS] + ["1\t5\tfive\t1", "2\t999\t4\t5", "bad line", "1\t2\t3\t4\t5"]
        (folder / "u.data").write_text("\n".join(lines) + "\n")
        (folder / "u.item").write_bytes("\n".join(f"{m}|Movie {m} (1995)|01-Jan-1995||x|0"
                                                  for m in range(1, 21)).encode("latin-1"))
    elif fmt == "ml-1m":
        lines = ["::".join(map(str, r)) for r in ROWS] + ["1::3::9::1"]
        (folder / "ratings.dat").write_text("\n".join(lines) + "\n")
        (folder / "movies.dat").write_bytes("\n".join(f"{m}::Café {m} (1990)::Drama"
                                                      for m in range(1, 21)).encode("latin-1"))
    else:
        lines = ["userId,movieId,rating,timestamp"] + [",".join(map(str, r)) for r in ROWS] + ["1,7,0.0,5", "1,,4,5"]
        (folder / "ratings.csv").write_text("\n".join(lines) + "\n")
        (folder / "movies.csv").write_text("movieId,title,genres\n" + "".join(
            f'{m},"Film, {m} (2001)",Drama\n' for m in range(1, 21)))


@pytest.mark.parametrize("fmt,dropped,first", [("ml-100k", 4, "u.data line 41: '1\\t5\\tfive\\t1'"),
                                               ("ml-1m", 1, "ratings.dat line 41: '1::3::9::1'"),
                                               ("ml-latest-small", 2, "ratings.csv line 42: '1,7,0.0,5'")])
def test_raw_dir_formats_drop_invalid_rows_with_one_counted_warning(tmp_path, caplog, fmt, dropped, first):
    _write_raw(tmp_path / fmt, fmt)
    with caplog.at_level(logging.WARNING, logger="recsft.movielens"):
        ratings, titles = movielens.load_raw_dir(tmp_path / fmt)
    assert len(caplog.records) == 1
    message = caplog.records[0].getMessage()
    assert f"dropped {dropped} invalid rating rows" in message and first in message
    assert ratings.to_dict("list") == {c: [r[i] for r in ROWS] for i, c in enumerate(movielens.COLUMNS)}
    assert ratings.dtypes.astype(str).tolist() == ["int64", "int64", "float64", "int64"]
    expected = {"ml-100k": "Movie 1 (1995)", "ml-1m": "Café 1 (1990)", "ml-latest-small": "Film, 1 (2001)"}[fmt]
    assert titles[1] == expected
    splits = movielens.build_examples(ratings, titles, history_len=5)
    assert [len(splits[k]) for k in ("train", "eval", "test")] == [22, 4, 4]


def test_unknown_movie_ids_are_counted(tmp_path, caplog):
    _write_raw(tmp_path / "ml", "ml-100k")
    with caplog.at_level(logging.WARNING):
        movielens.load_raw_dir(tmp_path / "ml")
    assert "1 with an unknown movie id" in caplog.text


def test_unrecognised_raw_dir_is_a_clear_error(tmp_path):
    (tmp_path / "readme.txt").write_text("hi")
    with pytest.raises(DataError, match="no MovieLens files found. Expected one of ml-100k: u.data"):
        movielens.load_raw_dir(tmp_path)
    with pytest.raises(DataError, match="folder does not exist"):
        movielens.load_raw_dir(tmp_path / "missing")


def test_download_extracts_the_archive(tmp_path, monkeypatch):
    _write_raw(tmp_path / "src" / "ml-100k", "ml-100k")
    zip_path = tmp_path / "ml-100k.zip"
    with zipfile.ZipFile(zip_path, "w") as z:
        for f in ("u.data", "u.item"):
            z.write(tmp_path / "src" / "ml-100k" / f, f"ml-100k/{f}")
    monkeypatch.setattr(movielens.urllib.request, "urlretrieve", lambda url, dest: Path(dest).write_bytes(
        zip_path.read_bytes()))
    folder = movielens.download(tmp_path / "cache")
    assert folder == tmp_path / "cache" / "ml-100k" and len(movielens.load_raw_dir(folder)[0]) == 40
    monkeypatch.setattr(movielens.urllib.request, "urlretrieve", None)  # cached: no second download
    assert movielens.download(tmp_path / "cache") == folder


def test_download_offline_suggests_the_bundled_default(tmp_path, monkeypatch):
    def offline(url, dest):
        raise OSError("Name or service not known")

    monkeypatch.setattr(movielens.urllib.request, "urlretrieve", offline)
    with pytest.raises(DataError, match="offline, use the bundled MovieLens-100K"):
        movielens.download(tmp_path)
    assert list(tmp_path.iterdir()) == []  # nothing half-written


def test_bad_parameters_are_rejected(slice_):
    ratings, titles, _ = slice_
    with pytest.raises(DataError, match="sum to less than 1"):
        movielens.build_examples(ratings, titles, eval_ratio=0.5, test_ratio=0.5)
    with pytest.raises(DataError, match="history_len must be >= 1"):
        movielens.build_examples(ratings, titles, history_len=0)


@pytest.mark.slow
def test_cli_error_exits_2_without_traceback(tmp_path):
    r = subprocess.run([sys.executable, "scripts/prepare_data.py", "--raw-dir", str(tmp_path / "nope"),
                        "--out-dir", str(tmp_path / "o")], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 2 and "error:" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "o").exists()
