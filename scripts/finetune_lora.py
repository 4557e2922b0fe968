"""LoRA / QLoRA fine-tuning of a chat model on the MovieLens Yes/No task (TRL SFTTrainer + peft).

Copy-paste:

    # embedded offline default (SmolLM2-135M on CPU, a few minutes)
    python scripts/finetune_lora.py --config configs/smollm2_movielens_lora.yaml
    # Qwen3-0.6B QLoRA on a GPU, rebuilding the preprocessing cache
    python scripts/finetune_lora.py --config configs/qwen3_movielens_qlora.yaml --clear_cache
    # any config key can be overridden
    python scripts/finetune_lora.py --config configs/qwen3_movielens_qlora.yaml cutoff_len=512 packing=true
    # resume from the latest checkpoint in output_dir, and train 2 epochs more than the config says
    python scripts/finetune_lora.py --config configs/qwen3_movielens_qlora.yaml --resume --extra_epochs 2
    python scripts/finetune_lora.py --config configs/qwen3_movielens_qlora.yaml \\
        --resume_from_checkpoint output/qwen3-movielens-qlora/checkpoint-4000
    # several GPUs (DDP): accelerate launch --num_processes 2 scripts/finetune_lora.py --config ...
    # every effective setting (code defaults + YAML + overrides), without training
    python scripts/finetune_lora.py --config configs/smollm2_movielens_lora.yaml --print_config
"""

from __future__ import annotations

import argparse
import logging
import time

from utils import DEFAULT_CONFIG, ArgumentParser, Config, dump_config, load_config, non_negative_float, run

logger = logging.getLogger("finetune_lora")


def parse_args(argv: list[str] | None = None):
    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=DEFAULT_CONFIG, help="YAML config")
    parser.add_argument("--clear_cache", action="store_true", help="rebuild the preprocessing cache")
    parser.add_argument("--resume", action="store_true", help="resume from the latest checkpoint in output_dir")
    parser.add_argument("--extra-epochs", type=non_negative_float, default=0.0, help="train this many epochs beyond the config")
    parser.add_argument("--resume_from_checkpoint", "--resume-from-checkpoint", default=None,
                        help="resume from this checkpoint folder")
    parser.add_argument("--print_config", action="store_true",
                        help="print the effective config (defaults + YAML + overrides) as YAML and exit")
    parser.add_argument("overrides", nargs="*", help="config overrides: key=value")
    return parser.parse_args(argv)


def main(cfg: Config, clear_cache: bool = False, resume: bool = False, extra_epochs: float = 0.0,
         resume_from_checkpoint: str | None = None) -> dict:
    """Train; returns the training summary (also written to ``<output_dir>/training_summary.json``)."""
    from utils import (build_trainer, check_blocks, check_launch, datasets_for, eval_subset, finish_training,
                       get_device, model_for, plan_resume, preflight_training, residual_datasets, resolve_data,
                       run_lock, stack_residual, stopped_early, token_dataset, tokenizer_for)

    start = time.perf_counter()
    check_launch(cfg.model.quantization_bit)
    preflight_training(cfg, extra_epochs)  # settings, output_dir, model: before any work
    plan = plan_resume(cfg, resume, resume_from_checkpoint, extra_epochs)
    if plan.finished is not None:
        return plan.finished
    train_path, eval_path = resolve_data(cfg.data)
    tokenizer = tokenizer_for(cfg.model)
    train_ds, eval_ds = datasets_for(cfg.data, cfg.model.enable_thinking, tokenizer, train_path, eval_path,
                                     clear_cache, cpu=get_device() == "cpu")
    model_args = check_blocks(cfg, train_ds, eval_ds)  # candidate blocks: no packing, no flash-attn
    cf, stacked = None, cfg.train.cf_residual != "none" and cfg.train.cf_fit == "stacked"
    if cfg.train.cf_residual != "none":  # the CF model is fit (and the data checked) before the LLM loads
        cf = residual_datasets(cfg.train.cf_residual, train_path, train_ds, eval_ds, cfg.train.seed, stacked=stacked,
                               token_offset=len(tokenizer) if cfg.train.cf_tokens else None,
                               token_kind=cfg.train.cf_tokens_kind)
        train_ds, eval_ds = cf.train_ds, cf.eval_ds
    fit_ds = eval_subset(cfg.data, cfg.model.enable_thinking, tokenizer, eval_path, cfg.train.cf_fit_samples,
                         cpu=get_device() == "cpu") if stacked else None  # two stages: the head after training
    if fit_ds is not None and cf.tokens is not None:
        fit_ds = token_dataset(fit_ds, cf.tokens)
    with run_lock(cfg.train.output_dir):  # one run per output_dir (a stale lock of a dead run is taken over)
        model, device = model_for(model_args, cfg.lora, cfg.train.gradient_checkpointing, cfg.train.seed)
        trainer, stopper = build_trainer(model, tokenizer, train_ds, eval_ds, cfg, device, extra_epochs,
                                         None if stacked or cf is None else cf.table, cf_tokens=cf)
        with stopper:  # SIGTERM/SIGINT: save a checkpoint after the current step and stop
            result = plan.train(trainer)
        if stopper.requested:
            return stopped_early(trainer, stopper.requested)
        fit = stack_residual(trainer, cf.table, fit_ds, cfg.train.output_dir) if stacked else None
        return finish_training(trainer, tokenizer, cfg, eval_path, result, time.perf_counter() - start, device,
                               cf_fit=fit)


def cli(args) -> dict:
    """The command line: ``--print_config`` prints the effective config; otherwise train."""
    cfg = load_config(args.config, args.overrides)
    if args.print_config:
        print(dump_config(cfg), end="", flush=True)
        return cfg.to_dict()
    return main(cfg, clear_cache=args.clear_cache, resume=args.resume, extra_epochs=args.extra_epochs,
                resume_from_checkpoint=args.resume_from_checkpoint)


if __name__ == "__main__":
    run(cli, parse_args)
