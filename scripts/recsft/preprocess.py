"""Chat template + tokenization + label masking, batched and cached.

``tokenize_func`` is the reference (one record, the LitGPT / LLaMA-Factory way): prompt ids from
``apply_chat_template(messages[:-1], add_generation_prompt=True)``, answer ids from the rest of the
full conversation, labels ``-100`` over the prompt; over-long examples lose tokens from the LEFT of
the prompt so the answer and its labels always survive.

``tokenize_to_arrow`` is the batched path that training uses (through ``load_tokenized_datasets`` and its
cache): prompts come from ``formatting.render_records`` (the chat template rendered once per system prompt
with sentinel strings and filled in by substitution, checked against the real template), each distinct
text piece is tokenized once in the Rust tokenizer, and the result is assembled with numpy into a pyarrow
table. ``tokenize_records`` returns the same as Python lists. Both equal ``tokenize_func``, which a test checks.
"""

from __future__ import annotations

import hashlib
import json
import logging
import itertools
import os
import re
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from .formatting import block_texts, chat_texts, format_prompt, render_records, resolve_dataset, session_texts
from .io import DataError, check_in_set, load_data, sha256_file

logger = logging.getLogger(__name__)
IGNORE_INDEX = -100
PREPROCESS_VERSION = "3"  # bump when the preprocessing logic changes: invalidates every cache
NO_USER = -1  # ``user_id`` of a row whose record has none


def user_codes(records: Sequence[dict]) -> np.ndarray:
    """One int64 per record for the ``user_id`` column of a tokenized table (the user travels with its rows).

    Integer ids (MovieLens) are kept as they are; any other ids (your own data's strings) become codes 0, 1, ...
    in order of first appearance, which is all grouping by user (UAUC) needs. ``NO_USER`` (-1) where a record has
    no ``user_id`` (the single format's training files do not keep it).
    """
    ids = [r.get("user_id") if isinstance(r, dict) else None for r in records]
    if all(isinstance(u, int) and not isinstance(u, bool) and u >= 0 for u in ids if u is not None):
        return np.asarray([NO_USER if u is None else u for u in ids], dtype=np.int64)
    codes: dict = {}
    return np.asarray([NO_USER if u is None else codes.setdefault(u, len(codes)) for u in ids], dtype=np.int64)


def answer_positions(labels) -> tuple:
    """Positions whose next token is a label (bool mask), and the first such position of each answer.

    The one definition of where answers are read from, for training (loss, eval step) and scoring alike. Works
    for padded ``(B, T)`` batches and for padding-free ``(1, ΣT)`` batches: answers are contiguous runs of labels
    separated by masked prompt tokens (``IGNORE_INDEX``).
    """
    import torch

    keep = torch.zeros_like(labels, dtype=torch.bool)
    keep[:, :-1] = labels[:, 1:] != IGNORE_INDEX
    starts = keep.clone()
    starts[:, 1:] &= ~keep[:, :-1]
    return keep, starts


def prompt_budget(tokenizer, cutoff_len: int | None, enable_thinking: bool = False) -> int | None:
    """Prompt tokens kept in front of the answer under ``cutoff_len``: one budget for training and inference.

    ``cutoff_len`` minus the longer of the two templated answers (with ChatML ``Yes<|im_end|>\n`` = 3 tokens),
    so a prompt is cut to the same tokens whether it is trained on with either label or answered at inference.
    None when ``cutoff_len`` is unset (no truncation).
    """
    if not cutoff_len:
        return None
    lengths = []
    for answer in ("Yes", "No"):
        _, text = chat_texts(tokenizer, "system", "user", answer, enable_thinking)
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        lengths.append(len(_answer_ids(ids, tokenizer.eos_token_id, cutoff_len)))
    return cutoff_len - max(lengths)


def _assemble(prompt_ids: list[int], answer_ids: list[int], cutoff_len: int, eos_id: int | None,
              budget: int | None = None) -> dict:
    answer_ids = _answer_ids(answer_ids, eos_id, cutoff_len)
    keep = min(cutoff_len - len(answer_ids), budget if budget is not None else cutoff_len)
    if len(prompt_ids) > keep:
        prompt_ids = prompt_ids[len(prompt_ids) - keep:]  # cut from the left: the answer survives
    return {"input_ids": prompt_ids + answer_ids,
            "labels": [IGNORE_INDEX] * len(prompt_ids) + answer_ids}


def tokenize_func(record: dict[str, Any], tokenizer, cutoff_len: int, system_prompt: str | None = None,
                  enable_thinking: bool = False) -> dict[str, list[int]]:
    """Tokenize one labelled record: ``input_ids``, ``attention_mask``, ``labels`` (-100 on the prompt)."""
    p = format_prompt(record, system_prompt)
    if p["answer"] is None:
        raise DataError("record has no Yes/No label to train on")
    prompt, answer = chat_texts(tokenizer, p["system"], p["user"], p["answer"], enable_thinking)
    out = _assemble(tokenizer(prompt, add_special_tokens=False)["input_ids"],
                    tokenizer(answer, add_special_tokens=False)["input_ids"], cutoff_len, tokenizer.eos_token_id,
                    prompt_budget(tokenizer, cutoff_len, enable_thinking))
    out["attention_mask"] = [1] * len(out["input_ids"])
    return out


# Pre-token boundaries of byte-level BPE (Qwen, GPT-2/SmolLM2): a lone newline between two non-spaces, and
# ASCII punctuation followed by a space and a non-space ("3." | " Star Wars (1977)" | " (rating ≈ 5.0)\n").
_PIECE_BOUNDARY = re.compile(r"(?<=\S\n)(?=\S)|(?<=[.,:;!?)\]])(?= \S)")


def _gather(src: np.ndarray, starts: np.ndarray, lens: np.ndarray) -> np.ndarray:
    """Concatenate ``src[starts[k]:starts[k] + lens[k]]`` for every k, without a Python loop."""
    out_starts = np.cumsum(lens) - lens
    return src[np.repeat(starts - out_starts, lens) + np.arange(int(lens.sum()))]


def _encode_by_pieces(texts: Sequence[str], tokenizer, batch_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Token ids of many texts as (flat values, offsets), tokenizing each distinct piece only once.

    Byte-level BPE never merges across a pre-token boundary, so a text's ids are the concatenation of
    its pieces' ids when it is cut at boundaries (``_PIECE_BOUNDARY``). The prompts are made of a few
    thousand distinct pieces (system prompt, instruction, "3.", " Star Wars (1977)", " (rating ≈ 5.0)"),
    so this tokenizes a tiny fraction of the text. :func:`encode_texts` verifies it against whole-text
    tokenization.
    """
    index: dict[str, int] = {}
    seq: list[int] = []
    counts = np.empty(len(texts), dtype=np.int64)
    for k, text in enumerate(texts):
        pieces = _PIECE_BOUNDARY.split(text)
        counts[k] = len(pieces)
        seq.extend(index.setdefault(p, len(index)) for p in pieces)
    unique = list(index)
    piece_ids: list[list[int]] = []
    for start in range(0, len(unique), batch_size):
        piece_ids.extend(tokenizer(unique[start:start + batch_size], add_special_tokens=False)["input_ids"])
    piece_len = np.fromiter((len(x) for x in piece_ids), dtype=np.int64, count=len(piece_ids))
    piece_flat = np.fromiter(itertools.chain.from_iterable(piece_ids), dtype=np.int32, count=int(piece_len.sum()))
    seq_arr = np.asarray(seq, dtype=np.int64)
    lens = piece_len[seq_arr]
    values = _gather(piece_flat, np.cumsum(piece_len)[seq_arr] - lens, lens)
    text_len = np.add.reduceat(lens, np.cumsum(counts) - counts) if len(texts) else np.zeros(0, np.int64)
    return values, np.concatenate([[0], np.cumsum(text_len)])


def encode_texts(texts: Sequence[str], tokenizer, batch_size: int = 4096,
                 verify: int = 256) -> tuple[np.ndarray, np.ndarray]:
    """Token ids (no special tokens added) of many texts as ``(flat int32 values, offsets)``.

    Uses the memoized fast path, checked exactly against whole-text tokenization on ``verify`` texts
    spread over the data; if any differs (some other tokenizer), tokenizes whole texts instead.
    """
    values, offsets = _encode_by_pieces(texts, tokenizer, batch_size)
    picks = list(range(0, len(texts), max(1, len(texts) // verify)))[:verify] if verify else []
    fast = [values[offsets[k]:offsets[k + 1]].tolist() for k in picks]
    if not picks or tokenizer([texts[k] for k in picks], add_special_tokens=False)["input_ids"] == fast:
        return values, offsets
    logger.warning("line-memoized tokenization differs for this tokenizer; tokenizing whole texts")
    ids: list[list[int]] = []
    for start in range(0, len(texts), batch_size):
        ids.extend(tokenizer(list(texts[start:start + batch_size]), add_special_tokens=False)["input_ids"])
    lens = np.fromiter((len(x) for x in ids), dtype=np.int64, count=len(ids))
    flat = np.fromiter(itertools.chain.from_iterable(ids), dtype=np.int32, count=int(lens.sum()))
    return flat, np.concatenate([[0], np.cumsum(lens)])


def tokenize_to_arrow(records: Sequence[dict], tokenizer, cutoff_len: int, system_prompt: str | None = None,
                      enable_thinking: bool = False, source: str = "data", batch_size: int = 4096):
    """Vectorized ``tokenize_func`` over many records -> a pyarrow Table (``input_ids``, ``labels``, ``user_id``)."""
    import pyarrow as pa

    prompts, answers = render_records(records, tokenizer, system_prompt, enable_thinking, source)
    missing = [i + 1 for i, a in enumerate(answers) if a is None]
    if missing:
        raise DataError(f"{source}: record {missing[0]} has no Yes/No label ('output' or 'label') to train on "
                        f"({len(missing)} such records)")
    kinds = sorted(set(answers))
    ans_ids = [_answer_ids(tokenizer(a, add_special_tokens=False)["input_ids"], tokenizer.eos_token_id, cutoff_len)
               for a in kinds]
    values, offsets = encode_texts(prompts, tokenizer, batch_size)
    which = np.asarray([kinds.index(a) for a in answers], dtype=np.int64)
    ans_len = np.asarray([len(a) for a in ans_ids], dtype=np.int64)[which]
    ans_start = len(values) + (np.cumsum([len(a) for a in ans_ids]) - [len(a) for a in ans_ids])[which]
    prompt_end = offsets[1:]
    keep = np.minimum(cutoff_len - ans_len, prompt_budget(tokenizer, cutoff_len, enable_thinking))
    prompt_start = np.maximum(offsets[:-1], prompt_end - keep)  # left truncation, as at inference
    starts = np.stack([prompt_start, ans_start], 1).reshape(-1)
    lens = np.stack([prompt_end - prompt_start, ans_len], 1).reshape(-1)
    flat_answers = np.asarray([i for a in ans_ids for i in a], dtype=np.int32)
    input_ids = _gather(np.concatenate([values, flat_answers]), starts, lens)
    labels = _gather(np.concatenate([np.full(len(values), IGNORE_INDEX, np.int32), flat_answers]), starts, lens)
    row_offsets = pa.array(np.concatenate([[0], np.cumsum(lens.reshape(-1, 2).sum(1))]), pa.int64())
    return pa.table({"input_ids": pa.LargeListArray.from_arrays(row_offsets, pa.array(input_ids)),
                     "labels": pa.LargeListArray.from_arrays(row_offsets, pa.array(labels)),
                     "user_id": pa.array(user_codes(records), pa.int64())})


def tokenize_any(records: Sequence[dict], tokenizer, cutoff_len: int, system_prompt: str | None = None,
                 enable_thinking: bool = False, source: str = "data"):
    """:func:`tokenize_sessions_to_arrow` for session records (field ``turns``), :func:`tokenize_blocks_to_arrow` for
    candidate-block records (``blocks``), else :func:`tokenize_to_arrow`."""
    kinds = {("turns" in r) + 2 * ("blocks" in r) if isinstance(r, dict) else 0 for r in records}
    if len(kinds) > 1:
        names = {1: "session records (field 'turns')", 2: "candidate-block records (field 'blocks')",
                 0: "single-question records"}
        raise DataError(f"{source}: mixes {' with '.join(names[k] for k in sorted(kinds, key=lambda k: -k))}; "
                        f"use one format per file")
    fn = {1: tokenize_sessions_to_arrow, 2: tokenize_blocks_to_arrow}.get(kinds.pop() if kinds else 0, tokenize_to_arrow)
    return fn(records, tokenizer, cutoff_len, system_prompt, enable_thinking, source=source)


def _answer_ids(ids: list[int], eos_id: int | None, cutoff_len: int) -> list[int]:
    if eos_id is not None and eos_id not in ids:
        ids = ids + [eos_id]
    if len(ids) >= cutoff_len:
        raise DataError(f"cutoff_len={cutoff_len} cannot hold the answer ({len(ids)} tokens) plus any "
                        f"prompt; raise cutoff_len (see scripts/check_seq_len.py)")
    return ids


def tokenize_records(records: Sequence[dict], tokenizer, cutoff_len: int, system_prompt: str | None = None,
                     enable_thinking: bool = False, source: str = "data", batch_size: int = 4096) -> dict:
    """Batched equivalent of ``tokenize_func`` as Python lists: ``{"input_ids": [...], "labels": [...]}``."""
    table = tokenize_to_arrow(records, tokenizer, cutoff_len, system_prompt, enable_thinking, source, batch_size)
    return table.to_pydict()


# -------------------------------------------------------------------------------------- session format
def plan_sessions(turn_lens: list[list[tuple[int, int, int]]], cutoff_len: int) -> list[list[tuple[int, int]]]:
    """Cut every session into examples that fit ``cutoff_len`` without cutting through an answer.

    ``turn_lens[r][j]`` = (tokens of the turn as an opening question, as a continuation, of its answer).
    Returns per example a list of ``(record, turn)``; an example's first turn is an opening question (its
    prompt is cut from the left when even one question does not fit, as in the single format).
    """
    examples: list[list[tuple[int, int]]] = []
    for r, turns in enumerate(turn_lens):
        used = cutoff_len + 1
        for j, (opening, cont, answer) in enumerate(turns):
            if j and used + cont + answer <= cutoff_len:
                examples[-1].append((r, j))
                used += cont + answer
            else:
                examples.append([(r, j)])
                used = min(opening + answer, cutoff_len)
    return examples


def check_question_fits(turn_lens: list[list[tuple[int, int, int]]], cutoff_len: int, budget: int,
                        source: str = "data") -> None:
    """Every example must still hold a question after the left cut: a turn that opens an example keeps at least
    as many tokens as its short follow-up question (the candidate line and the generation prompt), else the
    model would be trained on an answer to a history without a candidate. A :class:`DataError` naming
    ``cutoff_len`` otherwise."""
    worst = None
    for turns in turn_lens:
        for opening, cont, answer in turns:
            keep = min(cutoff_len - answer, budget)
            if keep < min(cont, opening) and (worst is None or cont + answer > worst):
                worst = cont + answer
    if worst is not None:
        raise DataError(f"cutoff_len={cutoff_len}: too small for the session examples of {source}: a question cut to "
                        f"fit would lose its candidate (one question and its answer need at least {worst} tokens, "
                        f"the full first question more); raise cutoff_len (see scripts/check_seq_len.py)")


def tokenize_sessions_to_arrow(records: Sequence[dict], tokenizer, cutoff_len: int, system_prompt: str | None = None,
                               enable_thinking: bool = False, source: str = "data", batch_size: int = 4096):
    """Session records -> a pyarrow Table (``input_ids``, ``labels``, ``user_id``): labels on every answer's tokens.

    A session longer than ``cutoff_len`` becomes several examples, split between turns; the split-off part
    opens with its turn's full question (15-movie history), so no answer is ever truncated.
    """
    import pyarrow as pa

    texts = session_texts(records, tokenizer, system_prompt, enable_thinking, source)
    flat = [t for turns in texts for t in turns]
    kinds = sorted({a for _, _, a in flat})
    ans_ids = {a: _answer_ids(tokenizer(a, add_special_tokens=False)["input_ids"], tokenizer.eos_token_id, cutoff_len)
               for a in kinds}
    cont_vals, cont_off = encode_texts([c for _, c, _ in flat], tokenizer, batch_size)
    open_vals, open_off = encode_texts([o for o, _, _ in flat], tokenizer, batch_size)
    starts = np.cumsum([0] + [len(t) for t in texts])
    lens = [[(int(open_off[k + 1] - open_off[k]), int(cont_off[k + 1] - cont_off[k]), len(ans_ids[flat[k][2]]))
             for k in range(starts[r], starts[r + 1])] for r in range(len(texts))]
    budget = prompt_budget(tokenizer, cutoff_len, enable_thinking)
    check_question_fits(lens, cutoff_len, budget, source)
    input_ids, labels, users = [], [], []
    codes = user_codes(records)
    for example in plan_sessions(lens, cutoff_len):
        users.append(codes[example[0][0]])
        ids: list[int] = []
        lab: list[int] = []
        for n, (r, j) in enumerate(example):
            k = starts[r] + j
            answer = ans_ids[flat[k][2]]
            if n == 0:
                prompt = open_vals[open_off[k]:open_off[k + 1]].tolist()
                keep = min(cutoff_len - len(answer), budget)
                prompt = prompt[max(0, len(prompt) - keep):]  # left truncation, as in the single format
            else:
                prompt = cont_vals[cont_off[k]:cont_off[k + 1]].tolist()
            ids += prompt + answer
            lab += [IGNORE_INDEX] * len(prompt) + answer
        input_ids.append(ids)
        labels.append(lab)
    return pa.table({"input_ids": pa.array(input_ids, pa.large_list(pa.int32())),
                     "labels": pa.array(labels, pa.large_list(pa.int32())),
                     "user_id": pa.array(np.asarray(users, dtype=np.int64), pa.int64())})


# ------------------------------------------------------------------------------------ candidate blocks
def plan_blocks(prefix_len: int, block_lens: list[int], cutoff_len: int) -> list[list[int]]:
    """Cut one record's blocks into examples of ``prefix + blocks`` that fit ``cutoff_len`` (the prefix repeated
    in each); a block is never cut. A block that fits only after a shorter prefix gets an example of its own."""
    examples: list[list[int]] = []
    used = cutoff_len + 1
    for j, n in enumerate(block_lens):
        if examples and used + n <= cutoff_len:
            examples[-1].append(j)
            used += n
        else:
            examples.append([j])
            used = prefix_len + n
    return examples


def tokenize_blocks_to_arrow(records: Sequence[dict], tokenizer, cutoff_len: int, system_prompt: str | None = None,
                             enable_thinking: bool = False, source: str = "data", batch_size: int = 4096):
    """Candidate-block records -> a pyarrow Table (``input_ids``, ``labels``, ``block_ids``, ``answer_keys``,
    ``user_id``).

    ``block_ids`` is 0 on the shared prefix and ``j + 1`` on the j-th block of the example (its candidate text,
    generation prompt and answer, the answer labelled); the model attends each block to the prefix and itself
    only (:func:`recsft.inference.block_attention`). ``answer_keys``: per answer, ``json.dumps([user_id,
    candidate_movie_id])`` (ids keep their type; null when the record lacks them). A record longer than
    ``cutoff_len`` becomes several examples, each with the whole prefix; a prefix that cannot fit beside one block
    loses tokens from the left.
    """
    import pyarrow as pa

    texts = block_texts(records, tokenizer, system_prompt, enable_thinking, source)
    kinds = sorted({a for _, blocks in texts for _, a in blocks})
    ans_ids = {a: _answer_ids(tokenizer(a, add_special_tokens=False)["input_ids"], tokenizer.eos_token_id, cutoff_len)
               for a in kinds}
    pre_vals, pre_off = encode_texts([p for p, _ in texts], tokenizer, batch_size)
    blk_vals, blk_off = encode_texts([b for _, blocks in texts for b, _ in blocks], tokenizer, batch_size)
    budget = prompt_budget(tokenizer, cutoff_len, enable_thinking)
    input_ids, labels, block_ids, keys, users = [], [], [], [], []
    codes = user_codes(records)
    k = 0
    for r, (_, blocks) in enumerate(texts):
        user = records[r].get("user_id")
        prefix = pre_vals[pre_off[r]:pre_off[r + 1]].tolist()
        pieces = [(blk_vals[blk_off[k + j]:blk_off[k + j + 1]].tolist(), ans_ids[a]) for j, (_, a) in enumerate(blocks)]
        k += len(blocks)
        for example in plan_blocks(len(prefix), [len(p) + len(a) for p, a in pieces], cutoff_len):
            keep = len(prefix)
            if len(example) == 1:  # alone, the block keeps the single format's prompt budget
                keep = min(keep, budget - len(pieces[example[0]][0]))
                if keep < 0:
                    raise DataError(f"{source}: record {r + 1}: candidate block {example[0]} alone is longer than "
                                    f"cutoff_len={cutoff_len}; raise cutoff_len")
            ids, lab, bid = prefix[len(prefix) - keep:], [IGNORE_INDEX] * keep, [0] * keep
            for n, j in enumerate(example, 1):
                prompt, answer = pieces[j]
                ids += prompt + answer
                lab += [IGNORE_INDEX] * len(prompt) + answer
                bid += [n] * (len(prompt) + len(answer))
            input_ids.append(ids)
            labels.append(lab)
            block_ids.append(bid)
            keys.append([json.dumps([user, records[r]["blocks"][j].get("candidate_movie_id")]) for j in example])
            users.append(codes[r])
    return pa.table({"input_ids": pa.array(input_ids, pa.large_list(pa.int32())),
                     "labels": pa.array(labels, pa.large_list(pa.int32())),
                     "block_ids": pa.array(block_ids, pa.large_list(pa.int32())),
                     "answer_keys": pa.array(keys, pa.list_(pa.string())),
                     "user_id": pa.array(np.asarray(users, dtype=np.int64), pa.int64())})


def insert_cf_tokens(input_ids: Sequence[int], labels: Sequence[int], block_ids: Sequence[int], user_token: int,
                     item_tokens: Sequence[int]) -> tuple[list[int], list[int], list[int]]:
    """One candidate-block example with soft CF tokens (``cf_tokens``): ``user_token`` at the end of the shared
    prefix (after the history, before the first candidate) and ``item_tokens[n - 1]`` at the start of block ``n``
    (before the candidate's text), unlabelled, each with the block id of the part it joins."""
    ids, lab, bid = [], [], []
    prev = 0
    for t, l, b in zip(input_ids, labels, block_ids):
        if b != prev and b > 0:
            if prev == 0:
                ids.append(user_token), lab.append(IGNORE_INDEX), bid.append(0)
            ids.append(item_tokens[b - 1]), lab.append(IGNORE_INDEX), bid.append(b)
            prev = b
        ids.append(t), lab.append(l), bid.append(b)
    return ids, lab, bid


def with_cf_tokens(table: dict, token_ids, table_of=lambda key: 0) -> dict:
    """Columns of a tokenized candidate-block table (``input_ids``, ``labels``, ``block_ids``, ``answer_keys``)
    with soft CF tokens inserted (:func:`insert_cf_tokens`); ``token_ids``: :class:`recsft.cf.TokenIds`;
    ``table_of(answer_key)``: which CF table an item token reads (0: the full one)."""
    out = {k: [] for k in ("input_ids", "labels", "block_ids")}
    for ids, lab, bid, keys in zip(table["input_ids"], table["labels"], table["block_ids"], table["answer_keys"]):
        pairs = [json.loads(k) for k in keys]
        row = insert_cf_tokens(ids, lab, bid, token_ids.user(pairs[0][0]),
                               [token_ids.item(m, table_of((u, m))) for u, m in pairs])
        for k, v in zip(out, row):
            out[k].append(v)
    return out


# ---------------------------------------------------------------------------------------------- cache
def tokenizer_fingerprint(tokenizer) -> str:
    """Hash of everything in the tokenizer that changes token ids or the chat template."""
    h = hashlib.sha256()
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        # truncation/padding in the backend are transient call settings (the last encode() leaves them set),
        # not part of what produces token ids: leaving them in would make the key depend on the call history.
        # The serialization lists them first, before added_tokens (tokenizers' fixed field order): everything from
        # added_tokens on is hashed as it is (parsing ~5 MB of JSON to drop two keys took seconds).
        text = backend.to_str()
        head, sep, rest = text.partition(',"added_tokens":')
        if sep and head.startswith('{"version":') and '"truncation":' in head and '"padding":' in head:
            h.update(json.dumps(json.loads(head + "}")["version"]).encode() + sep.encode() + rest.encode())
        else:  # another layout: the same, by parsing
            state = {k: v for k, v in json.loads(text).items() if k not in ("truncation", "padding")}
            h.update(json.dumps(state, sort_keys=True).encode())
    else:
        h.update(repr(tokenizer.get_vocab()).encode())
    h.update(str(getattr(tokenizer, "chat_template", "")).encode())
    h.update(json.dumps([tokenizer.eos_token, tokenizer.pad_token, tokenizer.bos_token]).encode())
    return h.hexdigest()[:16]


def file_digest(path: str | os.PathLike) -> str:
    return sha256_file(path)[:16]


def cache_key(data_path: str, tokenizer_fp: str, **settings: Any) -> str:
    payload = json.dumps({"data": file_digest(data_path), "tokenizer": tokenizer_fp,
                          "version": PREPROCESS_VERSION, **settings}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def _read_cache(path: Path):
    """The cached dataset, or None when the folder is missing, partial or corrupt (it is then removed)."""
    from datasets import load_from_disk

    meta_file = path / "recsft_cache.json"
    if not meta_file.is_file():
        if path.exists():
            shutil.rmtree(path, ignore_errors=True)
        return None
    try:
        meta = json.loads(meta_file.read_text())
        ds = load_from_disk(str(path))
        if len(ds) != meta["num_rows"] or (len(ds) and len(ds[len(ds) - 1]["input_ids"]) == 0):
            raise ValueError(f"{len(ds)} rows, expected {meta['num_rows']}")
        return ds
    except Exception as e:  # noqa: BLE001 - any unreadable cache is rebuilt, never trusted
        logger.warning("preprocessing cache %s is corrupt or partial (%s); rebuilding it", path, e)
        shutil.rmtree(path, ignore_errors=True)
        return None


def load_or_build(split: str, data_path: str, tokenizer, cutoff_len: int, max_samples: int | None,
                  cache_dir: str | None, system_prompt: str | None = None, enable_thinking: bool = False,
                  clear_cache: bool = False, tokenizer_fp: str | None = None):
    """A tokenized ``datasets.Dataset`` for one split, from the cache when its key matches."""
    from datasets import Dataset, load_from_disk

    settings = dict(cutoff_len=cutoff_len, max_samples=max_samples, system_prompt=system_prompt,
                    enable_thinking=enable_thinking)
    key = cache_key(data_path, tokenizer_fp or tokenizer_fingerprint(tokenizer), **settings)
    path = Path(cache_dir) / f"{split}_preprocessed-{key}" if cache_dir else None
    if path is not None and clear_cache and path.exists():
        shutil.rmtree(path)
    cached = _read_cache(path) if path is not None else None
    if cached is not None:
        logger.info("Loading preprocessed datasets from cache... %s (%d examples)", path, len(cached))
        return cached
    t0 = time.perf_counter()
    records = load_data(data_path)
    if max_samples:
        records = records[:max_samples]
    table = tokenize_any(records, tokenizer, cutoff_len, system_prompt, enable_thinking, source=data_path)
    ds = Dataset(table)
    logger.info("Tokenized %s: %d examples in %.1fs (%.0f examples/s)", split, len(ds),
                time.perf_counter() - t0, len(ds) / max(time.perf_counter() - t0, 1e-9))
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f"{path.name}.tmp-", dir=path.parent))  # unique per builder
        try:
            ds.save_to_disk(str(tmp))
            meta = {"key": key, "data": data_path, "num_rows": len(ds), **settings}
            (tmp / "recsft_cache.json").write_text(json.dumps(meta))
        except BaseException:  # also on Ctrl-C: no half-written folder is left behind
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        # Publish by one rename, never removing a published folder: if another process (a DDP rank that built
        # the same cache at the same time) got there first, the rename fails and its identical copy is used.
        # (A stale or corrupt folder was already removed by _read_cache above.)
        try:
            os.rename(tmp, path)
        except OSError:
            shutil.rmtree(tmp, ignore_errors=True)
            if not (path / "recsft_cache.json").is_file():
                raise
            logger.info("preprocessing cache %s was published by another process; using it", path)
        ds = load_from_disk(str(path))
    return ds


def load_tokenized_datasets(train_path: str, eval_path: str | None, tokenizer, cutoff_len: int,
                            max_samples: int | None = None, max_eval_samples: int | None = None,
                            cache_dir: str | None = ".cache/preprocessed", system_prompt: str | None = None,
                            enable_thinking: bool = False, clear_cache: bool = False):
    """Train and eval datasets (one after the other), tokenized in batches and cached.

    The cache is keyed by a hash of the data file, the tokenizer and chat template, and every
    preprocessing setting, so a changed ``cutoff_len`` or tokenizer rebuilds it; ``clear_cache`` forces it.
    """
    fp = tokenizer_fingerprint(tokenizer)
    kw = dict(cache_dir=cache_dir, system_prompt=system_prompt, enable_thinking=enable_thinking,
              clear_cache=clear_cache, tokenizer_fp=fp)
    train = load_or_build("train", train_path, tokenizer, cutoff_len, max_samples, **kw)
    evals = load_or_build("eval", eval_path, tokenizer, cutoff_len, max_eval_samples, **kw) if eval_path else None
    return train, evals



# ------------------------------------------------------------------------------------------ training data
def resolve_data(data) -> tuple[str, str | None]:
    """Train/eval file paths from dataset names (dataset_info.json) or paths; fail before any heavy work."""
    train = resolve_dataset(data.dataset, data.dataset_dir)
    evals = resolve_dataset(data.eval_dataset, data.dataset_dir) if data.eval_dataset else None
    for path in (train, evals):
        if path and not Path(path).is_file():
            raise DataError(f"{path}: data file does not exist; run `python scripts/prepare_data.py` "
                            f"or fix dataset/eval_dataset in the config")
        if path:
            check_in_set(path)  # both from the same prepare_data build (a cached dataset skips reading them)
    return train, evals


def eval_subset(data, enable_thinking: bool, tokenizer, eval_path: str, max_records: int | None, cpu: bool):
    """The eval file tokenized as :func:`datasets_for` does, keeping its first ``max_records`` records (all: None)."""
    from accelerate import PartialState

    state = PartialState(cpu=cpu)
    with state.main_process_first():
        return load_or_build("eval", eval_path, tokenizer, data.cutoff_len, max_records,
                             cache_dir=data.preprocessing_cache_dir, system_prompt=data.system_prompt,
                             enable_thinking=enable_thinking, clear_cache=False,
                             tokenizer_fp=tokenizer_fingerprint(tokenizer))


def datasets_for(data, enable_thinking: bool, tokenizer, train_path: str, eval_path: str | None, clear_cache: bool,
                 cpu: bool):
    """Tokenized train/eval datasets; under DDP rank 0 builds the cache first and the others load it.

    ``cpu``: training runs on the CPU (``get_device() == "cpu"``).
    """
    from accelerate import PartialState

    # cpu=True on CPU: a bare PartialState() there does not see torchrun's ranks, and every rank would build
    state = PartialState(cpu=cpu)
    with state.main_process_first():
        return load_tokenized_datasets(
            train_path, eval_path, tokenizer, data.cutoff_len, max_samples=data.max_samples,
            max_eval_samples=data.max_eval_samples, cache_dir=data.preprocessing_cache_dir,
            system_prompt=data.system_prompt, enable_thinking=enable_thinking,
            clear_cache=clear_cache and state.is_main_process)  # the others load what the main process rebuilt
