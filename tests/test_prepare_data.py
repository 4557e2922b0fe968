"""Data preparation on real MovieLens-100K (bundled offline) and on raw-folder formats."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pandas as pd
import pytest

import prepare_data
from recsft import movielens
from recsft.formatting import format_prompt
from recsft.io import DataError, load_data


@pytest.fixture(scope="module")
def slice_():
    ratings, titles = movielens.load_ratings("bundled")
    ratings = ratings[ratings.user_id <= 40]
    return ratings, titles, movielens.build_examples(ratings, titles, history_len=15, like_threshold=4.0)


def test_split_has_no_leakage_and_labels_follow_threshold(slice_):
    ratings, titles, splits = slice_
    by_user: dict[int, dict[str, list[int]]] = {}
    for name, examples in splits.items():
        for e in examples:
            by_user.setdefault(e["user_id"], {}).setdefault(name, []).append(e["candidate_timestamp"])
            rating = ratings[(ratings.user_id == e["user_id"]) & (ratings.movie_id == e["candidate_movie_id"])]
            assert e["label"] == ("Yes" if rating.rating.iloc[0] >= 4 else "No")
            assert len(e["history_titles"]) == len(e["history_ratings"]) == 15
    for user, s in by_user.items():
        assert max(s["train"]) <= min(s.get("eval", [float("inf")])), user
        assert max(s.get("eval", s["train"])) <= min(s.get("test", [float("inf")])), user
        assert len(s["test"]) >= 1


def test_history_is_the_previous_movies_in_time(slice_):
    ratings, titles, splits = slice_
    e = splits["test"][0]
    g = ratings[ratings.user_id == e["user_id"]].sort_values(["timestamp", "movie_id"], kind="stable")
    pos = g.movie_id.tolist().index(e["candidate_movie_id"])
    assert [titles[m] for m in g.movie_id.tolist()[pos - 15:pos]] == e["history_titles"]
    assert g.rating.tolist()[pos - 15:pos] == e["history_ratings"]


def test_deterministic_under_seed(slice_):
    ratings, titles, splits = slice_
    again = movielens.build_examples(ratings, titles, seed=42)
    other = movielens.build_examples(ratings, titles, seed=7)
    assert again == splits and other["train"] != splits["train"]
    assert sorted(map(json.dumps, other["train"])) == sorted(map(json.dumps, splits["train"]))


def test_main_writes_documented_schemas(tmp_path, capsys):
    args = prepare_data.parse_args(["--out-dir", str(tmp_path), "--max-users", "30"])
    stats = prepare_data.main(args)
    train, evals = load_data(tmp_path / "train.json"), load_data(tmp_path / "eval.json")
    test = load_data(tmp_path / "test_raw.jsonl")
    assert set(train[0]) == set(evals[0]) == {"instruction", "input", "output", "system"}
    assert {"user_id", "history_titles", "history_ratings", "candidate_title", "candidate_movie_id",
            "label"} <= set(test[0])
    assert stats["splits"]["train"]["examples"] == len(train) and "Yes share" in capsys.readouterr().out
    # both formats render the same prompt text
    assert format_prompt(movielens.to_train_record(test[0]))["user"] == format_prompt(test[0])["user"]


def _write_raw(folder, fmt):
    folder.mkdir()
    rows = [(u, m, r, 1000 + 10 * m + u) for u in (1, 2) for m, r in zip(range(1, 21), [4, 2, 5, 3] * 5)]
    if fmt == "ml-100k":
        lines = ["\t".join(map(str, r)) for r in rows] + ["1\t5\tfive\t1", "2\t999\t4\t5", "bad line"]
        (folder / "u.data").write_text("\n".join(lines) + "\n")
        (folder / "u.item").write_bytes("\n".join(f"{m}|Movie {m} (1995)|01-Jan-1995||x|0" for m in range(1, 21))
                                         .encode("latin-1"))
    elif fmt == "ml-1m":
        lines = ["::".join(map(str, r)) for r in rows] + ["1::3::9::1"]
        (folder / "ratings.dat").write_text("\n".join(lines) + "\n")
        (folder / "movies.dat").write_bytes("\n".join(f"{m}::Café {m} (1990)::Drama" for m in range(1, 21))
                                            .encode("latin-1"))
    else:
        df = pd.DataFrame(rows, columns=["userId", "movieId", "rating", "timestamp"])
        df.loc[len(df)] = [1, 7, 3.5, 5]
        df.to_csv(folder / "ratings.csv", index=False)
        pd.DataFrame({"movieId": range(1, 21), "title": [f"Film {m} (2001)" for m in range(1, 21)],
                      "genres": "Drama"}).to_csv(folder / "movies.csv", index=False)


@pytest.mark.parametrize("fmt,dropped", [("ml-100k", 3), ("ml-1m", 1), ("ml-latest-small", 0)])
def test_raw_dir_formats_drop_invalid_rows_with_a_count(tmp_path, capsys, fmt, dropped):
    _write_raw(tmp_path / fmt, fmt)
    ratings, titles = movielens.load_raw_dir(tmp_path / fmt)
    assert len(ratings) == 40 + (1 if fmt == "ml-latest-small" else 0)
    out = capsys.readouterr().out
    assert (f"dropped {dropped} invalid rating rows" in out) if dropped else "dropped" not in out
    splits = movielens.build_examples(ratings, titles, history_len=5)
    assert splits["train"] and splits["test"]
    if fmt == "ml-1m":
        assert titles[1] == "Café 1 (1990)"


def test_unrecognised_raw_dir_is_a_clear_error(tmp_path):
    (tmp_path / "readme.txt").write_text("hi")
    with pytest.raises(DataError, match="no MovieLens files found. Expected one of ml-100k: u.data"):
        movielens.load_raw_dir(tmp_path)


def test_cli_error_exits_2_without_traceback(tmp_path):
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "scripts/prepare_data.py", "--raw-dir", str(tmp_path / "nope"),
                        "--out-dir", str(tmp_path / "o")], capture_output=True, text=True)
    assert r.returncode == 2 and "error:" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "o").exists()
