"""Input checks shared by every quantlab module.

Each check raises ``TypeError`` (wrong kind of object) or ``ValueError`` (right kind, bad value)
with a message that names the argument, the value received and what would be valid. Nothing in
quantlab clamps or ignores bad input silently; these helpers are how that promise is kept.
"""

from __future__ import annotations

import numbers

import torch

__all__ = [
    "check_float_tensor",
    "check_group_size",
    "check_int",
    "check_n_bits",
    "check_positive",
    "check_probability",
]


def check_int(value: object, name: str) -> int:
    """Return ``value`` as an ``int``; raise ``TypeError`` for bools, floats and other objects."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {value!r} of type {type(value).__name__}")
    return int(value)


def check_n_bits(n_bits: object, low: int = 1, high: int = 16, name: str = "n_bits") -> int:
    """Check that a bit width is an int in ``[low, high]``.

    >>> check_n_bits(4)
    4
    """
    n_bits = check_int(n_bits, name)
    if not low <= n_bits <= high:
        raise ValueError(f"{name} must be an int in [{low}, {high}], got {n_bits}")
    return n_bits


def check_positive(value: object, name: str, allow_zero: bool = False) -> float:
    """Check that ``value`` is a finite real number > 0 (or >= 0 with ``allow_zero``)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {value!r} of type {type(value).__name__}")
    value = float(value)
    ok = value >= 0 if allow_zero else value > 0
    if not ok or value != value or value in (float("inf"), float("-inf")):
        bound = ">= 0" if allow_zero else "> 0"
        raise ValueError(f"{name} must be a finite number {bound}, got {value}")
    return value


def check_probability(value: object, name: str) -> float:
    """Check that ``value`` is a real number in ``[0, 1]``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number in [0, 1], got {value!r}")
    value = float(value)
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must be in [0, 1], got {value}")
    return value


def check_float_tensor(
    x: object,
    name: str = "x",
    *,
    allow_empty: bool = False,
    allow_nonfinite: bool = False,
    ndim: int | None = None,
) -> torch.Tensor:
    """Check that ``x`` is a floating-point tensor, non-empty and finite (by default).

    Args:
        x: the object to check.
        name: the argument's name, used in the error message.
        allow_empty: accept a tensor with zero elements.
        allow_nonfinite: accept NaN and +-Inf values.
        ndim: if given, the exact number of dimensions required.

    Returns:
        ``x`` itself, so the check can be used inline.
    """
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(
            f"{name} must be a floating-point tensor (float16/bfloat16/float32/float64), "
            f"got dtype {x.dtype}; "
            f"convert it first, e.g. {name}.float()"
        )
    if ndim is not None and x.ndim != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {tuple(x.shape)}")
    if not allow_empty and x.numel() == 0:
        raise ValueError(f"{name} must not be empty, got shape {tuple(x.shape)}")
    if not allow_nonfinite and x.numel() > 0 and not bool(torch.isfinite(x).all()):
        n_bad = int((~torch.isfinite(x)).sum())
        raise ValueError(f"{name} contains {n_bad} NaN or Inf values; quantization needs finite inputs")
    return x


def check_group_size(group_size: object, dim_size: int, name: str = "group_size") -> int:
    """Check that ``group_size`` is a positive int dividing ``dim_size`` (the ``in_features`` axis).

    >>> check_group_size(32, 128)
    32
    """
    group_size = check_int(group_size, name)
    if group_size <= 0 or dim_size % group_size != 0:
        divisors = [d for d in range(1, dim_size + 1) if dim_size % d == 0]
        shown = divisors if len(divisors) <= 12 else divisors[:6] + ["..."] + divisors[-3:]
        raise ValueError(
            f"{name}={group_size} must be a positive divisor of the axis length {dim_size}; "
            f"valid values include {shown}"
        )
    return group_size
