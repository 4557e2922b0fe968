"""Shared utilities for every recsft script (re-exported from the ``recsft`` package).

Ordered by pipeline stage: constants & config -> data I/O -> formatting -> tokenization ->
model loading -> inference -> evaluation -> report. Each stage lives in its own module under ``scripts/recsft/``.
"""

# --- constants & config -------------------------------------------------------------------------
from recsft.config import (  # noqa: F401
    ADAPTER_DIR, BASE_MODEL, MAX_NEW_TOKENS, TEMPERATURE, TOP_P, Config, ConfigError, dump_config, load_config,
    valid_keys,
)
from recsft.config import read_yaml as load_yaml_config  # noqa: F401  (earlier name: the raw YAML mapping)
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
    IGNORE_INDEX, load_tokenized_datasets, tokenize_func, tokenize_records,
)
from recsft.preprocess import load_tokenized_datasets as build_datasets  # noqa: F401  (earlier names)
from recsft.preprocess import load_tokenized_datasets as preprocess_datasets_parallel  # noqa: F401
# --- model loading --------------------------------------------------------------------------------
from recsft.modeling import (  # noqa: F401
    apply_lora, check_adapter, get_device, load_adapter, load_model, load_tokenizer,
)
# --- inference, evaluation & metrics -------------------------------------------------------------
from recsft.inference import generate, prompts_for, score  # noqa: F401
from recsft.metrics import compute_metrics, extract_answer, normalize_label  # noqa: F401
from recsft.evaluation import EvalSettings, evaluate  # noqa: F401
# --- report ---------------------------------------------------------------------------------------
from recsft.report import format_metrics, plot_roc, save_figure  # noqa: F401
