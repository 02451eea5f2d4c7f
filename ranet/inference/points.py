"""What a timed path or an operating point is: one frozen type, named once, never parsed back.

A ``PointId`` is the identity of a way to answer: the whole network in one call (``FULL``),
the network up to exit k in one call (``up_to_exit(k)``: every exit up to k computed, the
anytime curve in milliseconds), the seed's ``Model.predict`` (``KERAS_PREDICT``), or early
exit at an operating point (a q of
the reference sweep, the most accurate point within a budget, the default point, the seed's
fixed threshold, every image to the last exit, the point chosen to equal another model's
accuracy). Its ``path`` names it in latency tables, its ``key`` in report.json, its ``label``
in report.md; all three are made here, from the exact value, so that a budget of 1681.234
stays 1681.234 from the flag to the manifest, the plot and the runtime's lookup.
"""

import dataclasses
import enum
from typing import Optional, Union

import numpy as np


class Kind(enum.Enum):
    """What a ``PointId`` is; the value is its name in report.json."""
    FULL = "full"
    UP_TO_EXIT = "up_to_exit"
    KERAS_PREDICT = "keras_predict"
    DEFAULT = "default"
    SWEEP = "sweep"
    BUDGET = "budget"
    FIXED = "fixed_threshold"
    LAST_EXIT = "last_exit"
    EQUAL = "equal_accuracy"


# Kinds whose value is a number or a model name; the others take none.
_NUMBER_KINDS = (Kind.SWEEP, Kind.BUDGET, Kind.FIXED)
_PATH_PREFIX = {Kind.SWEEP: "q@", Kind.BUDGET: "budget@", Kind.FIXED: "threshold@",
                Kind.EQUAL: "equal@"}
# The default point's path keeps the name every report has used for it.
_PATH_NAME = {Kind.FULL: "full", Kind.KERAS_PREDICT: "keras_predict", Kind.DEFAULT: "adaptive",
              Kind.LAST_EXIT: "last_exit"}


def exact(value: float) -> str:
    """The shortest text that reads back as exactly ``value`` (20.0 -> "20", 1681.234 ->
    "1681.234"), unlike ``:g``, which keeps six significant digits."""
    return np.format_float_positional(float(value), trim="-")


@dataclasses.dataclass(frozen=True)
class PointId:
    """The identity of a timed path or an operating point: its kind and, for some, a value.

    Build it with the module's constructors (``budget(20)``, ``sweep(0.5)``, ``DEFAULT``...).
    """
    kind: Kind
    value: Optional[Union[float, str]] = None

    def __post_init__(self):
        if self.kind in _NUMBER_KINDS:
            if isinstance(self.value, bool) or not isinstance(self.value, (int, float)):
                raise ValueError(f"A {self.kind.value} point needs a number. "
                                 f"Received: value={self.value!r}")
            object.__setattr__(self, "value", float(self.value))
        elif self.kind == Kind.UP_TO_EXIT:
            if isinstance(self.value, bool) or not isinstance(self.value, int) or self.value < 1:
                raise ValueError("An up-to-exit path needs the exit's 1-based index. "
                                 f"Received: value={self.value!r}")
        elif self.kind == Kind.EQUAL:
            if not isinstance(self.value, str) or not self.value:
                raise ValueError("An equal-accuracy point needs the name of the model it "
                                 f"matches. Received: value={self.value!r}")
        elif self.value is not None:
            raise ValueError(f"A {self.kind.value} point takes no value. "
                             f"Received: value={self.value!r}")

    @property
    def is_adaptive(self) -> bool:
        """Whether it answers by early exit at thresholds (every kind but the full paths)."""
        return self.kind not in (Kind.FULL, Kind.UP_TO_EXIT, Kind.KERAS_PREDICT)

    @property
    def path(self) -> str:
        """Its name in latency tables and on the plots."""
        if self.kind in _PATH_NAME:
            return _PATH_NAME[self.kind]
        if self.kind == Kind.UP_TO_EXIT:
            return f"exit_{self.value}"
        text = self.value if self.kind == Kind.EQUAL else exact(self.value)
        return f"{_PATH_PREFIX[self.kind]}{text}"

    @property
    def key(self) -> dict:
        """Its identity in report.json: ``{"kind": ..., "value": ...}`` (no value: no key)."""
        return {"kind": self.kind.value,
                **({} if self.value is None else {"value": self.value})}

    @property
    def label(self) -> str:
        """How report.md names it."""
        if self.kind == Kind.SWEEP:
            return f"q={exact(self.value)}"
        if self.kind == Kind.BUDGET:
            return f"budget {exact(self.value)} M"
        if self.kind == Kind.FIXED:
            return f"fixed threshold {exact(self.value)}"
        if self.kind == Kind.EQUAL:
            return f"at {self.value}'s accuracy"
        if self.kind == Kind.UP_TO_EXIT:
            return f"up to exit {self.value}"
        return {Kind.FULL: "every exit", Kind.KERAS_PREDICT: "Model.predict",
                Kind.DEFAULT: "default", Kind.LAST_EXIT: "last exit"}[self.kind]


FULL = PointId(Kind.FULL)
KERAS_PREDICT = PointId(Kind.KERAS_PREDICT)
DEFAULT = PointId(Kind.DEFAULT)
LAST_EXIT = PointId(Kind.LAST_EXIT)


def up_to_exit(k: int) -> PointId:
    """The network up to exit k (1-based) in one call, every exit up to k computed."""
    return PointId(Kind.UP_TO_EXIT, k)


def sweep(q: float) -> PointId:
    """The reference sweep's point for exit shares p_k ~ q^k."""
    return PointId(Kind.SWEEP, q)


def budget(mflops: float) -> PointId:
    """The most accurate calibrated point within ``mflops`` million multiply-adds per image."""
    return PointId(Kind.BUDGET, mflops)


def fixed(threshold: float) -> PointId:
    """One threshold at every exit but the last (the seed's 0.85)."""
    return PointId(Kind.FIXED, threshold)


def equal(model: str) -> PointId:
    """The cheapest point at least as accurate as ``model`` (at_equal_accuracy)."""
    return PointId(Kind.EQUAL, model)


def find_budget(text: str, budgets) -> float:
    """The budget among ``budgets`` (numbers) that a user's ``text`` names, compared as
    numbers ("20", "20.0" and "2e1" name the same budget); KeyError if none."""
    try:
        wanted = float(text)
    except ValueError:
        raise KeyError(text) from None
    for value in budgets:
        if float(value) == wanted:
            return float(value)
    raise KeyError(text)
