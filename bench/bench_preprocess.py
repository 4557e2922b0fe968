"""Preprocessing benchmark: per-example pipelines (plain `datasets.map`, stock TRL's) vs ours, same records, one process.

Copy-paste:

    python bench/bench_preprocess.py                        # real MovieLens train.json + real Qwen3 tokenizer
    python bench/bench_preprocess.py --n 2000 --json-out output/bench/preprocess.json
    python bench/bench_preprocess.py --quick                # a few seconds; used by tests/test_bench_smoke.py

What is compared (every pipeline produces ``input_ids`` + ``labels`` with -100 over the prompt, cut to
``--cutoff-len`` from the left, and the outputs are checked to be identical):

* ``per_example`` -- the plain pipeline: ``datasets.map`` one example at a time: apply_chat_template (full
  conversation and generation prompt), add EOS, tokenize both texts, mask the prompt labels.
* ``trl``   -- stock TRL 1.16 ``SFTTrainer._prepare_dataset`` on conversational prompt/completion records
  (per-example chat template + tokenization, then label building and truncation maps).
* ``ours``  -- ``recsft.preprocess.tokenize_to_arrow`` (chat template rendered once per system prompt, each
  distinct text piece tokenized once, verified exact, vectorized masking/truncation into Arrow), and
  ``tokenize_records`` (the same, returned as Python lists).
* ``pipeline`` -- ``load_tokenized_datasets`` on the whole file: cold (read JSON, tokenize, write the
  hash-keyed cache) and cached reload (hash the file + tokenizer, memory-map the cached Arrow dataset).

The per-example baselines are slow, so they run on ``--n`` examples (after a 32-example warm-up that
pays imports and template compilation) and are compared by examples/s with ours on the full file.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import types
from pathlib import Path

from _common import (QWEN3_TOKENIZER, Timer, as_json_file, bench_main, default_data, device_info, load_records,
                     median, print_table, quiet_logs, versions, write_json)

WARMUP = 32


def per_example_pipeline(records: list[dict], tok, cutoff_len: int):
    """The plain per-example pipeline through ``datasets.map``: format, add EOS, tokenize + mask."""
    from datasets import Dataset

    from recsft.formatting import to_chat_messages

    eos = tok.eos_token

    def fmt(ex):
        msgs = to_chat_messages(ex)
        return {"prompt": tok.apply_chat_template(msgs[:-1], tokenize=False, add_generation_prompt=True,
                                                  enable_thinking=False),
                "text": tok.apply_chat_template(msgs, tokenize=False, enable_thinking=False)}

    def add_eos(ex):  # append EOS unless the rendered answer already carries it (Qwen3: "Yes<|im_end|>\n")
        answer = ex["text"][len(ex["prompt"]):]
        return {"text": ex["text"] if eos in answer else ex["text"] + eos}

    def tokenize(ex):
        prompt_ids = tok(ex["prompt"], add_special_tokens=False)["input_ids"]
        ids = tok(ex["text"], add_special_tokens=False)["input_ids"]
        n_prompt = len(prompt_ids)
        if len(ids) > cutoff_len:  # cut from the left of the prompt: the answer survives
            n_prompt -= len(ids) - cutoff_len
            ids = ids[len(ids) - cutoff_len:]
        return {"input_ids": ids, "labels": [-100] * n_prompt + ids[n_prompt:]}

    ds = Dataset.from_list(records)
    ds = ds.map(fmt, remove_columns=ds.column_names, desc="Applying formatting function")
    ds = ds.map(add_eos, desc="Adding EOS")
    return ds.map(tokenize, remove_columns=["text", "prompt"], desc="Tokenizing")


def trl_pipeline(records: list[dict], tok, cutoff_len: int):
    """Stock TRL 1.16 dataset preparation (``SFTTrainer._prepare_dataset``) on prompt/completion messages."""
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    from recsft.formatting import format_prompt

    rows = []
    for r in records:
        p = format_prompt(r)
        rows.append({"prompt": [{"role": "system", "content": p["system"]}, {"role": "user", "content": p["user"]}],
                     "completion": [{"role": "assistant", "content": p["answer"]}],
                     "chat_template_kwargs": {"enable_thinking": False}})
    # stock settings (truncation keep_start: no MovieLens example reaches cutoff_len, so nothing is cut)
    args = SFTConfig(output_dir=tempfile.gettempdir(), max_length=cutoff_len, report_to="none", use_cpu=True,
                     bf16=False, shuffle_dataset=False)
    # the trainer's own method, without building a model: it reads only these attributes
    owner = types.SimpleNamespace(_tokenizer=tok, chat_template=None, completion_only_loss=True,
                                  _is_vision_dataset=False)
    ds = SFTTrainer._prepare_dataset(owner, Dataset.from_list(rows), tok, args, False, None, "train")
    return ds.select_columns(["input_ids", "labels"])


def same_output(ds, table, n: int) -> bool:
    ours = table.slice(0, n).to_pydict()
    theirs = ds.select_columns(["input_ids", "labels"])[:n]
    return ours["input_ids"] == theirs["input_ids"] and ours["labels"] == theirs["labels"]


def run(args) -> dict:
    quiet_logs()
    from recsft.modeling import load_tokenizer
    from recsft.preprocess import load_tokenized_datasets, tokenize_records, tokenize_to_arrow

    data = default_data(args.data)
    tok = load_tokenizer(QWEN3_TOKENIZER)
    records = load_records(data)
    if args.quick:
        records = records[:1000]
    n_all = len(records)
    n_base = min(args.n, n_all)
    print(f"data: {data} ({n_all} examples); baselines on {n_base}; cutoff_len {args.cutoff_len}")
    print(f"device: {device_info()}")

    rows, res = [], {"data": data, "examples": n_all, "baseline_examples": n_base, "device": device_info(),
                     "versions": versions(), "cutoff_len": args.cutoff_len}
    # warm-up: imports, jinja template compilation, tokenizer caches (not timed, for every pipeline)
    if not args.quick:
        per_example_pipeline(records[:WARMUP], tok, args.cutoff_len)
    pipelines = {"per_example": per_example_pipeline} if args.skip_trl else {"per_example": per_example_pipeline, "trl": trl_pipeline}
    if "trl" in pipelines:
        trl_pipeline(records[:WARMUP], tok, args.cutoff_len)
    tokenize_to_arrow(records[:WARMUP], tok, args.cutoff_len)

    table = None
    ours_s, ours_lists_s = [], []
    for _ in range(args.repeats):  # interleaved: baseline, ours, baseline, ours (shared, noisy CPU)
        for name, fn in pipelines.items():
            with Timer() as t:
                out = fn(records[:n_base], tok, args.cutoff_len)
            res.setdefault(f"{name}_s", []).append(t.s)
            res[f"{name}_out"] = out
        with Timer() as t:
            table = tokenize_to_arrow(records, tok, args.cutoff_len)
        ours_s.append(t.s)
        with Timer() as t:
            tokenize_records(records, tok, args.cutoff_len)
        ours_lists_s.append(t.s)

    ours_eps = n_all / median(ours_s)
    for name in pipelines:
        secs = median(res.pop(f"{name}_s"))
        ds = res.pop(f"{name}_out")
        eps = n_base / secs
        identical = same_output(ds, table, n_base)
        res[name] = {"examples_per_s": eps, "seconds": secs, "identical_to_ours": identical}
        rows.append({"pipeline": f"{name} (per example)", "n": n_base, "s": secs, "eps": eps,
                     "ratio": ours_eps / eps, "same": identical})
    res["ours_arrow"] = {"examples_per_s": ours_eps, "seconds": median(ours_s)}
    res["ours_lists"] = {"examples_per_s": n_all / median(ours_lists_s), "seconds": median(ours_lists_s)}
    rows.append({"pipeline": "ours tokenize_to_arrow", "n": n_all, "s": median(ours_s), "eps": ours_eps, "ratio": 1.0})
    rows.append({"pipeline": "ours tokenize_records", "n": n_all, "s": median(ours_lists_s),
                 "eps": n_all / median(ours_lists_s), "ratio": ours_eps / (n_all / median(ours_lists_s))})

    # whole pipeline on the whole file: cold build + cache write, then cached reloads
    cache = Path(tempfile.mkdtemp(prefix="bench_cache_"))
    path, tmp = as_json_file(data)
    if args.quick:
        path = str(cache / "subset.json")
        Path(path).write_text(json.dumps(records))
    try:
        with Timer() as cold:
            load_tokenized_datasets(path, None, tok, args.cutoff_len, cache_dir=str(cache / "c"))
        warm = []
        for _ in range(3):
            with Timer() as t:
                ds, _ = load_tokenized_datasets(path, None, tok, args.cutoff_len, cache_dir=str(cache / "c"))
            warm.append(t.s)
        assert len(ds) == n_all
    finally:
        shutil.rmtree(cache, ignore_errors=True)
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)
    res["pipeline_cold_s"], res["pipeline_cached_reload_s"] = cold.s, median(warm)
    rows.append({"pipeline": "ours full file, cold + cache write", "n": n_all, "s": cold.s, "eps": n_all / cold.s})
    rows.append({"pipeline": "ours full file, cached reload", "n": n_all, "s": median(warm),
                 "eps": n_all / median(warm)})

    print()
    print_table(rows, [("pipeline", "pipeline", ""), ("n", "examples", "d"), ("s", "seconds", ".2f"),
                       ("eps", "examples/s", ",.0f"), ("ratio", "ours_arrow / this", ".1f"),
                       ("same", "identical ids+labels", "")])
    per_example = res["per_example"]["examples_per_s"]
    res["speedup_vs_per_example"] = ours_eps / per_example
    print(f"\nRATIO preprocess ours/per-example = {ours_eps / per_example:.1f}x (target >= 20x); "
          + (f"ours/trl = {ours_eps / res['trl']['examples_per_s']:.1f}x; " if "trl" in res else "")
          + f"cached reload of {n_all} examples = {res['pipeline_cached_reload_s']:.2f}s (target < 2 s)")
    if "trl" in res:
        res["speedup_vs_trl"] = ours_eps / res["trl"]["examples_per_s"]
    write_json(args.json_out, res)
    return res


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=None, help="train.json (default: data/movielens_qwen3/train.json, "
                                                "else the carried sample bench/data/*.json.gz)")
    p.add_argument("--n", type=int, default=3000, help="examples for the (slow) per-example baselines")
    p.add_argument("--cutoff-len", type=int, default=1024)
    p.add_argument("--repeats", type=int, default=1, help="interleaved repetitions; medians are reported")
    p.add_argument("--skip-trl", action="store_true", help="leave out the stock TRL baseline")
    p.add_argument("--quick", action="store_true", help="1000 examples, per-example baseline on 64, no TRL baseline")
    p.add_argument("--json-out", default=None)
    args = p.parse_args(argv)
    if args.quick:
        args.n, args.skip_trl = 64, True
    return args


def main(argv=None) -> dict:
    """Run with command-line ``argv`` (a list, or None for sys.argv) or an already parsed Namespace."""
    return bench_main(run, parse_args, argv)


if __name__ == "__main__":
    main()
