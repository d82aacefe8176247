"""SmoothQuant: move the activation outliers into the weights, then quantize both to int8 (W8A8).

Activations are hard to quantize because a few input channels ``j`` are huge; weights are easy. Since
``Y = X W^T = (X diag(s)^-1) (W diag(s))^T`` for any positive ``s``, dividing channel ``j`` of the
activations by ``s_j`` and multiplying column ``j`` of every weight that reads it by ``s_j`` leaves the
function unchanged and moves the difficulty from ``X`` to ``W``. SmoothQuant picks (Eq. 4)::

    s_j = max|X_j|^alpha / max|W_j|^(1 - alpha)

with ``alpha`` (the migration strength) around 0.5. The division is folded into the preceding
normalization's weight and bias, so it costs nothing at inference time.

Top to bottom:

1. :func:`smoothing_factors` and :func:`smooth` (pure math on a norm and the linears it feeds);
2. :func:`collect_act_scales` (calibration through forward hooks) and :func:`smooth_model` with small
   layer adapters (:data:`LLAMA_ADAPTER`, :data:`TINY_GPT_ADAPTER`);
3. W8A8 simulation: absmax fake quantizers for weights (per channel / per tensor) and activations
   (per token / per tensor, dynamic or static), :class:`W8A8Linear` and
   :func:`quantize_model_w8a8`, which swaps every ``nn.Linear`` except the excluded names.

Numbers follow the reference code (mit-han-lab/smoothquant ``smooth.py`` and ``fake_quant.py``):
the weight scale is ``max over the linears of max |W[:, j]|`` clamped at 1e-5, ``s`` is computed in
the weights' dtype and clamped at 1e-5 after the division; the fake quantizers clamp ``max|x|`` at 1e-5,
divide by ``127`` and round half-to-even with a division by the scale.

References:
    Xiao et al., "SmoothQuant: Accurate and Efficient Post-Training Quantization for Large Language
    Models", ICML 2023 (Sec. 4, Eq. 3-4; Sec. 3 for the per-token / per-tensor granularities).
    mit-han-lab/smoothquant, ``smoothquant/smooth.py`` (``smooth_ln_fcs``), ``fake_quant.py``,
    ``calibration.py`` (``get_act_scales``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from quantlab._checks import check_float_tensor, check_n_bits, check_probability
from quantlab.outliers import LinearInputHooks, replace_linears, run_batches
from quantlab.uniform import absmax_params, fake_quantize, qrange

__all__ = [
    "ACT_QUANT_MODES",
    "LLAMA_ADAPTER",
    "SCALE_EPS",
    "TINY_GPT_ADAPTER",
    "WEIGHT_QUANT_MODES",
    "LayerAdapter",
    "SmoothGroup",
    "W8A8Linear",
    "collect_act_scales",
    "find_smooth_groups",
    "quantize_activation_per_tensor_absmax",
    "quantize_activation_per_token_absmax",
    "quantize_activation_static",
    "quantize_model_w8a8",
    "quantize_weight_per_channel_absmax",
    "quantize_weight_per_tensor_absmax",
    "smooth",
    "smooth_model",
    "smooth_norm_linears",
    "smoothing_factors",
]

SCALE_EPS = 1e-5  # the reference code's floor on max|W_j|, on s, and on every absmax scale
WEIGHT_QUANT_MODES: tuple[str, ...] = ("per_channel", "per_tensor")
ACT_QUANT_MODES: tuple[str, ...] = ("per_token", "per_tensor", "per_tensor_static", "none")


# -----------------------------------------------------------------------------
# Smoothing factors and the (function-preserving) smoothing transform


def _as_weight_list(weights: torch.Tensor | Sequence[torch.Tensor]) -> list[torch.Tensor]:
    if isinstance(weights, torch.Tensor):
        weights = [weights]
    weights = list(weights)
    if not weights:
        raise ValueError("weights must hold at least one (out, in) weight")
    for i, w in enumerate(weights):
        check_float_tensor(w, f"weights[{i}]", ndim=2)
    fin = weights[0].shape[1]
    for i, w in enumerate(weights):
        if w.shape[1] != fin:
            raise ValueError(
                f"all weights must share in_features; weights[0] has {fin}, weights[{i}] has {w.shape[1]}"
            )
    return weights


def smoothing_factors(
    act_scales: torch.Tensor, weights: torch.Tensor | Sequence[torch.Tensor], alpha: float = 0.5
) -> torch.Tensor:
    """SmoothQuant's per-channel smoothing factors ``s`` (Eq. 4).

    ``s_j = (max|X_j|^alpha / w_j^(1 - alpha)).clamp(min=1e-5)`` with
    ``w_j = max over the weights of max |W[:, j]|``, clamped at 1e-5, exactly as ``smooth_ln_fcs``:
    the activation scales are cast to the first weight's dtype and device and everything is computed
    there. ``alpha = 0`` gives ``1 / w_j`` (all difficulty on the activations), ``alpha = 1`` gives
    ``max|X_j|`` (all on the weights).

    Args:
        act_scales: ``(in,)`` max |x| of each input channel over calibration tokens (>= 0).
        weights: the ``(out_i, in)`` weights of every linear that reads these activations.
        alpha: migration strength in [0, 1].

    Returns:
        ``s``, ``(in,)``, > 0, in the weights' dtype.

    >>> smoothing_factors(torch.tensor([16.0, 1.0]), torch.tensor([[1.0, 4.0]]), alpha=0.5)
    tensor([4.0000, 0.5000])
    """
    check_float_tensor(act_scales, "act_scales", ndim=1)
    if bool((act_scales < 0).any()):
        raise ValueError("act_scales must be >= 0 everywhere (they are max |x| per channel)")
    weights = _as_weight_list(weights)
    alpha = check_probability(alpha, "alpha")
    if weights[0].shape[1] != act_scales.numel():
        raise ValueError(
            f"act_scales has {act_scales.numel()} channels but the weights have "
            f"in_features={weights[0].shape[1]}"
        )
    device, dtype = weights[0].device, weights[0].dtype
    act = act_scales.to(device=device, dtype=dtype)
    w_max = torch.stack([w.detach().to(device=device, dtype=dtype).abs().amax(dim=0) for w in weights])
    # w_max: (n_linears, in); the weight scale of channel j is its largest magnitude in any linear
    w_scales = w_max.amax(dim=0).clamp(min=SCALE_EPS)  # (in,)
    return (act.pow(alpha) / w_scales.pow(1.0 - alpha)).clamp(min=SCALE_EPS)


def _norm_weight(norm: nn.Module) -> torch.Tensor:
    weight = getattr(norm, "weight", None)
    if not isinstance(weight, torch.Tensor) or weight.ndim != 1:
        raise TypeError(
            f"norm must have a 1-D affine weight (LayerNorm/RMSNorm with elementwise_affine=True), "
            f"got {type(norm).__name__} with weight={type(weight).__name__}"
        )
    return weight


def _as_linear_list(linears: nn.Linear | Sequence[nn.Linear]) -> list[nn.Linear]:
    if isinstance(linears, nn.Module):
        linears = [linears]
    linears = list(linears)
    if not linears:
        raise ValueError("linears must hold at least one nn.Linear")
    for i, fc in enumerate(linears):
        if not isinstance(fc, nn.Linear):
            raise TypeError(f"linears[{i}] must be a torch.nn.Linear, got {type(fc).__name__}")
    return linears


@torch.no_grad()
def smooth(norm: nn.Module, linears: nn.Linear | Sequence[nn.Linear], s: torch.Tensor) -> None:
    """Fold ``1/s`` into a norm's affine parameters and ``s`` into the linears' input columns, in place.

    ``norm.weight /= s`` (and ``norm.bias /= s`` when the norm has a bias: LayerNorm yes, RMSNorm no),
    ``linear.weight[:, j] *= s_j`` for every linear. The composition ``linears(norm(x))`` is unchanged
    up to float rounding (Eq. 3); only the quantization difficulty moves.

    Args:
        norm: a LayerNorm/RMSNorm-like module with a 1-D ``weight`` (and optional ``bias``) of size ``in``.
        linears: the ``nn.Linear`` layers that read the norm's output, all with ``in_features == in``.
        s: ``(in,)`` positive finite smoothing factors, e.g. from :func:`smoothing_factors`.
    """
    weight = _norm_weight(norm)
    linears = _as_linear_list(linears)
    check_float_tensor(s, "s", ndim=1)
    if not bool((s > 0).all()):
        raise ValueError("s must be > 0 everywhere (a zero or negative factor would not be invertible)")
    n = weight.numel()
    if s.numel() != n:
        raise ValueError(f"s has {s.numel()} entries but the norm has {n} channels")
    for i, fc in enumerate(linears):
        if fc.in_features != n:
            raise ValueError(f"linears[{i}].in_features={fc.in_features} must equal the norm's {n} channels")
    weight.div_(s.to(device=weight.device, dtype=weight.dtype))
    bias = getattr(norm, "bias", None)
    if isinstance(bias, torch.Tensor):
        bias.div_(s.to(device=bias.device, dtype=bias.dtype))
    for fc in linears:
        fc.weight.mul_(s.to(device=fc.weight.device, dtype=fc.weight.dtype).view(1, -1))  # (1, in)


def smooth_norm_linears(
    norm: nn.Module, linears: nn.Linear | Sequence[nn.Linear], act_scales: torch.Tensor, alpha: float = 0.5
) -> torch.Tensor:
    """:func:`smoothing_factors` then :func:`smooth` (the reference's ``smooth_ln_fcs``).

    Args:
        norm: the normalization feeding ``linears``.
        linears: one or more ``nn.Linear`` reading the norm's output.
        act_scales: ``(in,)`` calibration max |x| of the norm's output.
        alpha: migration strength in [0, 1].

    Returns:
        The factors ``s`` ``(in,)`` that were applied.
    """
    linears = _as_linear_list(linears)
    s = smoothing_factors(act_scales, [fc.weight for fc in linears], alpha)
    smooth(norm, linears, s)
    return s


# -----------------------------------------------------------------------------
# Calibration and model-level smoothing


def collect_act_scales(
    model: nn.Module, batches: Iterable[object], names: Iterable[str] | None = None
) -> dict[str, torch.Tensor]:
    """Max |x| of each input channel of every ``nn.Linear``, over calibration batches.

    The reference's ``get_act_scales``: a hook on each linear records ``max over tokens of |x|`` per
    channel, and the running maximum is kept across batches (float32, on the CPU).

    Args:
        model: the model (in eval mode).
        batches: calibration inputs; each is passed as ``model(b)``, ``model(*b)`` or ``model(**b)``.
        names: restrict to these linear names; default all.

    Returns:
        ``{linear name: (in,) float32 tensor}``.
    """
    scales: dict[str, torch.Tensor] = {}

    def record(name: str, module: nn.Module, x: torch.Tensor) -> None:
        cur = x.reshape(-1, x.shape[-1]).abs().amax(dim=0).float().cpu()  # (in,)
        scales[name] = cur if name not in scales else torch.maximum(scales[name], cur)

    with LinearInputHooks(model, record, names=names):
        run_batches(model, batches)
    return scales


@dataclass(frozen=True)
class SmoothGroup:
    """One smoothing site: a norm and the linears that read its output (qualified module names)."""

    norm: str
    linears: tuple[str, ...]


@dataclass(frozen=True)
class LayerAdapter:
    """Which norm feeds which linears inside one transformer block, as attribute paths.

    A block is any submodule that has every path named here; :func:`find_smooth_groups` turns each
    block into :class:`SmoothGroup` s with full names.

    Attributes:
        name: a label for messages.
        groups: ``((norm path, (linear path, ...)), ...)`` relative to the block.
    """

    name: str
    groups: tuple[tuple[str, tuple[str, ...]], ...]

    def paths(self) -> list[str]:
        """Every attribute path this adapter needs in a block."""
        return [p for norm, fcs in self.groups for p in (norm, *fcs)]


LLAMA_ADAPTER = LayerAdapter(
    name="llama",
    groups=(
        ("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
        ("post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj")),
    ),
)
TINY_GPT_ADAPTER = LayerAdapter(
    name="tiny_gpt",
    groups=(("ln_1", ("attn.q", "attn.k", "attn.v")), ("ln_2", ("mlp.fc",))),
)
_ADAPTERS: tuple[LayerAdapter, ...] = (LLAMA_ADAPTER, TINY_GPT_ADAPTER)


def _has_path(module: nn.Module, path: str) -> bool:
    try:
        module.get_submodule(path)
    except AttributeError:
        return False
    return True


def find_smooth_groups(model: nn.Module, adapter: LayerAdapter | str = "auto") -> list[SmoothGroup]:
    """The smoothing sites of ``model``, block by block, in ``named_modules()`` order.

    Args:
        model: e.g. ``quantlab.models.llama.Llama`` (``model.layers.{i}.input_layernorm`` ->
            ``self_attn.{q,k,v}_proj``; ``post_attention_layernorm`` -> ``mlp.{gate,up}_proj``) or
            ``quantlab.models.tiny_gpt.TinyGPT`` (``blocks.{i}.ln_1`` -> ``attn.{q,k,v}``;
            ``ln_2`` -> ``mlp.fc``).
        adapter: a :class:`LayerAdapter`, ``"llama"``, ``"tiny_gpt"`` or ``"auto"`` (the first built-in
            adapter that finds at least one block).

    Returns:
        A list of :class:`SmoothGroup`.
    """
    if isinstance(adapter, str):
        by_name = {a.name: a for a in _ADAPTERS}
        if adapter == "auto":
            candidates = list(_ADAPTERS)
        elif adapter in by_name:
            candidates = [by_name[adapter]]
        else:
            raise ValueError(
                f"adapter must be a LayerAdapter, 'auto' or one of {sorted(by_name)}, got {adapter!r}"
            )
    elif isinstance(adapter, LayerAdapter):
        candidates = [adapter]
    else:
        raise TypeError(f"adapter must be a LayerAdapter or a str, got {type(adapter).__name__}")
    for cand in candidates:
        groups = []
        for block_name, block in model.named_modules():
            if all(_has_path(block, p) for p in cand.paths()):
                prefix = f"{block_name}." if block_name else ""
                for norm, fcs in cand.groups:
                    groups.append(SmoothGroup(prefix + norm, tuple(prefix + fc for fc in fcs)))
        if groups:
            return groups
    tried = [c.name for c in candidates]
    raise ValueError(
        f"no block of the model matches the adapter(s) {tried}; pass a LayerAdapter for this model"
    )


def smooth_model(
    model: nn.Module,
    act_scales: dict[str, torch.Tensor],
    alpha: float = 0.5,
    adapter: LayerAdapter | str = "auto",
) -> dict[str, torch.Tensor]:
    """Smooth every norm -> linears site of a model in place (the reference's ``smooth_lm``).

    Each site uses the activation scales of its first linear (all the linears of a site read the same
    tensor). The model computes the same function afterwards (up to float rounding); quantize it next,
    e.g. with :func:`quantize_model_w8a8`. Static activation scales must be collected again after
    smoothing (or divided by the returned ``s``).

    Args:
        model: the model to modify.
        act_scales: ``{linear name: (in,) max |x|}``, e.g. from :func:`collect_act_scales`.
        alpha: migration strength in [0, 1].
        adapter: see :func:`find_smooth_groups`.

    Returns:
        ``{norm name: s}``, the factors applied at each site.
    """
    alpha = check_probability(alpha, "alpha")
    if not isinstance(act_scales, dict):
        raise TypeError(f"act_scales must be a dict of name -> (in,) tensor, got {type(act_scales).__name__}")
    groups = find_smooth_groups(model, adapter)
    for g in groups:  # check everything before touching any weight
        if g.linears[0] not in act_scales:
            raise ValueError(f"act_scales has no entry {g.linears[0]!r} (needed to smooth {g.norm!r})")
    applied = {}
    for g in groups:
        norm = model.get_submodule(g.norm)
        fcs = [model.get_submodule(n) for n in g.linears]
        applied[g.norm] = smooth_norm_linears(norm, fcs, act_scales[g.linears[0]], alpha)
    return applied


# -----------------------------------------------------------------------------
# Absmax fake quantizers (fake_quant.py)


def _absmax_fake_quant(x: torch.Tensor, n_bits: int, dim: int | None) -> torch.Tensor:
    """``round(x / s) * s`` with ``s = max(max|x|, 1e-5) / qmax`` over ``dim`` (None = whole tensor)."""
    qmin, qmax = qrange(n_bits, signed=True, restricted=True)
    scale, zero = absmax_params(x, n_bits, dim=dim, eps=SCALE_EPS)
    return fake_quantize(x, scale, zero, qmin, qmax)


def quantize_weight_per_channel_absmax(w: torch.Tensor, n_bits: int = 8) -> torch.Tensor:
    """Fake-quantize a weight with one absmax scale per output row.

    Args:
        w: ``(out, in)``.
        n_bits: 2..16.

    Returns:
        ``(out, in)`` values on each row's grid ``scale * [-qmax, qmax]``, ``scale = max|w_row| / qmax``.
    """
    check_float_tensor(w, "w", ndim=2)
    return _absmax_fake_quant(w, check_n_bits(n_bits, low=2), dim=-1)


def quantize_weight_per_tensor_absmax(w: torch.Tensor, n_bits: int = 8) -> torch.Tensor:
    """Fake-quantize a weight with one absmax scale for the whole tensor.

    Args:
        w: ``(out, in)``.
        n_bits: 2..16.

    Returns:
        ``(out, in)`` fake-quantized values.
    """
    check_float_tensor(w, "w", ndim=2)
    return _absmax_fake_quant(w, check_n_bits(n_bits, low=2), dim=None)


def quantize_activation_per_token_absmax(x: torch.Tensor, n_bits: int = 8) -> torch.Tensor:
    """Dynamic per-token fake quantization: one absmax scale per row of ``(..., tokens, features)``.

    Args:
        x: activations ``(..., features)``.
        n_bits: 2..16.

    Returns:
        Same shape and dtype as ``x``.
    """
    check_float_tensor(x, "x")
    return _absmax_fake_quant(x, check_n_bits(n_bits, low=2), dim=-1)


def quantize_activation_per_tensor_absmax(x: torch.Tensor, n_bits: int = 8) -> torch.Tensor:
    """Dynamic per-tensor fake quantization: one absmax scale for the whole activation tensor.

    Args:
        x: activations, any shape.
        n_bits: 2..16.

    Returns:
        Same shape and dtype as ``x``.
    """
    check_float_tensor(x, "x")
    return _absmax_fake_quant(x, check_n_bits(n_bits, low=2), dim=None)


def quantize_activation_static(
    x: torch.Tensor, absmax: float | torch.Tensor, n_bits: int = 8
) -> torch.Tensor:
    """Static per-tensor fake quantization with a calibrated ``absmax``: ``scale = max(absmax, 1e-5) / qmax``.

    Values beyond the calibrated range are clipped to ``+-qmax`` codes (the grid is the restricted
    ``[-qmax, qmax]``): that clipping is the price of a static scale.

    Args:
        x: activations, any shape.
        absmax: the calibration max |x| (a number or 0-d tensor, >= 0 and finite).
        n_bits: 2..16.

    Returns:
        Same shape and dtype as ``x``.
    """
    check_float_tensor(x, "x")
    n_bits = check_n_bits(n_bits, low=2)
    value = float(absmax)
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"absmax must be a finite number >= 0, got {value}")
    qmin, qmax = qrange(n_bits, signed=True, restricted=True)
    scale = torch.tensor(value, dtype=x.dtype).clamp(min=SCALE_EPS) / qmax
    return fake_quantize(x, scale, 0.0, qmin, qmax)


# -----------------------------------------------------------------------------
# W8A8 simulation: a Linear with fake-quantized weights and activations


class W8A8Linear(nn.Module):
    """``nn.Linear`` with absmax fake-quantized weights and activations (SmoothQuant's simulation).

    The weight is quantized once and stored fake-quantized in the buffer ``weight``; activations are
    quantized on every forward, then ``F.linear`` runs in floating point.

    Args:
        weight: ``(out, in)``.
        bias: optional ``(out,)`` (kept in full precision).
        weight_quant: ``"per_channel"`` (one scale per output row) or ``"per_tensor"``.
        act_quant: ``"per_token"`` (dynamic, one scale per row), ``"per_tensor"`` (dynamic absmax of
            the whole input), ``"per_tensor_static"`` (fixed scale from ``act_absmax``) or ``"none"``.
        act_absmax: calibration max |x| for ``"per_tensor_static"``.
        quantize_output: also fake-quantize the output with the (dynamic) ``act_quant`` mode, as the
            reference does to simulate int8 inputs to the attention BMMs.
        n_bits: bits for weights and activations (8 for W8A8).
    """

    def __init__(
        self,
        weight: torch.Tensor,
        bias: torch.Tensor | None = None,
        weight_quant: str = "per_channel",
        act_quant: str = "per_token",
        act_absmax: float | torch.Tensor | None = None,
        quantize_output: bool = False,
        n_bits: int = 8,
    ) -> None:
        super().__init__()
        check_float_tensor(weight, "weight", ndim=2)
        self.n_bits = check_n_bits(n_bits, low=2)
        if weight_quant not in WEIGHT_QUANT_MODES:
            raise ValueError(f"weight_quant must be one of {WEIGHT_QUANT_MODES}, got {weight_quant!r}")
        if act_quant not in ACT_QUANT_MODES:
            raise ValueError(f"act_quant must be one of {ACT_QUANT_MODES}, got {act_quant!r}")
        if act_quant == "per_tensor_static":
            if act_absmax is None:
                raise ValueError("act_quant='per_tensor_static' needs act_absmax (the calibration max |x|)")
            value = float(act_absmax)
            if not math.isfinite(value) or value < 0:
                raise ValueError(f"act_absmax must be a finite number >= 0, got {value}")
            if quantize_output:
                raise ValueError("quantize_output needs a dynamic act_quant (no static output scale exists)")
        elif act_absmax is not None:
            raise ValueError(
                f"act_absmax is only used with act_quant='per_tensor_static', got act_quant={act_quant!r}"
            )
        if bias is not None:
            check_float_tensor(bias, "bias", ndim=1)
            if bias.shape[0] != weight.shape[0]:
                raise ValueError(f"bias must have shape ({weight.shape[0]},), got {tuple(bias.shape)}")
        self.out_features, self.in_features = weight.shape
        self.weight_quant, self.act_quant = weight_quant, act_quant
        self.quantize_output = bool(quantize_output)
        w = weight.detach()
        if weight_quant == "per_channel":
            wq = quantize_weight_per_channel_absmax(w, self.n_bits)
        else:
            wq = quantize_weight_per_tensor_absmax(w, self.n_bits)
        self.register_buffer("weight", wq.clone())
        self.register_buffer("bias", None if bias is None else bias.detach().clone())
        self.act_absmax = None if act_absmax is None else float(act_absmax)

    @classmethod
    def from_float(
        cls,
        linear: nn.Linear,
        weight_quant: str = "per_channel",
        act_quant: str = "per_token",
        act_absmax: float | torch.Tensor | None = None,
        quantize_output: bool = False,
        n_bits: int = 8,
    ) -> W8A8Linear:
        """Build from an ``nn.Linear`` (which is left untouched, unlike the reference's in-place version)."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"linear must be a torch.nn.Linear, got {type(linear).__name__}")
        return cls(linear.weight, linear.bias, weight_quant, act_quant, act_absmax, quantize_output, n_bits)

    def _quantize_act(self, x: torch.Tensor) -> torch.Tensor:
        if self.act_quant == "per_token":
            return quantize_activation_per_token_absmax(x, self.n_bits)
        if self.act_quant == "per_tensor":
            return quantize_activation_per_tensor_absmax(x, self.n_bits)
        if self.act_quant == "per_tensor_static":
            return quantize_activation_static(x, self.act_absmax, self.n_bits)
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Args: x ``(..., in)``. Returns ``(..., out)``."""
        y = F.linear(self._quantize_act(x), self.weight, self.bias)
        return self._quantize_act(y) if self.quantize_output else y

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}, "
            f"weight_quant={self.weight_quant}, act_quant={self.act_quant}, "
            f"quantize_output={self.quantize_output}, n_bits={self.n_bits}"
        )


def quantize_model_w8a8(
    model: nn.Module,
    weight_quant: str = "per_channel",
    act_quant: str = "per_token",
    exclude: Iterable[str] = ("lm_head",),
    act_scales: dict[str, torch.Tensor] | None = None,
    quantize_output: bool | Callable[[str], bool] = False,
    n_bits: int = 8,
) -> list[str]:
    """Replace every ``nn.Linear`` of ``model`` except ``exclude`` by a :class:`W8A8Linear`, in place.

    Args:
        model: the model to modify (generic over module names).
        weight_quant: see :class:`W8A8Linear`.
        act_quant: see :class:`W8A8Linear`; ``"per_tensor_static"`` takes each layer's static absmax
            as ``act_scales[name].max()``.
        exclude: names or globs to keep in float (see :func:`quantlab.outliers.replace_linears`).
        act_scales: ``{name: (in,) max |x|}`` from :func:`collect_act_scales` (static mode only).
        quantize_output: a bool for every layer, or a predicate on the layer name (e.g.
            ``lambda n: n.endswith(("q_proj", "k_proj", "v_proj"))``).
        n_bits: bits for weights and activations.

    Returns:
        The names of the converted layers.
    """
    if act_quant == "per_tensor_static":
        if not isinstance(act_scales, dict):
            raise ValueError(
                "act_quant='per_tensor_static' needs act_scales={name: max |x|} (from collect_act_scales)"
            )
    elif act_scales is not None:
        raise ValueError(f"act_scales is only used with act_quant='per_tensor_static', got {act_quant!r}")

    def factory(name: str, linear: nn.Linear) -> W8A8Linear:
        absmax = None
        if act_quant == "per_tensor_static":
            if name not in act_scales:
                raise ValueError(f"act_scales has no entry for {name!r}; see collect_act_scales")
            absmax = float(act_scales[name].max())
        q_out = quantize_output(name) if callable(quantize_output) else bool(quantize_output)
        return W8A8Linear.from_float(linear, weight_quant, act_quant, absmax, q_out, n_bits)

    return replace_linears(model, factory, exclude)
