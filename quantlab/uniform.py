"""Uniform (integer) quantization: code ranges, rounding, scale and zero-point, quantize/dequantize.

A uniform quantizer maps a real number ``x`` to an integer code ``q`` on an evenly spaced grid::

    q     = clamp(round(x / scale) + zero_point, qmin, qmax)      # quantize
    x_hat = scale * (q - zero_point)                             # dequantize

Everything else in quantlab (granularity, GPTQ, AWQ, SmoothQuant, the kernels) is built on the few
functions below. Three ways to choose ``scale`` and ``zero_point`` appear in the literature and all
three are here under their own names, because the papers' reference codes differ in the last detail:

* **absmax** (symmetric, signed, "restricted" grid ``[-(2^(b-1)-1), 2^(b-1)-1]``): ``scale = absmax / qmax``
  and ``zero_point = 0``. Used by LLM.int8() and SmoothQuant's fake quantizers; ``|x| <= absmax`` so the
  clamp never bites.
* **affine** (asymmetric, textbook): the range ``[min, max]`` is stretched to contain 0 so that 0 is
  exactly representable, ``scale = (max - min) / (qmax - qmin)`` and an integer ``zero_point``.
* **min-max** (GPTQ's quantizer, unsigned codes ``[0, 2^b-1]``): range forced to contain 0,
  ``zero_point = round(-min / scale)`` (not clamped); the symmetric mode uses ``zero_point = 2^b / 2``
  so the 4-bit grid is ``[-8s, 7s]``.

References:
    Jacob et al., "Quantization and Training of Neural Networks for Efficient Integer-Arithmetic-Only
    Inference", CVPR 2018 (affine quantization, zero-point).
    Dettmers et al., "LLM.int8(): 8-bit Matrix Multiplication for Transformers at Scale", 2022 (absmax).
    Frantar et al., "GPTQ: Accurate Post-Training Quantization for Generative Pre-trained
    Transformers", ICLR 2023 (the min-max quantizer of its reference code).
    Bengio et al., "Estimating or Propagating Gradients Through Stochastic Neurons", 2013 (the
    straight-through estimator).
"""

from __future__ import annotations

from typing import Literal

import torch

from quantlab._checks import check_float_tensor, check_n_bits

__all__ = [
    "ROUNDING_MODES",
    "RoundingMode",
    "absmax_params",
    "affine_params",
    "dequantize",
    "fake_quantize",
    "fake_quantize_ste",
    "minmax_fake_quantize",
    "minmax_params",
    "qrange",
    "quantize",
    "round_half_away_from_zero",
    "round_half_to_even",
    "round_stochastic",
    "round_values",
]

RoundingMode = Literal["half_to_even", "half_away_from_zero", "stochastic"]
ROUNDING_MODES: tuple[str, ...] = ("half_to_even", "half_away_from_zero", "stochastic")


# -----------------------------------------------------------------------------
# Code ranges


def qrange(n_bits: int, signed: bool = True, restricted: bool = False) -> tuple[int, int]:
    """The integer code range ``(qmin, qmax)`` of an ``n_bits`` quantizer.

    Args:
        n_bits: bits per code, 1..16.
        signed: two's-complement range ``[-2^(b-1), 2^(b-1)-1]`` if True, else ``[0, 2^b-1]``.
        restricted: for signed codes, drop the most negative code to get the symmetric "absmax"
            grid ``[-(2^(b-1)-1), 2^(b-1)-1]`` (needs ``n_bits >= 2``).

    Returns:
        ``(qmin, qmax)`` as Python ints.

    >>> qrange(8), qrange(8, signed=False), qrange(8, restricted=True)
    ((-128, 127), (0, 255), (-127, 127))
    """
    n_bits = check_n_bits(n_bits)
    if not signed:
        if restricted:
            raise ValueError("restricted=True only applies to signed codes; pass signed=True")
        return 0, 2**n_bits - 1
    if restricted:
        if n_bits < 2:
            raise ValueError(f"the restricted (absmax) grid needs n_bits >= 2, got n_bits={n_bits}")
        return -(2 ** (n_bits - 1) - 1), 2 ** (n_bits - 1) - 1
    return -(2 ** (n_bits - 1)), 2 ** (n_bits - 1) - 1


# -----------------------------------------------------------------------------
# Rounding


def round_half_to_even(x: torch.Tensor) -> torch.Tensor:
    """Round to nearest, ties to even (IEEE default, ``torch.round``): 0.5 -> 0, 1.5 -> 2, 2.5 -> 2."""
    return torch.round(x)


def round_half_away_from_zero(x: torch.Tensor) -> torch.Tensor:
    """Round to nearest, ties away from zero (C's ``roundf``): 0.5 -> 1, -2.5 -> -3.

    Computed as ``floor(|x|)`` plus one where the fractional part is ``>= 0.5``. Both steps are exact
    in binary floating point, unlike the common ``floor(|x| + 0.5)``, whose addition rounds the largest
    float below 0.5 up to 1.
    """
    a = torch.abs(x)
    whole = torch.floor(a)
    return torch.sign(x) * (whole + (a - whole >= 0.5).to(x.dtype))


def round_stochastic(x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Round down or up at random with probability equal to the distance: ``E[round(x)] = x``.

    Args:
        x: values to round.
        generator: a seeded ``torch.Generator`` for reproducible results.
    """
    floor = torch.floor(x)
    u = torch.rand(x.shape, generator=generator, dtype=x.dtype, device=x.device)
    return floor + (u < (x - floor)).to(x.dtype)


def round_values(
    x: torch.Tensor, rounding: RoundingMode = "half_to_even", generator: torch.Generator | None = None
) -> torch.Tensor:
    """Round ``x`` with the named rounding mode (one of :data:`ROUNDING_MODES`)."""
    if rounding == "half_to_even":
        return round_half_to_even(x)
    if rounding == "half_away_from_zero":
        return round_half_away_from_zero(x)
    if rounding == "stochastic":
        return round_stochastic(x, generator)
    raise ValueError(f"rounding must be one of {ROUNDING_MODES}, got {rounding!r}")


# -----------------------------------------------------------------------------
# Quantize / dequantize with given parameters


def _check_range(qmin: int, qmax: int) -> None:
    if qmin >= qmax:
        raise ValueError(f"qmin must be < qmax, got qmin={qmin}, qmax={qmax}")


def quantize(
    x: torch.Tensor,
    scale: torch.Tensor | float,
    zero_point: torch.Tensor | float,
    qmin: int,
    qmax: int,
    rounding: RoundingMode = "half_to_even",
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Map real values to integer codes: ``clamp(round(x / scale) + zero_point, qmin, qmax)``.

    The clamp is part of the quantizer's definition (it is where clipping error comes from); it is not
    a silent repair of bad input.

    Args:
        x: real values, any shape.
        scale: step size, broadcastable to ``x`` (e.g. ``(out, 1)`` per channel); must be > 0.
        zero_point: code of the real value 0, broadcastable to ``x``.
        qmin, qmax: the code range, e.g. from :func:`qrange`.
        rounding: one of :data:`ROUNDING_MODES`.
        generator: for ``rounding="stochastic"``.

    Returns:
        Codes with integer values, same shape and float dtype as ``x`` (keeping a float dtype lets the
        same tensor flow through fake quantization and the GPTQ/AWQ updates).

    >>> quantize(torch.tensor([-1.0, 0.26, 0.5]), 0.25, 0, -8, 7)
    tensor([-4.,  1.,  2.])
    """
    check_float_tensor(x, "x")
    _check_range(qmin, qmax)
    scale_t = torch.as_tensor(scale, dtype=x.dtype, device=x.device)
    if not bool((scale_t > 0).all()):
        raise ValueError("scale must be > 0 everywhere; got a zero or negative scale")
    codes = round_values(x / scale_t, rounding, generator) + zero_point
    return torch.clamp(codes, qmin, qmax)


def dequantize(
    codes: torch.Tensor, scale: torch.Tensor | float, zero_point: torch.Tensor | float
) -> torch.Tensor:
    """Map codes back to real values: ``scale * (codes - zero_point)``.

    Args:
        codes: integer codes (any integer or float dtype), any shape.
        scale, zero_point: broadcastable to ``codes``.

    Returns:
        A float tensor (``scale``'s dtype, or float32 for integer codes and Python-float scales).
    """
    if not isinstance(codes, torch.Tensor):
        raise TypeError(f"codes must be a torch.Tensor, got {type(codes).__name__}")
    scale_t = torch.as_tensor(scale)
    dtype = scale_t.dtype if scale_t.is_floating_point() else torch.float32
    if codes.is_floating_point():
        dtype = torch.promote_types(dtype, codes.dtype)
    zp = torch.as_tensor(zero_point, device=codes.device).to(dtype)
    return scale_t.to(device=codes.device, dtype=dtype) * (codes.to(dtype) - zp)


def fake_quantize(
    x: torch.Tensor,
    scale: torch.Tensor | float,
    zero_point: torch.Tensor | float,
    qmin: int,
    qmax: int,
    rounding: RoundingMode = "half_to_even",
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Quantize then dequantize: the real values the integer grid can represent ("simulated" quantization).

    >>> fake_quantize(torch.tensor([0.3, -0.9, 5.0]), 0.5, 0, -2, 1)
    tensor([ 0.5000, -1.0000,  0.5000])
    """
    return dequantize(quantize(x, scale, zero_point, qmin, qmax, rounding, generator), scale, zero_point)


# -----------------------------------------------------------------------------
# Choosing scale and zero-point


def absmax_params(
    x: torch.Tensor, n_bits: int = 8, dim: int | None = -1, eps: float = 0.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric "absmax" parameters: ``scale = max|x| / (2^(b-1)-1)``, ``zero_point = 0``.

    The codes live on the restricted signed grid ``[-(2^(b-1)-1), 2^(b-1)-1]``: since ``|x| <= max|x|``,
    ``round(x / scale)`` never leaves it (LLM.int8(), Eq. 1; SmoothQuant's fake quantizer).

    Args:
        x: values, any shape.
        n_bits: 2..16.
        dim: axis to reduce (kept with size 1) for per-row/per-token scales; ``None`` for one scale.
        eps: lower bound on ``max|x|`` before dividing (SmoothQuant's code uses ``1e-5``); with the
            default 0 an all-zero slice gets scale 1 so that it quantizes to code 0 without dividing by 0.

    Returns:
        ``(scale, zero_point)``; shape of ``x`` with ``dim`` reduced to 1, or scalars for ``dim=None``.

    >>> absmax_params(torch.tensor([[1.0, -127.0], [0.5, 0.25]]), 8)[0].squeeze(-1)
    tensor([1.0000, 0.0039])
    """
    check_float_tensor(x, "x")
    _, qmax = qrange(n_bits, signed=True, restricted=True)
    amax = x.abs().amax() if dim is None else x.abs().amax(dim=dim, keepdim=True)
    if eps > 0:
        amax = amax.clamp(min=eps)
    else:
        amax = torch.where(amax == 0, torch.full_like(amax, float(qmax)), amax)
    scale = amax / qmax
    return scale, torch.zeros_like(scale)


def affine_params(
    xmin: torch.Tensor, xmax: torch.Tensor, n_bits: int = 8, signed: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Asymmetric (affine) parameters from a range, stretched to contain 0 (Jacob et al. 2018, Sec. 2.1).

    ``scale = (max - min) / (qmax - qmin)`` and ``zero_point = round(qmin - min / scale)``, an integer
    inside ``[qmin, qmax]`` because the range contains 0: the real value 0 (padding, ReLU zeros) is
    represented exactly. A degenerate range ``min = max = 0`` gets scale 1.

    Args:
        xmin, xmax: range tensors of the same shape (e.g. ``(out, 1)`` from a per-channel min/max).
        n_bits: 1..16.
        signed: codes in ``[-2^(b-1), 2^(b-1)-1]`` instead of ``[0, 2^b-1]``.

    Returns:
        ``(scale, zero_point)`` with the shape of ``xmin``.

    >>> affine_params(torch.tensor(-1.0), torch.tensor(3.0), n_bits=2)
    (tensor(1.3333), tensor(1.))
    """
    check_float_tensor(xmin, "xmin")
    check_float_tensor(xmax, "xmax")
    if bool((xmin > xmax).any()):
        raise ValueError("xmin must be <= xmax everywhere")
    qmin, qmax = qrange(n_bits, signed=signed)
    lo = torch.clamp(xmin, max=0.0)
    hi = torch.clamp(xmax, min=0.0)
    scale = (hi - lo) / (qmax - qmin)
    scale = torch.where(scale == 0, torch.ones_like(scale), scale)
    zero_point = torch.round(qmin - lo / scale)
    return scale, zero_point


def minmax_params(
    x: torch.Tensor, n_bits: int = 4, symmetric: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """GPTQ's min-max quantizer parameters, one ``(scale, zero_point)`` per row of a 2-D ``x``.

    Codes are unsigned, ``[0, maxq]`` with ``maxq = 2^b - 1``. Following the GPTQ reference code exactly:

    * the range always contains 0: ``xmin = min(min(x), 0)``, ``xmax = max(max(x), 0)``;
    * symmetric: ``xmax = max(|xmin|, xmax)`` and, where ``xmin < 0``, ``xmin = -xmax``;
      ``zero_point = (maxq + 1) / 2`` (= 8 at 4 bits, grid ``[-8s, 7s]``);
    * an all-zero row gets the range ``[-1, 1]``;
    * ``scale = (xmax - xmin) / maxq``; asymmetric ``zero_point = round(-xmin / scale)``, not clamped.

    Args:
        x: ``(rows, cols)``; one parameter pair per row (pass ``w.reshape(1, -1)`` for per-tensor,
            a ``(out, group_size)`` slice for a group).
        n_bits: 1..16.
        symmetric: use the symmetric variant.

    Returns:
        ``(scale, zero_point)``, each ``(rows, 1)``.

    >>> s, z = minmax_params(torch.tensor([[-1.0, 2.0]]), n_bits=2)
    >>> s.item(), z.item()
    (1.0, 1.0)
    """
    check_float_tensor(x, "x", ndim=2)
    return _minmax_params(x, 2 ** check_n_bits(n_bits) - 1, symmetric)


def _minmax_params(x: torch.Tensor, maxq: int, symmetric: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`minmax_params` without its input checks, for inner loops on values checked once.

    GPTQ fits one grid per group of columns as it reaches the group (thousands of calls per model);
    checking that the weights are finite every time cost about as much as the fit itself.
    """
    zeros = torch.zeros(x.shape[0], dtype=x.dtype, device=x.device)
    # amin/amax: the same values as min(dim=1).values, several times faster (no argmin to track).
    xmin = torch.minimum(x.amin(dim=1), zeros)  # (rows,)
    xmax = torch.maximum(x.amax(dim=1), zeros)  # (rows,)
    if symmetric:
        xmax = torch.maximum(xmin.abs(), xmax)
        xmin = torch.where(xmin < 0, -xmax, xmin)
    dead = (xmin == 0) & (xmax == 0)
    xmin = torch.where(dead, -torch.ones_like(xmin), xmin)
    xmax = torch.where(dead, torch.ones_like(xmax), xmax)
    scale = (xmax - xmin) / maxq
    if symmetric:
        zero_point = torch.full_like(scale, (maxq + 1) / 2)
    else:
        zero_point = torch.round(-xmin / scale)
    return scale.unsqueeze(1), zero_point.unsqueeze(1)  # (rows, 1) each


def minmax_fake_quantize(
    x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, n_bits: int
) -> torch.Tensor:
    """GPTQ's ``quantize``: ``scale * (clamp(round(x / scale) + zero_point, 0, 2^b-1) - zero_point)``."""
    return fake_quantize(x, scale, zero_point, 0, 2 ** check_n_bits(n_bits) - 1)


# -----------------------------------------------------------------------------
# Quantization-aware training: the straight-through estimator


class _FakeQuantizeSTE(torch.autograd.Function):
    """Forward: fake quantization. Backward: identity inside the representable range, 0 outside."""

    @staticmethod
    def forward(ctx, x, scale, zero_point, qmin, qmax):  # noqa: D102 (autograd protocol)
        lo = scale * (qmin - zero_point)
        hi = scale * (qmax - zero_point)
        ctx.save_for_backward((x >= lo) & (x <= hi))
        return fake_quantize(x.detach(), scale, zero_point, qmin, qmax)

    @staticmethod
    def backward(ctx, grad_output):  # noqa: D102
        (inside,) = ctx.saved_tensors
        return grad_output * inside.to(grad_output.dtype), None, None, None, None


def fake_quantize_ste(
    x: torch.Tensor, scale: torch.Tensor | float, zero_point: torch.Tensor | float, qmin: int, qmax: int
) -> torch.Tensor:
    """Fake quantization whose gradient is the straight-through estimator (Bengio et al. 2013).

    ``round`` has zero gradient almost everywhere, so QAT pretends it is the identity on the backward
    pass; values clipped by the clamp get zero gradient (they cannot move the output).

    Args:
        x: values that require grad, any shape.
        scale, zero_point: broadcastable to ``x``; treated as constants (no gradient).
        qmin, qmax: code range.

    Returns:
        ``fake_quantize(x, ...)`` with ``d out / d x = 1`` inside the range and 0 outside.
    """
    check_float_tensor(x, "x")
    _check_range(qmin, qmax)
    scale_t = torch.as_tensor(scale, dtype=x.dtype, device=x.device)
    zp_t = torch.as_tensor(zero_point, dtype=x.dtype, device=x.device)
    return _FakeQuantizeSTE.apply(x, scale_t, zp_t, qmin, qmax)
