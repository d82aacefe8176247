"""Activation outliers and LLM.int8(): find the few huge feature columns, keep them in 16 bits.

Transformer activations ``X`` (tokens, features) have a handful of *outlier feature columns* whose
magnitude is 10-100x the rest. An absmax int8 quantizer scales every row by its largest value, so one
outlier flattens all the other features of that token to a few codes. LLM.int8() keeps the int8
matmul for almost everything and routes the outlier columns through a small 16-bit matmul::

    X W^T  =  X[:, O] W[:, O]^T            (16-bit, |O| columns, usually < 1%)
           +  s_X s_W^T / 127^2 * (X_i8 W_i8^T)     (int8 codes, int32 accumulation)

This module has three layers, top to bottom:

1. Activation statistics per channel (max |x|, mean |x|, percentiles, kurtosis), for one tensor or
   streamed over calibration batches through forward hooks on a model's ``nn.Linear`` inputs
   (:class:`LinearInputHooks` is a context manager that always removes its hooks).
2. Outlier detection: columns with any ``|x| >= threshold`` (LLM.int8()'s rule) or channels whose
   max |x| is a large multiple of the median channel's.
3. LLM.int8() itself, reproducing bitsandbytes' ``MatMul8bitLt`` inference path number for number
   (:func:`int8_vectorwise_quantize`, :func:`int8_matmul_with_outliers`, :class:`LLMInt8Linear`), and
   a cost model of the decomposition.

Exact semantics (bitsandbytes, ``int8_vectorwise_quant`` / ``int8_mixed_scaled_mm``):

* Quantization sees ``A.to(float16)`` (and ``B.to(float16)``), whatever dtype you pass.
* A column is an outlier column iff some element has ``|a| >= threshold`` (comparison in float16).
  ``threshold = 0`` turns the decomposition off (plain vector-wise int8); ``threshold = inf`` finds no
  outliers, so it gives the same result.
* Each row's absmax ``m`` ignores the outlier *elements* (the other elements of an outlier column
  still count). Codes are ``rint(float32(a) * float32(127 / m))`` (half-to-even, a multiplication by
  the reciprocal, computed in float32) and the outlier columns' codes are set to 0. A row with
  ``m = 0`` (all zero, or all its non-zero values are outliers) gets ``m = 0`` and codes 0, which is
  what bitsandbytes' kernels produce.
* The int32 product is rescaled by ``m_A m_B * float32(1/127^2)`` in float32 (``int8_mm_dequant``),
  a bias is added in float32, and the result is cast to ``A``'s dtype.
* The outlier columns of ``A`` (in ``A``'s own dtype) multiply the *int8-dequantized* weight columns
  ``codes * m_B * float32(1/127)`` (cast to ``A``'s dtype) and are added to the int8 part.

References:
    Dettmers et al., "LLM.int8(): 8-bit Matrix Multiplication for Transformers at Scale", NeurIPS 2022
    (Sec. 3.1 vector-wise quantization, Sec. 3.2 mixed-precision decomposition, Sec. 4 outliers).
    bitsandbytes, ``bitsandbytes/functional.py`` (``int8_vectorwise_quant``), ``backends/default/ops.py``
    (``int8_mixed_scaled_mm``, ``int8_mm_dequant``) and ``csrc`` (``kInt8VectorQuant``).
    Bondarenko et al., "Quantizable Transformers: Removing Outliers by Helping Attention Heads Do
    Nothing", NeurIPS 2023 (kurtosis as an outlier measure).
"""

from __future__ import annotations

import fnmatch
import math
import numbers
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn as nn

from quantlab._checks import check_float_tensor, check_int

__all__ = [
    "INT8_MAX",
    "ChannelStats",
    "Int8Decomposition",
    "Int8MatmulCost",
    "Int8Vectorwise",
    "LLMInt8Linear",
    "LinearInputHooks",
    "RunningChannelStats",
    "channel_stats",
    "collect_channel_stats",
    "convert_linears_llm_int8",
    "find_outlier_channels",
    "int8_matmul_cost",
    "int8_matmul_with_outliers",
    "int8_mm_dequant",
    "int8_vectorwise_dequantize",
    "int8_vectorwise_quantize",
    "outlier_columns",
    "replace_linears",
    "run_batches",
]

INT8_MAX = 127  # the restricted absmax grid is [-127, 127] (LLM.int8(), Eq. 1)


# -----------------------------------------------------------------------------
# Small input checks specific to this module


def _check_threshold(threshold: object, name: str = "threshold") -> float:
    """A real number >= 0; ``inf`` is allowed (it means "no outliers"), NaN and negatives are not."""
    if isinstance(threshold, bool) or not isinstance(threshold, numbers.Real):
        raise TypeError(f"{name} must be a real number >= 0 (0 = off, inf allowed), got {threshold!r}")
    value = float(threshold)
    if math.isnan(value) or value < 0:
        raise ValueError(f"{name} must be a number >= 0 (0 turns the decomposition off), got {value}")
    return value


def _check_percentiles(percentiles: Iterable[float]) -> tuple[float, ...]:
    out = []
    for q in percentiles:
        if isinstance(q, bool) or not isinstance(q, numbers.Real) or not 0.0 <= float(q) <= 100.0:
            raise ValueError(f"percentiles must be numbers in [0, 100], got {q!r}")
        out.append(float(q))
    return tuple(out)


def _as_2d(x: torch.Tensor, name: str) -> torch.Tensor:
    """Flatten ``(..., features)`` to ``(tokens, features)``."""
    check_float_tensor(x, name)
    if x.ndim < 1:
        raise ValueError(f"{name} must have a feature dimension, got a 0-d tensor")
    return x.reshape(-1, x.shape[-1])  # (tokens, features)


# -----------------------------------------------------------------------------
# Per-channel activation statistics


@dataclass(frozen=True, eq=False)  # holds tensors: compare fields explicitly
class ChannelStats:
    """Statistics of each feature channel (column) of an activation matrix, all float32 ``(features,)``.

    Attributes:
        n_tokens: how many rows (tokens) the statistics summarize.
        absmax: ``max |x_j|``, SmoothQuant's activation scale.
        mean_abs: ``mean |x_j|``.
        mean: ``mean x_j``.
        std: population standard deviation of ``x_j``.
        kurtosis: ``m4 / m2^2`` of ``x_j`` (minus 3 when ``excess``); NaN for a constant channel,
            where it is undefined (as in ``scipy.stats.kurtosis``).
        excess: whether ``kurtosis`` is the excess kurtosis (a Gaussian has 0, else 3).
        percentiles: ``{q: q-th percentile of |x_j|}`` (linear interpolation, numpy's default).
    """

    n_tokens: int
    absmax: torch.Tensor
    mean_abs: torch.Tensor
    mean: torch.Tensor
    std: torch.Tensor
    kurtosis: torch.Tensor
    excess: bool
    percentiles: dict[float, torch.Tensor]

    def outliers(self, threshold: float | None = None, ratio: float | None = None) -> torch.Tensor:
        """Outlier channels by ``absmax``; see :func:`find_outlier_channels`."""
        return find_outlier_channels(self.absmax, threshold=threshold, ratio=ratio)


def _percentiles_of_sorted(sorted_abs: torch.Tensor, qs: Sequence[float]) -> dict[float, torch.Tensor]:
    """numpy's "linear" percentile of each column of an already sorted ``(n, features)`` tensor."""
    n = sorted_abs.shape[0]
    out = {}
    for q in qs:
        pos = q / 100.0 * (n - 1)
        lo = int(math.floor(pos))
        hi = min(lo + 1, n - 1)
        frac = pos - lo
        v = sorted_abs[lo] + frac * (sorted_abs[hi] - sorted_abs[lo])  # (features,)
        out[q] = v.float()
    return out


class RunningChannelStats:
    """Per-channel statistics accumulated over many batches without keeping them.

    Mean and central moments 2..4 are merged batch by batch with the pairwise update formulas of
    Chan et al. and Pébay (exact in float64, stable when the mean is large), so the kurtosis of a
    whole calibration set is the same as if all tokens were concatenated. Percentiles need the values
    themselves: only the first ``max_tokens`` tokens are kept for them.

    Args:
        percentiles: which percentiles of ``|x|`` to report (numbers in [0, 100]); empty = none.
        max_tokens: how many tokens to keep for the percentiles (ignored without percentiles).
        excess: report the excess kurtosis (Gaussian = 0) instead of Pearson's (Gaussian = 3).
    """

    def __init__(
        self, percentiles: Iterable[float] = (), max_tokens: int = 8192, excess: bool = True
    ) -> None:
        self.percentiles = _check_percentiles(percentiles)
        self.max_tokens = check_int(max_tokens, "max_tokens")
        if self.max_tokens <= 0:
            raise ValueError(f"max_tokens must be a positive int, got {self.max_tokens}")
        self.excess = bool(excess)
        self.n = 0
        self._features: int | None = None
        self._absmax = self._sum_abs = self._mean = None
        self._m2 = self._m3 = self._m4 = None
        self._kept: list[torch.Tensor] = []
        self._n_kept = 0

    @torch.no_grad()
    def update(self, x: torch.Tensor) -> None:
        """Add a batch of activations ``x`` of shape ``(..., features)``."""
        x = _as_2d(x, "x").detach().to(dtype=torch.float64, device="cpu")  # (tokens, features)
        nb, features = x.shape
        if self._features is None:
            self._features = features
        elif features != self._features:
            raise ValueError(f"x has {features} features but earlier batches had {self._features}")
        absx = x.abs()
        mean_b = x.mean(dim=0)  # (features,)
        d = x - mean_b
        d2 = d * d
        m2_b, m3_b, m4_b = d2.sum(dim=0), (d2 * d).sum(dim=0), (d2 * d2).sum(dim=0)
        if self.n == 0:
            self._absmax, self._sum_abs = absx.amax(dim=0), absx.sum(dim=0)
            self._mean, self._m2, self._m3, self._m4 = mean_b, m2_b, m3_b, m4_b
        else:
            na, n = float(self.n), float(self.n + nb)
            delta = mean_b - self._mean
            m2_a, m3_a, m4_a = self._m2, self._m3, self._m4
            self._m4 = (
                m4_a
                + m4_b
                + delta**4 * na * nb * (na * na - na * nb + nb * nb) / n**3
                + 6.0 * delta**2 * (na * na * m2_b + nb * nb * m2_a) / n**2
                + 4.0 * delta * (na * m3_b - nb * m3_a) / n
            )
            self._m3 = (
                m3_a
                + m3_b
                + delta**3 * na * nb * (na - nb) / n**2
                + 3.0 * delta * (na * m2_b - nb * m2_a) / n
            )
            self._m2 = m2_a + m2_b + delta**2 * na * nb / n
            self._mean = self._mean + delta * nb / n
            self._absmax = torch.maximum(self._absmax, absx.amax(dim=0))
            self._sum_abs = self._sum_abs + absx.sum(dim=0)
        self.n += nb
        if self.percentiles and self._n_kept < self.max_tokens:
            take = absx[: self.max_tokens - self._n_kept]
            self._kept.append(take.float())
            self._n_kept += take.shape[0]

    def result(self) -> ChannelStats:
        """The statistics of everything seen so far."""
        if self.n == 0:
            raise ValueError("no activations were recorded; call update() (or run the model) first")
        n = float(self.n)
        var = self._m2 / n
        kurt = (n * self._m4) / (self._m2 * self._m2)  # NaN where the channel is constant (0/0)
        if self.excess:
            kurt = kurt - 3.0
        pct: dict[float, torch.Tensor] = {}
        if self.percentiles:
            kept = torch.cat(self._kept, dim=0).sort(dim=0).values  # (kept_tokens, features)
            pct = _percentiles_of_sorted(kept, self.percentiles)
        return ChannelStats(
            n_tokens=self.n,
            absmax=self._absmax.float(),
            mean_abs=(self._sum_abs / n).float(),
            mean=self._mean.float(),
            std=var.sqrt().float(),
            kurtosis=kurt.float(),
            excess=self.excess,
            percentiles=pct,
        )


def channel_stats(
    x: torch.Tensor, percentiles: Iterable[float] = (50.0, 99.0, 99.9), excess: bool = True
) -> ChannelStats:
    """Per-channel statistics of one activation tensor.

    Args:
        x: activations ``(..., features)``; every leading dim counts as tokens.
        percentiles: percentiles of ``|x|`` to report, numbers in [0, 100].
        excess: excess kurtosis (Gaussian 0) if True, Pearson's (Gaussian 3) if False.

    Returns:
        A :class:`ChannelStats` with ``(features,)`` float32 tensors.

    >>> s = channel_stats(torch.tensor([[1.0, -8.0], [-3.0, 2.0]]), percentiles=(50,))
    >>> s.absmax, s.mean_abs, s.percentiles[50.0]
    (tensor([3., 8.]), tensor([2., 5.]), tensor([2., 5.]))
    """
    x2 = _as_2d(x, "x")
    acc = RunningChannelStats(percentiles, max_tokens=max(1, x2.shape[0]), excess=excess)
    acc.update(x2)
    return acc.result()


# -----------------------------------------------------------------------------
# Forward hooks on nn.Linear inputs


class LinearInputHooks:
    """Context manager that shows a callback the input of every ``nn.Linear`` during forward passes.

    Hooks are registered on ``__enter__`` and always removed on ``__exit__``, even when the forward
    pass raises, so a model never keeps stray hooks.

    Args:
        model: the model to observe.
        callback: called as ``callback(name, module, x)`` with the detached input ``x`` (..., in).
        names: restrict to these module names (as in ``model.named_modules()``); default every
            ``nn.Linear``.
        module_types: which module classes count as linears.

    Example::

        with LinearInputHooks(model, lambda name, m, x: print(name, x.shape)):
            model(batch)
    """

    def __init__(
        self,
        model: nn.Module,
        callback: Callable[[str, nn.Module, torch.Tensor], None],
        names: Iterable[str] | None = None,
        module_types: tuple[type, ...] = (nn.Linear,),
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if not callable(callback):
            raise TypeError(f"callback must be callable, got {type(callback).__name__}")
        found = {n: m for n, m in model.named_modules() if isinstance(m, module_types)}
        if names is None:
            self.modules = found
        else:
            wanted = list(names)
            missing = [n for n in wanted if n not in found]
            if missing:
                shown = sorted(found)[:8]
                raise ValueError(f"names {missing} are not {module_types} modules of the model; e.g. {shown}")
            self.modules = {n: found[n] for n in wanted}
        self.callback = callback
        self._handles: list[torch.utils.hooks.RemovableHandle] = []

    def _make_hook(self, name: str) -> Callable:
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            x = args[0] if args else kwargs.get("input")
            if isinstance(x, torch.Tensor):
                self.callback(name, module, x.detach())

        return hook

    def __enter__(self) -> LinearInputHooks:
        try:
            for name, module in self.modules.items():
                handle = module.register_forward_pre_hook(self._make_hook(name), with_kwargs=True)
                self._handles.append(handle)
        except BaseException:
            self.remove()
            raise
        return self

    def remove(self) -> None:
        """Remove every hook this manager registered (idempotent)."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def __exit__(self, *exc_info: object) -> bool:
        self.remove()
        return False


@torch.no_grad()
def run_batches(model: nn.Module, batches: Iterable[object]) -> int:
    """Run ``model`` on each batch without gradients: ``model(b)``, ``model(*b)`` or ``model(**b)``.

    Args:
        model: the model (put it in ``eval()`` mode yourself; this function does not change it).
        batches: tensors (e.g. token ids ``(B, T)``), tuples of positional args or dicts of kwargs.

    Returns:
        The number of batches run.
    """
    count = 0
    for batch in batches:
        if isinstance(batch, dict):
            model(**batch)
        elif isinstance(batch, (tuple, list)):
            model(*batch)
        else:
            model(batch)
        count += 1
    if count == 0:
        raise ValueError("batches is empty; pass at least one calibration batch")
    return count


def collect_channel_stats(
    model: nn.Module,
    batches: Iterable[object],
    names: Iterable[str] | None = None,
    percentiles: Iterable[float] = (),
    max_tokens: int = 8192,
    excess: bool = True,
) -> dict[str, ChannelStats]:
    """Per-channel statistics of every ``nn.Linear`` input over calibration batches.

    Args:
        model: the model; its linears' inputs are observed with :class:`LinearInputHooks`.
        batches: calibration inputs, see :func:`run_batches`.
        names: restrict to these linear names; default all.
        percentiles: percentiles of ``|x|`` to report (computed on the first ``max_tokens`` tokens
            each linear sees; the other statistics use every token).
        max_tokens: tokens kept per linear for the percentiles.
        excess: excess kurtosis (Gaussian 0) if True.

    Returns:
        ``{linear name: ChannelStats}`` for the linears that received input.
    """
    accs: dict[str, RunningChannelStats] = {}

    def record(name: str, module: nn.Module, x: torch.Tensor) -> None:
        if name not in accs:
            accs[name] = RunningChannelStats(percentiles, max_tokens=max_tokens, excess=excess)
        accs[name].update(x)

    _check_percentiles(percentiles)
    with LinearInputHooks(model, record, names=names):
        run_batches(model, batches)
    return {name: acc.result() for name, acc in accs.items()}


# -----------------------------------------------------------------------------
# Outlier detection


def find_outlier_channels(
    absmax: torch.Tensor, threshold: float | None = None, ratio: float | None = None
) -> torch.Tensor:
    """Indices of outlier channels from their max |x|, by an absolute or a relative rule.

    Exactly one of ``threshold`` and ``ratio`` must be given:

    * ``threshold``: channels with ``absmax >= threshold`` (LLM.int8() uses 6.0, Sec. 3.2);
    * ``ratio``: channels with ``absmax >= ratio * median(absmax)`` (``torch.median``, the lower
      median for an even count, i.e. an actual channel's value).

    Args:
        absmax: ``(features,)`` max |x| per channel (e.g. :attr:`ChannelStats.absmax`).
        threshold: absolute magnitude, >= 0.
        ratio: multiple of the median channel, > 0.

    Returns:
        Sorted int64 indices ``(n_outliers,)``.

    >>> find_outlier_channels(torch.tensor([1.0, 9.0, 0.5, 1.2]), ratio=5.0)
    tensor([1])
    """
    check_float_tensor(absmax, "absmax", ndim=1)
    if bool((absmax < 0).any()):
        raise ValueError("absmax must be >= 0 everywhere (it is a maximum of |x|)")
    if (threshold is None) == (ratio is None):
        raise ValueError(f"give exactly one of threshold and ratio, got threshold={threshold}, ratio={ratio}")
    if threshold is not None:
        bound = _check_threshold(threshold)
    else:
        if isinstance(ratio, bool) or not isinstance(ratio, numbers.Real) or not float(ratio) > 0:
            raise ValueError(f"ratio must be a number > 0, got {ratio!r}")
        if math.isinf(float(ratio)):
            raise ValueError("ratio must be finite")
        bound = float(ratio) * float(absmax.median())
    return torch.nonzero(absmax >= bound).flatten()


def outlier_columns(A: torch.Tensor, threshold: float) -> torch.Tensor:
    """LLM.int8()'s outlier columns: columns of ``A`` with at least one ``|a| >= threshold``.

    The comparison is done in ``A``'s dtype, exactly as bitsandbytes writes it (``A.abs() >= t``); pass
    ``A.half()`` to get the columns :func:`int8_matmul_with_outliers` uses. ``threshold = 0`` means
    "decomposition off" in bitsandbytes and returns no columns.

    Args:
        A: activations ``(tokens, features)``.
        threshold: >= 0 (``inf`` allowed).

    Returns:
        Sorted int64 column indices ``(n_outliers,)``.

    >>> outlier_columns(torch.tensor([[0.1, 7.0, -6.0], [0.2, 0.3, 1.0]]), 6.0)
    tensor([1, 2])
    """
    check_float_tensor(A, "A", ndim=2)
    t = _check_threshold(threshold)
    if t == 0.0:
        return torch.zeros(0, dtype=torch.int64, device=A.device)
    return torch.nonzero((A.abs() >= t).any(dim=0)).flatten()


# -----------------------------------------------------------------------------
# Vector-wise int8 quantization (bitsandbytes' int8_vectorwise_quant)


class Int8Vectorwise(NamedTuple):
    """Result of :func:`int8_vectorwise_quantize`; unpacks like bitsandbytes' triple.

    Attributes:
        codes: int8 codes, same shape as the input, in ``[-127, 127]``.
        absmax: float32 absmax of each row (``dim=-1``) or column (``dim=0``), 1-D (bitsandbytes'
            ``row_stats``); the quantization scale is ``absmax / 127``.
        outlier_cols: sorted int64 indices of the outlier columns (empty when none or threshold 0;
            bitsandbytes returns ``None`` for threshold 0).
    """

    codes: torch.Tensor
    absmax: torch.Tensor
    outlier_cols: torch.Tensor

    @property
    def scale(self) -> torch.Tensor:
        """The quantization step ``absmax / 127``."""
        return self.absmax / INT8_MAX


def _rowwise_int8(x16: torch.Tensor, threshold: float) -> Int8Vectorwise:
    """Row-wise LLM.int8() quantization of a float16 ``(rows, cols)`` matrix (bitsandbytes' semantics)."""
    absx = x16.abs()
    if threshold > 0.0:
        mask = absx >= threshold  # compared in float16, as bitsandbytes does
        cols = torch.nonzero(mask.any(dim=0)).flatten()
        absx = absx.masked_fill(mask, 0.0)  # outlier elements do not count towards the row's absmax
    else:
        cols = torch.zeros(0, dtype=torch.int64, device=x16.device)
    absmax = absx.amax(dim=1).float()  # (rows,)
    # The reciprocal 127/m in float32, then a float32 multiply and rint: bitsandbytes' exact formula.
    # A row with m = 0 would give 0 * inf = NaN; its codes are 0, as the CUDA kernel's cvt gives.
    safe = torch.where(absmax > 0, absmax, torch.ones_like(absmax))
    codes = torch.round(x16.float() * (127.0 / safe).unsqueeze(1))  # (rows, cols)
    codes = torch.where((absmax > 0).unsqueeze(1), codes, torch.zeros_like(codes))
    if cols.numel():
        codes[:, cols] = 0.0  # the outlier columns go through the 16-bit path instead
    return Int8Vectorwise(codes.to(torch.int8), absmax, cols)


def _to_half(x: torch.Tensor, name: str) -> torch.Tensor:
    x16 = x.to(torch.float16)
    if not bool(torch.isfinite(x16).all()):
        raise ValueError(
            f"{name} has values beyond the float16 range (|x| > 65504); LLM.int8() quantizes float16 inputs"
        )
    return x16


def int8_vectorwise_quantize(x: torch.Tensor, dim: int = -1, threshold: float = 0.0) -> Int8Vectorwise:
    """LLM.int8()'s vector-wise absmax quantization of a matrix to int8 (Sec. 3.1; Eq. 1 per vector).

    The input is first cast to float16, as bitsandbytes requires. Along ``dim=-1`` (one scale per row,
    e.g. per token of ``A`` or per output row of an ``nn.Linear`` weight), this is bitsandbytes'
    ``int8_vectorwise_quant(x.half(), threshold)`` exactly: ``code = rint(x * (127 / absmax))`` with the
    outlier handling described in the module docstring. ``dim=0`` quantizes each column with the same
    formula (bitsandbytes' column-wise path in ``int8_double_quant``, used only for its backward pass,
    rounds ``127 * x`` to float16 first and may differ on near-ties).

    Args:
        x: ``(rows, cols)`` float tensor.
        dim: -1 (or 1) for one scale per row, 0 (or -2) for one per column.
        threshold: outlier threshold for ``dim=-1``; 0 = no outlier handling.

    Returns:
        :class:`Int8Vectorwise` ``(codes, absmax, outlier_cols)``.

    >>> q = int8_vectorwise_quantize(torch.tensor([[1.0, -0.5, 0.25]]))
    >>> q.codes, q.absmax
    (tensor([[127, -64,  32]], dtype=torch.int8), tensor([1.]))
    """
    check_float_tensor(x, "x", ndim=2)
    dim = check_int(dim, "dim")
    t = _check_threshold(threshold)
    x16 = _to_half(x, "x")
    if dim in (-1, 1):
        return _rowwise_int8(x16, t)
    if dim in (0, -2):
        if t != 0.0:
            raise ValueError(f"threshold applies to row-wise quantization (dim=-1) only, got dim={dim}")
        q = _rowwise_int8(x16.t(), 0.0)
        return Int8Vectorwise(q.codes.t().contiguous(), q.absmax, q.outlier_cols)
    raise ValueError(f"dim must be -1/1 (per row) or 0/-2 (per column) for a 2-D tensor, got {dim}")


def int8_vectorwise_dequantize(codes: torch.Tensor, absmax: torch.Tensor) -> torch.Tensor:
    """Row-wise dequantization ``codes * absmax / 127`` in float32 (``int8_vectorwise_dequant``).

    Computed as ``(codes * absmax) * float32(1/127)``, the reference's order of operations.

    Args:
        codes: int8 ``(rows, cols)``.
        absmax: ``(rows,)`` row absmax.

    Returns:
        float32 ``(rows, cols)``.
    """
    if not isinstance(codes, torch.Tensor) or codes.dtype != torch.int8 or codes.ndim != 2:
        raise TypeError(f"codes must be a 2-D int8 tensor, got {getattr(codes, 'dtype', type(codes))}")
    check_float_tensor(absmax, "absmax", ndim=1)
    if absmax.shape[0] != codes.shape[0]:
        raise ValueError(f"absmax has {absmax.shape[0]} entries but codes has {codes.shape[0]} rows")
    return codes.float() * absmax.float().unsqueeze(1) * (1.0 / INT8_MAX)


def int8_mm_dequant(
    acc: torch.Tensor,
    row_absmax: torch.Tensor,
    col_absmax: torch.Tensor,
    bias: torch.Tensor | None = None,
    dtype: torch.dtype = torch.float16,
) -> torch.Tensor:
    """Rescale an int32 product of two vector-wise int8 matrices back to real values (Sec. 3.1).

    ``out[i, j] = acc[i, j] * (m_A[i] * m_B[j]) * float32(1/127^2) (+ bias[j])`` in float32, then cast
    to ``dtype``: bitsandbytes' ``int8_mm_dequant``. (Its CUDA kernel uses the same float32 constant,
    6.200012e-05; the pure-PyTorch fallback writes 6.200124e-05, a typo 1.8e-5 relative away.)

    Args:
        acc: int32 ``(tokens, out)`` = ``A_codes @ B_codes.T``.
        row_absmax: ``(tokens,)`` absmax of ``A``'s rows.
        col_absmax: ``(out,)`` absmax of ``B``'s rows (the output columns).
        bias: optional ``(out,)``.
        dtype: output dtype.

    Returns:
        ``(tokens, out)`` in ``dtype``.
    """
    if not isinstance(acc, torch.Tensor) or acc.dtype != torch.int32 or acc.ndim != 2:
        raise TypeError(f"acc must be a 2-D int32 tensor, got {getattr(acc, 'dtype', type(acc))}")
    if row_absmax.shape != (acc.shape[0],) or col_absmax.shape != (acc.shape[1],):
        raise ValueError(
            f"row_absmax {tuple(row_absmax.shape)} and col_absmax {tuple(col_absmax.shape)} must be "
            f"({acc.shape[0]},) and ({acc.shape[1]},) for acc of shape {tuple(acc.shape)}"
        )
    inv = torch.tensor(1.0 / INT8_MAX**2, dtype=torch.float32)  # 6.200012e-05 in float32
    out = acc.float() * (row_absmax.float().unsqueeze(1) * col_absmax.float().unsqueeze(0)) * inv
    if bias is not None:
        out = out + bias.float()
    return out.to(dtype)


def _int8_matmul_exact(a_codes: torch.Tensor, b_codes: torch.Tensor) -> torch.Tensor:
    """``a_codes @ b_codes.T`` accumulated exactly, returned as int32.

    float64 holds every partial sum exactly (|sum| <= 127^2 * k < 2^53), so a BLAS float64 matmul gives
    the same integers as an int32 accumulator, much faster on a CPU.
    """
    return (a_codes.double() @ b_codes.double().t()).to(torch.int32)  # (tokens, out)


# -----------------------------------------------------------------------------
# LLM.int8(): vector-wise int8 matmul with mixed-precision decomposition


@dataclass(frozen=True)
class Int8MatmulCost:
    """Memory and arithmetic of one LLM.int8() matmul ``(tokens, in) x (out, in)^T``.

    Counts are idealized: the int8 part is counted over the ``in - n_outlier_cols`` regular columns
    (bitsandbytes' kernel multiplies the zeroed outlier columns too), a multiply-add is 2 ops.

    Attributes:
        tokens, in_features, out_features, n_outlier_cols: the problem.
        int8_ops: integer ops of the int8 matmul, ``2 * tokens * (in - n) * out``.
        fp16_ops: floating-point ops of the outlier matmul, ``2 * tokens * n * out``.
        rescale_ops: floating-point ops to rescale and combine, ``3 * tokens * out`` (+ ``tokens * out``
            to add the outlier part when ``n > 0``).
        weight_bytes: int8 weight codes plus float32 row absmax, ``out * in + 4 * out``.
        weight_bytes_fp16: the float16 weight it replaces, ``2 * out * in``.
        activation_bytes: int8 activation codes, float32 row absmax and the float16 outlier columns
            of ``A`` and (dequantized) of ``W``: ``tokens * in + 4 * tokens + 2 * n * (tokens + out)``.
    """

    tokens: int
    in_features: int
    out_features: int
    n_outlier_cols: int
    int8_ops: int
    fp16_ops: int
    rescale_ops: int
    weight_bytes: int
    weight_bytes_fp16: int
    activation_bytes: int

    @property
    def fp16_fraction(self) -> float:
        """Fraction of the inner dimension computed in 16 bits, ``n / in``."""
        return self.n_outlier_cols / self.in_features

    @property
    def weight_compression(self) -> float:
        """``weight_bytes_fp16 / weight_bytes`` (a bit under 2)."""
        return self.weight_bytes_fp16 / self.weight_bytes


def int8_matmul_cost(tokens: int, in_features: int, out_features: int, n_outlier_cols: int) -> Int8MatmulCost:
    """Bytes and ops of an LLM.int8() matmul with ``n_outlier_cols`` columns in 16 bits.

    Args:
        tokens, in_features, out_features: the shapes ``A (tokens, in)``, ``W (out, in)``.
        n_outlier_cols: how many input columns go to the float16 matmul (0..in_features).

    Returns:
        An :class:`Int8MatmulCost`.

    >>> int8_matmul_cost(1, 100, 10, 2).fp16_fraction
    0.02
    """
    tokens = check_int(tokens, "tokens")
    fin = check_int(in_features, "in_features")
    fout = check_int(out_features, "out_features")
    n = check_int(n_outlier_cols, "n_outlier_cols")
    for value, name in ((tokens, "tokens"), (fin, "in_features"), (fout, "out_features")):
        if value <= 0:
            raise ValueError(f"{name} must be a positive int, got {value}")
    if not 0 <= n <= fin:
        raise ValueError(f"n_outlier_cols must be in [0, in_features={fin}], got {n}")
    return Int8MatmulCost(
        tokens=tokens,
        in_features=fin,
        out_features=fout,
        n_outlier_cols=n,
        int8_ops=2 * tokens * (fin - n) * fout,
        fp16_ops=2 * tokens * n * fout,
        rescale_ops=3 * tokens * fout + (tokens * fout if n else 0),
        weight_bytes=fout * fin + 4 * fout,
        weight_bytes_fp16=2 * fout * fin,
        activation_bytes=tokens * fin + 4 * tokens + 2 * n * (tokens + fout),
    )


@dataclass(frozen=True, eq=False)  # holds tensors: compare fields explicitly
class Int8Decomposition:
    """Every intermediate of one LLM.int8() matmul, for a lab to show.

    Names follow bitsandbytes in parentheses. ``tokens`` is the flattened number of rows of ``A``.

    Attributes:
        threshold: the outlier threshold used (0 = decomposition off).
        outlier_cols: sorted int64 ``(n,)`` outlier column indices (``outlier_cols``).
        A_codes: int8 ``(tokens, in)``, outlier columns zeroed (``CA``).
        A_absmax: float32 ``(tokens,)`` row absmax without the outliers (``SCA``).
        B_codes: int8 ``(out, in)`` weight codes (``CB``).
        B_absmax: float32 ``(out,)`` weight row absmax (``SCB``).
        A_outlier: ``(tokens, n)`` outlier columns of ``A`` in ``A``'s dtype (``subA``).
        B_outlier: ``(out, n)`` int8-dequantized weight columns in ``A``'s dtype (``subB.T``).
        int8_output: ``(tokens, out)`` rescaled int8 product (+ bias) in ``A``'s dtype.
    """

    threshold: float
    outlier_cols: torch.Tensor
    A_codes: torch.Tensor
    A_absmax: torch.Tensor
    B_codes: torch.Tensor
    B_absmax: torch.Tensor
    A_outlier: torch.Tensor
    B_outlier: torch.Tensor
    int8_output: torch.Tensor

    @property
    def n_outliers(self) -> int:
        """Number of outlier columns."""
        return int(self.outlier_cols.numel())

    @property
    def A_scale(self) -> torch.Tensor:
        """Quantization step of each row of ``A``, ``A_absmax / 127``."""
        return self.A_absmax / INT8_MAX

    @property
    def B_scale(self) -> torch.Tensor:
        """Quantization step of each weight row, ``B_absmax / 127``."""
        return self.B_absmax / INT8_MAX

    @property
    def outlier_output(self) -> torch.Tensor:
        """The 16-bit part ``A_outlier @ B_outlier.T`` in float32, ``(tokens, out)``."""
        return self.A_outlier.float() @ self.B_outlier.float().t()

    def cost(self) -> Int8MatmulCost:
        """The :func:`int8_matmul_cost` of this matmul."""
        tokens, fin = self.A_codes.shape
        return int8_matmul_cost(tokens, fin, self.B_codes.shape[0], self.n_outliers)


def _llm_int8_forward(
    A2: torch.Tensor,
    B_codes: torch.Tensor,
    B_absmax: torch.Tensor,
    threshold: float,
    bias: torch.Tensor | None,
) -> tuple[torch.Tensor, Int8Decomposition]:
    """The decomposition for a 2-D ``A`` and an already quantized weight (``MatMul8bitLt.forward``)."""
    dtype = A2.dtype
    qa = _rowwise_int8(_to_half(A2, "A"), threshold)
    acc = _int8_matmul_exact(qa.codes, B_codes)  # (tokens, out) int32
    int8_out = int8_mm_dequant(acc, qa.absmax, B_absmax, bias=bias, dtype=dtype)  # (tokens, out)
    cols = qa.outlier_cols
    A_out = A2[:, cols]  # (tokens, n) in A's own dtype, as bitsandbytes' subA
    B_out = int8_vectorwise_dequantize(B_codes[:, cols], B_absmax).to(dtype)  # (out, n)
    if cols.numel():
        # addmm in A's dtype: accumulate in (at least) float32, round once (cuBLAS' fp16 addmm does so).
        acc_dtype = torch.promote_types(dtype, torch.float32)
        out = (int8_out.to(acc_dtype) + A_out.to(acc_dtype) @ B_out.to(acc_dtype).t()).to(dtype)
    else:
        out = int8_out
    dec = Int8Decomposition(
        threshold=threshold,
        outlier_cols=cols,
        A_codes=qa.codes,
        A_absmax=qa.absmax,
        B_codes=B_codes,
        B_absmax=B_absmax,
        A_outlier=A_out,
        B_outlier=B_out,
        int8_output=int8_out,
    )
    return out, dec


def _check_bias(bias: torch.Tensor | None, out_features: int) -> None:
    if bias is None:
        return
    check_float_tensor(bias, "bias", ndim=1)
    if bias.shape[0] != out_features:
        raise ValueError(f"bias must have shape ({out_features},), got {tuple(bias.shape)}")


def int8_matmul_with_outliers(
    A: torch.Tensor, B: torch.Tensor, threshold: float = 6.0, bias: torch.Tensor | None = None
) -> tuple[torch.Tensor, Int8Decomposition]:
    """LLM.int8(): ``A @ B.T`` with vector-wise int8 and the outlier columns in 16 bits (Sec. 3.2).

    Reproduces bitsandbytes' ``MatMul8bitLt`` inference forward (weights quantized row-wise with
    ``int8_vectorwise_quant(B.half())``, activations with ``int8_vectorwise_quant(A.half(), threshold)``,
    then ``int8_mixed_scaled_mm``); see the module docstring for every rounding step.

    * Quantization sees ``A`` and ``B`` cast to float16 (values beyond +-65504 raise ``ValueError``).
    * The outlier columns of ``A`` are used in ``A``'s own dtype and the output has ``A``'s dtype, as in
      bitsandbytes; pass float16 ``A`` for the all-float16 pipeline of the paper.
    * ``threshold = 0`` turns the decomposition off (plain vector-wise int8); ``threshold = inf`` finds
      no outlier columns and gives the same result.

    Args:
        A: activations ``(..., in)`` (``(tokens, in)`` after flattening the leading dims).
        B: weight ``(out, in)`` (``nn.Linear`` convention: output = ``A @ B.T``).
        threshold: outlier magnitude, >= 0; 6.0 is the paper's and bitsandbytes' default.
        bias: optional ``(out,)``, added in float32 to the int8 part (as the fused kernel does).

    Returns:
        ``(output, decomposition)``: output ``(..., out)`` in ``A``'s dtype, and an
        :class:`Int8Decomposition` with 2-D ``(tokens, ...)`` intermediates.
    """
    check_float_tensor(A, "A")
    check_float_tensor(B, "B", ndim=2)
    if A.ndim < 1 or A.shape[-1] != B.shape[1]:
        raise ValueError(
            f"A's last dim must equal B's in_features: A {tuple(A.shape)}, B {tuple(B.shape)} (out, in)"
        )
    t = _check_threshold(threshold)
    _check_bias(bias, B.shape[0])
    qb = _rowwise_int8(_to_half(B, "B"), 0.0)
    A2 = A.reshape(-1, A.shape[-1])  # (tokens, in)
    out, dec = _llm_int8_forward(A2, qb.codes, qb.absmax, t, bias)
    return out.reshape(*A.shape[:-1], B.shape[0]), dec  # (..., out)


# -----------------------------------------------------------------------------
# Module wrapper and model conversion


class LLMInt8Linear(nn.Module):
    """An ``nn.Linear`` replacement that runs :func:`int8_matmul_with_outliers` (inference only).

    The weight is quantized once to int8 codes plus a float32 absmax per output row (buffers
    ``weight_codes`` and ``weight_absmax``), like bitsandbytes' ``Linear8bitLt`` with
    ``has_fp16_weights=False``. After each forward, ``last_n_outliers`` holds how many input columns
    went through the 16-bit path.

    Args:
        weight: ``(out, in)`` float weight.
        bias: optional ``(out,)``.
        threshold: outlier threshold, >= 0 (0 = plain int8).
    """

    def __init__(
        self, weight: torch.Tensor, bias: torch.Tensor | None = None, threshold: float = 6.0
    ) -> None:
        super().__init__()
        check_float_tensor(weight, "weight", ndim=2)
        _check_bias(bias, weight.shape[0])
        self.threshold = _check_threshold(threshold)
        self.out_features, self.in_features = weight.shape
        q = _rowwise_int8(_to_half(weight.detach(), "weight"), 0.0)
        self.register_buffer("weight_codes", q.codes)
        self.register_buffer("weight_absmax", q.absmax)
        self.register_buffer("bias", None if bias is None else bias.detach().clone())
        self.last_n_outliers = 0

    @classmethod
    def from_linear(cls, linear: nn.Linear, threshold: float = 6.0) -> LLMInt8Linear:
        """Build from an ``nn.Linear`` (its weight is quantized, the module itself is untouched)."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"linear must be a torch.nn.Linear, got {type(linear).__name__}")
        return cls(linear.weight, linear.bias, threshold)

    def dequantized_weight(self) -> torch.Tensor:
        """The int8 weight as float32 ``(out, in)``."""
        return int8_vectorwise_dequantize(self.weight_codes, self.weight_absmax)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Args: x ``(..., in)``. Returns ``(..., out)`` in ``x``'s dtype."""
        check_float_tensor(x, "x")
        if x.shape[-1] != self.in_features:
            raise ValueError(f"x's last dim must be in_features={self.in_features}, got {tuple(x.shape)}")
        x2 = x.reshape(-1, self.in_features)  # (tokens, in)
        out, dec = _llm_int8_forward(x2, self.weight_codes, self.weight_absmax, self.threshold, self.bias)
        self.last_n_outliers = dec.n_outliers
        return out.reshape(*x.shape[:-1], self.out_features)  # (..., out)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, threshold={self.threshold}"


def _is_excluded(name: str, exclude: Sequence[str]) -> bool:
    return any(name == p or name.endswith("." + p) or fnmatch.fnmatchcase(name, p) for p in exclude)


def replace_linears(
    model: nn.Module,
    factory: Callable[[str, nn.Linear], nn.Module],
    exclude: Iterable[str] = ("lm_head",),
) -> list[str]:
    """Swap every ``nn.Linear`` of ``model`` (in place) for ``factory(name, linear)``.

    Args:
        model: the model to modify.
        factory: builds the replacement module from the qualified name and the linear.
        exclude: names to keep as they are; a pattern matches a module whose name equals it, ends
            with ``"." + pattern``, or matches it as an ``fnmatch`` glob (e.g. ``"*.mlp.*"``).

    Returns:
        The names of the replaced modules, in ``named_modules()`` order.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if isinstance(exclude, str):
        raise TypeError(
            f"exclude must be a collection of names, got the string {exclude!r}; use ({exclude!r},)"
        )
    patterns = list(exclude)
    targets = [
        (name, m)
        for name, m in model.named_modules()
        if isinstance(m, nn.Linear) and not _is_excluded(name, patterns)
    ]
    if any(name == "" for name, _ in targets):
        raise ValueError("model itself is an nn.Linear; wrap it in a container module to convert it")
    for name, linear in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, factory(name, linear))
    return [name for name, _ in targets]


def convert_linears_llm_int8(
    model: nn.Module, threshold: float = 6.0, exclude: Iterable[str] = ("lm_head",)
) -> list[str]:
    """Replace every ``nn.Linear`` (except ``exclude``) by an :class:`LLMInt8Linear`, in place.

    Args:
        model: the model to modify.
        threshold: outlier threshold for every layer.
        exclude: names (or globs) to keep in full precision, see :func:`replace_linears`.

    Returns:
        The names of the converted layers.
    """
    t = _check_threshold(threshold)
    return replace_linears(model, lambda name, lin: LLMInt8Linear.from_linear(lin, t), exclude)
