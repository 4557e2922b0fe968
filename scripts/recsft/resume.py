"""Every checkpoint and resume rule in one place: which checkpoint a run resumes from (``--resume`` /
``--resume_from_checkpoint``), whether it can be resumed, what a resumed run carries over, and what a stopped
run tells the user.

``plan_resume`` runs before any data or weights load and returns a :class:`ResumePlan`; ``ResumePlan.train``
restores what the Trainer itself starts from zero (time budget used, trained tokens and answers) and trains.
Scoring resumes too: :func:`open_score_journal` (``infer_lora.py --resume``) returns a :class:`ScoreJournal` of
the batches an interrupted evaluation already scored.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from .callbacks import TimeBudgetCallback, TrainCounters
from .config import ConfigError
from .io import DataError, Journal

logger = logging.getLogger(__name__)
WEIGHT_FILES = ("adapter_model.safetensors", "adapter_model.bin", "model.safetensors", "pytorch_model.bin")


@dataclass
class ResumePlan:
    """What ``--resume`` / ``--resume_from_checkpoint`` decided: a checkpoint to continue (None = start fresh), or
    the summary of a finished run that resuming would only repeat."""

    checkpoint: str | None = None
    finished: dict | None = None

    def train(self, trainer):
        """Carry the checkpoint's progress over to ``trainer``, then train (from the checkpoint, if any)."""
        restore_progress(trainer, self.checkpoint)
        return trainer.train(resume_from_checkpoint=self.checkpoint)


def check_resume_flag(explicit: str | None) -> None:
    """``--resume_from_checkpoint`` names an existing folder (checked before anything loads)."""
    if explicit is not None and not Path(explicit).is_dir():
        raise DataError(f"--resume_from_checkpoint {explicit!r}: folder does not exist; use --resume to pick "
                        f"the newest checkpoint in output_dir")


def plan_resume(cfg, resume: bool, explicit: str | None = None, extra_epochs: float = 0.0) -> ResumePlan:
    """The checkpoint to resume from (printing the RESUMING banner and checking its LoRA shape against the
    config), None to start fresh, or the finished run that ``--resume`` leaves alone."""
    check_resume_flag(explicit)
    if resume and not explicit and (done := finished_run(cfg.train, extra_epochs)) is not None:
        print(f"{cfg.train.output_dir} holds a finished run ({done.get('global_step')} steps); nothing to resume. "
              f"Train longer with --extra-epochs N or a higher max_steps.", flush=True)
        return ResumePlan(finished=done)
    if explicit:
        ckpt = explicit
    elif resume:
        ckpt = latest_checkpoint(cfg.train.output_dir)
        if ckpt is None:
            print(f"No checkpoint found in {cfg.train.output_dir}; training starts from scratch", flush=True)
            return ResumePlan()
    else:
        return ResumePlan()
    print(resume_banner(checkpoint_info(ckpt)), flush=True)
    from .modeling import linear_layer_shapes

    check_resume_lora(ckpt, cfg.lora, list(linear_layer_shapes(cfg.model.model_name_or_path,
                                                                cfg.model.trust_remote_code)))
    return ResumePlan(checkpoint=ckpt)


def restore_progress(trainer, checkpoint: str | None) -> None:
    """On resume, carry over what TRL/Trainer start from zero: the time budget used and the token/answer counts."""
    state = _read_state(Path(checkpoint) / "trainer_state.json") if checkpoint else None
    if state is None:
        return
    saved = _callback_state(state, TrainCounters)
    if saved is not None:
        trainer.counters.tokens = int(saved.get("attributes", {}).get("tokens", 0))
        trainer.counters.answers = int(saved.get("attributes", {}).get("answers", 0))
    else:  # a checkpoint written before the counters were saved: the last logged counts
        history = state.get("log_history", [])
        for key, attr in (("num_tokens", "tokens"), ("num_answers", "answers")):
            last = next((e[key] for e in reversed(history) if key in e), None)
            if last is not None:
                setattr(trainer.counters, attr, int(last))
    if trainer.time_budget is not None:
        _restore_budget(trainer.time_budget, state, Path(checkpoint).name)


def _callback_state(state: dict, callback: type) -> dict | None:
    saved = state.get("stateful_callbacks", {}).get(callback.__name__)
    saved = saved[0] if isinstance(saved, list) and saved else saved
    return saved if isinstance(saved, dict) else None


def _restore_budget(budget: TimeBudgetCallback, state: dict, name: str) -> None:
    """Count the training time the checkpoint already used against the (current) budget."""
    saved = _callback_state(state, TimeBudgetCallback)
    if saved is None:
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


def stopped_early(trainer, signal_name: str) -> dict:
    """The summary of a run stopped by a signal (its checkpoint saved), with the line saying how to continue."""
    out = trainer.args.output_dir
    ckpt = latest_checkpoint(out)
    print(f"Training stopped by {signal_name} at step {trainer.state.global_step}; checkpoint saved: {ckpt}. "
          f"Continue with --resume.", flush=True)
    return {"stopped_by": signal_name, "global_step": trainer.state.global_step, "checkpoint": ckpt}


# ---------------------------------------------------------------------------------------------- scoring runs
SCORE_JOURNAL = "{name}_predictions.partial.jsonl"


class ScoreJournal(Journal):
    """The batches an evaluation has scored so far (``<name>_predictions.partial.jsonl`` in its output folder, a
    :class:`~recsft.io.Journal`): one line per batch of records, keyed by its first record's index, with the batch's
    prediction rows and scoring seconds, so a stopped run continues with ``--resume`` where it ended. Deleted once
    every pass of the run has written its predictions."""

    def add(self, start: int, records: int, rows: list[dict], seconds: float) -> None:
        self.append(str(start), {"records": records, "seconds": seconds, "rows": rows})

    @property
    def records(self) -> int:
        """Records scored in the saved batches."""
        return sum(batch["records"] for batch in self.done.values())

    def close(self) -> None:
        self.path.unlink(missing_ok=True)


def score_header(records: Sequence[dict], name: str, mode: str, settings: Any, model_args: Any,
                 adapter: str | None) -> dict:
    """What a scoring run depends on: a journal continues only a run with the same header."""
    text = json.dumps(records, sort_keys=True, default=str, ensure_ascii=False)
    model = {k: v for k, v in dataclasses.asdict(model_args).items() if k != "num_threads"}  # may change on resume
    header = {"model": name, "records": hashlib.sha256(text.encode("utf-8")).hexdigest(), "mode": mode,
              "settings": dataclasses.asdict(settings), "model_args": model,
              "adapter": str(Path(adapter).resolve()) if adapter else None}
    return json.loads(json.dumps(header, default=str))  # as the file will hold it


def open_score_journal(out_dir: str | os.PathLike, header: dict, resume: bool) -> ScoreJournal:
    """The journal of scoring run ``header["model"]`` (``lora`` / ``base``) in ``out_dir``, checked before the
    model loads: with ``resume``, the batches an interrupted run with the same header saved. Saved batches without
    ``resume`` are a one-line :class:`DataError`: nothing scored is overwritten."""
    path = Path(out_dir) / SCORE_JOURNAL.format(name=header["model"])
    lines = path.read_text(encoding="utf-8").count("\n") if path.is_file() and not resume else 0
    if lines > 1:
        raise DataError(f"{path}: an unfinished scoring run is saved here ({lines - 1} batches); add --resume to "
                        f"continue it, or delete the file to start over")
    journal = ScoreJournal(path, header, resume, fix="use another --output_dir, or delete the file to start over")
    if resume:
        print(f"RESUMING scoring ({header['model']}): {journal.records} records already scored" if journal.done
              else f"No unfinished scoring run in {path.parent} ({header['model']}); scoring starts from the "
                   f"first record", flush=True)
    return journal
