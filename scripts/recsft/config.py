"""One config path for every script: YAML file + ``key=value`` overrides.

The YAML is flat (LLaMA-Factory style: ``cutoff_len: 1024``, ``lora_rank: 16``) and every
key belongs to exactly one small section dataclass below. Loading:

1. read the YAML (``--config``), apply ``key=value`` overrides from the command line;
2. reject unknown keys, listing the valid ones (with a "did you mean" hint);
3. coerce each value to the field's type (``"1e-4"`` -> float, ``"true"`` -> bool, ``"null"`` -> None);
4. build each section; every ``__post_init__`` collects its problems instead of raising at the first;
5. raise one :class:`ConfigError` listing every problem, or return a :class:`Config`.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .errors import UserInputError

BASE_MODEL = "Qwen/Qwen3-0.6B"
ADAPTER_DIR = "output/qwen3-movielens-qlora"
MAX_NEW_TOKENS = 8
TEMPERATURE = 0.0  # 0 = greedy decoding (deterministic Yes/No)
TOP_P = 1.0
DEFAULT_CONFIG = "configs/qwen3_movielens_qlora.yaml"

FLASH_ATTN_CHOICES = ("auto", "flash_attention_2", "sdpa", "eager", "false")
STRATEGIES = ("no", "steps", "epoch")
EVAL_MODES = ("generate", "score")
LOSS_TYPES = ("nll", "yes_no")
CF_RESIDUALS = ("none", "biases", "mf")
CF_FITS = ("joint", "stacked")  # how a CF residual's a and b are fit (RecSFT train section: cf_fit)


LORA_TARGET_ITEM = re.compile(r"^[A-Za-z_][A-Za-z0-9_.]*$")


class ConfigError(UserInputError):
    """Every problem found in a config, reported at once on one line (``; `` between problems)."""

    def __init__(self, problems: list[str], source: str | None = None):
        self.problems = list(problems)
        where = f" in {source}" if source else ""
        if len(self.problems) == 1:
            super().__init__(f"config{where}: {self.problems[0]}")
        else:
            listed = "; ".join(f"({k}) {p}" for k, p in enumerate(self.problems, 1))
            super().__init__(f"{len(self.problems)} config problem(s){where}: {listed}")


class _Section:
    """Mixin: sections record problems in ``_problems`` and raise once at the end of ``__post_init__``."""

    def _check(self, ok: bool, message: str) -> None:
        if not ok:
            self.__dict__.setdefault("_problems", []).append(message)

    def _raise_if_problems(self) -> None:
        problems = self.__dict__.pop("_problems", [])
        if problems:
            raise ConfigError(problems)


@dataclass
class ModelArgs(_Section):
    model_name_or_path: str = BASE_MODEL  # hub id, local dir, .gguf file, or pkg://<dist>/<path>
    tokenizer_name_or_path: str | None = None  # defaults to the model path
    flash_attn: str = "auto"  # auto | flash_attention_2 | sdpa | eager | false
    quantization_bit: int | None = 4  # 4 = QLoRA (NF4; CUDA, or CPU with bitsandbytes >= 0.47); 8 (CUDA); None = plain LoRA
    dtype: str = "auto"  # auto | bfloat16 | float16 | float32 (auto: see recsft.modeling.choose_dtype)
    num_threads: str = "auto"  # CPU threads: auto (OMP_NUM_THREADS if set, else physical cores not busy) or N
    enable_thinking: bool = False  # Qwen3: keep False so training text == inference text
    trust_remote_code: bool = False

    def __post_init__(self):
        self._check(bool(self.model_name_or_path), "model_name_or_path: must not be empty")
        self._check(self.flash_attn in FLASH_ATTN_CHOICES,
                    f"flash_attn: {self.flash_attn!r} is not one of {', '.join(FLASH_ATTN_CHOICES)}")
        self._check(self.quantization_bit in (None, 4, 8), "quantization_bit: must be 4, 8 or null")
        self._check(self.dtype in ("auto", "bfloat16", "float16", "float32"),
                    f"dtype: {self.dtype!r} is not one of auto, bfloat16, float16, float32")
        self._check(self.num_threads == "auto" or (self.num_threads.isdigit() and int(self.num_threads) > 0),
                    f"num_threads: {self.num_threads!r} must be auto or a positive integer")
        self._raise_if_problems()


@dataclass
class DataArgs(_Section):
    dataset: str = "movielens_train"  # name in <dataset_dir>/dataset_info.json, or a file path
    eval_dataset: str = "movielens_eval"
    test_file: str = "movielens_test"
    dataset_dir: str = "."  # folder holding dataset_info.json; file_name entries are relative to it
    cutoff_len: int = 1024  # max tokens per example (Qwen3: p95 of the data ~470); prompts cut from the left
    max_samples: int | None = None  # cap on training examples (None = all)
    max_eval_samples: int | None = 1000  # cap on eval examples used during training (quick, reliable checks)
    max_test_samples: int | None = None  # cap on test examples for inference scripts
    preprocessing_cache_dir: str = ".cache/preprocessed"  # tokenized data, keyed by data+tokenizer+settings
    system_prompt: str | None = None  # None = DEFAULT_SYSTEM_PROMPT (or the record's own "system")

    def __post_init__(self):
        self._check(self.cutoff_len >= 16, f"cutoff_len: {self.cutoff_len} is too small (need >= 16)")
        for name in ("max_samples", "max_eval_samples", "max_test_samples"):
            value = getattr(self, name)
            self._check(value is None or value > 0, f"{name}: must be a positive integer or null, got {value}")
        self._raise_if_problems()


@dataclass
class LoraArgs(_Section):
    lora_rank: int = 16
    lora_alpha: int = 64  # scaling = alpha / rank = 4
    lora_dropout: float = 0.05  # light regularization
    lora_target: str = "all"  # all = every linear layer; qv = q_proj,v_proj; or a comma list

    def __post_init__(self):
        self._check(self.lora_rank > 0, f"lora_rank: must be > 0, got {self.lora_rank}")
        self._check(self.lora_alpha > 0, f"lora_alpha: must be > 0, got {self.lora_alpha}")
        self._check(0.0 <= self.lora_dropout < 1.0, f"lora_dropout: must be in [0, 1), got {self.lora_dropout}")
        self._check(bool(self.lora_target.strip()), "lora_target: must not be empty")
        items = [t.strip() for t in self.lora_target.split(",")]
        bad = [t for t in items if not LORA_TARGET_ITEM.match(t)] if self.lora_target.strip() else []
        self._check(not bad, f"lora_target: {', '.join(repr(t) for t in bad)} is not a module name; use all, qv, "
                             f"or a comma list of layer names such as q_proj,v_proj")
        self._raise_if_problems()


# TrainArgs fields are Trainer (SFTConfig) arguments of the same name, passed through as they are
# (recsft.training.sft_config); a field with ``metadata={"trainer": name}`` goes to that argument instead, one with
# ``{"trainer": None}`` is recsft's own. A new Trainer setting is one field here.
_OWN = {"trainer": None}


@dataclass
class TrainArgs(_Section):
    output_dir: str = ADAPTER_DIR  # adapter, checkpoints, logs/ (TensorBoard), training_summary.json
    per_device_train_batch_size: int = 2  # raise to 4+ if memory allows
    per_device_eval_batch_size: int = 16
    gradient_accumulation_steps: int = 8  # effective batch = 2 x 8 = 16 per device
    num_train_epochs: float = 3.0  # --extra-epochs N adds to this when resuming
    max_steps: int = -1  # > 0 overrides num_train_epochs
    learning_rate: float = 1.5e-4
    # linear warmup over this fraction of the steps: transformers reads a warmup_steps below 1 as a fraction of the
    # total steps (TrainingArgs.get_warmup_steps), and warmup_ratio is kept in [0, 1) so it always is one
    warmup_ratio: float = field(default=0.03, metadata={"trainer": "warmup_steps"})
    lr_scheduler_type: str = "cosine"  # any transformers scheduler (checked before loading, recsft.validate)
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    optim: str = "adamw_torch"  # any transformers optimizer (checked before loading, recsft.validate)
    logging_steps: int = 10  # train loss/lr every N optimizer steps
    eval_strategy: str = "steps"
    eval_steps: int = 2000
    save_strategy: str = "steps"
    save_steps: int = 4000  # a multiple of eval_steps (best-model selection)
    save_total_limit: int | None = 2  # keep the last 2 checkpoints (plus the best)
    load_best_model_at_end: bool = True  # the best checkpoint becomes the final adapter
    metric_for_best_model: str = "f1"  # f1 | accuracy | auc | loss
    early_stopping_patience: int | None = field(default=3, metadata=_OWN)  # None/0 disables early stopping
    # true saves memory at ~25% more compute (activation_checkpointing is the transformers-5 name)
    gradient_checkpointing: bool = field(default=False, metadata={"trainer": "activation_checkpointing"})
    # padding-free packing (no cross-example attention); pays off with flash-attn: with SDPA (CPU) a packed
    # batch needs a dense block mask and is slower
    packing: bool = False
    seed: int = 42  # data order, LoRA init, dropout
    gen_eval_samples: int = field(default=0, metadata=_OWN)  # >0: greedy generation eval on N eval examples after training
    report_to: str = field(default="tensorboard", metadata=_OWN)  # tensorboard | none (TensorBoard on rank 0 only)
    bf16: str = field(default="auto", metadata=_OWN)  # auto = bf16 on GPUs that support it (recsft.training.mixed_precision)
    dataloader_num_workers: int = 0
    # Training-time budget: stop (evaluate + save) once the training steps have used this many minutes.
    # Counted over optimizer steps only (evaluation and checkpointing excluded). Clock: wall = elapsed time;
    # cpu = CPU time of this process, which measures the same work whatever else runs on the machine.
    max_train_minutes: float | None = None
    budget_clock: str = "wall"
    # nll = token cross-entropy on the answer tokens (Yes/No, end-of-turn); yes_no = binary cross-entropy on
    # logit(Yes) - logit(No) at each answer's first position (float32), i.e. directly the P(Yes) scoring uses.
    loss_type: str = field(default="nll", metadata={"trainer": "answer_loss"})  # SFTConfig's own loss_type is TRL's
    # Collaborative-filtering residual: P(Yes) = sigmoid(c(u,i) + a * (logit Yes - logit No) + b), c = the like-logit
    # of a Cornac model (biases: user+item biases; mf: matrix factorisation) fit on the training split, a and b
    # learned. none = the LLM alone. Needs loss_type yes_no and candidate-block data (user and movie ids).
    cf_residual: str = field(default="none", metadata=_OWN)
    # learning rate of the residual's two scalars a and b (Adam moves each by about this much per step; the LoRA
    # learning rate would take thousands of steps to grow a from its start of 0.01)
    cf_head_lr: float = 1e-2
    # joint: a, b and LoRA trained together (cross-fitted c on training answers); stacked (two stages): LoRA trained
    # on the text alone, then a and b fit on the eval answers with the LoRA weights frozen
    cf_fit: str = field(default="joint", metadata=_OWN)
    # stacked: eval records scored for the fit of a and b (null: the whole eval file); ~8 answers per record
    cf_fit_samples: int | None = field(default=256, metadata=_OWN)
    # soft CF tokens (CoLLM-style): the CF model's [bias, factors] of the user and of each candidate, mapped by a
    # trainable 2-layer network to one input embedding each, after the history and before each candidate's text
    cf_tokens: bool = field(default=False, metadata=_OWN)
    # the CF model whose vectors the soft tokens carry: null = cf_residual's; mf gives [bias, 20 factors] per user and
    # item (with biases each token carries one number)
    cf_tokens_kind: str | None = field(default=None, metadata=_OWN)

    def __post_init__(self):
        for name in ("per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps",
                     "logging_steps", "eval_steps", "save_steps"):
            self._check(getattr(self, name) > 0, f"{name}: must be > 0, got {getattr(self, name)}")
        self._check(self.learning_rate > 0, f"learning_rate: must be > 0, got {self.learning_rate}")
        self._check(self.max_steps == -1 or self.max_steps > 0,
                    f"max_steps: must be -1 (use num_train_epochs) or > 0, got {self.max_steps}")
        self._check(self.num_train_epochs >= 0, f"num_train_epochs: must be >= 0, got {self.num_train_epochs}")
        self._check(self.weight_decay >= 0, f"weight_decay: must be >= 0, got {self.weight_decay}")
        self._check(self.max_grad_norm >= 0, f"max_grad_norm: must be >= 0 (0 = no clipping), got {self.max_grad_norm}")
        self._check(self.save_total_limit is None or self.save_total_limit >= 1,
                    f"save_total_limit: must be >= 1 or null (keep every checkpoint), got {self.save_total_limit}")
        self._check(self.early_stopping_patience is None or self.early_stopping_patience >= 0,
                    f"early_stopping_patience: must be >= 0 or null (0/null = off), got {self.early_stopping_patience}")
        self._check(self.dataloader_num_workers >= 0,
                    f"dataloader_num_workers: must be >= 0 (0 = load in the main process), "
                    f"got {self.dataloader_num_workers}")
        self._check(0 <= self.seed < 2**32, f"seed: must be in [0, 2**32), got {self.seed}")
        self._check(bool(self.output_dir.strip()), "output_dir: must not be empty; give a folder path")
        self._check(bool(self.optim.strip()), "optim: must not be empty (e.g. adamw_torch)")
        self._check(0.0 <= self.warmup_ratio < 1.0, f"warmup_ratio: must be in [0, 1), got {self.warmup_ratio}")
        self._check(self.num_train_epochs > 0 or self.max_steps > 0, "num_train_epochs or max_steps must be > 0")
        self._check(bool(self.lr_scheduler_type.strip()), "lr_scheduler_type: must not be empty (e.g. cosine)")
        self._check(self.eval_strategy in STRATEGIES, f"eval_strategy: must be one of {', '.join(STRATEGIES)}")
        self._check(self.save_strategy in STRATEGIES, f"save_strategy: must be one of {', '.join(STRATEGIES)}")
        self._check(self.metric_for_best_model in ("f1", "accuracy", "auc", "loss"),
                    "metric_for_best_model: must be one of f1, accuracy, auc, loss")
        self._check(self.gen_eval_samples >= 0, "gen_eval_samples: must be >= 0")
        self._check(self.bf16 in ("auto", "true", "false"), "bf16: must be auto, true or false")
        self._check(self.max_train_minutes is None or 0 < self.max_train_minutes < float("inf"),
                    f"max_train_minutes: must be a positive number or null, got {self.max_train_minutes}")
        self._check(self.budget_clock in ("wall", "cpu"), f"budget_clock: must be wall or cpu, got {self.budget_clock!r}")
        self._check(self.loss_type in LOSS_TYPES,
                    f"loss_type: {self.loss_type!r} is not one of {', '.join(LOSS_TYPES)}")
        self._check(self.cf_head_lr > 0, f"cf_head_lr: must be > 0, got {self.cf_head_lr}")
        self._check(self.cf_residual in CF_RESIDUALS,
                    f"cf_residual: {self.cf_residual!r} is not one of {', '.join(CF_RESIDUALS)}")
        self._check(self.cf_fit_samples is None or self.cf_fit_samples > 0,
                    f"cf_fit_samples: must be > 0 or null (the whole eval file), got {self.cf_fit_samples}")
        self._check(self.cf_fit in CF_FITS, f"cf_fit: {self.cf_fit!r} is not one of {', '.join(CF_FITS)}")
        self._check(self.cf_fit == "joint" or self.cf_residual != "none",
                    f"cf_fit: {self.cf_fit} fits a CF residual's head; set cf_residual=biases (or mf)")
        self._check(self.cf_tokens_kind in (None, *CF_RESIDUALS[1:]),
                    f"cf_tokens_kind: {self.cf_tokens_kind!r} is not null or one of {', '.join(CF_RESIDUALS[1:])}")
        self._check(not self.cf_tokens or self.cf_residual != "none",
                    "cf_tokens: the soft tokens carry the CF residual's user and item vectors; set cf_residual=biases "
                    "(or mf)")
        self._check(self.cf_residual == "none" or self.loss_type == "yes_no",
                    f"cf_residual: {self.cf_residual} adds a CF logit to logit(Yes) - logit(No), which only the "
                    f"yes_no loss trains; set loss_type=yes_no")
        if self.load_best_model_at_end and self.eval_strategy != "no":
            self._check(self.save_strategy == self.eval_strategy,
                        "load_best_model_at_end needs save_strategy == eval_strategy")
            if self.eval_strategy == "steps":
                self._check(self.save_steps % self.eval_steps == 0,
                            f"load_best_model_at_end needs save_steps ({self.save_steps}) to be a multiple of "
                            f"eval_steps ({self.eval_steps})")
        self._raise_if_problems()


NO_ADAPTER = "none"  # --adapter_dir none / adapter_dir: none = the base model alone


def adapter_path(value: str | None) -> str | None:
    """The adapter folder a value names, or None for the base model (``none``, empty or unset)."""
    return None if value is None or value.strip().lower() in (NO_ADAPTER, "") else value


@dataclass
class InferArgs(_Section):
    adapter_dir: str | None = None  # the adapter the inference scripts load; null = the config's output_dir
    max_new_tokens: int = MAX_NEW_TOKENS
    temperature: float = TEMPERATURE
    top_p: float = TOP_P
    eval_mode: str = "generate"  # generate (greedy decoding) | score (P(Yes) vs P(No), one forward pass)
    infer_batch_size: int = 16

    def __post_init__(self):
        self._check(self.max_new_tokens > 0, "max_new_tokens: must be > 0")
        self._check(self.temperature >= 0, "temperature: must be >= 0")
        self._check(0 < self.top_p <= 1, "top_p: must be in (0, 1]")
        self._check(self.eval_mode in EVAL_MODES, f"eval_mode: must be one of {', '.join(EVAL_MODES)}")
        self._check(self.infer_batch_size > 0, "infer_batch_size: must be > 0")
        self._raise_if_problems()


def trainer_arguments(train: TrainArgs) -> dict[str, Any]:
    """The Trainer (``SFTConfig``) arguments of a ``train`` section, under the Trainer's names (see TrainArgs)."""
    out = {}
    for f in dataclasses.fields(train):
        name = f.metadata.get("trainer", f.name)
        if name is not None:
            out[name] = getattr(train, f.name)
    return out


SECTIONS: dict[str, type] = {"model": ModelArgs, "data": DataArgs, "lora": LoraArgs, "train": TrainArgs,
                             "infer": InferArgs}


@dataclass
class Config:
    model: ModelArgs = field(default_factory=ModelArgs)
    data: DataArgs = field(default_factory=DataArgs)
    lora: LoraArgs = field(default_factory=LoraArgs)
    train: TrainArgs = field(default_factory=TrainArgs)
    infer: InferArgs = field(default_factory=InferArgs)
    source: str | None = None  # the YAML file it came from

    def adapter(self, flag: str | None = None) -> str | None:
        """The adapter to load: ``flag`` (``--adapter_dir``), else ``adapter_dir``, else ``output_dir`` (what
        training wrote), an empty value counting as unset; None for ``none`` (the base model alone)."""
        return adapter_path(next((v for v in (flag, self.infer.adapter_dir) if v), self.train.output_dir))

    def to_dict(self) -> dict[str, Any]:
        flat: dict[str, Any] = {}
        for name in SECTIONS:
            flat.update(dataclasses.asdict(getattr(self, name)))
        return flat


def valid_keys() -> dict[str, str]:
    """Map every config key to its section name."""
    return {f.name: section for section, cls in SECTIONS.items() for f in dataclasses.fields(cls)}


def _unwrap_optional(tp: Any) -> tuple[Any, bool]:
    if isinstance(tp, types.UnionType) or typing.get_origin(tp) is typing.Union:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return args[0], len(args) < len(typing.get_args(tp))
    return tp, False


def _coerce(key: str, value: Any, tp: Any) -> Any:
    """Convert ``value`` to ``tp``; raise ValueError with a readable message."""
    base, optional = _unwrap_optional(tp)
    if isinstance(value, str) and value.strip().lower() == "none" and base is str and not optional:
        return "none"  # e.g. report_to: none
    if value is None or (isinstance(value, str) and value.strip().lower() in ("null", "none", "~")):
        if optional:
            return None
        raise ValueError(f"{key}: null is not allowed (expected {base.__name__})")
    if base is bool:
        if isinstance(value, bool):
            return value
        text = str(value).strip().lower()
        if text in ("true", "1", "yes", "on"):
            return True
        if text in ("false", "0", "no", "off"):
            return False
        raise ValueError(f"{key}: expected true/false, got {value!r}")
    if base is int:
        if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
            raise ValueError(f"{key}: expected an integer, got {value!r}")
        try:
            return int(value) if not isinstance(value, str) else int(float(value)) if "e" in value.lower() else int(value)
        except (TypeError, ValueError, OverflowError):
            raise ValueError(f"{key}: expected an integer, got {value!r}") from None
    if base is float:
        if isinstance(value, bool):
            raise ValueError(f"{key}: expected a number, got {value!r}")
        try:
            number = float(value)
        except (TypeError, ValueError):
            raise ValueError(f"{key}: expected a number, got {value!r}") from None
        if not math.isfinite(number):
            raise ValueError(f"{key}: must be a finite number, got {value!r}")
        return number
    if base is str:
        if isinstance(value, (dict, list)):
            raise ValueError(f"{key}: expected a string, got {type(value).__name__} {value!r}")
        if isinstance(value, bool):  # YAML turns `flash_attn: false` into a bool
            return "true" if value else "false"
        return str(value)
    return value


def parse_overrides(items: list[str]) -> dict[str, str]:
    """Turn ``["lr=1e-4", "packing=true"]`` into a dict; reject items without ``=``."""
    out: dict[str, str] = {}
    bad = []
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            bad.append(f"override {item!r}: expected key=value (e.g. cutoff_len=512)")
            continue
        out[key.strip().lstrip("-").replace("-", "_")] = value
    if bad:
        raise ConfigError(bad)
    return out


class _UniqueKeyLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that rejects a key given twice (plain YAML keeps the last one silently)."""

    def construct_mapping(self, node, deep=False):
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            line = key_node.start_mark.line + 1
            if key in seen:
                raise ConfigError([f"line {line}: key {key!r} is given twice (first on line {seen[key]}); keep one"])
            seen[key] = line
        return super().construct_mapping(node, deep=deep)


def read_yaml(path: str | os.PathLike) -> dict[str, Any]:
    path = Path(path)
    if not str(path).strip():
        raise ConfigError(["--config is empty; pass a YAML file from configs/"])
    if path.is_dir():
        raise ConfigError([f"config {str(path)!r} is a folder; pass --config with a YAML file from configs/"])
    if not path.is_file():
        raise ConfigError([f"config file {str(path)!r} does not exist; pass --config with a YAML from configs/"])
    try:
        raw = yaml.load(path.read_text(encoding="utf-8"), Loader=_UniqueKeyLoader)  # noqa: S506 - a SafeLoader
    except ConfigError as e:
        raise ConfigError(e.problems, str(path)) from None
    except UnicodeDecodeError as e:
        raise ConfigError([f"{path}: not UTF-8 text ({e.reason} at byte {e.start}); re-save it as UTF-8"]) from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError([f"{path}{where}: invalid YAML: {getattr(e, 'problem', e)}"]) from None
    if raw is None:
        raise ConfigError([f"{path}: the config file is empty; copy one from configs/ or give key: value lines"])
    if not isinstance(raw, dict):
        raise ConfigError([f"{path}: the top level must be a mapping of key: value, got {type(raw).__name__}"])
    return raw


def build_config(values: dict[str, Any], source: str | None = None) -> Config:
    """Validate a flat dict of config values into a :class:`Config`, collecting every problem."""
    keys = valid_keys()
    problems: list[str] = []
    per_section: dict[str, dict[str, Any]] = {name: {} for name in SECTIONS}
    for key, value in values.items():
        key = str(key)
        if key not in keys:
            close = difflib.get_close_matches(key, keys, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            problems.append(f"unknown key {key!r}{hint}. Valid keys: {', '.join(sorted(keys))}")
            continue
        section = keys[key]
        tp = typing.get_type_hints(SECTIONS[section])[key]
        try:
            per_section[section][key] = _coerce(key, value, tp)
        except ValueError as e:
            problems.append(str(e))
    built: dict[str, Any] = {}
    for name, cls in SECTIONS.items():
        try:
            built[name] = cls(**per_section[name])
        except ConfigError as e:
            problems.extend(e.problems)
    if problems:
        raise ConfigError(problems, source)
    return Config(**built, source=source)


def load_config(path: str | os.PathLike | None = None, overrides: dict[str, Any] | list[str] | None = None) -> Config:
    """Load a YAML config and apply overrides; ``path=None`` uses only the defaults."""
    values = read_yaml(path) if path else {}
    if isinstance(overrides, list):
        overrides = parse_overrides(overrides)
    values.update(overrides or {})
    return build_config(values, source=str(path) if path else None)


def dump_config(cfg: Config) -> str:
    """The effective config as flat YAML (loadable with ``--config``), one ``# --- section ---`` block each."""
    blocks = []
    for name in SECTIONS:
        values = dataclasses.asdict(getattr(cfg, name))
        blocks.append(f"# --- {name} ---\n" + yaml.safe_dump(values, sort_keys=False, allow_unicode=True, width=120))
    return f"# effective config ({cfg.source or 'defaults only'} over the defaults in recsft/config.py)\n" + \
        "\n".join(blocks)
