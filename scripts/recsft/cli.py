"""The shared script entry point: logging set-up, and input errors as one clean line with exit code 2."""

from __future__ import annotations

import logging
import sys
from typing import Any, Callable

from .runtime import omp_defaults

omp_defaults()  # before anything imports torch: OpenMP reads its environment once, when torch loads it

from .config import ConfigError  # noqa: E402
from .io import DataError  # noqa: E402

USER_ERRORS = (ConfigError, DataError, FileNotFoundError, ValueError)


def setup_logging() -> None:
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S",
                        level=logging.INFO, force=True)
    for noisy in ("httpx", "urllib3", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def run(main: Callable[[Any], Any], parse_args: Callable[[], Any]) -> None:
    """``main(parse_args())``; a bad config, data file or argument prints ``error: ...`` and exits 2 (no traceback)."""
    args = parse_args()
    setup_logging()
    try:
        main(args)
    except USER_ERRORS as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
