"""The one error type for a request the user can fix, shown by every binary without a traceback.

It lives in a module of its own, with no imports, so that every library module (``ranet.config``,
``ranet.jsonio``, the training, data and inference code) can raise it without importing
``ranet.cli`` and its absl flags machinery.
"""


class UsageError(ValueError):
    """What the user can fix: a bad flag value, a missing or corrupt file, a model directory
    that does not match, a request that cannot be done as asked.

    Its message says what is wrong and how to fix it; ``ranet.cli.run`` prints it as one line,
    ``error: <message>``, and exits with status 2, no traceback. A plain ``ValueError`` is left
    for a bug (our own code calling a function wrongly), which keeps its traceback. A subclass of
    ``ValueError``, so that callers catching ``ValueError`` still catch it.
    """
