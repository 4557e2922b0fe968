"""Hostile input to every script: exit 2, one ``error:`` line naming the key/flag/file, no traceback, no model
load, nothing written; Ctrl-C: exit 130, one line, nothing partial.

The scripts run in-process through the real entry point (``recsft.cli.run`` with each script's ``parse_args``
and ``main``), so the cases stay fast; a few real invocations in subprocesses are marked slow.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import analyze_differences
import baselines
import check_seq_len
import compare_base_vs_lora
import compare_runs
import finetune_lora
import infer_lora
import prepare_data
from conftest import ROOT, tiny_config, write_config_yaml
from recsft import cli, modeling

READ_ONLY = "/proc/self/recsft_out" if os.geteuid() == 0 else None  # root writes anywhere but in /proc


# ------------------------------------------------------------------------------------------- helpers
def tree(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


@pytest.fixture
def no_model_load(monkeypatch):
    """Loading model weights fails the test: bad input must be caught before."""
    def boom(*a, **k):
        raise AssertionError("the model was loaded before the bad input was detected")
    monkeypatch.setattr(modeling, "load_model", boom)


@pytest.fixture
def no_tokenizer_load(monkeypatch, no_model_load):
    """Loading the tokenizer (or the model) fails the test: settings must be checked before tokenization."""
    def boom(*a, **k):
        raise AssertionError("the tokenizer was loaded before the bad input was detected")
    monkeypatch.setattr(modeling, "load_tokenizer", boom)


def invoke(script, argv: list[str], capsys) -> tuple[int, str]:
    """Run ``script`` through ``recsft.cli.run`` in-process; return (exit code, stderr)."""
    main = getattr(script, "cli", script.main)
    with pytest.raises(SystemExit) as exit_info:
        cli.run(main, lambda: script.parse_args(argv))
    return exit_info.value.code, capsys.readouterr().err


def assert_one_error_line(code: int, err: str, *names: str, exit_code: int = 2) -> str:
    assert code == exit_code, err
    assert "Traceback" not in err, err
    lines = [ln for ln in err.splitlines() if ln.startswith(("error:", "interrupted"))]
    assert len(lines) == 1, err
    assert err.rstrip().splitlines()[-1] == lines[0], err  # the error line is the last thing printed
    for name in names:
        assert name in lines[0], f"{name!r} not named in: {lines[0]}"
    return lines[0]


def check_case(script, argv, names, capsys, root: Path, exit_code: int = 2) -> str:
    before = tree(root)
    code, err = invoke(script, argv, capsys)
    line = assert_one_error_line(code, err, *names, exit_code=exit_code)
    assert tree(root) == before, f"files were written: {sorted(tree(root) - before)}"
    return line


@pytest.fixture
def work(tmp_path, monkeypatch):
    """A scratch folder that is also the working directory (default output paths land in it); logging goes to
    this test's stderr (an earlier ``cli.run`` may have pointed it at a stream that is closed by now)."""
    monkeypatch.chdir(tmp_path)
    cli.setup_logging()
    return tmp_path


# --------------------------------------------------------------------------- finetune_lora: config
def train_config(work: Path, model: str, **extra) -> str:
    cfg = tiny_config(work, model)
    return str(write_config_yaml(cfg, work / "cfg.yaml", **extra))


def _a_file(work: Path) -> str:
    (work / "a_file").write_text("x")
    return str(work / "a_file")


CONFIG_CASES = {  # override(s) -> names the error line must contain
    "lr_inf": (["learning_rate=inf"], ["learning_rate", "finite"]),
    "lr_nan": (["learning_rate=nan"], ["learning_rate"]),
    "epochs_nan": (["num_train_epochs=nan", "max_steps=-1"], ["num_train_epochs"]),
    "epochs_inf": (["num_train_epochs=inf", "max_steps=-1"], ["num_train_epochs"]),
    "epochs_negative": (["num_train_epochs=-2"], ["num_train_epochs"]),
    "patience_negative": (["early_stopping_patience=-1"], ["early_stopping_patience"]),
    "save_total_limit_0": (["save_total_limit=0"], ["save_total_limit"]),
    "workers_negative": (["dataloader_num_workers=-1"], ["dataloader_num_workers"]),
    "optim_typo": (["optim=adamw_torhc"], ["optim", "adamw_torch"]),
    "lora_target_typo_in_list": (["lora_target=q_proj,v_prj"], ["lora_target", "v_prj", "v_proj"]),
    "lora_target_bad_syntax": (["lora_target=q_proj;v_proj"], ["lora_target"]),
    "flash_attention_2_on_cpu": (["flash_attn=flash_attention_2"], ["flash_attn", "flash_attention_2"]),
    "flash_attn_unknown": (["flash_attn=flash2"], ["flash_attn"]),
    "model_path_missing": (["model_name_or_path=/nonexistent/models/qwen"], ["model_name_or_path"]),
    "model_pkg_missing": (["model_name_or_path=pkg://no-such-dist-recsft/x"], ["model_name_or_path", "no-such-dist"]),
    "seed_negative": (["seed=-1"], ["seed"]),
    "max_steps_0": (["max_steps=0"], ["max_steps"]),
    "unknown_key": (["cutof_len=512"], ["cutof_len", "cutoff_len"]),
    "int_not_a_number": (["lora_rank=sixteen"], ["lora_rank"]),
    "int_overflow": (["lora_rank=1e400"], ["lora_rank"]),
    "output_dir_empty": (["output_dir="], ["output_dir"]),
    "override_without_equals": (["cutoff_len"], ["cutoff_len", "key=value"]),
}


@pytest.mark.parametrize("case", sorted(CONFIG_CASES))
def test_finetune_bad_setting(case, work, tiny_qwen3, capsys, no_tokenizer_load):
    overrides, names = CONFIG_CASES[case]
    check_case(finetune_lora, ["--config", train_config(work, tiny_qwen3), *overrides], names, capsys, work)


def test_finetune_hub_id_not_cached_offline(work, tiny_qwen3, capsys, monkeypatch, no_tokenizer_load):
    from huggingface_hub import constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    check_case(finetune_lora, ["--config", train_config(work, tiny_qwen3), "model_name_or_path=recsft-test/no-such-model"],
               ["model_name_or_path", "recsft-test/no-such-model", "HF_HUB_OFFLINE"], capsys, work)


def test_finetune_model_folder_without_config(work, tiny_qwen3, capsys, no_tokenizer_load):
    (work / "not_a_model").mkdir()
    check_case(finetune_lora, ["--config", train_config(work, tiny_qwen3), f"model_name_or_path={work / 'not_a_model'}"],
               ["model_name_or_path", "config.json"], capsys, work)


OUTPUT_DIR_CASES = {"is_a_file": lambda w: _a_file(w), "under_a_file": lambda w: _a_file(w) + "/sub",
                    "read_only": lambda w: READ_ONLY or str(_read_only_dir(w) / "out")}


def _read_only_dir(work: Path) -> Path:
    d = work / "ro"
    d.mkdir()
    d.chmod(0o555)
    return d


@pytest.mark.parametrize("case", sorted(OUTPUT_DIR_CASES))
def test_finetune_unwritable_output_dir_fails_before_loading(case, work, tiny_qwen3, capsys, no_tokenizer_load):
    cfg = train_config(work, tiny_qwen3)
    out = OUTPUT_DIR_CASES[case](work)
    check_case(finetune_lora, ["--config", cfg, f"output_dir={out}"], ["output_dir"], capsys, work)


YAML_CASES = {
    "duplicate_key": ("lora_rank: 8\ncutoff_len: 256\nlora_rank: 16\n", ["lora_rank", "twice", "line 3"]),
    "empty": ("# nothing here\n", ["empty"]),
    "top_level_list": ("- lora_rank: 8\n", ["mapping"]),
    "invalid_yaml": ("lora_rank: [8\n", ["invalid YAML"]),
    "non_utf8": (b"lora_rank: 8 # caf\xe9\n", ["UTF-8"]),
}


@pytest.mark.parametrize("case", sorted(YAML_CASES))
def test_finetune_bad_yaml(case, work, capsys, no_tokenizer_load):
    text, names = YAML_CASES[case]
    path = work / "bad.yaml"
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    check_case(finetune_lora, ["--config", str(path)], ["bad.yaml", *names], capsys, work)


def test_finetune_config_is_a_folder(work, capsys):
    (work / "cfgdir").mkdir()
    check_case(finetune_lora, ["--config", str(work / "cfgdir")], ["cfgdir", "folder"], capsys, work)


FLAG_CASES = {
    "extra_epochs_negative": (["--extra-epochs", "-1"], ["--extra-epochs"]),
    "extra_epochs_nan": (["--extra-epochs", "nan"], ["--extra-epochs"]),
    "extra_epochs_with_max_steps": (["--extra-epochs", "1"], ["--extra-epochs", "max_steps"]),
    "resume_from_missing_folder": (["--resume_from_checkpoint", "nope/checkpoint-9"], ["--resume_from_checkpoint"]),
}


@pytest.mark.parametrize("case", sorted(FLAG_CASES))
def test_finetune_bad_flag(case, work, tiny_qwen3, capsys, no_tokenizer_load):
    flags, names = FLAG_CASES[case]
    check_case(finetune_lora, ["--config", train_config(work, tiny_qwen3), *flags], names, capsys, work)


# ------------------------------------------------------------------------------ finetune_lora: data
def _registry(work: Path, info) -> list[str]:
    (work / "reg").mkdir()
    (work / "reg" / "dataset_info.json").write_text(json.dumps(info))
    return [f"dataset_dir={work / 'reg'}", "dataset=movielens_train"]


TEST_RECORD = {"user_id": 1, "history_titles": ["Heat (1995)", "Fargo (1996)"], "history_ratings": [4, 5],
               "candidate_title": "Alien (1979)", "candidate_movie_id": 3, "label": "Yes"}

DATA_CASES = {
    "dataset_info_not_an_object": (lambda w: _registry(w, ["movielens_train"]), ["dataset_info.json", "object"]),
    "file_name_not_a_string": (lambda w: _registry(w, {"movielens_train": {"file_name": 5}}),
                               ["dataset_info.json", "file_name"]),
    "dataset_not_registered": (lambda w: _registry(w, {"other": {"file_name": "x.json"}}),
                               ["movielens_train", "dataset_info.json"]),
    "rating_out_of_scale": (lambda w: _records(w, [TEST_RECORD, {**TEST_RECORD, "history_ratings": [4, 7]}]),
                            ["train.jsonl", "record 2", "history_ratings[2]"]),
}


def _records(work: Path, records: list[dict], name: str = "train.jsonl") -> list[str]:
    (work / name).write_text("".join(json.dumps(r) + "\n" for r in records))
    return [f"dataset={work / name}"]


@pytest.mark.parametrize("case", sorted(DATA_CASES))
def test_finetune_bad_data(case, work, tiny_qwen3, capsys, no_model_load):
    make, names = DATA_CASES[case]
    cfg = train_config(work, tiny_qwen3)
    check_case(finetune_lora, ["--config", cfg, *make(work)], names, capsys, work)


# ---------------------------------------------------------------------------- finetune_lora: resume
def _checkpoint(folder: Path, step: int, rank: int = 16, state: str | None = None, weights: bool = True) -> Path:
    ckpt = folder / f"checkpoint-{step}"
    ckpt.mkdir(parents=True)
    (ckpt / "trainer_state.json").write_text(state if state is not None else json.dumps({"global_step": step}))
    (ckpt / "adapter_config.json").write_text(json.dumps({"r": rank, "target_modules": ["q_proj", "v_proj"]}))
    if weights:
        (ckpt / "adapter_model.safetensors").write_bytes(b"not read before the shape check")
    return ckpt


def test_resume_with_another_lora_shape_is_refused(work, tiny_qwen3, capsys, no_tokenizer_load):
    cfg = train_config(work, tiny_qwen3, lora_target="qv", lora_rank=16)
    _checkpoint(work / "out", 4, rank=8)
    check_case(finetune_lora, ["--config", cfg, "--resume"], ["--resume", "checkpoint-4", "r=8", "lora_rank"],
               capsys, work)


def test_resume_from_checkpoint_with_truncated_state(work, tiny_qwen3, capsys, no_tokenizer_load):
    cfg = train_config(work, tiny_qwen3)
    ckpt = _checkpoint(work / "out", 4, state='{"global_step": 4, "log_hist')
    check_case(finetune_lora, ["--config", cfg, "--resume_from_checkpoint", str(ckpt)], ["trainer_state.json"],
               capsys, work)


def test_output_dir_locked_by_a_live_run(work, tiny_qwen3, capsys, no_tokenizer_load):
    cfg = train_config(work, tiny_qwen3)
    (work / "out").mkdir()
    (work / "out" / ".recsft.lock").write_text(json.dumps({"pid": os.getppid(), "host": os.uname().nodename}))
    check_case(finetune_lora, ["--config", cfg], ["output_dir", "in use", str(os.getppid())], capsys, work)


# ------------------------------------------------------------------------------------- infer_lora
def _adapter(work: Path, base: str, shapes: dict[str, list[int]] | None = None, r: int = 4,
             config: str | None = None, weights: bytes | None = None) -> str:
    """An adapter folder; by default a valid-looking one for ``base`` (q_proj of layer 0)."""
    import torch
    from safetensors.torch import save_file

    folder = work / "adapter"
    folder.mkdir()
    (folder / "adapter_config.json").write_text(config if config is not None else json.dumps(
        {"r": r, "base_model_name_or_path": base, "target_modules": ["q_proj"], "peft_type": "LORA"}))
    if weights is not None:
        (folder / "adapter_model.safetensors").write_bytes(weights)
    elif shapes is not None:
        save_file({k: torch.zeros(v) for k, v in shapes.items()}, str(folder / "adapter_model.safetensors"))
    return str(folder)


Q = "base_model.model.model.layers.0.self_attn.q_proj"


def _corrupt_safetensors(work: Path, base: str) -> str:
    import torch
    from safetensors.torch import save_file

    tmp = work / "full.safetensors"
    save_file({f"{Q}.lora_A.weight": torch.zeros(4, 32)}, str(tmp))
    data = tmp.read_bytes()
    tmp.unlink()
    return _adapter(work, base, weights=data[: len(data) // 2])


ADAPTER_CASES = {
    "missing_folder": (lambda w, b: str(w / "no_adapter"), ["adapter_dir", "no_adapter"]),
    "is_a_file": (lambda w, b: _a_file(w), ["adapter_dir", "is a file, not a folder"]),
    "corrupt_config": (lambda w, b: _adapter(w, b, config="{\"r\": 4,"), ["adapter_config.json"]),
    "config_not_object": (lambda w, b: _adapter(w, b, config="[4]"), ["adapter_config.json"]),
    "no_weights": (lambda w, b: _adapter(w, b), ["adapter_model.safetensors"]),
    "garbage_weights": (lambda w, b: _adapter(w, b, weights=b"\x00garbage"), ["adapter_model.safetensors"]),
    "truncated_weights": (lambda w, b: _corrupt_safetensors(w, b), ["adapter_model.safetensors", "truncated"]),
    "other_base_shapes": (lambda w, b: _adapter(w, b, {f"{Q}.lora_A.weight": [4, 896],
                                                       f"{Q}.lora_B.weight": [1024, 4]}), ["lora_A", "896"]),
    "other_base_layers": (lambda w, b: _adapter(w, b, {"base_model.model.model.layers.9.self_attn.q_proj.lora_A.weight":
                                                       [4, 32]}), ["layers.9", "not a linear layer"]),
    "rank_mismatch": (lambda w, b: _adapter(w, b, {f"{Q}.lora_A.weight": [8, 32], f"{Q}.lora_B.weight": [32, 8]}),
                      ["lora_A", "r=4"]),
}


def infer_config(work: Path, model: str, **extra) -> str:
    return train_config(work, model, **extra)


@pytest.mark.parametrize("case", sorted(ADAPTER_CASES))
def test_infer_bad_adapter_fails_before_the_base_model(case, work, tiny_qwen3, capsys, no_tokenizer_load):
    make, names = ADAPTER_CASES[case]
    cfg = infer_config(work, tiny_qwen3)
    adapter = make(work, tiny_qwen3)
    test_file = _records(work, [TEST_RECORD], "test.jsonl")[0].split("=", 1)[1]
    check_case(infer_lora, ["--config", cfg, "--adapter_dir", adapter, "--test_file", test_file,
                            "--output_dir", str(work / "pred")], names, capsys, work)


RECORD_CASES = {
    "rating_above_5": ({"history_ratings": [4, 7]}, ["history_ratings[2]", "0.5", "5.0"]),
    "rating_below_0_5": ({"history_ratings": [0, 4]}, ["history_ratings[1]"]),
    "rating_null": ({"history_ratings": [None, 4]}, ["history_ratings[1]", "None"]),
    "rating_text": ({"history_ratings": ["four", 4]}, ["history_ratings[1]", "four"]),
    "rating_nan": ({"history_ratings": [float("nan"), 4]}, ["history_ratings[1]", "nan"]),
    "rating_bool": ({"history_ratings": [True, 4]}, ["history_ratings[1]"]),
    "label_null": ({"label": None}, ["record 2", "label"]),
    "label_not_yes_no": ({"label": "maybe"}, ["record 2", "label", "maybe"]),
    "title_not_text": ({"history_titles": [5, "Fargo (1996)"]}, ["history_titles[1]"]),
    "candidate_missing": ({"candidate_title": None}, ["candidate_title"]),
    "lengths_differ": ({"history_ratings": [4]}, ["history_titles", "same length"]),
}


@pytest.mark.parametrize("case", sorted(RECORD_CASES))
def test_infer_bad_test_record(case, work, tiny_qwen3, capsys, no_tokenizer_load):
    change, names = RECORD_CASES[case]
    cfg = infer_config(work, tiny_qwen3)
    bad = {**TEST_RECORD, **change}
    (work / "test.jsonl").write_text(json.dumps(TEST_RECORD) + "\n" + json.dumps(bad) + "\n")
    check_case(infer_lora, ["--config", cfg, "--adapter_dir", "none", "--test_file", str(work / "test.jsonl"),
                            "--output_dir", str(work / "pred")], ["test.jsonl", *names], capsys, work)


INFER_FLAG_CASES = {
    "max_samples_0": (["--max_samples", "0"], ["--max_samples", "positive"]),
    "max_samples_negative": (["--max_samples", "-3"], ["--max_samples"]),
    "max_samples_text": (["--max_samples", "ten"], ["--max_samples", "ten"]),
    "calibration_negative": (["--calibration_samples", "-1"], ["--calibration_samples"]),
    "output_dir_empty": (["--output_dir", ""], ["--output_dir"]),
    "output_dir_is_a_file": (["--output_dir", "a_file"], ["--output_dir", "a_file"]),
    "eval_mode_unknown": (["--eval_mode", "vote"], ["--eval_mode", "vote"]),
    "flash_attention_2_on_cpu": (["flash_attn=flash_attention_2"], ["flash_attn"]),
    "tokenizer_folder_missing": (["tokenizer_name_or_path=/no/such/tokenizer"], ["tokenizer_name_or_path"]),
    "calibration_without_eval_data": (["--eval_mode", "score", "--calibration_samples", "5",
                                       "eval_dataset=missing_eval.json"], ["missing_eval.json"]),
}


@pytest.mark.parametrize("case", sorted(INFER_FLAG_CASES))
def test_infer_bad_flag(case, work, tiny_qwen3, capsys, no_tokenizer_load):
    flags, names = INFER_FLAG_CASES[case]
    cfg = infer_config(work, tiny_qwen3)
    _a_file(work)
    test_file = _records(work, [TEST_RECORD], "test.jsonl")[0].split("=", 1)[1]
    argv = ["--config", cfg, "--adapter_dir", "none", "--test_file", test_file]
    argv += [] if "--output_dir" in flags else ["--output_dir", str(work / "pred")]
    check_case(infer_lora, argv + flags, names, capsys, work)


# --------------------------------------------------------------------------- compare_base_vs_lora
COMPARE_CASES = {
    "show_negative": (["--show", "-1"], ["--show"]),
    "flash_attention_2_on_cpu": (["flash_attn=flash_attention_2"], ["flash_attn"]),
    "model_missing": (["model_name_or_path=/no/such/model"], ["model_name_or_path"]),
    "adapter_none": (["--adapter_dir", "none"], ["--adapter_dir"]),
    "output_dir_is_a_file": (["--output_dir", "a_file"], ["--output_dir"]),
    "max_samples_0": (["--max_samples", "0"], ["--max_samples"]),
}


@pytest.mark.parametrize("case", sorted(COMPARE_CASES))
def test_compare_bad_flag(case, work, tiny_qwen3, capsys, no_tokenizer_load):
    flags, names = COMPARE_CASES[case]
    cfg = infer_config(work, tiny_qwen3)
    _a_file(work)
    check_case(compare_base_vs_lora, ["--config", cfg, *flags], names, capsys, work)


# ------------------------------------------------------------------------------------ prepare_data
PREPARE_CASES = {
    "max_users_0": (["--max-users", "0"], ["--max-users"]),
    "max_users_negative": (["--max-users", "-5"], ["--max-users"]),
    "like_threshold_above_scale": (["--like-threshold", "7"], ["--like-threshold"]),
    "like_threshold_everything_yes": (["--like-threshold", "0.5"], ["--like-threshold"]),
    "like_threshold_nan": (["--like-threshold", "nan"], ["--like-threshold"]),
    "out_dir_is_a_file": (["--out-dir", "a_file"], ["--out-dir", "a_file"]),
    "out_dir_empty": (["--out-dir", ""], ["--out-dir"]),
    "ratios_sum_to_1": (["--eval-ratio", "0.6", "--test-ratio", "0.5"], ["--eval-ratio", "--test-ratio"]),
    "raw_dir_missing": (["--raw-dir", "no_such_dir"], ["--raw-dir", "no_such_dir"]),
    "history_len_0": (["--history-len", "0"], ["--history-len"]),
    "test_ratio_0": (["--test-ratio", "0", "--max-users", "10"], ["--test-ratio", "empty"]),
    "eval_ratio_0": (["--eval-ratio", "0", "--max-users", "10"], ["--eval-ratio", "empty"]),
    "seed_negative": (["--seed", "-1"], ["--seed"]),
    "source_unknown": (["--source", "web"], ["--source", "web"]),
}


@pytest.mark.parametrize("case", sorted(PREPARE_CASES))
def test_prepare_bad_flag(case, work, capsys):
    flags, names = PREPARE_CASES[case]
    _a_file(work)
    argv = flags if "--out-dir" in flags else ["--out-dir", str(work / "data"), *flags]
    check_case(prepare_data, argv, names, capsys, work)


def test_prepare_read_only_out_dir(work, capsys):
    out = READ_ONLY or str(_read_only_dir(work) / "data")
    check_case(prepare_data, ["--out-dir", out], ["--out-dir", "not writable"], capsys, work)


# --------------------------------------------------------------------------------------- baselines
@pytest.fixture(scope="module")
def small_data(tmp_path_factory) -> Path:
    """prepare_data output for the first 30 users of the bundled MovieLens-100K."""
    from recsft import movielens

    out = tmp_path_factory.mktemp("small") / "data"
    movielens.prepare(str(out), max_users=30)
    return out


def _data_copy(work: Path, small_data: Path, keep_manifest: bool = False) -> Path:
    import shutil

    folder = work / "data"
    shutil.copytree(small_data, folder)
    if not keep_manifest:
        (folder / "manifest.json").unlink()  # hand-edited files: the manifest would flag any edit first
    return folder


def _edit_stats(folder: Path, change) -> None:
    stats = json.loads((folder / "stats.json").read_text())
    (folder / "stats.json").write_text(json.dumps(change(stats)))


def _drop_key(rows_file: Path, key: str, index: int = 1) -> None:
    rows = [json.loads(x) for x in rows_file.read_text().splitlines()]
    rows[index].pop(key)
    rows_file.write_text("".join(json.dumps(r) + "\n" for r in rows))


BASELINE_CASES = {
    "stats_missing_params": (lambda f: _edit_stats(f, lambda s: {k: v for k, v in s.items() if k != "params"}),
                             ["stats.json", "params"]),
    "stats_param_missing": (lambda f: _edit_stats(f, lambda s: {**s, "params": {**s["params"], "history_len": None}}),
                            ["stats.json", "params.history_len"]),
    "stats_not_an_object": (lambda f: (f / "stats.json").write_text("[1, 2]"), ["stats.json", "object"]),
    "stats_bad_threshold": (lambda f: _edit_stats(f, lambda s: {**s, "params": {**s["params"], "like_threshold": 9}}),
                            ["stats.json", "like-threshold"]),
    # a folder from before the parquet files (the split is rebuilt from the source named in stats.json)
    "stats_source_gone": (lambda f: ([p.unlink() for p in f.glob("*.parquet")],
                                     _edit_stats(f, lambda s: {**s, "source": "/no/raw/ml-100k"})),
                          ["stats.json", "/no/raw/ml-100k"]),
    "test_record_missing_key": (lambda f: _drop_key(f / "test_raw.jsonl", "candidate_movie_id"),
                                ["test_raw.jsonl", "record 2", "candidate_movie_id"]),
}


@pytest.mark.parametrize("case", sorted(BASELINE_CASES))
def test_baselines_bad_input(case, work, small_data, capsys):
    edit, names = BASELINE_CASES[case]
    folder = _data_copy(work, small_data)
    edit(folder)
    check_case(baselines, ["--data_dir", str(folder), "--output_dir", str(work / "bl")], names, capsys, work)


BASELINE_FLAG_CASES = {
    "max_samples_0": (["--max_samples", "0"], ["--max_samples"]),
    "svd_rank_0": (["--svd_rank", "0"], ["--svd_rank"]),
    "data_dir_missing": (["--data_dir", "nowhere"], ["--data_dir", "nowhere"]),
    "data_dir_is_a_file": (["--data_dir", "a_file"], ["--data_dir", "is a file"]),
    "output_dir_is_a_file": (["--output_dir", "a_file"], ["--output_dir"]),
}


@pytest.mark.parametrize("case", sorted(BASELINE_FLAG_CASES))
def test_baselines_bad_flag(case, work, small_data, capsys):
    flags, names = BASELINE_FLAG_CASES[case]
    folder = _data_copy(work, small_data, keep_manifest=True)
    _a_file(work)
    argv = [] if "--data_dir" in flags else ["--data_dir", str(folder)]
    check_case(baselines, argv + flags, names, capsys, work)


def test_baselines_detects_a_mixed_file_set(work, small_data, capsys):
    folder = _data_copy(work, small_data, keep_manifest=True)
    _drop_key(folder / "test_raw.jsonl", "user_id")  # a file of another build
    check_case(baselines, ["--data_dir", str(folder)], ["test_raw.jsonl", "manifest.json", "prepare_data"],
               capsys, work)


# ------------------------------------------------------------------------------------ check_seq_len
SEQ_LEN_CASES = {
    "show_examples_negative": (["--show-examples", "-1"], ["--show-examples"]),
    "max_samples_0": (["--max-samples", "0"], ["--max-samples"]),
    "cutoff_len_0": (["--cutoff-len", "0"], ["--cutoff-len"]),
    "percentiles_text": (["--percentiles", "50,ninety"], ["--percentiles"]),
    "percentile_above_100": (["--percentiles", "50,150"], ["--percentiles", "150"]),
    "output_dir_is_a_file": (["--output-dir", "a_file"], ["--output-dir"]),
    "dataset_missing": (["--dataset", "nowhere.json"], ["nowhere.json"]),
    "tokenizer_missing": (["model_name_or_path=/no/such/tokenizer"], ["model_name_or_path"]),
}


@pytest.mark.parametrize("case", sorted(SEQ_LEN_CASES))
def test_check_seq_len_bad_flag(case, work, tiny_qwen3, capsys):
    flags, names = SEQ_LEN_CASES[case]
    cfg = train_config(work, tiny_qwen3)
    _a_file(work)
    check_case(check_seq_len, ["--config", cfg, *flags], names, capsys, work)


# ------------------------------------------------------------------------------ analyze_differences
ROW = {"label": "Yes", "agree": False, "base_correct": False, "lora_correct": True, "base_prediction": "No",
       "lora_prediction": "Yes", "base_response": "No", "lora_response": "Yes", "candidate_title": "Alien (1979)"}
ANALYZE_CASES = {
    "row_missing_key": (lambda r: {k: v for k, v in r.items() if k != "lora_correct"}, ["record 2", "lora_correct"]),
    "agree_not_bool": (lambda r: {**r, "agree": "no"}, ["record 2", "agree"]),
    "response_not_text": (lambda r: {**r, "base_response": None}, ["record 2", "base_response"]),
}


@pytest.mark.parametrize("case", sorted(ANALYZE_CASES))
def test_analyze_bad_rows(case, work, capsys):
    change, names = ANALYZE_CASES[case]
    (work / "cmp").mkdir()
    (work / "cmp" / "comparisons.jsonl").write_text(json.dumps(ROW) + "\n" + json.dumps(change(ROW)) + "\n")
    check_case(analyze_differences, ["--input_dir", str(work / "cmp")], ["comparisons.jsonl", *names], capsys, work)


def test_analyze_bad_flags(work, capsys):
    check_case(analyze_differences, ["--input_dir", str(work / "nothing")], ["comparisons.jsonl"], capsys, work)
    check_case(analyze_differences, ["--show", "-2"], ["--show"], capsys, work)


# ------------------------------------------------------------------------------------------ compare_runs
PRED = {"user_id": 1, "candidate_movie_id": 3, "label": "Yes", "p_yes": 0.7, "prediction": "Yes"}


def _eval_dir(work: Path, rows: list[dict], summary=None) -> str:
    folder = work / "ev"
    folder.mkdir()
    if rows:
        (folder / "lora_predictions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    if summary is not None:
        (folder / "metrics_summary.json").write_text(json.dumps(summary))
    return str(folder)


COMPARE_RUNS_CASES = {
    "row_without_equals": (lambda w: ["--row", "just-a-label"], ["--row", "LABEL=EVAL_DIR"]),
    "eval_dir_missing": (lambda w: ["--row", f"a={w / 'nowhere'}"], ["--row", "nowhere"]),
    "train_dir_missing": (lambda w: ["--row", f"a={_eval_dir(w, [PRED])}@{w / 'no_train'}"], ["no_train"]),
    "no_predictions": (lambda w: ["--row", f"a={_eval_dir(w, [])}"], ["ev", "predictions.jsonl"]),
    "p_yes_text": (lambda w: ["--row", f"a={_eval_dir(w, [PRED, {**PRED, 'p_yes': 'high'}])}"],
                   ["lora_predictions.jsonl", "record 2", "p_yes"]),
    "p_yes_above_1": (lambda w: ["--row", f"a={_eval_dir(w, [PRED, {**PRED, 'p_yes': 3.0}])}"],
                      ["lora_predictions.jsonl", "record 2", "p_yes"]),
    "label_not_yes_no": (lambda w: ["--row", f"a={_eval_dir(w, [{**PRED, 'label': 'Maybe'}])}"],
                         ["record 1", "Maybe"]),
    "summary_not_object": (lambda w: ["--row", f"a={_eval_dir(w, [PRED], summary=[1])}"], ["metrics_summary.json"]),
    "out_is_a_file": (lambda w: ["--row", f"a={_eval_dir(w, [PRED])}", "--out", _a_file(w)], ["--out"]),
}


@pytest.mark.parametrize("case", sorted(COMPARE_RUNS_CASES))
def test_compare_runs_bad_input(case, work, capsys):
    make, names = COMPARE_RUNS_CASES[case]
    argv = make(work)
    argv += [] if "--out" in argv else ["--out", str(work / "cmp_out")]
    check_case(compare_runs, argv, names, capsys, work)


# ------------------------------------------------------------------------------------------ Ctrl-C
def _interrupt(*a, **k):
    raise KeyboardInterrupt


def test_ctrl_c_during_prepare_data_leaves_nothing(work, capsys, monkeypatch):
    from recsft import movielens

    monkeypatch.setattr(movielens, "write_jsonl_atomic", _interrupt)  # after train.json and eval.json
    check_case(prepare_data, ["--out-dir", str(work / "data"), "--max-users", "20"], ["Ctrl-C"], capsys, work,
               exit_code=130)


def test_ctrl_c_during_tokenization_leaves_nothing(work, tiny_qwen3, capsys, monkeypatch, no_model_load):
    from recsft import preprocess

    monkeypatch.setattr(preprocess, "encode_texts", _interrupt)
    check_case(finetune_lora, ["--config", train_config(work, tiny_qwen3)], ["Ctrl-C"], capsys, work,
               exit_code=130)


def test_ctrl_c_while_saving_the_cache_leaves_no_partial_cache(work, tiny_qwen3, capsys, monkeypatch,
                                                                 no_model_load):
    from datasets import Dataset

    def save_half(self, path, *a, **k):
        Path(path).mkdir(parents=True, exist_ok=True)
        (Path(path) / "data-00000-of-00001.arrow").write_bytes(b"half")
        raise KeyboardInterrupt

    monkeypatch.setattr(Dataset, "save_to_disk", save_half)
    cfg = train_config(work, tiny_qwen3)
    (work / "cache").mkdir()  # the cache folder itself may exist; what matters is that no entry is left in it
    check_case(finetune_lora, ["--config", cfg], ["Ctrl-C"], capsys, work, exit_code=130)


def test_ctrl_c_during_inference_writes_no_predictions(work, tiny_qwen3, capsys, monkeypatch):
    from recsft import evaluation

    cfg = infer_config(work, tiny_qwen3)
    (work / "test.jsonl").write_text(json.dumps(TEST_RECORD) + "\n")
    monkeypatch.setattr(evaluation, "predict", _interrupt)
    check_case(infer_lora, ["--config", cfg, "--adapter_dir", "none", "--test_file", str(work / "test.jsonl"),
                            "--output_dir", str(work / "pred")], ["Ctrl-C"], capsys, work, exit_code=130)


def test_unknown_bugs_keep_their_traceback(work, monkeypatch):
    """Only input errors are turned into one line: anything else propagates with its traceback."""
    def bug(args):
        return {}["missing"]

    with pytest.raises(KeyError):
        cli.run(bug, lambda: None)
    with pytest.raises(TypeError):
        cli.run(lambda a: len(5), lambda: None)


# ------------------------------------------------------------------------- data sets (prepare_data)
def test_interrupted_publish_is_detected_by_readers(work, monkeypatch):
    """A kill between two renames of the publish step leaves a set that readers refuse, naming the file."""
    from recsft import io, movielens
    from recsft.io import DataError, load_data

    movielens.prepare(str(work / "data"), max_users=20, seed=1)
    real_replace, calls = os.replace, []

    def replace_then_die(src, dst):
        calls.append(dst)
        if Path(dst) == work / "data" / "test_raw.jsonl":  # manifest + two files published, then killed
            raise KeyboardInterrupt
        return real_replace(src, dst)

    monkeypatch.setattr(io.os, "replace", replace_then_die)
    with pytest.raises(KeyboardInterrupt):
        movielens.prepare(str(work / "data"), max_users=20, seed=2)
    monkeypatch.setattr(io.os, "replace", real_replace)
    with pytest.raises(DataError, match=r"test_raw.jsonl: not the file of build .* mixes files of two"):
        load_data(work / "data" / "test_raw.jsonl")
    assert not [p for p in work.iterdir() if p.name.startswith(".data.tmp-")]  # temp folder removed
    movielens.prepare(str(work / "data"), max_users=20, seed=2)  # a re-run repairs the set
    io.check_file_set(work / "data")


# --------------------------------------------------------------------------------------- resume
def test_resume_skips_truncated_and_weightless_checkpoints(tmp_path, caplog):
    from recsft.resume import latest_checkpoint

    _checkpoint(tmp_path, 4)
    _checkpoint(tmp_path, 8, weights=False)
    _checkpoint(tmp_path, 12, state='{"global_step": 12, "log_hist')
    with caplog.at_level("WARNING"):
        assert latest_checkpoint(str(tmp_path)).endswith("checkpoint-4")
    assert "checkpoint-12: trainer_state.json is missing, truncated" in caplog.text
    assert "checkpoint-8: it has no weights" in caplog.text


def test_resume_of_a_finished_run_does_not_train_or_overwrite(work, tiny_qwen3, capsys, no_model_load):
    from recsft.config import load_config

    cfg_path = train_config(work, tiny_qwen3)
    cfg = load_config(cfg_path)
    out = work / "out"
    _checkpoint(out, 8)
    (out / "adapter_model.safetensors").write_bytes(b"final adapter")
    (out / "training_summary.json").write_text(json.dumps({"global_step": 8, "config": cfg.to_dict()}))
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*")}
    summary = finetune_lora.cli(finetune_lora.parse_args(["--config", cfg_path, "--resume"]))
    assert summary["global_step"] == 8 and "nothing to resume" in capsys.readouterr().out
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*")} == before


def test_stale_lock_of_a_dead_run_is_taken_over(tmp_path, caplog):
    from recsft.validate import LOCK_FILE, run_lock

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    lock = tmp_path / LOCK_FILE
    lock.write_text(json.dumps({"pid": dead.pid, "host": os.uname().nodename}))
    with caplog.at_level("WARNING"), run_lock(tmp_path):
        assert json.loads(lock.read_text())["pid"] == os.getpid()
    assert "stale lock" in caplog.text and not lock.exists()


# ------------------------------------------------------------------------------- real invocations
SUBPROCESS_CASES = {
    "prepare_max_users_0": (["scripts/prepare_data.py", "--max-users", "0", "--out-dir", "{w}/d"], ["--max-users"]),
    "infer_max_samples_0": (["scripts/infer_lora.py", "--max_samples", "0"], ["--max_samples"]),
    "finetune_lr_inf": (["scripts/finetune_lora.py", "--config", "configs/smollm2_movielens_lora.yaml",
                         "learning_rate=inf"], ["learning_rate"]),
    "baselines_missing_dir": (["scripts/baselines.py", "--data_dir", "{w}/none", "--output_dir", "{w}/o"],
                              ["--data_dir"]),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", sorted(SUBPROCESS_CASES))
def test_real_invocation_bad_input(case, tmp_path):
    argv, names = SUBPROCESS_CASES[case]
    argv = [a.replace("{w}", str(tmp_path)) for a in argv]
    before = tree(tmp_path)
    r = subprocess.run([sys.executable, *argv], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert_one_error_line(r.returncode, r.stderr, *names)
    assert tree(tmp_path) == before


@pytest.mark.slow
def test_real_ctrl_c_during_prepare_data(tmp_path):
    """SIGINT while prepare_data works: exit 130, one line, and the folder holds no set or a complete one."""
    out = tmp_path / "data"
    # SIGINT back to its default in the child: a process started with SIGINT ignored (a `cmd &` job, nohup, a
    # harness) passes that on, and Python then never raises KeyboardInterrupt, so prepare_data would just finish
    proc = subprocess.Popen([sys.executable, "scripts/prepare_data.py", "--out-dir", str(out), "--format", "blocks",
                             "--history-from", "train", "--negatives", "16"], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    seen = []
    for line in proc.stderr:  # the twin-merge warning comes once the ratings are loaded, before the blocks are built
        seen.append(line)
        if "merged into one id each" in line:
            break
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    err = "".join(seen) + err
    assert proc.returncode != 0, f"prepare_data finished although SIGINT came before its blocks were built:\n{err}"
    assert_one_error_line(proc.returncode, err, "Ctrl-C", exit_code=130)
    from recsft.io import check_file_set

    assert not out.exists() or check_file_set(out) is None
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".data.tmp-")]


def test_resume_lora_check_reads_peft_module_paths(tmp_path):
    """peft stores target_modules as full module paths: the same layers pass, another rank or layer set fails."""
    from recsft.config import ConfigError, LoraArgs
    from recsft.resume import check_resume_lora

    layers = [f"model.layers.{i}.self_attn.{n}" for i in (0, 1) for n in ("q_proj", "v_proj", "k_proj")]
    ckpt = tmp_path / "checkpoint-2"
    ckpt.mkdir()
    (ckpt / "adapter_config.json").write_text(json.dumps({"r": 8, "target_modules": layers}))
    check_resume_lora(str(ckpt), LoraArgs(lora_rank=8, lora_target="all"), layers)
    with pytest.raises(ConfigError, match="r=8 .* asks r=16"):
        check_resume_lora(str(ckpt), LoraArgs(lora_rank=16, lora_target="all"), layers)
    with pytest.raises(ConfigError, match=r"asks r=8 on \['q_proj', 'v_proj'\]"):
        check_resume_lora(str(ckpt), LoraArgs(lora_rank=8, lora_target="qv"), layers)


# ============================================================================ own ratings tables (prepare_data)
# A small, fully known ratings table: every case below changes one thing a user plausibly gets wrong.
def _own_frames(n_users: int = 6, n_items: int = 30, per_user: int = 20, seed: int = 0):
    import random

    import pandas as pd

    rng = random.Random(seed)
    rows = [{"user_id": u + 1, "item_id": m + 1, "rating": rng.randint(1, 5), "timestamp": 1_000_000_000 + 1000 * u + 60 * k}
            for u in range(n_users) for k, m in enumerate(rng.sample(range(n_items), per_user))]
    items = [{"item_id": m + 1, "title": f"Film {m + 1} ({1950 + m})", "genres": rng.choice(["Drama", "Comedy|Drama",
                                                                                           "Horror"])}
             for m in range(n_items)]
    return pd.DataFrame(rows), pd.DataFrame(items)


def pd_dates(seconds):
    import pandas as pd

    return pd.to_datetime(seconds, unit="s")


def _write_tables(folder: Path, ratings, items, fmt: str = "csv") -> list[str]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, df in (("ratings", ratings), ("items", items)):
        path = folder / f"{name}.{fmt}"
        df.to_parquet(path, index=False) if fmt == "parquet" else df.to_csv(path, index=False)
        paths.append(str(path))
    return ["--ratings", paths[0], "--items", paths[1], "--history-len", "5"]


def _own_argv(work: Path, ratings=None, items=None, fmt: str = "csv", out: str = "out") -> list[str]:
    r, i = _own_frames()
    argv = _write_tables(work / "in", r if ratings is None else ratings, i if items is None else items, fmt)
    return [*argv, "--out-dir", str(work / out)]


def _edit(frame_fn):
    """``argv`` maker: the default tables with ``frame_fn(ratings, items) -> (ratings, items)`` applied."""
    def make(work):
        r, i = frame_fn(*_own_frames())
        return _own_argv(work, r, i)
    return make


def _raw_file(name: str, data: bytes, which: str = "ratings"):
    def make(work):
        argv = _own_argv(work)
        path = work / "in" / name
        path.write_bytes(data)
        argv[argv.index(f"--{which}") + 1] = str(path)
        return argv
    return make


def _flags(*flags, fmt: str = "csv"):
    return lambda work: [*_own_argv(work, fmt=fmt), *flags]


OWN_TABLE_ERRORS = {  # argv maker -> names the error line must contain (exit 2, nothing written)
    "ratings_is_a_folder": (lambda w: [*_own_argv(w), "--ratings", str(w / "in")], ["--ratings", "is a folder"]),
    "items_missing": (lambda w: [*_own_argv(w), "--items", str(w / "nope.csv")], ["--items", "nope.csv", "does not"]),
    "utf16_without_bom": (_raw_file("r16.csv", "user_id,item_id\n1,2\n".encode("utf-16-le")),
                          ["--ratings", "r16.csv", "UTF-16", "byte-order mark"]),
    "latin1_items": (_raw_file("items_latin1.csv", "item_id,title\n1,Am\xe9lie (2001)\n".encode("latin-1"), "items"),
                     ["--items", "items_latin1.csv", "line 2", "UTF-8"]),
    "xlsx_given_as_table": (_raw_file("ratings.xlsx", b"PK\x03\x04\x00\x00binary"), ["--ratings", "ratings.xlsx"]),
    "parquet_extension_on_csv_text": (_raw_file("ratings.parquet", b"user_id,item_id\n1,2\n"),
                                      ["--ratings", "ratings.parquet", "Parquet"]),
    "empty_csv": (_raw_file("empty.csv", b""), ["--ratings", "empty.csv"]),
    "gz_that_is_not_gzip": (_raw_file("ratings.csv.gz", b"user_id,item_id\n1,2\n"), ["--ratings", "gzip"]),
    "header_only_csv": (_raw_file("hdr.csv", b"user_id,item_id,rating,timestamp\n"),
                        ["--ratings", "no valid rating rows"]),
    "genres_col_misspelt": (_flags("--genres-col", "genre"), ["--genres-col", "'genre'", "items.csv"]),
    "features_genres_without_genres": (_edit(lambda r, i: (r, i.drop(columns="genres"))),
                                       None),  # filled below (needs the flag)
    "retrieval_without_genres": (None, ["--retrieval-history", "items.csv", "--genres-col"]),
    "empty_genres_column": (None, ["--features genres", "items.csv"]),
    "item_id_twice_other_title": (_edit(lambda r, i: (r, i.assign(item_id=[*i.item_id[:-1], 1]))),
                                  ["--items", "id '1'", "twice", "different titles"]),
    "out_dir_holds_the_inputs": (lambda w: [*_own_argv(w, fmt="parquet")[:-2], "--out-dir", str(w / "in")],
                                 ["--out-dir", "--ratings", "overwrite"]),
    "user_col_is_item_col": (_flags("--user-col", "item_id"), ["--user-col", "--item-col", "'item_id'"]),
    "rating_scale_inf": (_flags("--rating-scale", "1,inf"), ["--rating-scale", "finite"]),
    "scale_1_to_10_without_threshold": (_edit(lambda r, i: (r.assign(rating=r.rating * 2), i)),
                                        None),  # filled below (needs the flag)
    "rating_scale_dash": (_flags("--rating-scale", "1-10"), ["--rating-scale", "lowest,highest"]),
    "rating_scale_one_number": (_flags("--rating-scale", "5"), ["--rating-scale"]),
    "ratings_without_items": (lambda w: _own_argv(w)[:2] + ["--out-dir", str(w / "out")], ["--ratings", "--items"]),
    "tables_and_raw_dir": (_flags("--raw-dir", "somewhere"), ["--ratings", "--raw-dir"]),
    "every_rating_below_threshold": (_edit(lambda r, i: (r.assign(rating=1 + (r.rating > 3)), i)),
                                     ["--like-threshold", "every example is labelled No"]),
    "scale_too_wide_for_the_ratings": (_flags("--rating-scale", "1,10", "--like-threshold", "8"),
                                       ["--like-threshold 8", "every example is labelled No", "--rating-scale"]),
    "every_time_unreadable": (_edit(lambda r, i: (r.assign(timestamp="yesterday"), i)),
                              ["--time-col", "'yesterday'", "ISO 8601"]),
    "day_first_dates": (_edit(lambda r, i: (r.assign(timestamp=pd_dates(r.timestamp).dt.strftime("%d/%m/%Y %H:%M")), i)),
                        ["--time-col 'timestamp'", "unreadable", "ISO 8601"]),
    "seconds_and_milliseconds_mixed": (_edit(lambda r, i: (r.assign(timestamp=r.timestamp.where(r.index % 3 > 0,
                                                                                           r.timestamp * 1000)), i)),
                                       ["--time-col 'timestamp'", "different units", "look like milliseconds"]),
    "semicolon_separated_csv": (_raw_file("semi.csv", b"user_id;item_id;rating;timestamp\n1;2;4;100\n"),
                                ["--user-col", "semi.csv", "';'"]),
    "tab_separated_saved_as_csv": (_raw_file("tabs.csv", b"user_id\titem_id\trating\ttimestamp\n1\t2\t4\t100\n"),
                                   ["--user-col", "tabs.csv", "'\\t'"]),
    "no_rated_item_in_items": (_edit(lambda r, i: (r, i.assign(item_id=i.item_id + 1000))),
                               ["--item-col", "not in --items", "look like '1001'"]),
    "zero_padded_ids_do_not_match": (_edit(lambda r, i: (r, i.assign(item_id=[f"{m:03d}" for m in i.item_id]))),
                                     ["--item-col", "not in --items", "'001'", "'007' and '7' differ"]),
    "items_without_any_title": (_edit(lambda r, i: (r, i.assign(title=""))), ["--items", "no item", "--title-col"]),
    "many_missing_times": (_edit(lambda r, i: (r.assign(timestamp=r.timestamp.where(r.index % 5 > 0)), i)),
                           ["--time-col", "missing or unreadable"]),
    "time_col_missing": (_flags("--time-col", "ts"), ["--time-col", "'ts'", "ratings.csv"]),
    "items_id_col_missing": (_flags("--items-id-col", "sku"), ["--items-id-col", "'sku'", "items.csv"]),
    "title_col_missing_parquet": (_flags("--title-col", "name", fmt="parquet"), ["--title-col", "items.parquet"]),
    "history_longer_than_every_user": (_flags("--history-len", "50"), ["--history-len", "no training examples"]),
    "session_len_without_session_format": (_flags("--session-len", "8"), ["--session-len", "--format session"]),
    "session_len_0": (_flags("--format", "session", "--session-len", "0"), ["--session-len"]),
    "features_unknown_in_comma_list": (_flags("--features", "item_stats,genre"), ["--features", "'genre'"]),
    "ratings_1_to_10_on_the_default_scale": (_edit(lambda r, i: (r.assign(rating=r.rating * 2), i)),
                                             ["--rating-scale 0.5,5", "off the scale", "from 2 to 10"]),
    "decimal_comma_ratings": (_edit(lambda r, i: (r.assign(rating=r.rating.astype(str) + ",5"), i)),
                              ["--rating-scale", "not numbers", "--rating-col"]),
}
OWN_TABLE_ERRORS["scale_1_to_10_without_threshold"] = (
    lambda w: [*_edit(lambda r, i: (r.assign(rating=r.rating * 2), i))(w), "--rating-scale", "1,10"],
    ["--rating-scale 1,10", "--like-threshold"])
OWN_TABLE_ERRORS["features_genres_without_genres"] = (
    lambda w: [*_edit(lambda r, i: (r, i.drop(columns="genres")))(w), "--features", "genres"],
    ["--features genres", "items.csv", "--genres-col"])
OWN_TABLE_ERRORS["retrieval_without_genres"] = (
    lambda w: [*_edit(lambda r, i: (r, i.drop(columns="genres")))(w), "--retrieval-history"],
    OWN_TABLE_ERRORS["retrieval_without_genres"][1])
OWN_TABLE_ERRORS["empty_genres_column"] = (
    lambda w: [*_edit(lambda r, i: (r, i.assign(genres="")))(w), "--features", "genres"],
    OWN_TABLE_ERRORS["empty_genres_column"][1])


class TestOwnTablesRefused:
    """Own ratings/items tables that cannot give correct data: exit 2, one line naming the flag or file."""

    @pytest.mark.parametrize("case", sorted(OWN_TABLE_ERRORS))
    def test_refused(self, case, work, capsys):
        make, names = OWN_TABLE_ERRORS[case]
        check_case(prepare_data, make(work), names, capsys, work)

    def test_raw_dir_that_is_a_file(self, work, capsys):
        check_case(prepare_data, ["--raw-dir", _a_file(work), "--out-dir", str(work / "o")],
                   ["--raw-dir", "is a file, not a folder"], capsys, work)

    def test_out_dir_is_the_raw_dir(self, work, capsys):
        (work / "ml").mkdir()
        check_case(prepare_data, ["--raw-dir", str(work / "ml"), "--out-dir", str(work / "ml")],
                   ["--out-dir", "--raw-dir"], capsys, work)


def _prepared(work: Path, name: str, ratings, items, *flags, fmt: str = "csv") -> Path:
    argv = _write_tables(work / f"in_{name}", ratings, items, fmt)
    prepare_data.main(prepare_data.parse_args([*argv, "--out-dir", str(work / name), *flags]))
    return work / name


def _same_outputs(a: Path, b: Path, files=("train.json", "eval.json", "test_raw.jsonl")) -> None:
    for f in files:
        assert (a / f).read_bytes() == (b / f).read_bytes(), f


def _ms(r, i):
    return r.assign(timestamp=r.timestamp * 1000), i


def _us(r, i):
    return r.assign(timestamp=r.timestamp * 1_000_000), i


def _ns(r, i):
    return r.assign(timestamp=r.timestamp * 1_000_000_000), i


def _datetime(r, i):
    import pandas as pd

    return r.assign(timestamp=pd.to_datetime(r.timestamp, unit="s")), i


def _datetime_tz(r, i):
    import pandas as pd

    return r.assign(timestamp=pd.to_datetime(r.timestamp, unit="s", utc=True).dt.tz_convert("Europe/Paris")), i


def _iso_text(r, i):
    import pandas as pd

    return r.assign(timestamp=pd.to_datetime(r.timestamp, unit="s").dt.strftime("%Y-%m-%dT%H:%M:%SZ")), i


def _float_ids(r, i):
    return r.assign(item_id=r.item_id.astype(float)), i.assign(item_id=i.item_id.astype(float))


def _with_missing_item_id(r):
    """An integer column with a gap: pandas writes it as floats (13.0); the row without an id is dropped."""
    import pandas as pd

    extra = r.iloc[:1].assign(item_id=None, timestamp=r.timestamp.max() + 10 ** 6)
    return pd.concat([r, extra], ignore_index=True).astype({"item_id": float})


def _padded_spaces(r, i):
    return r.assign(user_id=[f"  {u} " for u in r.user_id]), i


TIME_AND_ID_VARIANTS = {  # the same ratings written another way: the prepared examples are byte-identical
    "milliseconds": (_ms, "csv", "milliseconds"),
    "milliseconds_parquet": (_ms, "parquet", "milliseconds"),
    "microseconds": (_us, "parquet", "microseconds"),
    "nanoseconds": (_ns, "parquet", "nanoseconds"),
    "parquet_datetime": (_datetime, "parquet", None),
    "parquet_datetime_with_zone": (_datetime_tz, "parquet", None),
    "iso_dates_as_text": (_iso_text, "csv", None),
    "float_ids_in_parquet": (_float_ids, "parquet", None),
    "float_ids_in_csv_with_gaps": (lambda r, i: (_with_missing_item_id(r), i), "csv", None),
    "ids_with_surrounding_spaces": (_padded_spaces, "csv", None),
    "header_names_with_spaces": (lambda r, i: (r.rename(columns={"rating": " rating "}), i), "csv", None),
}


class TestOwnTablesAccepted:
    """Inputs accepted by a documented rule: the output is what the plain table gives, with a counted warning."""

    @pytest.mark.parametrize("case", sorted(TIME_AND_ID_VARIANTS))
    def test_time_units_and_id_types(self, case, work, caplog):
        change, fmt, unit = TIME_AND_ID_VARIANTS[case]
        r, i = _own_frames()
        plain = _prepared(work, "plain", r, i, "--features", "item_stats", "user_stats")
        with caplog.at_level("WARNING"):
            other = _prepared(work, case, *change(r, i), "--features", "item_stats", "user_stats", fmt=fmt)
        _same_outputs(plain, other)
        if unit:
            assert f"Unix time in {unit}" in caplog.text

    def test_feature_counts_do_not_overflow_on_millisecond_times(self, work):
        r, i = _own_frames()
        out = _prepared(work, "ms", *_ms(r, i), "--features", "user_stats")
        per_user = r.groupby("user_id").size().to_dict()
        for rec in load_test(out):
            n = int(rec["candidate_features"][0].split(" of ")[1].split()[0]) if "of" in rec["candidate_features"][0] \
                else 0
            assert n < per_user[rec["user_id"]]

    def test_string_ids_with_features(self, work):
        r, i = _own_frames()
        r, i = r.assign(user_id="u" + r.user_id.astype(str), item_id="m" + r.item_id.astype(str)), \
            i.assign(item_id="m" + i.item_id.astype(str))
        out = _prepared(work, "s", r, i, "--features", "item_stats", "user_stats")
        rows = load_test(out)
        assert rows and all(isinstance(x["user_id"], str) for x in rows)
        for rec in rows:  # against the raw table: ratings of the same item strictly earlier
            earlier = r[(r.item_id == rec["candidate_movie_id"]) & (r.timestamp < rec["candidate_timestamp"])]
            line = rec["candidate_features"][0]
            assert (f"of {len(earlier)} earlier" in line) if len(earlier) else "no earlier ratings" in line

    def test_inf_and_nan_times_are_dropped_and_counted(self, work, caplog):
        r, i = _own_frames()
        r = r.astype({"timestamp": float})
        r.loc[0, "timestamp"], r.loc[1, "timestamp"] = float("inf"), float("nan")
        with caplog.at_level("WARNING"):
            stats = prepare_data.main(prepare_data.parse_args([*_write_tables(work / "in", r, i, "parquet"),
                                                               "--out-dir", str(work / "o")]))
        assert stats["ratings"] == len(r) - 2 and "2 with an unreadable time" in caplog.text

    def test_gzipped_csv_and_tsv(self, work):
        r, i = _own_frames()
        plain = _prepared(work, "plain", r, i)
        (work / "gz").mkdir()
        r.to_csv(work / "gz" / "ratings.tsv.gz", sep="\t", index=False)
        i.to_csv(work / "gz" / "items.csv.gz", index=False)
        prepare_data.main(prepare_data.parse_args(["--ratings", str(work / "gz" / "ratings.tsv.gz"), "--items",
                                                   str(work / "gz" / "items.csv.gz"), "--history-len", "5",
                                                   "--out-dir", str(work / "from_gz")]))
        _same_outputs(plain, work / "from_gz")

    def test_partitioned_parquet_folder(self, work):
        r, i = _own_frames()
        plain = _prepared(work, "plain", r, i)
        folder = work / "in_parts" / "ratings.parquet"
        folder.mkdir(parents=True)
        r.iloc[:50].to_parquet(folder / "part-0.parquet", index=False)
        r.iloc[50:].to_parquet(folder / "part-1.parquet", index=False)
        i.to_parquet(work / "in_parts" / "items.parquet", index=False)
        prepare_data.main(prepare_data.parse_args(["--ratings", str(folder), "--items",
                                                   str(work / "in_parts" / "items.parquet"), "--history-len", "5",
                                                   "--out-dir", str(work / "parts")]))
        _same_outputs(plain, work / "parts")

    def test_zero_padded_and_plain_ids_stay_two_items(self, work, caplog):
        r, i = _own_frames()
        i = i.astype({"item_id": str})
        i.loc[0, "item_id"], i.loc[0, "title"] = "001", "Another film (2001)"
        extra = r.groupby("user_id").head(1).iloc[:3].assign(item_id="001", timestamp=r.timestamp.max() + 1)
        import pandas as pd

        r = pd.concat([r.astype({"item_id": str}), extra], ignore_index=True)
        with caplog.at_level("WARNING"):
            out = _prepared(work, "p", r, pd.concat([i, _own_frames()[1].iloc[:1].astype({"item_id": str})]))
        items = pd.read_parquet(out / "items.parquet")
        assert {"001", "1"} <= set(items.movie_id) and "duplicate (user, item)" not in caplog.text
        assert dict(zip(items.movie_id, items.title))["001"] == "Another film (2001)"

    def test_genre_lists_with_any_separator(self, work):
        r, i = _own_frames()
        out = _prepared(work, "g", r, i.assign(genres="Drama; Comedy"), "--features", "genres")
        assert {rec["candidate_features"][0] for rec in load_test(out)} == {"Genres: Drama, Comedy"}

    def test_users_too_short_for_a_history_are_counted(self, work, caplog):
        r, i = _own_frames()
        r = r[~((r.user_id == 1) & (r.index % 20 >= 4))]  # user 1 keeps 4 ratings: no example
        with caplog.at_level("WARNING"):
            out = _prepared(work, "short", r, i)
        assert "1 of 6 users have at most --history-len 5 ratings" in caplog.text
        assert 1 not in {rec["user_id"] for rec in load_test(out)}

    def test_repeated_item_row_with_the_same_title_is_kept_once(self, work, caplog):
        import pandas as pd

        r, i = _own_frames()
        with caplog.at_level("WARNING"):
            out = _prepared(work, "d", r, pd.concat([i, i.iloc[:2]]))
        assert "2 repeated rows of an id with the same title" in caplog.text
        assert pd.read_parquet(out / "items.parquet").movie_id.is_unique

    @pytest.mark.parametrize("encoding", ["utf-8-sig", "utf-16"])
    def test_byte_order_marks_are_read(self, work, encoding):
        r, i = _own_frames()
        i = i.assign(title=[f"Amélie {t}" for t in i.title])
        plain = _prepared(work, "plain", r, i)
        folder = work / "in_bom"
        folder.mkdir()
        r.to_csv(folder / "ratings.csv", index=False, encoding=encoding)
        i.to_csv(folder / "items.csv", index=False, encoding=encoding)
        prepare_data.main(prepare_data.parse_args(["--ratings", str(folder / "ratings.csv"), "--items",
                                                   str(folder / "items.csv"), "--history-len", "5",
                                                   "--out-dir", str(work / "bom")]))
        _same_outputs(plain, work / "bom")

    def test_line_breaks_in_titles_become_spaces(self, work, caplog):
        r, i = _own_frames()
        i.loc[:, "title"] = i.title.str.replace(" (", "\n(", regex=False)
        with caplog.at_level("WARNING"):
            out = _prepared(work, "nl", r, i)
        assert "control characters" in caplog.text
        assert all("\n" not in t for rec in load_test(out) for t in rec["history_titles"] + [rec["candidate_title"]])

    def test_title_twins_are_merged_and_counted(self, work):
        import pandas as pd

        r, i = _own_frames()
        i.loc[1, "title"] = i.title[0]  # same title and year: one film under two ids
        i.loc[3, "title"] = "Untitled"  # no year: never merged
        i.loc[4, "title"] = "Untitled"
        out = _prepared(work, "tw", r, i)
        stats = json.loads((out / "stats.json").read_text())
        both = r[r.item_id.isin([1, 2])].groupby("user_id").size()
        assert stats["merged_ids"] == 1 and stats["merged_duplicate_ratings"] == int((both == 2).sum())
        inter = pd.read_parquet(out / "interactions.parquet")
        assert 2 not in set(inter.movie_id) and {4, 5} <= set(inter.movie_id)
        assert not inter.duplicated(["user_id", "movie_id"]).any()

    def test_scale_1_to_10_end_to_end(self, work):
        """--rating-scale 1,10 --like-threshold 8: every file agrees on the scale and the labels."""
        from recsft.movielens import check_stats, load_prepared

        r, i = _own_frames()
        r = r.assign(rating=r.rating * 2)  # 2..10
        out = _prepared(work, "ten", r, i, "--rating-scale", "1,10", "--like-threshold", "8")
        stats = check_stats(json.loads((out / "stats.json").read_text()), out / "stats.json")
        assert stats["params"]["rating_scale"] == [1.0, 10.0] and stats["params"]["like_threshold"] == 8
        rating = {(u, m): x for u, m, x in zip(r.user_id, r.item_id, r.rating)}
        for rec in load_test(out):
            assert all(1 <= x <= 10 for x in rec["history_ratings"])
            assert rec["label"] == ("Yes" if rating[rec["user_id"], rec["candidate_movie_id"]] >= 8 else "No")
        train = json.loads((out / "train.json").read_text())
        assert any("rating ≈ 10" in t["input"] or "rating ≈ 8" in t["input"] for t in train)
        data = load_prepared(out)  # the baselines rebuild the same split from stats.json
        assert len(data.splits["test"]) == len(load_test(out))


def load_test(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "test_raw.jsonl").read_text().splitlines()]


# ============================================================================ sessions, features, retrieval
def _prepare_ml(out: Path, *flags: str, max_users: str = "20") -> dict:
    return prepare_data.main(prepare_data.parse_args(["--out-dir", str(out), "--max-users", max_users, *flags]))


class TestSessionFeatureRetrieval:
    """The session format's files form a set of their own in manifest.json; the feature and retrieval flags
    refuse data they cannot serve; feature counts are right for any id type and time unit."""

    def test_session_files_are_listed_next_to_the_single_set(self, work):
        from recsft.io import check_file_set, read_manifest

        _prepare_ml(work / "d")
        _prepare_ml(work / "d", "--format", "session")
        manifest = read_manifest(work / "d")
        sets = {name: e["set"] for name, e in manifest["files"].items()}
        assert sets["session_train.json"] == sets["session_test.jsonl"] == "session" and sets["train.json"] == "single"
        assert set(manifest["sets"]) == {"single", "session"}
        _prepare_ml(work / "d", "--seed", "3")  # re-publishing the single set keeps the session entries
        assert "session_eval.json" in read_manifest(work / "d")["files"]
        check_file_set(work / "d")

    def test_corrupt_manifest_is_replaced_by_a_new_build(self, work, caplog):
        from recsft.io import check_file_set

        (work / "d").mkdir()
        (work / "d" / "manifest.json").write_text('{"build_id": "x", "fil')
        with caplog.at_level("WARNING"):
            _prepare_ml(work / "d")
        assert "manifest.json: corrupt; replaced" in caplog.text
        check_file_set(work / "d")

    def test_ctrl_c_during_session_preparation_keeps_the_previous_set(self, work, capsys, monkeypatch):
        from recsft import movielens
        from recsft.io import check_file_set

        _prepare_ml(work / "d", "--format", "session")
        before = {p.name: p.read_bytes() for p in (work / "d").iterdir()}
        monkeypatch.setattr(movielens, "write_jsonl_atomic", _interrupt)  # after session_train/eval are written
        check_case(prepare_data, ["--out-dir", str(work / "d"), "--max-users", "20", "--format", "session",
                                  "--seed", "5"], ["Ctrl-C"], capsys, work, exit_code=130)
        assert {p.name: p.read_bytes() for p in (work / "d").iterdir()} == before
        check_file_set(work / "d")

    def test_half_published_session_set_is_refused(self, work, monkeypatch):
        from recsft import io
        from recsft.io import DataError, load_data

        _prepare_ml(work / "d", "--format", "session")
        real = os.replace

        def die_before_test_file(src, dst):
            if Path(dst) == work / "d" / "session_test.jsonl":  # the publish rename, not the temp write
                raise KeyboardInterrupt
            return real(src, dst)

        monkeypatch.setattr(io.os, "replace", die_before_test_file)
        with pytest.raises(KeyboardInterrupt):
            _prepare_ml(work / "d", "--format", "session", "--seed", "9")
        monkeypatch.setattr(io.os, "replace", real)
        with pytest.raises(DataError, match="session_train.json: not the file of build"):
            load_data(work / "d" / "session_train.json")

    def test_features_genres_on_a_raw_dir_without_genres(self, work, capsys):
        raw = work / "ml"
        raw.mkdir()
        (raw / "u.data").write_text("".join(f"1\t{m}\t{1 + m % 5}\t{m}\n" for m in range(1, 21)))
        (raw / "u.item").write_text("".join(f"{m}|Movie {m} (1995)|01-Jan-1995||x\n" for m in range(1, 21)))
        check_case(prepare_data, ["--raw-dir", str(raw), "--out-dir", str(work / "o"), "--features", "genres"],
                   ["--features genres", "no movie genres"], capsys, work)

    def test_raw_dir_duplicate_rating_keeps_the_latest(self, work, caplog):
        raw = work / "ml"
        raw.mkdir()
        lines = [f"{u}\t{m}\t{1 + (u * m) % 5}\t{1000 * u + m}\n" for u in (1, 2) for m in range(1, 31)]
        lines.append("1\t5\t5\t99999\n")  # user 1 rates movie 5 again, later
        (raw / "u.data").write_text("".join(lines))
        (raw / "u.item").write_text("".join(f"{m}|Movie {m} (1995)|01-Jan-1995||x\n" for m in range(1, 31)))
        with caplog.at_level("WARNING"):
            stats = _prepare_ml(work / "o", "--raw-dir", str(raw), "--history-len", "5")
        assert stats["ratings"] == 60 and "1 duplicate (user, movie) ratings" in caplog.text
        import pandas as pd

        inter = pd.read_parquet(work / "o" / "interactions.parquet")
        assert inter[(inter.user_id == 1) & (inter.movie_id == 5)].rating.tolist() == [5.0]

    def test_session_cutoff_too_small_to_hold_a_question(self, work, qwen3_tokenizer):
        from recsft.io import DataError
        from recsft.preprocess import tokenize_sessions_to_arrow

        _prepare_ml(work / "d", "--format", "session", max_users="3")
        records = json.loads((work / "d" / "session_train.json").read_text())[:4]
        with pytest.raises(DataError, match="cutoff_len=24: too small"):
            tokenize_sessions_to_arrow(records, qwen3_tokenizer, 24)
        assert len(tokenize_sessions_to_arrow(records, qwen3_tokenizer, 1024)) >= len(records)

    def test_finetune_session_data_at_a_cutoff_without_room_for_a_question(self, work, tiny_qwen3, capsys,
                                                                          no_model_load):
        _prepare_ml(work / "d", "--format", "session", max_users="3")
        cfg = train_config(work, tiny_qwen3)
        check_case(finetune_lora, ["--config", cfg, f"dataset={work / 'd' / 'session_train.json'}",
                                   f"eval_dataset={work / 'd' / 'session_eval.json'}", "cutoff_len=24"],
                   ["cutoff_len=24", "too small"], capsys, work)

    @pytest.mark.parametrize("keys", ["int", "text"])
    def test_earlier_counts_any_keys_and_huge_times(self, keys):
        import numpy as np

        from recsft.movielens import earlier_counts

        rng = np.random.default_rng(0)
        k = rng.integers(0, 7, 300)
        key = k if keys == "int" else np.array([f"user-{x}" for x in k], dtype=object)
        ts = rng.integers(0, 50, 300) * 10 ** 15 + 1_700_000_000_000_000_000  # nanoseconds near 2023
        liked = rng.random(300) < 0.5
        n, likes = earlier_counts(key, ts, liked)
        for r in range(300):
            earlier = (key == key[r]) & (ts < ts[r])
            assert (n[r], likes[r]) == (earlier.sum(), (earlier & liked).sum())

    def test_session_format_with_text_ids_and_features(self, work):
        r, i = _own_frames()
        r = r.assign(user_id="u" + r.user_id.astype(str))
        out = _prepared(work, "s", r, i, "--format", "session", "--features", "item_stats", "user_stats", "genres")
        records = json.loads((out / "session_train.json").read_text())
        assert records and all("This user:" in t["start"] for rec in records for t in rec["turns"])


@pytest.fixture(scope="module")
def full_movielens(tmp_path_factory) -> Path:
    """The whole bundled MovieLens-100K, prepared once (the title twins are spread over all users)."""
    out = tmp_path_factory.mktemp("ml_full") / "data"
    prepare_data.main(prepare_data.parse_args(["--out-dir", str(out)]))
    return out


class TestMovieLensTwins:
    """MovieLens-100K lists 18 films under two ids: merged into one id at preparation, counted in stats.json."""

    def test_merged_and_counted(self, full_movielens):
        import pandas as pd

        stats = json.loads((full_movielens / "stats.json").read_text())
        assert stats["merged_ids"] == 18 and stats["merged_duplicate_ratings"] > 0
        items = pd.read_parquet(full_movielens / "items.parquet")
        assert items.title.is_unique and len(items) == stats["movies"]

    def test_no_prompt_shows_the_candidate_in_its_history(self, full_movielens):
        rows = load_test(full_movielens)
        assert not [r for r in rows if r["candidate_title"] in r["history_titles"]]

    def test_no_ranking_negative_is_a_rated_film(self, full_movielens):
        from recsft import baselines as B
        from recsft import ranking as R
        from recsft.movielens import load_prepared

        data = load_prepared(full_movielens)
        rated = B.rated_sets(data.ratings)
        questions, _ = R.build_questions(data.splits["test"], rated, sorted(data.titles), 99, 0, max_users=300)
        rated_titles = {u: {data.titles[m] for m in ms} for u, ms in rated.items()}
        assert not [q for q in questions for c in q["candidates"][1:] if data.titles[c] in rated_titles[q["user_id"]]]


# ====================================================================================== rank_eval
import rank_eval  # noqa: E402


@pytest.fixture
def no_fitting(monkeypatch):
    """Fitting a baseline fails the test: every check of rank_eval/baselines comes before it."""
    from recsft import baselines as B

    def boom(*a, **k):
        raise AssertionError("a baseline was fitted before the bad input was detected")
    monkeypatch.setattr(B, "fit_scorers", boom)


@pytest.fixture(scope="module")
def prompt_feature_data(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("featured")
    _prepare_ml(root / "features", "--features", "item_stats", "genres", max_users="30")
    _prepare_ml(root / "retrieval", "--retrieval-history", max_users="30")
    return {"features": root / "features", "retrieval": root / "retrieval"}


RANK_EVAL_CASES = {  # argv maker (work, base model) -> names; the adapter flag is named as rank_eval documents it
    # (--adapter_dir, also spelled --adapter)
    "adapter_missing": (lambda w, b: ["--adapter", str(w / "no_adapter")], ["--adapter", "no_adapter", "does not exist"]),
    "adapter_is_a_file": (lambda w, b: ["--adapter", _a_file(w)], ["--adapter", "is a file"]),
    "adapter_without_weights": (lambda w, b: ["--adapter", _adapter(w, b)], ["adapter_model.safetensors"]),
    "adapter_corrupt_config": (lambda w, b: ["--adapter", _adapter(w, b, config="{")], ["adapter_config.json"]),
    "adapter_of_another_base": (lambda w, b: ["--adapter", _adapter(w, b, {f"{Q}.lora_A.weight": [4, 896],
                                                                           f"{Q}.lora_B.weight": [1024, 4]})],
                                ["lora_A", "896"]),
    "model_missing": (lambda w, b: ["--llm", "model_name_or_path=/no/such/model"], ["model_name_or_path"]),
    "config_unknown_key": (lambda w, b: ["--llm", "cutof_len=512"], ["cutof_len", "cutoff_len"]),
    "flash_attention_2_on_cpu": (lambda w, b: ["--llm", "flash_attn=flash_attention_2"], ["flash_attn"]),
    "n_negatives_0": (lambda w, b: ["--n-negatives", "0"], ["--n-negatives"]),
    "max_users_0": (lambda w, b: ["--max-users", "0"], ["--max-users"]),
    "models_unknown": (lambda w, b: ["--models", "mf,svd"], ["--models", "svd"]),
    "output_dir_is_a_file": (lambda w, b: ["--output_dir", _a_file(w)], ["--output_dir"]),
}


class TestRankEval:
    """rank_eval.py: every check (flags, config, model, adapter, data) before any baseline is fitted."""

    @pytest.mark.parametrize("case", sorted(RANK_EVAL_CASES))
    def test_refused_before_fitting(self, case, work, tiny_qwen3, small_data, capsys, no_fitting, no_tokenizer_load):
        make, names = RANK_EVAL_CASES[case]
        argv = ["--data_dir", str(_data_copy(work, small_data, keep_manifest=True)), "--config",
                train_config(work, tiny_qwen3), *make(work, tiny_qwen3)]
        argv += [] if "--output_dir" in argv else ["--output_dir", str(work / "rank")]
        line = check_case(rank_eval, argv, names, capsys, work)
        assert "--adapter_dir" in line or "--adapter" not in line

    @pytest.mark.parametrize("kind,flag", [("features", "--features"), ("retrieval", "--retrieval-history")])
    def test_llm_on_prompt_dependent_data(self, kind, flag, work, tiny_qwen3, prompt_feature_data, capsys, no_fitting,
                                          no_tokenizer_load):
        check_case(rank_eval, ["--data_dir", str(prompt_feature_data[kind]), "--config", train_config(work, tiny_qwen3),
                               "--llm", "--output_dir", str(work / "rank")], ["--llm", flag], capsys, work)

    def test_unrenderable_test_prompt_fails_before_fitting(self, work, tiny_qwen3, small_data, capsys, monkeypatch,
                                                          no_fitting, no_tokenizer_load):
        from recsft import formatting
        from recsft.io import DataError

        def refuse(titles, ratings, candidate, scale=None):
            raise DataError(f"history_ratings[1]: expected a number from 0.5 to 5.0, got {ratings[0]!r}")
        monkeypatch.setattr(formatting, "check_history", refuse)
        check_case(rank_eval, ["--data_dir", str(small_data), "--config", train_config(work, tiny_qwen3), "--llm",
                               "--output_dir", str(work / "rank")], ["--llm", "test example 1", "history_ratings"],
                   capsys, work)

    def test_baselines_alone_rank_featured_data(self, work, prompt_feature_data):
        res = rank_eval.main(rank_eval.parse_args(["--data_dir", str(prompt_feature_data["features"]), "--models",
                                                   "item-rate", "--n-negatives", "10", "--output_dir",
                                                   str(work / "r"), "--no-full-ranking"]))
        assert res["counts"]["questions"] > 0


# ===================================================================================== compare_runs
def _eval_dir_named(work: Path, name: str, rows: list[dict]) -> str:
    folder = work / name
    folder.mkdir()
    (folder / "lora_predictions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(folder)


PREDS = [{**PRED, "user_id": u, "candidate_movie_id": m, "label": lab, "p_yes": p}
         for u, m, lab, p in [(1, 3, "Yes", 0.7), (1, 4, "No", 0.2), (2, 3, "No", 0.4), (2, 5, "Yes", 0.9)]]


def _json_file(work: Path, name: str, value) -> str:
    (work / name).write_text(json.dumps(value))
    return str(work / name)


COMPARE_MORE_CASES = {
    "labels_differ": (lambda w: ["--row", f"a={_eval_dir_named(w, 'a', PREDS)}", "--row",
                                 f"b={_eval_dir_named(w, 'b', [{**p, 'label': 'Yes'} for p in PREDS])}"],
                      ["--row 'b'", "labels differ", "like-threshold"]),
    "users_match_no_row": (lambda w: ["--row", f"a={_eval_dir_named(w, 'a', PREDS)}", "--users",
                                      _json_file(w, "users.json", [99])], ["--users", "users.json", "none of"]),
    "users_empty_list": (lambda w: ["--row", f"a={_eval_dir_named(w, 'a', PREDS)}", "--users",
                                    _json_file(w, "users.json", [])], ["--users", "non-empty"]),
    "users_not_a_list": (lambda w: ["--row", f"a={_eval_dir_named(w, 'a', PREDS)}", "--users",
                                    _json_file(w, "users.json", {"ids": [1]})], ["--users"]),
    "users_booleans": (lambda w: ["--row", f"a={_eval_dir_named(w, 'a', PREDS)}", "--users",
                                  _json_file(w, "users.json", [True])], ["--users"]),
    "users_file_missing": (lambda w: ["--row", f"a={_eval_dir_named(w, 'a', PREDS)}", "--users", str(w / "u.json")],
                           ["--users", "u.json"]),
    "train_dir_without_summary": (lambda w: ["--row", f"a={_eval_dir_named(w, 'a', PREDS)}@{w}"],
                                  ["training_summary.json", "finetune_lora"]),
    "eval_dir_is_a_file": (lambda w: ["--row", f"a={_a_file(w)}"], ["--row", "is a file"]),
    "folder_with_lora_and_base_predictions": (lambda w: ["--row", f"zero-shot={_lora_and_base(w)}"],
                                              ["holds 2 predictions files", "base_predictions.jsonl", "name the one"]),
    "threshold_not_a_number": (lambda w: ["--row", f"a={_eval_dir(w, PREDS, {'at_eval_threshold': {'threshold': 'x'}})}"],
                               ["metrics_summary.json", "threshold", "'x'"]),
    "training_summary_batch_size_text": (lambda w: ["--row", f"a={_eval_dir_named(w, 'a', PREDS)}@{_summary(w)}"],
                                         ["training_summary.json", "per_device_train_batch_size"]),
    "same_label_twice": (lambda w: ["--row", f"a={_eval_dir_named(w, 'a', PREDS)}", "--row",
                                    f"a={_eval_dir_named(w, 'b', PREDS)}"], ["--row 'a'", "its own label"]),
    "llm_only_row_without_residual": (lambda w: ["--row", f"a={_eval_dir_named(w, 'a', PREDS)}#llm"],
                                      ["--row 'a'", "llm_p_yes", "drop #llm"]),
}


def _summary(work: Path) -> str:
    (work / "run").mkdir()
    (work / "run" / "training_summary.json").write_text(json.dumps({"config": {"per_device_train_batch_size": "4"}}))
    return str(work / "run")


def _lora_and_base(work: Path) -> str:
    folder = _eval_dir_named(work, "both", PREDS)
    base = [{**p, "p_yes": 1 - p["p_yes"]} for p in PREDS]  # an AUC of 0 instead of 1
    (Path(folder) / "base_predictions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in base))
    (Path(folder) / "base_metrics.json").write_text(json.dumps({"at_eval_threshold": {"threshold": 0.5}}))
    (Path(folder) / "metrics_summary.json").write_text(json.dumps({"at_eval_threshold": {"threshold": 0.6}}))
    return folder


class TestCompareRunsAndBaselines:
    @pytest.mark.parametrize("case", sorted(COMPARE_MORE_CASES))
    def test_compare_runs_refused(self, case, work, capsys):
        make, names = COMPARE_MORE_CASES[case]
        line = check_case(compare_runs, [*make(work), "--out", str(work / "cmp_out")], names, capsys, work)
        assert "prepare_data" not in line

    def test_compare_runs_row_names_one_predictions_file(self, work):
        folder = Path(_lora_and_base(work))
        res = compare_runs.main(compare_runs.parse_args(["--row", f"base={folder / 'base_predictions.jsonl'}", "--row",
                                                         f"lora={folder / 'lora_predictions.jsonl'}",
                                                         "--out", str(work / "o")]))
        assert [r["AUC"] for r in res["rows"]] == ["0.000", "1.000"]

    def test_compare_runs_threshold_zero_is_a_threshold(self, work):
        res = compare_runs.main(compare_runs.parse_args(["--row", f"a={_eval_dir(work, PREDS, {'at_eval_threshold': {'threshold': 0.0}})}",
                                                         "--out", str(work / "o")]))
        assert res["rows"][0]["accuracy"] == "0.500"  # every row Yes: 2 of 4 right (at 0.5 it would be 1.000)

    def test_compare_runs_llm_only_row_reads_llm_p_yes(self, work):
        rows = [{**p, "llm_p_yes": 1 - p["p_yes"]} for p in PREDS]  # the LLM alone ranks the other way round
        folder = _eval_dir(work, rows, {"at_eval_threshold": {"threshold": 0.9}})
        res = compare_runs.main(compare_runs.parse_args(["--row", f"hybrid={folder}", "--row", f"text={folder}#llm",
                                                         "--out", str(work / "o")]))
        assert [r["AUC"] for r in res["rows"]] == ["1.000", "0.000"]

    def test_compare_runs_text_user_ids(self, work):
        rows = [{**p, "user_id": f"u{p['user_id']}"} for p in PREDS]
        res = compare_runs.main(compare_runs.parse_args(["--row", f"a={_eval_dir_named(work, 'a', rows)}", "--users",
                                                         _json_file(work, "users.json", ["u1"]),
                                                         "--out", str(work / "o")]))
        assert len(res["rows"]) == 1

    @pytest.mark.parametrize("models", ["", " , "])
    def test_baselines_no_model_named(self, models, work, small_data, capsys, no_fitting):
        check_case(baselines, ["--data_dir", str(small_data), "--models", models, "--output_dir", str(work / "bl")],
                   ["--models"], capsys, work)

    def test_baselines_predictions_folder_is_a_file(self, work, small_data, capsys, no_fitting):
        (work / "bl").mkdir()
        (work / "bl" / "mf").write_text("not a folder")
        check_case(baselines, ["--data_dir", str(small_data), "--models", "item-rate,mf", "--predictions",
                               "--output_dir", str(work / "bl")], ["--predictions", "mf", "is a file"], capsys, work)


# ========================================================================================== metrics
class TestMetricFunctions:
    def test_uauc_reads_yes_no_labels(self):
        from recsft.metrics import uauc

        y, s, u = ["Yes", "No", "Yes", "No"], [0.9, 0.1, 0.2, 0.8], [1, 1, 2, 2]
        assert uauc(y, s, u) == uauc([True, False, True, False], s, u) == 0.5

    @pytest.mark.parametrize("labels,scores", [(["Yes", "maybe"], [0.1, 0.2]), (["Yes", "No"], [0.1, float("nan")])])
    def test_uauc_refuses_bad_labels_and_nan(self, labels, scores):
        from recsft.metrics import uauc

        with pytest.raises(ValueError):
            uauc(labels, scores, [1, 1])

    @pytest.mark.parametrize("pos,neg", [(float("nan"), [0.1, 0.2]), (0.5, [0.1, float("nan")])])
    def test_rank_metrics_refuses_nan(self, pos, neg):
        from recsft.ranking import rank_metrics

        with pytest.raises(ValueError, match="NaN"):
            rank_metrics(pos, neg)
