"""Code layout rules: scripts never import other scripts, and package imports point down the pipeline."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "scripts" / "recsft"
# data -> prompt -> tokens -> model -> train -> score -> report; a module may import its own stage or earlier ones.
# config, io, runtime (threads, dtype), cli and metrics (the one extractor and metrics function) are shared
# foundations used by every stage.
STAGES = {
    "foundation": ["config", "errors", "io", "runtime", "cli", "metrics"],
    "prompt": ["formatting", "movielens", "ratings_table"],  # movielens writes records in the prompt format
    "tokens": ["preprocess"],
    "model": ["modeling", "validate", "inference", "cf"],  # validate: settings checked against the model, up front;
    # cf: the collaborative-filtering residual (a Cornac model as arrays + the two-scalar head)
    # trainer (loss, eval step, metrics), callbacks, resume (every checkpoint rule), training (set-up)
    "train": ["callbacks", "trainer", "resume", "training"],
    "score": ["evaluation", "baselines", "ranking"],
    "report": ["report"],
}
RANK = {mod: i for i, mods in enumerate(STAGES.values()) for mod in mods}


def imported_modules(path: Path, package: str | None = None) -> set[str]:
    """Top-level names imported anywhere in ``path`` (inside functions too); ``package`` resolves ``from .x``."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level and package:
                modules = [node.module] if node.module else [a.name for a in node.names]
                out.update(f"{package}.{m}" for m in modules)
            elif node.module:
                out.add(node.module)
    return out


def package_imports(module: str) -> set[str]:
    names = imported_modules(PACKAGE / f"{module}.py", package="recsft")
    return {n.split(".")[1] for n in names if n.startswith("recsft.")}


def test_every_package_module_has_a_stage():
    modules = {p.stem for p in PACKAGE.glob("*.py")} - {"__init__"}
    assert modules == set(RANK), f"assign these modules a stage in STAGES: {sorted(modules ^ set(RANK))}"


def test_package_imports_point_down_the_pipeline():
    bad = [f"{m} ({list(STAGES)[RANK[m]]}) imports {t} ({list(STAGES)[RANK[t]]})"
           for m in RANK for t in package_imports(m) if RANK[t] > RANK[m]]
    assert not bad, "imports that point up the pipeline: " + "; ".join(bad)


def test_package_imports_have_no_cycles():
    graph = {m: package_imports(m) for m in RANK}
    done: set[str] = set()

    def visit(node: str, path: tuple[str, ...]) -> None:
        assert node not in path, f"import cycle: {' -> '.join(path + (node,))}"
        if node not in done:
            for nxt in graph[node]:
                visit(nxt, path + (node,))
            done.add(node)

    for m in graph:
        visit(m, ())


def test_scripts_never_import_other_scripts():
    for folder, allowed in (("scripts", {"utils"}), ("bench", {"_common", "_step_timer"})):
        scripts = {p.stem for p in (ROOT / folder).glob("*.py")} - allowed
        bad = {p.name: sorted(imported_modules(p) & scripts) for p in (ROOT / folder).glob("*.py")}
        assert not {k: v for k, v in bad.items() if v}, bad


def test_utils_reexports_resolve():
    import utils

    names = ["ADAPTER_DIR", "BASE_MODEL", "MAX_NEW_TOKENS", "TEMPERATURE", "TOP_P", "Config", "ConfigError",
             "load_config", "read_yaml", "valid_keys", "DataError", "load_data", "load_json", "resolve_asset",
             "write_json_atomic", "write_jsonl_atomic", "DEFAULT_SYSTEM_PROMPT", "INSTRUCTION", "format_prompt",
             "resolve_dataset", "to_chat_messages", "validate_records", "IGNORE_INDEX", "load_tokenized_datasets",
             "tokenize_func", "tokenize_records", "apply_lora", "check_adapter", "get_device", "load_adapter",
             "load_model", "load_tokenizer", "generate", "prompts_for", "score", "compute_metrics", "extract_answer",
             "load_records", "chat_texts", "render_records", "RecSFTConfig", "RecSFTTrainer", "plan_resume"]
    missing = [n for n in names if not hasattr(utils, n)]
    assert not missing, missing


def test_utils_reexports_the_public_names_of_the_package_and_nothing_else():
    import utils

    public = {n for m in RANK for n in utils._public_names(PACKAGE / f"{m}.py")}
    assert set(utils.__all__) == public
    for old in ("load_yaml_config", "build_datasets", "preprocess_datasets_parallel"):  # earlier aliases: gone
        assert not hasattr(utils, old)
    assert utils.load_config is __import__("recsft.config", fromlist=["x"]).load_config


def test_scripts_import_the_shared_code_through_utils():
    bad = {p.name: sorted(n for n in imported_modules(p) if n == "recsft" or n.startswith("recsft."))
           for p in (ROOT / "scripts").glob("*.py") if p.name != "utils.py"}
    assert not {k: v for k, v in bad.items() if v}, bad
