"""The trainer: its arguments (:class:`RecSFTConfig`), the collator that keeps extra columns, the answer-position
loss, the eval step and the eval metrics.

Everything the trainer needs is given at construction: ``RecSFTTrainer(model=..., args=RecSFTConfig(...),
train_dataset=..., processing_class=tokenizer)``. The Yes/No token ids come from the tokenizer; the loss, the
answer width and the time budget from the arguments. Training (``recsft.training.build_trainer``), the
benchmarks and the tests build it the same way.

To change the loss, edit :meth:`RecSFTTrainer.compute_loss` (``nll``) or :meth:`RecSFTTrainer._yes_no_loss`.
A new column that travels with the tokenized rows goes in ``EXTRA_COLUMNS``; if the model needs something
built from it (a mask, positions), :meth:`RecSFTTrainer.model_inputs` is the one place that builds the model's
inputs for the loss and the eval step.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from trl import SFTConfig, SFTTrainer
from trl.trainer.sft_trainer import DataCollatorForLanguageModeling
from trl.trainer.utils import pad

from .callbacks import TimeBudgetCallback, TrainCounters
from .config import LOSS_TYPES
from .inference import AnswerLogits, answer_token_ids, block_attention, mask_dtype
from .metrics import compute_metrics, extract_answer, p_yes_from_logits
from .preprocess import IGNORE_INDEX, NO_USER, answer_positions

logger = logging.getLogger(__name__)

# Columns of a tokenized dataset that travel with its rows but are not model inputs: the trainer keeps them
# (TRL would drop every column but input_ids/labels/seq_lengths), the collator batches them, and
# model_inputs() leaves them out of the forward call.
EXTRA_COLUMNS = ("user_id", "block_ids", "cf")  # cf: the CF residual's logit per answer (training.residual_datasets)


@dataclass
class RecSFTConfig(SFTConfig):
    """TRL's ``SFTConfig`` plus what the Yes/No trainer needs, so a trainer is fully set up by its arguments."""

    answer_loss: str = field(default="nll", metadata={
        "help": "nll: token cross-entropy on the answer tokens; yes_no: binary cross-entropy on "
                "logit(Yes) - logit(No) at each answer's first position (the config's loss_type)."})
    answer_width: int | None = field(default=None, metadata={
        "help": "label tokens kept per row by the fixed-size (sync-free) loss path; None = the most label tokens "
                "in one training row; 0 = a boolean mask (the host reads its size)."})
    max_train_minutes: float | None = field(default=None, metadata={
        "help": "stop (evaluate + save) once the optimizer steps used this many minutes; None = no budget."})
    budget_clock: str = field(default="wall", metadata={"help": "wall (elapsed) or cpu (this process's CPU time)."})
    cf_head_lr: float = field(default=1e-2, metadata={
        "help": "learning rate of a CF residual's two scalars (model.cf_head), in their own optimizer group."})

    def __post_init__(self):
        super().__post_init__()
        if self.answer_loss not in LOSS_TYPES:
            raise ValueError(f"answer_loss: {self.answer_loss!r} is not one of {', '.join(LOSS_TYPES)}")
        if self.budget_clock not in ("wall", "cpu"):
            raise ValueError(f"budget_clock: must be wall or cpu, got {self.budget_clock!r}")


@dataclass
class RecDataCollator(DataCollatorForLanguageModeling):
    """TRL's collator, plus the :data:`EXTRA_COLUMNS` of a row (other columns are dropped, as the Trainer drops
    them): per-token lists are padded like ``input_ids`` (with
    ``extra_pad_value``), per-row values are stacked into a ``(B,)`` tensor. With ``padding_free`` every extra
    column becomes per-token on the one flattened row (a per-row value is repeated over its row's tokens)."""

    extra_pad_value: int = -1

    def torch_call(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        extra = [k for k in examples[0] if k in EXTRA_COLUMNS]
        base = ("input_ids", "labels", "seq_lengths")
        if not extra:
            return super().torch_call([{k: v for k, v in ex.items() if k in base} for ex in examples])
        out = super().torch_call([{k: v for k, v in ex.items() if k in base} for ex in examples])
        lengths = [len(ex["input_ids"]) for ex in examples]
        for key in extra:
            values = [torch.as_tensor(ex[key]) for ex in examples]
            if values[0].dim() == 0 and not self.padding_free:
                out[key] = torch.stack(values)
                continue
            seqs = [v.expand(n) if v.dim() == 0 else v for v, n in zip(values, lengths)]
            if self.padding_free:
                seqs = [torch.cat(seqs)]
            fill = float("nan") if seqs[0].is_floating_point() else self.extra_pad_value  # float lists: NaN
            multiple = self.pad_to_multiple_of if key != "cf" else None  # cf is per answer, not per token
            out[key] = pad(seqs, padding_value=fill, padding_side="right", pad_to_multiple_of=multiple)
        return out


def per_token(column: torch.Tensor | None, labels: torch.Tensor, fill: int) -> torch.Tensor:
    """A batch column as ``labels``' shape: a per-row ``(B,)`` value repeated over the row, ``fill`` when absent."""
    if column is None:
        return torch.full_like(labels, fill)
    return column[:, None].expand_as(labels) if column.dim() == 1 else column


class RecSFTTrainer(SFTTrainer):
    """SFTTrainer with the answer-position loss, an eval step that projects the LM head only at answer positions,
    and device-side counters.

    The eval step returns, per answer, ``[argmax token id, logit(Yes), logit(No)]`` at the answer position instead
    of full-vocabulary logits (eval memory O(batch), not O(batch x seq x vocab)), and as its labels
    ``[gold token id, user id]``, so the metrics decode exactly the token the model would generate first and
    UAUC groups answers by the users that travel with the rows.
    """

    extra_columns: tuple[str, ...] = EXTRA_COLUMNS

    def __init__(self, model, args: RecSFTConfig, *, processing_class, callbacks=None, cf_table=None,
                 cf_tokens=None, **kwargs):
        if not isinstance(args, RecSFTConfig):
            raise TypeError(f"RecSFTTrainer needs RecSFTConfig arguments, got {type(args).__name__}")
        self.cf_table = cf_table  # CF residual (recsft.cf.CFTable): saved with every checkpoint beside model.cf_head
        self.cf_tokens = cf_tokens  # soft CF tokens (recsft.cf.TokenIds): table + mapping network in every checkpoint
        self.counters = TrainCounters()
        self.time_budget = (TimeBudgetCallback(args.max_train_minutes, args.budget_clock)
                            if args.max_train_minutes else None)
        callbacks = [*(callbacks or []), self.counters] + ([self.time_budget] if self.time_budget else [])
        super().__init__(model=model, args=args, processing_class=processing_class, callbacks=callbacks, **kwargs)
        if type(self.data_collator) is DataCollatorForLanguageModeling:  # TRL's own: the same, keeping extra columns
            c = self.data_collator
            self.data_collator = RecDataCollator(**{f.name: getattr(c, f.name) for f in dataclasses.fields(c)})
        self.yes_id, self.no_id = answer_token_ids(processing_class)
        self.answer_width = args.answer_width if args.answer_width is not None else max_label_tokens(self.train_dataset)
        self._pending: dict[str, list] = {"train": [], "eval": [], "tokens": [], "answers": []}
        from .modeling import keep_trainable_fp32

        # TRL casts a quantized model's LoRA weights to bf16 above; the optimizer (built in train()) must see fp32
        cast = keep_trainable_fp32(self.model)
        if cast:
            logger.info("LoRA weights kept in float32 for the optimizer (%d tensors cast back)", cast)

    # ------------------------------------------------------------------------------------ inputs
    @property
    def train_tokens(self) -> int:
        """Non-pad tokens trained on so far over all ranks (up to the last log or save step)."""
        return self.counters.tokens

    @property
    def train_answers(self) -> int:
        """Answers trained on so far over all ranks (one per single question, one per turn of a session)."""
        return self.counters.answers

    def _set_signature_columns_if_needed(self):
        super()._set_signature_columns_if_needed()  # TRL: input_ids, labels, seq_lengths
        self._signature_columns = list(dict.fromkeys([*self._signature_columns, *self.extra_columns]))

    def model_inputs(self, inputs: dict[str, Any]) -> dict[str, Any]:
        """What the model's forward gets from a batch: everything but the labels and the extra columns; candidate-block
        rows (``block_ids``) get their block attention mask and position ids (:func:`recsft.inference.block_attention`)."""
        fwd = {k: v for k, v in inputs.items() if k != "labels" and k not in self.extra_columns}
        if "block_ids" in inputs:
            fwd.pop("position_ids", None)
            fwd["attention_mask"], fwd["position_ids"] = block_attention(inputs["block_ids"], mask_dtype(self.model))
        return fwd

    def answer_logit(self, model, inputs: dict, margin: torch.Tensor) -> torch.Tensor:
        """The logit P(Yes) is scored from: the LLM's margin logit(Yes) - logit(No), or with a CF residual
        ``c + a * margin + b`` (``inputs["cf"]``: c per answer, row-major, NaN-padded; ``model.cf_head``: a, b)."""
        if "cf" not in inputs:
            return margin
        cf = inputs["cf"][~torch.isnan(inputs["cf"])]
        if cf.numel() != margin.numel():
            raise RuntimeError(f"{cf.numel()} CF logits for {margin.numel()} answers in a batch")
        return getattr(model, "module", model).cf_head(cf.to(margin.device), margin)

    # ------------------------------------------------------------------------- CF residual head
    def create_optimizer(self, model=None):
        """The Trainer's optimizer, with a CF residual's two scalars in a group of their own (``cf_head_lr``)."""
        optimizer = super().create_optimizer(model)
        head = getattr(getattr(self.model, "module", self.model), "cf_head", None)
        if head is not None:
            own = {id(p) for p in head.parameters()}
            for group in optimizer.param_groups:
                group["params"] = [p for p in group["params"] if id(p) not in own]
            optimizer.add_param_group({"params": list(head.parameters()), "lr": self.args.cf_head_lr,
                                       "weight_decay": 0.0})
        return optimizer

    def _save(self, output_dir: str | None = None, state_dict=None):
        super()._save(output_dir, state_dict)
        if self.cf_table is not None:  # the residual travels with every checkpoint and the final adapter
            output_dir = output_dir or self.args.output_dir
            self.cf_table.save(output_dir)
            getattr(self.model, "module", self.model).cf_head.save(output_dir)
        if self.cf_tokens is not None:
            from .cf import TOKENS_TABLE

            output_dir = output_dir or self.args.output_dir
            self.cf_tokens.table.save(output_dir, stem=TOKENS_TABLE)
            getattr(self.model, "module", self.model).get_input_embeddings().save(output_dir)

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        super()._load_from_checkpoint(resume_from_checkpoint, model)
        self._load_head(resume_from_checkpoint)

    def _load_best_model(self):
        super()._load_best_model()
        self._load_head(self.state.best_model_checkpoint)

    def _load_head(self, folder) -> None:
        fix = "resume from another checkpoint or start fresh in a new output_dir"
        if self.cf_tokens is not None and folder:
            getattr(self.model, "module", self.model).get_input_embeddings().load_mlp(folder, fix)
        if self.cf_table is None or not folder:
            return
        from .cf import ResidualHead

        saved = ResidualHead.load(folder, fix=fix)
        head = getattr(self.model, "module", self.model).cf_head
        with torch.no_grad():
            head.a.copy_(saved.a)
            head.b.copy_(saved.b)

    # -------------------------------------------------------------------------------------- loss
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
        if self.args.answer_loss == "yes_no":
            return self._yes_no_loss(model, inputs, mode, return_outputs, num_items_in_batch)
        labels = inputs["labels"]
        fwd = self.model_inputs(inputs)
        keep, _ = answer_positions(labels)
        next_labels = torch.nn.functional.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)
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
        loss = torch.nn.functional.cross_entropy(logits, targets, ignore_index=IGNORE_INDEX, reduction="sum")
        valid = targets != IGNORE_INDEX
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
        with AnswerLogits(model, self.yes_id, self.no_id) as head:
            # the LM head only at answer starts
            outputs = model(**self.model_inputs(inputs), use_cache=False, logits_to_keep=starts)
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

    # ---------------------------------------------------------------------------------- counters
    def _count_tokens(self, mode: str, inputs, logits, targets, valid) -> None:
        """Per micro-step counters, kept on the device; :meth:`log` gathers and averages them."""
        with torch.no_grad():
            correct = ((logits.argmax(-1) == targets) & valid).sum()
            self._pending[mode].append(torch.stack([correct, valid.sum()]))
            if mode == "train":
                mask = inputs.get("attention_mask")
                local = mask.sum() if mask is not None else torch.tensor(inputs["input_ids"].numel())
                self._pending["tokens"].append(local.to(logits.device))
                # answers (labels in the recommendation sense): one per example, several per session example
                self._pending["answers"].append(answer_positions(inputs["labels"])[1].sum().to(logits.device))

    def _flush_counters(self) -> None:
        """Move the device counters into TRL's ``_metrics`` and :attr:`counters` (one gather per kind).

        Same numbers as gathering every micro-step: per micro-step accuracy = correct / label tokens summed over
        ranks, averaged by TRL's ``log``; ``num_tokens`` = non-pad tokens trained on so far, over all ranks.
        """
        pending = self._pending
        for mode in ("train", "eval"):
            if pending[mode]:
                counts = self.accelerator.gather(torch.stack(pending[mode])[None]).sum(0).cpu()  # (steps, 2)
                accuracy = counts[:, 0] / counts[:, 1].clamp(min=1)  # float32, as a per-step .item() gave
                self._metrics[mode]["mean_token_accuracy"].extend(accuracy.tolist())
                pending[mode].clear()
        if pending["tokens"]:
            self.counters.tokens += int(self.accelerator.gather(torch.stack(pending["tokens"]).sum()[None]).sum())
            pending["tokens"].clear()
            self._metrics["train"]["num_tokens"] = [self.counters.tokens]
        if pending["answers"]:
            self.counters.answers += int(self.accelerator.gather(torch.stack(pending["answers"]).sum()[None]).sum())
            pending["answers"].clear()
            self._metrics["train"]["num_answers"] = [self.counters.answers]

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        self._flush_counters()  # every rank calls log at the same steps, so the gathers line up
        super().log(logs, start_time)

    def _save_checkpoint(self, model, trial):
        self._flush_counters()  # the checkpoint saves the counts up to its step (every rank saves, so gathers line up)
        super()._save_checkpoint(model, trial)

    # --------------------------------------------------------------------------------- eval step
    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        inputs = self._prepare_inputs(inputs)
        labels = inputs["labels"]
        keep, starts = answer_positions(labels)
        with torch.no_grad(), self.compute_loss_context_manager(), \
                AnswerLogits(model, self.yes_id, self.no_id) as head:
            model_logits = model(**self.model_inputs(inputs), use_cache=False, logits_to_keep=keep).logits  # (N, V)
            pair = head.pair(model_logits[:, [self.yes_id, self.no_id]])  # float32 re-projection
        logits = model_logits.float()
        targets = labels[:, 1:][labels[:, 1:] != IGNORE_INDEX]
        first = starts[keep]  # which kept rows are the first token of an answer
        with torch.no_grad():
            diff = self.answer_logit(model, inputs, pair[first, 0] - pair[first, 1])
        if self.args.answer_loss == "yes_no":
            loss = torch.nn.functional.binary_cross_entropy_with_logits(diff, (targets[first] == self.yes_id).float())
        else:
            loss = torch.nn.functional.cross_entropy(logits, targets, reduction="mean")
        if prediction_loss_only:
            return loss.detach(), None, None
        # argmax of the model's own logits (first maximum: what greedy decoding emits); Yes/No logits in float32.
        # The yes_no loss trains only the two logits, so its answer is the one P(Yes) gives; with a CF residual the
        # pair is (residual logit, 0)
        answer = torch.where(diff >= 0, float(self.yes_id), float(self.no_id))
        if "cf" in inputs:
            preds = torch.stack([answer, diff.float(), torch.zeros_like(diff, dtype=torch.float32)], dim=-1)
        else:
            top = answer if self.args.answer_loss == "yes_no" else logits[first].argmax(-1).float()
            preds = torch.stack([top, pair[first, 0], pair[first, 1]], dim=-1)
        users = per_token(inputs.get("user_id"), labels, NO_USER)[keep][first]
        gold = torch.stack([targets[first], users.to(targets.dtype)], dim=-1)
        return loss.detach(), per_row(starts, preds), per_row(starts, gold)


def per_row(starts: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """Per-answer ``values`` ``(N, ...)`` regrouped as ``(B, A, ...)`` by batch row, -100 where a row has fewer
    answers: the eval loop (accelerate's ``gather_for_metrics``) treats dim 0 as examples and cuts the last batch to
    the examples left, which would drop answers of rows holding several (sessions, candidate blocks)."""
    rows = starts.nonzero()[:, 0]  # the row of every answer, in the order of values
    counts = torch.bincount(rows, minlength=starts.shape[0])
    slot = torch.arange(len(rows), device=rows.device) - (counts.cumsum(0) - counts)[rows]
    width = max(int(counts.max()) if len(rows) else 0, 1)
    out = values.new_full((starts.shape[0], width, *values.shape[1:]), IGNORE_INDEX)
    out[rows, slot] = values
    return out


def max_label_tokens(dataset) -> int:
    """The most label tokens in one row of a tokenized dataset (3 for a single question, ~48 for a session);
    0 for a dataset it cannot read column-wise (a streaming one)."""
    data = getattr(dataset, "data", None)
    if data is None or not len(dataset) or "labels" not in dataset.column_names:
        return 0
    col = data.column("labels").combine_chunks()
    values = np.asarray(col.flatten()) != IGNORE_INDEX
    offsets = np.asarray(col.offsets)
    counts = np.add.reduceat(np.concatenate([values, [False]]).astype(np.int64), offsets[:-1])
    counts[offsets[:-1] == offsets[1:]] = 0
    return int(counts.max())


def make_compute_metrics(tokenizer):
    """``compute_metrics`` for the Trainer: decode the answer-position argmax with the shared extractor.

    The eval step's labels are ``[gold token id, user id]`` per answer; with a user id on every answer the
    metrics add ``uauc`` and ``uauc_users``.
    """

    def _compute(eval_pred) -> dict[str, float]:
        preds = np.asarray(eval_pred.predictions).reshape(-1, 3)
        label_ids = np.asarray(eval_pred.label_ids).reshape(-1, 2)
        valid = label_ids[:, 0] != IGNORE_INDEX
        preds, label_ids = preds[valid], label_ids[valid]
        pred_text = [extract_answer(tokenizer.decode([int(i)])) for i in preds[:, 0]]
        gold = [extract_answer(tokenizer.decode([int(i)])) for i in label_ids[:, 0]]
        p_yes = p_yes_from_logits(preds[:, 1], preds[:, 2])
        users = label_ids[:, 1].tolist() if len(label_ids) and (label_ids[:, 1] != NO_USER).all() else None
        m = compute_metrics(gold, pred_text, p_yes.tolist(), users)
        keys = ("accuracy", "f1", "precision", "recall", "auc", "uauc", "uauc_users", "unparseable", "n")
        return {k: m[k] for k in keys if k in m}

    return _compute
