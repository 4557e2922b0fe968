"""Shared utilities for every recsft script (re-exported from the ``recsft`` package).

Ordered by pipeline stage: constants & config -> data I/O -> formatting -> tokenization ->
model loading -> inference -> metrics. Each stage lives in its own module under ``scripts/recsft/``.
"""

# --- constants & config -------------------------------------------------------------------------
from recsft.config import (  # noqa: F401
    ADAPTER_DIR, BASE_MODEL, MAX_NEW_TOKENS, TEMPERATURE, TOP_P, Config, ConfigError, load_config,
    load_yaml_config, valid_keys,
)
# --- data I/O -------------------------------------------------------------------------------------
from recsft.io import (  # noqa: F401
    DataError, load_data, load_json, resolve_asset, write_json_atomic, write_jsonl_atomic,
)
# --- formatting -----------------------------------------------------------------------------------
from recsft.formatting import (  # noqa: F401
    DEFAULT_SYSTEM_PROMPT, INSTRUCTION, chat_texts, format_prompt, load_records, render_records, resolve_dataset,
    to_chat_messages, validate_records,
)
# --- tokenization ---------------------------------------------------------------------------------
from recsft.preprocess import (  # noqa: F401
    IGNORE_INDEX, build_datasets, preprocess_datasets_parallel, tokenize_func, tokenize_records,
)
# --- model loading --------------------------------------------------------------------------------
from recsft.modeling import (  # noqa: F401
    apply_lora, check_adapter, get_device, load_adapter, load_model, load_tokenizer,
)
# --- inference & metrics --------------------------------------------------------------------------
from recsft.inference import generate, prompts_for, score  # noqa: F401
from recsft.metrics import compute_metrics, extract_answer  # noqa: F401
