"""The shared script entry point: logging set-up, bad input as one clean line (exit 2), Ctrl-C (exit 130).

Only :class:`recsft.errors.UserInputError` (``ConfigError``, ``DataError`` and the checks in
``recsft.validate``) counts as bad input; every other exception is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import logging
import math
import sys
from typing import Any, Callable

from .runtime import omp_defaults

omp_defaults()  # before anything imports torch: OpenMP reads its environment once, when torch loads it

from .errors import UserInputError, one_line  # noqa: E402

EXIT_BAD_INPUT = 2
EXIT_INTERRUPTED = 130  # 128 + SIGINT, what a shell reports for a process stopped by Ctrl-C
INTERRUPTED = ("interrupted (Ctrl-C): stopped; outputs are written atomically, so nothing half-written was left; "
               "saved progress (checkpoints, scored batches) continues with the same command plus --resume")


def setup_logging() -> None:
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S",
                        level=logging.INFO, force=True)
    for noisy in ("httpx", "urllib3", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def run(main: Callable[[Any], Any], parse_args: Callable[[], Any]) -> None:
    """``main(parse_args())``; bad input prints ``error: ...`` (one line) and exits 2, Ctrl-C exits 130."""
    try:
        args = parse_args()
        setup_logging()
        main(args)
    except UserInputError as err:
        print(f"error: {one_line(str(err))}", file=sys.stderr, flush=True)
        sys.exit(EXIT_BAD_INPUT)
    except KeyboardInterrupt:
        print(f"\n{INTERRUPTED}", file=sys.stderr, flush=True)
        sys.exit(EXIT_INTERRUPTED)


def both_spellings(names: tuple[str, ...]) -> tuple[str, ...]:
    """A long flag's one spelling (``--max_samples``: underscores, like the config keys) first, then the same flag
    with hyphens (``--max-samples``) as an alias; other names (``-n``, a declared alias) are kept after them."""
    longs = [n for n in names if n.startswith("--")]
    if not longs:
        return names
    canonical = "--" + longs[0][2:].replace("-", "_")
    return tuple(dict.fromkeys([canonical, "--" + canonical[2:].replace("_", "-"), *names]))


class ArgumentParser(argparse.ArgumentParser):
    """argparse with one-line errors (``error: argument --max_samples/--max-samples: must be a positive integer,
    got 0``) where every long flag answers to both spellings (:func:`both_spellings`)."""

    def add_argument(self, *names, **kwargs):
        return super().add_argument(*both_spellings(names), **kwargs)

    def add_argument_group(self, *args, **kwargs):
        group = super().add_argument_group(*args, **kwargs)
        add = group.add_argument
        group.add_argument = lambda *names, **kw: add(*both_spellings(names), **kw)
        return group

    def error(self, message: str):
        print(f"error: {one_line(message)} (see {self.prog} --help)", file=sys.stderr, flush=True)
        sys.exit(EXIT_BAD_INPUT)


def _number(text: str, kind: type, what: str):
    try:
        value = kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be {what}, got {text!r}") from None
    if isinstance(value, float) and not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be {what}, got {text!r}")
    return value


def positive_int(text: str) -> int:
    value = _number(text, int, "a positive integer")
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def non_negative_int(text: str) -> int:
    value = _number(text, int, "an integer >= 0")
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be an integer >= 0, got {value}")
    return value


def non_negative_float(text: str) -> float:
    value = _number(text, float, "a finite number >= 0")
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {value}")
    return value


def finite_float(text: str) -> float:
    return _number(text, float, "a finite number")


def output_dir(text: str) -> str:
    """An output folder flag: not empty (writability is checked by ``recsft.validate.writable_dir``)."""
    if not text.strip():
        raise argparse.ArgumentTypeError("must not be empty; give a folder path")
    return text
