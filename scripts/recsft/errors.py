"""The one exception type for bad input: a config value, a flag, a data file, a model path, an adapter.

Every check that rejects input raises a subclass of :class:`UserInputError` whose message is one line naming
the file/record/key/flag and the fix. ``recsft.cli.run`` prints exactly those as ``error: ...`` and exits 2;
any other exception is a bug and keeps its traceback.
"""

from __future__ import annotations


class UserInputError(ValueError):
    """Bad input (not a bug): the message names what is wrong and how to fix it, on one line."""

    def __init__(self, message: str):
        super().__init__(one_line(message))


def one_line(text: str) -> str:
    """Collapse a multi-line message into one line (``; `` between the lines)."""
    parts = [p.strip() for p in str(text).splitlines() if p.strip()]
    return "; ".join(parts)
