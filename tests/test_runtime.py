"""CPU runtime choices: dtype auto, thread count, OpenMP wait policy."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from recsft import runtime
from recsft.config import ConfigError, load_config
from recsft.modeling import choose_dtype


@pytest.mark.parametrize("flags,expected", [({"avx2", "avx512_bf16"}, "bfloat16"), ({"avx2", "amx_bf16"}, "bfloat16"),
                                            ({"avx2", "fma"}, "float32")])
def test_auto_dtype_on_x86_follows_the_bf16_flags(monkeypatch, flags, expected):
    monkeypatch.setattr(runtime, "cpu_flags", lambda: flags)
    monkeypatch.setattr(runtime.platform, "machine", lambda: "x86_64")
    monkeypatch.setattr(runtime, "_timed_bf16_is_faster", lambda: pytest.fail("x86 must not time"))
    name, why = choose_dtype("auto", "cpu")
    assert name == expected and ("bf16" in why)
    assert choose_dtype("float32", "cpu") == ("float32", "dtype in the config")


def test_auto_dtype_elsewhere_is_timed_once_and_cached(monkeypatch, tmp_path):
    calls = []
    monkeypatch.setattr(runtime, "cpu_flags", lambda: None)
    monkeypatch.setattr(runtime, "CACHE_FILE", tmp_path / "cpu_bf16.json")
    monkeypatch.setattr(runtime, "_timed_bf16_is_faster", lambda: calls.append(1) or False)
    assert runtime.cpu_auto_dtype()[0] == "float32"
    name, why = runtime.cpu_auto_dtype()
    assert name == "float32" and "cached" in why and calls == [1]


def test_threads_explicit_then_env_then_physical_cores(monkeypatch):
    import torch

    before = torch.get_num_threads()
    try:
        monkeypatch.setenv("OMP_NUM_THREADS", "1")
        assert runtime.set_threads("auto") == 1 and "OMP_NUM_THREADS" in runtime._chosen["threads"]
        assert runtime.set_threads("2") == 2 and "config" in runtime._chosen["threads"]
        monkeypatch.delenv("OMP_NUM_THREADS")
        monkeypatch.setattr(runtime, "physical_cores", lambda: 2)
        monkeypatch.setattr(runtime.os, "getloadavg", lambda: (0.1, 0.1, 0.1))
        assert runtime.set_threads("auto") == 2 and "2 physical cores" in runtime.describe("cpu", "float32", "x")
        monkeypatch.setattr(runtime.os, "getloadavg", lambda: (1.2, 0.1, 0.1))  # one busy neighbour
        assert runtime.set_threads("auto") == 1 and "load average 1.2" in runtime._chosen["threads"]
        monkeypatch.setattr(runtime.os, "getloadavg", lambda: (9.0, 9.0, 9.0))
        assert runtime.set_threads("auto") == 1
    finally:
        torch.set_num_threads(before)


def test_num_threads_key_is_checked():
    assert load_config(None, ["num_threads=3"]).model.num_threads == "3"
    with pytest.raises(ConfigError, match="num_threads"):
        load_config(None, ["num_threads=many"])


def test_omp_wait_policy_defaults_to_passive_unless_set(monkeypatch):
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    runtime.omp_defaults()
    assert os.environ["OMP_WAIT_POLICY"] == "PASSIVE"
    monkeypatch.setenv("OMP_WAIT_POLICY", "ACTIVE")
    runtime.omp_defaults()
    assert os.environ["OMP_WAIT_POLICY"] == "ACTIVE" and "user" in runtime._chosen["omp"]


@pytest.mark.slow
@pytest.mark.parametrize("user", [None, "ACTIVE"])
def test_scripts_set_the_wait_policy_before_torch_loads(user):
    """A script's first import (recsft.cli) sets it, and torch is not loaded yet: OpenMP reads it at load time."""
    code = ("import sys, os; import recsft.cli; assert 'torch' not in sys.modules; import torch; "
            "print(os.environ['OMP_WAIT_POLICY'])")
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"} | ({"OMP_WAIT_POLICY": user} if user else {})
    env["PYTHONPATH"] = "scripts"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == (user or "PASSIVE")
