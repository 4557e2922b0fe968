"""The two record formats, prompt text, chat messages, and dataset name resolution.

Training format (``train.json`` / ``eval.json``)::

    {"instruction": "...", "input": "User's last 15 watched movies:\\n1. ...", "output": "Yes", "system": "..."}

Test format (``test_raw.jsonl``)::

    {"user_id": 1, "history_titles": [...], "history_ratings": [...], "candidate_title": "...",
     "candidate_movie_id": 50, "label": "Yes"}

Both formats render to the same user message, so a model sees identical text in training and inference.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from .io import DataError, load_json, resolve_asset

DEFAULT_SYSTEM_PROMPT = (
    "You are a movie recommendation assistant. Given a user's recent viewing history with ratings, "
    "predict whether the user will like the candidate movie. Answer with a single word: Yes or No."
)
INSTRUCTION = "Predict whether the user will like the candidate movie. Answer only Yes or No."
TRAIN_FIELDS = ("instruction", "input", "output")
TEST_FIELDS = ("history_titles", "history_ratings", "candidate_title", "label")
LABELS = {"yes": "Yes", "no": "No", "1": "Yes", "0": "No", "true": "Yes", "false": "No"}


def build_input_text(history_titles: list[str], history_ratings: list[float], candidate_title: str,
                     candidate_features: list[str] | None = None) -> str:
    """The user-history block of the prompt: numbered past movies with their ratings, then the candidate.

    ``candidate_features``: optional extra lines (genres, earlier like-rates) placed under the candidate line.
    """
    lines = [f"User's last {len(history_titles)} watched movies:"]
    for i, (title, rating) in enumerate(zip(history_titles, history_ratings), 1):
        lines.append(f"{i}. {title} (rating ≈ {float(rating):.1f})")
    lines.append("")
    lines.append(f"Candidate movie: {candidate_title}")
    lines.extend(candidate_features or [])
    lines.append("Will the user like the candidate movie? Answer Yes or No.")
    return "\n".join(lines)


def session_next_text(previous_rating: float, candidate_title: str, candidate_features: list[str] | None = None) -> str:
    """A later user turn of a session: the true rating of the previous candidate, then the next candidate.

    Kept short on purpose (the question and answer format are set by the first turn and the system prompt):
    later turns are what makes a session cheaper per label than single questions.
    """
    lines = [f"Rated {float(previous_rating):.1f}. Next candidate: {candidate_title}"]
    lines.extend(candidate_features or [])
    return "\n".join(lines)


def record_format(record: dict[str, Any]) -> str:
    """``"train"`` (instruction/input/output), ``"test"`` (history_titles/candidate_title/label) or
    ``"session"`` (a multi-turn run of candidates under ``turns``)."""
    if "turns" in record:
        return "session"
    if "instruction" in record or "input" in record or "output" in record:
        return "train"
    if "history_titles" in record or "candidate_title" in record:
        return "test"
    raise DataError(f"record has neither training fields {TRAIN_FIELDS} nor test fields {TEST_FIELDS}; "
                    f"got keys {sorted(record)}")


def normalize_label(value: Any) -> str | None:
    """``"Yes"``/``"No"`` from a label value (Yes/No in any case, 1/0, true/false), else None."""
    if value is None:
        return None
    return LABELS.get(str(value).strip().lower())


def format_prompt(record: dict[str, Any], system_prompt: str | None = None) -> dict[str, Any]:
    """Return ``{"system", "user", "answer"}`` for a record of either format.

    ``answer`` is ``"Yes"``/``"No"`` or None when the record has no label. ``system_prompt`` overrides
    the record's own ``system`` field; otherwise :data:`DEFAULT_SYSTEM_PROMPT` is used.
    Raises :class:`DataError` naming the missing or wrong key.
    """
    kind = record_format(record)
    if kind == "session":
        raise DataError("session record (field 'turns'): holds several questions; train on it with the session "
                        "dataset entries (movielens_session_*), score it with infer_lora --eval_mode score")
    if kind == "train":
        missing = [k for k in ("instruction", "input") if not isinstance(record.get(k), str)]
        if missing:
            raise DataError(f"training record: missing or non-string field(s) {missing}")
        user = f"{record['instruction']}\n\n{record['input']}" if record["instruction"] else record["input"]
        raw_label = record.get("output")
    else:
        missing = [k for k in ("history_titles", "history_ratings", "candidate_title") if k not in record]
        if missing:
            raise DataError(f"test record: missing field(s) {missing}")
        titles, ratings = record["history_titles"], record["history_ratings"]
        if not isinstance(titles, list) or not isinstance(ratings, list) or len(titles) != len(ratings):
            raise DataError("test record: history_titles and history_ratings must be lists of the same length")
        text = build_input_text(titles, ratings, str(record["candidate_title"]), record.get("candidate_features"))
        user = f"{INSTRUCTION}\n\n{text}"
        raw_label = record.get("label")
    answer = normalize_label(raw_label)
    if raw_label is not None and answer is None:
        key = "output" if kind == "train" else "label"
        raise DataError(f"{key}: {raw_label!r} is not a Yes/No label (use \"Yes\" or \"No\")")
    system = system_prompt or record.get("system") or DEFAULT_SYSTEM_PROMPT
    return {"system": system, "user": user, "answer": answer}


def to_chat_messages(record: dict[str, Any], system_prompt: str | None = None,
                     include_answer: bool = True) -> list[dict[str, str]]:
    """Chat messages (system, user[, assistant]) for ``tokenizer.apply_chat_template``."""
    p = format_prompt(record, system_prompt)
    messages = [{"role": "system", "content": p["system"]}, {"role": "user", "content": p["user"]}]
    if include_answer:
        if p["answer"] is None:
            raise DataError("record has no Yes/No label to train on (field 'output' or 'label')")
        messages.append({"role": "assistant", "content": p["answer"]})
    return messages


def validate_records(records: list[dict[str, Any]], path: str, need_label: bool = True) -> None:
    """Check every record up front; raise one error naming the first bad records (1-based) and keys."""
    problems = []
    for i, rec in enumerate(records, 1):
        try:
            p = format_prompt(rec)
            if need_label and p["answer"] is None:
                raise DataError("no Yes/No label (field 'output' in training format, 'label' in test format)")
        except DataError as e:
            problems.append(f"{path}: record {i}: {e}")
            if len(problems) >= 5:
                problems.append("... (stopping after 5 bad records)")
                break
    if problems:
        raise DataError("\n".join(problems))


def resolve_dataset(name: str, dataset_dir: str | os.PathLike = ".") -> str:
    """Resolve a dataset name through ``<dataset_dir>/dataset_info.json`` (LLaMA-Factory's registry).

    A name that is an existing path, ends in .json/.jsonl, or is a ``pkg://`` asset is returned as is.
    Registry entry: ``{"movielens_train": {"file_name": "data/movielens_qwen3/train.json", ...}}``;
    ``file_name`` is relative to ``dataset_dir``.
    """
    if not name:
        raise DataError("dataset name is empty")
    if name.startswith("pkg://"):
        return resolve_asset(name)
    if Path(name).exists() or name.endswith((".json", ".jsonl")):
        return name
    info_path = Path(dataset_dir) / "dataset_info.json"
    if not info_path.exists():
        raise DataError(f"dataset {name!r}: not a file, and no {info_path} to look it up in; "
                        f"set dataset_dir or give a file path")
    info = load_json(info_path)
    if name not in info:
        raise DataError(f"dataset {name!r} is not in {info_path}; known names: {', '.join(sorted(info))}")
    entry = info[name]
    file_name = entry.get("file_name") if isinstance(entry, dict) else None
    if not file_name:
        raise DataError(f"{info_path}: entry {name!r} has no 'file_name'")
    return str(Path(dataset_dir) / file_name)
