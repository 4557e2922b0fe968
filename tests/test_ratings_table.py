"""Your own ratings data: generic ratings/items tables give the MovieLens outputs (same split rules and stats)."""

from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

import prepare_data
from recsft import movielens
from recsft.io import DataError, load_data

ROOT = Path(__file__).resolve().parents[1]


def _tables(folder: Path, scale=(1, 5), n_users=4, per_user=24, seed=0):
    """A small ratings CSV (string ids, custom column names) and items CSV; one untitled item, one duplicate."""
    rng = random.Random(seed)
    steps = [x / 2 for x in range(int(2 * scale[0]), int(2 * scale[1]) + 1)] if scale[0] % 1 else \
        list(range(scale[0], scale[1] + 1))
    rows = []
    for u in range(n_users):
        for k, m in enumerate(rng.sample(range(40), per_user)):
            rows.append({"uid": f"user-{u}", "sku": f"sku-{m}", "stars": rng.choice(steps), "ts": 1000 * u + 10 * k})
    rows.append({**rows[3], "stars": steps[0], "ts": rows[3]["ts"] + 10_000})  # a later re-rating: wins
    items = [{"sku": f"sku-{m}", "name": f"Film {m} ({1980 + m})", "genres": "Drama"} for m in range(40)]
    items[5]["name"] = ""  # untitled: dropped, with its ratings
    folder.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(rows).to_csv(folder / "ratings.csv", index=False)
    pd.DataFrame(items).to_csv(folder / "items.csv", index=False)
    return rows


def _args(folder: Path, out: Path, *extra):
    return prepare_data.parse_args(["--ratings", str(folder / "ratings.csv"), "--items", str(folder / "items.csv"),
                                    "--user-col", "uid", "--item-col", "sku", "--rating-col", "stars",
                                    "--time-col", "ts", "--title-col", "name", "--history-len", "5",
                                    "--out-dir", str(out), *extra])


@pytest.mark.parametrize("scale,threshold", [((1, 5), "4"), ((0.5, 5), "3.5")])
def test_csv_with_string_ids(tmp_path, caplog, scale, threshold):
    rows = _tables(tmp_path / "in", scale)
    scale_flag = ",".join(f"{x:g}" for x in scale)
    stats = prepare_data.main(_args(tmp_path / "in", tmp_path / "out", "--rating-scale", scale_flag,
                                    "--like-threshold", threshold))
    test = load_data(tmp_path / "out" / "test_raw.jsonl")
    assert all(isinstance(r["user_id"], str) and r["candidate_movie_id"].startswith("sku-") for r in test)
    assert all("Film 5 (" not in t for r in test for t in r["history_titles"] + [r["candidate_title"]])
    assert "items without an id or title" in caplog.text and "1 duplicate (user, item) ratings" in caplog.text
    inter = pd.read_parquet(tmp_path / "out" / "interactions.parquet")
    n_sku5 = sum(r["sku"] == "sku-5" for r in rows[:-1])
    assert stats["ratings"] == len(inter) == len(rows) - 1 - n_sku5  # duplicate merged, untitled item's ratings gone
    dup = rows[-1]
    assert inter[(inter.user_id == dup["uid"]) & (inter.movie_id == dup["sku"])].rating.tolist() == [dup["stars"]]
    assert set(pd.read_parquet(tmp_path / "out" / "items.parquet").columns) == {"movie_id", "title", "genres"}
    assert sum(s["examples"] for s in stats["splits"].values()) == stats["ratings"] - 5 * stats["users"]
    labels = {r["label"] for r in load_data(tmp_path / "out" / "train.json") for r in [{"label": r["output"]}]}
    assert labels == {"Yes", "No"}


@pytest.mark.slow  # prepares the whole of MovieLens-100K twice (~9 s)
def test_movielens_exported_as_csv_gives_identical_outputs(tmp_path):
    ratings, titles = movielens.load_bundled()
    ratings.to_csv(tmp_path / "ratings.csv", index=False)
    pd.DataFrame({"movie_id": list(titles), "title": list(titles.values())}).to_csv(tmp_path / "items.csv", index=False)
    ml = movielens.prepare(tmp_path / "ml")
    args = prepare_data.parse_args(["--ratings", str(tmp_path / "ratings.csv"), "--items", str(tmp_path / "items.csv"),
                                    "--item-col", "movie_id", "--out-dir", str(tmp_path / "csv")])
    csv = prepare_data.main(args)
    for name in ("train.json", "eval.json", "test_raw.jsonl"):
        assert (tmp_path / "ml" / name).read_bytes() == (tmp_path / "csv" / name).read_bytes(), name
    assert {**ml, "source": None, "build_id": None} == {**csv, "source": None, "build_id": None}
    for name in ("interactions.parquet", "items.parquet"):
        assert pd.read_parquet(tmp_path / "ml" / name).equals(pd.read_parquet(tmp_path / "csv" / name)), name


@pytest.mark.parametrize("flags,message", [
    (["--user-col", "user"], "--user-col 'user': no such column"),
    (["--title-col", "title"], "--title-col 'title': no such column"),
    (["--rating-scale", "6,10", "--like-threshold", "8"], "--rating-scale 6,10: "),
    (["--rating-scale", "5,1"], "--rating-scale 5,1"),
    (["--rating-scale", "1,10", "--like-threshold", "1"], "--like-threshold must be on the rating scale"),
])
def test_bad_tables_fail_before_writing(tmp_path, flags, message):
    _tables(tmp_path / "in")
    args = _args(tmp_path / "in", tmp_path / "out")
    args = prepare_data.parse_args([*sys_argv(args), *flags])
    with pytest.raises(DataError, match=message.replace("(", r"\(").replace(")", r"\)")):
        prepare_data.main(args)
    assert not (tmp_path / "out").exists()


def sys_argv(args) -> list[str]:
    return ["--ratings", args.ratings, "--items", args.items, "--user-col", args.user_col, "--item-col", args.item_col,
            "--rating-col", args.rating_col, "--time-col", args.time_col, "--title-col", args.title_col,
            "--history-len", str(args.history_len), "--out-dir", args.out_dir]


@pytest.mark.slow
def test_cli_unknown_column_exits_2_with_one_line(tmp_path):
    _tables(tmp_path / "in")
    r = subprocess.run([sys.executable, "scripts/prepare_data.py", "--ratings", str(tmp_path / "in" / "ratings.csv"),
                        "--items", str(tmp_path / "in" / "items.csv"), "--out-dir", str(tmp_path / "o")],
                       capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 2 and r.stderr.strip().count("\n") == 0 and "--user-col 'user_id'" in r.stderr
    assert not (tmp_path / "o").exists()


def test_a_ten_point_scale_works_end_to_end(tmp_path, qwen3_tokenizer):
    """Data prepared with --rating-scale 1,10 is read back on that scale by validation and prompt rendering
    (the scale travels in stats.json), while a rating off the scale is still refused."""
    from recsft.formatting import data_rating_scale, load_records
    from recsft.inference import prompts_for

    _tables(tmp_path / "in", (1, 10))
    prepare_data.main(_args(tmp_path / "in", tmp_path / "out", "--rating-scale", "1,10", "--like-threshold", "8"))
    test_file = str(tmp_path / "out" / "test_raw.jsonl")
    assert data_rating_scale(test_file) == (1.0, 10.0)
    records, _ = load_records(test_file)
    assert max(max(r["history_ratings"]) for r in records) > 5
    prompts, labels = prompts_for(records, qwen3_tokenizer, source=test_file)
    assert len(prompts) == len(records) and set(labels) <= {"Yes", "No"}
    bad = tmp_path / "out" / "bad.jsonl"
    bad.write_text(json.dumps({**records[0], "history_ratings": [11] * len(records[0]["history_ratings"])}) + "\n")
    with pytest.raises(DataError, match=r"history_ratings\[1\]: expected a number from 1.0 to 10.0"):
        load_records(str(bad))
