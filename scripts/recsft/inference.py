"""Batched greedy generation and one-pass Yes/No scoring over records of either format."""

from __future__ import annotations

import contextlib
from typing import Sequence

from tqdm.auto import tqdm

from .config import MAX_NEW_TOKENS, TEMPERATURE, TOP_P
from .formatting import render_labelled


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
        from .config import ConfigError

        raise ConfigError(["eval_mode: the tokenizer maps Yes and No to the same first token, so score mode "
                           "cannot be used; set eval_mode: generate"])
    return yes, no


def greedy_says_yes(logit_yes, logit_no, yes_id: int, no_id: int):
    """What greedy decoding picks between the two answer tokens (bool tensor, True = Yes).

    The larger logit wins; on an exact tie the lower token id wins, as ``torch.argmax`` (first maximum) does in
    ``generate``. Give it the logits generation sees (the model's own dtype), not re-projected ones.
    """
    return (logit_yes > logit_no) | ((logit_yes == logit_no) & (yes_id < no_id))


class AnswerLogits:
    """Context manager: float32 logits of the Yes and No tokens, projected from the hidden state the LM head gets.

    A bf16 model's logits (≈ 30) are rounded to steps of 0.125, so P(Yes) computed from them takes a handful of
    distinct values. A forward hook on the output embedding re-projects the head's input onto the two rows in
    float32 (autocast off, bias included). ``pair(model_pair)`` returns those ``(N, 2)`` logits, or, when the head
    cannot be re-projected exactly (a LoRA/quantized/sharded head) or the model rescales its logits after the head
    (they disagree with ``model_pair`` beyond rounding), ``model_pair`` in float32, with one warning.
    """

    _warned = False

    def __init__(self, model, yes_id: int, no_id: int):
        self.model, self.ids = model, [yes_id, no_id]
        self._handle, self._pair = None, None

    def __enter__(self):
        model = getattr(self.model, "module", self.model)  # DDP wrapper
        head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        if head is not None:
            self._handle = head.register_forward_hook(self._hook)
        return self

    def __exit__(self, *exc):
        if self._handle is not None:
            self._handle.remove()
        self._handle = self._pair = None

    def _hook(self, module, args, output):
        import torch

        self._pair = None
        weight = getattr(module, "weight", None)
        exact = (type(module) in (torch.nn.Linear,) and isinstance(weight, torch.Tensor)
                 and type(weight) in (torch.Tensor, torch.nn.Parameter) and weight.is_floating_point())
        if not exact or not args:
            return
        self._pair = yes_no_logits(args[0], module, *self.ids).reshape(-1, 2)

    def pair(self, model_pair):
        """Float32 ``(N, 2)`` [Yes, No] logits for the rows of ``model_pair`` (the model's own logits)."""
        import torch

        model_pair = model_pair.reshape(-1, 2)
        exact = self._pair
        if exact is not None and exact.shape == model_pair.shape:
            ref = model_pair.float()
            ulp = torch.finfo(model_pair.dtype).eps * ref.abs().clamp(min=1.0)
            if bool(((exact - ref).abs() <= 4 * ulp + 1e-4).all()):
                return exact
        if not AnswerLogits._warned:
            AnswerLogits._warned = True
            import logging

            logging.getLogger(__name__).warning(
                "P(Yes) from the model's own %s logits: its LM head cannot be re-projected in float32",
                str(model_pair.dtype).replace("torch.", ""))
        return model_pair.float()


def score(model, tokenizer, prompts: Sequence[str], batch_size: int = 16, progress: bool = True,
          desc: str = "Scoring", max_prompt_tokens: int | None = None) -> list[dict]:
    """One forward pass per prompt: P(Yes) vs P(No) at the answer position, greedy's answer, and the argmax token.

    Returns per prompt ``{"p_yes", "logit_yes", "logit_no", "answer", "top_token"}``. The two logits are projected
    in float32 (see :class:`AnswerLogits`) and ``p_yes`` is their softmax, defined even when the model prefers
    some other token. ``answer`` is what greedy generation would pick between Yes and No: the model's own
    logits, the lower token id on a tie (so it can differ from ``p_yes >= 0.5`` only on a tie in that dtype).
    """
    import torch

    yes_id, no_id = answer_token_ids(tokenizer)
    device = next(model.parameters()).device
    out: list[dict] = []
    model.eval()
    with _left_padding(tokenizer), torch.inference_mode(), AnswerLogits(model, yes_id, no_id) as head:
        for batch in _batches(list(prompts), batch_size, desc, progress):
            enc = _encode(tokenizer, batch, device, max_prompt_tokens)
            position_ids = (enc["attention_mask"].cumsum(-1) - 1).clamp(min=0)
            logits = model(**enc, position_ids=position_ids, logits_to_keep=1, use_cache=False).logits[:, -1, :]
            out.extend(_answer_rows(logits, head, yes_id, no_id, tokenizer))
    return out


def _answer_rows(logits, head, yes_id: int, no_id: int, tokenizer) -> list[dict]:
    """One row per answer position: float32 P(Yes) and logits, greedy's answer (its tie rule), the top token."""
    from .metrics import p_yes_from_logits

    model_pair = logits[:, [yes_id, no_id]]
    pair = head.pair(model_pair)
    p_yes = p_yes_from_logits(pair[:, 0].cpu(), pair[:, 1].cpu())
    says_yes = greedy_says_yes(model_pair[:, 0], model_pair[:, 1], yes_id, no_id)
    top = logits.argmax(dim=-1)
    return [{"p_yes": float(p_yes[i]), "logit_yes": float(pair[i, 0]), "logit_no": float(pair[i, 1]),
             "answer": "Yes" if bool(says_yes[i]) else "No", "top_token": tokenizer.decode([int(top[i])])}
            for i in range(len(pair))]


def score_sessions(model, tokenizer, records: Sequence[dict], cutoff_len: int | None = None,
                   system_prompt: str | None = None, enable_thinking: bool = False, batch_size: int = 4,
                   progress: bool = True, desc: str = "Scoring sessions", source: str = "data") -> list[dict]:
    """P(Yes) for every answer of session records, one forward pass per (split) session example.

    The examples are tokenized exactly as for training (true earlier answers and ratings in the context, runs
    split between turns to fit ``cutoff_len``); at each answer position the Yes/No logits are re-projected in
    float32. Returns one dict per answer, in record and turn order:
    ``{"p_yes", "logit_yes", "logit_no", "answer", "top_token"}``.
    """
    import torch

    from .preprocess import answer_positions, tokenize_sessions_to_arrow

    table = tokenize_sessions_to_arrow(records, tokenizer, cutoff_len or (1 << 30), system_prompt,
                                       enable_thinking, source).to_pydict()
    yes_id, no_id = answer_token_ids(tokenizer)
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    rows = list(zip(table["input_ids"], table["labels"]))
    out: list[dict] = []
    model.eval()
    with torch.inference_mode(), AnswerLogits(model, yes_id, no_id) as head:
        for batch in _batches(rows, batch_size, desc, progress):
            width = max(len(ids) for ids, _ in batch)
            ids = torch.full((len(batch), width), pad, dtype=torch.long)
            labels = torch.full((len(batch), width), -100, dtype=torch.long)
            mask = torch.zeros((len(batch), width), dtype=torch.long)
            for i, (row_ids, row_labels) in enumerate(batch):  # right padding: positions start at 0
                ids[i, :len(row_ids)], labels[i, :len(row_ids)] = torch.tensor(row_ids), torch.tensor(row_labels)
                mask[i, :len(row_ids)] = 1
            starts = answer_positions(labels)[1].to(device)
            logits = model(input_ids=ids.to(device), attention_mask=mask.to(device), logits_to_keep=starts,
                           use_cache=False).logits  # (N_answers, V)
            out.extend(_answer_rows(logits, head, yes_id, no_id, tokenizer))
    return out


def block_attention(block_ids, dtype):
    """``(attention_mask, position_ids)`` of candidate-block rows, for the model's forward pass.

    ``block_ids`` ``(B, T)``: 0 on the shared prefix, ``j > 0`` on block j, -1 on padding. A token attends
    causally to the prefix and to its own block only; every block's positions continue from the end of the
    prefix (sibling blocks share offsets), so each block sees exactly what it would as one ordinary prompt.
    The mask is additive ``(B, 1, T, T)`` in ``dtype`` (0 = attend, dtype min = not): eager attention adds it,
    SDPA takes it as is (a boolean mask would be *added* as 0/1 by eager attention). Padding rows attend to
    themselves, so no row is fully masked (that gives NaN). transformers passes a 4D mask through unchanged;
    it must always go with these explicit ``position_ids``.
    """
    import torch

    t = block_ids.shape[1]
    q, k = block_ids[:, :, None], block_ids[:, None, :]
    causal = torch.ones(t, t, dtype=torch.bool, device=block_ids.device).tril()
    pad = q < 0
    allowed = causal & ((k == q) | (k == 0)) & (k >= 0) & ~pad
    position_ids = (allowed.sum(-1) - 1).clamp(min=0)
    allowed |= pad & torch.eye(t, dtype=torch.bool, device=block_ids.device)
    mask = torch.zeros(allowed.shape, dtype=dtype, device=block_ids.device)
    mask.masked_fill_(~allowed, torch.finfo(dtype).min)
    return mask[:, None], position_ids


def mask_dtype(model):
    """The dtype attention computes in: autocast's when it is on, else the input embeddings'."""
    import torch

    device = next(model.parameters()).device.type
    if torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return model.get_input_embeddings().weight.dtype


def block_inputs(model, inputs: dict) -> dict:
    """Model inputs with ``block_ids`` (if present) turned into the block mask and position ids."""
    if "block_ids" not in inputs:
        return inputs
    out = {k: v for k, v in inputs.items() if k not in ("block_ids", "attention_mask", "position_ids")}
    out["attention_mask"], out["position_ids"] = block_attention(inputs["block_ids"], mask_dtype(model))
    return out


def pad_rows(rows: Sequence[Sequence[int]], value: int):
    """Right-padded ``(B, T)`` long tensor of integer rows."""
    import torch

    out = torch.full((len(rows), max(len(r) for r in rows)), value, dtype=torch.long)
    for i, r in enumerate(rows):
        out[i, :len(r)] = torch.as_tensor(r, dtype=torch.long)
    return out


def score_blocks(model, tokenizer, records: Sequence[dict], cutoff_len: int | None = None,
                 system_prompt: str | None = None, enable_thinking: bool = False, batch_size: int = 4,
                 progress: bool = True, desc: str = "Scoring blocks", source: str = "data") -> list[dict]:
    """P(Yes) for every candidate block of candidate-block records: one forward pass per example (with the soft CF
    tokens of a model that has them, :func:`recsft.cf.cf_token_ids`).

    Each block attends to the shared prefix and itself only (:func:`block_attention`), so its P(Yes) is that of
    the same prefix and candidate asked as one ordinary question. Returns one dict per block, in record and
    block order: ``{"p_yes", "logit_yes", "logit_no", "answer", "top_token"}``.
    """
    import torch

    from .cf import cf_token_ids
    from .preprocess import answer_positions, tokenize_blocks_to_arrow, with_cf_tokens

    table = tokenize_blocks_to_arrow(records, tokenizer, cutoff_len or (1 << 30), system_prompt, enable_thinking,
                                     source).to_pydict()
    tokens = cf_token_ids(model)
    if tokens is not None:  # a model trained with soft CF tokens reads them where training put them
        table.update(with_cf_tokens(table, tokens))
    yes_id, no_id = answer_token_ids(tokenizer)
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    rows = list(zip(table["input_ids"], table["labels"], table["block_ids"]))
    out: list[dict] = []
    model.eval()
    with torch.inference_mode(), AnswerLogits(model, yes_id, no_id) as head:
        for batch in _batches(rows, batch_size, desc, progress):
            ids, labels, blocks = (pad_rows([r[i] for r in batch], v) for i, v in ((0, pad), (1, -100), (2, -1)))
            starts = answer_positions(labels)[1].to(device)
            fwd = block_inputs(model, {"input_ids": ids.to(device), "block_ids": blocks.to(device)})
            logits = model(**fwd, logits_to_keep=starts, use_cache=False).logits  # (N_answers, V)
            out.extend(_answer_rows(logits, head, yes_id, no_id, tokenizer))
    return out


def prompts_for(records: Sequence[dict], tokenizer, system_prompt: str | None = None,
                enable_thinking: bool = False, source: str = "data") -> tuple[list[str], list[str | None]]:
    """Templated prompt texts (exactly as in training) and gold labels ("Yes"/"No"/None) for records."""
    prompts, _, labels = render_labelled(records, tokenizer, system_prompt, enable_thinking, source)
    return prompts, labels


def yes_no_logits(hidden, lm_head, yes_id: int, no_id: int):
    """``(..., 2)`` float32 logits of Yes and No: final hidden states projected onto the two LM-head rows.

    The projection runs in float32 (autocast off, bias included) whatever the model's dtype (bf16 logits are
    rounded to steps of 0.125); only two rows are computed, not the vocabulary. Used by :class:`AnswerLogits`
    and by the shared-prefix ranking (``recsft.ranking``). ``lm_head`` must be a plain linear layer.
    """
    import torch

    rows = [yes_id, no_id]
    bias = getattr(lm_head, "bias", None)
    with torch.autocast(device_type=hidden.device.type, enabled=False):
        return torch.nn.functional.linear(hidden.float(), lm_head.weight[rows].float(),
                                          bias[rows].float() if bias is not None else None)
