"""The errors a user can cause, and nothing else.

Only `UserError` and its kinds are shown as "your input or settings are wrong": one line that
names the file, column, shard, key or value, exit status 2 (1 for `RunFailed`), no traceback.
Every other exception is a bug in protoprune (or in a library it calls): the CLI logs its
traceback and says so. Each kind also derives from the builtin it replaces, so callers that
catch `ValueError`, `TypeError` or `OSError` keep working.
"""

from __future__ import annotations


class UserError(Exception):
    """Bad input, bad settings, or storage the user must fix. `exit_code` is the CLI's status."""

    exit_code = 2


class BadInput(UserError, ValueError):
    """The input data: a missing column, a wrong type, a null id, a NaN embedding, ..."""


class BadConfig(UserError, ValueError, TypeError):
    """A setting, flag or config file value."""


class ModelLoadError(UserError, ValueError):
    """The model could not be loaded on a worker: the same for every shard."""


class StoreError(UserError, OSError):
    """A permanent storage error (access denied, no bucket, retries exhausted); names the URL."""


class NotFound(StoreError, FileNotFoundError):
    """A key that does not exist; names its URL."""


class RunFailed(UserError):
    """Some units failed on bad data; the message names them and their files. Nothing was
    committed; fixing the data and rerunning with the same run id resumes."""

    exit_code = 1


def first_line(e: BaseException, limit: int = 300) -> str:
    """The first line of an exception's message (its type name when it has none)."""
    lines = str(e).strip().splitlines()
    return lines[0][:limit] if lines else type(e).__name__


def user_cause(exc: BaseException) -> UserError | None:
    """The UserError an exception is or carries (a Ray task error's `cause`), else None."""
    cause = getattr(exc, "cause", None) or exc
    return cause if isinstance(cause, UserError) else None
