"""Shared argument checkers: one implementation for every public entry point.

Every checker takes the argument's name first and raises TypeError (wrong kind of value) or
ValueError (right kind, out of range) with a message that starts with ``"<name>: "`` and says
what was expected, e.g. ``"lr: expected a real number, got str ('0.1')"``.

:class:`UserFunctionError` and :func:`call_user` wrap a failure inside a user-supplied function
(a map's ``step``, a ``noise`` sampler, a ``loss_fn``) so the message says which function
failed and at which step; the original exception is chained (``raise ... from err``).
"""

from __future__ import annotations

import math
import numbers

import numpy as np

__all__ = ["MAX_SEED", "UserFunctionError", "call_user", "check_array", "check_bool", "check_choice",
           "check_int", "check_nonneg_float", "check_positive_float", "check_real", "check_seed",
           "check_unit_interval"]

#: largest seed accepted: numpy's SeedSequence takes any non-negative integer, torch.Generator's
#: manual_seed at most 2**64 - 1
MAX_SEED = 2 ** 64 - 1


def _describe(value) -> str:
    r = repr(value)
    if len(r) > 40:
        r = r[:37] + "..."
    return f"{type(value).__name__} ({r})"


def check_real(name: str, value, *, finite: bool = True) -> float:
    """A real scalar as float: ints, floats, numpy scalars, 0-d arrays and 1-element tensors.

    Refused with TypeError: strings, bools, complex numbers, arrays with more than one value,
    None. ``finite=True`` refuses nan and +-inf with ValueError.
    """
    if isinstance(value, (str, bytes, bool, np.bool_)) or value is None or isinstance(value, complex):
        raise TypeError(f"{name}: expected a real number, got {_describe(value)}")
    if isinstance(value, np.ndarray) and (value.ndim != 0 or not np.issubdtype(value.dtype, np.number)
                                          or np.issubdtype(value.dtype, np.complexfloating)):
        raise TypeError(f"{name}: expected a real number, got an array of shape {value.shape}, dtype {value.dtype}")
    if not isinstance(value, numbers.Real) and getattr(value, "ndim", 0) != 0:
        raise TypeError(f"{name}: expected a real number, got {type(value).__name__} of shape {getattr(value, 'shape', '?')}")
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise TypeError(f"{name}: expected a real number, got {_describe(value)}") from None
    if finite and not math.isfinite(v):
        raise ValueError(f"{name}: expected a finite number, got {v}")
    return v


def check_positive_float(name: str, value) -> float:
    """A finite real number > 0."""
    v = check_real(name, value)
    if not v > 0:
        raise ValueError(f"{name}: expected a positive finite number, got {v}")
    return v


def check_nonneg_float(name: str, value) -> float:
    """A finite real number >= 0."""
    v = check_real(name, value)
    if not v >= 0:
        raise ValueError(f"{name}: expected a non-negative finite number, got {v}")
    return v


def check_unit_interval(name: str, value) -> float:
    """A real number in [0, 1) (a momentum / averaging coefficient)."""
    v = check_real(name, value, finite=False)
    if not 0.0 <= v < 1.0:
        raise ValueError(f"{name}: expected a number in [0, 1), got {v}")
    return v


def check_int(name: str, value, minimum: int | None = None, *, allow_none: bool = False) -> int | None:
    """An integer (Python or numpy; not bool, not a float such as 2.0) >= ``minimum``."""
    if value is None and allow_none:
        return None
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name}: expected an integer{' or None' if allow_none else ''}, got {_describe(value)}")
    if minimum is not None and value < minimum:
        raise ValueError(f"{name}: expected an integer >= {minimum}, got {value}")
    return int(value)


def check_bool(name: str, value) -> bool:
    """A flag: True or False (numpy bools too). Strings such as "yes" or "False" are refused."""
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    raise TypeError(f"{name}: expected True or False, got {_describe(value)}")


def check_choice(name: str, value, choices) -> str:
    """One of the strings ``choices``."""
    choices = tuple(choices)
    if not isinstance(value, str):
        raise TypeError(f"{name}: expected one of {choices}, got {_describe(value)}")
    if value not in choices:
        raise ValueError(f"{name}: expected one of {choices}, got {value!r}")
    return value


def check_seed(value, name: str = "seed") -> int:
    """A seed: an integer 0 <= seed <= 2**64 - 1 (numpy ``SeedSequence`` and ``torch.Generator``).

    Refused: negative integers (ValueError), floats such as 1.5 or 1.0, strings, bools, None
    (TypeError).
    """
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name}: expected a non-negative integer, got {_describe(value)}")
    if not 0 <= value <= MAX_SEED:
        raise ValueError(f"{name}: expected a non-negative integer at most 2**64 - 1, got {value}")
    return int(value)


def check_array(name: str, value, *, ndim=None, finite: bool = True, min_size: int = 0,
                shape=None) -> np.ndarray:
    """A real float64 array (C-contiguous copy or view).

    TypeError: not convertible to real numbers (strings, objects, complex values). ValueError:
    wrong ``ndim`` (an int or a tuple of allowed values) or ``shape`` (None entries are free),
    fewer than ``min_size`` entries, or non-finite entries when ``finite``.
    """
    arr = np.asarray(value) if not isinstance(value, np.ndarray) else value
    if arr.dtype == object or not (np.issubdtype(arr.dtype, np.number) or arr.dtype == np.bool_):
        try:
            arr = np.asarray(value, dtype=np.float64)
        except (TypeError, ValueError):
            raise TypeError(f"{name}: expected an array of real numbers, got {type(value).__name__}"
                            f"{' of dtype ' + str(arr.dtype) if hasattr(arr, 'dtype') else ''}") from None
    if np.issubdtype(arr.dtype, np.complexfloating):
        raise TypeError(f"{name}: expected real numbers, got complex dtype {arr.dtype}")
    arr = np.ascontiguousarray(arr, dtype=np.float64)
    if ndim is not None:
        allowed = (ndim,) if isinstance(ndim, int) else tuple(ndim)
        if arr.ndim not in allowed:
            want = " or ".join(f"{n}-D" for n in allowed)
            raise ValueError(f"{name}: expected a {want} array, got shape {arr.shape}")
    if shape is not None:
        if len(shape) != arr.ndim or any(s is not None and s != a for s, a in zip(shape, arr.shape)):
            want = "(" + ", ".join("n" if s is None else str(s) for s in shape) + ("," if len(shape) == 1 else "") + ")"
            raise ValueError(f"{name}: expected shape {want}, got {arr.shape}")
    if arr.size < min_size:
        raise ValueError(f"{name}: expected at least {min_size} value(s), got an array of shape {arr.shape}")
    if finite and not np.all(np.isfinite(arr)):
        bad = int(np.count_nonzero(~np.isfinite(arr)))
        raise ValueError(f"{name}: must be finite ({bad} of {arr.size} entries are nan or inf)")
    return arr


class UserFunctionError(RuntimeError):
    """A user-supplied function (``step``, ``jacobian``, ``noise``, ``loss_fn``...) raised.

    Attributes:
        function: the argument name of the function that failed.
        step: the step index at which it failed (None if not known).
    The original exception is ``__cause__``.
    """

    def __init__(self, function: str, err: BaseException, step: int | None = None, where: str = ""):
        self.function, self.step = function, step
        at = f" at step {step}" if step is not None else ""
        ctx = f" ({where})" if where else ""
        super().__init__(f"{function}: the user function raised {type(err).__name__}{at}{ctx}: {err}")


def call_user(function: str, fn, *args, step: int | None = None, where: str = ""):
    """``fn(*args)``, re-raising any exception as :class:`UserFunctionError` (chained)."""
    try:
        return fn(*args)
    except UserFunctionError:
        raise
    except Exception as err:
        raise UserFunctionError(function, err, step, where) from err
