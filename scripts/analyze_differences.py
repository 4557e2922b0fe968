"""Inspect where the base model and the LoRA adapter disagree (reads compare_base_vs_lora.py output).

Copy-paste:

    python scripts/analyze_differences.py --input_dir output/compare_base_vs_lora
    python scripts/analyze_differences.py --input_dir output/compare_base_vs_lora --category base_right_lora_wrong --show 20

Test-format rows show user_id, candidate_title and history_titles; training-format rows show the input
prompt (first 300 characters).
"""

from __future__ import annotations

import argparse
from collections import Counter
from pathlib import Path

from utils import CATEGORIES, ArgumentParser, DataError, category, non_negative_int, run

ROW_KEYS = {"label": (str, type(None)), "agree": bool, "base_correct": bool, "lora_correct": bool,
            "base_prediction": (str, type(None)), "lora_prediction": (str, type(None)),
            "base_response": str, "lora_response": str}


def parse_args(argv: list[str] | None = None):
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input_dir", default="output/compare_base_vs_lora")
    p.add_argument("--category", choices=CATEGORIES + ("all",), default="all")
    p.add_argument("--show", type=non_negative_int, default=5, help="examples to display per category")
    return p.parse_args(argv)


def display_example(row: dict) -> str:
    """Format-specific view of one example and both answers."""
    from utils import display_example as show

    return (f"{show(row)}\n  label: {row['label']} | base: {row['base_prediction']} ({row['base_response']!r})"
            f" | lora: {row['lora_prediction']} ({row['lora_response']!r})")


def main(args) -> dict:
    from utils import load_data, require_keys

    path = Path(args.input_dir) / "comparisons.jsonl"
    if not path.is_file():
        raise DataError(f"{path} does not exist; run scripts/compare_base_vs_lora.py --output_dir {args.input_dir}")
    rows = load_data(path)
    require_keys(rows, ROW_KEYS, path, "it is not compare_base_vs_lora.py output; re-run that script")
    counts = Counter(category(r) for r in rows)
    print(f"{len(rows)} examples: " + " | ".join(f"{c} {counts.get(c, 0)}" for c in CATEGORIES))
    flips = Counter((r["base_prediction"], r["lora_prediction"]) for r in rows if not r["agree"])
    for (b, lo), n in flips.most_common():
        print(f"  base {b} -> lora {lo}: {n}")
    for cat in CATEGORIES if args.category == "all" else (args.category,):
        chosen = [r for r in rows if category(r) == cat][: args.show]
        if chosen and cat != "both_right":
            print(f"\n=== {cat} ({counts.get(cat, 0)}) ===")
            for r in chosen:
                print(display_example(r) + "\n")
    return {"counts": dict(counts), "flips": {f"{b}->{lo}": n for (b, lo), n in flips.items()}}


if __name__ == "__main__":
    run(main, parse_args)
