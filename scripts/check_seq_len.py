"""Sequence-length analysis: how JSON records become tokens, length statistics and truncation.

Copy-paste:

    python scripts/check_seq_len.py --config configs/qwen3_7b_movielens_qlora.yaml --show-examples 2
    python scripts/check_seq_len.py --config configs/qwen3_7b_movielens_qlora.yaml --show-examples 0
    python scripts/check_seq_len.py --config configs/qwen3_7b_movielens_qlora.yaml --max-samples 1000
    python scripts/check_seq_len.py --config configs/qwen3_7b_movielens_qlora.yaml --cutoff-len 512
    python scripts/check_seq_len.py --config configs/qwen3_7b_movielens_qlora.yaml --char-only

Token counts come from the same tokenization as training (chat template, thinking disabled, labels -100
on the prompt), so the masking numbers are exactly what the trainer sees. A histogram of the lengths is
saved as a PNG in --output-dir.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from utils import DEFAULT_CONFIG, ArgumentParser, load_config, non_negative_int, output_dir, positive_int, run

RULE = "─" * 76
BAR = "=" * 80


def percentile_list(text: str) -> list[float]:
    """``"50,90,99"`` -> [50.0, 90.0, 99.0]; each a number from 0 to 100."""
    try:
        values = [float(p) for p in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers from 0 to 100, got {text!r}") from None
    if not values or not all(0 <= v <= 100 for v in values):  # also rejects nan
        raise argparse.ArgumentTypeError(f"every percentile must be from 0 to 100, got {text!r}")
    return values


def parse_args(argv: list[str] | None = None):
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=DEFAULT_CONFIG)
    p.add_argument("--show-examples", type=non_negative_int, default=2, help="number of transformation examples")
    p.add_argument("--max-samples", type=positive_int, default=None, help="limit the number of samples analysed")
    p.add_argument("--cutoff-len", type=positive_int, default=None, help="override cutoff_len from the config")
    p.add_argument("--char-only", action="store_true", help="count characters, no tokenizer")
    p.add_argument("--percentiles", type=percentile_list, default="50,90,95,99,100",
                   help="comma-separated percentiles")
    p.add_argument("--dataset", default=None, help="dataset name or path (default: the config's dataset)")
    p.add_argument("--output-dir", type=output_dir, default="output/seq_len", help="where the histogram PNG goes")
    p.add_argument("overrides", nargs="*", help="config overrides: key=value")
    return p.parse_args(argv)


def short(text: str, width: int = 70) -> str:
    text = text.replace("\n", "\\n") if len(text) > width else text
    return text[:width] + ("..." if len(text) > width else "")


def show_example(k: int, record: dict, tok, cutoff: int, system_prompt, enable_thinking: bool) -> None:
    from utils import chat_texts, to_chat_messages, tokenize_func

    print(f"\n{RULE}\nEXAMPLE {k}\n{RULE}\n\n[STEP 1] Original JSON Record:")
    for key, value in record.items():
        print(f"  {key}: {short(str(value))}")
    messages = to_chat_messages(record, system_prompt)
    print("\n[STEP 2] Converted to Chat Messages:")
    for i, m in enumerate(messages, 1):
        print(f"  {i}. role={m['role']}: {short(m['content'], 60)}")
    prompt, answer = chat_texts(tok, messages[0]["content"], messages[1]["content"], messages[2]["content"],
                                enable_thinking)
    print("\n[STEP 3] Applied Chat Template (with special tokens):")
    print("  " + (prompt + answer).replace("\n", "\n  ").rstrip())
    full = tokenize_func(record, tok, cutoff_len=10**9, system_prompt=system_prompt, enable_thinking=enable_thinking)
    ids = full["input_ids"]
    print(f"\n[STEP 4] Tokenized:\n  Total tokens: {len(ids)}\n  First 20 token IDs: {ids[:20]}\n"
          f"  Last 20 token IDs: {ids[-20:]}")
    print(f"\n[STEP 5] Truncation Analysis (cutoff_len={cutoff}):")
    if len(ids) <= cutoff:
        print(f"  ✓ No truncation needed ({len(ids)} <= {cutoff})")
    else:
        cut = tokenize_func(record, tok, cutoff, system_prompt, enable_thinking)
        removed = ids[: len(ids) - len(cut["input_ids"])]
        print(f"  ✗ {len(removed)} prompt tokens removed from the LEFT (answer kept): "
              f"{short(tok.decode(removed), 60)}")
    labels = tokenize_func(record, tok, cutoff, system_prompt, enable_thinking)["labels"]
    masked = sum(1 for x in labels if x == -100)
    print(f"\n[STEP 6] Label Masking for Training:\n  Prompt tokens (masked with -100): {masked}\n"
          f"  Response tokens (trained): {len(labels) - masked}\n  Masking ratio: {masked / len(labels):.1%} masked")


def lengths_of(records: list[dict], tok, system_prompt, enable_thinking: bool) -> np.ndarray:
    """Token counts exactly as training tokenizes; character counts of system+user+answer without ``tok``."""
    from utils import format_prompt, tokenize_to_arrow

    if tok is None:
        parts = (format_prompt(r, system_prompt) for r in records)
        return np.array([len(p["system"]) + len(p["user"]) + len(p["answer"] or "") for p in parts])
    table = tokenize_to_arrow(records, tok, cutoff_len=10**9, system_prompt=system_prompt,
                              enable_thinking=enable_thinking)
    return np.asarray(table.column("input_ids").combine_chunks().value_lengths())


def report(lengths: np.ndarray, cutoff: int, percentiles: list[float], unit: str, path: str) -> dict:
    stats = {"min": float(lengths.min()), "max": float(lengths.max()), "mean": float(lengths.mean())}
    stats.update({f"p{int(p) if p == int(p) else p}": float(np.percentile(lengths, p)) for p in percentiles})
    over = int((lengths > cutoff).sum())
    print(f"\n{BAR}\nSEQUENCE LENGTH STATISTICS\n{BAR}\n\nDataset: {path}\nMeasured: {len(lengths)} samples "
          f"({unit})\nCutoff length: {cutoff}\n\nStatistics:")
    for k, v in stats.items():
        print(f"  {k}: {v:.2f}")
    if unit == "tokens":
        share = over / len(lengths)
        print(f"\nTruncation Analysis:\n  Samples > {cutoff} tokens: {over} ({share:.1%})\n"
              f"  Samples <= {cutoff} tokens: {len(lengths) - over} ({1 - share:.1%})\n")
        verdict = ("✓ No truncation needed for any samples." if over == 0 else
                   "Generally acceptable (<1% truncated)." if share < 0.01 else
                   "Review the truncation strategy (1-5% truncated)." if share <= 0.05 else
                   "Consider reducing history_len in data preparation or increasing cutoff_len (>5% truncated).")
        print(f"  {verdict}")
        print(f"  Suggested cutoff_len (1.1-1.2x p95): {int(stats.get('p95', np.percentile(lengths, 95)) * 1.1)}"
              f"-{int(np.percentile(lengths, 95) * 1.2)}")
    stats["truncated"] = over
    return stats


def main(args) -> dict:
    from utils import check_model_source, load_records, load_tokenizer, plot_length_histogram, writable_dir

    cfg = load_config(args.config, args.overrides)
    writable_dir(args.output_dir, "--output-dir")
    tok_name = cfg.model.tokenizer_name_or_path or cfg.model.model_name_or_path
    if not args.char_only:
        check_model_source(tok_name, "tokenizer_name_or_path" if cfg.model.tokenizer_name_or_path else
                           "model_name_or_path")
    cutoff = args.cutoff_len or cfg.data.cutoff_len
    records, path = load_records(args.dataset or cfg.data.dataset, cfg.data.dataset_dir, args.max_samples)
    sp, think = cfg.data.system_prompt, cfg.model.enable_thinking
    tok = None if args.char_only else load_tokenizer(tok_name)
    if tok is not None and args.show_examples:
        print(f"{BAR}\nEXAMPLE TRANSFORMATIONS: JSON → Chat Messages → Formatted String → Tokens\n{BAR}")
        for k, record in enumerate(records[: args.show_examples], 1):
            show_example(k, record, tok, cutoff, sp, think)
    unit = "characters" if args.char_only else "tokens"
    lengths = lengths_of(records, tok, sp, think)
    percentiles = args.percentiles if isinstance(args.percentiles, list) else percentile_list(args.percentiles)
    stats = report(lengths, cutoff, percentiles, unit, path)
    png = Path(args.output_dir) / f"seq_len_{Path(path).stem}_{unit}.png"
    plot_length_histogram(lengths, cutoff, unit, png)
    print(f"\nHistogram saved to {png}")
    return stats


if __name__ == "__main__":
    run(main, parse_args)
