"""Each benchmark runs in --quick mode and reports a ratio (no wall-time assertions)."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

import bench_eval  # noqa: E402
import bench_preprocess  # noqa: E402
import bench_train  # noqa: E402


def test_bench_preprocess_quick(movielens_dir, tmp_path):
    res = bench_preprocess.main(bench_preprocess.parse_args(
        ["--quick", "--data", str(movielens_dir / "train.json"), "--json-out", str(tmp_path / "p.json")]))
    assert res["identical_output"] and res["speedup"] > 0 and (tmp_path / "p.json").is_file()


def test_bench_train_quick_same_loss(movielens_dir, tmp_path):
    res = bench_train.main(bench_train.parse_args(
        ["--quick", "--device", "cpu", "--data", str(movielens_dir / "train.json"), "--out", str(tmp_path)]))
    assert abs(res["stock"]["first_batch_loss"] - res["ours"]["first_batch_loss"]) < 1e-3
    assert res["stock"]["gradient_checkpointing"] and not res["ours"]["gradient_checkpointing"]
    assert res["speedup"] > 0


def test_bench_eval_quick(movielens_dir):
    res = bench_eval.main(bench_eval.parse_args(["--quick", "--device", "cpu",
                                                 "--data", str(movielens_dir / "test_raw.jsonl")]))
    assert res["prompts"] == 8 and res["speedup"] > 0
