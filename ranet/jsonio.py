"""JSON files the toolkit writes and reads: strict, atomic, and clear about what is wrong.

Thresholds are often infinite (-inf: the last exit takes everything; +inf: nobody leaves
there), and JSON has no infinity: every file here writes them as the strings "inf" and
"-inf", which ``float()`` reads back. Files are written whole or not at all (a temporary
sibling renamed into place), and a file that does not parse raises a ``UsageError`` that
names it and says how to fix it.
"""

import json
import math
import os
from typing import Any

import numpy as np

from ranet.errors import UsageError


def number(value: float):
    """A float as strict JSON: finite values as numbers, infinities as "inf" / "-inf"."""
    value = float(value)
    if math.isnan(value):
        raise ValueError("NaN has no place in these files. Received: nan")
    return value if math.isfinite(value) else ("inf" if value > 0 else "-inf")


def _plain(value: Any):
    """numpy scalars and arrays as Python values, for ``json.dump``'s ``default``."""
    if isinstance(value, (np.floating, np.integer, np.bool_)):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def dumps(content: Any) -> str:
    """Indented strict JSON (a NaN or an infinity left as a float is an error)."""
    return json.dumps(content, indent=2, allow_nan=False, default=_plain)


def write(path: str, content: Any) -> str:
    """Writes ``content`` to ``path`` atomically: readers see the old file or the new one."""
    text = dumps(content)
    temporary = f"{path}.tmp"
    with open(temporary, "w") as f:
        f.write(text)
    os.replace(temporary, path)
    return path


def read(path: str, how_to_fix: str) -> Any:
    """The content of a JSON file; a ``UsageError`` naming it when it does not parse.

    Args:
        path: the file.
        how_to_fix: what the user should do about a corrupt file (one sentence).
    """
    try:
        with open(path) as f:
            return json.load(f)
    except json.JSONDecodeError as error:
        raise UsageError(f"{path} is not valid JSON ({error}). {how_to_fix}") from None
    except UnicodeDecodeError as error:
        raise UsageError(f"{path} is not a text file ({error.reason}). {how_to_fix}") from None
