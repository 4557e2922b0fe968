"""Device, tokenizer, model, attention backend, LoRA / QLoRA and adapter loading."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import shutil
from pathlib import Path

from .io import resolve_asset

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


def resolve_model_path(name_or_path: str) -> tuple[str, str | None]:
    """``(path_or_hub_id, gguf_file)``; a ``.gguf`` file (or ``pkg://`` asset) becomes (its folder, its name)."""
    path = resolve_asset(name_or_path)
    if path.endswith(".gguf"):
        if not Path(path).is_file():
            raise FileNotFoundError(f"model_name_or_path: GGUF file {path!r} does not exist")
        return str(Path(path).parent), Path(path).name
    looks_like_hub_id = path.count("/") <= 1 and not path.startswith((".", "/", "~"))
    if not Path(path).exists() and not looks_like_hub_id:
        raise FileNotFoundError(f"model_name_or_path: local path {path!r} does not exist "
                                f"(use a hub id like Qwen/Qwen3-0.6B or an existing folder)")
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

    tok = AutoTokenizer.from_pretrained(local_model_path(name_or_path), trust_remote_code=trust_remote_code)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    if tok.chat_template is None:
        raise ValueError(f"tokenizer {name_or_path!r} has no chat template; use an instruct/chat model")
    tok.padding_side = padding_side
    return tok


def resolve_attn_implementation(flash_attn: str, device: str) -> str | None:
    """Map the ``flash_attn`` knob to ``attn_implementation``; ``auto`` falls back to SDPA with a log line."""
    if flash_attn == "false":
        return "sdpa"
    if flash_attn in ("sdpa", "eager"):
        return flash_attn
    has_fa = importlib.util.find_spec("flash_attn") is not None
    gpu_ok = False
    if device == "cuda":
        import torch

        gpu_ok = torch.cuda.get_device_capability()[0] >= 8
    if has_fa and gpu_ok:
        logger.info("Attention: flash_attention_2")
        return "flash_attention_2"
    why = "flash-attn is not installed" if not has_fa else f"device {device} does not support it (needs CUDA sm80+)"
    if flash_attn == "flash_attention_2":
        raise RuntimeError(f"flash_attn: flash_attention_2 requested but {why}; set flash_attn: auto or sdpa")
    logger.info("Flash Attention 2 unavailable (%s); falling back to PyTorch SDPA", why)
    return "sdpa"


def cuda_auto_dtype() -> tuple[str, str]:
    """``(dtype name, reason)`` for ``dtype: auto`` on a CUDA GPU."""
    import torch

    if torch.cuda.is_bf16_supported():
        return "bfloat16", "the GPU supports bf16"
    return "float16", "the GPU lacks bf16"


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


def load_model(name_or_path: str, device: str, dtype: str = "auto", flash_attn: str = "auto",
               quantization_bit: int | None = None, trust_remote_code: bool = False):
    """Causal LM on ``device``; 4/8-bit (bitsandbytes) only on CUDA, plain weights elsewhere with a log line."""
    from transformers import AutoModelForCausalLM

    import torch

    from .runtime import describe

    name, why = choose_dtype(dtype, device)
    torch_dtype = getattr(torch, name)
    logger.info("%s", describe(device, name, why))
    kwargs = dict(dtype=torch_dtype, attn_implementation=resolve_attn_implementation(flash_attn, device),
                  trust_remote_code=trust_remote_code)
    if quantization_bit:
        if device == "cuda" and importlib.util.find_spec("bitsandbytes") is not None:
            from transformers import BitsAndBytesConfig

            kwargs["quantization_config"] = BitsAndBytesConfig(
                load_in_4bit=quantization_bit == 4, load_in_8bit=quantization_bit == 8,
                bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch_dtype)
            kwargs["device_map"] = {"": _local_cuda_index()}
            logger.info("QLoRA: loading the base model in %d-bit (NF4) with bitsandbytes", quantization_bit)
        else:
            why = "bitsandbytes is not installed" if device == "cuda" else f"device is {device}"
            logger.info("QLoRA needs CUDA and bitsandbytes (%s): training plain LoRA in %s", why,
                        str(torch_dtype).replace("torch.", ""))
    model = AutoModelForCausalLM.from_pretrained(local_model_path(name_or_path), **kwargs)
    if "quantization_config" not in kwargs:
        model.to(f"cuda:{_local_cuda_index()}" if device == "cuda" else device)
    return model


def _local_cuda_index() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def lora_target_modules(target: str) -> list[str] | str:
    """``all`` -> every linear layer of the transformer blocks; ``qv`` -> q/v; else a comma list."""
    target = target.strip()
    if target == "all":
        return "all-linear"
    if target == "qv":
        return ["q_proj", "v_proj"]
    return [t.strip() for t in target.split(",") if t.strip()]


def apply_lora(model, rank: int, alpha: int, dropout: float, target: str, gradient_checkpointing: bool = False):
    """Wrap ``model`` with fresh LoRA adapters (k-bit models are prepared for training first)."""
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    if getattr(model, "is_loaded_in_4bit", False) or getattr(model, "is_loaded_in_8bit", False):
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=gradient_checkpointing)
    config = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=lora_target_modules(target),
                        bias="none", task_type="CAUSAL_LM")
    return get_peft_model(model, config)


def check_adapter(adapter_dir: str, base_model: str | None = None) -> dict:
    """Validate an adapter folder before loading; return its ``adapter_config.json``.

    Fails when the folder or its config is missing, or when it was trained on another base model
    (compared by model name, ignoring the cache folder a GGUF base was converted into).
    """
    path = Path(adapter_dir)
    if not path.is_dir():
        raise FileNotFoundError(f"adapter_dir {adapter_dir!r} does not exist; train one first "
                                f"(python scripts/finetune_lora.py --config ...) or pass --adapter_dir")
    cfg_file = path / "adapter_config.json"
    if not cfg_file.is_file():
        raise FileNotFoundError(f"{adapter_dir!r} has no adapter_config.json: not a LoRA adapter folder")
    cfg = json.loads(cfg_file.read_text(encoding="utf-8"))
    if base_model is not None:
        trained = _base_name(cfg.get("base_model_name_or_path") or "")
        wanted = _base_name(local_model_path(base_model))
        if trained and wanted and trained != wanted:
            raise ValueError(f"adapter {adapter_dir!r} was trained on {cfg.get('base_model_name_or_path')!r}, "
                             f"not on {base_model!r}; set model_name_or_path to its base model")
    return cfg


def _base_name(path: str) -> str:
    name = Path(path.rstrip("/")).name
    if "-" in name and len(name.rsplit("-", 1)[-1]) == 12 and str(MODEL_CACHE) in path:
        name = name.rsplit("-", 1)[0]  # cached GGUF conversion: strip the key
    return name.lower()


def load_adapter(model, adapter_dir: str, base_model: str | None = None):
    """Attach a trained LoRA adapter (checked with :func:`check_adapter`) for inference."""
    from peft import PeftModel

    check_adapter(adapter_dir, base_model)
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
