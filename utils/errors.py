"""User mistakes versus bugs: one exception family for the first, one handler for every entry point.

A :class:`UserError` is raised when the input is wrong (a config value, a missing file, a checkpoint that does not
fit) or a run cannot go on for a reason the user must act on. Its message names the file, the key or the field and
what was expected, so a stack trace would add nothing: :func:`user_errors_as_one_line` turns it into a one-line
``error: ...`` exit. Every other exception is a bug and keeps its full traceback.
"""
from __future__ import annotations

import contextlib
import errno
from typing import Iterator

# What a write that ran out of room says. torch's zip writer reports a short write in its own words (a RuntimeError
# "file write failed", or "unexpected pos" when the next record finds the file shorter than it wrote), with the
# OSError, when there is one, somewhere down the chain of causes.
_OUT_OF_SPACE = {errno.ENOSPC: "disk full", errno.EDQUOT: "disk quota exceeded", errno.EFBIG: "file size limit reached"}
_TORCH_SHORT_WRITE = ("file write failed", "unexpected pos")


class UserError(Exception):
    """Bad input or a condition the user must act on; the message says what and where."""


def out_of_space(exc: BaseException) -> str | None:
    """The words for a write that ran out of room ("disk full", or the quota's or the file size limit's) when
    ``exc`` or any exception in its chain of causes and contexts is one; None otherwise."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno in _OUT_OF_SPACE:
            return _OUT_OF_SPACE[exc.errno]
        if isinstance(exc, RuntimeError) and any(words in str(exc) for words in _TORCH_SHORT_WRITE):
            return "disk full"
        exc = exc.__cause__ or exc.__context__
    return None


@contextlib.contextmanager
def user_errors_as_one_line() -> Iterator[None]:
    """Exit with ``error: <message>`` (status 1) on a UserError or a write that ran out of space (wherever it
    happened: the message names the file); let everything else through untouched."""
    try:
        yield
    except UserError as exc:
        raise SystemExit(f"error: {' '.join(str(exc).split())}") from None
    except Exception as exc:
        reason = out_of_space(exc)
        if reason is None:
            raise
        raise SystemExit(f"error: {reason}: {' '.join(str(exc).split())}; files written before are intact: free "
                         "space, then run the command again (a training run: with --resume auto)") from None
