"""The one error type users see: bad input, named with its file and field; and the value checks behind it.

The checks are plain `if`s (never `assert`, which `python -O` removes), shared by configs, API
boundaries and the command line, so a bad value reads the same wherever it comes in.
"""

from __future__ import annotations

import math
from typing import Any, Iterable


class InputError(ValueError):
    """Bad user input (a file, a field, a shape). The CLI prints it without a traceback."""


def require_int(name: str, value: Any, minimum: int | None = None, maximum: int | None = None) -> int:
    """`value` if it is an integer (not a bool, not 5.0) within [minimum, maximum]."""
    if isinstance(value, bool) or not isinstance(value, int):
        import numpy as np

        if not isinstance(value, np.integer):
            raise InputError(f"{name}: expected an integer, got {value!r} ({type(value).__name__})")
        value = int(value)
    if minimum is not None and value < minimum:
        raise InputError(f"{name}: expected an integer >= {minimum}, got {value}")
    if maximum is not None and value > maximum:
        raise InputError(f"{name}: expected an integer <= {maximum}, got {value}")
    return value


MAX_SEED = 2 ** 32 - 1   # jax.random.key takes any such integer; seeds are offset by small counts inside runs


def require_seed(name: str, value: Any) -> int:
    return require_int(name, value, 0, MAX_SEED)


def require_number(name: str, value: Any, minimum: float | None = None, *, above: bool = False) -> float:
    """`value` as a finite float, >= minimum (> minimum when `above`)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        import numpy as np

        if not isinstance(value, (np.integer, np.floating)):
            raise InputError(f"{name}: expected a number, got {value!r} ({type(value).__name__})")
    value = float(value)
    if not math.isfinite(value):
        raise InputError(f"{name}: expected a finite number, got {value}")
    if minimum is not None and (value <= minimum if above else value < minimum):
        raise InputError(f"{name}: expected a number {'>' if above else '>='} {minimum:g}, got {value:g}")
    return value


def require_choice(name: str, value: Any, choices: Iterable[Any]) -> Any:
    choices = tuple(choices)
    if value not in choices:
        raise InputError(f"{name}: expected one of {', '.join(map(str, choices))}, got {value!r}")
    return value
