"""Errors a user can fix (bad recipe, bad checkpoint, full disk) versus bugs.

A `UserError` is reported as one line on stderr with exit code 2; anything else is an
internal error (exit code 1). `warn` says, in one line on stderr, what runs otherwise than a
user may expect.
"""

from __future__ import annotations

import difflib
import sys
from collections.abc import Iterable


class UserError(Exception):
    """Bad input: the message names the file, recipe key or tensor at fault."""


class RecipeError(UserError):
    """The recipe is malformed or inconsistent."""


class CheckpointError(UserError):
    """A checkpoint is missing, corrupt, truncated or inconsistent with the others."""


class OutputError(UserError):
    """The output cannot be written (exists, disk full, permission)."""


class MethodFailure(RuntimeError):
    """A method's math broke down on one tensor (a numerical failure or a bug, not bad
    input): reported as an internal error whose message names the tensor and the method."""


def unknown_method(where: str, name: str, known: Iterable[str]) -> RecipeError:
    """`WHERE: unknown method 'x' (did you mean 'y'? known: ...)`. The name is quoted by
    repr, so one holding a line break stays on the error's one line."""
    names = sorted(known)
    close = difflib.get_close_matches(name.strip().lower(), names, n=1, cutoff=0.6)
    hint = f"did you mean {close[0]!r}? " if close else ""
    return RecipeError(f"{where}: unknown method {name!r} ({hint}known: {', '.join(names)})")


def warn(message: str) -> None:
    """A choice made for the user (a value ignored, a rule that does nothing), said once at
    the time it matters: one line on stderr, `warning: ...`, beside bad input's `error: ...`.
    """
    print(f"warning: {message}", file=sys.stderr, flush=True)
