"""The step timer of bench_train.py, in its own module so that importing bench_train (as the tests do when
they collect) does not import transformers; it is imported when a benchmark trains."""

from __future__ import annotations

import time

from transformers import TrainerCallback


class StepTimer(TrainerCallback):
    """Wall time and trained tokens at the start of training and at the end of every optimizer step
    (CUDA synchronized), in ``marks``; set ``trainer`` before training."""

    def __init__(self, device: str):
        self.device, self.trainer, self.marks = device, None, []

    def _mark(self):
        import torch

        if self.device == "cuda":
            torch.cuda.synchronize()
        trainer = self.trainer  # ours counts in train_tokens, stock TRL in its own _total_train_tokens
        tokens = trainer.train_tokens if hasattr(trainer, "train_tokens") else trainer._total_train_tokens
        self.marks.append((time.perf_counter(), int(tokens)))

    def on_train_begin(self, args, state, control, **kwargs):
        self._mark()

    def on_step_end(self, args, state, control, **kwargs):
        self._mark()
