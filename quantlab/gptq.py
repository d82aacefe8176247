"""GPTQ: one-shot weight quantization with second-order error feedback, built from scratch.

A linear layer ``y = x Wᵀ`` is quantized column by column (one input feature at a time). After each
column is rounded, its rounding error is pushed onto the columns that are still unquantized, in the
direction that hurts the layer's output least. "Least" is measured by the layer-wise proxy loss
(GPTQ, Eq. 1)::

    ||W Xᵀ - Q Xᵀ||²  ∝  tr((W - Q) H (W - Q)ᵀ),      H = 2/n Σ_tokens x xᵀ   (in, in)

which splits into independent rows sharing one Hessian ``H``. For one column ``q`` and the set ``F``
of columns still free, the Optimal Brain Surgeon step (OBS, Hassibi & Stork 1993; GPTQ Eq. 2) is::

    δ_F  = -(w_q - quant(w_q)) / [H_F⁻¹]_qq · (H_F⁻¹)_{q,:}          update of the free weights
    loss =  (w_q - quant(w_q))² / [H_F⁻¹]_qq / 2                      increase of ½ tr(ΔW H ΔWᵀ)

and removing ``q`` from ``F`` is one step of Gaussian elimination on ``H⁻¹`` (GPTQ Eq. 3)::

    H_{F\\q}⁻¹ = (H_F⁻¹ - (H_F⁻¹)_{:,q} (H_F⁻¹)_{q,:} / [H_F⁻¹]_qq)   with row and column q dropped.

:func:`gptq_quantize_reference` does exactly this, one column at a time: slow, plain, the teaching
reference. :func:`gptq_quantize` is the fast algorithm of the paper and of its reference code,
reproducing the reference's order of operations so that its codes match it:

1. **Per-row parameters** (no groups) come from the min-max quantizer of :mod:`quantlab.uniform`
   fitted on the *original* ``W``, before anything else touches it.
2. **Dead inputs** (``diag(H) == 0``: a feature that was always 0 on the calibration set) get
   ``H_ii = 1`` and ``W[:, i] = 0``; they quantize to exactly 0 and exchange no updates.
3. **Static groups** (``static_groups=True``): every group's parameters are fitted up front, on
   the weights after step 2, in the original column order (before any error feedback).
4. **Act-order** (``act_order=True``): columns are visited by decreasing ``diag(H)`` (after step 2);
   ``W`` and ``H`` are permuted and everything is returned in the original order at the end.
5. **Damping**: ``damp · mean(diag(H))`` is added to the diagonal (after the permutation).
6. **Cholesky reformulation** (GPTQ Sec. 4, Step 3): ``H⁻¹ = cholesky_inverse(cholesky(H))`` and its
   *upper* Cholesky factor ``U`` (``H⁻¹ = UᵀU``). Row ``q`` of ``U`` already holds every
   elimination of Eq. 3: ``[H_F⁻¹]_qq = U_qq²`` and ``(H_F⁻¹)_{q,F} / [H_F⁻¹]_qq = U_{q,F} / U_qq``,
   so the update is ``err = (w_q - quant(w_q)) / U_qq`` and ``W_F -= err ⊗ U_{q,F}``.
7. **Lazy batch updates** (GPTQ Sec. 4, Step 2): columns are processed in blocks of ``block_size``.
   Inside a block the updates go to a copy of the block (``W1``); the columns after the block get
   all of the block's updates at once, ``W[:, end:] -= Err1 @ U[block, end:]``.
8. **Dynamic groups** (``group_size`` without ``static_groups``): when the first column of a group
   is reached, its parameters are fitted on ``W[:, start:start + group_size]`` -- the full matrix,
   which holds every update from the *previous blocks* but none of the lazy updates of the
   *current* block (those live in ``W1``). When ``block_size`` divides ``group_size`` (the usual
   128/128) every group starts a block and the slice is fully up to date; with, say,
   ``group_size=32, block_size=128`` the groups starting mid-block are fitted on slightly stale
   weights, while the columns themselves are rounded from the up-to-date ``W1``. We reproduce this
   on purpose (the codes must match the reference); ``block_size=1`` gives the "fresh" variant.
   With act-order, dynamic groups are runs of consecutive columns in the *permuted* order.

Everything runs in float32, as the reference does. The model-level driver
(:func:`gptq_quantize_model`) quantizes a transformer block by block, feeding each block the
activations of the already-quantized blocks before it (GPTQ Sec. 5, "sequential"); a small
:class:`LayerAdapter` says where a model's blocks and linears live.

References:
    Frantar, Ashkboos, Hoefler, Alistarh, "GPTQ: Accurate Post-Training Quantization for Generative
    Pre-trained Transformers", ICLR 2023 (Eqs. 1-3, Sec. 4 Steps 1-3); reference code
    https://github.com/IST-DASLab/gptq (``gptq.py``, ``quant.py``, ``llama.py``).
    Frantar & Alistarh, "Optimal Brain Compression", NeurIPS 2022 (OBQ, the column-by-column method).
    Hassibi & Stork, "Second Order Derivatives for Network Pruning: Optimal Brain Surgeon", NIPS 1993.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

import torch
import torch.nn as nn

from quantlab._checks import check_float_tensor, check_group_size, check_int, check_n_bits, check_positive
from quantlab.uniform import _minmax_params, dequantize, minmax_params, quantize

__all__ = [
    "ADAPTERS",
    "GPTQ",
    "GPTQModelReport",
    "GPTQResult",
    "GPTQStep",
    "HessianAccumulator",
    "LayerAdapter",
    "LayerReport",
    "QuantizedWeight",
    "get_adapter",
    "gptq_quantize",
    "gptq_quantize_model",
    "gptq_quantize_reference",
    "proxy_loss",
    "rtn_quantize",
]


# -----------------------------------------------------------------------------
# Results


@dataclass
class QuantizedWeight:
    """A weight matrix quantized with the min-max quantizer, in the original column order.

    Attributes:
        Q: dequantized weights ``(out, in)``, float32; ``Q == scale * (codes - zero_point)`` exactly.
        codes: integer codes in ``[0, 2^n_bits - 1]``, ``(out, in)``; uint8 up to 8 bits, else int32
            (as :mod:`quantlab.granularity`; convert before subtracting: ``codes.float() - zero_point``).
        scale: the step of the grid each weight was rounded on, expanded per column ``(out, in)``.
        zero_point: the matching zero-points ``(out, in)`` (integer-valued floats).
        group_scale: per-group scales ``(out, n_groups)``, or None without groups.
        group_zero_point: per-group zero-points ``(out, n_groups)``, or None.
        g_idx: ``(in,)`` int64, the group of every (original) column, or None without groups;
            ``scale[:, c] == group_scale[:, g_idx[c]]``.
        n_bits, group_size, symmetric: the quantizer's configuration.
    """

    Q: torch.Tensor
    codes: torch.Tensor
    scale: torch.Tensor
    zero_point: torch.Tensor
    group_scale: torch.Tensor | None
    group_zero_point: torch.Tensor | None
    g_idx: torch.Tensor | None
    n_bits: int
    group_size: int | None
    symmetric: bool


@dataclass
class GPTQStep:
    """A snapshot taken right after one column was quantized (for ``trace=True`` or a ``callback``).

    Attributes:
        step: how many columns were quantized before this one (0-based position in processing order).
        column: the original index of the column just quantized.
        W: the working weights ``(out, in)`` in the original order, with every pending (lazy) update
            applied: quantized columns hold their final values, the others their error-compensated ones.
        quantized: ``(in,)`` bool, which original columns are quantized now.
        codes: ``(out,)`` the codes of this column; ``scale``/``zero_point``: ``(out,)`` its grid.
        error: the OBS loss accumulated so far (sum over quantized columns).
    """

    step: int
    column: int
    W: torch.Tensor
    quantized: torch.Tensor
    codes: torch.Tensor
    scale: torch.Tensor
    zero_point: torch.Tensor
    error: float


@dataclass
class GPTQResult(QuantizedWeight):
    """What :func:`gptq_quantize` returns: a :class:`QuantizedWeight` plus GPTQ's own bookkeeping.

    Attributes:
        perm: ``(in,)`` int64, the order columns were processed in (``argsort(diag(H), descending)``
            with act-order, the identity otherwise); all other tensors are in the original order.
        error: the summed OBS loss ``Σ (w - q)² / [H_F⁻¹]_qq / 2`` (GPTQ's reported "error"); equals
            ``proxy_loss(W0, Q, H_damped) / 2`` up to float rounding, ``W0`` being ``W`` with dead
            columns zeroed and ``H_damped`` the damped Hessian.
        losses: ``(out, in)`` the per-weight terms of ``error``.
        dead: ``(in,)`` bool, the columns with ``diag(H) == 0``.
        damp_value: the number added to ``diag(H)``, ``damp * mean(diag(H))``.
        act_order, static_groups, block_size, damp: the configuration used.
        trace: the per-column :class:`GPTQStep` snapshots when called with ``trace=True``, else None.
    """

    perm: torch.Tensor
    error: float
    losses: torch.Tensor
    dead: torch.Tensor
    damp_value: float
    act_order: bool
    static_groups: bool
    block_size: int
    damp: float
    trace: list[GPTQStep] | None = None


# -----------------------------------------------------------------------------
# Input checks


def _check_bool(value: object, name: str) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {value!r} of type {type(value).__name__}")
    return value


def _check_config(
    n_bits: object,
    group_size: object,
    symmetric: object,
    act_order: object,
    static_groups: object,
    block_size: object,
    damp: object,
    in_features: int | None = None,
) -> tuple[int, int | None, bool, bool, bool, int, float]:
    """Validate the GPTQ configuration; ``in_features`` (when known) checks that groups tile the row."""
    n_bits = check_n_bits(n_bits, 1, 16)
    if group_size is not None:
        if in_features is None:
            group_size = check_int(group_size, "group_size")
            if group_size <= 0:
                raise ValueError(f"group_size must be a positive int or None, got {group_size}")
        else:
            group_size = check_group_size(group_size, in_features)
    symmetric = _check_bool(symmetric, "symmetric")
    act_order = _check_bool(act_order, "act_order")
    static_groups = _check_bool(static_groups, "static_groups")
    if static_groups and group_size is None:
        raise ValueError("static_groups=True needs a group_size (static groups are per-group parameters)")
    block_size = check_int(block_size, "block_size")
    if block_size <= 0:
        raise ValueError(f"block_size must be a positive int (128 in the paper), got {block_size}")
    damp = check_positive(damp, "damp", allow_zero=True)
    return n_bits, group_size, symmetric, act_order, static_groups, block_size, damp


def _check_weight_and_hessian(W: object, H: object) -> tuple[torch.Tensor, torch.Tensor]:
    """Check ``W`` ``(out, in)`` and ``H`` ``(in, in)``; return float32 copies (the reference's dtype)."""
    check_float_tensor(W, "W", ndim=2)
    check_float_tensor(H, "H", ndim=2)
    if H.shape[0] != H.shape[1]:
        raise ValueError(f"H must be square (in_features, in_features), got shape {tuple(H.shape)}")
    if H.shape[0] != W.shape[1]:
        raise ValueError(
            f"H must be (in_features, in_features) = ({W.shape[1]}, {W.shape[1]}) for W of shape "
            f"{tuple(W.shape)}, got {tuple(H.shape)}"
        )
    if H.device != W.device:
        raise ValueError(f"W and H must be on the same device, got {W.device} and {H.device}")
    W = W.detach().to(torch.float32).clone()
    H = H.detach().to(torch.float32).clone()
    # XᵀX accumulated in float32 is symmetric up to rounding; allow 1000 ulps of the largest entry,
    # far above rounding noise and far below any genuinely non-symmetric matrix.
    tol = 1000 * torch.finfo(torch.float32).eps * float(H.abs().max())
    asym = float((H - H.T).abs().max())
    if asym > tol:
        raise ValueError(
            f"H must be symmetric (a Hessian 2/n XᵀX), got max|H - Hᵀ| = {asym:.3g} > tolerance {tol:.3g}"
        )
    return W, H


# -----------------------------------------------------------------------------
# Small parts: the loss, the baseline, the Hessian preparation


def proxy_loss(W: torch.Tensor, Q: torch.Tensor, H: torch.Tensor) -> float:
    """The layer-wise proxy loss ``tr((W - Q) H (W - Q)ᵀ)`` (GPTQ Eq. 1 with ``H = 2/n XᵀX``).

    With ``H = 2/n XᵀX`` this is ``2/n ||W Xᵀ - Q Xᵀ||²_F``: the squared error of the layer's outputs.

    Args:
        W: original weights ``(out, in)``.
        Q: quantized weights ``(out, in)``.
        H: Hessian proxy ``(in, in)``.

    Returns:
        The loss as a Python float (computed in float64).

    >>> proxy_loss(torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 0.0]]), torch.eye(2))
    1.0
    """
    check_float_tensor(W, "W", ndim=2)
    check_float_tensor(Q, "Q", ndim=2)
    check_float_tensor(H, "H", ndim=2)
    if Q.shape != W.shape or H.shape != (W.shape[1], W.shape[1]):
        raise ValueError(
            f"need W (out, in), Q of the same shape and H (in, in); got {tuple(W.shape)}, "
            f"{tuple(Q.shape)}, {tuple(H.shape)}"
        )
    D = (W - Q).double()  # (out, in)
    return float(((D @ H.double()) * D).sum())


def _group_params(W: torch.Tensor, n_bits: int, group_size: int, symmetric: bool) -> tuple[torch.Tensor, ...]:
    """Min-max parameters of every group of ``group_size`` consecutive columns: two ``(out, n_groups)``."""
    out, n = W.shape
    n_groups = n // group_size
    grouped = W.reshape(out * n_groups, group_size)  # (out * n_groups, group_size)
    # No input checks: the callers checked W (the fit runs once per layer, or per block in GPTQ).
    scale, zero_point = _minmax_params(grouped, 2**n_bits - 1, symmetric)  # (out * n_groups, 1) each
    return scale.reshape(out, n_groups), zero_point.reshape(out, n_groups)  # (out, n_groups) each


def rtn_quantize(
    W: torch.Tensor, n_bits: int = 4, group_size: int | None = None, symmetric: bool = False
) -> QuantizedWeight:
    """Round-to-nearest with GPTQ's min-max quantizer: the baseline GPTQ is measured against.

    Same grid as :func:`gptq_quantize` (per row, or per group of ``group_size`` columns), no error
    feedback. :func:`gptq_quantize` with ``H = I`` returns exactly these codes.

    Args:
        W: weights ``(out, in)``, any float dtype (computed in float32).
        n_bits: 1..16.
        group_size: columns per group (must divide ``in``), or None for one grid per row.
        symmetric: the symmetric min-max variant (zero-point ``2^b / 2``).

    Returns:
        A :class:`QuantizedWeight`.

    >>> rtn_quantize(torch.tensor([[1.0, 0.2, -0.5]]), n_bits=2).codes
    tensor([[3, 1, 0]], dtype=torch.uint8)
    """
    check_float_tensor(W, "W", ndim=2)
    n_bits, group_size, symmetric, *_ = _check_config(
        n_bits, group_size, symmetric, False, False, 1, 0.0, in_features=W.shape[1]
    )
    W = W.detach().to(torch.float32)
    maxq = 2**n_bits - 1
    if group_size is None:
        row_scale, row_zero = minmax_params(W, n_bits, symmetric)  # (out, 1) each
        scale, zero_point = row_scale.expand_as(W).clone(), row_zero.expand_as(W).clone()  # (out, in)
        group_scale = group_zero = g_idx = None
    else:
        group_scale, group_zero = _group_params(W, n_bits, group_size, symmetric)  # (out, n_groups)
        scale = group_scale.repeat_interleave(group_size, dim=1)  # (out, in)
        zero_point = group_zero.repeat_interleave(group_size, dim=1)  # (out, in)
        g_idx = torch.arange(W.shape[1], device=W.device) // group_size  # (in,)
    codes = quantize(W, scale, zero_point, 0, maxq)  # (out, in)
    Q = dequantize(codes, scale, zero_point)  # (out, in)
    return QuantizedWeight(
        Q=Q,
        codes=codes.to(_codes_dtype(n_bits)),
        scale=scale,
        zero_point=zero_point,
        group_scale=group_scale,
        group_zero_point=group_zero,
        g_idx=g_idx,
        n_bits=n_bits,
        group_size=group_size,
        symmetric=symmetric,
    )


def _codes_dtype(n_bits: int) -> torch.dtype:
    """The smallest integer dtype holding unsigned ``n_bits`` codes (uint8 up to 8 bits)."""
    return torch.uint8 if n_bits <= 8 else torch.int32


def _fix_dead(W: torch.Tensor, H: torch.Tensor) -> torch.Tensor:
    """Step 2: inputs never seen (``diag(H) == 0``) get ``H_ii = 1`` and ``W[:, i] = 0`` (in place)."""
    dead = torch.diag(H) == 0  # (in,)
    idx = dead.nonzero().flatten()
    H[idx, idx] = 1.0
    W.index_fill_(1, idx, 0.0)  # W[:, dead] = 0, without a boolean-mask pass when nothing is dead
    return dead


def _damp_(H: torch.Tensor, damp: float) -> float:
    """Step 5: add ``damp * mean(diag(H))`` to the diagonal of ``H`` (in place); return that value."""
    value = damp * torch.mean(torch.diag(H))
    idx = torch.arange(H.shape[0], device=H.device)
    H[idx, idx] += value
    return float(value)


def _cholesky(H: torch.Tensor, damp: float, upper: bool = False) -> torch.Tensor:
    try:
        return torch.linalg.cholesky(H, upper=upper)
    except torch.linalg.LinAlgError as e:
        raise ValueError(
            f"H is not positive definite even after damping with damp={damp} (x mean(diag(H))); "
            f"pass a larger damp (e.g. {max(10 * damp, 0.01):g}) or more calibration tokens"
        ) from e


def _inverse_hessian_factor(H: torch.Tensor, damp: float) -> torch.Tensor:
    """Step 6: the upper Cholesky factor ``U`` of ``H⁻¹`` (``H⁻¹ = UᵀU``), ``(in, in)``."""
    L = _cholesky(H, damp)  # (in, in) lower, H = L Lᵀ
    Hinv = torch.cholesky_inverse(L)  # (in, in)
    return _cholesky(Hinv, damp, upper=True)  # (in, in) upper


def _round_to_grid(
    w: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor,
    maxq: int,
    out: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Round one column ``w`` ``(out,)`` on its grid ``scale``, ``zero_point`` ``(out,)``: ``(codes, q)``.

    The arithmetic of :func:`quantlab.uniform.minmax_fake_quantize` (``clamp(round(w / s) + z, 0, maxq)``,
    then ``s * (codes - z)``), without its per-call input checks: GPTQ calls this once per column
    (4096 times for a 4096-wide layer) on values already checked. With ``out=(codes, q)`` the results
    are written into those two ``(out,)`` tensors instead of new ones (the same operations, in place).
    """
    if out is None:
        codes = torch.clamp(torch.round(w / scale) + zero_point, 0, maxq)  # (out,)
        return codes, scale * (codes - zero_point)  # (out,) each
    codes, q = out
    torch.div(w, scale, out=codes).round_().add_(zero_point).clamp_(0, maxq)
    torch.sub(codes, zero_point, out=q).mul_(scale)  # (codes - z) * s == s * (codes - z), bit for bit
    return codes, q


def _pack_groups(
    scale_cols: torch.Tensor, zero_cols: torch.Tensor, g_idx: torch.Tensor, n_groups: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-group parameters ``(out, n_groups)`` read off the per-column ones via ``g_idx``."""
    first = torch.full((n_groups,), -1, dtype=torch.long, device=g_idx.device)
    cols = torch.arange(g_idx.numel(), device=g_idx.device)
    first.scatter_reduce_(0, g_idx, cols, reduce="amax", include_self=True)  # any member column
    return scale_cols[:, first], zero_cols[:, first]  # (out, n_groups) each


# -----------------------------------------------------------------------------
# GPTQ, the fast blocked algorithm (GPTQ Sec. 4)


def gptq_quantize(
    W: torch.Tensor,
    H: torch.Tensor,
    n_bits: int = 4,
    group_size: int | None = None,
    symmetric: bool = False,
    act_order: bool = False,
    static_groups: bool = False,
    block_size: int = 128,
    damp: float = 0.01,
    *,
    trace: bool = False,
    callback: Callable[[GPTQStep], None] | None = None,
) -> GPTQResult:
    """Quantize ``W`` with GPTQ (Algorithm 1 of the paper), matching the IST-DASLab reference code.

    See the module docstring for the order of operations (steps 1-8) and the one subtlety of dynamic
    groups (their parameters are fitted on ``W`` without the current block's lazy updates).

    Args:
        W: weights ``(out_features, in_features)``, any float dtype (computed in float32).
        H: Hessian proxy ``(in_features, in_features)``, symmetric, e.g. ``2/n XᵀX`` from
            :class:`HessianAccumulator`. Scaling ``H`` by a constant changes nothing but ``error``.
        n_bits: bits per code, 1..16; codes are in ``[0, 2^n_bits - 1]``.
        group_size: columns sharing one ``(scale, zero_point)`` per row; must divide ``in_features``.
            None: one grid per row, fitted on the original ``W``.
        symmetric: symmetric min-max grid (zero-point ``2^b / 2``) instead of the asymmetric one.
        act_order: process columns by decreasing ``diag(H)`` (the "desc_act" heuristic).
        static_groups: fit all group grids up front on the (un-permuted, un-updated) weights; with
            act-order, column ``c`` uses group ``c // group_size``. Needs ``group_size``.
        block_size: columns per lazy-update block (the result does not depend on it except through
            the dynamic-group subtlety; ``block_size=1`` is plain column-by-column GPTQ).
        damp: dampening, a fraction of ``mean(diag(H))`` added to the diagonal (the reference's
            ``percdamp``); raise it if ``H`` is not positive definite.
        trace: also return a :class:`GPTQStep` snapshot after every column in ``result.trace``
            (``in_features`` copies of ``W``: for small layers, e.g. in a lab).
        callback: called with a :class:`GPTQStep` after every column (same snapshots, not stored).

    Returns:
        A :class:`GPTQResult`: ``Q``, ``codes``, per-column ``scale``/``zero_point`` ``(out, in)``,
        ``perm``, ``error``, per-group parameters ``(out, n_groups)`` and ``g_idx`` with groups.

    >>> W = torch.tensor([[1.0, 0.2, 0.2, -0.5]])
    >>> H = torch.tensor([[1.0, 0, 0, 0], [0, 2, 1, 0], [0, 1, 2, 0], [0, 0, 0, 1]])
    >>> r = gptq_quantize(W, H, n_bits=2, damp=0.0)
    >>> r.codes, round(r.error, 6)
    (tensor([[3, 1, 2, 0]], dtype=torch.uint8), 0.07)
    """
    W, H = _check_weight_and_hessian(W, H)
    n_bits, group_size, symmetric, act_order, static_groups, block_size, damp = _check_config(
        n_bits, group_size, symmetric, act_order, static_groups, block_size, damp, in_features=W.shape[1]
    )
    if callback is not None and not callable(callback):
        raise TypeError(f"callback must be callable or None, got {type(callback).__name__}")
    trace = _check_bool(trace, "trace")
    out, n = W.shape
    maxq = 2**n_bits - 1

    # Step 1: per-row grid on the original W (only needed without groups).
    if group_size is None:
        scale, zero_point = _minmax_params(W, maxq, symmetric)  # (out, 1) each; W was checked above
        row_params = (scale.flatten(), zero_point.flatten())  # (out,) each
    # Step 2: dead inputs.
    dead = _fix_dead(W, H)
    # Step 3: static groups, fitted before any permutation or update.
    static = _group_params(W, n_bits, group_size, symmetric) if static_groups else None
    # Step 4: act-order permutation.
    if act_order:
        perm = torch.argsort(torch.diag(H), descending=True)  # (in,)
        W = W[:, perm]
        H = H[perm][:, perm]
    else:
        perm = torch.arange(n, device=W.device)  # (in,)
    invperm = torch.argsort(perm)  # (in,)
    # Steps 5-6: damping, then the upper Cholesky factor of H⁻¹.
    damp_value = _damp_(H, damp)
    U = _inverse_hessian_factor(H, damp)  # (in, in)
    del H

    Q = torch.zeros_like(W)  # (out, in), processing order until the end
    codes = torch.zeros_like(W)
    losses = torch.zeros_like(W)
    if static is not None:  # group g's grid as two contiguous (out,) rows
        static_grids = list(zip(static[0].t().contiguous(), static[1].t().contiguous(), strict=True))
    dynamic: list[tuple[torch.Tensor, torch.Tensor]] = []  # dynamic groups' params, processing order
    order = perm.tolist()
    watch = trace or callback is not None
    snapshots: list[GPTQStep] | None = [] if trace else None
    error_done = 0.0  # loss of the finished blocks, for snapshots only

    # Step 7: blocks with lazy batch updates. Inside a block we work on the *transposed* block
    # (count, out): column i of the block is the contiguous row W1t[i], so reading, rounding and
    # writing a column and the OBS update of the later columns all touch contiguous memory (this
    # per-column loop is the hot path: one pass per input feature). Each number is still computed by
    # the same float operations as in the (out, count) formulas, so the results are bit-identical to
    # them and to the reference code (tests/test_gptq.py compares with a transcription of it).
    for i1 in range(0, n, block_size):
        i2 = min(i1 + block_size, n)
        count = i2 - i1
        W1t = W[:, i1:i2].t().contiguous()  # (count, out): receives the within-block updates
        Q1t = torch.zeros_like(W1t)  # (count, out)
        codes1t = torch.zeros_like(W1t)  # (count, out)
        U1 = U[i1:i2, i1:i2]  # (count, count)
        d1 = torch.diag(U1)  # (count,)
        # Per-column views made once per block rather than indexed once per column: the block's
        # columns, their codes and q (rows, (out,) each), U_qq (0-d) and U1 transposed, whose
        # column slice U1t[i+1:, i:i+1] is U1[i, i+1:] standing up, (count-i-1, 1).
        w_cols, code_cols, q_cols, d_cols = W1t.unbind(), codes1t.unbind(), Q1t.unbind(), d1.unbind()
        U1t = U1.t()  # (count, count)

        # The grid of every column of the block, (out,) each.
        if group_size is None:
            grids = [row_params] * count
        elif static is not None:
            grids = [static_grids[order[col] // group_size] for col in range(i1, i2)]
        else:
            # Step 8: a group is fitted on W (previous blocks' updates only, not W1) when its first
            # column is reached. W does not change while a block is processed (the block's updates
            # go to W1t, the later columns get them after the block), so fitting every group that
            # starts in this block now, before its first column, gives the same grid.
            first = -(-i1 // group_size) * group_size  # the first group start >= i1 (ceiling division)
            for start in range(first, i2, group_size):
                fit = _minmax_params(W[:, start : start + group_size], maxq, symmetric)  # (out, 1) each
                dynamic.append((fit[0].flatten(), fit[1].flatten()))
            grids = [dynamic[col // group_size] for col in range(i1, i2)]

        for i in range(count):
            col = i1 + i
            s, z = grids[i]  # (out,) each
            w = w_cols[i]  # (out,), the column with every update so far
            c, q = _round_to_grid(w, s, z, maxq, out=(code_cols[i], q_cols[i]))  # (out,) each
            err1 = torch.sub(w, q).div_(d_cols[i])  # (out,): (w - q) / U_qq
            # OBS update of the block's later columns, W1[:, i+1:] -= err1 ⊗ U1[i, i+1:], done on the
            # transposed rows. Every entry is one product U1[i, j] * err1[o], rounded once, then
            # subtracted: the same two roundings as the reference's k=1 matrix product followed by
            # -=. Column i itself is left at its pre-rounding value (the reference also updates it,
            # to ~q, but never reads it again), so that W1t ends up holding every column as it was
            # rounded, for the losses below.
            W1t[i + 1 :].sub_(U1t[i + 1 :, i : i + 1] * err1)  # (count-i-1, out)

            if watch:  # the slow path: snapshots use the (out, count) layout of the formulas
                W1, Q1 = W1t.t().contiguous(), Q1t.t().contiguous()  # (out, count) each
                diff = W1[:, : i + 1] - Q1[:, : i + 1]  # (out, i+1): w - q of the block's done columns
                so_far = error_done + float((diff**2 / d1[: i + 1] ** 2).sum()) / 2
                info = GPTQStep(
                    step=col,
                    column=order[col],
                    W=_snapshot(W, Q, W1, Q1, diff / d1[: i + 1], U, i1, i2, i, invperm),
                    quantized=(invperm <= col),
                    codes=c.to(_codes_dtype(n_bits)),
                    scale=s.clone(),
                    zero_point=z.clone(),
                    error=so_far,
                )
                if snapshots is not None:
                    snapshots.append(info)
                if callback is not None:
                    callback(info)

        # Back to the (out, count) layout of W for the block's losses and lazy update: the matrix
        # product below then sees the same memory layout as the reference's, hence rounds the same.
        diff = (W1t - Q1t).t().contiguous()  # (out, count): W1 - Q1
        # Column-wise identical to computing them inside the loop, as the reference does.
        Err1 = diff / d1  # (out, count)
        Losses1 = diff**2 / d1**2  # (out, count)
        Q[:, i1:i2] = Q1t.t()
        codes[:, i1:i2] = codes1t.t()
        losses[:, i1:i2] = Losses1 / 2
        W[:, i2:] -= Err1.matmul(U[i1:i2, i2:])  # (out, in - i2): the block's updates, at once
        if watch:
            error_done += float(Losses1.sum()) / 2

    error = float(torch.sum(losses))
    # Per-column grids, original order (out, in), and per-group ones (out, n_groups).
    g_idx = group_scale = group_zero = None
    if group_size is None:
        scale_cols = row_params[0].unsqueeze(1).expand(out, n).clone()  # (out, in)
        zero_cols = row_params[1].unsqueeze(1).expand(out, n).clone()  # (out, in)
    else:
        if static is not None:
            group_scale, group_zero = static  # (out, n_groups), original column groups
            g_idx = torch.arange(n, device=W.device) // group_size  # (in,)
        else:
            group_scale = torch.stack([p[0] for p in dynamic], dim=1)  # (out, n_groups)
            group_zero = torch.stack([p[1] for p in dynamic], dim=1)  # (out, n_groups)
            g_idx = invperm // group_size  # (in,): position in processing order // group_size
        # index_select(1, idx) is W[:, idx], several times faster for a gather of whole columns.
        scale_cols, zero_cols = group_scale.index_select(1, g_idx), group_zero.index_select(1, g_idx)
    return GPTQResult(
        Q=Q.index_select(1, invperm),  # (out, in), back in the original column order
        codes=codes.index_select(1, invperm).to(_codes_dtype(n_bits)),
        scale=scale_cols,
        zero_point=zero_cols,
        group_scale=group_scale,
        group_zero_point=group_zero,
        g_idx=g_idx,
        n_bits=n_bits,
        group_size=group_size,
        symmetric=symmetric,
        perm=perm,
        error=error,
        losses=losses.index_select(1, invperm),
        dead=dead,
        damp_value=damp_value,
        act_order=act_order,
        static_groups=static_groups,
        block_size=block_size,
        damp=damp,
        trace=snapshots,
    )


def _snapshot(
    W: torch.Tensor,
    Q: torch.Tensor,
    W1: torch.Tensor,
    Q1: torch.Tensor,
    Err1: torch.Tensor,
    U: torch.Tensor,
    i1: int,
    i2: int,
    i: int,
    invperm: torch.Tensor,
) -> torch.Tensor:
    """The working weights with all pending lazy updates applied, original order ``(out, in)``."""
    cur = torch.empty_like(W)  # (out, in), processing order
    cur[:, :i1] = Q[:, :i1]
    cur[:, i1 : i1 + i + 1] = Q1[:, : i + 1]
    cur[:, i1 + i + 1 : i2] = W1[:, i + 1 :]
    cur[:, i2:] = W[:, i2:] - Err1[:, : i + 1].matmul(U[i1 : i1 + i + 1, i2:])
    return cur.index_select(1, invperm)


# -----------------------------------------------------------------------------
# The teaching reference: one column at a time, explicit inverse Hessian (OBQ / GPTQ Eqs. 2-3)


def gptq_quantize_reference(
    W: torch.Tensor,
    H: torch.Tensor,
    n_bits: int = 4,
    group_size: int | None = None,
    symmetric: bool = False,
    act_order: bool = False,
    static_groups: bool = False,
    damp: float = 0.01,
    dtype: torch.dtype = torch.float32,
) -> GPTQResult:
    """Plain column-by-column GPTQ with an explicit ``H⁻¹`` (OBQ's update rule): slow, for teaching.

    For each column ``q`` in processing order (GPTQ Eqs. 2 and 3)::

        codes_q = round(w_q / s) + z (clamped);   e = (w_q - quant(w_q)) / [H⁻¹]_qq
        W[:, F] -= e ⊗ H⁻¹[q, F]                  (F: columns not yet quantized)
        H⁻¹     -= H⁻¹[:, q] H⁻¹[q, :] / [H⁻¹]_qq  (removes q: its row and column become 0)

    Every column costs a rank-1 update of the whole ``H⁻¹`` (``in²`` work, ``in³`` in all), which the
    Cholesky reformulation of :func:`gptq_quantize` avoids. Act-order is just the order columns are
    visited in; no matrix is permuted. Dynamic groups are
    fitted on the fully up-to-date weights (as :func:`gptq_quantize` with ``block_size=1``). Steps
    1-5 of the module docstring (per-row grid, dead inputs, static groups, damping) are the same.

    Args:
        W, H, n_bits, group_size, symmetric, act_order, static_groups, damp: as in :func:`gptq_quantize`.
        dtype: working precision of the updates and of ``H⁻¹`` (float32 like GPTQ, or float64).

    Returns:
        A :class:`GPTQResult` (``block_size`` 1, ``trace`` None).
    """
    W, H = _check_weight_and_hessian(W, H)
    n_bits, group_size, symmetric, act_order, static_groups, _, damp = _check_config(
        n_bits, group_size, symmetric, act_order, static_groups, 1, damp, in_features=W.shape[1]
    )
    if dtype not in (torch.float32, torch.float64):
        raise ValueError(f"dtype must be torch.float32 or torch.float64, got {dtype}")
    out, n = W.shape
    maxq = 2**n_bits - 1

    scale, zero_point = minmax_params(W, n_bits, symmetric)  # (out, 1) each
    dead = _fix_dead(W, H)
    static = _group_params(W, n_bits, group_size, symmetric) if static_groups else None
    if act_order:
        order = torch.argsort(torch.diag(H), descending=True)  # (in,)
    else:
        order = torch.arange(n, device=W.device)  # (in,)
    damp_value = damp * float(torch.mean(torch.diag(H)))
    H = H.to(dtype) + damp_value * torch.eye(n, dtype=dtype, device=H.device)  # (in, in)
    try:
        Hinv = torch.linalg.inv(H)  # (in, in)
    except torch.linalg.LinAlgError as e:
        raise ValueError(f"H is singular even after damping with damp={damp}; pass a larger damp") from e
    W = W.to(dtype)
    scale, zero_point = scale.to(dtype), zero_point.to(dtype)

    Q = torch.zeros_like(W)  # (out, in)
    codes = torch.zeros_like(W)
    losses = torch.zeros_like(W)
    scale_cols = torch.zeros_like(W)
    zero_cols = torch.zeros_like(W)
    free = torch.ones(n, dtype=torch.bool, device=W.device)  # (in,)
    for pos in range(n):
        j = int(order[pos])
        if group_size is not None:
            if static is not None:
                g = j // group_size
                scale, zero_point = static[0][:, g : g + 1].to(dtype), static[1][:, g : g + 1].to(dtype)
            elif pos % group_size == 0:
                cols = order[pos : pos + group_size]
                scale, zero_point = minmax_params(W[:, cols], n_bits, symmetric)  # (out, 1) each
        w = W[:, j]  # (out,)
        c, q = _round_to_grid(w, scale.flatten(), zero_point.flatten(), maxq)
        d = Hinv[j, j]
        if not bool(d > 0):
            raise ValueError(
                f"[H⁻¹]_qq = {float(d):.3g} <= 0 at column {j}: H is not positive definite even after "
                f"damping with damp={damp}; pass a larger damp"
            )
        Q[:, j], codes[:, j] = q, c
        scale_cols[:, j], zero_cols[:, j] = scale.flatten(), zero_point.flatten()
        losses[:, j] = (w - q) ** 2 / d / 2  # GPTQ Eq. 2, the loss
        err = (w - q) / d  # (out,)
        free[j] = False
        W[:, free] -= err.unsqueeze(1) * Hinv[j, free].unsqueeze(0)  # GPTQ Eq. 2, the update
        W[:, j] = q
        Hinv -= Hinv[:, j : j + 1] @ Hinv[j : j + 1, :] / d  # GPTQ Eq. 3: eliminate q

    g_idx = group_scale = group_zero = None
    if group_size is not None:
        positions = torch.argsort(order)  # (in,) position of each column in the processing order
        g_idx = torch.arange(n, device=W.device) // group_size if static_groups else positions // group_size
        group_scale, group_zero = _pack_groups(scale_cols, zero_cols, g_idx, n // group_size)
        group_scale, group_zero = group_scale.float(), group_zero.float()
    return GPTQResult(
        Q=Q.float(),
        codes=codes.to(_codes_dtype(n_bits)),
        scale=scale_cols.float(),
        zero_point=zero_cols.float(),
        group_scale=group_scale,
        group_zero_point=group_zero,
        g_idx=g_idx,
        n_bits=n_bits,
        group_size=group_size,
        symmetric=symmetric,
        perm=order,
        error=float(losses.sum()),
        losses=losses.float(),
        dead=dead,
        damp_value=damp_value,
        act_order=act_order,
        static_groups=static_groups,
        block_size=1,
        damp=damp,
        trace=None,
    )


# -----------------------------------------------------------------------------
# Stateful helpers: the Hessian from calibration activations, one layer at a time


class HessianAccumulator:
    """Accumulate ``H = 2/n Σ x xᵀ`` over calibration batches, exactly as the GPTQ reference does.

    The running average is updated per batch as ``H *= n / (n + m); n += m; X *= sqrt(2 / n);
    H += XᵀX`` where ``m`` counts *samples* (sequences), not tokens, like the reference: a
    ``(batch, seq, in)`` input adds ``batch`` samples, a 2-D ``(tokens, in)`` input adds one. Since GPTQ's
    result does not depend on the scale of ``H``, this only sets the units of ``error``.

    Args:
        in_features: the layer's input width.
        device: where ``H`` lives.

    >>> X = torch.tensor([[1.0, 0.0], [1.0, 2.0]])  # (tokens, in): one sample
    >>> acc = HessianAccumulator(2)
    >>> acc.add_batch(X)
    >>> acc.n_samples, torch.allclose(acc.H, 2 * X.T @ X)
    (1, True)
    """

    def __init__(self, in_features: int, device: torch.device | str | None = None) -> None:
        self.in_features = check_int(in_features, "in_features")
        if self.in_features <= 0:
            raise ValueError(f"in_features must be a positive int, got {in_features}")
        self.H = torch.zeros(self.in_features, self.in_features, dtype=torch.float32, device=device)
        self.n_samples = 0
        self.n_tokens = 0

    def add_batch(self, X: torch.Tensor) -> None:
        """Add the activations ``X`` ``(..., in_features)`` of one calibration batch to ``H``."""
        check_float_tensor(X, "X")
        if X.shape[-1] != self.in_features:
            raise ValueError(
                f"X must have shape (..., {self.in_features}) (in_features last), got {tuple(X.shape)}"
            )
        if X.ndim == 1:
            X = X.unsqueeze(0)  # (1, in)
        m = 1 if X.ndim == 2 else math.prod(X.shape[:-2])
        Xt = X.detach().reshape(-1, self.in_features).t()  # (in, tokens)
        self.H *= self.n_samples / (self.n_samples + m)
        self.n_samples += m
        self.n_tokens += Xt.shape[1]
        Xt = math.sqrt(2 / self.n_samples) * Xt.to(device=self.H.device, dtype=torch.float32)
        self.H += Xt.matmul(Xt.t())  # (in, in)


class GPTQ:
    """GPTQ for one ``nn.Linear``: collect its Hessian from calibration inputs, then quantize it.

    Args:
        layer: the linear layer (its ``weight`` is ``(out, in)``).

    Example::

        g = GPTQ(model.blocks[0].mlp.fc)
        handle = g.register_hook()        # or call g.add_batch(X) yourself
        for batch in calibration: model(batch)
        handle.remove()
        result = g.quantize(n_bits=4, group_size=128)   # writes Q into layer.weight
    """

    def __init__(self, layer: nn.Linear) -> None:
        if not isinstance(layer, nn.Linear):
            raise TypeError(f"layer must be a torch.nn.Linear, got {type(layer).__name__}")
        self.layer = layer
        self.hessian = HessianAccumulator(layer.in_features, device=layer.weight.device)

    @property
    def H(self) -> torch.Tensor:
        """The accumulated Hessian proxy ``(in, in)``."""
        return self.hessian.H

    def add_batch(self, X: torch.Tensor) -> None:
        """Add the layer inputs ``X`` ``(..., in_features)`` (see :class:`HessianAccumulator`)."""
        self.hessian.add_batch(X)

    def register_hook(self) -> torch.utils.hooks.RemovableHandle:
        """Feed every input the layer sees to :meth:`add_batch`; remove the returned handle when done."""

        def hook(_module: nn.Module, inputs: tuple[Any, ...], _output: Any) -> None:
            self.add_batch(inputs[0].data)

        return self.layer.register_forward_hook(hook)

    def quantize(self, apply: bool = True, **config: Any) -> GPTQResult:
        """Run :func:`gptq_quantize` on the layer's weight and the accumulated ``H``.

        Args:
            apply: write the dequantized weights into ``layer.weight`` (in its dtype).
            **config: keyword arguments of :func:`gptq_quantize` (``n_bits``, ``group_size``, ...).

        Returns:
            The :class:`GPTQResult`.
        """
        if self.hessian.n_samples == 0:
            raise ValueError("no calibration data: call add_batch (or run the model with the hook) first")
        result = gptq_quantize(self.layer.weight.data, self.hessian.H, **config)
        if apply:
            with torch.no_grad():
                self.layer.weight.copy_(result.Q.to(self.layer.weight.dtype))
        return result


# -----------------------------------------------------------------------------
# Model adapters: where a model keeps its blocks and in which order to quantize their linears


@dataclass(frozen=True)
class LayerAdapter:
    """Where a transformer keeps its blocks, and in which groups to quantize each block's linears.

    Attributes:
        blocks: dotted attribute path from the model to its ordered container of blocks,
            e.g. ``"model.layers"`` (HF Llama) or ``"blocks"`` (quantlab's tiny GPT).
        layer_groups: names of ``nn.Linear`` modules relative to a block, in groups quantized one
            after the other ("true sequential": a group sees the inputs produced by the groups
            already quantized); None quantizes all of a block's linears at once from one pass.
        prefix: optional ``fn(model, batch)`` running a batch through everything before the first
            block and returning its input: a tensor, or a tuple of positional arguments whose first
            item is the hidden states. None (default) captures the first block's arguments
            (positional and keyword, e.g. RoPE tables or masks) by running the model until it
            reaches that block, as the reference does.
    """

    blocks: str
    layer_groups: tuple[tuple[str, ...], ...] | None = None
    prefix: Callable[[nn.Module, Any], Any] | None = None

    def get_blocks(self, model: nn.Module) -> list[nn.Module]:
        """The model's blocks, in order."""
        obj: Any = model
        for part in self.blocks.split("."):
            if not hasattr(obj, part):
                raise ValueError(
                    f"the model has no attribute path {self.blocks!r} (missing {part!r} on "
                    f"{type(obj).__name__}); pass a LayerAdapter whose blocks path matches the model"
                )
            obj = getattr(obj, part)
        blocks = list(obj)
        if not blocks or not all(isinstance(b, nn.Module) for b in blocks):
            raise ValueError(f"{self.blocks!r} must be a non-empty sequence of nn.Module blocks")
        return blocks


#: Presets. The reference's true-sequential order for Llama is k, v, q; o; up, gate; down.
ADAPTERS: Mapping[str, LayerAdapter] = MappingProxyType(
    {
        "llama": LayerAdapter(
            blocks="model.layers",
            layer_groups=(
                ("self_attn.k_proj", "self_attn.v_proj", "self_attn.q_proj"),
                ("self_attn.o_proj",),
                ("mlp.up_proj", "mlp.gate_proj"),
                ("mlp.down_proj",),
            ),
        ),
        "tiny_gpt": LayerAdapter(
            blocks="blocks",
            layer_groups=(("attn.k", "attn.v", "attn.q"), ("attn.proj",), ("mlp.fc",), ("mlp.proj",)),
        ),
        "nanogpt": LayerAdapter(
            blocks="transformer.h",
            layer_groups=(("attn.c_attn",), ("attn.c_proj",), ("mlp.c_fc",), ("mlp.c_proj",)),
        ),
    }
)


def get_adapter(adapter: str | LayerAdapter) -> LayerAdapter:
    """Return ``adapter`` itself or the preset of that name (one of :data:`ADAPTERS`)."""
    if isinstance(adapter, LayerAdapter):
        return adapter
    if isinstance(adapter, str) and adapter in ADAPTERS:
        return ADAPTERS[adapter]
    raise ValueError(f"adapter must be a LayerAdapter or one of {sorted(ADAPTERS)}, got {adapter!r}")


# -----------------------------------------------------------------------------
# The model-level driver (GPTQ Sec. 5: quantize sequentially, block by block)


@dataclass
class LayerReport:
    """What happened to one linear layer in :func:`gptq_quantize_model`.

    Attributes:
        name: qualified module name, e.g. ``"model.layers.0.self_attn.q_proj"``.
        block: index of its block; ``group``: index of its group inside the block.
        shape: ``(out, in)``.
        error: GPTQ's OBS loss (:attr:`GPTQResult.error`); ``seconds``: time of :func:`gptq_quantize`.
        n_samples, n_tokens: calibration samples / tokens its Hessian was built from.
    """

    name: str
    block: int
    group: int
    shape: tuple[int, int]
    error: float
    seconds: float
    n_samples: int
    n_tokens: int


@dataclass
class GPTQModelReport:
    """The result of :func:`gptq_quantize_model`.

    Attributes:
        layers: one :class:`LayerReport` per quantized linear, in quantization order.
        skipped: qualified names of block linears not listed in the layer groups (left unquantized).
        seconds: wall time of the whole run (capturing, forwards and quantization).
        config: the :func:`gptq_quantize` keyword arguments used.
        results: ``{name: GPTQResult}`` when run with ``keep_results=True``, else None.
    """

    layers: list[LayerReport]
    skipped: list[str]
    seconds: float
    config: dict[str, Any]
    results: dict[str, GPTQResult] | None = None

    @property
    def total_error(self) -> float:
        """Sum of the layers' OBS losses."""
        return sum(layer.error for layer in self.layers)

    def rows(self) -> list[dict[str, Any]]:
        """The layer reports as plain dicts (``pandas.DataFrame(report.rows())``)."""
        return [dict(vars(layer)) for layer in self.layers]


class _ReachedBlock(Exception):
    """Raised by a pre-hook to stop the forward pass once the first block's inputs are captured."""


def _call_model(model: nn.Module, batch: Any) -> Any:
    if isinstance(batch, Mapping):
        return model(**batch)
    if isinstance(batch, (tuple, list)):
        return model(*batch)
    return model(batch)


def _first_output(out: Any) -> torch.Tensor:
    """A block's hidden states: the tensor it returns, or the first item of a tuple (HF style)."""
    return out[0] if isinstance(out, (tuple, list)) else out


def _capture_block_inputs(
    model: nn.Module, first_block: nn.Module, batches: list[Any], adapter: LayerAdapter
) -> list[tuple[tuple[Any, ...], dict[str, Any]]]:
    """The ``(args, kwargs)`` the first block is called with, for every calibration batch."""
    captured: list[tuple[tuple[Any, ...], dict[str, Any]]] = []
    if adapter.prefix is not None:
        for batch in batches:
            x = adapter.prefix(model, batch)
            captured.append(((x,) if isinstance(x, torch.Tensor) else tuple(x), {}))
        return captured

    def hook(_module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        captured.append((tuple(args), dict(kwargs)))
        raise _ReachedBlock

    handle = first_block.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for batch in batches:
            try:
                _call_model(model, batch)
            except _ReachedBlock:
                continue
            raise ValueError("the model's forward never called its first block; check the adapter's `blocks`")
    finally:
        handle.remove()
    return captured


def _resolve_groups(
    block: nn.Module, layer_groups: Sequence[Sequence[str]] | None
) -> tuple[list[list[tuple[str, nn.Linear]]], list[str]]:
    """The block's linears in quantization groups, and the names of those left out."""
    linears = {name: m for name, m in block.named_modules() if isinstance(m, nn.Linear)}
    if layer_groups is None:
        return [list(linears.items())], []
    groups, seen = [], set()
    for group in layer_groups:
        members = []
        for name in group:
            if name not in linears:
                raise ValueError(
                    f"layer {name!r} is not an nn.Linear of the block; its linears are {sorted(linears)}"
                )
            if name in seen:
                raise ValueError(f"layer {name!r} appears twice in layer_groups")
            seen.add(name)
            members.append((name, linears[name]))
        groups.append(members)
    return groups, [name for name in linears if name not in seen]


@torch.no_grad()
def gptq_quantize_model(
    model: nn.Module,
    calibration_batches: Iterable[Any],
    *,
    adapter: str | LayerAdapter = "llama",
    layer_groups: Sequence[Sequence[str]] | str | None = None,
    keep_results: bool = False,
    **config: Any,
) -> GPTQModelReport:
    """Quantize every linear of a transformer's blocks with GPTQ, sequentially (GPTQ Sec. 5).

    Block by block: the calibration activations entering the block (produced by the blocks already
    quantized) are run through it with hooks that build each linear's Hessian; the linears are
    quantized group by group, the block is run once more to produce the next block's inputs. With
    the adapter's layer groups (default, the reference's ``--true-sequential``: for Llama k/v/q, then
    o, then up/gate, then down) each group's Hessian sees the outputs of the groups quantized before
    it in the same block; ``layer_groups="all"`` quantizes all of a block's linears from one pass
    (the reference's default). Weights are replaced in place; the embeddings and ``lm_head`` are
    left alone, as in the paper.

    Args:
        model: the model; it is put in eval mode during the run (and restored afterwards).
        calibration_batches: model inputs, each passed as ``model(batch)`` (a tuple as ``*batch``,
            a dict as ``**batch``), e.g. ``(batch, seq)`` token ids.
        adapter: a :class:`LayerAdapter` or a preset name from :data:`ADAPTERS`.
        layer_groups: override the adapter's groups: a sequence of name groups, or ``"all"``.
        keep_results: keep every layer's :class:`GPTQResult` in ``report.results`` (memory!).
        **config: keyword arguments of :func:`gptq_quantize` (``n_bits``, ``group_size``, ...).

    Returns:
        A :class:`GPTQModelReport` with per-layer errors and times.
    """
    tick = time.perf_counter()
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    adapter = get_adapter(adapter)
    keep_results = _check_bool(keep_results, "keep_results")
    allowed = {"n_bits", "group_size", "symmetric", "act_order", "static_groups", "block_size", "damp"}
    unknown = sorted(set(config) - allowed)
    if unknown:
        raise TypeError(f"unknown GPTQ options {unknown}; valid options are {sorted(allowed)}")
    defaults = dict(
        n_bits=4,
        group_size=None,
        symmetric=False,
        act_order=False,
        static_groups=False,
        block_size=128,
        damp=0.01,
    )
    config = {**defaults, **config}
    _check_config(*(config[k] for k in defaults))
    if isinstance(layer_groups, str):
        if layer_groups != "all":
            raise ValueError(
                f'layer_groups must be a sequence of name groups, "all" or None, got {layer_groups!r}'
            )
        groups_spec = None
    else:
        groups_spec = adapter.layer_groups if layer_groups is None else layer_groups
    batches = list(calibration_batches)
    if not batches:
        raise ValueError("calibration_batches is empty; GPTQ needs calibration data")
    blocks = adapter.get_blocks(model)

    # Resolve and check every block before touching any weight, so bad input fails early.
    plan = [_resolve_groups(block, groups_spec) for block in blocks]
    for b, (groups, _) in enumerate(plan):
        for group in groups:
            for name, linear in group:
                if config["group_size"] is not None and linear.in_features % config["group_size"] != 0:
                    raise ValueError(
                        f"group_size={config['group_size']} does not divide in_features={linear.in_features} "
                        f"of {adapter.blocks}.{b}.{name}"
                    )

    was_training = model.training
    model.eval()
    layers: list[LayerReport] = []
    results: dict[str, GPTQResult] | None = {} if keep_results else None
    skipped: list[str] = []
    try:
        inputs = _capture_block_inputs(model, blocks[0], batches, adapter)
        for b, block in enumerate(blocks):
            groups, left_out = plan[b]
            skipped += [f"{adapter.blocks}.{b}.{name}" for name in left_out]
            for g, group in enumerate(groups):
                helpers = {name: GPTQ(linear) for name, linear in group}
                handles = [h.register_hook() for h in helpers.values()]
                try:
                    for args, kwargs in inputs:
                        block(*args, **kwargs)
                finally:
                    for handle in handles:
                        handle.remove()
                for name, helper in helpers.items():
                    t0 = time.perf_counter()
                    result = helper.quantize(apply=True, **config)
                    full_name = f"{adapter.blocks}.{b}.{name}"
                    layers.append(
                        LayerReport(
                            name=full_name,
                            block=b,
                            group=g,
                            shape=(helper.layer.out_features, helper.layer.in_features),
                            error=result.error,
                            seconds=time.perf_counter() - t0,
                            n_samples=helper.hessian.n_samples,
                            n_tokens=helper.hessian.n_tokens,
                        )
                    )
                    if results is not None:
                        results[full_name] = result
            # The quantized block produces the next block's inputs (the other arguments carry over).
            inputs = [((_first_output(block(*args, **kw)),) + args[1:], kw) for args, kw in inputs]
    finally:
        model.train(was_training)
    return GPTQModelReport(
        layers=layers, skipped=skipped, seconds=time.perf_counter() - tick, config=config, results=results
    )
