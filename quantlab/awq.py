"""AWQ: activation-aware weight quantization, built from scratch and exact to the reference code.

Weight-only quantization error hurts most where the *activations* are large: an input channel ``j``
whose ``|x_j|`` is big multiplies every error in weight column ``j``. AWQ protects those channels
without mixed precision. Scaling column ``j`` of ``W`` up by ``s_j > 1`` and the input down by the same
factor leaves the layer unchanged, ``W x = (W diag(s)) (diag(s)^-1 x)``, but the rounding error of that
column shrinks relative to the signal (Lin et al., Eq. 2-3). AWQ searches one exponent ``alpha`` per
group of linears that share an input and uses ``s = s_X^alpha`` with ``s_X`` the mean ``|x|`` per
channel (Eq. 4-5). The pieces, in the order the reference code (llm-awq) applies them:

1. :func:`awq_quantize`: AWQ's *own* group-wise quantizer (``pseudo_quantize_tensor``). Asymmetric, but
   unlike GPTQ's :func:`quantlab.uniform.minmax_params` the range is the group's ``[min, max]``, *not*
   stretched to contain 0, and the zero-point is clamped to the code range.
2. :func:`search_scales` / :func:`search_block_scales`: the grid search over ``alpha = i / n_grid``; the
   loss is the mean squared error of the layer's (or the whole attention/MLP's) output.
3. :func:`apply_scale`: fold ``1/s`` into the previous op (RMSNorm/LayerNorm weight and bias, the output
   rows of a previous linear, or a :class:`ScaledActivation`) and ``s`` into the linears' input columns.
   Before quantization the network computes exactly the same function.
4. :func:`search_clip` / :func:`apply_clip`: per output channel and group, shrink the weight range
   ``[-max, max]`` by up to 50 % if that lowers the error of the group's partial dot products.
5. :func:`awq_quantize_model`: the block-by-block driver, with a :class:`BlockAdapter` that names the
   scale groups of a block (a quantlab Llama and the tiny GPT are provided).

The ablation helpers of the paper's Tables 1-2 (:func:`salient_channels`, :func:`random_channels`,
:func:`quantize_keep_channels_fp`, :func:`scale_channels_fixed`) share the same quantizer.

References:
    Lin et al., "AWQ: Activation-aware Weight Quantization for On-Device LLM Compression and
    Acceleration", MLSys 2024 (Eq. 1-5; Table 1: keeping 1 % salient channels in FP16; Table 2:
    scaling them instead).
    mit-han-lab/llm-awq, ``awq/quantize/{quantizer,auto_scale,auto_clip,pre_quant}.py`` (the order of
    operations reproduced here: the search grid, the normalisation of the scales, the token sampling of
    the clip search, the strict ``<`` tie-breaking).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from quantlab._checks import (
    check_float_tensor,
    check_group_size,
    check_int,
    check_n_bits,
    check_positive,
    check_probability,
)
from quantlab.uniform import qrange

__all__ = [
    "LLAMA_ADAPTER",
    "TINY_GPT_ADAPTER",
    "AWQClipResult",
    "AWQModelResult",
    "AWQScaleRecord",
    "AWQScaleResult",
    "BlockAdapter",
    "ScaleGroup",
    "ScaledActivation",
    "activation_stat",
    "apply_awq_results",
    "apply_clip",
    "apply_scale",
    "awq_quantize",
    "awq_quantize_model",
    "output_mse",
    "pseudo_quantize_blocks",
    "quantize_keep_channels_fp",
    "quantize_with_scales",
    "random_channels",
    "ratio_scales",
    "salient_channels",
    "scale_channels_fixed",
    "search_block_scales",
    "search_clip",
    "search_scales",
]


# -----------------------------------------------------------------------------
# Input checks specific to AWQ


def _resolve_group_size(group_size: int | None, in_features: int) -> int:
    """``None`` or ``-1`` (the reference's ``q_group_size=-1``) mean one group per row."""
    if group_size is None or (type(group_size) is int and group_size == -1):
        return in_features
    return check_group_size(group_size, in_features)


def _check_n_bits(n_bits: int, zero_point: bool) -> int:
    # The symmetric grid [-2^(b-1), 2^(b-1)-1] has qmax = 0 at one bit: no usable scale.
    return check_n_bits(n_bits, low=1 if zero_point else 2)


def _check_n_grid(n_grid: object) -> int:
    n_grid = check_int(n_grid, "n_grid")
    if n_grid <= 0:
        raise ValueError(f"n_grid must be a positive int (number of grid points), got {n_grid}")
    return n_grid


def _check_weight_and_input(W: torch.Tensor, X: torch.Tensor) -> None:
    check_float_tensor(W, "W", ndim=2)
    check_float_tensor(X, "X")
    if X.ndim < 2:
        raise ValueError(
            f"X must be (tokens, in_features) or (..., tokens, in_features), got shape {tuple(X.shape)}"
        )
    if X.shape[-1] != W.shape[1]:
        raise ValueError(
            f"X has {X.shape[-1]} features (shape {tuple(X.shape)}) but W has in_features={W.shape[1]} "
            f"(shape {tuple(W.shape)}); X's last dimension must equal W.shape[1]"
        )


def _check_scales(s: torch.Tensor, n: int, name: str = "s") -> torch.Tensor:
    check_float_tensor(s, name, ndim=1)
    if s.shape[0] != n:
        raise ValueError(f"{name} must have one entry per input channel ({n}), got shape {tuple(s.shape)}")
    if not bool((s > 0).all()):
        raise ValueError(f"{name} must be > 0 everywhere; got min {float(s.min())}")
    return s


# -----------------------------------------------------------------------------
# AWQ's quantizer (the reference's pseudo_quantize_tensor)


def _quantize_rows(
    w: torch.Tensor, n_bits: int, zero_point: bool, inplace: bool = False
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Fake-quantize each row of ``w`` ``(rows, group_size)`` with its own scale and zero-point.

    No input checks: the scale and clip searches call this thousands of times per model on weights
    checked once at the public entry point. ``inplace=True`` overwrites ``w`` with the result (for a
    temporary the caller owns; it saves allocating and filling two more tensors of ``w``'s size).

    Returns ``(w_q, scale, zero)`` with ``scale``/``zero`` of shape ``(rows, 1)``.
    """
    if zero_point:
        qmin, qmax = qrange(n_bits, signed=False)  # (0, 2^b - 1)
        max_val = w.amax(dim=1, keepdim=True)  # (rows, 1)
        min_val = w.amin(dim=1, keepdim=True)  # (rows, 1)
        # The range is [min, max] of the group itself (not stretched to contain 0) ...
        scale = (max_val - min_val).clamp(min=1e-5) / qmax
        # ... so the zero-point of an all-positive or all-negative group falls outside [0, qmax] and is
        # clamped: such a group then cannot reach its own max (or min). This is the reference's rule.
        zero = (-torch.round(min_val / scale)).clamp(qmin, qmax)
    else:
        # Symmetric branch (the reference marks it "never used"): absmax over the signed grid.
        qmin, qmax = qrange(n_bits, signed=True)  # (-2^(b-1), 2^(b-1) - 1)
        max_val = w.abs().amax(dim=1, keepdim=True).clamp(min=1e-5)  # (rows, 1)
        scale = max_val / qmax
        zero = torch.zeros_like(scale)
    # The arithmetic of quantlab.uniform.quantize then dequantize, op for op (scale > 0 by the clamps
    # above): codes = clamp(round(w / scale) + zero, qmin, qmax), then (codes - zero) * scale.
    codes = w.div_(scale) if inplace else w / scale  # (rows, group_size)
    codes.round_().add_(zero).clamp_(qmin, qmax)
    return codes.sub_(zero).mul_(scale), scale, zero


def awq_quantize(
    w: torch.Tensor,
    n_bits: int = 4,
    group_size: int | None = 128,
    zero_point: bool = True,
    return_params: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """AWQ's group-wise round-to-nearest fake quantizer (Lin et al., Eq. 1, with a zero-point).

    For every group of ``group_size`` consecutive input columns of every row:

    * ``zero_point=True`` (AWQ's default): ``scale = max(max - min, 1e-5) / (2^b - 1)``,
      ``zero = clamp(-round(min / scale), 0, 2^b - 1)`` with ``min``/``max`` the group's own extremes
      (0 need not be inside the range; compare GPTQ's :func:`quantlab.uniform.minmax_params`);
    * ``zero_point=False``: ``scale = max(max|w|, 1e-5) / (2^(b-1) - 1)`` on the grid
      ``[-2^(b-1), 2^(b-1) - 1]``, zero-point 0;

    then ``w_q = (clamp(round(w / scale) + zero, qmin, qmax) - zero) * scale`` (half-to-even rounding,
    a division by the scale, as in :func:`quantlab.uniform.quantize`).

    Args:
        w: weights ``(out, in)``.
        n_bits: bits per code, 1..16 (2..16 for ``zero_point=False``).
        group_size: a divisor of ``in``; ``None`` (or the reference's ``-1``) for one group per row.
        zero_point: asymmetric with zero-point (default) or symmetric.
        return_params: also return the quantizer's parameters.

    Returns:
        ``w_q`` ``(out, in)``; with ``return_params`` the tuple ``(w_q, scale, zero)`` where ``scale`` and
        ``zero`` are ``(out, n_groups)``.

    >>> awq_quantize(torch.tensor([[1.0, 2.0]]), n_bits=2, group_size=2)  # zero clamped: 2 -> 1
    tensor([[1., 1.]])
    """
    check_float_tensor(w, "w", ndim=2)
    n_bits = _check_n_bits(n_bits, zero_point)
    gs = _resolve_group_size(group_size, w.shape[1])
    w_q, scale, zero = _quantize_rows(w.reshape(-1, gs), n_bits, zero_point)  # (out * n_groups, group_size)
    w_q = w_q.reshape(w.shape)  # (out, in)
    if return_params:
        return w_q, scale.reshape(w.shape[0], -1), zero.reshape(w.shape[0], -1)  # (out, n_groups)
    return w_q


# -----------------------------------------------------------------------------
# The activation statistic and scaled quantization


def activation_stat(X: torch.Tensor) -> torch.Tensor:
    """The per-input-channel activation magnitude ``s_X``: the mean of ``|x|`` over all tokens.

    Args:
        X: activations ``(..., tokens, in)``.

    Returns:
        ``(in,)``.

    >>> activation_stat(torch.tensor([[1.0, -4.0], [-3.0, 0.0]]))
    tensor([2., 2.])
    """
    check_float_tensor(X, "X")
    return X.abs().reshape(-1, X.shape[-1]).mean(0)  # (tokens, in) -> (in,)


def ratio_scales(stat: torch.Tensor, ratio: float) -> torch.Tensor:
    """AWQ's candidate scales ``s = s_X^ratio`` (Eq. 5), floored at 1e-4 and normalised.

    Dividing by ``sqrt(max(s) * min(s))`` centres the scales around 1 in log space (``max * min = 1``)
    so the weights are neither inflated nor shrunk as a whole; only their relative sizes change.

    Args:
        stat: the activation statistic ``(in,)`` from :func:`activation_stat`.
        ratio: the exponent ``alpha``, 0 for no scaling.

    Returns:
        ``(in,)`` positive scales.
    """
    check_float_tensor(stat, "stat", ndim=1)
    return _ratio_scales(stat, check_positive(ratio, "ratio", allow_zero=True))


def _ratio_scales(stat: torch.Tensor, ratio: float) -> torch.Tensor:
    """:func:`ratio_scales` without the input checks (the grid search calls it once per grid point)."""
    s = stat.pow(ratio).clamp(min=1e-4).view(-1)  # (in,)
    return s / (s.max() * s.min()).sqrt()


def quantize_with_scales(
    W: torch.Tensor,
    s: torch.Tensor,
    n_bits: int = 4,
    group_size: int | None = 128,
    zero_point: bool = True,
) -> torch.Tensor:
    """The effective weight of a scaled layer: ``Q(W diag(s)) diag(s)^-1`` (Lin et al., Eq. 2).

    ``(Q(W diag(s)) diag(s)^-1) x == Q(W diag(s)) (diag(s)^-1 x)``: the input is divided by ``s`` (folded
    into the previous op), the weight multiplied by it before quantization.

    Args:
        W: weights ``(out, in)``.
        s: per-input-channel scales ``(in,)``, > 0.
        n_bits, group_size, zero_point: as in :func:`awq_quantize`.

    Returns:
        ``(out, in)``.
    """
    check_float_tensor(W, "W", ndim=2)
    _check_scales(s, W.shape[1])
    n_bits = _check_n_bits(n_bits, zero_point)
    return _scaled_fake_quantize(W, s, n_bits, _resolve_group_size(group_size, W.shape[1]), zero_point)


def _scaled_fake_quantize(
    W: torch.Tensor, s: torch.Tensor, n_bits: int, gs: int, zero_point: bool
) -> torch.Tensor:
    """:func:`quantize_with_scales` without the input checks (the searches call it once per candidate)."""
    s_row = s.view(1, -1)  # (1, in)
    scaled = (W * s_row).reshape(-1, gs)  # (out * n_groups, group_size), a temporary: quantized in place
    w_q = _quantize_rows(scaled, n_bits, zero_point, inplace=True)[0]
    return w_q.reshape(W.shape).div_(s_row)  # (out, in)


def _mse(reference: torch.Tensor, out: torch.Tensor) -> float:
    # In float32 at least, as the reference does: half-precision squares overflow.
    return (reference - out).float().pow(2).mean().item()


def output_mse(
    W: torch.Tensor, W_q: torch.Tensor, X: torch.Tensor, bias: torch.Tensor | None = None
) -> float:
    """Mean squared error of the layer output, ``mean((X W^T + b - X W_q^T - b)^2)``.

    Args:
        W: full-precision weights ``(out, in)``.
        W_q: (fake-)quantized weights ``(out, in)``.
        X: inputs ``(..., in)``.
        bias: optional ``(out,)``.

    Returns:
        A Python float.
    """
    _check_weight_and_input(W, X)
    check_float_tensor(W_q, "W_q", ndim=2)
    if W_q.shape != W.shape:
        raise ValueError(f"W_q must have W's shape {tuple(W.shape)}, got {tuple(W_q.shape)}")
    return _mse(F.linear(X, W, bias), F.linear(X, W_q, bias))


# -----------------------------------------------------------------------------
# The scale search (auto_scale)


@dataclass
class AWQScaleResult:
    """The outcome of one AWQ scale search.

    Attributes:
        best_ratio: the exponent ``alpha`` with the lowest loss (the first one on ties).
        scales: ``s = s_X^best_ratio`` normalised, ``(in,)``.
        best_loss: the loss at ``best_ratio``.
        loss_history: the loss of every grid point, in grid order.
        ratios: the grid ``[0, 1/n_grid, ..., (n_grid-1)/n_grid]``.
        stat: the activation statistic ``s_X`` ``(in,)``.
    """

    best_ratio: float
    scales: torch.Tensor
    best_loss: float
    loss_history: list[float]
    ratios: list[float]
    stat: torch.Tensor

    @property
    def rtn_loss(self) -> float:
        """The loss of plain round-to-nearest (``ratio = 0`` gives ``s = 1``)."""
        return self.loss_history[0]


def _grid_search(stat: torch.Tensor, n_grid: int, loss_of: Callable[[torch.Tensor], float]) -> AWQScaleResult:
    """Try ``ratio = i / n_grid`` for ``i = 0 .. n_grid-1`` and keep the first strict minimum."""
    best_loss, best_ratio, best_scales = float("inf"), -1.0, None
    history: list[float] = []
    ratios: list[float] = []
    for i in range(n_grid):
        ratio = i * 1 / n_grid  # 1.0 itself is not on the grid
        s = _ratio_scales(stat, ratio)
        loss = loss_of(s)
        history.append(loss)
        ratios.append(ratio)
        if loss < best_loss:  # strict: the first of equal losses wins; NaN never wins
            best_loss, best_ratio, best_scales = loss, ratio, s
    if best_scales is None:
        raise RuntimeError(f"no grid point gave a finite loss; loss history: {history}")
    return AWQScaleResult(best_ratio, best_scales.view(-1), best_loss, history, ratios, stat)


def search_scales(
    W: torch.Tensor,
    X: torch.Tensor,
    n_bits: int = 4,
    group_size: int | None = 128,
    n_grid: int = 20,
    bias: torch.Tensor | None = None,
    zero_point: bool = True,
) -> AWQScaleResult:
    """AWQ's scale search for one linear layer (Lin et al., Eq. 4-5).

    ``alpha* = argmin_alpha || Q(W diag(s)) diag(s)^-1 X^T - W X^T ||^2`` over ``alpha = i / n_grid``,
    ``s = s_X^alpha`` normalised by :func:`ratio_scales`, ``s_X`` the mean ``|x|`` per channel. The loss
    is the mean squared error of the output ``F.linear(X, W_q, bias)`` against full precision on the
    *unscaled* ``X``.

    Args:
        W: weights ``(out, in)``.
        X: calibration inputs ``(tokens, in)`` (or ``(..., tokens, in)``).
        n_bits, group_size, zero_point: the quantizer, as in :func:`awq_quantize`.
        n_grid: number of grid points; ``ratio = 1`` is excluded.
        bias: optional ``(out,)``, part of both outputs.

    Returns:
        An :class:`AWQScaleResult`.
    """
    _check_weight_and_input(W, X)
    n_bits = _check_n_bits(n_bits, zero_point)
    gs = _resolve_group_size(group_size, W.shape[1])
    n_grid = _check_n_grid(n_grid)
    if bias is not None:
        check_float_tensor(bias, "bias", ndim=1)
        if bias.shape[0] != W.shape[0]:
            raise ValueError(f"bias must have shape ({W.shape[0]},), got {tuple(bias.shape)}")
    with torch.no_grad():
        reference = F.linear(X, W, bias)  # (tokens, out)
        stat = activation_stat(X)

        def loss_of(s: torch.Tensor) -> float:
            W_q = _scaled_fake_quantize(W, s, n_bits, gs, zero_point)
            return _mse(reference, F.linear(X, W_q, bias))

        return _grid_search(stat, n_grid, loss_of)


def _first_output(out: object) -> torch.Tensor:
    # Hugging Face modules return tuples whose first element is the hidden state.
    return out[0] if isinstance(out, tuple) else out


@torch.no_grad()
def search_block_scales(
    linears: Sequence[nn.Linear],
    X: torch.Tensor,
    block_fn: Callable[[torch.Tensor], torch.Tensor],
    n_bits: int = 4,
    group_size: int | None = 128,
    n_grid: int = 20,
    zero_point: bool = True,
) -> AWQScaleResult:
    """AWQ's scale search for several linears that read the same input (q/k/v, gate/up).

    One ``s`` is shared by all of ``linears`` (they all sit after the same norm), and the loss is the
    mean squared error of ``block_fn(X)``, the output of the module that contains them (the reference's
    ``module2inspect``: the whole attention or MLP), with only ``linears`` quantized. The linears'
    weights are swapped for ``Q(W diag(s)) diag(s)^-1`` during the search and restored afterwards.

    Args:
        linears: the ``nn.Linear`` modules sharing the input, each with ``in_features = X.shape[-1]``.
        X: their common input ``(..., tokens, in)``, e.g. ``(batch, seq, in)``.
        block_fn: ``x -> output`` of the inspected module (a tuple's first element is used).
        n_bits, group_size, zero_point: the quantizer, as in :func:`awq_quantize`.
        n_grid: number of grid points.

    Returns:
        An :class:`AWQScaleResult`.
    """
    if isinstance(linears, nn.Module) or not isinstance(linears, Sequence) or len(linears) == 0:
        raise TypeError(f"linears must be a non-empty list of nn.Linear, got {type(linears).__name__}")
    for i, lin in enumerate(linears):
        if not isinstance(lin, nn.Linear):
            raise TypeError(f"linears[{i}] must be an nn.Linear, got {type(lin).__name__}")
        _check_weight_and_input(lin.weight.data, X)
    if not callable(block_fn):
        raise TypeError(f"block_fn must be callable, got {type(block_fn).__name__}")
    n_bits = _check_n_bits(n_bits, zero_point)
    gs = _resolve_group_size(group_size, X.shape[-1])
    n_grid = _check_n_grid(n_grid)

    reference = _first_output(block_fn(X))
    stat = activation_stat(X)
    originals = [lin.weight.data for lin in linears]

    def loss_of(s: torch.Tensor) -> float:
        try:
            for lin, w in zip(linears, originals, strict=True):
                lin.weight.data = _scaled_fake_quantize(w, s, n_bits, gs, zero_point)
            out = _first_output(block_fn(X))
        finally:  # the original tensors come back untouched, whatever happened
            for lin, w in zip(linears, originals, strict=True):
                lin.weight.data = w
        return _mse(reference, out)

    return _grid_search(stat, n_grid, loss_of)


# -----------------------------------------------------------------------------
# Folding the scales into the network (apply_scale)


class ScaledActivation(nn.Module):
    """An activation followed by a division by per-channel scales: ``act(x) / scales``.

    AWQ needs it when the op before a linear is a parameter-free activation (GELU between ``fc`` and
    ``proj``): the ``1/s`` must live somewhere, and an element-wise nonlinearity cannot absorb it.

    Args:
        act: the activation module.
        scales: ``(channels,)``, usually ones before :func:`apply_scale` multiplies them in.
    """

    def __init__(self, act: nn.Module, scales: torch.Tensor) -> None:
        super().__init__()
        self.act = act
        self.scales = nn.Parameter(scales.detach().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Args: x ``(..., channels)``. Returns ``act(x) / scales``, same shape."""
        return self.act(x) / self.scales


@torch.no_grad()
def apply_scale(prev_op: nn.Module, linears: Sequence[nn.Linear], s: torch.Tensor) -> None:
    """Fold ``s`` into the network in place: ``1/s`` into ``prev_op``'s output, ``s`` into ``linears``.

    * ``prev_op`` a norm (anything with a 1-D ``weight``, e.g. RMSNorm, LayerNorm): ``weight /= s`` and
      ``bias /= s``;
    * ``prev_op`` an ``nn.Linear`` (v_proj -> o_proj, up_proj -> down_proj): its last ``len(s)`` output
      rows and bias entries are divided by ``s`` (only one linear may follow);
    * ``prev_op`` a :class:`ScaledActivation`: its ``scales *= s``;

    then every linear's input columns are multiplied: ``W[:, j] *= s_j``. The composition computes the
    same function as before (up to float rounding) because each ``1/s_j`` meets its ``s_j`` in the
    matrix product.

    Args:
        prev_op: the module whose output feeds ``linears``.
        linears: ``nn.Linear`` modules with ``in_features = len(s)``.
        s: ``(in,)`` positive scales.

    Returns:
        None; the modules are modified in place.
    """
    if isinstance(linears, nn.Module) or not isinstance(linears, Sequence) or len(linears) == 0:
        raise TypeError(f"linears must be a non-empty list of nn.Linear, got {type(linears).__name__}")
    check_float_tensor(s, "s", ndim=1)
    n = s.shape[0]
    _check_scales(s, n)
    for i, lin in enumerate(linears):
        if not isinstance(lin, nn.Linear):
            raise TypeError(f"linears[{i}] must be an nn.Linear, got {type(lin).__name__}")
        if lin.in_features != n:
            raise ValueError(f"linears[{i}] has in_features={lin.in_features}, but s has {n} entries")

    if isinstance(prev_op, nn.Linear):
        if len(linears) != 1:
            raise ValueError(f"a linear prev_op can feed exactly one linear, got {len(linears)}")
        if prev_op.out_features < n:
            raise ValueError(f"prev_op has out_features={prev_op.out_features} < len(s)={n}")
        sw = s.to(prev_op.weight.dtype)
        prev_op.weight[-n:].div_(sw.view(-1, 1))  # (n, in_prev): the rows that produce the scaled channels
        if prev_op.bias is not None:
            prev_op.bias[-n:].div_(sw)
    elif isinstance(prev_op, ScaledActivation):
        if prev_op.scales.shape != (n,):
            raise ValueError(
                f"ScaledActivation has scales of shape {tuple(prev_op.scales.shape)}, need ({n},)"
            )
        prev_op.scales.mul_(s.to(prev_op.scales.dtype))
    else:
        weight = getattr(prev_op, "weight", None)
        if not isinstance(weight, torch.Tensor) or weight.ndim != 1 or weight.shape[0] != n:
            raise TypeError(
                f"prev_op must be a norm with a 1-D weight of size {n}, an nn.Linear or a ScaledActivation; "
                f"got {type(prev_op).__name__} (wrap a parameter-free activation in ScaledActivation first)"
            )
        sw = s.to(weight.dtype)
        weight.div_(sw)
        bias = getattr(prev_op, "bias", None)
        if isinstance(bias, torch.Tensor):
            bias.div_(sw)

    for lin in linears:
        lin.weight.mul_(s.to(lin.weight.dtype).view(1, -1))  # (out, in) * (1, in)

    for module in [prev_op, *linears]:
        for name, p in module.named_parameters():
            if bool(torch.isnan(p).any()):
                raise RuntimeError(f"apply_scale produced NaN in {type(module).__name__}.{name}")


# -----------------------------------------------------------------------------
# The clip search (auto_clip)


@dataclass
class AWQClipResult:
    """Details of a clip search (``return_details=True`` of :func:`search_clip`).

    Attributes:
        max_val: the chosen clip threshold per output channel and group, ``(out, n_groups)``.
        org_max_val: the unclipped ``max|w|`` per output channel and group, ``(out, n_groups)``.
        best_err: the sampled error at ``max_val``, ``(out, n_groups)``.
        noclip_err: the sampled error without clipping (shrink 0), ``(out, n_groups)``.
        n_tokens_used: how many input tokens the error was measured on.
    """

    max_val: torch.Tensor
    org_max_val: torch.Tensor
    best_err: torch.Tensor
    noclip_err: torch.Tensor
    n_tokens_used: int

    @property
    def shrink(self) -> torch.Tensor:
        """The chosen fraction of the range cut off, ``1 - max_val / org_max_val``, ``(out, n_groups)``."""
        return 1 - self.max_val / self.org_max_val


def _sample_tokens(X: torch.Tensor, n_sample_tokens: int) -> torch.Tensor:
    """Every ``(n_tokens // n_sample_tokens)``-th token, starting at the first (the reference's sampling).

    This gives ``ceil(n_tokens / step)`` tokens: exactly ``n_sample_tokens`` only when it divides.
    """
    X2 = X.reshape(-1, X.shape[-1])  # (tokens, in)
    n_tokens = X2.shape[0]
    if n_tokens < n_sample_tokens:
        raise ValueError(
            f"the clip search takes every (n_tokens // n_sample_tokens)-th token, so it needs at least "
            f"n_sample_tokens={n_sample_tokens} tokens in X; got {n_tokens} (shape {tuple(X.shape)}); "
            f"pass n_sample_tokens <= {n_tokens}"
        )
    return X2[0 :: n_tokens // n_sample_tokens]  # (sampled, in)


def search_clip(
    W: torch.Tensor,
    X: torch.Tensor,
    n_bits: int = 4,
    group_size: int | None = 128,
    n_grid: int = 20,
    max_shrink: float = 0.5,
    n_sample_tokens: int = 512,
    oc_batch_size: int | None = None,
    zero_point: bool = True,
    method: Literal["reference", "matmul"] = "reference",
    return_details: bool = False,
) -> torch.Tensor | AWQClipResult:
    """AWQ's clip search: per output channel and group, the weight range that minimises the output error.

    For ``i = 0 .. int(max_shrink * n_grid) - 1`` the candidate threshold is
    ``max_val = max|w| * (1 - i / n_grid)``; the group is clamped to ``[-max_val, max_val]``, quantized
    with :func:`awq_quantize` (whose asymmetric range is then the clamped group's own min/max), and scored
    by the mean over sampled tokens of the squared error of the group's partial dot product
    ``sum_k x[t, k] w[c, k]``. ``i = 0`` is no clipping, so the chosen error is never larger than the
    unclipped one; ties keep the earlier (larger) threshold. Call it on the *scaled* weight and input.

    Args:
        W: weights ``(out, in)`` (after :func:`apply_scale`).
        X: their inputs ``(..., tokens, in)`` (after division by the scales).
        n_bits, group_size, zero_point: the quantizer, as in :func:`awq_quantize`.
        n_grid: the shrink step is ``1 / n_grid``.
        max_shrink: the largest fraction of the range that may be cut, in [0, 1].
        n_sample_tokens: tokens used; every ``(n_tokens // n_sample_tokens)``-th token is taken.
        oc_batch_size: output channels per chunk (memory: ``oc_batch_size * tokens * in`` floats for
            ``method="reference"``); default the reference's 256 if it divides ``out``, else 64. The
            result does not depend on it.
        method: ``"reference"`` multiplies and sums exactly like llm-awq (bit-identical errors);
            ``"matmul"`` computes ``x . (q(w) - w)`` with batched matrix products, much faster on a CPU,
            and may pick a different threshold only where two candidates tie to float rounding.
        return_details: return an :class:`AWQClipResult` instead of the thresholds alone.

    Returns:
        ``max_val`` ``(out, n_groups)`` (feed it to :func:`apply_clip`), or an :class:`AWQClipResult`.
    """
    _check_weight_and_input(W, X)
    n_bits = _check_n_bits(n_bits, zero_point)
    out_features, in_features = W.shape
    gs = _resolve_group_size(group_size, in_features)
    n_groups = in_features // gs
    n_grid = _check_n_grid(n_grid)
    max_shrink = check_probability(max_shrink, "max_shrink")
    n_sample_tokens = check_int(n_sample_tokens, "n_sample_tokens")
    if n_sample_tokens <= 0:
        raise ValueError(f"n_sample_tokens must be a positive int, got {n_sample_tokens}")
    if oc_batch_size is None:
        oc_batch_size = 256 if out_features % 256 == 0 else 64
    oc_batch_size = check_int(oc_batch_size, "oc_batch_size")
    if oc_batch_size <= 0:
        raise ValueError(f"oc_batch_size must be a positive int, got {oc_batch_size}")
    if method not in ("reference", "matmul"):
        raise ValueError(f"method must be 'reference' or 'matmul', got {method!r}")

    with torch.no_grad():
        xs = _sample_tokens(X, n_sample_tokens)  # (sampled, in)
        n_used = xs.shape[0]
        x4 = xs.reshape(1, n_used, n_groups, gs)  # (1, sampled, n_groups, group_size)
        xg = x4[0].permute(1, 0, 2)  # (n_groups, sampled, group_size), for "matmul"
        w_all = W.reshape(out_features, 1, n_groups, gs)  # (out, 1, n_groups, group_size)
        n_shrink = int(max_shrink * n_grid)

        chunks: list[tuple[torch.Tensor, ...]] = []
        for start in range(0, out_features, oc_batch_size):
            w = w_all[start : start + oc_batch_size]  # (b, 1, n_groups, group_size)
            org_max_val = w.abs().amax(dim=-1, keepdim=True)  # (b, 1, n_groups, 1)
            best_max_val = org_max_val.clone()
            min_errs = torch.ones_like(org_max_val) * 1e9
            noclip_err = torch.full_like(org_max_val, float("nan"))
            if method == "reference":
                org_out = (x4 * w).sum(dim=-1)  # (b, sampled, n_groups)
            for i_s in range(n_shrink):
                max_val = org_max_val * (1 - i_s / n_grid)  # (b, 1, n_groups, 1)
                cur_w = torch.clamp(w, -max_val, max_val)  # a temporary: quantized in place
                q_w = _quantize_rows(cur_w.reshape(-1, gs), n_bits, zero_point, inplace=True)[0]
                q_w = q_w.reshape(cur_w.shape)  # (b, 1, n_groups, group_size)
                if method == "reference":
                    cur_out = (x4 * q_w).sum(dim=-1)  # (b, sampled, n_groups)
                    err = (cur_out - org_out).pow(2).mean(dim=1).view(min_errs.shape)  # (b, 1, n_groups, 1)
                else:
                    delta = q_w.sub_(w)[:, 0].permute(1, 2, 0)  # (n_groups, group_size, b): q(w) - w
                    diff = torch.bmm(xg, delta)  # (n_groups, sampled, b)
                    err = diff.pow_(2).mean(dim=1).t().reshape(min_errs.shape)  # (b, 1, n_groups, 1)
                if i_s == 0:
                    noclip_err = err.clone()
                better = err < min_errs  # strict: a tie keeps the larger threshold found first
                min_errs = torch.where(better, err, min_errs)
                best_max_val = torch.where(better, max_val, best_max_val)
            chunks.append((best_max_val, org_max_val, min_errs, noclip_err))

        def gather(k: int) -> torch.Tensor:
            return torch.cat([c[k] for c in chunks], dim=0).reshape(out_features, n_groups)  # (out, n_groups)

        max_val_all = gather(0)
        if not return_details:
            return max_val_all
        return AWQClipResult(max_val_all, gather(1), gather(2), gather(3), n_used)


def apply_clip(W: torch.Tensor, max_val: torch.Tensor) -> torch.Tensor:
    """Clamp every group of ``W`` to ``[-max_val, max_val]`` (a new tensor; ``W`` is not modified).

    Args:
        W: weights ``(out, in)``.
        max_val: thresholds ``(out, n_groups)`` (or the reference's ``(out, n_groups, 1)``), > 0.

    Returns:
        ``(out, in)``.
    """
    check_float_tensor(W, "W", ndim=2)
    check_float_tensor(max_val, "max_val")
    out_features, in_features = W.shape
    if max_val.ndim == 3 and max_val.shape[-1] == 1:
        max_val = max_val[..., 0]
    if max_val.ndim != 2 or max_val.shape[0] != out_features or in_features % max_val.shape[1] != 0:
        raise ValueError(
            f"max_val must be (out, n_groups) = ({out_features}, a divisor of {in_features}), "
            f"got shape {tuple(max_val.shape)}"
        )
    if bool((max_val < 0).any()):
        raise ValueError("max_val must be >= 0 everywhere")
    mv = max_val.to(W.dtype).unsqueeze(-1)  # (out, n_groups, 1)
    grouped = W.reshape(out_features, max_val.shape[1], -1)  # (out, n_groups, group_size)
    return torch.clamp(grouped, -mv, mv).reshape(out_features, in_features)


# -----------------------------------------------------------------------------
# Ablation helpers: the paper's Table 1 (keep salient channels in FP16) and Table 2 (scale them)


def _n_channels(n: int, fraction: float) -> int:
    fraction = check_probability(fraction, "fraction")
    if fraction == 0:
        raise ValueError("fraction must be in (0, 1], got 0")
    return max(1, round(fraction * n))


def salient_channels(stat: torch.Tensor, fraction: float = 0.01) -> torch.Tensor:
    """Indices of the ``round(fraction * in)`` (at least 1) input channels with the largest statistic.

    With ``stat`` = :func:`activation_stat` these are AWQ's salient channels (selected by activation,
    which the paper shows works far better than by weight magnitude, Table 1).

    Args:
        stat: per-channel statistic ``(in,)``.
        fraction: share of channels to select, in (0, 1].

    Returns:
        int64 indices ``(k,)``, largest statistic first.

    >>> salient_channels(torch.tensor([0.1, 5.0, 0.3, 2.0]), fraction=0.5)
    tensor([1, 3])
    """
    check_float_tensor(stat, "stat", ndim=1)
    return torch.topk(stat, _n_channels(stat.shape[0], fraction)).indices


def random_channels(
    n_channels: int, fraction: float = 0.01, generator: torch.Generator | None = None
) -> torch.Tensor:
    """As many random channel indices as :func:`salient_channels` would pick (the paper's control).

    Args:
        n_channels: the number of input channels.
        fraction: share of channels, in (0, 1].
        generator: a seeded generator for reproducibility.

    Returns:
        int64 indices ``(k,)``, sorted.
    """
    n_channels = check_int(n_channels, "n_channels")
    if n_channels <= 0:
        raise ValueError(f"n_channels must be a positive int, got {n_channels}")
    k = _n_channels(n_channels, fraction)
    return torch.randperm(n_channels, generator=generator)[:k].sort().values


def _check_channel_index(idx: torch.Tensor | Sequence[int], n: int, name: str) -> torch.Tensor:
    idx = torch.as_tensor(idx)
    if idx.dtype in (torch.bool,) or idx.is_floating_point() or idx.ndim != 1:
        raise TypeError(
            f"{name} must be a 1-D integer tensor of channel indices, got {idx.dtype} {tuple(idx.shape)}"
        )
    if idx.numel() > 0 and (int(idx.min()) < 0 or int(idx.max()) >= n):
        raise ValueError(
            f"{name} must hold channel indices in [0, {n - 1}], got [{int(idx.min())}, {int(idx.max())}]"
        )
    return idx.long()


def quantize_keep_channels_fp(
    W: torch.Tensor,
    keep_idx: torch.Tensor | Sequence[int],
    n_bits: int = 4,
    group_size: int | None = 128,
    zero_point: bool = True,
) -> torch.Tensor:
    """Round-to-nearest, but the input channels ``keep_idx`` stay in full precision (Table 1's ablation).

    The whole weight is quantized with :func:`awq_quantize` (the kept columns still count in their
    groups' ranges, as a mixed-precision kernel that stores the group would) and the kept columns are
    then put back at their original values.

    Args:
        W: weights ``(out, in)``.
        keep_idx: input-channel (column) indices to keep, e.g. from :func:`salient_channels`.
        n_bits, group_size, zero_point: as in :func:`awq_quantize`.

    Returns:
        ``(out, in)``.
    """
    check_float_tensor(W, "W", ndim=2)
    idx = _check_channel_index(keep_idx, W.shape[1], "keep_idx")
    W_q = awq_quantize(W, n_bits, group_size, zero_point).clone()
    W_q[:, idx] = W[:, idx]
    return W_q


def scale_channels_fixed(
    W: torch.Tensor,
    idx: torch.Tensor | Sequence[int],
    factor: float,
    n_bits: int = 4,
    group_size: int | None = 128,
    zero_point: bool = True,
) -> torch.Tensor:
    """Scale the input channels ``idx`` by a fixed ``factor`` before quantizing (Table 2's ablation).

    ``s_j = factor`` on ``idx`` and 1 elsewhere; returns ``Q(W diag(s)) diag(s)^-1``, the effective
    weight when the inputs are divided by ``s`` (:func:`quantize_with_scales`). ``factor = 1`` is RTN.

    Args:
        W: weights ``(out, in)``.
        idx: input-channel indices to scale, e.g. from :func:`salient_channels`.
        factor: the scale, > 0 (the paper tries 1.25 .. 4).
        n_bits, group_size, zero_point: as in :func:`awq_quantize`.

    Returns:
        ``(out, in)``.
    """
    check_float_tensor(W, "W", ndim=2)
    idx = _check_channel_index(idx, W.shape[1], "idx")
    factor = check_positive(factor, "factor")
    s = torch.ones(W.shape[1], dtype=W.dtype, device=W.device)  # (in,)
    s[idx] = factor
    return quantize_with_scales(W, s, n_bits, group_size, zero_point)


# -----------------------------------------------------------------------------
# The model-level driver (pre_quant.run_awq): block adapters


@dataclass(frozen=True)
class ScaleGroup:
    """One AWQ scale group of a block: linears that share an input, and the op that produces it.

    Names are relative to the block (``block.get_submodule(name)``).

    Attributes:
        prev_op: the norm, linear or activation whose output feeds ``linears`` (receives ``1/s``).
        linears: the linears scaled by the same ``s`` (receive ``s`` in their input columns).
        inspect: the module whose output is the search loss (e.g. ``"self_attn"``, ``"mlp"``); ``None``
            for a single linear, which is then its own inspected module.
    """

    prev_op: str
    linears: tuple[str, ...]
    inspect: str | None = None

    def __post_init__(self) -> None:
        if not self.linears:
            raise ValueError("ScaleGroup.linears must name at least one linear")
        if self.inspect is None and len(self.linears) != 1:
            raise ValueError(
                f"ScaleGroup with {len(self.linears)} linears needs inspect= (the module computing their "
                f"joint output); only a single linear can be its own inspected module"
            )


def _call_model(model: nn.Module, tokens: torch.Tensor) -> object:
    return model(tokens)


@dataclass(frozen=True)
class BlockAdapter:
    """How to find a model's blocks and each block's scale groups.

    Attributes:
        get_blocks: ``model -> sequence of blocks`` (e.g. ``model.model.layers``).
        scale_groups: ``block -> [ScaleGroup, ...]``, in the order they are searched and applied; may
            depend on shapes (the reference only scales ``v_proj -> o_proj`` when their shapes match).
        no_clip: substrings of block-relative linear names that the clip search skips (the reference
            skips q and k because they meet in the ``q k^T`` product, not in an output).
        run_model: ``(model, tokens) -> anything``, how to run the model on calibration tokens.
    """

    get_blocks: Callable[[nn.Module], Sequence[nn.Module]]
    scale_groups: Callable[[nn.Module], list[ScaleGroup]]
    no_clip: tuple[str, ...] = ()
    run_model: Callable[[nn.Module, torch.Tensor], object] = field(default=_call_model)


def _llama_blocks(model: nn.Module) -> Sequence[nn.Module]:
    return model.model.layers


def _llama_groups(block: nn.Module) -> list[ScaleGroup]:
    attn = block.self_attn
    groups = [
        ScaleGroup(
            "input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), "self_attn"
        )
    ]
    # With grouped-query attention v_proj has fewer outputs than o_proj has inputs: the scale would
    # have to be repeated per query head, so the reference skips the pair.
    if attn.v_proj.weight.shape == attn.o_proj.weight.shape:
        groups.append(ScaleGroup("self_attn.v_proj", ("self_attn.o_proj",)))
    groups.append(ScaleGroup("post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj"), "mlp"))
    # down_proj's input is silu(gate) * up: linear in up_proj's output, so up_proj can absorb 1/s.
    groups.append(ScaleGroup("mlp.up_proj", ("mlp.down_proj",)))
    return groups


def _tiny_gpt_blocks(model: nn.Module) -> Sequence[nn.Module]:
    return model.blocks


def _tiny_gpt_groups(block: nn.Module) -> list[ScaleGroup]:
    groups = [ScaleGroup("ln_1", ("attn.q", "attn.k", "attn.v"), "attn")]
    if block.attn.v.weight.shape == block.attn.proj.weight.shape:
        groups.append(ScaleGroup("attn.v", ("attn.proj",)))
    groups.append(ScaleGroup("ln_2", ("mlp.fc",), "mlp"))
    # mlp.proj reads gelu(fc(x)) computed with F.gelu inline: no module can hold 1/s, so mlp.proj is
    # only clipped. (With an nn.GELU submodule, ScaleGroup("mlp.act", ("mlp.proj",)) would work: the
    # driver wraps a parameter-free prev_op in a ScaledActivation, as the reference does for GELU.)
    return groups


LLAMA_ADAPTER = BlockAdapter(_llama_blocks, _llama_groups, no_clip=("q_", "k_"))
"""Hugging Face-style Llama (:class:`quantlab.models.llama.Llama`, SmolLM2): ``model.model.layers``."""

TINY_GPT_ADAPTER = BlockAdapter(_tiny_gpt_blocks, _tiny_gpt_groups, no_clip=("attn.q", "attn.k"))
"""The byte-level :class:`quantlab.models.tiny_gpt.TinyGPT`: ``model.blocks``."""


# -----------------------------------------------------------------------------
# The model-level driver


@dataclass
class AWQScaleRecord:
    """One applied scale group (names are the model's qualified module names).

    Attributes:
        prev_op: qualified name of the op that received ``1/s``.
        linears: qualified names of the linears that received ``s``.
        scales: ``(in,)``.
        best_ratio: the searched exponent.
        loss_history: the search loss of every grid point.
    """

    prev_op: str
    linears: tuple[str, ...]
    scales: torch.Tensor
    best_ratio: float
    loss_history: list[float]


@dataclass
class AWQModelResult:
    """What :func:`awq_quantize_model` applied, enough to replay it with :func:`apply_awq_results`.

    Attributes:
        scales: the scale groups in the order applied.
        clips: qualified linear name -> clip threshold ``(out, n_groups)``.
    """

    scales: list[AWQScaleRecord] = field(default_factory=list)
    clips: dict[str, torch.Tensor] = field(default_factory=dict)


class _StopForward(Exception):
    """Raised by the hook on block 0 once its inputs are captured (nothing after it needs to run)."""


def _calibration_tokens(calibration: torch.Tensor | Sequence[torch.Tensor]) -> torch.Tensor:
    if isinstance(calibration, torch.Tensor):
        batches = [calibration]
    elif isinstance(calibration, Sequence) and len(calibration) > 0:
        batches = list(calibration)
    else:
        raise TypeError("calibration_batches must be a token tensor (batch, seq) or a non-empty list of them")
    for i, b in enumerate(batches):
        if not isinstance(b, torch.Tensor) or b.ndim != 2 or b.is_floating_point() or b.dtype == torch.bool:
            shown = f"{b.dtype} {tuple(b.shape)}" if isinstance(b, torch.Tensor) else type(b).__name__
            raise TypeError(f"calibration batch {i} must be an integer tensor (batch, seq), got {shown}")
        if b.shape[1] != batches[0].shape[1]:
            raise ValueError(
                f"calibration batches must share one sequence length (they run as one batch, as in the "
                f"reference); batch 0 has {batches[0].shape[1]}, batch {i} has {b.shape[1]}"
            )
    return torch.cat(batches, dim=0)  # (n_samples, seq)


def _capture_first_block_input(
    model: nn.Module, block0: nn.Module, tokens: torch.Tensor, adapter: BlockAdapter
) -> tuple[tuple, dict]:
    captured: dict[str, object] = {}

    def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
        captured["args"], captured["kwargs"] = args, kwargs
        raise _StopForward

    handle = block0.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        adapter.run_model(model, tokens)
    except _StopForward:
        pass
    finally:
        handle.remove()
    if "args" not in captured:
        raise RuntimeError("the model never called its first block; check adapter.get_blocks / run_model")
    return captured["args"], captured["kwargs"]


def _get(block: nn.Module, name: str, what: str) -> nn.Module:
    try:
        return block.get_submodule(name)
    except AttributeError as err:
        raise ValueError(f"{what} {name!r} is not a submodule of the block {type(block).__name__}") from err


def _set_submodule(root: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent_name) if parent_name else root, child, module)


def _run_block_capturing(
    block: nn.Module, args: tuple, kwargs: dict, inspect_names: set[str]
) -> tuple[object, dict[str, torch.Tensor], dict[str, tuple[tuple, dict]]]:
    """Run ``block`` once; record every linear's input and the extra arguments of inspected modules."""
    feats: dict[str, list[torch.Tensor]] = {}
    calls: dict[str, tuple[tuple, dict]] = {}
    handles = []
    for name, m in block.named_modules():
        if isinstance(m, nn.Linear):

            def keep_input(mod: nn.Module, inp: tuple, out: object, name: str = name) -> None:
                feats.setdefault(name, []).append(inp[0].detach())

            handles.append(m.register_forward_hook(keep_input))
        if name in inspect_names:

            def keep_call(mod: nn.Module, a: tuple, kw: dict, name: str = name) -> None:
                calls.setdefault(name, (a[1:], dict(kw)))  # everything but the hidden states

            handles.append(m.register_forward_pre_hook(keep_call, with_kwargs=True))
    try:
        out = block(*args, **kwargs)
    finally:
        for h in handles:
            h.remove()
    # torch.cat copies: each linear gets its own tensor (q/k/v are later divided by s separately).
    return out, {k: torch.cat(v, dim=0) for k, v in feats.items()}, calls


def _resolve_groups(
    block: nn.Module, groups: list[ScaleGroup]
) -> list[tuple[ScaleGroup, nn.Module, list[nn.Linear], nn.Module]]:
    """Look every name up before any work: ``(group, prev_op, linears, inspected module)``."""
    resolved = []
    for g in groups:
        if not isinstance(g, ScaleGroup):
            raise TypeError(f"adapter.scale_groups must return ScaleGroup objects, got {type(g).__name__}")
        prev = _get(block, g.prev_op, "ScaleGroup prev_op")
        linears = [_get(block, n, "ScaleGroup linear") for n in g.linears]
        for name, lin in zip(g.linears, linears, strict=True):
            if not isinstance(lin, nn.Linear):
                raise TypeError(f"ScaleGroup linear {name!r} must be an nn.Linear, got {type(lin).__name__}")
        inspected = linears[0] if g.inspect is None else _get(block, g.inspect, "ScaleGroup inspect module")
        resolved.append((g, prev, linears, inspected))
    return resolved


def _block_input(feats: dict[str, torch.Tensor], name: str) -> torch.Tensor:
    if name not in feats:
        raise ValueError(f"linear {name!r} was not called during the block's forward; it has no inputs")
    return feats[name]


def _inspect_call(calls: dict[str, tuple[tuple, dict]], name: str) -> tuple[tuple, dict]:
    if name not in calls:
        raise ValueError(f"inspect module {name!r} was not called during the block's forward")
    return calls[name]


def _scalable_prev_op(root: nn.Module, name: str, prev: nn.Module, s: torch.Tensor) -> nn.Module:
    """``prev``, or for a parameter-free activation a :class:`ScaledActivation` installed in its place."""
    if isinstance(prev, (nn.Linear, ScaledActivation)) or isinstance(
        getattr(prev, "weight", None), torch.Tensor
    ):
        return prev
    wrapped = ScaledActivation(prev, torch.ones_like(s))  # somewhere to keep 1/s, as the reference does
    _set_submodule(root, name, wrapped)
    return wrapped


@torch.no_grad()
def awq_quantize_model(
    model: nn.Module,
    calibration_batches: torch.Tensor | Sequence[torch.Tensor],
    adapter: BlockAdapter,
    n_bits: int = 4,
    group_size: int | None = 128,
    n_grid: int = 20,
    zero_point: bool = True,
    auto_scale: bool = True,
    auto_clip: bool = True,
    quantize: bool = True,
    clip_n_grid: int = 20,
    max_shrink: float = 0.5,
    n_sample_tokens: int = 512,
    oc_batch_size: int | None = None,
    clip_method: Literal["reference", "matmul"] = "reference",
) -> AWQModelResult:
    """Run AWQ block by block on ``model`` in place, like the reference's ``run_awq``.

    The inputs of block 0 are captured on the calibration tokens (run as one batch). For each block:

    1. run the full-precision block once, recording every linear's input and the extra arguments of
       the inspected modules; its output becomes the next block's input (so every block is calibrated
       on full-precision activations, as in the reference);
    2. search a scale for every :class:`ScaleGroup` (:func:`search_block_scales`), all on the original
       weights, then fold them in order (:func:`apply_scale`) and divide the recorded inputs by them;
    3. search a clip threshold for every linear except those matching ``adapter.no_clip``
       (:func:`search_clip`, on scaled weights and inputs), then clamp;
    4. fake-quantize every linear of the block with :func:`awq_quantize` (unless ``quantize=False``).

    With ``quantize=False`` the model is left scaled and clipped in full precision, ready for another
    quantizer (e.g. GPTQ after AWQ); :func:`pseudo_quantize_blocks` finishes the AWQ recipe.

    Args:
        model: the model, modified in place (``copy.deepcopy`` it first to keep the original).
        calibration_batches: token ids ``(n_samples, seq)`` or a list of such tensors of one ``seq``.
        adapter: e.g. :data:`LLAMA_ADAPTER` or :data:`TINY_GPT_ADAPTER`.
        n_bits, group_size, zero_point: the quantizer, as in :func:`awq_quantize`.
        n_grid: grid size of the scale search.
        auto_scale, auto_clip: run the scale / clip search (the paper's ablations turn them off).
        quantize: fake-quantize the linears at the end of each block.
        clip_n_grid, max_shrink, n_sample_tokens, oc_batch_size, clip_method: see :func:`search_clip`.

    Returns:
        An :class:`AWQModelResult` with every scale and clip applied.
    """
    if not isinstance(adapter, BlockAdapter):
        raise TypeError(f"adapter must be a BlockAdapter, got {type(adapter).__name__}")
    n_bits = _check_n_bits(n_bits, zero_point)
    n_grid = _check_n_grid(n_grid)
    tokens = _calibration_tokens(calibration_batches)
    if auto_clip:  # fail now rather than after the first block's scale search
        _check_n_grid(clip_n_grid)
        check_probability(max_shrink, "max_shrink")
        if check_int(n_sample_tokens, "n_sample_tokens") > tokens.numel():
            raise ValueError(
                f"the clip search needs at least n_sample_tokens={n_sample_tokens} calibration tokens, got "
                f"{tokens.numel()} ({tuple(tokens.shape)}); pass n_sample_tokens <= {tokens.numel()}"
            )
    blocks = adapter.get_blocks(model)
    if len(blocks) == 0:
        raise ValueError("adapter.get_blocks(model) returned no blocks")
    qualified = {id(m): name for name, m in model.named_modules()}
    result = AWQModelResult()

    args, kwargs = _capture_first_block_input(model, blocks[0], tokens, adapter)
    for block in blocks:
        prefix = qualified[id(block)] + "."
        groups = _resolve_groups(block, adapter.scale_groups(block) if auto_scale else [])
        inspect_names = {g.inspect for g, *_ in groups if g.inspect is not None}
        out, feats, calls = _run_block_capturing(block, args, kwargs, inspect_names)
        args = (_first_output(out), *args[1:])  # the next block sees full-precision activations

        # 2. scales: search every group on the original weights, then fold them in, in order.
        searched = []
        for g, prev, linears, inspected in groups:
            x = _block_input(feats, g.linears[0])
            extra_args, extra_kwargs = ((), {}) if g.inspect is None else _inspect_call(calls, g.inspect)

            def block_fn(t: torch.Tensor, m=inspected, a=extra_args, kw=extra_kwargs) -> object:
                return m(t, *a, **kw)

            res = search_block_scales(linears, x, block_fn, n_bits, group_size, n_grid, zero_point)
            searched.append((g, prev, linears, res))
        for g, prev, linears, res in searched:
            prev = _scalable_prev_op(block, g.prev_op, prev, res.scales)
            apply_scale(prev, linears, res.scales)
            for name in g.linears:  # the clip search sees the scaled inputs X / s
                feats[name] = feats[name] / res.scales.view(1, -1).to(feats[name].dtype)
            result.scales.append(
                AWQScaleRecord(
                    prefix + g.prev_op,
                    tuple(prefix + n for n in g.linears),
                    res.scales,
                    res.best_ratio,
                    res.loss_history,
                )
            )

        # 3. clipping: search every linear (but q, k), then clamp; each search reads only its own weight.
        named_linears = {n: m for n, m in block.named_modules() if isinstance(m, nn.Linear)}
        if auto_clip:
            clips = {
                name: search_clip(
                    lin.weight.data,
                    _block_input(feats, name),
                    n_bits=n_bits,
                    group_size=group_size,
                    n_grid=clip_n_grid,
                    max_shrink=max_shrink,
                    n_sample_tokens=n_sample_tokens,
                    oc_batch_size=oc_batch_size,
                    zero_point=zero_point,
                    method=clip_method,
                )
                for name, lin in named_linears.items()
                if not any(pattern in name for pattern in adapter.no_clip)
            }
            for name, max_val in clips.items():
                lin = named_linears[name]
                lin.weight.data = apply_clip(lin.weight.data, max_val)
                result.clips[prefix + name] = max_val

        # 4. quantization of every linear in the block.
        if quantize:
            for lin in named_linears.values():
                lin.weight.data = awq_quantize(lin.weight.data, n_bits, group_size, zero_point)
    return result


@torch.no_grad()
def apply_awq_results(model: nn.Module, result: AWQModelResult) -> None:
    """Replay saved scales and clips on a fresh copy of the model (the reference's ``apply_awq``).

    Args:
        model: the same architecture the results were computed on, modified in place.
        result: from :func:`awq_quantize_model`.

    Returns:
        None. Quantize afterwards with :func:`pseudo_quantize_blocks`.
    """
    for rec in result.scales:
        prev = _scalable_prev_op(model, rec.prev_op, _get(model, rec.prev_op, "prev_op"), rec.scales)
        apply_scale(prev, [_get(model, n, "linear") for n in rec.linears], rec.scales)
    for name, max_val in result.clips.items():
        lin = _get(model, name, "linear")
        lin.weight.data = apply_clip(lin.weight.data, max_val)


@torch.no_grad()
def pseudo_quantize_blocks(
    model: nn.Module,
    adapter: BlockAdapter,
    n_bits: int = 4,
    group_size: int | None = 128,
    zero_point: bool = True,
) -> None:
    """Fake-quantize every ``nn.Linear`` inside the adapter's blocks with :func:`awq_quantize`, in place.

    Embeddings and the LM head are outside the blocks and stay in full precision, as in the reference.

    Args:
        model: the model.
        adapter: names its blocks.
        n_bits, group_size, zero_point: as in :func:`awq_quantize`.

    Returns:
        None.
    """
    for block in adapter.get_blocks(model):
        for m in block.modules():
            if isinstance(m, nn.Linear):
                m.weight.data = awq_quantize(m.weight.data, n_bits, group_size, zero_point)
