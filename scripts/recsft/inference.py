"""Batched greedy generation and one-pass Yes/No scoring over records of either format."""

from __future__ import annotations

import contextlib
from typing import Sequence

from tqdm.auto import tqdm

from .config import MAX_NEW_TOKENS, TEMPERATURE, TOP_P
from .preprocess import render_records


@contextlib.contextmanager
def _left_padding(tokenizer):
    old = tokenizer.padding_side
    tokenizer.padding_side = "left"
    try:
        yield
    finally:
        tokenizer.padding_side = old


def _batches(items: Sequence, size: int, desc: str, progress: bool):
    for start in tqdm(range(0, len(items), size), desc=desc, disable=not progress, unit="batch"):
        yield items[start:start + size]


def _encode(tokenizer, batch: list[str], device, max_prompt_tokens: int | None):
    """Left-padded batch; prompts longer than ``max_prompt_tokens`` lose tokens from the left, as in training."""
    old = tokenizer.truncation_side
    tokenizer.truncation_side = "left"
    try:
        return tokenizer(batch, return_tensors="pt", padding=True, add_special_tokens=False,
                         truncation=max_prompt_tokens is not None, max_length=max_prompt_tokens).to(device)
    finally:
        tokenizer.truncation_side = old


def generate(model, tokenizer, prompts: Sequence[str], max_new_tokens: int = MAX_NEW_TOKENS,
             temperature: float = TEMPERATURE, top_p: float = TOP_P, batch_size: int = 16,
             progress: bool = True, desc: str = "Generating", max_prompt_tokens: int | None = None) -> list[str]:
    """Responses to already-templated prompt texts (greedy when ``temperature`` is 0), special tokens kept."""
    import torch

    device = next(model.parameters()).device
    kwargs = dict(max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id, do_sample=temperature > 0)
    if temperature > 0:
        kwargs.update(temperature=temperature, top_p=top_p)
    else:
        kwargs.update(temperature=None, top_p=None, top_k=None)
    out: list[str] = []
    model.eval()
    with _left_padding(tokenizer), torch.inference_mode():
        for batch in _batches(list(prompts), batch_size, desc, progress):
            enc = _encode(tokenizer, batch, device, max_prompt_tokens)
            ids = model.generate(**enc, **kwargs)
            new = ids[:, enc["input_ids"].shape[1]:]
            out.extend(tokenizer.batch_decode(new, skip_special_tokens=False))
    return out


def answer_token_ids(tokenizer) -> tuple[int, int]:
    """First token ids of "Yes" and "No", tokenized the way training tokenizes the answer."""
    yes = tokenizer("Yes", add_special_tokens=False)["input_ids"][0]
    no = tokenizer("No", add_special_tokens=False)["input_ids"][0]
    if yes == no:
        raise ValueError("tokenizer maps Yes and No to the same first token; scoring mode cannot be used")
    return yes, no


def score(model, tokenizer, prompts: Sequence[str], batch_size: int = 16, progress: bool = True,
          desc: str = "Scoring", max_prompt_tokens: int | None = None) -> list[dict]:
    """One forward pass per prompt: P(Yes) vs P(No) at the answer position, and the argmax token.

    Returns per prompt ``{"p_yes", "logit_yes", "logit_no", "top_token"}``; ``p_yes`` is the softmax of
    the two answer logits, so it is defined even when the model prefers some other token.
    """
    import torch

    yes_id, no_id = answer_token_ids(tokenizer)
    device = next(model.parameters()).device
    out: list[dict] = []
    model.eval()
    with _left_padding(tokenizer), torch.inference_mode():
        for batch in _batches(list(prompts), batch_size, desc, progress):
            enc = _encode(tokenizer, batch, device, max_prompt_tokens)
            position_ids = (enc["attention_mask"].cumsum(-1) - 1).clamp(min=0)
            logits = model(**enc, position_ids=position_ids, logits_to_keep=1).logits[:, -1, :].float()
            pair = logits[:, [yes_id, no_id]]
            p_yes = torch.softmax(pair, dim=-1)[:, 0]
            top = logits.argmax(dim=-1)
            for i in range(len(batch)):
                out.append({"p_yes": float(p_yes[i]), "logit_yes": float(pair[i, 0]),
                            "logit_no": float(pair[i, 1]), "top_token": tokenizer.decode([int(top[i])])})
    return out


def max_prompt_tokens(tokenizer, cutoff_len: int | None) -> int | None:
    """Prompt budget under ``cutoff_len``: what training keeps in front of the answer "Yes<eos>"."""
    if not cutoff_len:
        return None
    answer = tokenizer("Yes", add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    return cutoff_len - len(answer)


def prompts_for(records: Sequence[dict], tokenizer, system_prompt: str | None = None,
                enable_thinking: bool = False, source: str = "data") -> tuple[list[str], list[str | None]]:
    """Templated prompt texts (exactly as in training) and gold labels ("Yes"/"No"/None) for records."""
    from .formatting import format_prompt

    prompts, _ = render_records(records, tokenizer, system_prompt, enable_thinking, source)
    labels = [format_prompt(r, system_prompt)["answer"] for r in records]
    return prompts, labels


def yes_no_logits(hidden, lm_head, yes_id: int, no_id: int):
    """``(..., 2)`` float32 logits of Yes and No: final hidden states projected onto the two LM-head rows.

    The projection runs in float32 whatever the model's dtype (a bf16 matmul over the whole vocabulary
    rounds the two logits and their difference); only two rows are computed, not the vocabulary.
    """
    rows = [yes_id, no_id]
    logits = hidden.float() @ lm_head.weight[rows].float().T
    bias = getattr(lm_head, "bias", None)
    return logits + bias[rows].float() if bias is not None else logits
