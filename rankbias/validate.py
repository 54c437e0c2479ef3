"""Type checks of user input, in one place.

Two kinds, on purpose:
- `is_int` / `is_real` test a value that will be stored or hashed as JSON (a run config, a
  model's options): Python numbers only, so a numpy scalar is refused, not written as text;
- `require_int` / `require_real` check a function argument (the theory's formulas): any
  integral or real number, numpy's included, returned as a Python int or float, or a
  one-line RankbiasError naming the argument.

`bool` is an `int` to `isinstance`; every check here refuses it (True is not a batch size).
"""

from __future__ import annotations

import math
import numbers

from rankbias.utils import RankbiasError


def is_int(value: object) -> bool:
    """A Python int (bool excluded)."""
    return isinstance(value, int) and not isinstance(value, bool)


def is_real(value: object) -> bool:
    """A finite Python int or float (bool excluded)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def require_int(value: object, name: str, minimum: int = 1) -> int:
    """`value` as an int when it is an integral number >= `minimum`, else RankbiasError."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise RankbiasError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def require_real(value: object, name: str, positive: bool) -> float:
    """`value` as a float when it is a finite number > 0 (`positive`) or >= 0, else
    RankbiasError."""
    ok = isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or value < 0 or (positive and value == 0):
        raise RankbiasError(f"{name} must be a finite number {'> 0' if positive else '>= 0'}, "
                            f"got {value!r}")
    return float(value)
