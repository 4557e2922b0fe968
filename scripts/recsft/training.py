"""Training on TRL's SFTTrainer: the trainer (answer-position loss and eval metrics), callbacks, resume."""

from __future__ import annotations

import json
import logging
import os
import signal
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import TrainerCallback
from transformers.trainer_callback import ExportableState
from trl import SFTTrainer

from .inference import AnswerLogits, block_inputs, pad_rows
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
    loss_type: str = "nll"  # nll | yes_no (see _yes_no_loss)
    answer_width: int = 0  # label tokens per example (the longer templated answer); 0 = use the boolean mask

    def __init__(self, *args, cf_table=None, **kwargs):
        if kwargs.get("data_collator") is None and _has_blocks(kwargs.get("train_dataset"), kwargs.get("eval_dataset")):
            kwargs["data_collator"] = BlockCollator(pad_token_id=_pad_id(kwargs.get("processing_class")))
        self.cf_table = cf_table  # CF residual (recsft.cf.CFTable): saved with every checkpoint beside model.cf_head
        super().__init__(*args, **kwargs)
        from .modeling import keep_trainable_fp32

        # TRL casts a quantized model's LoRA weights to bf16 above; the optimizer (built in train()) must see fp32
        cast = keep_trainable_fp32(self.model)
        if cast:
            logger.info("LoRA weights kept in float32 for the optimizer (%d tensors cast back)", cast)

    def _set_signature_columns_if_needed(self):
        super()._set_signature_columns_if_needed()
        extra = [c for c in ("block_ids", "cf") if c not in self._signature_columns]
        self._signature_columns = [*self._signature_columns, *extra]

    @staticmethod
    def model_inputs(model, inputs: dict) -> dict:
        """What the model's forward gets from a batch: everything but the labels; candidate-block rows get their
        block attention mask and position ids (:func:`recsft.inference.block_inputs`)."""
        return block_inputs(model, {k: v for k, v in inputs.items() if k not in ("labels", "cf")})

    def answer_logit(self, model, inputs: dict, margin: torch.Tensor) -> torch.Tensor:
        """The logit P(Yes) is scored from: the LLM's margin logit(Yes) - logit(No), or with a CF residual
        ``c + a * margin + b`` (``inputs["cf"]``: c per answer, row-major, NaN-padded; ``model.cf_head``: a, b)."""
        if "cf" not in inputs:
            return margin
        cf = inputs["cf"][~torch.isnan(inputs["cf"])]
        if cf.numel() != margin.numel():
            raise RuntimeError(f"{cf.numel()} CF logits for {margin.numel()} answers in a batch")
        return getattr(model, "module", model).cf_head(cf.to(margin.device), margin)

    def _save(self, output_dir: str | None = None, state_dict=None):
        super()._save(output_dir, state_dict)
        if self.cf_table is not None:  # the residual travels with every checkpoint and the final adapter
            output_dir = output_dir or self.args.output_dir
            self.cf_table.save(output_dir)
            getattr(self.model, "module", self.model).cf_head.save(output_dir)

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        super()._load_from_checkpoint(resume_from_checkpoint, model)
        self._load_head(resume_from_checkpoint)

    def _load_best_model(self):
        super()._load_best_model()
        self._load_head(self.state.best_model_checkpoint)

    def _load_head(self, folder) -> None:
        if self.cf_table is None or not folder:
            return
        from .cf import ResidualHead

        saved = ResidualHead.load(folder, fix="resume from another checkpoint or start fresh in a new output_dir")
        head = getattr(self.model, "module", self.model).cf_head
        with torch.no_grad():
            head.a.copy_(saved.a)
            head.b.copy_(saved.b)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """Token NLL over the label positions only: the LM head runs on ~0.7% of the tokens.

        With Qwen3's tokenizer a MovieLens example has ~430 tokens, 3 of them labels (``Yes``/``No``,
        ``<|im_end|>`` and a newline); the share is 3 / example length, whatever ``cutoff_len`` is above it.
        TRL's fused head projects every position on CPU (and checkpoints tiles on GPU); here the hidden
        states are sliced to the positions whose next token is a label *before* the vocabulary
        projection (transformers' ``logits_to_keep``), which gives the same loss.

        Nothing here waits for the device: with one example per row (no packing) each row has at most
        ``answer_width`` label positions, so they are picked with a fixed-size sort instead of a boolean mask
        (whose size the host would have to read), and the logged counters stay on the device until a log step.
        """
        mode = "train" if model.training else "eval"
        if self.loss_type == "yes_no":
            return self._yes_no_loss(model, inputs, mode, return_outputs, num_items_in_batch)
        labels = inputs["labels"]
        fwd = self.model_inputs(model, inputs)
        keep, _ = answer_positions(labels)
        next_labels = torch.nn.functional.pad(labels[:, 1:], (0, 1), value=-100)
        if self.answer_width and not (self.args.packing or self.args.padding_free):
            width = min(self.answer_width, labels.shape[1])
            rows = torch.argsort((~keep).to(torch.int8), dim=1, stable=True)[:, :width]  # label positions first
            outputs = model(**fwd, use_cache=False, logits_to_keep=rows)
            logits = outputs.logits.flatten(0, 1).float()
            targets = next_labels.gather(1, rows).flatten()  # -100 where a row has fewer labels
        else:  # packed rows hold several answers: a boolean mask (its size is read on the host)
            outputs = model(**fwd, use_cache=False, logits_to_keep=keep)
            logits = outputs.logits.float()
            targets = next_labels[keep]
        loss = torch.nn.functional.cross_entropy(logits, targets, ignore_index=-100, reduction="sum")
        valid = targets != -100
        count = num_items_in_batch if num_items_in_batch is not None else valid.sum()
        loss = loss / torch.as_tensor(count, device=loss.device).clamp(min=1)
        if self.args.average_tokens_across_devices and num_items_in_batch is not None:
            loss = loss * self.accelerator.num_processes
        self._count_tokens(mode, inputs, logits, targets, valid)
        return (loss, outputs) if return_outputs else loss

    def _yes_no_loss(self, model, inputs, mode: str, return_outputs: bool, num_items_in_batch=None):
        """Binary cross-entropy on logit(Yes) - logit(No) at the first position of every answer.

        The two logits are computed in float32 from the final (normed) hidden state and the two LM-head
        rows, so bf16 rounding of the full-vocabulary logits does not blur the margin.
        """
        labels = inputs["labels"]
        keep, starts = answer_positions(labels)
        fwd = self.model_inputs(model, inputs)
        with AnswerLogits(model, self.yes_id, self.no_id) as head:
            outputs = model(**fwd, use_cache=False, logits_to_keep=starts)  # the LM head only at answer starts
            pair = head.pair(outputs.logits[:, [self.yes_id, self.no_id]])  # float32, with gradients
        diff = self.answer_logit(model, inputs, pair[:, 0] - pair[:, 1])
        gold = labels[:, 1:][starts[:, :-1]]
        target = (gold == self.yes_id).float()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(diff, target, reduction="sum")
        count = torch.as_tensor(float(target.numel()), device=loss.device)
        if num_items_in_batch is not None:  # answers in the whole accumulated batch (same tokens per answer)
            count = num_items_in_batch * target.numel() / max(int(keep.sum()), 1)
        loss = loss / torch.as_tensor(count, device=loss.device).clamp(min=1)
        if self.args.average_tokens_across_devices and num_items_in_batch is not None:
            loss = loss * self.accelerator.num_processes
        agree = torch.stack([diff, torch.zeros_like(diff)], -1)  # argmax 0 = Yes: accuracy of the answers
        self._count_tokens(mode, inputs, agree, (gold != self.yes_id).long(), torch.ones_like(target, dtype=torch.bool))
        return (loss, outputs) if return_outputs else loss

    def _count_tokens(self, mode: str, inputs, logits, targets, valid) -> None:
        """Per micro-step counters, kept on the device; :meth:`log` gathers and averages them."""
        with torch.no_grad():
            correct = ((logits.argmax(-1) == targets) & valid).sum()
            pending = self.__dict__.setdefault("_pending", {"train": [], "eval": [], "tokens": []})
            pending[mode].append(torch.stack([correct, valid.sum()]))
            if mode == "train":
                mask = inputs.get("attention_mask")
                local = mask.sum() if mask is not None else torch.tensor(inputs["input_ids"].numel())
                pending["tokens"].append(local.to(logits.device))
                # answers (labels in the recommendation sense): one per example, several per session example
                pending.setdefault("answers", []).append(answer_positions(inputs["labels"])[1].sum().to(logits.device))

    def _flush_counters(self) -> None:
        """Move the device counters into TRL's ``_metrics`` (one gather per kind, at a log step only).

        Same numbers as gathering every micro-step: per micro-step accuracy = correct / label tokens summed over
        ranks, averaged by TRL's ``log``; ``num_tokens`` = non-pad tokens trained on so far, over all ranks.
        """
        pending = self.__dict__.get("_pending")
        if not pending:
            return
        for mode in ("train", "eval"):
            if pending[mode]:
                counts = self.accelerator.gather(torch.stack(pending[mode])[None]).sum(0).cpu()  # (steps, 2)
                accuracy = counts[:, 0] / counts[:, 1].clamp(min=1)  # float32, as a per-step .item() gave
                self._metrics[mode]["mean_token_accuracy"].extend(accuracy.tolist())
                pending[mode].clear()
        if pending["tokens"]:
            self._total_train_tokens += int(self.accelerator.gather(torch.stack(pending["tokens"]).sum()[None]).sum())
            pending["tokens"].clear()
            self._metrics["train"]["num_tokens"] = [self._total_train_tokens]
        if pending.get("answers"):
            total = int(self.accelerator.gather(torch.stack(pending["answers"]).sum()[None]).sum())
            self._total_train_answers = getattr(self, "_total_train_answers", 0) + total
            pending["answers"].clear()
            self._metrics["train"]["num_answers"] = [self._total_train_answers]

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        self._flush_counters()  # every rank calls log at the same steps, so the gathers line up
        super().log(logs, start_time)

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        inputs = self._prepare_inputs(inputs)
        labels = inputs["labels"]
        keep, starts = answer_positions(labels)
        fwd = self.model_inputs(model, inputs)
        with torch.no_grad(), self.compute_loss_context_manager(), \
                AnswerLogits(model, self.yes_id, self.no_id) as head:
            model_logits = model(**fwd, use_cache=False, logits_to_keep=keep).logits  # (N_label, V)
            pair = head.pair(model_logits[:, [self.yes_id, self.no_id]])  # float32 re-projection
        logits = model_logits.float()
        targets = labels[:, 1:][labels[:, 1:] != -100]
        first = starts[keep]  # which kept rows are the first token of an answer
        with torch.no_grad():
            diff = self.answer_logit(model, inputs, pair[first, 0] - pair[first, 1])
        if self.loss_type == "yes_no":
            loss = torch.nn.functional.binary_cross_entropy_with_logits(diff, (targets[first] == self.yes_id).float())
        else:
            loss = torch.nn.functional.cross_entropy(logits, targets, reduction="mean")
        if prediction_loss_only:
            return loss.detach(), None, None
        # argmax of the model's own logits (first maximum: what greedy decoding emits); Yes/No logits in float32.
        # The yes_no loss trains only the two logits, so its answer is the one P(Yes) gives; with a CF residual the
        # pair is (residual logit, 0)
        if self.loss_type == "yes_no" and "cf" not in inputs:
            top = torch.where(diff >= 0, float(self.yes_id), float(self.no_id))
            preds = torch.stack([top, pair[first, 0], pair[first, 1]], dim=-1)
        elif "cf" in inputs:
            top = torch.where(diff >= 0, float(self.yes_id), float(self.no_id))
            preds = torch.stack([top, diff.float(), torch.zeros_like(diff, dtype=torch.float32)], dim=-1)
        else:
            preds = torch.stack([logits[first].argmax(-1).float(), pair[first, 0], pair[first, 1]], dim=-1)
        return loss.detach(), *per_row(starts, preds, targets[first])


def per_row(starts: torch.Tensor, preds: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Answer predictions ``(N, 3)`` and targets ``(N,)`` regrouped as ``(B, A, 3)`` / ``(B, A)`` by batch row (-100
    where a row has fewer answers): the eval loop (accelerate's ``gather_for_metrics``) treats dim 0 as examples
    and cuts the last batch to the examples left, which would drop answers of rows holding several."""
    rows = starts.nonzero()[:, 0]  # the row of every answer, in the order of preds
    counts = torch.bincount(rows, minlength=starts.shape[0])
    slot = torch.arange(len(rows), device=rows.device) - (counts.cumsum(0) - counts)[rows]
    width = max(int(counts.max()) if len(rows) else 0, 1)
    out = preds.new_full((starts.shape[0], width, preds.shape[-1]), -100.0)
    out[rows, slot] = preds
    gold = targets.new_full((starts.shape[0], width), -100)
    gold[rows, slot] = targets
    return out, gold


def _has_blocks(*datasets) -> bool:
    return any(ds is not None and "block_ids" in getattr(ds, "column_names", ()) for ds in datasets)


def _pad_id(tokenizer) -> int:
    pad = getattr(tokenizer, "pad_token_id", None)
    return pad if pad is not None else getattr(tokenizer, "eos_token_id", 0)


class BlockCollator:
    """TRL's language-modeling collator plus the ``block_ids`` column of candidate-block rows (padded with -1)."""

    def __init__(self, pad_token_id: int):
        from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

        self.base = DataCollatorForLanguageModeling(pad_token_id=pad_token_id)

    def __call__(self, examples: list[dict]) -> dict:
        if "block_ids" not in examples[0]:
            return self.base(examples)
        batch = self.base([{k: v for k, v in e.items() if k not in ("block_ids", "cf")} for e in examples])
        width = batch["input_ids"].shape[1]
        blocks = pad_rows([e["block_ids"] for e in examples], -1)
        batch["block_ids"] = torch.nn.functional.pad(blocks, (0, width - blocks.shape[1]), value=-1)
        if "cf" in examples[0]:  # one CF logit per answer, NaN-padded
            cf = torch.full((len(examples), max(len(e["cf"]) for e in examples)), float("nan"))
            for i, e in enumerate(examples):
                cf[i, :len(e["cf"])] = torch.as_tensor(e["cf"], dtype=torch.float32)
            batch["cf"] = cf
        return batch


def residual_datasets(kind: str, train_path: str, train_ds, eval_ds, seed: int):
    """CF residual set-up, before the model loads: fit the CF model on the training split of ``train_path``'s data
    folder and add each answer's ``cf`` logit to the datasets (training rows: 5-fold out-of-fold logits).
    Returns ``(table, train_ds, eval_ds)``; :func:`build_trainer` adds the learned head to the model."""
    from .cf import cf_lookups
    from .config import ConfigError

    if "answer_keys" not in train_ds.column_names or (eval_ds is not None and "answer_keys" not in eval_ds.column_names):
        raise ConfigError([f"cf_residual: {kind} needs each answer's user and movie id: train and evaluate on "
                           f"candidate-block data (prepare_data.py --format blocks), or set cf_residual=none"])
    lookup, table = cf_lookups(Path(train_path).parent, kind, seed)
    logger.info("CF residual: %s fit on %s (%d training interactions, out-of-fold logits for training rows)",
                kind, Path(train_path).parent, len(lookup))

    def add(ds, oof: bool):
        def cf_of(batch):
            out = []
            for keys in batch["answer_keys"]:
                pairs = [tuple(json.loads(k)) for k in keys]
                full = table.logit([u for u, _ in pairs], [m for _, m in pairs])
                out.append([lookup.get(p, f) if oof else f for p, f in zip(pairs, full.tolist())])
            return {"cf": out}
        return None if ds is None else ds.map(cf_of, batched=True, desc="CF logits")

    return table, add(train_ds, True), add(eval_ds, False)


def check_blocks(cfg, train_ds, eval_ds):
    """The model settings to load with: candidate-block data cannot be packed and uses SDPA/eager attention."""
    import dataclasses

    from .config import ConfigError
    from .modeling import attention_for_blocks

    if not _has_blocks(train_ds, eval_ds):
        return cfg.model
    if cfg.train.packing:
        raise ConfigError(["packing: true cannot be used with candidate-block data (each row already holds many "
                           "answers on one shared history); set packing=false"])
    return dataclasses.replace(cfg.model, flash_attn=attention_for_blocks(cfg.model.flash_attn))


def max_label_tokens(dataset) -> int:
    """The most label tokens in one row of a tokenized dataset (3 for a single question, ~48 for a session)."""
    col = dataset.data.column("labels").combine_chunks() if dataset is not None and len(dataset) else None
    if col is None:
        return 0
    values = np.asarray(col.flatten()) != -100
    offsets = np.asarray(col.offsets)
    counts = np.add.reduceat(np.concatenate([values, [False]]).astype(np.int64), offsets[:-1])
    counts[offsets[:-1] == offsets[1:]] = 0
    return int(counts.max())


def eval_users(data) -> list | None:
    """:func:`answer_user_ids` of the eval records used during training (the first ``max_eval_samples``)."""
    from .formatting import resolve_dataset
    from .io import load_data

    if not data.eval_dataset:
        return None
    records = load_data(resolve_dataset(data.eval_dataset, data.dataset_dir))
    return answer_user_ids(records[:data.max_eval_samples] if data.max_eval_samples else records)


def answer_user_ids(records: list[dict]) -> list | None:
    """The user id of every answer of ``records`` in evaluation order (one per session turn or block), or None
    when some record has no ``user_id`` (the single format's training files do not keep it)."""
    if not records or not all(isinstance(r, dict) and "user_id" in r for r in records):
        return None
    return [r["user_id"] for r in records for _ in (r.get("turns") or r.get("blocks") or [None])]


def make_compute_metrics(tokenizer, user_ids: list | None = None):
    """``compute_metrics`` for the Trainer: decode the answer-position argmax with the shared extractor.

    ``user_ids``: one per eval answer, in order (:func:`answer_user_ids`) -> adds ``uauc``.
    """

    def _compute(eval_pred) -> dict[str, float]:
        preds, label_ids = eval_pred.predictions, eval_pred.label_ids
        preds = np.asarray(preds).reshape(-1, 3)
        label_ids = np.asarray(label_ids).reshape(-1)
        valid = label_ids != -100
        preds, label_ids = preds[valid], label_ids[valid]
        pred_text = [extract_answer(tokenizer.decode([int(i)])) for i in preds[:, 0]]
        gold = [extract_answer(tokenizer.decode([int(i)])) for i in label_ids]
        gap = preds[:, 1].astype(np.float64) - preds[:, 2].astype(np.float64)
        p_yes = 1.0 / (1.0 + np.exp(-gap))  # float64: float32 saturates at 1.0 past a gap of ~17
        users = user_ids if user_ids is not None and len(user_ids) == len(gold) else None
        m = compute_metrics(gold, pred_text, p_yes.tolist(), users)
        keys = ("accuracy", "f1", "precision", "recall", "auc", "uauc", "unparseable", "n")
        return {k: m[k] for k in keys if k in m}

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

    ``pkill -f finetune_lora.py`` sends SIGTERM. Under torchrun / ``accelerate launch`` each worker gets a Ctrl-C
    twice (from the terminal and forwarded by the launcher, which SIGKILLs it 30 s later): a repeat within
    ``REPEAT_WINDOW_S`` is that copy and is ignored; a later one falls through to the default handler (stop now).
    Under DDP the ranks agree at every step end (an all-reduce of the flag), so all save the same step.
    """

    REPEAT_WINDOW_S = 5.0

    def __init__(self):
        self.requested: str | None = None
        self._first_at = 0.0
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

    __enter__ = install  # `with stopper:` handles the signals for the duration of training

    def __exit__(self, *exc):
        self.uninstall()

    def _handle(self, signum, frame):
        now = time.monotonic()
        if self.requested:
            if now - self._first_at < self.REPEAT_WINDOW_S:
                return  # the same request, delivered twice (terminal + launcher)
            self.uninstall()
            signal.raise_signal(signum)
            return
        self.requested, self._first_at = signal.Signals(signum).name, now
        print(f"Received {self.requested}: saving a checkpoint after this step, then stopping "
              f"(send it again after {self.REPEAT_WINDOW_S:.0f} s to stop at once)", flush=True)

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


class TimeBudgetCallback(TrainerCallback, ExportableState):
    """Stops training (with a final eval and checkpoint) once the optimizer steps used ``minutes``.

    Only the time between step begin and step end counts, so evaluation and checkpoint saving do not eat the
    budget; ``clock="cpu"`` counts this process's CPU time, a fair budget on a machine shared with other jobs.
    The time used is saved in every checkpoint (``trainer_state.json``, ``stateful_callbacks``) and
    :func:`restore_progress` reads it back on resume, so a resumed run spends only what is left.
    """

    def __init__(self, minutes: float, clock: str = "wall"):
        self.limit_s = minutes * 60.0
        self.clock = clock
        self.now = time.process_time if clock == "cpu" else time.perf_counter
        self.used_s = 0.0
        self._t0: float | None = None

    def state(self) -> dict:
        return {"args": {"minutes": self.limit_s / 60, "clock": self.clock}, "attributes": {"used_s": self.used_s}}

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
def restore_progress(trainer, checkpoint: str | None) -> None:
    """On resume, carry over what TRL/Trainer start from zero: the time budget used and the token/answer counts."""
    state = _read_state(Path(checkpoint) / "trainer_state.json") if checkpoint else None
    if state is None:
        return
    history = state.get("log_history", [])
    for key, attr in (("num_tokens", "_total_train_tokens"), ("num_answers", "_total_train_answers")):
        last = next((e[key] for e in reversed(history) if key in e), None)
        if last is not None:
            setattr(trainer, attr, int(last))
    if trainer.time_budget is not None:
        _restore_budget(trainer.time_budget, state, Path(checkpoint).name)


def _restore_budget(budget: TimeBudgetCallback, state: dict, name: str) -> None:
    """Count the training time the checkpoint already used against the (current) budget."""
    saved = state.get("stateful_callbacks", {}).get("TimeBudgetCallback")
    saved = saved[0] if isinstance(saved, list) and saved else saved
    if not isinstance(saved, dict):
        logger.info("%s holds no training-time record: the time budget starts from zero", name)
        return
    if saved.get("args", {}).get("clock", budget.clock) != budget.clock:
        logger.info("%s counted %s time, this run counts %s time: the time budget starts from zero",
                    name, saved["args"]["clock"], budget.clock)
        return
    budget.used_s = float(saved.get("attributes", {}).get("used_s", 0.0))
    logger.info("Time budget: %.1f of %.1f min already used by %s", budget.used_s / 60, budget.limit_s / 60, name)


def checkpoint_info(checkpoint: str) -> dict[str, Any]:
    """Step and epoch of a checkpoint, from its ``trainer_state.json``."""
    from .io import DataError

    state_file = Path(checkpoint) / "trainer_state.json"
    if not state_file.is_file():
        raise DataError(f"{checkpoint}: no trainer_state.json; not a Trainer checkpoint folder")
    state = _read_state(state_file)
    if state is None:
        raise DataError(f"{state_file}: truncated or corrupt; resume from another checkpoint (or --resume, which "
                        f"skips it)")
    return {"checkpoint": Path(checkpoint).name, "step": int(state.get("global_step", 0)),
            "epoch": float(state.get("epoch") or 0.0), "max_steps": int(state.get("max_steps") or 0)}


def _read_state(state_file: Path) -> dict | None:
    try:
        state = json.loads(state_file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return None
    return state if isinstance(state, dict) and isinstance(state.get("global_step"), int) else None


WEIGHT_FILES = ("adapter_model.safetensors", "adapter_model.bin", "model.safetensors", "pytorch_model.bin")


def checkpoint_problem(ckpt: Path) -> str | None:
    """Why a checkpoint folder cannot be resumed from (None when it is complete)."""
    if _read_state(ckpt / "trainer_state.json") is None:
        return "trainer_state.json is missing, truncated or corrupt"
    if not any((ckpt / w).is_file() and (ckpt / w).stat().st_size > 0 for w in WEIGHT_FILES):
        return "it has no weights (adapter_model.safetensors)"
    return None


def resume_banner(info: dict[str, Any]) -> str:
    bar = "=" * 80
    return "\n".join([bar, "RESUMING TRAINING FROM CHECKPOINT", bar, f"Checkpoint: {info['checkpoint']}",
                      f"Last completed step: {info['step']}", f"Next step will be: {info['step'] + 1}",
                      f"Epoch: {info['epoch']:.2f}", bar])


def latest_checkpoint(output_dir: str) -> str | None:
    """Newest complete ``checkpoint-N`` in ``output_dir``; newer incomplete ones are skipped with a log line.

    Complete: a readable ``trainer_state.json`` and non-empty weights (a run killed while saving leaves neither).
    """
    out = Path(output_dir)
    if not out.is_dir():
        return None
    ckpts = sorted((p for p in out.glob("checkpoint-*") if p.name.split("-")[-1].isdigit() and p.is_dir()),
                   key=lambda p: int(p.name.split("-")[-1]), reverse=True)
    for ckpt in ckpts:
        problem = checkpoint_problem(ckpt)
        if problem is None:
            return str(ckpt)
        logger.warning("Skipping incomplete checkpoint %s: %s; trying an older one", ckpt, problem)
    return None


def check_resume_lora(ckpt: str, lora, layer_names: list[str]) -> None:
    """The checkpoint's LoRA rank and target layers must be the config's (else the weights cannot load)."""
    from .config import ConfigError
    from .modeling import lora_target_modules

    cfg_file = Path(ckpt) / "adapter_config.json"
    try:
        saved = json.loads(cfg_file.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return  # not a peft checkpoint: the Trainer reports what it finds
    targets = lora_target_modules(lora.lora_target)
    leaves = {n.rsplit(".", 1)[-1] for n in layer_names}
    wanted = leaves if isinstance(targets, str) else set(targets)
    got = saved.get("target_modules")
    got = {got} if isinstance(got, str) else {t.rsplit(".", 1)[-1] for t in got or []}  # peft saves full names
    if saved.get("r") != lora.lora_rank or (got and got != wanted and got != {"all-linear"}):
        raise ConfigError([f"--resume: checkpoint {ckpt} has LoRA r={saved.get('r')} on {sorted(got)}, the config "
                           f"asks r={lora.lora_rank} on {sorted(wanted)}; restore lora_rank/lora_target, or "
                           f"start fresh in another output_dir"])


def finished_run(train, extra_epochs: float) -> dict | None:
    """The summary of a finished run in ``output_dir`` that ``--resume`` would only repeat (else None).

    Finished: ``training_summary.json`` and the final adapter exist, no extra epochs are asked, and the
    config's target (max_steps, or num_train_epochs) was reached. Resuming it would train past its end or
    overwrite the final (best) adapter with the last checkpoint, so the run is left as it is.
    """
    out = Path(train.output_dir)
    summary_file = out / "training_summary.json"
    if extra_epochs or not summary_file.is_file() or not (out / "adapter_model.safetensors").is_file():
        return None
    try:
        summary = json.loads(summary_file.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    old = summary.get("config") if isinstance(summary, dict) else None
    if not isinstance(old, dict):
        return None
    same_target = old.get("max_steps") == train.max_steps and old.get("num_train_epochs") == train.num_train_epochs
    done = same_target or (train.max_steps > 0 and int(summary.get("global_step") or 0) >= train.max_steps)
    return summary if done else None


def find_resume_checkpoint(output_dir: str, resume: bool, explicit: str | None) -> str | None:
    """The checkpoint to resume from (printing the RESUMING banner), or None to start fresh."""
    if explicit:
        if not Path(explicit).is_dir():
            from .io import DataError

            raise DataError(f"--resume_from_checkpoint {explicit!r}: folder does not exist; use --resume to pick "
                            f"the newest checkpoint in output_dir")
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


# ---------------------------------------------------------------------------------------------- trainer
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


def sft_config(train, cutoff_len: int, device: str, has_eval: bool, extra_epochs: float = 0.0, **extra):
    """SFTConfig from the ``train`` section: every knob set explicitly (TRL defaults differ from ours).

    ``extra``: further SFTConfig arguments (e.g. ``torch_compile=True``); they must be given here, at
    construction, since SFTConfig derives settings from them (setting ``torch_compile`` afterwards compiles nothing).
    """
    from trl import SFTConfig

    # warmup_steps=warmup_ratio: transformers reads a warmup_steps below 1 as a fraction of the total steps
    # (TrainingArgs.get_warmup_steps); config.py keeps warmup_ratio in [0, 1) so it always is one.
    precision = mixed_precision(train.bf16, device)
    eval_strategy = train.eval_strategy if has_eval else "no"
    kwargs = dict(
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
        # activation_checkpointing is the transformers-5 name; gradient_checkpointing is its deprecated alias
        activation_checkpointing=train.gradient_checkpointing, gradient_checkpointing=None,
        packing=train.packing, packing_strategy="bfd",
        eval_packing=False, max_length=cutoff_len, seed=train.seed, data_seed=train.seed, **precision,
        # report_to="none": TensorBoard is added by build_trainer (rank 0 only, logs/ under output_dir)
        report_to="none", dataloader_num_workers=train.dataloader_num_workers,
        # the datasets are already tokenized and cut (preprocess.py); TRL prepares them only to pack them
        dataset_kwargs={"skip_prepare_dataset": not train.packing}, use_cpu=device == "cpu",
        ddp_find_unused_parameters=False, disable_tqdm=False,
    )
    return SFTConfig(**(kwargs | extra))


def build_trainer(model, tokenizer, train_ds, eval_ds, cfg, device: str, extra_epochs: float = 0.0, cf_table=None):
    """The trainer with our eval step, metrics and callbacks; returns ``(trainer, graceful_stop_callback)``."""
    from transformers import EarlyStoppingCallback
    from transformers.integrations import TensorBoardCallback

    from .inference import answer_token_ids
    from .preprocess import prompt_budget

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
    if cf_table is not None:  # the residual's learned a and b, trained with the LoRA weights
        from .cf import ResidualHead

        model.cf_head = ResidualHead().to(next(model.parameters()).device)
    trainer = RecSFTTrainer(model=model, args=args, train_dataset=train_ds, eval_dataset=eval_ds, cf_table=cf_table,
                            processing_class=tokenizer, compute_metrics=make_compute_metrics(tokenizer, eval_users(cfg.data)),
                            callbacks=callbacks)
    trainer.yes_id, trainer.no_id = answer_token_ids(tokenizer)
    trainer.loss_type = train.loss_type
    width = cfg.data.cutoff_len - prompt_budget(tokenizer, cfg.data.cutoff_len, cfg.model.enable_thinking)
    trainer.answer_width = max(width, max_label_tokens(train_ds))  # a session row holds many answers
    trainer.time_budget = budget
    if args.world_size > 1:
        logger.info("Distributed training: %d processes (%s); this is rank %d", args.world_size,
                    args.parallel_mode, args.process_index)
    return trainer, stopper


def stopped_early(trainer, signal_name: str) -> dict:
    out = trainer.args.output_dir
    ckpt = latest_checkpoint(out)
    print(f"Training stopped by {signal_name} at step {trainer.state.global_step}; checkpoint saved: {ckpt}. "
          f"Continue with --resume.", flush=True)
    return {"stopped_by": signal_name, "global_step": trainer.state.global_step, "checkpoint": ckpt}
