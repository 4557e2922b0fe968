"""Base model vs LoRA adapter on the same examples: metrics, agreement, disagreeing examples.

Copy-paste:

    python scripts/compare_base_vs_lora.py --config configs/qwen3_movielens_qlora.yaml
    nohup python scripts/compare_base_vs_lora.py --config configs/qwen3_7b_movielens_qlora.yaml \\
        > compare_base_vs_lora.log 2>&1 &
    python scripts/compare_base_vs_lora.py --config configs/smollm2_movielens_lora.yaml \\
        --test_file movielens_test --max_samples 64 --eval_mode score --output_dir output/compare

Writes to --output_dir: comparison.json (both metric sets, agreement counts), comparisons.jsonl (one row
per example with both predictions) and disagreements.jsonl. Read them with scripts/analyze_differences.py.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from utils import DEFAULT_CONFIG, ArgumentParser, load_config, non_negative_int, output_dir, positive_int, run


def parse_args(argv: list[str] | None = None):
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=DEFAULT_CONFIG)
    p.add_argument("--test_file", default=None, help="dataset name or path (default: the config's test_file)")
    p.add_argument("--adapter_dir", default=None, help="default: the config's adapter_dir, else its output_dir")
    p.add_argument("--max_samples", type=positive_int, default=None, help="default: the config's max_test_samples")
    p.add_argument("--eval_mode", choices=["generate", "score"], default=None, help="default: config eval_mode")
    p.add_argument("--output_dir", type=output_dir, default="output/compare_base_vs_lora")
    p.add_argument("--show", type=non_negative_int, default=5, help="disagreeing examples to print")
    p.add_argument("overrides", nargs="*", help="config overrides: key=value")
    return p.parse_args(argv)


def main(args) -> dict:
    from utils import (EvalSettings, UserInputError, agreement, check_cf_token_records, check_record_mode,
                       check_residual_records, display_example, evaluate, format_metrics, load_for_eval,
                       load_records, load_residual, pair_rows, preflight_inference, without_cf_tokens, writable_dir,
                       write_json_atomic, write_jsonl_atomic)

    cfg = load_config(args.config, args.overrides)
    adapter = cfg.adapter(args.adapter_dir)
    if adapter is None:
        raise UserInputError("--adapter_dir: compare_base_vs_lora needs a LoRA adapter folder to compare with the "
                             "base model (for the base model alone use infer_lora.py --adapter_dir none)")
    writable_dir(args.output_dir, "--output_dir")
    preflight_inference(cfg.model)
    mode = args.eval_mode or cfg.infer.eval_mode
    records, source = load_records(args.test_file or cfg.data.test_file, cfg.data.dataset_dir,
                                   args.max_samples or cfg.data.max_test_samples)
    settings = EvalSettings.from_config(cfg)
    model_args = check_record_mode(records, source, mode, False, cfg.model)
    check_cf_token_records(adapter, records, source)
    residual = load_residual(adapter)  # the LoRA side scores with the adapter's CF residual, if it has one
    if residual is not None:
        if mode != "score":
            raise UserInputError(f"{adapter}: trained with a CF residual, whose P(Yes) needs --eval_mode score")
        check_residual_records(records, source)
    model, tok = load_for_eval(model_args, adapter)
    lora_rows, lora_m = evaluate(model, tok, records, mode, settings, source, desc="LoRA", residual=residual)
    with model.disable_adapter(), without_cf_tokens(model):  # the base model never saw the tokens
        base_rows, base_m = evaluate(model, tok, records, mode, settings, source, desc="Base")
    rows = pair_rows(base_rows, lora_rows)
    summary = {"test_file": source, "mode": mode, "adapter_dir": adapter, "model": cfg.model.model_name_or_path,
               "base": base_m, "lora": lora_m, "agreement": agreement(rows)}
    out = Path(args.output_dir)
    write_jsonl_atomic(out / "comparisons.jsonl", rows)
    write_jsonl_atomic(out / "disagreements.jsonl", [r for r in rows if not r["agree"]])
    write_json_atomic(out / "comparison.json", summary)
    print(f"[base] {format_metrics(base_m)}\n[lora] {format_metrics(lora_m)}")
    print("Agreement: " + " | ".join(f"{k} {v}" for k, v in summary["agreement"].items()))
    for r in [r for r in rows if not r["agree"]][: args.show]:
        print(f"---\n{display_example(r)}\nlabel {r['label']} | base {r['base_prediction']} "
              f"({r['base_response']!r}) | lora {r['lora_prediction']} ({r['lora_response']!r})")
    print(f"Saved to {out}/comparison.json, comparisons.jsonl, disagreements.jsonl", flush=True)
    return summary


if __name__ == "__main__":
    run(main, parse_args)
