"""Calibration: estimating the range ``[xmin, xmax]`` a quantizer should cover.

A quantizer's scale comes from a range. Taking the true min and max never clips but wastes the grid on
rare outliers; a narrower range clips a few values and rounds all the others more finely. Calibration
is choosing that trade-off, from the weights themselves or from activations seen on sample inputs:

* **min-max**: the observed extremes (:func:`minmax_range`);
* **running min-max / EMA** over calibration batches: :class:`MinMaxObserver`, a small stateful
  wrapper with ``update(x)`` and ``range()`` (the moving average follows TensorFlow/PyTorch QAT
  observers, Jacob et al. 2018 Sec. 3);
* **percentile**: ignore the most extreme ``(100 - p)`` percent (:func:`percentile_range`);
* **MSE-optimal clipping**: grid search over a clip ratio ``r`` that shrinks the min-max range and keep
  the one minimising ``mean |x - Q(x)|^p`` (:func:`mse_clip_search`, as in Nagel et al. 2021, Sec. 3.4,
  and AWQ's weight clipping search);
* **static vs dynamic** activation scales: a *static* scale is calibrated once and frozen
  (:class:`StaticActivationQuantizer`), cheap at inference but wrong when an input has larger outliers
  than the calibration data; a *dynamic* scale is recomputed per token at run time
  (:func:`fake_quantize_dynamic`), the LLM.int8() / SmoothQuant per-token setting.

Shape convention: ``axis=None`` estimates one range for the whole tensor; ``axis=k`` keeps dimension
``k`` and reduces all others, giving one range per index along ``k`` (``axis=0`` for the rows of a
``(out, in)`` weight, ``axis=-1`` for the features of ``(..., tokens, features)`` activations).

References:
    Jacob et al., "Quantization and Training of Neural Networks for Efficient Integer-Arithmetic-Only
    Inference", CVPR 2018 (EMA of activation ranges).
    Nagel et al., "A White Paper on Neural Network Quantization", 2021 (Sec. 3.4: min-max, MSE and
    percentile range setting).
    Dettmers et al., "LLM.int8()", 2022 and Xiao et al., "SmoothQuant", ICML 2023 (dynamic per-token
    vs static per-tensor activation scales).
    Lin et al., "AWQ: Activation-aware Weight Quantization", MLSys 2024 (grid search of a clip ratio).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from quantlab._checks import check_float_tensor, check_int, check_n_bits, check_positive
from quantlab.granularity import Scheme, fake_quantize_per_token, params_from_range, scheme_qrange

__all__ = [
    "ClipSearchResult",
    "MinMaxObserver",
    "StaticActivationQuantizer",
    "fake_quantize_dynamic",
    "fake_quantize_static",
    "minmax_range",
    "mse_clip_search",
    "percentile_range",
    "quantile",
]


# -----------------------------------------------------------------------------
# Reshaping helpers: one row per range


def _rows(x: torch.Tensor, axis: int | None) -> torch.Tensor:
    """``(C, N)`` view with one row per range: ``C = 1`` for ``axis=None`` else ``x.shape[axis]``."""
    if axis is None:
        return x.reshape(1, -1)  # (1, numel)
    axis = check_int(axis, "axis")
    if not -x.ndim <= axis < x.ndim:
        raise ValueError(f"axis must be None or in [{-x.ndim}, {x.ndim - 1}] for a {x.ndim}-D x, got {axis}")
    return x.movedim(axis, 0).reshape(x.shape[axis], -1)  # (C, N)


def _out(values: torch.Tensor, axis: int | None) -> torch.Tensor:
    """A ``(C,)`` row statistic as a 0-d tensor for ``axis=None``, else ``(C,)``."""
    return values.reshape(()) if axis is None else values


# -----------------------------------------------------------------------------
# Pure range estimators


def minmax_range(x: torch.Tensor, axis: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The observed extremes of ``x``.

    Args:
        x: finite floating-point tensor, any shape.
        axis: None for one range, or the dimension to keep (one range per index along it).

    Returns:
        ``(xmin, xmax)``: 0-d tensors for ``axis=None``, else ``(x.shape[axis],)``.

    >>> minmax_range(torch.tensor([[1.0, -3.0], [2.0, 0.5]]), axis=0)
    (tensor([-3.0000,  0.5000]), tensor([1., 2.]))
    """
    check_float_tensor(x, "x")
    rows = _rows(x, axis)  # (C, N)
    return _out(rows.amin(dim=1), axis), _out(rows.amax(dim=1), axis)


def quantile(x: torch.Tensor, q: float, axis: int | None = None) -> torch.Tensor:
    """The ``q``-quantile with linear interpolation (NumPy's default), without ``torch.quantile``'s size cap.

    Position ``q * (N - 1)`` in the sorted values, interpolated between its two neighbours, found with
    ``torch.kthvalue`` (no full sort, no 16M-element limit).

    Args:
        x: finite floating-point tensor.
        q: quantile in ``[0, 1]``.
        axis: as in :func:`minmax_range`.

    Returns:
        0-d tensor for ``axis=None``, else ``(x.shape[axis],)``.

    >>> quantile(torch.tensor([0.0, 1.0, 2.0, 10.0]), 0.5)
    tensor(1.5000)
    """
    check_float_tensor(x, "x")
    q = check_positive(q, "q", allow_zero=True)
    if q > 1:
        raise ValueError(f"q must be in [0, 1], got {q}")
    rows = _rows(x, axis)  # (C, N)
    pos = q * (rows.shape[1] - 1)
    lo_idx = int(pos)  # floor, pos >= 0
    hi_idx = min(lo_idx + 1, rows.shape[1] - 1)
    frac = pos - lo_idx
    lo = torch.kthvalue(rows, lo_idx + 1, dim=1).values  # (C,)
    if frac == 0.0:
        return _out(lo, axis)
    hi = torch.kthvalue(rows, hi_idx + 1, dim=1).values  # (C,)
    return _out(lo + (hi - lo) * frac, axis)


def percentile_range(
    x: torch.Tensor, percentile: float = 99.99, axis: int | None = None, symmetric: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """A range that ignores the most extreme values: the ``(100 - p)``-th and ``p``-th percentiles.

    Args:
        x: finite floating-point tensor.
        percentile: ``p`` in ``[50, 100]``; 100 gives :func:`minmax_range`.
        axis: as in :func:`minmax_range`.
        symmetric: use the ``p``-th percentile of ``|x|`` for both ends, ``(-a, a)``.

    Returns:
        ``(xmin, xmax)`` shaped as in :func:`minmax_range`.

    >>> percentile_range(torch.arange(101.0), 90.0)
    (tensor(10.), tensor(90.))
    """
    check_float_tensor(x, "x")
    p = check_positive(percentile, "percentile")
    if not 50.0 <= p <= 100.0:
        raise ValueError(f"percentile must be in [50, 100], got {percentile}")
    if symmetric:
        a = quantile(x.abs(), p / 100.0, axis)
        return -a, a
    return quantile(x, 1.0 - p / 100.0, axis), quantile(x, p / 100.0, axis)


# -----------------------------------------------------------------------------
# MSE-optimal clipping by grid search


@dataclass(frozen=True)
class ClipSearchResult:
    """Outcome of :func:`mse_clip_search`.

    Attributes:
        best_ratio: clip ratio with the smallest error; 0-d for ``axis=None``, else ``(C,)``.
        ratios: ``(n_ratios,)`` grid that was searched.
        errors: ``(n_ratios,)`` or ``(n_ratios, C)`` mean ``|x - Q(x)|^norm`` per ratio: the error curve.
        xmin, xmax: the clipped range at ``best_ratio``, shaped like ``best_ratio``.
    """

    best_ratio: torch.Tensor
    ratios: torch.Tensor
    errors: torch.Tensor
    xmin: torch.Tensor
    xmax: torch.Tensor


def _fake_quantize_rows(
    rows: torch.Tensor,
    lo: torch.Tensor,
    hi: torch.Tensor,
    n_bits: int,
    scheme: Scheme,
    symmetric: bool | None,
) -> torch.Tensor:
    """Fake quantize each row of ``rows`` ``(C, N)`` with its own range ``lo``/``hi`` ``(C,)``."""
    scale, zero_point = params_from_range(lo, hi, n_bits, scheme, symmetric)  # (C,) each
    qmin, qmax = scheme_qrange(scheme, n_bits)
    s, z = scale.unsqueeze(1), zero_point.unsqueeze(1)  # (C, 1)
    codes = torch.clamp(torch.round(rows / s) + z, qmin, qmax)
    return s * (codes - z)


def mse_clip_search(
    x: torch.Tensor,
    n_bits: int,
    scheme: Scheme = "absmax",
    symmetric: bool | None = None,
    ratios: torch.Tensor | None = None,
    axis: int | None = None,
    norm: float = 2.0,
) -> ClipSearchResult:
    """Grid search for the clip ratio ``r`` minimising the quantization error (Nagel et al. 2021, Eq. 3.4).

    For each ``r`` the min-max range is shrunk to ``[r * xmin, r * xmax]``, ``x`` is fake-quantized with
    the scheme's parameters for that range, and the error ``mean |x - Q_r(x)|^norm`` is recorded. Small
    ``r`` rounds finely but clips much; ``r = 1`` never clips. The first minimum in grid order wins.

    Args:
        x: finite floating-point tensor (weights or calibration activations).
        n_bits: bits per code.
        scheme, symmetric: as in :func:`quantlab.granularity.compute_params`.
        ratios: 1-D grid of ratios in ``(0, 1]``; default ``0.01, 0.02, ..., 1.00``.
        axis: None for one ratio, or the dimension to keep (one ratio per row, e.g. ``axis=0`` for the
            output channels of a weight).
        norm: the ``p`` of the ``L_p`` error (2 = MSE; AWQ and GPTQ's ``--search`` use 2 and 2.4).

    Returns:
        A :class:`ClipSearchResult` with the best ratio, the grid and the error curve.

    >>> x = torch.tensor([0.1, 0.2, -0.15, 0.05, 4.0])
    >>> mse_clip_search(x, 2, ratios=torch.tensor([0.05, 1.0])).best_ratio
    tensor(1.)
    """
    check_float_tensor(x, "x")
    n_bits = check_n_bits(n_bits)
    norm = check_positive(norm, "norm")
    if ratios is None:
        ratios = torch.linspace(0.01, 1.0, 100, dtype=torch.float64)
    if not isinstance(ratios, torch.Tensor) or ratios.ndim != 1 or ratios.numel() == 0:
        raise ValueError("ratios must be a non-empty 1-D tensor of clip ratios in (0, 1]")
    if not bool(((ratios > 0) & (ratios <= 1)).all()):
        raise ValueError(f"ratios must lie in (0, 1], got values in [{ratios.min()}, {ratios.max()}]")
    rows = _rows(x, axis)  # (C, N)
    xmin, xmax = rows.amin(dim=1), rows.amax(dim=1)  # (C,) each
    errors = []
    for r in ratios.tolist():
        x_hat = _fake_quantize_rows(rows, xmin * r, xmax * r, n_bits, scheme, symmetric)  # (C, N)
        errors.append((x_hat - rows).abs().pow(norm).mean(dim=1))  # (C,)
    err = torch.stack(errors)  # (n_ratios, C)
    best = err.argmin(dim=0)  # (C,)
    best_ratio = ratios.to(x.dtype)[best]  # (C,)
    if axis is None:
        err = err.squeeze(1)  # (n_ratios,)
    return ClipSearchResult(
        best_ratio=_out(best_ratio, axis),
        ratios=ratios,
        errors=err,
        xmin=_out(xmin * best_ratio, axis),
        xmax=_out(xmax * best_ratio, axis),
    )


# -----------------------------------------------------------------------------
# A stateful observer: running min-max or exponential moving average


class MinMaxObserver:
    """Track the range of a stream of tensors: running min/max, or its exponential moving average.

    With ``averaging_constant=None`` the range is the extremes over every batch seen. With a constant
    ``c`` in ``(0, 1]`` it is the EMA ``range <- (1 - c) * range + c * batch_range``, initialised by the
    first batch (QAT observers use ``c = 0.01``): one unusual batch no longer stretches the range forever.

    Args:
        axis: None for one range, or the dimension to keep (e.g. ``-1`` for per-feature activations).
        averaging_constant: None (running min/max) or the EMA weight of the newest batch.

    >>> obs = MinMaxObserver()
    >>> obs.update(torch.tensor([0.0, 2.0])); obs.update(torch.tensor([-1.0, 1.0]))
    >>> obs.range()
    (tensor(-1.), tensor(2.))
    >>> ema = MinMaxObserver(averaging_constant=0.5)
    >>> ema.update(torch.tensor([0.0, 2.0])); ema.update(torch.tensor([-1.0, 1.0]))
    >>> ema.range()
    (tensor(-0.5000), tensor(1.5000))
    """

    def __init__(self, axis: int | None = None, averaging_constant: float | None = None) -> None:
        if axis is not None:
            check_int(axis, "axis")
        if averaging_constant is not None:
            c = check_positive(averaging_constant, "averaging_constant")
            if c > 1:
                raise ValueError(f"averaging_constant must be in (0, 1], got {averaging_constant}")
            averaging_constant = c
        self.axis = axis
        self.averaging_constant = averaging_constant
        self.reset()

    def reset(self) -> None:
        """Forget every batch seen so far."""
        self.xmin: torch.Tensor | None = None
        self.xmax: torch.Tensor | None = None
        self.n_updates = 0

    def update(self, x: torch.Tensor) -> None:
        """Fold one batch into the range.

        Args:
            x: finite floating-point tensor; with ``axis`` set, ``x.shape[axis]`` must stay the same.
        """
        bmin, bmax = minmax_range(x.detach(), self.axis)
        if self.xmin is None or self.xmax is None:
            self.xmin, self.xmax = bmin.clone(), bmax.clone()
        else:
            if bmin.shape != self.xmin.shape:
                raise ValueError(
                    f"x gives ranges of shape {tuple(bmin.shape)} along axis={self.axis}, but earlier "
                    f"batches gave {tuple(self.xmin.shape)}"
                )
            if self.averaging_constant is None:
                self.xmin = torch.minimum(self.xmin, bmin)
                self.xmax = torch.maximum(self.xmax, bmax)
            else:
                c = self.averaging_constant
                self.xmin = self.xmin + c * (bmin - self.xmin)
                self.xmax = self.xmax + c * (bmax - self.xmax)
        self.n_updates += 1

    def range(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The current ``(xmin, xmax)``: 0-d tensors for ``axis=None``, else ``(C,)``."""
        if self.xmin is None or self.xmax is None:
            raise RuntimeError("MinMaxObserver.range() needs at least one update(x) call first")
        return self.xmin.clone(), self.xmax.clone()

    def __repr__(self) -> str:
        return (
            f"MinMaxObserver(axis={self.axis}, averaging_constant={self.averaging_constant}, "
            f"n_updates={self.n_updates})"
        )


# -----------------------------------------------------------------------------
# Static vs dynamic activation quantization


def fake_quantize_static(
    x: torch.Tensor,
    scale: torch.Tensor | float,
    zero_point: torch.Tensor | float,
    n_bits: int,
    scheme: Scheme = "absmax",
) -> torch.Tensor:
    """Fake quantize activations with *fixed* (calibrated) parameters; values outside the range clip.

    Args:
        x: ``(..., features)`` activations.
        scale, zero_point: 0-d (per-tensor) or ``(features,)`` (per-feature), from calibration.
        n_bits: bits per code.
        scheme: the scheme the parameters belong to (sets the code range).

    Returns:
        Tensor like ``x``.

    >>> fake_quantize_static(torch.tensor([0.5, 3.0]), 1.0 / 127, 0.0, 8)  # 0.5 -> 64/127, 3.0 clips
    tensor([0.5039, 1.0000])
    """
    check_float_tensor(x, "x")
    qmin, qmax = scheme_qrange(scheme, n_bits)
    s = torch.as_tensor(scale, dtype=x.dtype, device=x.device)
    z = torch.as_tensor(zero_point, dtype=x.dtype, device=x.device)
    if not bool((s > 0).all()):
        raise ValueError("scale must be > 0 everywhere")
    return s * (torch.clamp(torch.round(x / s) + z, qmin, qmax) - z)


def fake_quantize_dynamic(x: torch.Tensor, n_bits: int = 8, scheme: Scheme = "absmax") -> torch.Tensor:
    """Dynamic per-token fake quantization: the scale is recomputed from each token at run time.

    Same as :func:`quantlab.granularity.fake_quantize_per_token`, named here for the static/dynamic
    comparison.

    Args:
        x: ``(..., tokens, features)`` activations.
        n_bits: bits per code.
        scheme: ``"absmax"`` (default) or ``"affine"`` / ``"minmax"``.

    Returns:
        Tensor like ``x``.
    """
    return fake_quantize_per_token(x, n_bits, scheme)


class StaticActivationQuantizer:
    """Calibrate an activation range once, then quantize every later input with the frozen scale.

    Usage: call :meth:`observe` on calibration batches, :meth:`freeze` once, then call the object.
    The range estimator is a :class:`MinMaxObserver` (running min/max or EMA) or, with ``percentile``,
    the percentile of all calibration values (kept in memory until :meth:`freeze`).

    Args:
        n_bits: bits per code (8 for W8A8).
        scheme: ``"absmax"`` (symmetric, SmoothQuant) or ``"affine"`` / ``"minmax"``.
        axis: None for a per-tensor scale, ``-1`` for one scale per feature.
        averaging_constant: EMA constant for the observer (None: running min/max).
        percentile: if given (e.g. 99.99), use :func:`percentile_range` on the calibration data.

    >>> q = StaticActivationQuantizer(n_bits=8)
    >>> q.observe(torch.tensor([[-2.0, 1.0], [0.5, 1.5]]))
    >>> q.freeze()
    >>> q(torch.tensor([[1.0, 4.0]]))  # 4.0 lies outside the calibrated range [-2, 2]: it clips
    tensor([[1.0079, 2.0000]])
    """

    def __init__(
        self,
        n_bits: int = 8,
        scheme: Scheme = "absmax",
        axis: int | None = None,
        averaging_constant: float | None = None,
        percentile: float | None = None,
    ) -> None:
        self.n_bits = check_n_bits(n_bits)
        scheme_qrange(scheme, self.n_bits)  # validates the scheme / bit width pair
        if axis not in (None, -1):
            raise ValueError(
                f"axis must be None (per-tensor) or -1 (per-feature) for activations, got {axis!r}"
            )
        self.scheme = scheme
        self.axis = axis
        self.percentile = percentile
        self.observer = MinMaxObserver(axis, averaging_constant)
        self._samples: list[torch.Tensor] = []
        self.scale: torch.Tensor | None = None
        self.zero_point: torch.Tensor | None = None

    def observe(self, x: torch.Tensor) -> None:
        """Record one calibration batch ``(..., features)``."""
        if self.scale is not None:
            raise RuntimeError("the quantizer is frozen; create a new one to recalibrate")
        self.observer.update(x)
        if self.percentile is not None:
            rows = x.detach().reshape(-1, x.shape[-1])  # (tokens_total, features)
            self._samples.append(rows if self.axis is not None else rows.reshape(-1))

    def freeze(self) -> None:
        """Turn the observed range into a fixed ``(scale, zero_point)``."""
        if self.percentile is None:
            xmin, xmax = self.observer.range()
        else:
            if not self._samples:
                raise RuntimeError("freeze() needs at least one observe(x) call first")
            data = torch.cat(self._samples)
            xmin, xmax = percentile_range(data, self.percentile, axis=None if self.axis is None else -1)
            self._samples = []
        self.scale, self.zero_point = params_from_range(xmin, xmax, self.n_bits, self.scheme)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """Fake quantize ``x`` with the frozen parameters."""
        if self.scale is None or self.zero_point is None:
            raise RuntimeError("call freeze() after observing calibration data before quantizing")
        return fake_quantize_static(x, self.scale, self.zero_point, self.n_bits, self.scheme)
