"""The two record formats, prompt text, chat messages and their chat-template rendering, dataset loading.

Training format (``train.json`` / ``eval.json``)::

    {"instruction": "...", "input": "User's last 15 watched movies:\\n1. ...", "output": "Yes", "system": "..."}

Test format (``test_raw.jsonl``)::

    {"user_id": 1, "history_titles": [...], "history_ratings": [...], "candidate_title": "...",
     "candidate_movie_id": 50, "label": "Yes"}

Both formats render to the same user message, so a model sees identical text in training and inference.
"""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path
from typing import Any, Sequence

from .io import DataError, load_data, load_json, resolve_asset
from .metrics import normalize_label

logger = logging.getLogger(__name__)

DEFAULT_SYSTEM_PROMPT = (
    "You are a movie recommendation assistant. Given a user's recent viewing history with ratings, "
    "predict whether the user will like the candidate movie. Answer with a single word: Yes or No."
)
INSTRUCTION = "Predict whether the user will like the candidate movie. Answer only Yes or No."
TRAIN_FIELDS = ("instruction", "input", "output")
TEST_FIELDS = ("history_titles", "history_ratings", "candidate_title", "label")
_USER, _ANSWER = "\u2063RECSFT_USER\u2063", "\u2063RECSFT_ANSWER\u2063"  # chat-template sentinels
_VERIFY_FIRST = 16  # records whose fast rendering is checked against the real template


RETRIEVED_HEADER = "User's {n} earlier movies most similar to the candidate:"


def build_input_text(history_titles: list[str], history_ratings: list[float], candidate_title: str,
                     candidate_features: list[str] | None = None, history_header: str | None = None) -> str:
    """The user-history block of the prompt: numbered past movies with their ratings, then the candidate.

    ``candidate_features``: optional extra lines (genres, earlier like-rates) placed under the candidate line.
    ``history_header``: the history's heading (``{n}`` = its length); default "User's last {n} watched movies:".
    """
    header = history_header or "User's last {n} watched movies:"
    lines = [header.format(n=len(history_titles))]
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


BLOCK_QUESTION = "Will the user like the candidate movie below? Answer Yes or No."


def block_prefix_text(history_titles: list[str], history_ratings: list[float], user_features: list[str] | None = None,
                      history_header: str | None = None) -> str:
    """The shared part of a candidate-block record's user message: instruction, history, user lines, question.

    It ends with a newline, so the first token of every candidate block starts a new pre-token and the prefix
    tokenizes the same alone as in front of any block.
    """
    header = history_header or "User's last {n} watched movies:"
    lines = [INSTRUCTION, "", header.format(n=len(history_titles))]
    lines += [f"{i}. {t} (rating ≈ {float(r):.1f})" for i, (t, r) in enumerate(zip(history_titles, history_ratings), 1)]
    lines += ["", *(user_features or []), BLOCK_QUESTION, ""]
    return "\n".join(lines)



def block_candidate_text(candidate_title: str, candidate_features: list[str] | None = None) -> str:
    """One candidate block's part of the user message: only what differs between candidates."""
    return "\n".join([f"Candidate movie: {candidate_title}", *(candidate_features or [])])


def record_format(record: dict[str, Any]) -> str:
    """``"train"`` (instruction/input/output), ``"test"`` (history_titles/candidate_title/label),
    ``"session"`` (a multi-turn run of candidates under ``turns``) or ``"blocks"`` (one shared ``prefix`` and
    candidate ``blocks``)."""
    if "turns" in record:
        return "session"
    if "blocks" in record:
        return "blocks"
    if "instruction" in record or "input" in record or "output" in record:
        return "train"
    if "history_titles" in record or "candidate_title" in record:
        return "test"
    raise DataError(f"record has neither training fields {TRAIN_FIELDS} nor test fields {TEST_FIELDS}; "
                    f"got keys {sorted(record)}")


RATING_SCALE = (0.5, 5.0)  # MovieLens (ml-latest-small has half stars): the scale of data prepared without one


def data_rating_scale(source: str | os.PathLike | None) -> tuple[float, float]:
    """The rating scale of the data a file belongs to: ``params.rating_scale`` of the stats file prepare_data wrote
    next to it (``prepare_data.py --rating-scale``), else :data:`RATING_SCALE`."""
    folder = Path(source).parent if source and Path(source).is_file() else None
    for name in ("stats.json", "session_stats.json") if folder else ():
        if (folder / name).is_file():
            try:
                scale = load_json(folder / name).get("params", {}).get("rating_scale")
            except (DataError, AttributeError):
                continue
            if isinstance(scale, list) and len(scale) == 2 and all(
                    isinstance(x, (int, float)) and not isinstance(x, bool) for x in scale) and scale[0] < scale[1]:
                return float(scale[0]), float(scale[1])
    return RATING_SCALE


def check_history(titles: list, ratings: list, candidate_title: Any,
                  scale: tuple[float, float] = RATING_SCALE) -> None:
    """Titles are non-empty strings and ratings numbers on the data's rating ``scale``; else a DataError naming the
    item."""
    for i, title in enumerate(titles, 1):
        if not isinstance(title, str) or not title.strip():
            raise DataError(f"history_titles[{i}]: expected a non-empty title string, got {title!r}")
    if not isinstance(candidate_title, str) or not candidate_title.strip():
        raise DataError(f"candidate_title: expected a non-empty title string, got {candidate_title!r}")
    lo, hi = scale
    for i, rating in enumerate(ratings, 1):
        ok = isinstance(rating, (int, float)) and not isinstance(rating, bool) and math.isfinite(rating)
        if not ok or not lo <= rating <= hi:
            raise DataError(f"history_ratings[{i}]: expected a number from {lo} to {hi}, got {rating!r}")


def format_prompt(record: dict[str, Any], system_prompt: str | None = None,
                  rating_scale: tuple[float, float] = RATING_SCALE) -> dict[str, Any]:
    """Return ``{"system", "user", "answer"}`` for a record of either format.

    ``answer`` is ``"Yes"``/``"No"`` or None when the record has no label. ``system_prompt`` overrides
    the record's own ``system`` field; otherwise :data:`DEFAULT_SYSTEM_PROMPT` is used. ``rating_scale``: the
    data's scale (:func:`data_rating_scale`), which a test-format record's history ratings must lie on.
    Raises :class:`DataError` naming the missing or wrong key.
    """
    kind = record_format(record)
    if kind == "session":
        raise DataError("session record (field 'turns'): holds several questions; train on it with the session "
                        "dataset entries (movielens_session_*), score it with infer_lora --eval_mode score")
    if kind == "blocks":
        raise DataError("candidate-block record (field 'blocks'): holds several questions; train on it with the "
                        "blocks dataset entries (movielens_blocks_*), score it with infer_lora --eval_mode score")
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
        check_history(titles, ratings, record["candidate_title"], rating_scale)
        text = build_input_text(titles, ratings, str(record["candidate_title"]), record.get("candidate_features"),
                                record.get("history_header"))
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
    scale = data_rating_scale(path)
    for i, rec in enumerate(records, 1):
        try:
            if isinstance(rec, dict) and "turns" in rec:
                check_session_record(rec, "session record")
                continue
            if isinstance(rec, dict) and "blocks" in rec:
                check_blocks_record(rec, "candidate-block record")
                continue
            p = format_prompt(rec, rating_scale=scale)
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
    if not isinstance(info, dict):
        raise DataError(f"{info_path}: the top level must be an object mapping dataset names to "
                        f"{{\"file_name\": ...}}, got a {type(info).__name__}")
    if name not in info:
        raise DataError(f"dataset {name!r} is not in {info_path}; known names: {', '.join(sorted(info))}")
    entry = info[name]
    file_name = entry.get("file_name") if isinstance(entry, dict) else None
    if not isinstance(file_name, str) or not file_name.strip():
        raise DataError(f"{info_path}: entry {name!r} needs a 'file_name' string (a path relative to "
                        f"{dataset_dir}), got {file_name!r}")
    return str(Path(dataset_dir) / file_name)


def load_records(name: str, dataset_dir: str | os.PathLike = ".",
                 max_samples: int | None = None) -> tuple[list[dict[str, Any]], str]:
    """``(records, path)``: resolve a dataset name or path, load it, check every record, keep the first N."""
    path = resolve_dataset(name, dataset_dir)
    records = load_data(path)
    validate_records(records, path)
    return (records[:max_samples] if max_samples else records), path


# ------------------------------------------------------------------------------ chat-template rendering
def chat_texts(tokenizer, system: str, user: str, answer: str | None,
               enable_thinking: bool = False) -> tuple[str, str]:
    """``(prompt_text, answer_text)`` rendered by the tokenizer's chat template (thinking disabled)."""
    messages = [{"role": "system", "content": system}, {"role": "user", "content": user}]
    prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True,
                                           enable_thinking=enable_thinking)
    if answer is None:
        return prompt, ""
    full = tokenizer.apply_chat_template(messages + [{"role": "assistant", "content": answer}], tokenize=False,
                                         enable_thinking=enable_thinking)
    if not full.startswith(prompt):
        from .config import ConfigError

        raise ConfigError(["chat template: the full conversation does not start with the generation prompt; "
                           "this template cannot be used for prompt/answer label masking; use another chat model"])
    return prompt, full[len(prompt):]


class _TemplateCache:
    """Chat template pieces per system prompt, rendered once with sentinels."""

    def __init__(self, tokenizer, enable_thinking: bool):
        self.tokenizer, self.enable_thinking = tokenizer, enable_thinking
        self.pieces: dict[str, tuple[str, str, str, str] | None] = {}

    def get(self, system: str):
        if system not in self.pieces:
            try:
                prompt, answer = chat_texts(self.tokenizer, system, _USER, _ANSWER, self.enable_thinking)
                ok = prompt.count(_USER) == 1 and answer.count(_ANSWER) == 1 and _ANSWER not in prompt
                p0, _, p1 = prompt.partition(_USER)
                a0, _, a1 = answer.partition(_ANSWER)
                self.pieces[system] = (p0, p1, a0, a1) if ok else None
            except Exception:  # templates that inspect content: use the slow path
                self.pieces[system] = None
        return self.pieces[system]

    def render(self, system: str, user: str, answer: str | None) -> tuple[str, str]:
        pieces = self.get(system)
        if pieces is None:
            return chat_texts(self.tokenizer, system, user, answer, self.enable_thinking)
        p0, p1, a0, a1 = pieces
        return p0 + user + p1, ("" if answer is None else a0 + answer + a1)


def render_records(records: Sequence[dict], tokenizer, system_prompt: str | None = None,
                   enable_thinking: bool = False, source: str = "data") -> tuple[list[str], list[str | None]]:
    """Prompt texts and answer texts (None when unlabelled) for every record (:func:`render_labelled`)."""
    prompts, answers, _ = render_labelled(records, tokenizer, system_prompt, enable_thinking, source)
    return prompts, answers


def render_labelled(records: Sequence[dict], tokenizer, system_prompt: str | None = None,
                    enable_thinking: bool = False,
                    source: str = "data") -> tuple[list[str], list[str | None], list[str | None]]:
    """Prompt texts, answer texts and labels ("Yes"/"No"/None) of every record, each record formatted once.

    The fast path is checked against the real template on the first records; any difference turns it off.
    Ratings are checked against the scale of the data ``source`` belongs to (:func:`data_rating_scale`).
    """
    cache = _TemplateCache(tokenizer, enable_thinking)
    scale = data_rating_scale(source)
    prompts, answers, labels = [], [], []
    for i, rec in enumerate(records):
        try:
            p = format_prompt(rec, system_prompt, scale)
        except DataError as e:
            raise DataError(f"{source}: record {i + 1}: {e}") from None
        prompt, answer_text = cache.render(p["system"], p["user"], p["answer"])
        if i < _VERIFY_FIRST:
            slow = chat_texts(tokenizer, p["system"], p["user"], p["answer"], enable_thinking)
            if (prompt, answer_text) != slow:
                logger.warning("chat template fast path differs from the real template; rendering every record")
                cache.get = lambda system: None  # type: ignore[method-assign]
                prompt, answer_text = slow
        prompts.append(prompt)
        answers.append(answer_text if p["answer"] is not None else None)
        labels.append(p["answer"])
    return prompts, answers, labels


# -------------------------------------------------------------------------------------- session format
_USER2 = "\u2063RECSFT_USER2\u2063"


def session_pieces(tokenizer, system: str, enable_thinking: bool = False) -> tuple[str, str, str, str, str]:
    """Template pieces ``(p0, p1, a0, a1, h)`` of a multi-turn session.

    The first question renders as ``p0 + user + p1`` (exactly the single format's prompt), every answer as
    ``a0 + answer + a1`` (the single format's answer), every later question as ``h + user + p1``, so each
    answer follows the same generation prompt as in the single format.
    """
    pieces = _TemplateCache(tokenizer, enable_thinking).get(system)
    if pieces is None:
        raise DataError("the chat template cannot be split into turns; the session format needs a ChatML-like "
                        "template (Qwen3, SmolLM2)")
    p0, p1, a0, a1 = pieces
    messages = [{"role": "system", "content": system}, {"role": "user", "content": _USER},
                {"role": "assistant", "content": _ANSWER}, {"role": "user", "content": _USER2}]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True,
                                         enable_thinking=enable_thinking)
    between = text[text.index(_ANSWER) + len(_ANSWER):text.index(_USER2)]
    if not between.startswith(a1) or not text.endswith(_USER2 + p1):
        raise DataError("the chat template renders later turns differently from the first; "
                        "the session format cannot be used with it")
    return p0, p1, a0, a1, between[len(a1):]


def check_session_record(rec: Any, where: str) -> None:
    """One line naming the record and key when a session record is malformed."""
    turns = rec.get("turns") if isinstance(rec, dict) else None
    if not isinstance(turns, list) or not turns:
        raise DataError(f"{where}: 'turns' must be a non-empty list")
    for j, t in enumerate(turns):
        if not isinstance(t, dict) or not isinstance(t.get("start"), str):
            raise DataError(f"{where}: turns[{j}] needs a string 'start'")
        if j and not isinstance(t.get("next"), str):
            raise DataError(f"{where}: turns[{j}] needs a string 'next'")
        if normalize_label(t.get("answer")) is None:
            raise DataError(f"{where}: turns[{j}].answer {t.get('answer')!r} is not Yes/No")


def session_texts(records: Sequence[dict], tokenizer, system_prompt: str | None = None,
                  enable_thinking: bool = False, source: str = "data") -> list[list[tuple[str, str, str]]]:
    """Per record, per turn: ``(prompt if the turn opens an example, prompt if it continues one, answer)``."""
    pieces: dict[str, tuple[str, ...]] = {}
    out = []
    for i, rec in enumerate(records):
        check_session_record(rec, f"{source}: record {i + 1}")
        system = system_prompt or rec.get("system") or DEFAULT_SYSTEM_PROMPT
        if system not in pieces:
            pieces[system] = session_pieces(tokenizer, system, enable_thinking)
        p0, p1, a0, a1, h = pieces[system]
        turns = [(p0 + t["start"] + p1, (h + t["next"] + p1) if j else "", a0 + normalize_label(t["answer"]) + a1)
                 for j, t in enumerate(rec["turns"])]
        if i < _VERIFY_FIRST:
            first = chat_texts(tokenizer, system, rec["turns"][0]["start"], normalize_label(rec["turns"][0]["answer"]),
                               enable_thinking)
            if first != (turns[0][0], turns[0][2]):
                raise DataError("the chat template's first turn differs from its pieces; the session format "
                                "cannot be used with it")
        out.append(turns)
    return out


# ------------------------------------------------------------------------------------ candidate blocks
def check_blocks_record(rec: Any, where: str) -> None:
    """One line naming the record and key when a candidate-block record is malformed."""
    blocks = rec.get("blocks") if isinstance(rec, dict) else None
    if not isinstance(rec.get("prefix") if isinstance(rec, dict) else None, str):
        raise DataError(f"{where}: needs a string 'prefix' (the shared history part of the question)")
    if not isinstance(blocks, list) or not blocks:
        raise DataError(f"{where}: 'blocks' must be a non-empty list")
    for j, b in enumerate(blocks):
        if not isinstance(b, dict) or not isinstance(b.get("text"), str) or not b["text"].strip():
            raise DataError(f"{where}: blocks[{j}] needs a non-empty string 'text'")
        if normalize_label(b.get("answer")) is None:
            raise DataError(f"{where}: blocks[{j}].answer {b.get('answer')!r} is not Yes/No")


def block_texts(records: Sequence[dict], tokenizer, system_prompt: str | None = None, enable_thinking: bool = False,
                source: str = "data") -> list[tuple[str, list[tuple[str, str]]]]:
    """Per record: ``(prefix text, [(block prompt text, answer text), ...])``, rendered by the chat template.

    ``prefix + block prompt`` is exactly the prompt of one ordinary question whose user message is
    ``record["prefix"] + block["text"]`` (checked against the real template on the first records), and the
    answer text is the single format's answer, so a block is scored like that question.
    """
    cache = _TemplateCache(tokenizer, enable_thinking)
    out = []
    for i, rec in enumerate(records):
        check_blocks_record(rec, f"{source}: record {i + 1}")
        system = system_prompt or rec.get("system") or DEFAULT_SYSTEM_PROMPT
        pieces = cache.get(system)
        if pieces is None:
            raise DataError("the chat template cannot be split around the user message; the blocks format needs a "
                            "ChatML-like template (Qwen3, SmolLM2)")
        p0, p1, a0, a1 = pieces
        blocks = [(b["text"] + p1, a0 + normalize_label(b["answer"]) + a1) for b in rec["blocks"]]
        if i < _VERIFY_FIRST:
            first = chat_texts(tokenizer, system, rec["prefix"] + rec["blocks"][0]["text"],
                               normalize_label(rec["blocks"][0]["answer"]), enable_thinking)
            if first != (p0 + rec["prefix"] + blocks[0][0], blocks[0][1]):
                raise DataError("the chat template renders a candidate block differently from one question; the "
                                "blocks format cannot be used with it")
        out.append((p0 + rec["prefix"], blocks))
    return out


def block_question(record: dict, j: int) -> dict:
    """Block ``j`` of a candidate-block record as one ordinary training-format question (the same text)."""
    block = record["blocks"][j]
    return {"instruction": "", "input": record["prefix"] + block["text"], "output": block["answer"],
            "system": record.get("system") or DEFAULT_SYSTEM_PROMPT}
