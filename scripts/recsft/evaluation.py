"""Evaluation shared by the inference scripts and training's generation eval: load, predict, score."""

from __future__ import annotations

import json
import logging
import time
from collections import Counter
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Sequence

from tqdm.auto import tqdm

from .config import MAX_NEW_TOKENS, TEMPERATURE, TOP_P
from .inference import generate, prompts_for, score
from .metrics import best_threshold, compute_metrics, extract_answer, normalize_label
from .preprocess import prompt_budget

if TYPE_CHECKING:
    from .resume import ScoreJournal

logger = logging.getLogger(__name__)
KEEP_FIELDS = ("user_id", "history_titles", "candidate_title", "candidate_movie_id", "instruction", "input")


@dataclass(frozen=True)
class EvalSettings:
    """How prompts are rendered and answered; the same for every model and mode compared in one run."""

    batch_size: int = 16
    system_prompt: str | None = None
    enable_thinking: bool = False
    cutoff_len: int | None = None
    max_new_tokens: int = MAX_NEW_TOKENS  # the decoding knobs matter in generate mode only
    temperature: float = TEMPERATURE
    top_p: float = TOP_P

    @classmethod
    def from_config(cls, cfg) -> "EvalSettings":
        """The one place the inference settings are read from a :class:`~recsft.config.Config`."""
        return cls(batch_size=cfg.infer.infer_batch_size, system_prompt=cfg.data.system_prompt,
                   enable_thinking=cfg.model.enable_thinking, cutoff_len=cfg.data.cutoff_len,
                   max_new_tokens=cfg.infer.max_new_tokens, temperature=cfg.infer.temperature, top_p=cfg.infer.top_p)


def load_for_eval(model_args, adapter_dir: str | None, device: str | None = None, merge: bool = False):
    """``(model, tokenizer)`` for inference: the base model, with the LoRA adapter when ``adapter_dir`` is set.

    The adapter is checked first (folder, adapter_config.json, same base model), before the model loads.
    ``merge`` folds the adapter into the weights (faster; not for quantized models, and it removes the
    ability to switch the adapter off for a base-model comparison).
    """
    from .modeling import check_adapter, get_device, is_kbit, load_adapter, load_model, load_tokenizer

    device = device or get_device()
    if device == "cpu":
        from .runtime import set_threads

        set_threads(model_args.num_threads)
    if adapter_dir:
        check_adapter(adapter_dir, model_args.model_name_or_path)
    tok = load_tokenizer(model_args.tokenizer_name_or_path or model_args.model_name_or_path,
                         model_args.trust_remote_code, padding_side="left")
    model = load_model(model_args.model_name_or_path, device, model_args.dtype, model_args.flash_attn,
                       model_args.quantization_bit, model_args.trust_remote_code)
    if adapter_dir:
        model = load_adapter(model, adapter_dir, model_args.model_name_or_path, checked=True)
        if merge and is_kbit(model):
            logger.info("Adapter not merged: the base is %d-bit and merging would re-quantize the LoRA update; "
                        "running it unmerged (same outputs, slightly slower)", 4 if model.is_loaded_in_4bit else 8)
        elif merge:
            model = model.merge_and_unload()
        from .cf import load_cf_tokens

        load_cf_tokens(model, adapter_dir, len(tok), "the adapter folder is incomplete; copy it again from the "
                                                     "training output_dir")
    return model.eval(), tok


def check_record_mode(records: Sequence[dict], source: str, mode: str, compare_modes: bool, model_args):
    """Session and candidate-block records are scored only (one pass per example); returns the model settings to
    load with (candidate blocks: SDPA/eager attention, see :func:`recsft.modeling.attention_for_blocks`)."""
    import dataclasses

    from .io import DataError
    from .modeling import attention_for_blocks

    key = next((k for k in ("turns", "blocks") if records and all(k in r for r in records)), None)
    if key is None:
        return model_args
    kind = {"turns": "session", "blocks": "candidate-block"}[key]
    if mode != "score" or compare_modes:
        raise DataError(f"{source}: {kind} records are evaluated with --eval_mode score only (one pass per example, "
                        f"no generation); drop --compare_modes / use --eval_mode score")
    if key == "blocks":
        return dataclasses.replace(model_args, flash_attn=attention_for_blocks(model_args.flash_attn))
    return model_args


def predict(model, tok, prompts: Sequence[str], mode: str, batch_size: int = 16, max_new_tokens: int = 8,
            temperature: float = 0.0, top_p: float = 1.0, desc: str = "",
            cutoff_len: int | None = None, progress: bool = True) -> list[dict[str, Any]]:
    """Per prompt: ``response`` and parsed ``prediction`` (generate), plus ``p_yes`` (score).

    Prompts are cut from the left to fit ``cutoff_len`` exactly as in training.
    """
    budget = prompt_budget(tok, cutoff_len)  # the one prompt budget: training truncates to it too
    if mode == "score":
        rows = score(model, tok, prompts, batch_size, progress, desc=desc or "Scoring", max_prompt_tokens=budget)
        return [{"response": r["top_token"], "prediction": r["answer"], "p_yes": r["p_yes"],
                 "margin": r["logit_yes"] - r["logit_no"]} for r in rows]
    responses = generate(model, tok, prompts, max_new_tokens, temperature, top_p, batch_size, progress,
                         desc=desc or "Generating", max_prompt_tokens=budget)
    return [{"response": r, "prediction": extract_answer(r)} for r in responses]


def evaluate(model, tok, records: Sequence[dict], mode: str, settings: EvalSettings, source: str = "data",
             desc: str = "", residual: "Residual | None" = None,
             journal: "ScoreJournal | None" = None) -> tuple[list[dict], dict[str, float]]:
    """Predictions (one row per record, with its ids and label) and metrics on labelled records.

    Session records (field ``turns``) and candidate-block records (``blocks``) give one row per answer (score mode
    only). Metrics include UAUC when every row has a ``user_id``. ``residual``: the adapter's CF residual, applied
    to every score row (:func:`apply_residual`). ``journal``: save every batch as it is scored and skip the records
    an interrupted run already scored (:class:`~recsft.resume.ScoreJournal`). Session and candidate-block records
    are scored longest first (:func:`longest_first`), the rows returned in record order.
    """
    order = longest_first(records)
    ordered = [records[i] for i in order] if order is not None else records
    if journal is None:
        rows, seconds = prediction_rows(model, tok, ordered, mode, settings, source, desc)
    else:
        rows, seconds = journaled_rows(model, tok, ordered, mode, settings, source, desc, journal)
    if order is not None:
        rows = in_record_order(rows, ordered, order)
    metrics = row_metrics(rows, mode, seconds)
    return (rows, metrics) if residual is None else residual_metrics(rows, residual, metrics)


def many_key(records: Sequence[dict]) -> str | None:
    """``"turns"`` (session records), ``"blocks"`` (candidate-block records) or None (one answer per record)."""
    return next((key for key in ("turns", "blocks") if records and all(key in r for r in records)), None)


def longest_first(records: Sequence[dict]) -> list[int] | None:
    """Session or candidate-block records' indices, longest first (characters of the record, a proxy for its
    tokens), or None for single-format records. Such records differ in length (a user's last record holds fewer
    blocks): batched in file order they pad to 1.5x the tokens they hold (the default blocks test split, batches
    of 16), sorted by this proxy to 1.02x. Padding is on the right, so the answers' scores do not change."""
    if many_key(records) is None:
        return None
    size = [len(json.dumps(r, ensure_ascii=False)) for r in records]
    return sorted(range(len(records)), key=lambda i: -size[i])


def in_record_order(rows: list[dict], ordered: Sequence[dict], order: list[int]) -> list[dict]:
    """Rows of ``ordered`` (= records[order], one row per answer) back in the records' own order."""
    key, per_record, at = many_key(ordered), [None] * len(order), 0
    for i, rec in zip(order, ordered):
        n = len(rec[key])
        per_record[i], at = rows[at:at + n], at + n
    return [row for chunk in per_record for row in chunk]


def prediction_rows(model, tok, records: Sequence[dict], mode: str, settings: EvalSettings, source: str = "data",
                    desc: str = "", progress: bool = True) -> tuple[list[dict], float]:
    """:func:`evaluate`'s rows (without a residual) and the seconds they took."""
    if (key := many_key(records)) is not None:
        return evaluate_many(model, tok, records, key, mode, settings, source, desc, progress)
    prompts, labels = _rendered(records, tok, settings, source)
    start = time.perf_counter()
    preds = predict(model, tok, prompts, mode, settings.batch_size, settings.max_new_tokens, settings.temperature,
                    settings.top_p, desc=desc, cutoff_len=settings.cutoff_len, progress=progress)
    seconds = time.perf_counter() - start
    rows = []
    for rec, label, pred in zip(records, labels, preds):
        row = {k: rec[k] for k in KEEP_FIELDS if k in rec}
        rows.append({**row, "label": label, **pred})
    return rows, seconds


def journaled_rows(model, tok, records: Sequence[dict], mode: str, settings: EvalSettings, source: str,
                   desc: str, journal: "ScoreJournal") -> tuple[list[dict], float]:
    """:func:`prediction_rows` one batch of records at a time, each batch saved to ``journal`` before the next
    starts; batches the journal already holds are not scored again. The batches are the ones a single call makes
    (session records split into several examples may batch differently: right padding only, so the same scores up
    to float rounding), so the rows are those of a run without a journal."""
    size, rows, seconds = settings.batch_size, [], 0.0
    with tqdm(total=len(records), initial=journal.records, desc=desc or f"Scoring ({mode})", unit="record") as bar:
        for start in range(0, len(records), size):
            if str(start) not in journal.done:
                batch = records[start:start + size]
                journal.add(start, len(batch), *prediction_rows(model, tok, batch, mode, settings, source,
                                                                progress=False))
                bar.update(len(batch))
            saved = journal.done[str(start)]
            rows.extend(saved["rows"])
            seconds += saved["seconds"]
    return rows, seconds


# ------------------------------------------------------------------------------------ CF residual
@dataclass(frozen=True)
class Residual:
    """An adapter's CF residual: ``P(Yes) = sigmoid(c(user, movie) + a * margin + b)``, ``margin`` = the LLM's
    logit(Yes) - logit(No), ``c`` the like-logit of the saved CF table (recsft.cf)."""

    table: Any
    a: float
    b: float

    def combine(self, cf_logit, margin):
        """``c + a * margin + b`` (float64): the residual's logit from the CF logits ``c`` of ``table.logit``."""
        import numpy as np

        return np.asarray(cf_logit, dtype=np.float64) + self.a * np.asarray(margin, dtype=np.float64) + self.b


def load_residual(adapter_dir: str | None) -> Residual | None:
    """The CF residual saved with an adapter (``cf_residual.json``/``.safetensors``, ``cf_head.safetensors``), else
    None. A partial or corrupt set is a DataError naming the file."""
    from pathlib import Path

    from .cf import META_FILE, CFTable, ResidualHead

    if not adapter_dir or not (Path(adapter_dir) / META_FILE).is_file():
        return None
    fix = "the adapter folder is incomplete; copy it again from the training output_dir"
    table, head = CFTable.load(adapter_dir, fix=fix), ResidualHead.load(adapter_dir, fix=fix)
    return Residual(table, head.a.item(), head.b.item())  # plain floats (no autograd warning)


def check_residual_records(records: Sequence[dict], source: str) -> None:
    """An adapter trained with a CF residual scores only records that name their user and candidate movie."""
    from .io import DataError

    for i, rec in enumerate(records, 1):
        items = rec.get("blocks") or rec.get("turns") or [rec] if isinstance(rec, dict) else []
        if not isinstance(rec, dict) or "user_id" not in rec or not all("candidate_movie_id" in x for x in items):
            raise DataError(f"{source}: record {i} has no user_id / candidate_movie_id, which this adapter's CF "
                            f"residual needs; score the test-format, candidate-block or session files of "
                            f"prepare_data.py (they keep both ids)")


def check_cf_token_records(adapter_dir: str | None, records: Sequence[dict], source: str) -> None:
    """An adapter trained with soft CF tokens scores only candidate-block records (the tokens' place is the end of
    the shared prefix and the start of each block); checked before the model loads."""
    if not all("blocks" in r for r in records):
        refuse_cf_tokens(adapter_dir, source)


def refuse_cf_tokens(adapter_dir: str | None, source: str) -> None:
    """A one-line :class:`DataError` when ``adapter_dir`` has soft CF tokens: ``source`` has no candidate blocks."""
    from pathlib import Path

    from .cf import TOKENS_FILE
    from .io import DataError

    if adapter_dir and (Path(adapter_dir) / TOKENS_FILE).is_file():
        raise DataError(f"{source}: {adapter_dir} was trained with soft CF tokens (cf_tokens: true), which only "
                        f"candidate-block records carry; score the blocks_test.jsonl / blocks_eval.json files of "
                        f"prepare_data.py --format blocks")


def apply_residual(rows: list[dict], residual: Residual) -> None:
    """In place: ``p_yes`` and ``prediction`` from the residual; the LLM's own P(Yes) kept as ``llm_p_yes``."""
    import numpy as np

    margin = np.array([r["margin"] for r in rows], dtype=np.float64)
    c = residual.table.logit([r["user_id"] for r in rows], [r["candidate_movie_id"] for r in rows])
    logit = residual.combine(c, margin)
    p = 1.0 / (1.0 + np.exp(-logit))
    for row, ci, pi, li in zip(rows, c.tolist(), p.tolist(), logit.tolist()):
        row.update(llm_p_yes=row["p_yes"], cf_logit=ci, p_yes=pi, prediction="Yes" if li >= 0 else "No")


def residual_metrics(rows: list[dict], residual: Residual, metrics: dict) -> tuple[list[dict], dict]:
    apply_residual(rows, residual)
    return rows, {**row_metrics(rows, metrics["mode"], metrics["seconds"]),
                  "cf_residual": {"kind": residual.table.kind, "a": residual.a, "b": residual.b}}


_LAST_RENDERED: list = []  # [records, tokenizer, (settings, source, len(records)), (prompts, labels)] of the last call


def _rendered(records: Sequence[dict], tok, settings: EvalSettings, source: str) -> tuple[list[str], list]:
    """:func:`prompts_for` of ``records``, rendered once per run: evaluating the same records again (the base model
    next to the adapter, the other mode) reuses the prompts of the last call."""
    same = (len(_LAST_RENDERED) == 4 and _LAST_RENDERED[0] is records and _LAST_RENDERED[1] is tok
            and _LAST_RENDERED[2] == (settings, source, len(records)))
    if not same:
        result = prompts_for(records, tok, settings.system_prompt, settings.enable_thinking, source)
        _LAST_RENDERED[:] = [records, tok, (settings, source, len(records)), result]
    return _LAST_RENDERED[3]


def row_metrics(rows: list[dict], mode: str, seconds: float) -> dict[str, float]:
    """The shared metrics of prediction rows (UAUC too when every row has a ``user_id``), plus speed."""
    p_yes = [r["p_yes"] for r in rows] if mode == "score" else None
    users = [r["user_id"] for r in rows] if rows and all("user_id" in r for r in rows) else None
    metrics = compute_metrics([r["label"] for r in rows], [r["prediction"] for r in rows], p_yes, users)
    metrics.update({"mode": mode, "seconds": seconds, "examples_per_s": len(rows) / max(seconds, 1e-9)})
    return metrics


def evaluate_many(model, tok, records: Sequence[dict], key: str, mode: str, settings: EvalSettings,
                  source: str = "data", desc: str = "", progress: bool = True) -> tuple[list[dict], float]:
    """Score every answer of session records (``key="turns"``: true earlier answers in context) or candidate-block
    records (``key="blocks"``: each block on the shared history alone), one forward pass per example.

    Rows carry ``user_id`` and ``candidate_movie_id`` so they join one to one with the single format's test rows.
    Returns the rows and the seconds they took.
    """
    from .inference import score_blocks, score_sessions
    from .io import DataError

    kind = {"turns": "session", "blocks": "candidate-block"}[key]
    if mode != "score":
        raise DataError(f"{source}: {kind} records are evaluated with --eval_mode score (one pass per example)")
    start = time.perf_counter()
    scorer = score_sessions if key == "turns" else score_blocks
    scores = scorer(model, tok, records, settings.cutoff_len, settings.system_prompt, settings.enable_thinking,
                    settings.batch_size, progress, desc=desc or f"Scoring {kind} records", source=source)
    seconds = time.perf_counter() - start
    items = [(rec, j, t) for rec in records for j, t in enumerate(rec[key])]
    position = "turn" if key == "turns" else "block"
    rows = [{"user_id": rec.get("user_id"), "candidate_movie_id": t.get("candidate_movie_id"),
             "candidate_title": t.get("candidate_title"), position: j, "label": normalize_label(t["answer"]),
             "response": s["top_token"], "prediction": s["answer"], "p_yes": s["p_yes"],
             "margin": s["logit_yes"] - s["logit_no"]}
            for (rec, j, t), s in zip(items, scores)]
    return rows, seconds


def threshold_metrics(labels: Sequence[str], p_yes: Sequence[float], threshold: float) -> dict[str, float]:
    preds = ["Yes" if p >= threshold else "No" for p in p_yes]
    m = compute_metrics(labels, preds)
    return {"threshold": threshold, "accuracy": m["accuracy"], "f1": m["f1"]}


def choose_threshold(model, tok, eval_records: Sequence[dict], settings: EvalSettings,
                     residual: Residual | None = None) -> float:
    """P(Yes) threshold maximising accuracy on eval records (never on the test records)."""
    rows, _ = evaluate(model, tok, eval_records, "score", settings, desc="Scoring eval (threshold)",
                       residual=residual)
    return best_threshold([r["label"] == "Yes" for r in rows], [r["p_yes"] for r in rows])


def evaluate_with_thresholds(model, tok, records: Sequence[dict], mode: str, settings: EvalSettings,
                             source: str = "data", desc: str = "",
                             calibration_records: Sequence[dict] | None = None,
                             residual: Residual | None = None,
                             journal: "ScoreJournal | None" = None) -> tuple[list[dict], dict]:
    """:func:`evaluate`; in score mode also accuracy/F1 at P(Yes) >= 0.5 (``at_0.5``) and, with
    ``calibration_records`` (eval data), at the threshold chosen on them (``at_eval_threshold``)."""
    rows, metrics = evaluate(model, tok, records, mode, settings, source, desc, residual, journal)
    if mode == "score":
        labels, p_yes = [r["label"] for r in rows], [r["p_yes"] for r in rows]
        metrics["at_0.5"] = threshold_metrics(labels, p_yes, 0.5)
        if calibration_records is not None:
            t = choose_threshold(model, tok, calibration_records, settings, residual)
            metrics["at_eval_threshold"] = threshold_metrics(labels, p_yes, t)
    return rows, metrics


def compare_modes(model, tok, records: Sequence[dict], first_mode: str, first: tuple[list[dict], dict],
                  settings: EvalSettings, source: str = "data") -> dict:
    """Run the other mode on the same examples: label agreement where generation said Yes/No, and speed."""
    first_rows, first_metrics = first
    other = "generate" if first_mode == "score" else "score"
    rows, metrics = evaluate(model, tok, records, other, settings, source, desc=other)
    by_mode = {first_mode: (first_rows, first_metrics), other: (rows, metrics)}
    gen_rows, score_rows = by_mode["generate"][0], by_mode["score"][0]
    parsed = [(g, s) for g, s in zip(gen_rows, score_rows) if g["prediction"] in ("Yes", "No")]
    agree = sum(g["prediction"] == s["prediction"] for g, s in parsed)
    speedup = by_mode["generate"][1]["seconds"] / max(by_mode["score"][1]["seconds"], 1e-9)
    print(f"[modes] score agrees with generate on {agree}/{len(parsed)} examples where generation gave Yes/No; "
          f"score is {speedup:.1f}x faster ({by_mode['score'][1]['examples_per_s']:.2f} vs "
          f"{by_mode['generate'][1]['examples_per_s']:.2f} examples/s)", flush=True)
    return {"generation_parsed": len(parsed), "agreement": agree / len(parsed) if parsed else float("nan"),
            "score_speedup": speedup, f"{other}_metrics": metrics}


def generation_eval(model, tokenizer, eval_path: str, n: int, settings: EvalSettings) -> dict:
    """Generation (greedy, max_new_tokens=8 by default) on the first ``n`` eval records: the metrics only."""
    from .io import load_data

    _, metrics = evaluate(model, tokenizer, load_data(eval_path)[:n], "generate", settings, eval_path, "Gen eval")
    return {k: v for k, v in metrics.items() if k not in ("mode", "seconds", "examples_per_s")}


# ------------------------------------------------------------------------------ base vs adapter
CATEGORIES = ("lora_right_base_wrong", "base_right_lora_wrong", "both_wrong", "both_right")


def pair_rows(base_rows: list[dict], lora_rows: list[dict]) -> list[dict]:
    """One row per example with both predictions and which model was right."""
    rows = []
    for b, lo in zip(base_rows, lora_rows):
        row = {k: v for k, v in lo.items() if k not in ("response", "prediction", "p_yes")}
        row.update({"base_response": b["response"], "base_prediction": b["prediction"],
                    "lora_response": lo["response"], "lora_prediction": lo["prediction"],
                    "agree": b["prediction"] == lo["prediction"],
                    "base_correct": b["prediction"] == b["label"], "lora_correct": lo["prediction"] == lo["label"]})
        if "p_yes" in lo:
            row.update(base_p_yes=b["p_yes"], lora_p_yes=lo["p_yes"])
        rows.append(row)
    return rows


def category(row: dict) -> str:
    """Which of :data:`CATEGORIES` a paired row falls in (who was right)."""
    if row["lora_correct"] and not row["base_correct"]:
        return "lora_right_base_wrong"
    if row["base_correct"] and not row["lora_correct"]:
        return "base_right_lora_wrong"
    return "both_right" if row["lora_correct"] else "both_wrong"


def agreement(rows: list[dict]) -> dict[str, int]:
    """Examples, (dis)agreements and the count of every right/wrong category."""
    counts = Counter(category(r) for r in rows)
    agree = sum(r["agree"] for r in rows)
    return {"examples": len(rows), "agree": agree, "disagree": len(rows) - agree,
            **{c: counts.get(c, 0) for c in ("lora_right_base_wrong", "base_right_lora_wrong", "both_right",
                                              "both_wrong")}}
