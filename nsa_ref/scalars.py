"""Scalar arguments: the one check of "an integer" and "a positive finite number".

Python numbers and numpy scalars (``np.int64`` window, ``np.float32`` scale) are accepted and
converted to ``int`` / ``float``; ``bool`` (and numpy's bool) is refused, as are floats where an
integer is expected (never truncated). Errors name the argument.
"""

from __future__ import annotations

import math
import numbers


def _is_bool(value: object) -> bool:
    return isinstance(value, bool) or type(value).__name__ == "bool_"


def as_int(name: str, value: object, *, minimum: int | None = None) -> int:
    """``value`` as an ``int`` (``numbers.Integral``, not bool), at least ``minimum`` if given."""
    if _is_bool(value) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    value = int(value)
    if minimum is not None and value < minimum:
        bound = "positive" if minimum == 1 else f">= {minimum}"
        raise ValueError(f"{name} must be {bound}, got {value}")
    return value


def as_positive_float(name: str, value: object) -> float:
    """``value`` as a positive finite ``float`` (any ``numbers.Real`` but bool)."""
    if _is_bool(value) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a float, got {type(value).__name__}")
    value = float(value)
    if not 0 < value < math.inf:
        raise ValueError(f"{name} must be a positive finite float, got {value}")
    return value
