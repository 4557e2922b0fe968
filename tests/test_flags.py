"""One flag spelling across the scripts (underscores, like the config keys), the hyphenated one as an alias."""

from __future__ import annotations

import pytest

import finetune_lora
import infer_lora
import prepare_data
import rank_eval


def test_every_long_flag_answers_to_both_spellings():
    a = finetune_lora.parse_args(["--clear-cache", "--extra_epochs", "1", "--resume-from-checkpoint", "c"])
    b = finetune_lora.parse_args(["--clear_cache", "--extra-epochs", "1", "--resume_from_checkpoint", "c"])
    assert vars(a) == vars(b) and a.clear_cache and a.extra_epochs == 1.0 and a.resume_from_checkpoint == "c"
    assert prepare_data.parse_args(["--rating_scale", "1,10"]).rating_scale == "1,10"  # a flag of a group
    assert infer_lora.parse_args(["--adapter-dir", "none"]).adapter_dir == "none"


def test_rank_eval_takes_adapter_dir_like_the_other_scripts():
    assert rank_eval.parse_args(["--adapter_dir", "x"]).adapter_dir == "x"
    assert rank_eval.parse_args(["--adapter", "x"]).adapter_dir == "x"  # the earlier spelling


def test_help_shows_the_underscore_spelling_first(capsys):
    with pytest.raises(SystemExit):
        finetune_lora.parse_args(["--help"])
    assert "--clear_cache, --clear-cache" in capsys.readouterr().out


def test_no_adapter_is_one_rule():
    from recsft.config import adapter_path, load_config

    assert [adapter_path(v) for v in (None, "", "none", " None ", "out/a")] == [None, None, None, None, "out/a"]
    cfg = load_config(None, ["output_dir=out/run"])
    assert cfg.adapter() == cfg.adapter("") == "out/run" and cfg.adapter("none") is None and cfg.adapter("x") == "x"
    assert load_config(None, ["output_dir=out/run", "adapter_dir=out/best"]).adapter() == "out/best"
    assert load_config(None, ["output_dir=out/run", "adapter_dir=null"]).adapter() == "out/run"
