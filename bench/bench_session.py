"""Training cost per label: the session format (multi-turn runs of candidates) and candidate blocks (one shared
history, each candidate answered on its own) vs single questions.

Copy-paste:

    nice -n 10 env OMP_NUM_THREADS=1 python bench/bench_session.py              # real SmolLM2-135M (offline GGUF), CPU
    python bench/bench_session.py --session-len 32 --cutoff-len 2048 --steps 6 --json-out output/bench/session.json
    python bench/bench_session.py --quick                                      # tiny random Qwen3; the smoke test

The three formats are built in-process from the bundled MovieLens-100K with the same candidates: the first
``--sessions`` training runs of ``--session-len`` candidates, the same runs as candidate-block records (blocks of
the same size) and the same candidates as single questions. All are tokenized by ``recsft.preprocess`` and trained
by the project's trainer loss (``RecSFTTrainer.compute_loss``, LoRA, AdamW), on one model and device, steps
interleaved (single, session, blocks, single, ...) so machine load hits all alike. Reported: trained tokens per
label over the whole tokenized sets (exact, no timing) and labels/s over the timed steps, with their ratios to
single. A session or blocks batch is ``--session-batch`` examples (default 1 x ~900 tokens), a single batch
``--single-batch`` (default 2 x ~450 tokens): about the same tokens per step.
"""

from __future__ import annotations

import argparse
import time

from _common import (QWEN3_TOKENIZER, SMOLLM2_GGUF, bench_main, device_info, median, print_table, quiet_logs,
                     random_qwen3_dir, versions, write_json)


def build_records(n_sessions: int, session_len: int, users: int, seed: int = 42) -> dict[str, list[dict]]:
    """Single training records, session records and candidate-block records holding the same training candidates."""
    from recsft import movielens

    ratings, titles = movielens.load_ratings("bundled")
    ratings = ratings[ratings.user_id.isin(sorted(ratings.user_id.unique())[:users])]
    sessions = movielens.build_sessions(ratings, titles, session_len=session_len, seed=seed)["train"][:n_sessions]
    singles = movielens.build_examples(ratings, titles, seed=seed)["train"]
    by_key = {(e["user_id"], e["candidate_movie_id"]): e for e in singles}
    chosen = [by_key[(r["user_id"], t["candidate_movie_id"])] for r in sessions for t in r["turns"]]
    blocks = movielens.build_blocks(ratings, titles, block_size=session_len, seed=seed)["train"]
    first = {(r["user_id"], r["blocks"][0]["candidate_movie_id"]): r for r in blocks}
    same = [first[(r["user_id"], r["turns"][0]["candidate_movie_id"])] for r in sessions]
    return {"single": [movielens.to_train_record(e) for e in chosen], "session": sessions, "blocks": same}


def load(args):
    """``(model folder or path, tokenizer)``: SmolLM2 by default, a tiny random Qwen3 with --quick."""
    from recsft.modeling import load_tokenizer

    if args.quick:
        tok = load_tokenizer(QWEN3_TOKENIZER)
        return random_qwen3_dir("tiny", tok, "cpu"), tok
    return args.model, load_tokenizer(args.model)


def make_trainer(model_path: str, tok, train_ds, args, answer_width: int | None = None):
    """The project's trainer (loss, answer positions) around a fresh LoRA model, and an AdamW optimizer."""
    import torch

    from recsft.config import load_config
    from recsft.modeling import model_for
    from recsft.training import build_trainer

    cfg = load_config(None, [f"model_name_or_path={model_path}", "quantization_bit=null", f"dtype={args.dtype}",
                             f"cutoff_len={args.cutoff_len}", "report_to=none", "eval_strategy=no",
                             "load_best_model_at_end=false", "output_dir=/tmp/bench_session", "eval_dataset=",
                             f"learning_rate={args.lr}", "max_steps=1"])
    model, device = model_for(cfg.model, cfg.lora, False, args.seed)
    trainer, _ = build_trainer(model, tok, train_ds, None, cfg, device, answer_width=answer_width)
    params = [p for p in model.parameters() if p.requires_grad]
    return trainer, model, torch.optim.AdamW(params, lr=args.lr)


def batches(ds, size: int):
    rows = [ds[i] for i in range(len(ds))]
    return [rows[i:i + size] for i in range(0, len(rows), size)]


def step(trainer, model, opt, rows) -> tuple[float, int, int]:
    """One optimizer step on ``rows``: ``(seconds, labels (answers), tokens)``."""
    from recsft.preprocess import answer_positions

    batch = trainer.data_collator(rows)
    model.train()
    start = time.perf_counter()
    loss = trainer.compute_loss(model, dict(batch))
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    seconds = time.perf_counter() - start
    return seconds, int(answer_positions(batch["labels"])[1].sum()), int(batch["attention_mask"].sum())


def run(args) -> dict:
    import torch
    from datasets import Dataset

    from recsft.preprocess import answer_positions
    from recsft.preprocess import tokenize_any

    quiet_logs()
    if args.threads:
        torch.set_num_threads(args.threads)
    records = build_records(args.sessions, args.session_len, args.users, args.seed)
    model_path, tok = load(args)
    data = {}
    for name, recs in records.items():
        table = tokenize_any(recs, tok, args.cutoff_len).to_pydict()
        labels = sum(int(answer_positions(torch.tensor([lab]))[1].sum()) for lab in table["labels"])
        tokens = sum(map(len, table["input_ids"]))
        data[name] = {"ds": Dataset.from_dict(table), "examples": len(table["input_ids"]), "labels": labels,
                      "tokens": tokens, "tokens_per_label": tokens / labels}
    from recsft.trainer import max_label_tokens

    width = max(max_label_tokens(d["ds"]) for d in data.values())  # every answer of every format
    trainer, model, opt = make_trainer(model_path, tok, data["blocks"]["ds"], args, answer_width=width)
    sizes = {"single": args.single_batch, "session": args.session_batch, "blocks": args.session_batch}
    plan = {name: batches(d["ds"], sizes[name]) for name, d in data.items()}
    timed = {name: [] for name in data}
    for i in range(args.warmup + args.steps):
        for name in data:
            rows = plan[name][i % len(plan[name])]
            s, labels, tokens = step(trainer, model, opt, rows)
            if i >= args.warmup:
                timed[name].append((s, labels, tokens))
    out = {"device": device_info("cpu"), "versions": versions(), "model": "tiny-random" if args.quick else args.model,
           "session_len": args.session_len, "cutoff_len": args.cutoff_len, "steps": args.steps}
    rows = []
    for name, d in data.items():
        secs = sum(s for s, _, _ in timed[name])
        labels = sum(n for _, n, _ in timed[name])
        res = {k: d[k] for k in ("examples", "labels", "tokens", "tokens_per_label")}
        res.update(labels_per_s=labels / secs, tokens_per_s=sum(t for *_, t in timed[name]) / secs,
                   step_s_median=median([s for s, _, _ in timed[name]]), batch=sizes[name])
        out[name] = res
        rows.append({"format": name, **res})
    print(f"device: {out['device']}")
    print_table(rows, [("format", "format", ""), ("batch", "batch", "d"), ("examples", "examples", "d"),
                       ("labels", "labels", "d"), ("tokens_per_label", "tokens/label", ".1f"),
                       ("labels_per_s", "labels/s", ".2f"), ("tokens_per_s", "tokens/s", ".0f"),
                       ("step_s_median", "step s", ".2f")])
    for name in ("session", "blocks"):
        tag = "" if name == "session" else "blocks_"
        out[f"{tag}tokens_per_label_ratio"] = out[name]["tokens_per_label"] / out["single"]["tokens_per_label"]
        out[f"{tag}labels_per_s_ratio"] = out[name]["labels_per_s"] / out["single"]["labels_per_s"]
        print(f"RATIO {name}/single tokens per label {out[f'{tag}tokens_per_label_ratio']:.3f} "
              f"(1/{1 / out[f'{tag}tokens_per_label_ratio']:.1f}); labels/s {out[f'{tag}labels_per_s_ratio']:.2f}x")
    write_json(args.json_out, out)
    return out


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=SMOLLM2_GGUF)
    p.add_argument("--dtype", default="bfloat16", help="as configs/smollm2_movielens_session.yaml")
    p.add_argument("--session-len", type=int, default=16)
    p.add_argument("--cutoff-len", type=int, default=1024)
    p.add_argument("--sessions", type=int, default=8, help="training runs (and the same candidates as singles)")
    p.add_argument("--users", type=int, default=60, help="users whose ratings build the data")
    p.add_argument("--single-batch", type=int, default=2)
    p.add_argument("--session-batch", type=int, default=1)
    p.add_argument("--warmup", type=int, default=1, help="untimed steps per format")
    p.add_argument("--steps", type=int, default=4, help="timed steps per format")
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--quick", action="store_true", help="tiny random Qwen3, 2 timed steps")
    p.add_argument("--json-out", default=None)
    args = p.parse_args(argv) if not isinstance(argv, argparse.Namespace) else argv
    if args.quick:
        args.steps, args.warmup, args.sessions, args.dtype = 2, 1, 4, "float32"
    return args


def main(argv=None) -> dict:
    """Run the benchmark; returns the results (also written to --json-out)."""
    return bench_main(run, parse_args, argv)


if __name__ == "__main__":
    main()
