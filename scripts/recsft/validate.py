"""Checks that run before anything heavy: output folders, model sources, training settings, run locks.

Each check raises :class:`recsft.errors.UserInputError` (a ``ConfigError`` or ``DataError``) with one line
naming the flag/key/file and the fix. The scripts call them right after parsing, so bad input fails in
seconds, before tokenization and before any model weights load, and nothing is written.
"""

from __future__ import annotations

import contextlib
import difflib
import json
import logging
import os
import socket
import tempfile
from pathlib import Path

from .config import ConfigError
from .errors import UserInputError

logger = logging.getLogger(__name__)
LOCK_FILE = ".recsft.lock"


# ------------------------------------------------------------------------------------------ outputs
def writable_dir(path: str | os.PathLike, flag: str) -> Path:
    """``path`` is (or can be created as) a folder this process can write into; nothing is created.

    Fails for an empty path, a path that is a file (or lies under a file), and a read-only location.
    """
    text = str(path)
    if not text.strip():
        raise UserInputError(f"{flag}: is empty; give a folder path")
    folder = Path(text).expanduser()
    if folder.exists() and not folder.is_dir():
        raise UserInputError(f"{flag} {text!r}: is a file, not a folder; choose another path or remove the file")
    ancestor = folder
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise UserInputError(f"{flag} {text!r}: {ancestor} is a file, so the folder cannot be created there; "
                             f"choose another path")
    if not _can_create_in(ancestor):
        raise UserInputError(f"{flag} {text!r}: {ancestor} is not writable; choose a writable folder")
    return folder


def _can_create_in(folder: Path) -> bool:
    """True when a file can be created in ``folder`` (probed with a temp file removed at once)."""
    if not os.access(folder, os.W_OK | os.X_OK):
        return False
    try:
        with tempfile.TemporaryFile(dir=folder):
            return True
    except OSError:
        return False


# ------------------------------------------------------------------------------------ model sources
def _offline() -> bool:
    flags = [os.environ.get(k, "") for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")]
    if any(f.strip().lower() in ("1", "true", "yes", "on") for f in flags):
        return True
    try:
        from huggingface_hub import constants

        return bool(constants.HF_HUB_OFFLINE)
    except ImportError:  # pragma: no cover - huggingface_hub ships with transformers
        return False


def check_model_source(name_or_path: str, key: str = "model_name_or_path") -> str:
    """The model resolves without loading it: a local folder with config.json, an existing GGUF file or
    ``pkg://`` asset, or a hub id that is in the local hub cache (offline) or answers on the hub (online).

    Returns the path or hub id to load from.
    """
    from .modeling import resolve_model_path

    path, gguf = resolve_model_path(name_or_path, key)
    if gguf:
        return str(Path(path) / gguf)
    if Path(path).exists():
        if not Path(path).is_dir() or not (Path(path) / "config.json").is_file():
            raise ConfigError([f"{key}: {path!r} is not a model folder (no config.json); give a folder saved "
                               f"with save_pretrained, a .gguf file or a hub id"])
        for weights in sorted(Path(path).glob("*.safetensors")):
            check_safetensors(weights, key)
        return path
    _check_hub_id(path, key)
    return path


def check_safetensors(path: Path, key: str) -> None:
    """The safetensors header parses (a truncated or corrupt file fails here, not deep inside the load)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            list(f.keys())
    except Exception as e:  # noqa: BLE001 - safetensors raises its own error types
        raise ConfigError([f"{key}: {path} is not a readable safetensors file ({type(e).__name__}: "
                           f"{str(e)[:120]}); the download or copy is incomplete, fetch the model again"]) from None


def _check_hub_id(repo_id: str, key: str) -> None:
    from huggingface_hub import try_to_load_from_cache

    try:
        cached = try_to_load_from_cache(repo_id, "config.json")
    except Exception as e:  # noqa: BLE001 - an id huggingface_hub rejects (bad characters, too many parts)
        raise ConfigError([f"{key}: {repo_id!r} is not a valid hub id ({str(e).splitlines()[0]}); "
                           f"use owner/name (e.g. Qwen/Qwen3-0.6B) or a local folder"]) from None
    if isinstance(cached, str):
        return
    if _offline():
        raise ConfigError([f"{key}: hub model {repo_id!r} is not in the local hub cache and HF_HUB_OFFLINE is set; "
                           f"download it once online, or point {key} at a local folder"])
    from huggingface_hub import hf_hub_download

    try:
        hf_hub_download(repo_id, "config.json")
    except Exception as e:  # noqa: BLE001 - repository missing, gated, network down: all are input problems
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ConfigError([f"{key}: cannot fetch {repo_id!r} from the hub ({type(e).__name__}: {reason[:160]}); "
                           f"check the id and the network, or use a local folder / HF_HUB_OFFLINE=1 with a "
                           f"cached model"]) from None


# --------------------------------------------------------------------------------- training settings
def check_trainer_choices(train) -> None:
    """``optim`` and ``lr_scheduler_type`` are names transformers knows (its own lists, not a copy)."""
    from transformers.trainer_utils import SchedulerType
    from transformers.training_args import OptimizerNames

    for key, names, examples in (("optim", [o.value for o in OptimizerNames],
                                  "adamw_torch, adamw_torch_fused, paged_adamw_8bit, sgd"),
                                 ("lr_scheduler_type", [s.value for s in SchedulerType],
                                  "cosine, linear, constant_with_warmup")):
        value = getattr(train, key)
        if value not in names:
            close = difflib.get_close_matches(value, names, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            what = "optimizer" if key == "optim" else "learning-rate scheduler"
            raise ConfigError([f"{key}: {value!r} is not a Trainer {what}{hint}; e.g. {examples}"])


def check_attention(flash_attn: str, device: str) -> None:
    """An explicit ``flash_attn: flash_attention_2`` must be available here (``auto`` falls back to SDPA)."""
    if flash_attn != "flash_attention_2":
        return
    from .modeling import resolve_attn_implementation

    resolve_attn_implementation(flash_attn, device)


def check_lora_target(target: str, layer_shapes: dict[str, tuple[int, int]], model_name: str) -> None:
    """Every name of a comma-list ``lora_target`` matches a linear layer of the model (peft would drop a typo)."""
    from .modeling import lora_target_modules

    modules = lora_target_modules(target)
    if isinstance(modules, str):  # all-linear
        return
    leaves = sorted({name.rsplit(".", 1)[-1] for name in layer_shapes})
    for item in modules:
        if not any(name == item or name.endswith("." + item) for name in layer_shapes):
            close = difflib.get_close_matches(item, leaves, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError([f"lora_target: {item!r} matches no linear layer of {model_name}{hint}; "
                               f"its layers: {', '.join(leaves)} (or use all / qv)"])


def preflight_training(cfg, extra_epochs: float = 0.0) -> None:
    """Everything about a training run that can be checked without data or weights, in seconds (the checkpoint
    to resume from is checked right after, by ``recsft.resume.plan_resume``)."""
    import math

    from .modeling import get_device, linear_layer_shapes

    train = cfg.train
    if not math.isfinite(extra_epochs) or extra_epochs < 0:
        raise UserInputError(f"--extra-epochs: must be a finite number >= 0, got {extra_epochs}")
    if extra_epochs and train.max_steps > 0:
        raise UserInputError(f"--extra-epochs {extra_epochs} has no effect with max_steps={train.max_steps} "
                             f"(max_steps wins); raise max_steps instead, or set max_steps=-1")
    writable_dir(train.output_dir, "output_dir")
    check_not_locked(train.output_dir)
    check_trainer_choices(train)
    check_attention(cfg.model.flash_attn, get_device())
    check_model_source(cfg.model.model_name_or_path)
    if cfg.model.tokenizer_name_or_path:
        check_model_source(cfg.model.tokenizer_name_or_path, "tokenizer_name_or_path")
    shapes = linear_layer_shapes(cfg.model.model_name_or_path, cfg.model.trust_remote_code)
    check_lora_target(cfg.lora.lora_target, shapes, cfg.model.model_name_or_path)


def preflight_inference(model_args) -> None:
    """The model resolves and an explicit attention backend is available: before records, tokenizer, weights."""
    from .modeling import get_device

    check_model_source(model_args.model_name_or_path)
    if model_args.tokenizer_name_or_path:
        check_model_source(model_args.tokenizer_name_or_path, "tokenizer_name_or_path")
    check_attention(model_args.flash_attn, get_device())


# ------------------------------------------------------------------------------------------- locks
def _lock_owner(lock: Path) -> dict | None:
    try:
        owner = json.loads(lock.read_text())
        return owner if isinstance(owner, dict) and isinstance(owner.get("pid"), int) else {}
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return {}  # unreadable or half-written: treated as stale


def _alive(owner: dict) -> bool:
    if owner.get("host") not in (None, socket.gethostname()):
        return True  # another machine on a shared filesystem: cannot check, assume it runs
    pid = owner.get("pid")
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _is_main_rank() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def check_not_locked(output_dir: str | os.PathLike) -> None:
    """Fail when a live process holds ``output_dir``'s lock (a stale lock is taken over later)."""
    lock = Path(output_dir) / LOCK_FILE
    owner = _lock_owner(lock)
    if owner and owner.get("pid") != os.getpid() and _alive(owner) and _is_main_rank():
        raise UserInputError(f"output_dir {str(output_dir)!r} is in use by another training run (pid {owner['pid']} "
                             f"on {owner.get('host')}, lock file {lock}); wait for it to finish, stop it, choose "
                             f"another output_dir, or delete the lock file if that run is gone")


@contextlib.contextmanager
def run_lock(output_dir: str | os.PathLike):
    """Hold ``<output_dir>/.recsft.lock`` (pid + host) for the block; only rank 0 takes it under DDP.

    A lock whose pid is dead (a killed run) is taken over with a log line; a live one is an error.
    """
    if not _is_main_rank():
        yield
        return
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    lock = out / LOCK_FILE
    me = json.dumps({"pid": os.getpid(), "host": socket.gethostname()})
    for _ in range(3):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            owner = _lock_owner(lock)
            if owner and _alive(owner) and owner.get("pid") != os.getpid():
                check_not_locked(out)
            logger.warning("Taking over a stale lock %s (pid %s is not running)", lock, (owner or {}).get("pid"))
            with contextlib.suppress(FileNotFoundError):
                lock.unlink()
            continue
        with os.fdopen(fd, "w") as f:
            f.write(me)
        break
    else:
        raise UserInputError(f"output_dir {str(out)!r}: could not take the lock {lock}; another run is starting "
                             f"there; choose another output_dir")
    try:
        yield
    finally:
        with contextlib.suppress(FileNotFoundError):
            if lock.read_text() == me:
                lock.unlink()
