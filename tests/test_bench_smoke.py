"""Each benchmark's main runs in --quick mode and prints its RATIO line (no wall-time assertions)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

import bench_eval  # noqa: E402
import bench_preprocess  # noqa: E402
import bench_train  # noqa: E402


def test_bench_preprocess_quick(movielens_dir, tmp_path, capsys):
    out = tmp_path / "p.json"
    res = bench_preprocess.main(["--quick", "--data", str(movielens_dir / "train.json"), "--json-out", str(out)])
    assert "RATIO preprocess ours/spec" in capsys.readouterr().out
    assert res["spec"]["identical_to_ours"] and res["speedup_vs_spec"] > 0
    assert res["pipeline_cached_reload_s"] > 0 and json.loads(out.read_text())["examples"] == res["examples"]


def test_bench_train_quick_same_loss(movielens_dir, tmp_path, capsys):
    res = bench_train.main(["--quick", "--data", str(movielens_dir / "train.json"),
                            "--json-out", str(tmp_path / "t.json")])
    assert "RATIO train ours/stock" in capsys.readouterr().out
    check = res["loss_check"]
    assert check["ok"], check  # ours computes the same loss and LoRA gradients as stock TRL on the same batch
    assert res["speedup_ours_vs_stock"] > 0
    assert set(res["variants"]) == {"stock", "ours"}


def test_bench_eval_quick(movielens_dir, tmp_path, capsys):
    res = bench_eval.main(["--quick", "--data", str(movielens_dir / "eval.json"),
                           "--json-out", str(tmp_path / "e.json")])
    assert "RATIO eval score/generate" in capsys.readouterr().out
    assert res["prompts"] == 8 and res["speedup"] > 0
