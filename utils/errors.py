"""User mistakes versus bugs: one exception family for the first, one handler for every entry point.

A :class:`UserError` is raised when the input is wrong (a config value, a missing file, a checkpoint that does not
fit) or a run cannot go on for a reason the user must act on. Its message names the file, the key or the field and
what was expected, so a stack trace would add nothing: :func:`user_errors_as_one_line` turns it into a one-line
``error: ...`` exit. Every other exception is a bug and keeps its full traceback.
"""
from __future__ import annotations

import contextlib
from typing import Iterator


class UserError(Exception):
    """Bad input or a condition the user must act on; the message says what and where."""


@contextlib.contextmanager
def user_errors_as_one_line() -> Iterator[None]:
    """Exit with ``error: <message>`` (status 1) on a UserError; let everything else through untouched."""
    try:
        yield
    except UserError as exc:
        raise SystemExit(f"error: {' '.join(str(exc).split())}") from None
