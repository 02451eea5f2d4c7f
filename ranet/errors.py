"""Errors for a request the user can fix, shown by every binary without a traceback.

They live in a module of their own, with no imports, so that every library module
(``ranet.config``, ``ranet.jsonio``, the training, data and inference code) can raise them
without importing ``ranet.cli`` and its absl flags machinery.
"""


class UsageError(ValueError):
    """What the user can fix: a bad flag value, a missing or corrupt file, a model directory
    that does not match, a request that cannot be done as asked.

    Its message says what is wrong and how to fix it; ``ranet.cli.run`` prints it as one line,
    ``error: <message>``, and exits with status 2, no traceback. Anything else keeps its
    traceback: a plain ``ValueError`` from our own code calling a function wrongly, and a
    ``FileNotFoundError`` or ``FloatingPointError`` raised deep inside a run, where the code
    that raised it cannot know the user caused it. A subclass of ``ValueError``, so that
    callers catching ``ValueError`` still catch it.
    """


class MissingPathError(UsageError, FileNotFoundError):
    """A file or folder the user named (a flag, a model directory) is not there.

    Also a ``FileNotFoundError``, so that code handling a missing file keeps working.
    """


class DivergedError(UsageError, FloatingPointError):
    """Training diverged: the loss is not finite. The user fixes it (a lower learning rate,
    other input data); also a ``FloatingPointError`` for callers that catch that."""
