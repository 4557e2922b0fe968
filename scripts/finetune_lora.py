"""LoRA / QLoRA fine-tuning of a chat model on the MovieLens Yes/No task (TRL SFTTrainer + peft).

Copy-paste:

    # embedded offline default (SmolLM2-135M on CPU, a few minutes)
    python scripts/finetune_lora.py --config configs/smollm2_movielens_lora.yaml
    # Qwen3-0.6B QLoRA on a GPU, rebuilding the preprocessing cache
    python scripts/finetune_lora.py --config configs/qwen3_movielens_qlora.yaml --clear-cache
    # any config key can be overridden
    python scripts/finetune_lora.py --config configs/qwen3_movielens_qlora.yaml cutoff_len=512 packing=true
    # resume from the latest checkpoint in output_dir, and train 2 epochs more than the config says
    python scripts/finetune_lora.py --config configs/qwen3_movielens_qlora.yaml --resume --extra-epochs 2
    python scripts/finetune_lora.py --config configs/qwen3_movielens_qlora.yaml \\
        --resume_from_checkpoint output/qwen3-movielens-qlora/checkpoint-4000
    # several GPUs (DDP): accelerate launch --num_processes 2 scripts/finetune_lora.py --config ...
"""

from __future__ import annotations

import argparse
import logging
import time

from recsft.cli import run
from recsft.config import DEFAULT_CONFIG, Config, load_config

logger = logging.getLogger("finetune_lora")


def parse_args(argv: list[str] | None = None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=DEFAULT_CONFIG, help="YAML config")
    parser.add_argument("--clear-cache", action="store_true", help="rebuild the preprocessing cache")
    parser.add_argument("--resume", action="store_true", help="resume from the latest checkpoint in output_dir")
    parser.add_argument("--extra-epochs", type=float, default=0.0, help="train this many epochs beyond the config")
    parser.add_argument("--resume_from_checkpoint", "--resume-from-checkpoint", default=None,
                        help="resume from this checkpoint folder")
    parser.add_argument("overrides", nargs="*", help="config overrides: key=value")
    return parser.parse_args(argv)


def main(cfg: Config, clear_cache: bool = False, resume: bool = False, extra_epochs: float = 0.0,
         resume_from_checkpoint: str | None = None) -> dict:
    """Train; returns the training summary (also written to ``<output_dir>/training_summary.json``)."""
    from recsft import training as T

    start = time.perf_counter()
    T.check_launch(cfg.model.quantization_bit)
    ckpt = T.find_resume_checkpoint(cfg.train.output_dir, resume, resume_from_checkpoint)
    train_path, eval_path = T.resolve_data(cfg.data)
    tokenizer = T.tokenizer_for(cfg.model)
    train_ds, eval_ds = T.datasets_for(cfg.data, cfg.model.enable_thinking, tokenizer, train_path, eval_path,
                                       clear_cache)
    model, device = T.model_for(cfg.model, cfg.lora, cfg.train.gradient_checkpointing, cfg.train.seed)
    trainer, stopper = T.build_trainer(model, tokenizer, train_ds, eval_ds, cfg, device, extra_epochs)
    with T.signals_installed(stopper):
        result = trainer.train(resume_from_checkpoint=ckpt)
    if stopper.requested:
        return T.stopped_early(trainer, stopper.requested)
    return T.finish(trainer, tokenizer, cfg, eval_path, result, time.perf_counter() - start, device)


if __name__ == "__main__":
    run(lambda a: main(load_config(a.config, a.overrides), clear_cache=a.clear_cache, resume=a.resume,
                           extra_epochs=a.extra_epochs, resume_from_checkpoint=a.resume_from_checkpoint),
        parse_args)
