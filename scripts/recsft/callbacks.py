"""Trainer callbacks: readable log lines, a graceful stop on SIGTERM/SIGINT, the training-time budget and the
trained-token/answer counters (the last two are saved in every checkpoint and read back by ``recsft.resume``)."""

from __future__ import annotations

import logging
import signal
import time
from typing import Any

import torch
from transformers import TrainerCallback
from transformers.trainer_callback import ExportableState

logger = logging.getLogger(__name__)


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
    :func:`recsft.resume.restore_progress` reads it back on resume, so a resumed run spends only what is left.
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


class TrainCounters(TrainerCallback, ExportableState):
    """Non-pad tokens and answers trained on so far, over all ranks (the trainer adds to them at log and save
    steps). Saved in every checkpoint's ``trainer_state.json`` (``stateful_callbacks``) so a resumed run continues
    the counts instead of restarting at zero (:func:`recsft.resume.restore_progress`)."""

    def __init__(self):
        self.tokens = 0
        self.answers = 0

    def state(self) -> dict:
        return {"args": {}, "attributes": {"tokens": self.tokens, "answers": self.answers}}
