"""Granularity: how many weights share one scale (per-tensor, per-channel, per-group, per-token).

The uniform quantizer of :mod:`quantlab.uniform` needs a ``scale`` and a ``zero_point``. The fewer
weights share them, the tighter the range each one covers and the smaller the error, at the price of
storing more parameters. One convention is used throughout (see ``CONTRIBUTING.md``):

* a weight is ``(out_features, in_features)`` like ``torch.nn.Linear.weight``;
* **per-tensor**: one pair for the whole weight, parameters of shape ``(1, 1)``;
* **per-channel**: one pair per output row (reduce over ``in_features``), shape ``(out, 1)``;
* **per-group**: one pair per ``group_size`` consecutive input columns of a row, computed on the
  grouped view ``(out, n_groups, group_size)`` and returned as ``(out, n_groups)``;
* **per-token** (activations ``(..., tokens, features)``): one pair per token row, shape
  ``(..., tokens, 1)``.

So weight parameters are always 2-D ``(rows, n_groups)`` that broadcast against the grouped view after
``unsqueeze(-1)``; per-tensor and per-channel are just ``n_groups = 1`` (with one row for per-tensor).
A per-group quantizer whose group is the whole row *is* the per-channel quantizer.

Three ways to pick the parameters from a range (the ``scheme``), all from :mod:`quantlab.uniform`:

* ``"absmax"``: symmetric, signed restricted codes ``[-(2^(b-1)-1), 2^(b-1)-1]``, zero-point 0
  (LLM.int8(), SmoothQuant);
* ``"affine"``: asymmetric, unsigned codes ``[0, 2^b-1]``, range stretched to contain 0, integer
  zero-point (Jacob et al. 2018);
* ``"minmax"``: GPTQ's quantizer, unsigned codes ``[0, 2^b-1]``; ``symmetric=True`` fixes the zero-point
  at ``2^(b-1)`` (4-bit grid ``[-8s, 7s]``).

Every scheme only needs each group's minimum and maximum, so the implementation computes those with a
single ``amin``/``amax`` over the grouped view and hands the tiny ``(rows, n_groups)`` statistics to
the parameter functions of :mod:`quantlab.uniform`. Quantize is ``clamp(round(w / s) + z, qmin, qmax)``
(a division, as the reference codes do); fake quantization runs in place on one temporary so it costs a
few passes over memory, not a Python loop over groups.

References:
    Jacob et al., "Quantization and Training of Neural Networks for Efficient Integer-Arithmetic-Only
    Inference", CVPR 2018 (per-channel affine quantization).
    Dettmers et al., "LLM.int8(): 8-bit Matrix Multiplication for Transformers at Scale", 2022
    (vector-wise quantization: per-token activations x per-channel weights).
    Xiao et al., "SmoothQuant: Accurate and Efficient Post-Training Quantization for Large Language
    Models", ICML 2023 (per-tensor / per-token / per-channel granularities, Fig. 3).
    Frantar et al., "GPTQ", ICLR 2023 (per-group quantization with ``groupsize``).
    Nagel et al., "A White Paper on Neural Network Quantization", 2021 (Sec. 2.4, granularity).
"""

from __future__ import annotations

from typing import Literal

import torch

from quantlab._checks import check_float_tensor, check_group_size, check_n_bits
from quantlab.uniform import (
    RoundingMode,
    absmax_params,
    affine_params,
    dequantize,
    minmax_params,
    qrange,
    round_values,
)

__all__ = [
    "GRANULARITIES",
    "SCHEMES",
    "Granularity",
    "Scheme",
    "compute_params",
    "dequantize_weight",
    "expand_params",
    "fake_quantize_per_token",
    "fake_quantize_weight",
    "group_view",
    "params_from_range",
    "per_token_params",
    "quantize_weight",
    "scheme_qrange",
]

Granularity = Literal["tensor", "channel", "group"]
Scheme = Literal["absmax", "affine", "minmax"]
GRANULARITIES: tuple[str, ...] = ("tensor", "channel", "group")
SCHEMES: tuple[str, ...] = ("absmax", "affine", "minmax")


# -----------------------------------------------------------------------------
# Code ranges and argument checks


def _check_scheme(scheme: object, symmetric: bool | None) -> bool:
    """Validate ``scheme`` and return the effective ``symmetric`` flag (None -> the scheme's own)."""
    if scheme not in SCHEMES:
        raise ValueError(f"scheme must be one of {SCHEMES}, got {scheme!r}")
    if symmetric is not None and not isinstance(symmetric, bool):
        raise TypeError(f"symmetric must be a bool or None, got {symmetric!r}")
    if scheme == "absmax":
        if symmetric is False:
            raise ValueError("scheme='absmax' is symmetric by definition; got symmetric=False (use 'affine')")
        return True
    if scheme == "affine":
        if symmetric is True:
            raise ValueError("scheme='affine' is asymmetric by definition; got symmetric=True (use 'absmax')")
        return False
    return bool(symmetric)  # minmax: GPTQ supports both


def scheme_qrange(scheme: Scheme, n_bits: int) -> tuple[int, int]:
    """The integer code range of a scheme: signed restricted for absmax, unsigned otherwise.

    Args:
        scheme: ``"absmax"``, ``"affine"`` or ``"minmax"``.
        n_bits: bits per code (absmax needs ``n_bits >= 2``).

    Returns:
        ``(qmin, qmax)``.

    >>> scheme_qrange("absmax", 4), scheme_qrange("minmax", 4)
    ((-7, 7), (0, 15))
    """
    _check_scheme(scheme, None)
    if scheme == "absmax":
        return qrange(n_bits, signed=True, restricted=True)
    return qrange(n_bits, signed=False)


def _resolve_group_size(granularity: object, group_size: object, in_features: int) -> int | None:
    """Check the granularity / group_size pair; return the group size for ``"group"``, else None."""
    if granularity not in GRANULARITIES:
        raise ValueError(f"granularity must be one of {GRANULARITIES}, got {granularity!r}")
    if granularity == "group":
        if group_size is None:
            raise ValueError("granularity='group' needs a group_size (a divisor of in_features)")
        return check_group_size(group_size, in_features)
    if group_size is not None:
        raise ValueError(
            f"group_size={group_size!r} only applies to granularity='group', got granularity={granularity!r}"
        )
    return None


# -----------------------------------------------------------------------------
# Views and statistics


def group_view(w: torch.Tensor, granularity: Granularity, group_size: int | None = None) -> torch.Tensor:
    """The 3-D view ``(rows, n_groups, group_size)`` that every granularity reduces over its last dim.

    Args:
        w: ``(out, in)`` weight.
        granularity: ``"tensor"`` -> ``(1, 1, out*in)``; ``"channel"`` -> ``(out, 1, in)``;
            ``"group"`` -> ``(out, in // group_size, group_size)``.
        group_size: for ``"group"`` only; must divide ``in``.

    Returns:
        A view of ``w`` (a copy only when ``w`` is not contiguous).

    >>> group_view(torch.zeros(2, 8), "group", 4).shape
    torch.Size([2, 2, 4])
    """
    check_float_tensor(w, "w", ndim=2, allow_nonfinite=True)
    out_features, in_features = w.shape
    group_size = _resolve_group_size(granularity, group_size, in_features)
    if granularity == "tensor":
        return w.reshape(1, 1, out_features * in_features)  # (1, 1, out * in)
    if granularity == "channel":
        return w.reshape(out_features, 1, in_features)  # (out, 1, in)
    return w.reshape(out_features, in_features // group_size, group_size)  # (out, n_groups, group_size)


def _check_finite_stats(xmin: torch.Tensor, xmax: torch.Tensor, name: str) -> None:
    """min/max propagate NaN and +-Inf, so checking the statistics checks every element they came from."""
    if not bool(torch.isfinite(xmin).all() & torch.isfinite(xmax).all()):
        raise ValueError(f"{name} contains NaN or Inf values; quantization needs finite inputs")


def params_from_range(
    xmin: torch.Tensor,
    xmax: torch.Tensor,
    n_bits: int,
    scheme: Scheme = "absmax",
    symmetric: bool | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero-point of a scheme from a range ``[xmin, xmax]`` (e.g. per-group min and max).

    Each scheme of :mod:`quantlab.uniform` depends on a group only through its min and max, so calling
    it on a tiny tensor holding just those two numbers per group gives exactly its answer. This is also
    how a *calibrated* range (:mod:`quantlab.calibration`) becomes static quantization parameters.

    Args:
        xmin, xmax: ranges of the same shape, ``xmin <= xmax``, finite; any shape (0-d included).
        n_bits: bits per code.
        scheme, symmetric: as in :func:`compute_params`.

    Returns:
        ``(scale, zero_point)`` with the shape of ``xmin``.

    >>> params_from_range(torch.tensor(-1.0), torch.tensor(2.0), 2, "minmax")
    (tensor(1.), tensor(1.))
    """
    n_bits = check_n_bits(n_bits)
    symmetric = _check_scheme(scheme, symmetric)
    check_float_tensor(xmin, "xmin", allow_nonfinite=True)
    check_float_tensor(xmax, "xmax", allow_nonfinite=True)
    if xmin.shape != xmax.shape:
        raise ValueError(
            f"xmin and xmax must have the same shape, got {tuple(xmin.shape)} and {tuple(xmax.shape)}"
        )
    _check_finite_stats(xmin, xmax, "xmin/xmax")
    if bool((xmin > xmax).any()):
        raise ValueError("xmin must be <= xmax everywhere")
    shape = xmin.shape
    wmin, wmax = xmin.reshape(-1, 1), xmax.reshape(-1, 1)  # (rows, n_groups=1)
    scale, zero_point = _params_2d(wmin, wmax, n_bits, scheme, symmetric)
    return scale.reshape(shape), zero_point.reshape(shape)


def _params_2d(
    wmin: torch.Tensor, wmax: torch.Tensor, n_bits: int, scheme: Scheme, symmetric: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`params_from_range` on checked ``(rows, n_groups)`` statistics."""
    rows, n_groups = wmin.shape
    if scheme == "absmax":
        amax = torch.maximum(wmin.abs(), wmax).unsqueeze(-1)  # (rows, n_groups, 1)
        scale, zero_point = absmax_params(amax, n_bits, dim=-1)  # (rows, n_groups, 1) each
        return scale.squeeze(-1), zero_point.squeeze(-1)  # (rows, n_groups)
    if scheme == "affine":
        return affine_params(wmin, wmax, n_bits, signed=False)  # (rows, n_groups)
    pairs = torch.stack([wmin, wmax], dim=-1).reshape(rows * n_groups, 2)  # (rows * n_groups, 2)
    scale, zero_point = minmax_params(pairs, n_bits, symmetric=symmetric)  # (rows * n_groups, 1)
    return scale.reshape(rows, n_groups), zero_point.reshape(rows, n_groups)  # (rows, n_groups)


# -----------------------------------------------------------------------------
# Weights: parameters, quantize, dequantize, fake quantize


def compute_params(
    w: torch.Tensor,
    n_bits: int,
    granularity: Granularity = "channel",
    group_size: int | None = None,
    scheme: Scheme = "minmax",
    symmetric: bool | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero-point of a weight at the chosen granularity.

    Args:
        w: ``(out, in)`` floating-point weight, finite.
        n_bits: bits per code, 1..16 (2..16 for absmax).
        granularity: ``"tensor"``, ``"channel"`` or ``"group"``.
        group_size: columns per group, a divisor of ``in``; only (and required) for ``"group"``.
        scheme: ``"absmax"``, ``"affine"`` or ``"minmax"`` (see module docstring).
        symmetric: None for the scheme's own choice; ``minmax`` accepts True/False, ``absmax`` only
            True, ``affine`` only False.

    Returns:
        ``(scale, zero_point)``, each ``(1, 1)`` per-tensor, ``(out, 1)`` per-channel or
        ``(out, n_groups)`` per-group, in ``w``'s dtype.

    >>> w = torch.tensor([[1.0, -2.0, 3.0, 4.0]])
    >>> compute_params(w, 8, "group", 2, scheme="absmax")[0] * 127
    tensor([[2., 4.]])
    """
    check_float_tensor(w, "w", ndim=2, allow_nonfinite=True)
    n_bits = check_n_bits(n_bits)
    symmetric = _check_scheme(scheme, symmetric)
    wg = group_view(w, granularity, group_size)  # (rows, n_groups, group_size)
    # two plain reductions are faster on CPU than one torch.aminmax
    wmin, wmax = wg.amin(dim=-1), wg.amax(dim=-1)  # (rows, n_groups) each
    _check_finite_stats(wmin, wmax, "w")
    return _params_2d(wmin, wmax, n_bits, scheme, symmetric)  # (rows, n_groups) each


def expand_params(params: torch.Tensor, shape: tuple[int, int] | torch.Size) -> torch.Tensor:
    """Broadcast ``(rows, n_groups)`` parameters to a full ``(out, in)`` weight shape.

    Args:
        params: ``(1, 1)``, ``(out, 1)`` or ``(out, n_groups)``.
        shape: ``(out, in)`` with ``in`` a multiple of ``n_groups``.

    Returns:
        ``(out, in)`` tensor where column ``j`` of row ``r`` holds ``params[r, j // group_size]``.

    >>> expand_params(torch.tensor([[1.0, 2.0]]), (1, 4))
    tensor([[1., 1., 2., 2.]])
    """
    out_features, in_features = shape
    rows, n_groups = params.shape
    if rows not in (1, out_features) or in_features % n_groups != 0:
        raise ValueError(f"params of shape {tuple(params.shape)} do not fit a weight of shape {tuple(shape)}")
    full = params.repeat_interleave(in_features // n_groups, dim=1)  # (rows, in)
    return full.expand(out_features, in_features)  # (out, in)


def _codes_dtype(qmin: int, qmax: int) -> torch.dtype:
    if qmin >= 0 and qmax <= 255:
        return torch.uint8
    if qmin >= -128 and qmax <= 127:
        return torch.int8
    return torch.int32


def quantize_weight(
    w: torch.Tensor,
    n_bits: int,
    granularity: Granularity = "channel",
    group_size: int | None = None,
    scheme: Scheme = "minmax",
    symmetric: bool | None = None,
    rounding: RoundingMode = "half_to_even",
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Integer codes and parameters of a weight: ``codes = clamp(round(w / s) + z, qmin, qmax)``.

    Args:
        w, n_bits, granularity, group_size, scheme, symmetric: as in :func:`compute_params`.
        rounding: a rounding mode of :mod:`quantlab.uniform` (``generator`` for ``"stochastic"``).

    Returns:
        ``(codes, scale, zero_point)``: ``codes`` is ``(out, in)`` in the smallest integer dtype that
        holds the range (``uint8`` for unsigned codes up to 8 bits, ``int8`` for signed absmax codes up
        to 8 bits, else ``int32``); ``scale`` and ``zero_point`` as in :func:`compute_params`.

    >>> codes, s, z = quantize_weight(torch.tensor([[-1.0, 0.0, 0.5, 2.0]]), 2, scheme="minmax")
    >>> codes, s, z
    (tensor([[0, 1, 1, 3]], dtype=torch.uint8), tensor([[1.]]), tensor([[1.]]))
    """
    scale, zero_point = compute_params(w, n_bits, granularity, group_size, scheme, symmetric)
    qmin, qmax = scheme_qrange(scheme, n_bits)
    wg = group_view(w, granularity, group_size)  # (rows, n_groups, group_size)
    s, z = scale.unsqueeze(-1), zero_point.unsqueeze(-1)  # (rows, n_groups, 1)
    codes = torch.clamp(round_values(wg / s, rounding, generator) + z, qmin, qmax)
    codes = codes.reshape(w.shape)  # (out, in)
    return codes.to(_codes_dtype(qmin, qmax)), scale, zero_point


def dequantize_weight(codes: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor) -> torch.Tensor:
    """Real weight from codes: ``scale * (codes - zero_point)`` with the parameters expanded per group.

    Args:
        codes: ``(out, in)`` integer codes.
        scale, zero_point: ``(1, 1)``, ``(out, 1)`` or ``(out, n_groups)``; the group size is
            ``in // n_groups``.

    Returns:
        ``(out, in)`` float tensor in ``scale``'s dtype.

    >>> dequantize_weight(torch.tensor([[0, 1, 1, 3]]), torch.tensor([[1.0]]), torch.tensor([[1.0]]))
    tensor([[-1.,  0.,  0.,  2.]])
    """
    if not isinstance(codes, torch.Tensor):
        raise TypeError(f"codes must be a torch.Tensor, got {type(codes).__name__}")
    if codes.ndim != 2:
        raise ValueError(f"codes must be a 2-D (out, in) tensor, got shape {tuple(codes.shape)}")
    if scale.shape != zero_point.shape or scale.ndim != 2:
        raise ValueError(
            f"scale and zero_point must both be (rows, n_groups), got {tuple(scale.shape)} and "
            f"{tuple(zero_point.shape)}"
        )
    out_features, in_features = codes.shape
    rows, n_groups = scale.shape
    if rows not in (1, out_features) or in_features % n_groups != 0:
        raise ValueError(
            f"scale of shape {tuple(scale.shape)} does not fit codes of shape {tuple(codes.shape)}"
        )
    cg = codes.reshape(out_features, n_groups, in_features // n_groups)  # (out, n_groups, group_size)
    w_hat = dequantize(cg, scale.unsqueeze(-1), zero_point.unsqueeze(-1))  # (out, n_groups, group_size)
    return w_hat.reshape(out_features, in_features)  # (out, in)


def fake_quantize_weight(
    w: torch.Tensor,
    n_bits: int,
    granularity: Granularity = "channel",
    group_size: int | None = None,
    scheme: Scheme = "minmax",
    symmetric: bool | None = None,
    rounding: RoundingMode = "half_to_even",
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Quantize then dequantize a weight at the chosen granularity (the values the grid can hold).

    Computes ``s * (clamp(round(w / s) + z, qmin, qmax) - z)`` in place on a single temporary, so the
    whole weight costs a handful of memory passes.

    Args:
        w, n_bits, granularity, group_size, scheme, symmetric: as in :func:`compute_params`.
        rounding, generator: as in :func:`quantize_weight`.

    Returns:
        ``(out, in)`` tensor, same dtype as ``w``.

    >>> fake_quantize_weight(torch.tensor([[0.1, 0.4, -1.0, 2.0]]), 2, "group", 2, scheme="minmax")
    tensor([[ 0.1333,  0.4000, -1.0000,  2.0000]])
    """
    scale, zero_point = compute_params(w, n_bits, granularity, group_size, scheme, symmetric)
    qmin, qmax = scheme_qrange(scheme, n_bits)
    wg = group_view(w, granularity, group_size)  # (rows, n_groups, group_size)
    s = scale.unsqueeze(-1)  # (rows, n_groups, 1)
    if rounding == "half_to_even":
        q = torch.div(wg, s).round_()  # one temporary, then in place
    else:
        q = round_values(wg / s, rounding, generator)
    if scheme == "absmax":
        q.clamp_(qmin, qmax)  # zero-point is 0
    else:
        z = zero_point.unsqueeze(-1)  # (rows, n_groups, 1)
        q.add_(z).clamp_(qmin, qmax).sub_(z)  # scalar clamp bounds are much faster than tensor ones
    return q.mul_(s).reshape(w.shape)  # (out, in)


# -----------------------------------------------------------------------------
# Activations: per-token


def per_token_params(
    x: torch.Tensor, n_bits: int = 8, scheme: Scheme = "absmax", symmetric: bool | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """One scale and zero-point per token: reduce activations over their last (feature) dim.

    This is the *dynamic* activation quantization of LLM.int8() and SmoothQuant's ``per-token``
    setting: the parameters are recomputed for every input.

    Args:
        x: ``(..., tokens, features)`` activations (at least 1-D), finite.
        n_bits: bits per code.
        scheme, symmetric: as in :func:`compute_params`.

    Returns:
        ``(scale, zero_point)``, each ``(..., tokens, 1)``.

    >>> per_token_params(torch.tensor([[1.0, -127.0], [0.5, 0.25]]), 8)[0]
    tensor([[1.0000],
            [0.0039]])
    """
    check_float_tensor(x, "x", allow_nonfinite=True)
    if x.ndim == 0:
        raise ValueError("x must have a feature dimension (at least 1-D), got a 0-d tensor")
    n_bits = check_n_bits(n_bits)
    symmetric = _check_scheme(scheme, symmetric)
    rows = x.reshape(-1, 1, x.shape[-1])  # (tokens_total, 1, features)
    xmin, xmax = rows.amin(dim=-1), rows.amax(dim=-1)  # (tokens_total, 1) each
    _check_finite_stats(xmin, xmax, "x")
    scale, zero_point = _params_2d(xmin, xmax, n_bits, scheme, symmetric)  # (tokens_total, 1) each
    shape = (*x.shape[:-1], 1)
    return scale.reshape(shape), zero_point.reshape(shape)  # (..., tokens, 1)


def fake_quantize_per_token(
    x: torch.Tensor, n_bits: int = 8, scheme: Scheme = "absmax", symmetric: bool | None = None
) -> torch.Tensor:
    """Dynamic per-token fake quantization of activations ``(..., tokens, features)``.

    Args:
        x: activations, finite.
        n_bits: bits per code (8 in LLM.int8() / SmoothQuant W8A8).
        scheme, symmetric: as in :func:`compute_params`; absmax by default.

    Returns:
        Tensor of ``x``'s shape and dtype.

    >>> fake_quantize_per_token(torch.tensor([[0.2, -1.0], [3.0, 1.4]]), n_bits=2)
    tensor([[ 0., -1.],
            [ 3.,  0.]])
    """
    scale, zero_point = per_token_params(x, n_bits, scheme, symmetric)  # (..., tokens, 1)
    qmin, qmax = scheme_qrange(scheme, n_bits)
    q = torch.div(x, scale).round_()
    q.add_(zero_point).clamp_(qmin, qmax).sub_(zero_point)
    return q.mul_(scale)
