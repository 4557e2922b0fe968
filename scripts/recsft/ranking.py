"""Ranking evaluation: candidate sampling, tie-aware ranking metrics, shared-prefix LLM scoring.

A *question* is one liked test candidate of a user (the positive) plus ``n`` movies the user never rated
(the negatives). Every model scores the same ``1 + n`` candidates; the positive's rank gives HR@k, NDCG@k
and reciprocal rank. The LLM scores them with the test example's own prompt (same history), the candidate
swapped in: the ``1 + n`` prompts share everything up to ``Candidate movie:``, so that prefix is run once
and its KV cache reused for the candidate suffixes (:func:`shared_prefix_scores`).
"""

from __future__ import annotations

import json
import logging
from typing import Callable, Sequence

import numpy as np

from .io import Journal
from .movielens import SAMPLINGS, sample_negatives

logger = logging.getLogger(__name__)
CANDIDATE_MARKER = "Candidate movie:"


def build_questions(test: Sequence[dict], rated: dict, items: np.ndarray, n_negatives: int = 99, seed: int = 0,
                    sampling: str = "uniform", popularity: dict | None = None,
                    max_users: int | None = None) -> tuple[list[dict], dict]:
    """One question per liked test candidate: ``{"example", "user_id", "candidates"}`` (positive first).

    ``rated``: user -> set of every item the user rated (any split); negatives come from ``items`` minus
    those. ``sampling``: ``uniform``, or ``popularity`` (each negative drawn without replacement with
    probability proportional to 1 + its number of training ratings). Users are taken in sorted id order
    and one random generator runs through them, so ``max_users`` K gives the first K users' questions of
    the full run. Returns the questions and counts (users, skipped users, short pools).
    """
    if sampling not in SAMPLINGS:
        raise ValueError(f"--sampling {sampling!r}: use one of {', '.join(SAMPLINGS)}")
    by_user: dict = {}
    for e in test:
        by_user.setdefault(e["user_id"], []).append(e)
    users = sorted(by_user)[:max_users] if max_users else sorted(by_user)
    items = np.asarray(sorted(items))
    pop = np.array([1.0 + (popularity or {}).get(i, 0) for i in items.tolist()]) if sampling == "popularity" else None
    rng = np.random.default_rng(seed)
    questions, skipped, short = [], 0, 0
    for user in users:
        positives = sorted((e for e in by_user[user] if e["label"] == "Yes"), key=lambda e: e["candidate_timestamp"]
                           if "candidate_timestamp" in e else 0)
        if not positives:
            skipped += 1
            continue
        unrated = ~np.isin(items, list(rated.get(user, ())))
        pool, weights = items[unrated], (pop[unrated] if pop is not None else None)
        for e in positives:
            negatives = sample_negatives(rng, pool, n_negatives, weights)
            short += len(negatives) < n_negatives
            questions.append({"user_id": user, "example": e,
                              "candidates": [e["candidate_movie_id"], *negatives.tolist()]})
    if short:
        logger.warning(f"{short} questions: the user has fewer than {n_negatives} unrated movies; all of them used")
    if skipped:
        logger.warning(f"{skipped} test users skipped: no liked (Yes) test candidate to rank")
    return questions, {"users": len(users) - skipped, "users_skipped_no_positive": skipped,
                       "questions": len(questions), "questions_with_short_pool": short}


# ------------------------------------------------------------------------------------------- metrics
def rank_metrics(pos: float, neg: np.ndarray, ks: Sequence[int] = (1, 5, 10), ndcg_k: int = 10) -> dict[str, float]:
    """HR@k, NDCG@``ndcg_k`` and reciprocal rank of the positive, expected under random tie-breaking.

    With g negatives scored above the positive and t tied with it, the positive's rank is uniform on
    g+1 .. g+t+1; each metric is its mean over those ranks (so a constant scorer gets chance, not 1.0).
    """
    neg = np.asarray(neg, dtype=float)
    if np.isnan(pos) or np.isnan(neg).any():
        raise ValueError(f"rank_metrics: NaN score (positive {pos!r}, {int(np.isnan(neg).sum())} NaN negatives); "
                         f"a NaN compares false with everything and would rank the positive first")
    greater, ties = int((neg > pos).sum()), int((neg == pos).sum())
    ranks = np.arange(greater + 1, greater + ties + 2)
    out = {f"hr@{k}": float((ranks <= k).mean()) for k in ks}
    out[f"ndcg@{ndcg_k}"] = float(np.where(ranks <= ndcg_k, 1 / np.log2(ranks + 1), 0.0).mean())
    out["mrr"] = float((1.0 / ranks).mean())
    out["rank"] = float(ranks.mean())
    return out


def block_groups(questions: Sequence[dict], records: Sequence[dict], texts: dict, source: str) -> list[dict]:
    """Candidate-block ranking: the questions grouped by the test record prefix their positive is asked after (one
    group per user under the static protocol), each ``{"record", "questions": [index], "movies": [movie]}``
    with the union of its questions' candidates, so a group costs one prefix pass.

    ``texts``: ``{movie: candidate block text}`` rebuilt from the folder's ratings
    (:func:`recsft.movielens.static_candidate_texts`); each positive's text must be the one in ``records``.
    """
    from .io import DataError

    where = {(rec["user_id"], b["candidate_movie_id"]): (rec, b["text"]) for rec in records for b in rec["blocks"]}
    groups: dict = {}
    for i, q in enumerate(questions):
        user, movie = q["user_id"], q["candidates"][0]
        if (user, movie) not in where:
            raise DataError(f"{source}: no candidate block for test (user {user!r}, movie {movie!r}); re-run "
                            f"`python scripts/prepare_data.py --format blocks --history-from train`")
        rec, text = where[(user, movie)]
        if texts.get(movie) != text:
            raise DataError(f"{source}: the block of (user {user!r}, movie {movie!r}) reads {text!r}, not "
                            f"{texts.get(movie)!r} as rebuilt from the folder's ratings; re-run `python "
                            f"scripts/prepare_data.py --format blocks --history-from train` into a fresh --out-dir")
        g = groups.setdefault((user, rec["prefix"]), {"record": rec, "questions": [], "movies": {}})
        g["questions"].append(i)
        for m in q["candidates"]:
            g["movies"].setdefault(m, len(g["movies"]))
    return [{**g, "movies": list(g["movies"])} for g in groups.values()]


def mean_metrics(rows: Sequence[dict]) -> dict[str, float]:
    """Mean of each metric over questions (NaN-free; ``n`` = questions)."""
    if not rows:
        return {"n": 0}
    return {**{k: float(np.mean([r[k] for r in rows])) for k in rows[0]}, "n": len(rows)}


def question_scores(questions: Sequence[dict], scorer: Callable) -> list[np.ndarray]:
    """Per question, ``scorer(example, candidate_items) -> scores`` as floats (positive first)."""
    if hasattr(scorer, "warm"):  # a scorer that encodes many examples at once (e.g. a sequential model)
        scorer.warm([q["example"] for q in questions])
    return [np.asarray(scorer(q["example"], np.asarray(q["candidates"])), dtype=float) for q in questions]


def question_rows(questions: Sequence[dict], scorer: Callable, ks=(1, 5, 10)) -> list[dict[str, float]]:
    """Per question, the ranking metrics of ``scorer(example, candidate_items) -> scores`` (positive first)."""
    return [rank_metrics(s[0], s[1:], ks) for s in question_scores(questions, scorer)]


def fit_rank_blend(features: Sequence[np.ndarray], l2: float = 1e-3) -> np.ndarray:
    """Weights ``w`` of the blended score ``features @ w`` that make each question's positive (row 0 of its
    ``(n_candidates, k)`` feature array) most likely under a softmax over the question's candidates: a
    conditional logit, the listwise ranking likelihood (only differences within a question matter, so a
    model's per-user offset does not). Columns are scaled by their pooled within-question standard deviation
    for the fit (``l2`` keeps a separable fit finite); ``w`` is returned in the original units. L-BFGS
    (``scipy.optimize``)."""
    from scipy.optimize import minimize
    from scipy.special import logsumexp, softmax

    features = [np.asarray(f, dtype=float) for f in features]
    if not features:
        raise ValueError("fit_rank_blend: no question to fit on")
    scale = np.concatenate([f - f.mean(axis=0) for f in features]).std(axis=0)  # within-question spread
    scale[scale == 0] = 1.0
    scaled = [f / scale for f in features]

    def loss(w):
        value, grad = 0.0, np.zeros_like(w)
        for f in scaled:
            s = f @ w
            value += logsumexp(s) - s[0]
            grad += softmax(s) @ f - f[0]
        return value / len(scaled) + l2 * w @ w, grad / len(scaled) + 2 * l2 * w

    res = minimize(loss, np.ones(scaled[0].shape[1]), jac=True, method="L-BFGS-B")
    return res.x / scale


class MarginJournal(Journal):
    """The progress file of an LLM ranking run (``llm_margins.jsonl``, a :class:`~recsft.io.Journal`): one line per
    finished unit (a user's candidate blocks, or one question) with its candidates' margins. A unit's key
    (:func:`unit_key`) covers its user, prompt and candidates, so with ``resume`` every unit already in the file is
    reused by any run that asks it again (``--max-users 40`` after a stopped ``--max-users 200`` run, or the other
    way round). ``done[unit]`` is ``(margins, cut)``."""

    def decode(self, entry: dict):
        return np.asarray(entry["margins"], dtype=float), bool(entry["cut"])

    def add(self, unit: str, margins: np.ndarray, cut: bool) -> None:
        self.append(unit, {"cut": bool(cut), "margins": np.asarray(margins, dtype=float).tolist()})


def unit_key(user, prompt: str, candidates: Sequence) -> str:
    """A journal unit's identity: its user, the prompt its candidates are asked after, and the candidates."""
    import hashlib

    text = json.dumps([str(user), prompt, [str(c) for c in candidates]])
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:24]


def full_ranking(questions: Sequence[dict], scorer: Callable, rated: dict, items: np.ndarray,
                 ks=(1, 5, 10)) -> dict[str, float]:
    """The positive ranked among *every* movie its user never rated (not a sample)."""
    items = np.asarray(sorted(items))
    if hasattr(scorer, "warm"):
        scorer.warm([q["example"] for q in questions])
    rows = []
    for q in questions:
        pool = items[~np.isin(items, list(rated.get(q["user_id"], ())))]
        s = np.asarray(scorer(q["example"], np.concatenate([[q["candidates"][0]], pool])), dtype=float)
        rows.append(rank_metrics(s[0], s[1:], ks))
    return mean_metrics(rows)


def markdown_row(name: str, m: dict, cols=("hr@1", "hr@5", "hr@10", "ndcg@10", "mrr")) -> str:
    return "| " + " | ".join([name, *(f"{m[c]:.3f}" for c in cols), f"{int(m['n']):,}"]) + " |"


MARKDOWN_HEADER = "| model | HR@1 | HR@5 | HR@10 | NDCG@10 | MRR | questions |\n|---|---|---|---|---|---|---|"


# ----------------------------------------------------------------------------- shared-prefix scoring
def split_prompt(prompt: str, candidate_title: str, marker: str = CANDIDATE_MARKER) -> tuple[str, str]:
    """``(prefix, suffix)`` of a templated prompt, cut right after ``Candidate movie:``.

    The cut sits in front of the space that starts the title: byte-level BPE (Qwen, SmolLM2/GPT-2) never
    merges ``:`` with a following space, so ``ids(prefix) + ids(suffix) == ids(prompt)``.
    """
    cut = prompt.rfind(f"{marker} {candidate_title}")
    if cut < 0:
        raise ValueError(f"prompt has no {marker!r} line for candidate {candidate_title!r}")
    cut += len(marker)
    return prompt[:cut], prompt[cut:]


def question_texts(example: dict, titles: Sequence[str], tokenizer, system_prompt: str | None = None,
                   enable_thinking: bool = False) -> tuple[str, list[str]]:
    """The common prefix and one suffix per candidate title, for the test example's prompt (same history)."""
    from .preprocess import render_records

    base = {k: v for k, v in example.items() if k != "label"}
    prompts, _ = render_records([{**base, "candidate_title": t} for t in titles], tokenizer, system_prompt,
                                enable_thinking)
    prefix = split_prompt(prompts[0], titles[0])[0]
    suffixes = []
    for prompt, title in zip(prompts, titles):
        p, s = split_prompt(prompt, title)
        if p != prefix:
            raise ValueError(f"candidate {title!r}: prompt prefix differs from the question's first candidate")
        suffixes.append(s)
    return prefix, suffixes


def _decoder_and_head(model):
    lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    return lm, lm.get_decoder(), lm.get_output_embeddings()


def _cache_kwarg(decoder) -> str:
    import inspect

    params = inspect.signature(decoder.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def shared_prefix_scores(model, prefix_ids: Sequence[int], suffix_ids: Sequence[Sequence[int]], yes_id: int,
                         no_id: int, batch_size: int = 32, pad_id: int = 0) -> np.ndarray:
    """``(len(suffix_ids), 2)`` float32 logits of Yes and No after ``prefix + suffix`` for every suffix.

    The prefix runs once (``use_cache=True``); its KV cache is expanded over each batch of suffixes, which
    are right-padded (causal attention: a real token never sees the padding after it) and positioned after
    the prefix. The final hidden state at each suffix's last token is projected onto the two LM-head rows
    in float32 (:func:`recsft.inference.yes_no_logits`). Equal to scoring each ``prefix + suffix`` alone.
    """
    import torch
    from transformers import DynamicCache

    from .inference import yes_no_logits

    lm, decoder, head = _decoder_and_head(model)
    device = next(lm.parameters()).device
    key = _cache_kwarg(decoder)
    out = []
    with torch.inference_mode():
        first = decoder(input_ids=torch.tensor([list(prefix_ids)], device=device), use_cache=True)
        cache = getattr(first, "cache", None) or first.past_key_values
        kv = [(layer.keys, layer.values) for layer in cache.layers]
        n_prefix = len(prefix_ids)
        for start in range(0, len(suffix_ids), batch_size):
            chunk = [list(s) for s in suffix_ids[start:start + batch_size]]
            lens = torch.tensor([len(s) for s in chunk], device=device)
            width = int(lens.max())
            ids = torch.tensor([s + [pad_id] * (width - len(s)) for s in chunk], device=device)
            batch_cache = DynamicCache([(k.expand(len(chunk), -1, -1, -1), v.expand(len(chunk), -1, -1, -1))
                                        for k, v in kv], config=lm.config)
            positions = (n_prefix + torch.arange(width, device=device)).expand(len(chunk), -1)
            hidden = decoder(input_ids=ids, position_ids=positions, use_cache=True,
                             **{key: batch_cache}).last_hidden_state
            last = hidden[torch.arange(len(chunk), device=device), lens - 1]
            out.append(yes_no_logits(last, head, yes_id, no_id).cpu())
    return torch.cat(out).numpy()


def llm_question_scores(model, tokenizer, example: dict, titles: Sequence[str], batch_size: int = 32,
                        system_prompt: str | None = None, enable_thinking: bool = False,
                        max_prompt_tokens: int | None = None) -> tuple[np.ndarray, bool]:
    """``(logit_yes - logit_no per title, prefix_was_cut)`` for one question, scored with a shared prefix."""
    prefix, suffixes = question_texts(example, titles, tokenizer, system_prompt, enable_thinking)
    return prefix_margins(model, tokenizer, prefix, suffixes, batch_size, max_prompt_tokens)


def block_candidate_scores(model, tokenizer, record: dict, texts: Sequence[str], batch_size: int = 32,
                           system_prompt: str | None = None, enable_thinking: bool = False,
                           max_prompt_tokens: int | None = None,
                           movies: Sequence | None = None) -> tuple[np.ndarray, bool]:
    """``(logit_yes - logit_no per text, prefix_was_cut)``: each candidate block text asked after the shared
    prefix of the candidate-block ``record`` (its history and question), as in training; one prefix pass.
    Equal to scoring each ``prefix + text`` as one ordinary question (:func:`recsft.formatting.block_texts`).
    A model with soft CF tokens (:func:`recsft.cf.cf_token_ids`) reads them where training put them: the
    record's user after the prefix, each candidate (``movies``, aligned with ``texts``) before its text."""
    from .cf import cf_token_ids
    from .formatting import block_texts

    tokens, soft = cf_token_ids(model), None
    if tokens is not None:
        if movies is None or len(movies) != len(texts):
            raise ValueError("a model with soft CF tokens needs the movie id of every candidate text")
        soft = (tokens.user(record.get("user_id")), [tokens.item(m) for m in movies])

    rec = {"prefix": record["prefix"], "system": record.get("system"),
           "blocks": [{"text": t, "answer": "Yes"} for t in texts]}
    [(prefix, blocks)] = block_texts([rec], tokenizer, system_prompt, enable_thinking)
    return prefix_margins(model, tokenizer, prefix, [b for b, _ in blocks], batch_size, max_prompt_tokens, soft)


def prefix_margins(model, tokenizer, prefix: str, suffixes: Sequence[str], batch_size: int = 32,
                   max_prompt_tokens: int | None = None,
                   soft: tuple[int, Sequence[int]] | None = None) -> tuple[np.ndarray, bool]:
    """``(logit_yes - logit_no after prefix + suffix for each suffix, prefix_was_cut)``.

    When the longest ``prefix + suffix`` exceeds ``max_prompt_tokens``, the prefix is cut from the left by the
    same amount for every suffix (training cuts prompts from the left too), so all candidates still see the
    same history. ``soft``: ``(user token, [item token per suffix])`` of soft CF tokens, placed after the prefix
    and before each suffix (:func:`recsft.preprocess.insert_cf_tokens`).
    """
    from .inference import answer_token_ids

    yes_id, no_id = answer_token_ids(tokenizer)
    prefix_ids = tokenizer(prefix, add_special_tokens=False)["input_ids"]
    suffix_ids = tokenizer(list(suffixes), add_special_tokens=False)["input_ids"]
    if soft is not None:
        prefix_ids = [*prefix_ids, soft[0]]
        suffix_ids = [[item, *ids] for item, ids in zip(soft[1], suffix_ids)]
    cut = False
    if max_prompt_tokens:
        room = max_prompt_tokens - max(len(s) for s in suffix_ids)
        if len(prefix_ids) > room:
            prefix_ids, cut = prefix_ids[len(prefix_ids) - max(room, 1):], True
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    logits = shared_prefix_scores(model, prefix_ids, suffix_ids, yes_id, no_id, batch_size, pad)
    return logits[:, 0] - logits[:, 1], cut


def p_yes(margin: np.ndarray) -> np.ndarray:
    """P(Yes) from the margin logit(Yes) - logit(No) (:func:`recsft.metrics.p_yes_from_logits`)."""
    from .metrics import p_yes_from_logits

    return p_yes_from_logits(margin, 0.0)
