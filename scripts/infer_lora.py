"""Deterministic Yes/No inference with a LoRA adapter: demo mode and batch mode.

Copy-paste:

    # demo: base vs LoRA on a canned prompt
    python scripts/infer_lora.py --adapter_dir output/qwen3-movielens-qlora
    # batch: greedy decoding (max_new_tokens=8) on the MovieLens test split
    python scripts/infer_lora.py --test_file data/movielens_qwen3/test_raw.jsonl \\
        --output_dir output/infer --adapter_dir output/qwen3-movielens-qlora
    # quick check on the first eval sample (training-format JSON)
    python scripts/infer_lora.py --test_file data/movielens_qwen3/eval.json --max_samples 1 \\
        --output_dir output/infer_eval1 --adapter_dir output/qwen3-movielens-qlora
    # scoring mode: one forward pass, P(Yes) vs P(No) -> AUC, ROC curve; threshold picked on 500 eval examples
    python scripts/infer_lora.py --config configs/smollm2_movielens_lora.yaml --test_file movielens_test \\
        --eval_mode score --calibration_samples 500 --output_dir output/infer_score
    # base model too (zero-shot), and both modes compared for agreement and speed
    python scripts/infer_lora.py ... --compare_base --compare_modes
    # the base model alone: --adapter_dir none

Outputs in --output_dir: lora_predictions.jsonl, metrics_summary.json (accuracy, F1, precision, recall,
unparseable; score mode adds auc, log_loss, accuracy at 0.5 and at the eval-chosen threshold), roc_curve.png
(score mode), base_predictions.jsonl / base_metrics.json with --compare_base.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from recsft.cli import ArgumentParser, non_negative_int, output_dir, positive_int, run
from recsft.config import DEFAULT_CONFIG, load_config

DEMO_RECORD = {
    "user_id": 0, "candidate_title": "Empire Strikes Back, The (1980)", "label": "Yes",
    "history_titles": ["Star Wars (1977)", "Raiders of the Lost Ark (1981)", "Return of the Jedi (1983)",
                       "Terminator, The (1984)", "Aliens (1986)", "Die Hard (1988)", "Back to the Future (1985)",
                       "Indiana Jones and the Last Crusade (1989)", "Fugitive, The (1993)", "Toy Story (1995)",
                       "Independence Day (ID4) (1996)", "Twister (1996)", "Rock, The (1996)",
                       "Mission: Impossible (1996)", "Sense and Sensibility (1995)"],
    "history_ratings": [5, 5, 5, 4, 4, 4, 4, 5, 4, 4, 3, 3, 4, 3, 2]}


def parse_args(argv: list[str] | None = None):
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=DEFAULT_CONFIG, help="YAML config (model, data)")
    p.add_argument("--test_file", default=None, help="dataset name (dataset_info.json) or .json/.jsonl path")
    p.add_argument("--output_dir", type=output_dir, default=None, help="batch mode: where predictions and metrics go")
    p.add_argument("--adapter_dir", default=None, help="LoRA adapter (default: the config's output_dir); none = base")
    p.add_argument("--max_samples", type=positive_int, default=None, help="evaluate only the first N examples")
    p.add_argument("--compare_base", action="store_true", help="also evaluate the base model")
    p.add_argument("--eval_mode", choices=["generate", "score"], default=None, help="default: config eval_mode")
    p.add_argument("--compare_modes", action="store_true", help="run generate and score; agreement and speed")
    p.add_argument("--calibration_samples", type=non_negative_int, default=0,
                   help="score mode: pick the P(Yes) threshold on this many eval examples")
    p.add_argument("overrides", nargs="*", help="config overrides: key=value")
    return p.parse_args(argv)


def main(args) -> dict:
    from recsft import evaluation as E

    from recsft.validate import check_model_source, writable_dir

    cfg = load_config(args.config, args.overrides)
    adapter = args.adapter_dir or cfg.train.output_dir
    adapter = None if str(adapter).lower() == "none" else adapter
    check_model_source(cfg.model.model_name_or_path)
    if not args.test_file and not args.output_dir:
        return demo(cfg, adapter)
    mode = args.eval_mode or cfg.infer.eval_mode
    out = writable_dir(args.output_dir or "output/infer", "--output_dir")
    records, source = load_records(args.test_file or cfg.data.test_file, cfg.data.dataset_dir,
                                   args.max_samples or cfg.data.max_test_samples)
    if args.calibration_samples and mode == "score":  # the eval records are read after the test run: check now
        load_records(cfg.data.eval_dataset, cfg.data.dataset_dir, args.calibration_samples)
    model, tok = E.load_for_eval(cfg.model, adapter, merge=not args.compare_base)
    kw = dict(batch_size=cfg.infer.infer_batch_size, system_prompt=cfg.data.system_prompt,
              enable_thinking=cfg.model.enable_thinking, source=source, max_new_tokens=cfg.infer.max_new_tokens,
              temperature=cfg.infer.temperature, top_p=cfg.infer.top_p, cutoff_len=cfg.data.cutoff_len)
    primary = "lora" if adapter else "base"
    results = {primary: run_one(model, tok, records, mode, out, primary, args, cfg, kw, primary=True)}
    if args.compare_modes:
        results["modes"] = compare_modes(model, tok, records, mode, results[next(iter(results))], kw)
    if args.compare_base and adapter:
        with model.disable_adapter():
            results["base"] = run_one(model, tok, records, mode, out, "base", args, cfg, kw)
    summary = {name: r[1] if isinstance(r, tuple) else r for name, r in results.items()}
    return summary


def load_records(name: str, dataset_dir: str, max_samples: int | None):
    from recsft.formatting import resolve_dataset, validate_records
    from recsft.io import load_data

    path = resolve_dataset(name, dataset_dir)
    records = load_data(path)
    validate_records(records, path)
    return records[:max_samples] if max_samples else records, path


def run_one(model, tok, records, mode, out: Path, name: str, args, cfg, kw, primary: bool = False):
    from recsft import evaluation as E

    gen_kw = {k: kw[k] for k in ("max_new_tokens", "temperature", "top_p")} if mode == "generate" else {}
    gen_kw["cutoff_len"] = kw["cutoff_len"]
    rows, metrics = E.evaluate(model, tok, records, mode, kw["batch_size"], kw["system_prompt"],
                               kw["enable_thinking"], kw["source"], desc=f"{name} ({mode})", **gen_kw)
    if mode == "score":
        labels, p_yes = [r["label"] for r in rows], [r["p_yes"] for r in rows]
        metrics["at_0.5"] = E.threshold_metrics(labels, p_yes, 0.5)
        if args.calibration_samples:
            eval_records, _ = load_records(cfg.data.eval_dataset, cfg.data.dataset_dir, args.calibration_samples)
            t = E.choose_threshold(model, tok, eval_records, kw["batch_size"], kw["system_prompt"],
                                   kw["enable_thinking"], kw["cutoff_len"])
            metrics["at_eval_threshold"] = E.threshold_metrics(labels, p_yes, t)
        E.plot_roc(labels, p_yes, out / ("roc_curve.png" if primary else f"{name}_roc_curve.png"),
                   title=f"{name} ROC ({len(rows)} examples)")
    metrics.update({"model": cfg.model.model_name_or_path, "adapter": args.adapter_dir if name == "lora" else None,
                    "test_file": kw["source"]})
    E.save(out, name, rows, metrics, primary)
    print(f"[{name}] {E.format_metrics(metrics)}", flush=True)
    return rows, metrics


def compare_modes(model, tok, records, first_mode, first, kw) -> dict:
    """Run the other mode on the same examples: label agreement where generation said Yes/No, and speed."""
    from recsft import evaluation as E

    first_rows, first_metrics = first
    other = "generate" if first_mode == "score" else "score"
    gen_kw = {k: kw[k] for k in ("max_new_tokens", "temperature", "top_p")} if other == "generate" else {}
    gen_kw["cutoff_len"] = kw["cutoff_len"]
    rows, metrics = E.evaluate(model, tok, records, other, kw["batch_size"], kw["system_prompt"],
                               kw["enable_thinking"], kw["source"], desc=other, **gen_kw)
    by_mode = {first_mode: (first_rows, first_metrics), other: (rows, metrics)}
    gen_rows, score_rows = by_mode["generate"][0], by_mode["score"][0]
    parsed = [(g, s) for g, s in zip(gen_rows, score_rows) if g["prediction"] in ("Yes", "No")]
    agree = sum(g["prediction"] == s["prediction"] for g, s in parsed)
    speedup = by_mode["generate"][1]["seconds"] / max(by_mode["score"][1]["seconds"], 1e-9)
    print(f"[modes] score agrees with generate on {agree}/{len(parsed)} examples where generation gave Yes/No; "
          f"score is {speedup:.1f}x faster ({by_mode['score'][1]['examples_per_s']:.2f} vs "
          f"{by_mode['generate'][1]['examples_per_s']:.2f} examples/s)", flush=True)
    return {"generation_parsed": len(parsed), "agreement": agree / len(parsed) if parsed else float("nan"),
            "score_speedup": speedup, f"{other}_metrics": metrics}


def demo(cfg, adapter: str | None) -> dict:
    from recsft import evaluation as E
    from recsft.inference import generate, max_prompt_tokens, prompts_for
    from recsft.metrics import extract_answer

    model, tok = E.load_for_eval(cfg.model, adapter)
    prompts, _ = prompts_for([DEMO_RECORD], tok, cfg.data.system_prompt, cfg.model.enable_thinking)
    print("=" * 80 + f"\nPROMPT\n{prompts[0]}\n" + "=" * 80)
    answers = {}
    budget = max_prompt_tokens(tok, cfg.data.cutoff_len)
    kw = dict(max_new_tokens=cfg.infer.max_new_tokens, progress=False, max_prompt_tokens=budget)
    if adapter:
        answers["lora"] = generate(model, tok, prompts, **kw)[0]
        with model.disable_adapter():
            answers["base"] = generate(model, tok, prompts, **kw)[0]
    else:
        answers["base"] = generate(model, tok, prompts, **kw)[0]
    for name, text in answers.items():
        print(f"{name:>4}: {text!r} -> {extract_answer(text)}")
    return answers


if __name__ == "__main__":
    run(main, parse_args)
