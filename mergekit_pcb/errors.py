"""Errors a user can fix (bad recipe, bad checkpoint, full disk) versus bugs.

A `UserError` is reported as one line on stderr with exit code 2; anything else is an
internal error (exit code 1).
"""


class UserError(Exception):
    """Bad input: the message names the file, recipe key or tensor at fault."""


class RecipeError(UserError):
    """The recipe is malformed or inconsistent."""


class CheckpointError(UserError):
    """A checkpoint is missing, corrupt, truncated or inconsistent with the others."""


class OutputError(UserError):
    """The output cannot be written (exists, disk full, permission)."""
