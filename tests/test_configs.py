"""The shipped YAML configs: same effective values as recorded, only non-default keys, printable effective config."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

import finetune_lora
from recsft.config import Config, dump_config, load_config, read_yaml

ROOT = Path(__file__).resolve().parents[1]
# Every effective value of each config, recorded when the configs were reduced to their differences from the
# code defaults: a change of a default or of a config file that alters a run shows up here.
EXPECTED = json.loads((Path(__file__).parent / "effective_configs.json").read_text())


@pytest.mark.parametrize("path", sorted(EXPECTED))
def test_config_effective_values_unchanged(path):
    cfg = load_config(ROOT / path).to_dict()
    changed = {k: (v, cfg.get(k, "<missing>")) for k, v in EXPECTED[path].items() if cfg.get(k, "<missing>") != v}
    assert not changed, f"{path}: (recorded, now) {changed}"


@pytest.mark.parametrize("path", sorted(EXPECTED))
def test_config_sets_only_what_differs_from_the_defaults(path):
    defaults = Config().to_dict()
    effective = load_config(ROOT / path).to_dict()
    redundant = [k for k in read_yaml(ROOT / path) if effective[k] == defaults[k]]
    assert not redundant, f"{path}: these keys repeat the code default; remove them: {redundant}"


def test_print_config_round_trips(tmp_path, capsys):
    args = finetune_lora.parse_args(["--config", str(ROOT / "configs/smollm2_movielens_lora.yaml"), "--print-config",
                                     "learning_rate=1e-3"])
    printed = finetune_lora.cli(args)
    text = capsys.readouterr().out
    assert "# --- train ---" in text and yaml.safe_load(text) == printed
    expected = load_config(ROOT / "configs/smollm2_movielens_lora.yaml", ["learning_rate=1e-3"])
    assert printed == expected.to_dict() and printed["learning_rate"] == 1e-3
    (tmp_path / "effective.yaml").write_text(dump_config(expected))  # the printout is itself a loadable config
    assert load_config(tmp_path / "effective.yaml").to_dict() == printed
