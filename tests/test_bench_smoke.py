"""Each benchmark's main runs in --quick mode and prints its RATIO line (no wall-time assertions)."""

from __future__ import annotations

import json

import pytest

import bench_eval
import bench_preprocess
import bench_rank
import bench_train

pytestmark = pytest.mark.slow  # every test here trains, runs a benchmark or loads a real model


def test_bench_preprocess_quick(movielens_dir, tmp_path, capsys):
    out = tmp_path / "p.json"
    res = bench_preprocess.main(["--quick", "--data", str(movielens_dir / "train.json"), "--json-out", str(out)])
    assert "RATIO preprocess ours/per-example" in capsys.readouterr().out
    assert res["per_example"]["identical_to_ours"]  # same input_ids and labels as the per-example reference
    # the printed ratio is the ratio of the two measured throughputs
    ratio = res["ours_arrow"]["examples_per_s"] / res["per_example"]["examples_per_s"]
    assert res["speedup_vs_per_example"] == pytest.approx(ratio)
    assert res["pipeline_cached_reload_s"] > 0 and json.loads(out.read_text())["examples"] == res["examples"]


def test_bench_train_quick_same_loss(movielens_dir, tmp_path, capsys):
    res = bench_train.main(["--quick", "--data", str(movielens_dir / "train.json"),
                            "--json-out", str(tmp_path / "t.json")])
    assert "RATIO train ours/stock" in capsys.readouterr().out
    check = res["loss_check"]
    assert check["ok"], check  # ours computes the same loss and LoRA gradients as stock TRL on the same batch
    tps = {k: v["tokens_per_s"] for k, v in res["variants"].items()}
    assert res["speedup_ours_vs_stock"] == pytest.approx(tps["ours"] / tps["stock"])
    assert set(res["variants"]) == {"stock", "ours"}


def test_bench_eval_quick(movielens_dir, tmp_path, capsys):
    res = bench_eval.main(["--quick", "--data", str(movielens_dir / "eval.json"),
                           "--json-out", str(tmp_path / "e.json")])
    assert "RATIO eval score/generate" in capsys.readouterr().out
    assert res["prompts"] == 8 and res["speedup"] == pytest.approx(res["generate_s"] / res["score_s"])


def test_bench_rank_quick_same_scores(movielens_dir, tmp_path, capsys):
    res = bench_rank.main(["--quick", "--data", str(movielens_dir / "test_raw.jsonl"),
                           "--json-out", str(tmp_path / "r.json")])
    assert "RATIO rank shared-prefix/full" in capsys.readouterr().out
    assert res["max_abs_p_yes_diff"] < 1e-4  # shared-prefix P(Yes) equals full-prompt P(Yes) (float32)
    assert res["speedup"] == pytest.approx(res["full_s"] / res["shared_s"])
    assert res["questions"] == 2 and res["candidates_per_question"] == 12


def test_bench_qlora_cpu_quick(movielens_dir, tmp_path, capsys):
    pytest.importorskip("bitsandbytes")
    import bench_qlora_cpu

    res = bench_qlora_cpu.main(["--quick", "--variants", "lora,qlora", "--data", str(movielens_dir / "train.json"),
                                "--json-out", str(tmp_path / "q.json")])
    assert "RATIO qlora/lora CPU time per step" in capsys.readouterr().out
    lora, qlora = res["variants"]["lora"], res["variants"]["qlora"]
    assert lora["s_per_step"] > 0 and qlora["s_per_step"] > 0
    assert qlora["lora_dtypes"] == ["torch.float32"]  # trainable weights stay fp32 on the 4-bit base
    assert json.loads((tmp_path / "q.json").read_text())["variants"].keys() == {"lora", "qlora"}


def test_bench_train_quick_compiles_and_runs_4bit(movielens_dir, tmp_path, capsys):
    """torch_compile given at SFTConfig construction: the Trainer really compiles (frames > 0), graph breaks
    are counted; the 4-bit variant trains on the CPU."""
    pytest.importorskip("bitsandbytes")
    res = bench_train.main(["--quick", "--qlora", "--compile", "--skip-check", "--variants", "ours_qlora,ours_compile",
                            "--data", str(movielens_dir / "train.json"), "--json-out", str(tmp_path / "c.json")])
    out = capsys.readouterr().out
    assert res["variants"]["ours_qlora"]["tokens_per_s"] > 0
    run = res["variants"]["ours_compile"]["runs"][0]
    assert "error" not in run, run
    assert run["frames_compiled"] >= 1 and run["graph_breaks"] >= 0 and "graph break(s)" in out


def test_bench_session_quick(tmp_path, capsys):
    import bench_session

    res = bench_session.main(["--quick", "--json-out", str(tmp_path / "s.json")])
    assert "RATIO session/single tokens per label" in capsys.readouterr().out
    # the same candidates in both formats, every one a label
    assert res["single"]["labels"] == res["session"]["labels"] == res["single"]["examples"]
    assert res["session"]["examples"] < res["single"]["examples"]
    assert res["tokens_per_label_ratio"] == pytest.approx(res["session"]["tokens_per_label"]
                                                          / res["single"]["tokens_per_label"])
    assert res["labels_per_s_ratio"] == pytest.approx(res["session"]["labels_per_s"] / res["single"]["labels_per_s"])


def test_bench_block_order_quick(tmp_path, capsys):
    import bench_block_order

    res = bench_block_order.main(["--quick", "--json-out", str(tmp_path / "o.json")])
    assert "RATIO block scoring file/longest-first" in capsys.readouterr().out
    assert res["max_abs_p_yes_diff"] < 1e-4  # the order changes no answer's P(Yes) (right padding, float32)
    assert res["padding"]["sorted"] <= res["padding"]["file"] and res["records"] == 8
    assert res["speedup"] == pytest.approx(res["seconds"]["file"] / res["seconds"]["sorted"])
    assert json.loads((tmp_path / "o.json").read_text())["answers"] == res["answers"]
