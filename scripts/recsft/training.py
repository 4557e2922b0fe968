"""Training on TRL's SFTTrainer: answer-position eval metrics, callbacks, resume, summary and plots."""

from __future__ import annotations

import json
import logging
import math
import os
import signal
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import TrainerCallback
from trl import SFTTrainer

from .io import write_json_atomic
from .metrics import compute_metrics, extract_answer

logger = logging.getLogger(__name__)


# ------------------------------------------------------------------------------- eval at the answer
def answer_positions(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Positions whose next token is a label (bool mask), and the first such position of each answer.

    Works for padded ``(B, T)`` batches and for padding-free ``(1, ΣT)`` batches alike: answers are
    contiguous runs of labels separated by masked prompt tokens.
    """
    keep = torch.zeros_like(labels, dtype=torch.bool)
    keep[:, :-1] = labels[:, 1:] != -100
    starts = keep.clone()
    starts[:, 1:] &= ~keep[:, :-1]
    return keep, starts


class RecSFTTrainer(SFTTrainer):
    """SFTTrainer whose eval step projects the LM head only at label positions.

    It returns, per example, ``[argmax token id, logit(Yes), logit(No)]`` at the answer position instead
    of full-vocabulary logits, so eval memory is O(batch) rather than O(batch x seq x vocab), and the
    metrics decode exactly the token the model would generate first.
    """

    yes_id: int = -1
    no_id: int = -1
    loss_type: str = "nll"

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """Token NLL over the label positions only: the LM head runs on ~0.7% of the tokens.

        With Qwen3's tokenizer a MovieLens example has ~430 tokens, 3 of them labels (``Yes``/``No``,
        ``<|im_end|>`` and a newline); the share is 3 / example length, whatever ``cutoff_len`` is above it.
        TRL's fused head projects every position on CPU (and checkpoints tiles on GPU); here the hidden
        states are sliced to the positions whose next token is a label *before* the vocabulary
        projection (transformers' ``logits_to_keep`` with a boolean mask), which gives the same loss.
        """
        mode = "train" if model.training else "eval"
        if self.loss_type == "yes_no":
            return self._yes_no_loss(model, inputs, mode, return_outputs, num_items_in_batch)
        labels = inputs["labels"]
        keep, _ = answer_positions(labels)
        fwd = {k: v for k, v in inputs.items() if k != "labels"}
        outputs = model(**fwd, use_cache=False, logits_to_keep=keep)
        logits = outputs.logits.float()
        targets = labels[:, 1:][labels[:, 1:] != -100]
        loss = torch.nn.functional.cross_entropy(logits, targets, reduction="sum")
        count = num_items_in_batch if num_items_in_batch is not None else targets.numel()
        loss = loss / torch.as_tensor(count, device=loss.device).clamp(min=1)
        if self.args.average_tokens_across_devices and num_items_in_batch is not None:
            loss = loss * self.accelerator.num_processes
        self._log_token_metrics(mode, inputs, logits, targets)
        return (loss, outputs) if return_outputs else loss

    def _yes_no_loss(self, model, inputs, mode: str, return_outputs: bool, num_items_in_batch=None):
        """Binary cross-entropy on logit(Yes) - logit(No) at the first position of every answer.

        The two logits are computed in float32 from the final (normed) hidden state and the two LM-head
        rows, so bf16 rounding of the full-vocabulary logits does not blur the margin.
        """
        labels = inputs["labels"]
        keep, starts = answer_positions(labels)
        fwd = {k: v for k, v in inputs.items() if k != "labels"}
        captured: dict[str, torch.Tensor] = {}
        norm = self.accelerator.unwrap_model(model).get_decoder().norm
        hook = norm.register_forward_hook(lambda mod, args, out: captured.__setitem__("h", out))
        try:
            outputs = model(**fwd, use_cache=False, logits_to_keep=starts)
        finally:
            hook.remove()
        hidden = captured["h"][starts].float()  # (N_answers, d)
        diff = yes_no_margin(self.accelerator.unwrap_model(model), hidden, self.yes_id, self.no_id)
        gold = labels[:, 1:][starts[:, :-1]]
        target = (gold == self.yes_id).float()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(diff, target, reduction="sum")
        count = torch.as_tensor(float(target.numel()), device=loss.device)
        if num_items_in_batch is not None:  # answers in the whole accumulated batch (same tokens per answer)
            count = num_items_in_batch * target.numel() / max(int(keep.sum()), 1)
        loss = loss / torch.as_tensor(count, device=loss.device).clamp(min=1)
        if self.args.average_tokens_across_devices and num_items_in_batch is not None:
            loss = loss * self.accelerator.num_processes
        pair = torch.stack([diff, torch.zeros_like(diff)], -1)
        self._log_token_metrics(mode, inputs, pair, (gold != self.yes_id).long())
        return (loss, outputs) if return_outputs else loss

    def _log_token_metrics(self, mode: str, inputs, logits, targets) -> None:
        with torch.no_grad():
            n = self.accelerator.gather_for_metrics(torch.tensor(targets.numel(), device=logits.device)).sum()
            correct = self.accelerator.gather_for_metrics((logits.argmax(-1) == targets).sum()).sum()
            self._metrics[mode]["mean_token_accuracy"].append((correct / n.clamp(min=1)).item())
            if mode == "train":
                mask = inputs.get("attention_mask")
                local = mask.sum() if mask is not None else torch.tensor(inputs["input_ids"].numel())
                self._total_train_tokens += int(self.accelerator.gather_for_metrics(local.to(logits.device)).sum())
            self._metrics[mode]["num_tokens"] = [self._total_train_tokens]

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        inputs = self._prepare_inputs(inputs)
        labels = inputs["labels"]
        keep, starts = answer_positions(labels)
        fwd = {k: v for k, v in inputs.items() if k != "labels"}
        with torch.no_grad(), self.compute_loss_context_manager():
            logits = model(**fwd, use_cache=False, logits_to_keep=keep).logits.float()  # (N_label, V)
        targets = labels[:, 1:][labels[:, 1:] != -100]
        first = starts[keep]  # which kept rows are the first token of an answer
        at = logits[first]
        if self.loss_type == "yes_no":
            loss = torch.nn.functional.binary_cross_entropy_with_logits(
                at[:, self.yes_id] - at[:, self.no_id], (targets[first] == self.yes_id).float())
        else:
            loss = torch.nn.functional.cross_entropy(logits, targets, reduction="mean")
        if prediction_loss_only:
            return loss.detach(), None, None
        preds = torch.stack([at.argmax(-1).float(), at[:, self.yes_id], at[:, self.no_id]], dim=-1)
        return loss.detach(), preds, targets[first]


def yes_no_margin(model, hidden: torch.Tensor, yes_id: int, no_id: int) -> torch.Tensor:
    """logit(Yes) - logit(No) in float32 from final hidden states ``(N, d)`` and the LM head's two rows."""
    head = model.get_output_embeddings()
    rows = head.weight[[yes_id, no_id]].float()
    logits = hidden.float() @ rows.T
    if getattr(head, "bias", None) is not None:
        logits = logits + head.bias[[yes_id, no_id]].float()
    return logits[:, 0] - logits[:, 1]


def make_compute_metrics(tokenizer):
    """``compute_metrics`` for the Trainer: decode the answer-position argmax with the shared extractor."""

    def _compute(eval_pred) -> dict[str, float]:
        preds, label_ids = eval_pred.predictions, eval_pred.label_ids
        preds = np.asarray(preds).reshape(-1, 3)
        label_ids = np.asarray(label_ids).reshape(-1)
        valid = label_ids != -100
        preds, label_ids = preds[valid], label_ids[valid]
        pred_text = [extract_answer(tokenizer.decode([int(i)])) for i in preds[:, 0]]
        gold = [extract_answer(tokenizer.decode([int(i)])) for i in label_ids]
        p_yes = 1.0 / (1.0 + np.exp(-(preds[:, 1] - preds[:, 2])))
        m = compute_metrics(gold, pred_text, p_yes.tolist())
        return {k: m[k] for k in ("accuracy", "f1", "precision", "recall", "auc", "unparseable", "n")}

    return _compute


# ------------------------------------------------------------------------------------------ callbacks
class ReadableLogCallback(TrainerCallback):
    """One greppable line per log event: ``Step 120/4000 | Epoch 0.06 | loss 0.6931 | ...``."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs:
            return
        parts = [f"Step {state.global_step}/{state.max_steps}", f"Epoch {state.epoch or 0:.2f}"]
        for key, value in logs.items():
            if key == "epoch" or not isinstance(value, (int, float)):
                continue
            parts.append(f"{key} {value:.4g}" if isinstance(value, float) else f"{key} {value}")
        print(" | ".join(parts), flush=True)


class GracefulStopCallback(TrainerCallback):
    """On SIGTERM/SIGINT: finish the current step, save a resumable checkpoint, stop.

    ``pkill -f finetune_lora.py`` sends SIGTERM; a second signal falls through to the default handler.
    """

    def __init__(self):
        self.requested: str | None = None
        self._previous: dict[int, Any] = {}

    def install(self):
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not in the main thread
                pass
        return self

    def uninstall(self):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum, frame):
        if self.requested:
            if os.environ.get("TORCHELASTIC_RUN_ID"):  # torchrun/accelerate forwards the signal it got (and
                return  # SIGKILLs after 30 s): a repeat is that copy, not a second request
            self.uninstall()
            signal.raise_signal(signum)
            return
        self.requested = signal.Signals(signum).name
        print(f"Received {self.requested}: saving a checkpoint after this step, then stopping "
              f"(send it again to stop at once)", flush=True)

    def on_step_end(self, args, state, control, **kwargs):
        if args.world_size > 1 and torch.distributed.is_initialized():
            # DDP: every rank must stop after the same step, even if the signal reached them a step apart
            flag = torch.tensor([int(self.requested is not None)], device=args.device)
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
            if flag.item() and not self.requested:
                self.requested = "SIGTERM (on another rank)"
        if self.requested:
            control.should_save = True
            control.should_training_stop = True
        return control


class TokenThroughputCallback(TrainerCallback):
    """Counts trained (non-pad) tokens and wall time, for tokens/s in the summary."""

    def __init__(self):
        self.start = None
        self.train_time = 0.0

    def on_train_begin(self, args, state, control, **kwargs):
        self.start = time.perf_counter()

    def on_train_end(self, args, state, control, **kwargs):
        if self.start is not None:
            self.train_time = time.perf_counter() - self.start


class TimeBudgetCallback(TrainerCallback):
    """Stops training (with a final eval and checkpoint) once the optimizer steps used ``minutes``.

    Only the time between step begin and step end counts, so evaluation and checkpoint saving do not eat the
    budget; ``clock="cpu"`` counts this process's CPU time, a fair budget on a machine shared with other jobs.
    """

    def __init__(self, minutes: float, clock: str = "wall"):
        self.limit_s = minutes * 60.0
        self.now = time.process_time if clock == "cpu" else time.perf_counter
        self.used_s = 0.0
        self._t0: float | None = None

    def on_step_begin(self, args, state, control, **kwargs):
        self._t0 = self.now()

    def on_step_end(self, args, state, control, **kwargs):
        if self._t0 is not None:
            self.used_s += self.now() - self._t0
            self._t0 = None
        if self.used_s >= self.limit_s and not control.should_training_stop:
            logger.info("Time budget of %.1f min reached at step %d: evaluating, saving and stopping",
                        self.limit_s / 60, state.global_step)
            control.should_training_stop = True
            control.should_save = True
            control.should_evaluate = args.eval_strategy != "no"
        return control


# --------------------------------------------------------------------------------------------- resume
def checkpoint_info(checkpoint: str) -> dict[str, Any]:
    """Step and epoch of a checkpoint, from its ``trainer_state.json``."""
    state_file = Path(checkpoint) / "trainer_state.json"
    if not state_file.is_file():
        raise FileNotFoundError(f"{checkpoint}: no trainer_state.json; not a Trainer checkpoint folder")
    state = json.loads(state_file.read_text())
    return {"checkpoint": Path(checkpoint).name, "step": int(state.get("global_step", 0)),
            "epoch": float(state.get("epoch") or 0.0)}


def resume_banner(info: dict[str, Any]) -> str:
    bar = "=" * 80
    return "\n".join([bar, "RESUMING TRAINING FROM CHECKPOINT", bar, f"Checkpoint: {info['checkpoint']}",
                      f"Last completed step: {info['step']}", f"Next step will be: {info['step'] + 1}",
                      f"Epoch: {info['epoch']:.2f}", bar])


def latest_checkpoint(output_dir: str) -> str | None:
    """Newest complete ``checkpoint-N`` in ``output_dir`` (one without trainer_state.json is skipped)."""
    out = Path(output_dir)
    if not out.is_dir():
        return None
    ckpts = [p for p in out.glob("checkpoint-*") if p.name.split("-")[-1].isdigit()
             and (p / "trainer_state.json").is_file()]
    return str(max(ckpts, key=lambda p: int(p.name.split("-")[-1]))) if ckpts else None


# -------------------------------------------------------------------------------------- summary/plots
def best_and_final(log_history: list[dict], metric: str) -> tuple[dict, dict]:
    evals = [e for e in log_history if f"eval_{metric}" in e]
    if not evals:
        return {}, {}
    greater = metric != "loss"
    best = max(evals, key=lambda e: e[f"eval_{metric}"] * (1 if greater else -1))
    return best, evals[-1]


def plot_training_curves(log_history: list[dict], path: str) -> None:
    """Train loss and eval loss/accuracy/F1/AUC against steps, saved as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [(e["step"], e["loss"]) for e in log_history if "loss" in e and "step" in e]
    evals = [e for e in log_history if "eval_loss" in e]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    if train:
        ax1.plot(*zip(*train), label="train loss")
    if evals:
        ax1.plot([e["step"] for e in evals], [e["eval_loss"] for e in evals], "o-", label="eval loss")
        for key in ("eval_accuracy", "eval_f1", "eval_auc"):
            pts = [(e["step"], e[key]) for e in evals if key in e and not math.isnan(e[key])]
            if pts:
                ax2.plot(*zip(*pts), "o-", label=key.replace("eval_", ""))
    ax1.set(xlabel="step", ylabel="loss", title="Loss")
    ax2.set(xlabel="step", ylim=(0, 1), title="Eval metrics (answer token)")
    for ax in (ax1, ax2):
        if ax.get_legend_handles_labels()[0]:
            ax.legend()
        ax.grid(alpha=0.3)
    fig.tight_layout()
    tmp = str(Path(path).with_suffix(".tmp.png"))
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    Path(tmp).replace(path)


def write_summary(path: str, summary: dict[str, Any]) -> None:
    write_json_atomic(path, summary)


# ----------------------------------------------------------------------------------- pipeline stages
def find_resume_checkpoint(output_dir: str, resume: bool, explicit: str | None) -> str | None:
    """The checkpoint to resume from (printing the RESUMING banner), or None to start fresh."""
    if explicit:
        if not Path(explicit).is_dir():
            raise FileNotFoundError(f"--resume_from_checkpoint {explicit!r} does not exist")
        ckpt = explicit
    elif resume:
        ckpt = latest_checkpoint(output_dir)
        if ckpt is None:
            print(f"No checkpoint found in {output_dir}; training starts from scratch", flush=True)
            return None
    else:
        return None
    print(resume_banner(checkpoint_info(ckpt)), flush=True)
    return ckpt


def resolve_data(data) -> tuple[str, str | None]:
    """Train/eval file paths from dataset names (dataset_info.json) or paths; fail before any heavy work."""
    from .formatting import resolve_dataset

    train = resolve_dataset(data.dataset, data.dataset_dir)
    evals = resolve_dataset(data.eval_dataset, data.dataset_dir) if data.eval_dataset else None
    for path in (train, evals):
        if path and not Path(path).is_file():
            from .io import DataError

            raise DataError(f"{path}: data file does not exist; run `python scripts/prepare_data.py` "
                            f"or fix dataset/eval_dataset in the config")
    return train, evals


def tokenizer_for(model_args):
    from .modeling import load_tokenizer

    return load_tokenizer(model_args.tokenizer_name_or_path or model_args.model_name_or_path,
                          model_args.trust_remote_code)


def datasets_for(data, enable_thinking: bool, tokenizer, train_path: str, eval_path: str | None, clear_cache: bool):
    """Tokenized train/eval datasets; under DDP rank 0 builds the cache first and the others load it."""
    from accelerate import PartialState

    from .modeling import get_device
    from .preprocess import preprocess_datasets_parallel

    # cpu=True on CPU: a bare PartialState() there does not see torchrun's ranks, and every rank would build
    with PartialState(cpu=get_device() == "cpu").main_process_first():
        return preprocess_datasets_parallel(
            train_path, eval_path, tokenizer, data.cutoff_len, max_samples=data.max_samples,
            max_eval_samples=data.max_eval_samples, cache_dir=data.preprocessing_cache_dir,
            system_prompt=data.system_prompt, enable_thinking=enable_thinking, clear_cache=clear_cache)


def model_for(model_args, lora, gradient_checkpointing: bool, seed: int = 42):
    """Base model + fresh LoRA adapters; the seed is set first so the adapter init is reproducible."""
    from transformers import set_seed

    from .modeling import apply_lora, get_device, load_model

    set_seed(seed)
    device = get_device()
    model = load_model(model_args.model_name_or_path, device, model_args.dtype, model_args.flash_attn,
                       model_args.quantization_bit, model_args.trust_remote_code)
    model = apply_lora(model, lora.lora_rank, lora.lora_alpha, lora.lora_dropout, lora.lora_target,
                       gradient_checkpointing)
    trainable, total = model.get_nb_trainable_parameters()
    logger.info("LoRA: %s trainable of %s parameters (%.2f%%) on %s", f"{trainable:,}", f"{total:,}",
                100 * trainable / total, device)
    return model, device


def sft_config(train, cutoff_len: int, device: str, has_eval: bool, extra_epochs: float = 0.0):
    """SFTConfig from the ``train`` section: every knob set explicitly (TRL defaults differ from ours)."""
    from trl import SFTConfig

    bf16 = train.bf16 == "true" or (train.bf16 == "auto" and device == "cuda" and torch.cuda.is_bf16_supported())
    eval_strategy = train.eval_strategy if has_eval else "no"
    return SFTConfig(
        output_dir=train.output_dir, per_device_train_batch_size=train.per_device_train_batch_size,
        per_device_eval_batch_size=train.per_device_eval_batch_size,
        gradient_accumulation_steps=train.gradient_accumulation_steps,
        num_train_epochs=train.num_train_epochs + extra_epochs, max_steps=train.max_steps,
        learning_rate=train.learning_rate, warmup_steps=train.warmup_ratio, lr_scheduler_type=train.lr_scheduler_type,
        weight_decay=train.weight_decay, max_grad_norm=train.max_grad_norm, optim=train.optim,
        logging_steps=train.logging_steps, logging_first_step=True,
        eval_strategy=eval_strategy, eval_steps=train.eval_steps, save_strategy=train.save_strategy,
        save_steps=train.save_steps, save_total_limit=train.save_total_limit,
        load_best_model_at_end=train.load_best_model_at_end and eval_strategy != "no",
        metric_for_best_model=train.metric_for_best_model,
        greater_is_better=train.metric_for_best_model != "loss",
        activation_checkpointing=train.gradient_checkpointing, gradient_checkpointing=None,
        packing=train.packing, packing_strategy="bfd",
        eval_packing=False, max_length=cutoff_len, seed=train.seed, data_seed=train.seed, bf16=bf16,
        report_to="none", dataloader_num_workers=train.dataloader_num_workers,
        dataset_kwargs={"skip_prepare_dataset": not train.packing}, use_cpu=device == "cpu",
        ddp_find_unused_parameters=False, disable_tqdm=False,
    )


def build_trainer(model, tokenizer, train_ds, eval_ds, cfg, device: str, extra_epochs: float = 0.0):
    """The trainer with our eval step, metrics and callbacks; returns ``(trainer, graceful_stop_callback)``."""
    from transformers import EarlyStoppingCallback
    from transformers.integrations import TensorBoardCallback

    from .inference import answer_token_ids

    train = cfg.train
    args = sft_config(train, cfg.data.cutoff_len, device, eval_ds is not None, extra_epochs)
    stopper = GracefulStopCallback()
    callbacks = [ReadableLogCallback(), stopper]
    if train.report_to == "tensorboard" and args.process_index == 0:  # one event file, from rank 0
        from torch.utils.tensorboard import SummaryWriter

        callbacks.append(TensorBoardCallback(tb_writer=SummaryWriter(log_dir=str(Path(train.output_dir) / "logs"))))
    budget = None
    if train.max_train_minutes:
        budget = TimeBudgetCallback(train.max_train_minutes, train.budget_clock)
        callbacks.append(budget)
    if train.early_stopping_patience and args.load_best_model_at_end:
        callbacks.append(EarlyStoppingCallback(early_stopping_patience=train.early_stopping_patience))
    trainer = RecSFTTrainer(model=model, args=args, train_dataset=train_ds, eval_dataset=eval_ds,
                            processing_class=tokenizer, compute_metrics=make_compute_metrics(tokenizer),
                            callbacks=callbacks)
    trainer.yes_id, trainer.no_id = answer_token_ids(tokenizer)
    trainer.loss_type = train.loss_type
    trainer.time_budget = budget
    if args.world_size > 1:
        logger.info("Distributed training: %d processes (%s); this is rank %d", args.world_size,
                    args.parallel_mode, args.process_index)
    return trainer, stopper


class signals_installed:
    """Context manager: SIGTERM/SIGINT -> checkpoint and stop, for the duration of training."""

    def __init__(self, stopper: GracefulStopCallback):
        self.stopper = stopper

    def __enter__(self):
        self.stopper.install()

    def __exit__(self, *exc):
        self.stopper.uninstall()


def stopped_early(trainer, signal_name: str) -> dict:
    out = trainer.args.output_dir
    ckpt = latest_checkpoint(out)
    print(f"Training stopped by {signal_name} at step {trainer.state.global_step}; checkpoint saved: {ckpt}. "
          f"Continue with --resume.", flush=True)
    return {"stopped_by": signal_name, "global_step": trainer.state.global_step, "checkpoint": ckpt}


def generation_eval(model, tokenizer, eval_path: str, n: int, system_prompt: str | None,
                    enable_thinking: bool, batch_size: int, cutoff_len: int | None = None) -> dict:
    """Greedy generation (max_new_tokens=8) on the first ``n`` eval records, scored like inference."""
    from .config import MAX_NEW_TOKENS
    from .inference import generate, max_prompt_tokens, prompts_for
    from .io import load_data

    records = load_data(eval_path)[:n]
    prompts, labels = prompts_for(records, tokenizer, system_prompt, enable_thinking, eval_path)
    responses = generate(model, tokenizer, prompts, MAX_NEW_TOKENS, 0.0, 1.0, batch_size, desc="Gen eval",
                         max_prompt_tokens=max_prompt_tokens(tokenizer, cutoff_len))
    return compute_metrics(labels, [extract_answer(r) for r in responses])


def finish(trainer, tokenizer, cfg, eval_path: str | None, result, wall: float, device: str) -> dict:
    """Save the final (best) adapter, run the optional generation eval, write summary and curves."""
    out = cfg.train.output_dir
    trainer.save_model(out)
    summary: dict[str, Any] = {}
    if trainer.is_world_process_zero():
        tokenizer.save_pretrained(out)
        state = trainer.state
        best, final = best_and_final(state.log_history, cfg.train.metric_for_best_model)
        tokens = float(trainer._total_train_tokens)
        runtime = float(result.metrics.get("train_runtime", 0.0)) or 1e-9
        summary = {"model": cfg.model.model_name_or_path, "device": device, "global_step": state.global_step,
                   "epoch": state.epoch, "train_loss": result.metrics.get("train_loss"),
                   "train_runtime_s": runtime, "wall_time_s": wall, "train_tokens": tokens,
                   "tokens_per_s": tokens / runtime,
                   "train_examples_seen": state.global_step * cfg.train.per_device_train_batch_size
                   * cfg.train.gradient_accumulation_steps * trainer.args.world_size,
                   "budget_minutes_used": (trainer.time_budget.used_s / 60 if trainer.time_budget else None),
                   "budget_clock": cfg.train.budget_clock, "best_checkpoint": state.best_model_checkpoint,
                   "best_metric": state.best_metric, "metric_for_best_model": cfg.train.metric_for_best_model,
                   "best_eval": best, "final_eval": final, "config": cfg.to_dict()}
        if cfg.train.gen_eval_samples and eval_path:
            gen = generation_eval(trainer.model, tokenizer, eval_path, cfg.train.gen_eval_samples,
                                  cfg.data.system_prompt, cfg.model.enable_thinking,
                                  cfg.train.per_device_eval_batch_size, cfg.data.cutoff_len)
            summary["gen_eval"] = gen
            print("Generation eval (greedy, max_new_tokens=8): " +
                  " | ".join(f"{k} {v:.4g}" for k, v in gen.items()), flush=True)
        write_summary(str(Path(out) / "training_summary.json"), summary)
        plot_training_curves(state.log_history, str(Path(out) / "training_curves.png"))
        print(f"Training complete: {state.global_step} steps in {wall:.0f}s; adapter saved to {out}; "
              f"best {cfg.train.metric_for_best_model} = {state.best_metric}", flush=True)
    return summary
