"""Ranking evaluation: each liked test candidate ranked among N movies its user never rated.

Copy-paste:

    python scripts/rank_eval.py                                          # classical baselines, 99 uniform negatives
    python scripts/rank_eval.py --sampling popularity                    # popularity-weighted negatives
    python scripts/rank_eval.py --llm --config configs/smollm2_movielens_lora.yaml --max-users 20 \\
        --models none --output_dir output/rank_smollm2_zeroshot          # the base LLM, zero-shot
    python scripts/rank_eval.py --config configs/qwen3_movielens_qlora.yaml \\
        --adapter_dir output/qwen3-movielens-qlora --max_users 200 --output_dir output/rank_qwen3_lora
    # candidate blocks (a folder prepared with --format blocks --history-from train), against BPR, plus a row
    # blending BPR with the LLM (weights fit on eval questions); a stopped run continues with --resume
    python scripts/rank_eval.py --data_dir data/movielens_blocks --config configs/smollm2_movielens_blocks.yaml \\
        --adapter_dir output/smollm2-movielens-blocks --models bpr --reference bpr --hybrid bpr --max-users 200 \\
        --no-full-ranking --output_dir output/rank_blocks

For every test user (sorted ids; ``--max-users`` keeps the first K), every test candidate labelled Yes
is one question: that movie plus ``--n-negatives`` movies the user never rated in any split, drawn with
``--seed`` (``--sampling uniform`` or ``popularity``: probability proportional to 1 + training ratings).
The same questions are used for every model: the LLM ranks by P(Yes) of the test example's own prompt
(same history) with each candidate swapped in, scored with one shared-prefix pass per question; each
baseline ranks by its own score. Reported: HR@1/5/10, NDCG@10, MRR (expected under random tie-breaking,
averaged over questions) and, for the baselines, the same metrics when ranking among *all* unrated movies.

An adapter trained with a CF residual gives two LLM rows: the text alone (its logit(Yes) - logit(No)) and the
text plus the residual (c + a * margin + b). ``--hybrid MODEL`` adds a row ranking by w1 * that baseline's score +
w2 * the LLM's margin, the two weights fit on eval-split questions (``--fit-users``; the LLM scores them too, so
they cost LLM time). ``--reference MODEL`` adds ΔNDCG@10 and ΔHR@10 of every other row
against that baseline, with 95% intervals from a paired bootstrap over users.

Outputs in --output_dir: rank_metrics.json (protocol, counts, metrics per model), questions.jsonl (the
sampled candidates), question_metrics.jsonl (HR@10, NDCG@10, reciprocal rank of every row per question),
rank_table.md (markdown rows for docs/results.md) and, for the LLM, llm_margins.jsonl (its margins, written as
each user finishes: what ``--resume`` continues from).
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from utils import DEFAULT_CONFIG, ArgumentParser, DataError, non_negative_int, output_dir, positive_int, run

logger = logging.getLogger("rank_eval")


def parse_args(argv: list[str] | None = None):
    from utils import MODELS

    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data_dir", default="data/movielens_qwen3", help="folder written by prepare_data.py")
    p.add_argument("--output_dir", type=output_dir, default="output/rank_eval")
    p.add_argument("--n-negatives", type=int, default=99, help="unrated movies per question (N)")
    p.add_argument("--sampling", choices=["uniform", "popularity"], default="uniform")
    p.add_argument("--seed", type=non_negative_int, default=0)
    p.add_argument("--max-users", type=int, default=None, help="first K test users (bounds the LLM cost)")
    p.add_argument("--models", default=",".join(MODELS), help=f"baselines: comma list of {', '.join(MODELS)}, or none")
    p.add_argument("--epochs", type=positive_int, default=5, help="epochs of SASRec")
    p.add_argument("--no-full-ranking", action="store_true", help="skip the baselines' all-unrated-movies ranking")
    p.add_argument("--llm", action="store_true", help="rank with the LLM of --config too")
    p.add_argument("--config", default=DEFAULT_CONFIG, help="YAML config of the LLM (model, cutoff_len, prompt)")
    p.add_argument("--adapter_dir", "--adapter", default=None,
                   help="LoRA adapter folder, or none for the base model (implies --llm)")
    p.add_argument("--name", default=None, help="label of the LLM row (default: model name + adapter)")
    p.add_argument("--batch-size", type=positive_int, default=32, help="LLM: candidates per forward pass")
    p.add_argument("--reference", default=None, metavar="MODEL",
                   help="a baseline of --models (key or label, e.g. bpr): every other row gets ΔNDCG@10 and ΔHR@10 "
                        "against it with a 95%% interval from a paired bootstrap over users")
    p.add_argument("--resamples", type=int, default=1000, help="bootstrap resamples (with --reference)")
    p.add_argument("--hybrid", default=None, metavar="MODEL",
                   help="a baseline of --models (e.g. bpr): add a row ranking by w1*its score + w2*the LLM's margin, "
                        "the two weights fit on eval-split questions of the first --fit-users users")
    p.add_argument("--fit-users", type=positive_int, default=20,
                   help="with --hybrid: users whose liked eval candidates (each among --n-negatives unrated movies) "
                        "fit the weights")
    p.add_argument("--resume", action="store_true",
                   help="LLM: keep the users already scored in --output_dir/llm_margins.jsonl (a stopped run)")
    p.add_argument("overrides", nargs="*", help="config overrides: key=value")
    return p.parse_args(argv)


def check_args(args) -> tuple[list[str], str | None]:
    """The baseline keys of --models and the label of the --reference row (None without one)."""
    from utils import LABELS, MODELS

    if args.n_negatives < 1:
        raise DataError(f"--n-negatives must be >= 1, got {args.n_negatives}")
    if args.max_users is not None and args.max_users < 1:
        raise DataError(f"--max-users must be >= 1, got {args.max_users}")
    names = [] if args.models.strip().lower() == "none" else [n.strip() for n in args.models.split(",") if n.strip()]
    unknown = [n for n in names if n not in MODELS]
    if unknown:
        raise DataError(f"--models: unknown {unknown}; choose from {', '.join(MODELS)} or none")
    reference = None if args.reference is None else LABELS[ranked_baseline(args.reference, names, "--reference")]
    if args.hybrid is not None:
        if not (args.llm or args.adapter_dir is not None):
            raise DataError("--hybrid blends a baseline with the LLM; add --llm or --adapter_dir")
        args.hybrid = ranked_baseline(args.hybrid, names, "--hybrid")
    if args.resamples < 100:
        raise DataError(f"--resamples must be >= 100, got {args.resamples}")
    if args.resume and not (args.llm or args.adapter_dir is not None):
        raise DataError("--resume continues an LLM ranking run (llm_margins.jsonl); add --llm or --adapter_dir")
    return names, reference


def ranked_baseline(name: str, names: list[str], flag: str) -> str:
    """The key of ``name`` (a key or label of a baseline in ``names`` that ranks: not one score per user)."""
    from utils import LABELS, MODELS, PER_USER_CONSTANT

    key = name if name in MODELS else next((k for k, v in LABELS.items() if v == name), None)
    if key is None or key not in names or key in PER_USER_CONSTANT:
        raise DataError(f"{flag} {name!r}: name one of the ranked baselines of --models "
                        f"({', '.join(n for n in names if n not in PER_USER_CONSTANT) or 'none chosen'}), e.g. "
                        f"--models bpr {flag} bpr")
    return key


def check_llm(args):
    """The LLM's config, adapter (folder, config, weights, shapes against the base model) and model source: every
    check of the LLM row, done before any data is read or any baseline is fitted. Returns the config."""
    from utils import adapter_path, check_adapter, load_config, preflight_inference

    cfg = load_config(args.config, args.overrides)
    preflight_inference(cfg.model)
    adapter = adapter_path(args.adapter_dir)
    if adapter is not None:
        check_adapter(adapter, cfg.model.model_name_or_path, flag="--adapter_dir")
    return cfg


PROMPT_PARAMS = {"features": "--features", "retrieval_history": "--retrieval-history"}


def check_llm_data(args, params: dict, examples) -> None:
    """The LLM ranks the test prompt with each candidate swapped in: a folder whose prompts depend on the
    candidate beyond its title (feature lines, a history chosen by the candidate) cannot be ranked that way.
    Every test prompt must render (``format_prompt``: titles, ratings on the scale) before anything is fitted."""
    from utils import format_prompt

    used = [flag for key, flag in PROMPT_PARAMS.items() if params.get(key)]
    if used:
        raise DataError(f"--llm: {args.data_dir} was prepared with {' and '.join(used)}, whose prompt lines depend on "
                        f"the candidate, so swapping candidates into one prompt would rank prompts the model was "
                        f"not trained on; rank the LLM on a folder prepared without {' / '.join(used)} (the "
                        f"baselines alone, without --llm/--adapter, work on this folder)")
    for i, e in enumerate(examples, 1):
        try:
            format_prompt(e)
        except DataError as err:
            raise DataError(f"--llm: {args.data_dir}: test example {i} (user {e.get('user_id')!r}, movie "
                            f"{e.get('candidate_movie_id')!r}): {err}") from None


def blocks_file(folder, split: str) -> Path:
    """The candidate-block file of ``split`` in a folder prepared with ``--format blocks``."""
    return Path(folder) / f"blocks_{split}.{'jsonl' if split == 'test' else 'json'}"


def blocks_for_ranking(args, data, splits=("test",)) -> tuple[dict[str, list[dict]], dict] | None:
    """A folder prepared with ``--format blocks``: ``({split: its records}, {movie: candidate block text})``, the
    texts rebuilt from the folder's ratings (static protocol); None for a single-format folder. Checked before
    any fitting."""
    from utils import load_data, load_json, static_candidate_texts, train_ratings

    folder = Path(args.data_dir)
    if not (folder / "blocks_stats.json").is_file():
        return None
    params = load_json(folder / "blocks_stats.json").get("params", {})
    if params.get("history_from") != "train":
        raise DataError(f"--llm: {folder} holds candidate blocks of the online protocol (--history-from all), whose "
                        f"history moves with each test candidate; rank the LLM on a folder prepared with "
                        f"`--format blocks --history-from train`")
    features = params.get("features") or []
    if "genres" in features and data.genres is None:
        raise DataError(f"--llm: {folder / 'items.parquet'} has no genres column to rebuild the candidates' Genres "
                        f"lines; re-run `python scripts/prepare_data.py --format blocks ...` into {folder}")
    records = {split: load_data(blocks_file(folder, split)) for split in splits}
    items = sorted(data.ratings.movie_id.unique().tolist())
    texts = static_candidate_texts(train_ratings(data.ratings, data.splits), data.titles, items, features,
                                   data.params["like_threshold"], data.genres)
    return records, texts


def block_margins(model, tok, cfg, args, questions, groups, texts, budget, journal,
                  desc: str = "LLM ranking (blocks)") -> tuple[list, int]:
    """Per question, logit(Yes) - logit(No) of its candidates as candidate blocks: one prefix pass per group (a
    journal unit: groups already in ``journal`` are not scored again)."""
    import numpy as np
    from tqdm.auto import tqdm

    from utils import block_candidate_scores, unit_key

    out, cut = [None] * len(questions), 0
    keys = [unit_key(g["record"]["user_id"], g["record"]["prefix"], g["movies"]) for g in groups]
    done = sum(len(g["questions"]) for g, key in zip(groups, keys) if key in journal.done)
    with tqdm(total=len(questions), initial=done, desc=desc, unit="question") as bar:
        for g, key in zip(groups, keys):
            if key not in journal.done:
                margin, was_cut = block_candidate_scores(model, tok, g["record"], [texts[m] for m in g["movies"]],
                                                         args.batch_size, cfg.data.system_prompt,
                                                         cfg.model.enable_thinking, budget, g["movies"])
                journal.add(key, margin, was_cut)
                bar.update(len(g["questions"]))
            margin, was_cut = journal.done[key]
            cut += was_cut * len(g["questions"])
            at = dict(zip(g["movies"], margin))
            for i in g["questions"]:
                out[i] = np.array([at[c] for c in questions[i]["candidates"]])
    return out, cut


def question_margins(model, tok, cfg, args, questions, titles, budget, journal,
                     desc: str = "LLM ranking") -> tuple[list, int]:
    """Per question, logit(Yes) - logit(No) of its candidates swapped into the test prompt: one prefix pass each
    (one journal unit each)."""
    import json

    from tqdm.auto import tqdm

    from utils import llm_question_scores, unit_key

    out, cut = [], 0
    for q in tqdm(questions, desc=desc, unit="question"):
        key = unit_key(q["user_id"], json.dumps(q["example"], sort_keys=True, default=str), q["candidates"])
        if key not in journal.done:
            margin, was_cut = llm_question_scores(model, tok, q["example"], [titles[c] for c in q["candidates"]],
                                                    args.batch_size, cfg.data.system_prompt,
                                                    cfg.model.enable_thinking, budget)
            journal.add(key, margin, was_cut)
        margin, was_cut = journal.done[key]
        out.append(margin)
        cut += was_cut
    return out, cut


def llm_label(args, cfg) -> str:
    from utils import adapter_path

    adapter = adapter_path(args.adapter_dir)
    base = Path(str(cfg.model.model_name_or_path).rstrip("/")).name
    return args.name or (f"{base} + LoRA ({Path(adapter).name})" if adapter else f"{base}, zero-shot")


def llm_rows(args, cfg, questions, titles, header, texts=None, groups=None,
             fit=None) -> tuple[dict[str, list], int, list, list | None]:
    """``({row label: per-question ranking metrics}, questions whose prompt was cut, margins, fit margins)`` of
    the LLM (checked by :func:`check_llm`); ``texts``/``groups``: rank with candidate blocks
    (:func:`blocks_for_ranking`, ``recsft.ranking.block_groups``); ``fit``: ``(questions, groups)`` of the eval
    split, scored too (their margins fit ``--hybrid``). Margins go to ``llm_margins.jsonl`` as they come
    (``--resume`` continues from it). An adapter trained with a CF residual gives two rows: the text alone (its
    margin) and text + residual (c + a * margin + b)."""
    from utils import MarginJournal, adapter_path, load_for_eval, load_residual, prompt_budget, rank_metrics

    adapter = adapter_path(args.adapter_dir)
    residual = load_residual(adapter)
    journal = MarginJournal(Path(args.output_dir) / "llm_margins.jsonl", header, args.resume)
    if journal.done:
        logger.info(f"--resume: {len(journal.done)} units already scored in {journal.path}")
    model, tok = load_for_eval(cfg.model, adapter, merge=True)
    budget = prompt_budget(tok, cfg.data.cutoff_len)

    def margins_of(qs, gs, desc):
        if gs is not None:
            return block_margins(model, tok, cfg, args, qs, gs, texts, budget, journal, desc + " (blocks)")
        return question_margins(model, tok, cfg, args, qs, titles, budget, journal, desc)

    margins, cut = margins_of(questions, groups, "LLM ranking")
    fit_margins = margins_of(*fit, "LLM ranking, eval questions for --hybrid")[0] if fit else None
    if cut:
        logger.warning(f"{cut} questions: prompt longer than cutoff_len={cfg.data.cutoff_len}; history cut from the "
                       f"left by the same amount for every candidate")
    label = llm_label(args, cfg)
    rows = {(f"{label}, text only" if residual else label): [rank_metrics(m[0], m[1:]) for m in margins]}
    if residual is not None:
        combined = [residual.combine(residual.table.logit([q["user_id"]] * len(q["candidates"]), list(q["candidates"])),
                                     m) for q, m in zip(questions, margins)]
        rows[f"{label} + CF residual ({residual.table.kind})"] = [rank_metrics(m[0], m[1:]) for m in combined]
    return rows, cut, margins, fit_margins


def hybrid_row(scorer, questions, margins, fit_qs, fit_margins) -> tuple[list[dict], dict]:
    """Per-question metrics of ``w1 * scorer + w2 * margin`` on the test ``questions``, the weights fit on the
    eval questions (``recsft.ranking.fit_rank_blend``: the positive's softmax likelihood among its candidates),
    and what was fit."""
    import numpy as np

    from utils import fit_rank_blend, question_scores, rank_metrics

    def features(qs, ms):
        return [np.column_stack([s, m]) for s, m in zip(question_scores(qs, scorer), ms)]

    w = fit_rank_blend(features(fit_qs, fit_margins))
    rows = [rank_metrics(s[0], s[1:]) for s in (f @ w for f in features(questions, margins))]
    return rows, {"weight_baseline": float(w[0]), "weight_llm_margin": float(w[1]),
                  "fit_questions": len(fit_qs), "fit_users": len({q["user_id"] for q in fit_qs})}


def fit_questions(args, data, blocks, rated, items, popularity) -> tuple[list[dict], list[dict] | None]:
    """``--hybrid``: the eval split's questions of the first ``--fit-users`` users (same protocol as the test
    questions, negatives drawn with ``--seed`` + 1 so they are not the test questions' draws) and, for candidate
    blocks, their groups."""
    from utils import block_groups, build_questions

    questions, _ = build_questions(data.splits["eval"], rated, items, args.n_negatives, args.seed + 1, args.sampling,
                                   popularity, args.fit_users)
    if not questions:
        raise DataError(f"--hybrid: no eval user among the first {args.fit_users} has a liked (Yes) eval candidate "
                        f"to fit the weights on; raise --fit-users")
    groups = (block_groups(questions, blocks[0]["eval"], blocks[1], str(blocks_file(args.data_dir, "eval")))
              if blocks else None)
    return questions, groups


def reference_deltas(per_question: dict, reference: str, users: list, resamples: int) -> dict:
    """ΔNDCG@10 and ΔHR@10 of every row against ``reference`` on the same questions, with 95% intervals from a
    paired bootstrap over users (``recsft.metrics.paired_user_mean_bootstrap``)."""
    from utils import paired_user_mean_bootstrap

    out = {}
    ref = per_question[reference]
    for label, rows in per_question.items():
        if label == reference:
            continue
        out[label] = {k: paired_user_mean_bootstrap([r[k] for r in rows], [r[k] for r in ref], users, resamples)
                      for k in ("ndcg@10", "hr@10")}
    return out


def journal_header(args, cfg, blocks) -> dict:
    """What an LLM ranking run scores with: a ``--resume`` continues only a run with the same header (each unit's
    user, prompt and candidates are part of its key, ``recsft.ranking.unit_key``)."""
    from utils import adapter_path, choose_dtype, get_device

    adapter = adapter_path(args.adapter_dir)
    return {"model": str(cfg.model.model_name_or_path), "adapter": str(Path(adapter).resolve()) if adapter else None,
            "data_dir": str(Path(args.data_dir).resolve()), "mode": "blocks" if blocks else "questions",
            "dtype": choose_dtype(cfg.model.dtype, get_device())[0], "quantization_bit": cfg.model.quantization_bit,
            "cutoff_len": cfg.data.cutoff_len,
            "system_prompt": cfg.data.system_prompt, "enable_thinking": cfg.model.enable_thinking}


def table_text(results: dict, deltas: dict, reference: str | None) -> str:
    from utils import MARKDOWN_HEADER, markdown_row

    def row(label, m):
        line = markdown_row(label, m)
        if reference is None:
            return line
        d = deltas.get(label)
        cells = ["reference", "reference"] if d is None else [
            f"{d[k]['delta']:+.3f} [{d[k]['delta_low']:+.3f}, {d[k]['delta_high']:+.3f}]" for k in ("ndcg@10", "hr@10")]
        return f"{line} {' | '.join(cells)} |"

    header = MARKDOWN_HEADER
    if reference is not None:
        first, rule = header.split("\n")
        header = (f"{first} ΔNDCG@10 vs {reference} [95% CI] | ΔHR@10 vs {reference} [95% CI] |\n"
                  f"{rule}---|---|")
    table = "\n".join([header, *(row(k, v["sampled"]) for k, v in results.items())])
    full = [markdown_row(k, v["full"]) for k, v in results.items() if "full" in v]
    return f"{table}\n" + (f"\nFull ranking (all unrated movies):\n\n" + "\n".join([MARKDOWN_HEADER, *full]) + "\n"
                           if full else "")


def main(args) -> dict:
    from utils import (LABELS, PER_USER_CONSTANT, adapter_path, block_groups, build_questions, fit_scorers,
                       full_ranking, load_prepared, mean_metrics, question_rows, rated_sets, refuse_cf_tokens,
                       train_ratings, writable_dir, write_json_atomic, write_jsonl_atomic, write_text_atomic)

    names, reference = check_args(args)
    writable_dir(args.output_dir, "--output_dir")
    use_llm = args.llm or args.adapter_dir is not None
    cfg = check_llm(args) if use_llm else None  # config, model, adapter: before any work
    data = load_prepared(args.data_dir)
    splits = ("test", "eval") if args.hybrid else ("test",)
    blocks = blocks_for_ranking(args, data, splits) if use_llm else None
    if use_llm and blocks is None:
        check_llm_data(args, data.params, [e for split in splits for e in data.splits[split]])
        refuse_cf_tokens(adapter_path(args.adapter_dir), str(args.data_dir))  # a single-format folder
    train = train_ratings(data.ratings, data.splits)
    rated = rated_sets(data.ratings)
    items = sorted(data.ratings.movie_id.unique().tolist())
    popularity = train.movie_id.value_counts().to_dict()
    questions, counts = build_questions(data.splits["test"], rated, items, args.n_negatives, args.seed,
                                          args.sampling, popularity, args.max_users)
    if not questions:
        raise DataError(f"{args.data_dir}: no test user has a liked (Yes) test candidate; nothing to rank")
    groups = (block_groups(questions, blocks[0]["test"], blocks[1], str(blocks_file(args.data_dir, "test")))
              if blocks else None)
    fit = fit_questions(args, data, blocks, rated, items, popularity) if args.hybrid else None
    protocol = {"n_negatives": args.n_negatives, "sampling": args.sampling, "seed": args.seed,
                "max_users": args.max_users, "negatives": "movies the user never rated (any split), without replacement",
                "popularity_weights": "1 + number of training ratings" if args.sampling == "popularity" else None,
                "positive": "each test candidate labelled Yes (one question each)",
                "ties": "metrics are expected values under random tie-breaking",
                "averaged_over": "questions", "full_ranking": "positive among all movies the user never rated",
                "llm": ("P(Yes) of each candidate as a candidate block after the user's test prefix (static "
                        "protocol: training-split history and counts), one prefix pass per user" if blocks else
                        "P(Yes) of the test example's prompt (same history) with each candidate swapped in"),
                "hybrid": (f"w1 * {args.hybrid} score + w2 * LLM margin, w fit by the softmax likelihood of the "
                           f"positive among its candidates on the eval questions of the first {args.fit_users} "
                           f"users (negatives drawn with seed {args.seed + 1})") if args.hybrid else None}
    results, per_question = {}, {}
    scorers = fit_scorers(names, train, data.ratings, data.params["like_threshold"], args.seed, epochs=args.epochs)
    for name, scorer in scorers.items():
        if name in PER_USER_CONSTANT:
            continue  # one score per user: chance by construction
        logger.info("ranking with %s", LABELS[name])
        per_question[LABELS[name]] = question_rows(questions, scorer)
        results[LABELS[name]] = {"sampled": mean_metrics(per_question[LABELS[name]])}
        if not args.no_full_ranking:
            results[LABELS[name]]["full"] = full_ranking(questions, scorer, rated, items)
    if use_llm:
        header = journal_header(args, cfg, blocks)
        rows, cut, margins, fit_margins = llm_rows(args, cfg, questions, data.titles, header,
                                                   blocks[1] if blocks else None, groups, fit)
        for label, metrics in rows.items():
            per_question[label] = metrics
            results[label] = {"sampled": {**mean_metrics(metrics), "questions_prompt_cut": cut}}
        if args.hybrid:
            label = f"{llm_label(args, cfg)} + {LABELS[args.hybrid]} (weights fit on eval questions)"
            per_question[label], blend = hybrid_row(scorers[args.hybrid], questions, margins, fit[0], fit_margins)
            results[label] = {"sampled": mean_metrics(per_question[label]), "blend": blend}
            logger.info(f"--hybrid {args.hybrid}: weights {blend}")
    users = [q["user_id"] for q in questions]
    deltas = reference_deltas(per_question, reference, users, args.resamples) if reference else {}
    for label, d in deltas.items():
        results[label]["vs_reference"] = {"reference": reference, **d}
    text = table_text(results, deltas, reference)
    out = Path(args.output_dir)
    write_jsonl_atomic(out / "questions.jsonl", [{"user_id": q["user_id"], "candidates": q["candidates"]}
                                                 for q in questions])
    write_jsonl_atomic(out / "question_metrics.jsonl", [
        {"user_id": q["user_id"], "positive": q["candidates"][0],
         "rows": {label: {k: r[i][k] for k in ("hr@10", "ndcg@10", "mrr")} for label, r in per_question.items()}}
        for i, q in enumerate(questions)])
    write_json_atomic(out / "rank_metrics.json", {"protocol": protocol, "counts": counts, "results": results})
    write_text_atomic(out / "rank_table.md", text)
    print(f"\n{counts['questions']} questions from {counts['users']} users ({args.n_negatives} {args.sampling} "
          f"negatives each, seed {args.seed}; {counts['users_skipped_no_positive']} users without a liked test "
          f"candidate skipped)\n")
    print(text)
    return {"protocol": protocol, "counts": counts, "results": results}


if __name__ == "__main__":
    run(main, parse_args)
