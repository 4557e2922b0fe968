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
(score mode), base_predictions.jsonl / base_metrics.json with --compare_base. Every batch is saved as it is
scored (lora_predictions.partial.jsonl, deleted at the end): a stopped run continues with the same command plus
--resume.
"""

from __future__ import annotations

import argparse

from utils import DEFAULT_CONFIG, ArgumentParser, load_config, non_negative_int, output_dir, positive_int, run

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
    p.add_argument("--adapter_dir", default=None, help="LoRA adapter (default: the config's adapter_dir, else its output_dir); none = the base model")
    p.add_argument("--max_samples", type=positive_int, default=None, help="evaluate only the first N examples")
    p.add_argument("--compare_base", action="store_true", help="also evaluate the base model")
    p.add_argument("--eval_mode", choices=["generate", "score"], default=None, help="default: config eval_mode")
    p.add_argument("--compare_modes", action="store_true", help="run generate and score; agreement and speed")
    p.add_argument("--resume", action="store_true",
                   help="continue the scoring run that stopped in --output_dir (batches saved as they are scored)")
    p.add_argument("--calibration_samples", type=non_negative_int, default=0,
                   help="score mode: pick the P(Yes) threshold on this many eval examples")
    p.add_argument("overrides", nargs="*", help="config overrides: key=value")
    return p.parse_args(argv)


def main(args) -> dict:
    from utils import (DataError, EvalSettings, check_cf_token_records, check_record_mode, check_residual_records,
                       compare_modes, evaluate_with_thresholds, load_for_eval, load_records, load_residual,
                       open_score_journal, preflight_inference, save_eval, score_header, without_cf_tokens,
                       writable_dir)

    cfg = load_config(args.config, args.overrides)
    adapter = cfg.adapter(args.adapter_dir)
    preflight_inference(cfg.model)
    if not args.test_file and not args.output_dir:
        return demo(cfg, adapter)
    mode = args.eval_mode or cfg.infer.eval_mode
    out = writable_dir(args.output_dir or "output/infer", "--output_dir")
    records, source = load_records(args.test_file or cfg.data.test_file, cfg.data.dataset_dir,
                                   args.max_samples or cfg.data.max_test_samples)
    calibration = None
    if mode == "score" and args.calibration_samples:
        calibration, _ = load_records(cfg.data.eval_dataset, cfg.data.dataset_dir, args.calibration_samples)
    settings = EvalSettings.from_config(cfg)
    model_args = check_record_mode(records, source, mode, args.compare_modes, cfg.model)  # before the model loads
    check_cf_token_records(adapter, records, source)
    check_cf_token_records(adapter, calibration or [], cfg.data.eval_dataset)
    residual = load_residual(adapter)  # an adapter trained with a CF residual scores with it
    if residual is not None:
        if mode != "score" or args.compare_modes:
            raise DataError(f"{adapter}: trained with a CF residual, whose P(Yes) needs --eval_mode score "
                            f"(without --compare_modes)")
        check_residual_records(records, source)
        check_residual_records(calibration or [], cfg.data.eval_dataset)
    primary = "lora" if adapter else "base"
    names = [primary] + (["base"] if args.compare_base and adapter else [])
    journals = {name: open_score_journal(out, score_header(records, name, mode, settings, cfg.model, adapter),
                                         args.resume)
                for name in names}  # an unfinished run in --output_dir is found before the model loads
    model, tok = load_for_eval(model_args, adapter, merge=not args.compare_base)

    def run_one(name: str, primary: bool = False):
        rows, metrics = evaluate_with_thresholds(model, tok, records, mode, settings, source, f"{name} ({mode})",
                                                 calibration, residual if name == "lora" else None, journals[name])
        metrics.update({"model": cfg.model.model_name_or_path,
                        "adapter": args.adapter_dir if name == "lora" else None, "test_file": source})
        save_eval(out, name, rows, metrics, primary)
        return rows, metrics

    results = {primary: run_one(primary, primary=True)}
    if args.compare_modes:
        results["modes"] = compare_modes(model, tok, records, mode, results[primary], settings, source)
    if args.compare_base and adapter:
        with model.disable_adapter(), without_cf_tokens(model):  # the base model never saw the soft CF tokens
            results["base"] = run_one("base")
    for journal in journals.values():  # kept until every pass ends: a stop in the base pass resumes only that pass
        journal.close()
    return {name: r[1] if isinstance(r, tuple) else r for name, r in results.items()}


def demo(cfg, adapter: str | None) -> dict:
    from utils import extract_answer, generate, load_for_eval, prompt_budget, prompts_for

    model, tok = load_for_eval(cfg.model, adapter)
    prompts, _ = prompts_for([DEMO_RECORD], tok, cfg.data.system_prompt, cfg.model.enable_thinking)
    print("=" * 80 + f"\nPROMPT\n{prompts[0]}\n" + "=" * 80)
    answers = {}
    budget = prompt_budget(tok, cfg.data.cutoff_len)
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
