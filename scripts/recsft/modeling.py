"""Device, tokenizer, model, attention backend, LoRA / QLoRA and adapter loading."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import shutil
from pathlib import Path

from .config import ConfigError
from .io import DataError, resolve_asset

logger = logging.getLogger(__name__)
MODEL_CACHE = Path(os.environ.get("RECSFT_MODEL_CACHE", ".cache/models"))


def get_device() -> str:
    """``"cuda"``, ``"mps"`` or ``"cpu"``, in that order of preference."""
    import torch

    if torch.cuda.is_available():
        return "cuda"
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def resolve_model_path(name_or_path: str, key: str = "model_name_or_path") -> tuple[str, str | None]:
    """``(path_or_hub_id, gguf_file)``; a ``.gguf`` file (or ``pkg://`` asset) becomes (its folder, its name)."""
    try:
        path = resolve_asset(name_or_path)
    except DataError as e:
        raise ConfigError([f"{key}: {e}"]) from None
    if path.endswith(".gguf"):
        if not Path(path).is_file():
            raise ConfigError([f"{key}: GGUF file {path!r} does not exist"])
        return str(Path(path).parent), Path(path).name
    looks_like_hub_id = path.count("/") <= 1 and not path.startswith((".", "/", "~"))
    if not Path(path).exists() and not looks_like_hub_id:
        raise ConfigError([f"{key}: local path {path!r} does not exist "
                           f"(use a hub id like Qwen/Qwen3-0.6B or an existing folder)"])
    return path, None


def materialize_gguf(folder: str, gguf_file: str) -> str:
    """Dequantize a GGUF model once into a cached Hugging Face folder and return that folder.

    transformers dequantizes GGUF on every load (~20 s for 135M params); the cached copy loads in ~1 s.
    The cache is keyed by the GGUF file's size and mtime and written atomically.
    """
    src = Path(folder) / gguf_file
    stat = src.stat()
    key = hashlib.sha256(f"{src.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:12]
    target = MODEL_CACHE / f"{src.stem}-{key}"
    if (target / "config.json").is_file() and (target / "recsft_done").is_file():
        return str(target)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    logger.info("Converting %s to a cached Hugging Face copy in %s (once)", src, target)
    tmp = target.with_name(target.name + f".tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        AutoTokenizer.from_pretrained(folder, gguf_file=gguf_file).save_pretrained(tmp)
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf_file)
        model.hf_quantizer = None  # weights are already dequantized to plain tensors; save them as such
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(tmp)
        (tmp / "recsft_done").write_text(str(src))
        shutil.rmtree(target, ignore_errors=True)
        os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return str(target)


def local_model_path(name_or_path: str) -> str:
    """Hub id or folder to pass to ``from_pretrained`` (GGUF files are converted once and cached)."""
    path, gguf = resolve_model_path(name_or_path)
    return materialize_gguf(path, gguf) if gguf else path


def load_tokenizer(name_or_path: str, trust_remote_code: bool = False, padding_side: str = "right"):
    """Tokenizer with a pad token (falls back to EOS) and the requested padding side."""
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(local_model_path(name_or_path), trust_remote_code=trust_remote_code)
    except OSError as e:  # missing tokenizer files, unknown hub id, no network
        raise ConfigError([f"tokenizer {name_or_path!r} cannot be loaded ({str(e).splitlines()[0][:200]}); "
                           f"set model_name_or_path / tokenizer_name_or_path to a chat model folder or hub id"]) from None
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    if tok.chat_template is None:
        raise ConfigError([f"tokenizer {name_or_path!r} has no chat template; use an instruct/chat model"])
    tok.padding_side = padding_side
    return tok


def flash_attn_problem() -> str | None:
    """Why flash-attn cannot be used here (None when it imports and its kernel entry point exists).

    ``find_spec`` only says a folder named flash_attn is on the path; a wheel built for another torch/CUDA
    fails at import (undefined symbol), so the import is tried and the reason kept for the log line.
    """
    if importlib.util.find_spec("flash_attn") is None:
        return "flash-attn is not installed"
    try:
        import flash_attn

        if not hasattr(flash_attn, "flash_attn_varlen_func"):
            return "flash_attn has no flash_attn_varlen_func (incomplete install)"
    except Exception as e:  # noqa: BLE001 - any import failure (ImportError, OSError from a .so) means "unusable"
        return f"flash-attn fails to import ({type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''})"
    return None


def resolve_attn_implementation(flash_attn: str, device: str) -> str | None:
    """Map the ``flash_attn`` knob to ``attn_implementation``; ``auto`` falls back to SDPA with a log line."""
    if flash_attn == "false":
        return "sdpa"
    if flash_attn in ("sdpa", "eager"):
        return flash_attn
    why = None
    if device != "cuda":
        why = f"device {device} does not support it (needs CUDA sm80+)"
    else:
        import torch

        if torch.cuda.get_device_capability()[0] < 8:
            why = f"GPU sm{''.join(map(str, torch.cuda.get_device_capability()))} does not support it (needs sm80+)"
    why = why or flash_attn_problem()
    if why is None:
        logger.info("Attention: flash_attention_2")
        return "flash_attention_2"
    if flash_attn == "flash_attention_2":
        raise ConfigError([f"flash_attn: flash_attention_2 requested but {why}; set flash_attn: auto or sdpa"])
    logger.info("Flash Attention 2 unavailable (%s); falling back to PyTorch SDPA", why)
    return "sdpa"


def attention_for_blocks(flash_attn: str) -> str:
    """The ``flash_attn`` knob for candidate-block data: flash-attn cannot take the block mask, so SDPA (or eager
    when asked for) is used instead, with a log line."""
    if flash_attn in ("sdpa", "eager"):
        return flash_attn
    logger.info("Candidate blocks need a 4D attention mask, which flash-attn cannot take: attention is PyTorch "
                "SDPA (flash_attn: %s ignored for this data)", flash_attn)
    return "sdpa"


def cuda_auto_dtype() -> tuple[str, str]:
    """``(dtype name, reason)`` for ``dtype: auto`` on a CUDA GPU."""
    import torch

    # is_bf16_supported() alone also says True on pre-Ampere GPUs (T4, V100), where bf16 is only emulated at a
    # fraction of the speed; including_emulation=False asks about the hardware
    if torch.cuda.is_bf16_supported(including_emulation=False):
        return "bfloat16", "the GPU has bf16 hardware"
    return "float16", "the GPU has no bf16 hardware (fp16 autocast with a GradScaler)"


def cuda_half_dtype():
    """bf16 where the GPU has bf16 tensor cores (sm80+), else fp16 (trained with fp16 autocast + GradScaler)."""
    import torch

    return getattr(torch, cuda_auto_dtype()[0])


def choose_dtype(dtype: str, device: str) -> tuple[str, str]:
    """``(dtype name, reason)``: the configured dtype, or for ``auto`` the device's fastest well-supported one.

    CPU: bfloat16 only where the CPU computes it natively (:func:`recsft.runtime.cpu_bf16_native`), else float32.
    """
    if dtype != "auto":
        return dtype, "dtype in the config"
    if device == "cuda":
        return cuda_auto_dtype()
    if device == "cpu":
        from .runtime import cpu_auto_dtype

        return cpu_auto_dtype()
    return "float32", f"auto on {device}"


def resolve_dtype(dtype: str, device: str):
    import torch

    return getattr(torch, choose_dtype(dtype, device)[0])


def sharded_launch() -> str | None:
    """``"FSDP"`` or ``"DeepSpeed ZeRO-3"`` when accelerate launched this process with sharded parameters."""
    import torch

    # without CUDA accelerate runs an FSDP config as plain multi-process DDP (nothing is sharded)
    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() in ("1", "true") and torch.cuda.is_available():
        return "FSDP"
    if (os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() in ("1", "true")
            and os.environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE") == "3"):
        return "DeepSpeed ZeRO-3"
    return None


def kbit_problem(bits: int, device: str) -> str | None:
    """Why the base cannot be loaded in ``bits``-bit with bitsandbytes on ``device`` (None = it can).

    bitsandbytes >= 0.47 quantizes to 4-bit NF4 on CPU too; 8-bit on CPU and MPS are not offered here.
    """
    if importlib.util.find_spec("bitsandbytes") is None:
        return "bitsandbytes is not installed"
    if device == "cuda":
        return None
    if device == "cpu" and bits == 4:
        from importlib.metadata import version

        have = version("bitsandbytes")
        if tuple(int(x) for x in have.split(".")[:2] if x.isdigit()) < (0, 47):
            return f"bitsandbytes {have} has no 4-bit CPU kernels (needs >= 0.47)"
        return None
    return f"{bits}-bit bitsandbytes is not supported on {device} here (4-bit works on CUDA and CPU, 8-bit on CUDA)"


def bnb_config(bits: int, compute_dtype, quant_storage=None):
    """NF4 with double quantization (QLoRA); ``quant_storage`` set for FSDP/ZeRO-3, which shard by dtype."""
    import torch
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(load_in_4bit=bits == 4, load_in_8bit=bits == 8, bnb_4bit_quant_type="nf4",
                              bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=compute_dtype,
                              bnb_4bit_quant_storage=quant_storage or torch.uint8)


def load_model(name_or_path: str, device: str, dtype: str = "auto", flash_attn: str = "auto",
               quantization_bit: int | None = None, trust_remote_code: bool = False):
    """Causal LM on ``device``; 4/8-bit (bitsandbytes) where supported, plain weights elsewhere with a log line.

    Under FSDP / ZeRO-3 the plain model stays on the CPU: the trainer shards it onto the GPUs (a full copy per
    GPU first would need the memory sharding is meant to save).
    """
    from transformers import AutoModelForCausalLM

    import torch

    from .runtime import describe

    name, why = choose_dtype(dtype, device)
    torch_dtype = getattr(torch, name)
    logger.info("%s", describe(device, name, why))
    kwargs = dict(dtype=torch_dtype, attn_implementation=resolve_attn_implementation(flash_attn, device),
                  trust_remote_code=trust_remote_code)
    sharded = sharded_launch()
    if quantization_bit:
        why = kbit_problem(quantization_bit, device)
        if why is None:
            # FSDP/ZeRO-3 flatten parameters of one dtype: the 4-bit weights must be stored in the compute dtype
            storage = torch_dtype if sharded and quantization_bit == 4 else None
            kwargs["quantization_config"] = bnb_config(quantization_bit, torch_dtype, storage)
            kwargs["device_map"] = {"": _local_cuda_index() if device == "cuda" else device}
            logger.info("QLoRA: loading the base model in %d-bit (NF4) with bitsandbytes on %s, compute dtype %s%s",
                        quantization_bit, device, str(torch_dtype).replace("torch.", ""),
                        f", stored as {str(storage).replace('torch.', '')} for {sharded}" if storage else "")
        else:
            logger.info("QLoRA unavailable (%s): training plain LoRA in %s", why,
                        str(torch_dtype).replace("torch.", ""))
    try:
        model = AutoModelForCausalLM.from_pretrained(local_model_path(name_or_path), **kwargs)
    except OSError as e:  # weight files missing, hub id unknown, network down
        raise ConfigError([f"model_name_or_path: cannot load {name_or_path!r} ({str(e).splitlines()[0][:200]}); "
                           f"use a complete model folder, a .gguf file or a reachable hub id"]) from None
    if device == "cpu" and is_kbit(model):
        _keep_unpackable_4bit_layers_plain(model)
        import importlib.util

        if importlib.util.find_spec("kernels") is None:  # the message bitsandbytes would log (recsft.runtime)
            logger.info("4-bit layers on the CPU: bitsandbytes has a faster CPU kernel with `pip install kernels` "
                        "(optional)")
    if "quantization_config" not in kwargs and not sharded:
        model.to(f"cuda:{_local_cuda_index()}" if device == "cuda" else device)
    return model


_SHAPES: dict[tuple[str, bool], dict[str, tuple[int, int]]] = {}


def linear_layer_shapes(name_or_path: str, trust_remote_code: bool = False) -> dict[str, tuple[int, int]]:
    """``{module name: (in_features, out_features)}`` of every linear layer below the LM head.

    Built from the model's config on the ``meta`` device: no weights are read or allocated, so this is how
    ``lora_target`` and adapter shapes are checked before the model loads.
    """
    key = (name_or_path, trust_remote_code)
    if key not in _SHAPES:
        import torch
        from transformers import AutoConfig, AutoModelForCausalLM

        try:
            config = AutoConfig.from_pretrained(local_model_path(name_or_path), trust_remote_code=trust_remote_code)
        except (OSError, ValueError) as e:
            raise ConfigError([f"model_name_or_path: {name_or_path!r} has no readable model config "
                               f"({str(e).splitlines()[0][:200]}); use a model folder, .gguf file or hub id"]) from None
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
        _SHAPES[key] = {name: (m.in_features, m.out_features) for name, m in model.named_modules()
                        if isinstance(m, torch.nn.Linear) and name != "lm_head"}
        _SHAPES[key]["__class__"] = type(model).__name__  # type: ignore[assignment]
    return {k: v for k, v in _SHAPES[key].items() if k != "__class__"}


def _local_cuda_index() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def is_kbit(model) -> bool:
    return bool(getattr(model, "is_loaded_in_4bit", False) or getattr(model, "is_loaded_in_8bit", False))


def keep_trainable_fp32(model) -> int:
    """Cast trainable (LoRA) parameters back to float32; returns how many were not.

    TRL's SFTTrainer casts every trainable parameter of a quantized model to bf16 when it is built; AdamW then
    updates bf16 weights, and updates below bf16's resolution (~0.4% of the weight) are lost. Called after
    the trainer is built, before its optimizer exists, so the optimizer holds the float32 tensors.
    """
    import torch

    changed = 0
    for param in model.parameters():
        if param.requires_grad and param.dtype != torch.float32:
            param.data = param.data.float()
            changed += 1
    return changed


def _keep_unpackable_4bit_layers_plain(model) -> None:
    """bitsandbytes' fast CPU inference layout needs in_features % 64 == 0 and out_features % 32 == 0 (every real
    chat model's layers do); other layers keep the standard layout instead of failing at the first eval forward."""
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu") and (module.in_features % 64 or module.out_features % 32):
            module.support_avx512bf16_for_cpu = False


def disable_cpu_4bit_inference_packing(model) -> None:
    """Keep bitsandbytes' 4-bit CPU weights in the trainable layout.

    On CPUs with AVX512-BF16, a ``Linear4bit`` in eval mode repacks its weight for a faster inference kernel
    that has no backward; after an in-training evaluation the next training steps would then backpropagate
    through it silently wrong. Training models therefore keep the standard layout.
    """
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False


def lora_target_modules(target: str) -> list[str] | str:
    """``all`` -> every linear layer of the transformer blocks; ``qv`` -> q/v; else a comma list."""
    target = target.strip()
    if target == "all":
        return "all-linear"
    if target == "qv":
        return ["q_proj", "v_proj"]
    return [t.strip() for t in target.split(",") if t.strip()]


def apply_lora(model, rank: int, alpha: int, dropout: float, target: str, gradient_checkpointing: bool = False):
    """Wrap ``model`` with fresh LoRA adapters; on a k-bit base, peft freezes every base weight.

    peft's ``prepare_model_for_kbit_training`` is not used: it upcasts the embeddings, norms and the (tied) LM
    head to float32, which puts the whole residual stream in fp32 under QLoRA. What it does that training
    needs happens elsewhere: ``get_peft_model`` freezes the base, the trainer enables checkpointing and the
    input gradients checkpointing needs (``activation_checkpointing``), and LoRA weights stay float32.
    """
    from peft import LoraConfig, get_peft_model

    if is_kbit(model):
        disable_cpu_4bit_inference_packing(model)
        for param in model.parameters():
            param.requires_grad = False
        if gradient_checkpointing:
            model.enable_input_require_grads()
    config = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=lora_target_modules(target),
                        bias="none", task_type="CAUSAL_LM")
    from .runtime import no_peft_deprecation

    with no_peft_deprecation():
        return get_peft_model(model, config)


def check_adapter(adapter_dir: str, base_model: str | None = None, flag: str = "--adapter_dir") -> dict:
    """Validate an adapter folder before loading; return its ``adapter_config.json``.

    Fails when the folder or its config is missing, or when it was trained on another base model
    (compared by model name, ignoring the cache folder a GGUF base was converted into). ``flag`` is the
    script's flag named in the messages.
    """
    path = Path(adapter_dir)
    if path.exists() and not path.is_dir():
        raise DataError(f"adapter_dir {adapter_dir!r}: is a file, not a folder; pass the adapter folder "
                        f"(the finetune_lora.py output_dir holding adapter_config.json) to {flag}")
    if not path.is_dir():
        raise DataError(f"adapter_dir {adapter_dir!r} does not exist; train one first "
                        f"(python scripts/finetune_lora.py --config ...) or pass {flag}")
    cfg_file = path / "adapter_config.json"
    if not cfg_file.is_file():
        raise DataError(f"{adapter_dir!r} has no adapter_config.json: not a LoRA adapter folder")
    try:
        cfg = json.loads(cfg_file.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DataError(f"{cfg_file}: corrupt adapter config ({e}); retrain or copy the adapter again") from None
    if not isinstance(cfg, dict):
        raise DataError(f"{cfg_file}: expected a JSON object, got a {type(cfg).__name__}; not a peft adapter config")
    if base_model is not None:
        trained = _base_name(cfg.get("base_model_name_or_path") or "")
        wanted = _base_name(local_model_path(base_model))
        if trained and wanted and trained != wanted:
            raise ConfigError([f"adapter {adapter_dir!r} was trained on {cfg.get('base_model_name_or_path')!r}, "
                               f"not on {base_model!r}; set model_name_or_path to its base model"])
    tensors = adapter_tensor_shapes(path)
    if base_model is not None:
        check_adapter_shapes(path, cfg, tensors, linear_layer_shapes(base_model), base_model)
    return cfg


def adapter_tensor_shapes(adapter_dir: Path) -> dict[str, list[int]]:
    """``{tensor name: shape}`` from the adapter's safetensors header (no tensor data read)."""
    weights = adapter_dir / "adapter_model.safetensors"
    if not weights.is_file():
        raise DataError(f"{adapter_dir}: no adapter_model.safetensors (an interrupted save, or not a peft adapter "
                        f"folder); retrain or copy the adapter again")
    from safetensors import safe_open

    try:
        with safe_open(str(weights), framework="pt") as f:
            return {k: list(f.get_slice(k).get_shape()) for k in f.keys()}
    except Exception as e:  # noqa: BLE001 - safetensors raises its own error types for truncated/corrupt files
        raise DataError(f"{weights}: unreadable safetensors file ({type(e).__name__}: {str(e)[:120]}); the file "
                        f"is corrupt or truncated, retrain or copy the adapter again") from None


def check_adapter_shapes(adapter_dir: Path, cfg: dict, tensors: dict[str, list[int]],
                         layers: dict[str, tuple[int, int]], base_model: str) -> None:
    """Every LoRA A/B matrix fits a linear layer of the base model (rank, in/out features)."""
    rank = None if cfg.get("rank_pattern") else cfg.get("r")  # per-layer ranks: check the feature sizes only
    for key, shape in tensors.items():
        for part in ("lora_A", "lora_B"):
            marker = f".{part}."
            if marker not in key:
                continue
            module = key.split(marker)[0].removeprefix("base_model.model.")
            if module not in layers:
                raise DataError(f"{adapter_dir}: tensor {key} targets {module!r}, which is not a linear layer of "
                                f"{base_model}; the adapter was trained on another base model")
            in_f, out_f = layers[module]
            want = [rank, in_f] if part == "lora_A" else [out_f, rank]
            feature = 1 if part == "lora_A" else 0  # the dimension fixed by the base model
            if len(shape) != 2 or shape[feature] != want[feature] or (isinstance(rank, int) and shape != want):
                raise DataError(f"{adapter_dir}: tensor {key} has shape {shape}, {base_model} needs {want} "
                                f"(r={rank}); the adapter was trained on another base model or rank")


def _base_name(path: str) -> str:
    name = Path(path.rstrip("/")).name
    if "-" in name and len(name.rsplit("-", 1)[-1]) == 12 and str(MODEL_CACHE) in path:
        name = name.rsplit("-", 1)[0]  # cached GGUF conversion: strip the key
    return name.lower()


def load_adapter(model, adapter_dir: str, base_model: str | None = None, checked: bool = False):
    """Attach a trained LoRA adapter for inference, checked with :func:`check_adapter` unless ``checked`` (the
    caller checked it already, before loading the model: ``recsft.evaluation.load_for_eval``)."""
    from peft import PeftModel

    if not checked:
        check_adapter(adapter_dir, base_model)
    from .runtime import no_peft_deprecation

    with no_peft_deprecation():
        return PeftModel.from_pretrained(model, adapter_dir)


# -------------------------------------------------------------------------------------- for training
def tokenizer_for(model_args):
    """The tokenizer named by the ``model`` config section (its own path, else the model's)."""
    return load_tokenizer(model_args.tokenizer_name_or_path or model_args.model_name_or_path,
                          model_args.trust_remote_code)


def model_for(model_args, lora, gradient_checkpointing: bool, seed: int = 42):
    """Base model + fresh LoRA adapters; the seed is set first so the adapter init is reproducible."""
    from transformers import set_seed

    set_seed(seed)
    device = get_device()
    if device == "cpu":
        from .runtime import set_threads

        set_threads(model_args.num_threads)
    model = load_model(model_args.model_name_or_path, device, model_args.dtype, model_args.flash_attn,
                       model_args.quantization_bit, model_args.trust_remote_code)
    model = apply_lora(model, lora.lora_rank, lora.lora_alpha, lora.lora_dropout, lora.lora_target,
                       gradient_checkpointing)
    trainable, total = model.get_nb_trainable_parameters()
    logger.info("LoRA: %s trainable of %s parameters (%.2f%%) on %s", f"{trainable:,}", f"{total:,}",
                100 * trainable / total, device)
    return model, device
