"""Training set-up: launch checks, the Trainer arguments from the config, and the trainer with its callbacks.

The pieces live by job: ``recsft.trainer`` (the trainer: loss, eval step, metrics), ``recsft.callbacks``
(log lines, graceful stop, time budget, counters), ``recsft.resume`` (every checkpoint/resume rule).
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .callbacks import GracefulStopCallback, ReadableLogCallback
from .config import trainer_arguments
from .trainer import RecSFTConfig, RecSFTTrainer, make_compute_metrics

logger = logging.getLogger(__name__)


def check_launch(quantization_bit: int | None, gpu_count: int | None = None) -> None:
    """Fail before any loading on launch set-ups that cannot train (one line each, exit 2).

    * several GPUs visible to a plain ``python`` process: the Trainer would wrap the model in
      ``nn.DataParallel``, which neither a 4-bit model nor the label-position loss supports;
    * FSDP with a sharded state dict: the Trainer saves no adapter from it;
    * 8-bit under FSDP / ZeRO-3 (4-bit works: its weights are then stored in the compute dtype).
    """
    from .config import ConfigError
    from .modeling import sharded_launch

    gpus = torch.cuda.device_count() if gpu_count is None else gpu_count
    if gpus > 1 and int(os.environ.get("WORLD_SIZE", "1")) == 1:
        raise ConfigError([f"{gpus} GPUs are visible but no launcher started this process: train on one with "
                           f"CUDA_VISIBLE_DEVICES=0 python scripts/finetune_lora.py ..., or on all with "
                           f"accelerate launch --multi_gpu --num_processes {gpus} scripts/finetune_lora.py ..."])
    sharded = sharded_launch()
    state_dict = os.environ.get("FSDP_STATE_DICT_TYPE", "FULL_STATE_DICT")
    if sharded == "FSDP" and "FULL_STATE_DICT" not in state_dict:
        raise ConfigError([f"FSDP with fsdp_state_dict_type {state_dict} saves no LoRA adapter; set "
                           f"fsdp_state_dict_type: FULL_STATE_DICT in the accelerate config (configs/accelerate_fsdp.yaml)"])
    if sharded and quantization_bit == 8:
        raise ConfigError([f"quantization_bit: 8 is not supported under {sharded}; use quantization_bit=4 "
                           f"(stored in the compute dtype for sharding) or null"])


def mixed_precision(bf16: str, device: str) -> dict[str, bool]:
    """Trainer ``bf16``/``fp16`` flags: ``auto`` = bf16 on GPUs with bf16 hardware (sm80+), fp16 autocast with a
    GradScaler on older GPUs (bf16 is only emulated there), neither on CPU/MPS."""
    if bf16 == "true":
        return {"bf16": True, "fp16": False}
    if bf16 == "false" or device != "cuda":
        return {"bf16": False, "fp16": False}
    from .modeling import cuda_half_dtype

    hw_bf16 = cuda_half_dtype() == torch.bfloat16
    if not hw_bf16:
        logger.info("GPU without bf16 hardware: training in fp16 mixed precision (loss scaling)")
    return {"bf16": hw_bf16, "fp16": not hw_bf16}


def sft_config(train, cutoff_len: int, device: str, has_eval: bool, extra_epochs: float = 0.0,
               **extra) -> RecSFTConfig:
    """The trainer's arguments: the ``train`` section passed through (``recsft.config.trainer_arguments``), plus
    the settings recsft fixes (TRL defaults differ from ours) and those that depend on the run.

    ``extra``: further arguments (e.g. ``torch_compile=True``, ``answer_width=0``); they must be given here, at
    construction, since SFTConfig derives settings from them (setting ``torch_compile`` afterwards compiles nothing).
    """
    kwargs = trainer_arguments(train)
    eval_strategy = train.eval_strategy if has_eval else "no"
    kwargs.update(
        num_train_epochs=train.num_train_epochs + extra_epochs, eval_strategy=eval_strategy,
        load_best_model_at_end=train.load_best_model_at_end and eval_strategy != "no",
        greater_is_better=train.metric_for_best_model != "loss", logging_first_step=True,
        gradient_checkpointing=None,  # the deprecated alias of activation_checkpointing (passed through)
        packing_strategy="bfd", eval_packing=False, max_length=cutoff_len, data_seed=train.seed,
        **mixed_precision(train.bf16, device),
        # report_to="none": TensorBoard is added by build_trainer (rank 0 only, logs/ under output_dir)
        report_to="none",
        # the datasets are already tokenized and cut (preprocess.py); TRL prepares them only to pack them
        dataset_kwargs={"skip_prepare_dataset": not train.packing}, use_cpu=device == "cpu",
        ddp_find_unused_parameters=False, disable_tqdm=False,
    )
    return RecSFTConfig(**(kwargs | extra))


@dataclass
class ResidualData:
    """What :func:`residual_datasets` sets up: the full CF table, the datasets (with ``cf`` logits unless stacked,
    with soft-token ids when ``tokens`` is set), and for ``cf_tokens`` the token ids and every table they read."""

    table: Any
    train_ds: Any
    eval_ds: Any
    tokens: Any = None
    token_tables: list = field(default_factory=list)


def residual_datasets(kind: str, train_path: str, train_ds, eval_ds, seed: int, stacked: bool = False,
                      token_offset: int | None = None, token_kind: str | None = None) -> ResidualData:
    """CF residual set-up, before the model loads: fit the CF model on the training split of ``train_path``'s data
    folder and add each answer's ``cf`` logit to the datasets (training rows: 5-fold out-of-fold logits).
    :func:`build_trainer` adds the learned head to the model. ``stacked`` (``cf_fit: stacked``): no ``cf``
    column; :func:`stack_residual` fits the head after training. ``token_offset`` (``cf_tokens``; the tokenizer's
    length): soft CF tokens of the ``token_kind`` CF model (default ``kind``) inserted in every example
    (:func:`recsft.preprocess.with_cf_tokens`; a training answer's item token from the fold table that never saw
    it)."""
    from .cf import TokenIds, cf_cross_fit
    from .config import ConfigError

    if "answer_keys" not in train_ds.column_names or (eval_ds is not None and "answer_keys" not in eval_ds.column_names):
        raise ConfigError([f"cf_residual: {kind} needs each answer's user and movie id: train and evaluate on "
                           f"candidate-block data (prepare_data.py --format blocks), or set cf_residual=none"])
    if stacked and eval_ds is None:
        raise ConfigError(["cf_fit: stacked fits the residual's a and b on the eval answers; set eval_dataset"])
    from .io import check_same_build

    folder = Path(train_path).parent
    check_same_build(folder, [Path(train_path).name, "stats.json", "test_raw.jsonl", "interactions.parquet"],
                     f"re-run `python scripts/prepare_data.py --format blocks --out-dir {folder}`")
    lookup, fit, folds = cf_cross_fit(folder, kind, seed)
    table = fit.table
    logger.info("CF residual: %s fit on %s (%d training interactions, out-of-fold logits for training rows)",
                kind, folder, len(lookup))

    def add(ds, oof: bool):
        def cf_of(batch):
            out = []
            for keys in batch["answer_keys"]:
                pairs = [tuple(json.loads(k)) for k in keys]
                full = table.logit([u for u, _ in pairs], [m for _, m in pairs])
                out.append([lookup.get(p, f) if oof else f for p, f in zip(pairs, full.tolist())])
            return {"cf": out}
        return None if ds is None else ds.map(cf_of, batched=True, desc="CF logits")

    data = ResidualData(table, train_ds, eval_ds) if stacked else ResidualData(table, add(train_ds, True),
                                                                               add(eval_ds, False))
    if token_offset is not None:
        if token_kind not in (None, kind):
            _, fit, folds = cf_cross_fit(folder, token_kind, seed)
        data.tokens, data.token_tables = TokenIds(fit.table, token_offset), [fit.table, *fit.fold_tables]
        data.train_ds = token_dataset(data.train_ds, data.tokens, lambda key: folds.get(key, -1) + 1)
        data.eval_ds = token_dataset(data.eval_ds, data.tokens)
    return data


def token_dataset(ds, tokens, table_of=lambda key: 0):
    """``ds`` with soft CF tokens inserted in every example (:func:`recsft.preprocess.with_cf_tokens`)."""
    from .preprocess import with_cf_tokens

    if ds is None:
        return None
    return ds.map(lambda batch: with_cf_tokens(batch, tokens, table_of), batched=True, desc="CF tokens")


def stack_residual(trainer, table, eval_ds, output_dir: str) -> dict:
    """The second stage of ``cf_fit: stacked``: with the trained LoRA weights frozen, score the eval answers (held
    out from training; ``c`` from the CF model fit on the whole training split, as for test rows), fit ``a`` and
    ``b`` of sigmoid(c + a * margin + b) on them and save the CF table and head with the adapter. Returns the fit."""
    import numpy as np

    from scipy.special import expit

    from .cf import ResidualHead, fit_head
    from .metrics import score_metrics
    from .preprocess import IGNORE_INDEX

    out = trainer.predict(eval_ds, metric_key_prefix="stack")
    preds = np.asarray(out.predictions, dtype=np.float64).reshape(-1, 3)
    gold = np.asarray(out.label_ids).reshape(-1, 2)
    valid = gold[:, 0] != IGNORE_INDEX
    keys = [json.loads(k) for ks in eval_ds["answer_keys"] for k in ks]
    if int(valid.sum()) != len(keys):
        raise RuntimeError(f"{int(valid.sum())} eval answers scored for {len(keys)} answer keys")
    margin, liked = preds[valid, 1] - preds[valid, 2], gold[valid, 0] == trainer.yes_id
    c = table.logit([u for u, _ in keys], [m for _, m in keys])
    a, b = fit_head(c, margin, liked)
    if trainer.is_world_process_zero():
        table.save(output_dir)
        ResidualHead(a, b).save(output_dir)
    auc = {name: score_metrics(liked, expit(z))["auc"] for name, z in
           (("llm", margin), ("cf", c), ("stacked_in_sample", c + a * margin + b))}
    fit = {"kind": table.kind, "fit": "stacked", "a": a, "b": b, "eval_answers": len(keys),
           **{f"eval_auc_{k}": v for k, v in auc.items()}}
    logger.info("CF residual (stacked): a = %.4f, b = %.4f fit on %d eval answers; eval AUC LLM %.3f, CF %.3f, "
                "both %.3f (in sample)", a, b, len(keys), auc["llm"], auc["cf"], auc["stacked_in_sample"])
    return fit


def check_blocks(cfg, train_ds, eval_ds):
    """The model settings to load with: candidate-block data cannot be packed and uses SDPA/eager attention."""
    import dataclasses

    from .config import ConfigError
    from .modeling import attention_for_blocks

    if not any(ds is not None and "block_ids" in ds.column_names for ds in (train_ds, eval_ds)):
        return cfg.model
    if cfg.train.packing:
        raise ConfigError(["packing: true cannot be used with candidate-block data (each row already holds many "
                           "answers on one shared history); set packing=false"])
    return dataclasses.replace(cfg.model, flash_attn=attention_for_blocks(cfg.model.flash_attn))


def build_trainer(model, tokenizer, train_ds, eval_ds, cfg, device: str, extra_epochs: float = 0.0, cf_table=None,
                  cf_tokens: ResidualData | None = None, **extra):
    """The trainer with our eval step, metrics and callbacks; returns ``(trainer, graceful_stop_callback)``.

    ``cf_table``: the CF residual's table (:func:`residual_datasets`); the learned head is added to the model.
    ``cf_tokens``: :func:`residual_datasets`' result when it set up soft CF tokens; the model gets them.
    ``extra``: further trainer arguments (:func:`sft_config`).
    """
    from transformers import EarlyStoppingCallback
    from transformers.integrations import TensorBoardCallback

    train = cfg.train
    args = sft_config(train, cfg.data.cutoff_len, device, eval_ds is not None, extra_epochs, **extra)
    stopper = GracefulStopCallback()
    callbacks = [ReadableLogCallback(), stopper]
    if train.report_to == "tensorboard" and args.process_index == 0:  # one event file, from rank 0
        from torch.utils.tensorboard import SummaryWriter

        callbacks.append(TensorBoardCallback(tb_writer=SummaryWriter(log_dir=str(Path(train.output_dir) / "logs"))))
    if train.early_stopping_patience and args.load_best_model_at_end:
        callbacks.append(EarlyStoppingCallback(early_stopping_patience=train.early_stopping_patience))
    if cf_table is not None:  # the residual's learned a and b, trained with the LoRA weights
        from .cf import ResidualHead

        model.cf_head = ResidualHead().to(next(model.parameters()).device)
    tokens = cf_tokens.tokens if cf_tokens is not None else None
    if tokens is not None:  # soft CF tokens: the input embedding gains the trainable mapping network
        from .cf import add_cf_tokens

        module = add_cf_tokens(model, cf_tokens.token_tables, tokens.offset)
        model.cf_token_ids = tokens
        logger.info("Soft CF tokens: %s vectors (%d numbers per user and item) -> 2-layer network, %s trainable "
                    "parameters beside LoRA", tokens.table.kind, module.features.shape[1],
                    f"{sum(p.numel() for p in module.mlp.parameters()):,}")
    trainer = RecSFTTrainer(model=model, args=args, train_dataset=train_ds, eval_dataset=eval_ds,
                            processing_class=tokenizer, compute_metrics=make_compute_metrics(tokenizer),
                            callbacks=callbacks, cf_table=cf_table, cf_tokens=tokens)
    if args.world_size > 1:
        logger.info("Distributed training: %d processes (%s); this is rank %d", args.world_size,
                    args.parallel_mode, args.process_index)
    return trainer, stopper
