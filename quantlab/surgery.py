"""Model surgery: one entry point that applies any quantization method to a whole model.

Every other module works on one tensor or one layer, or ships its own model driver with its own
arguments. :func:`quantize_model` is the one call the labs use to compare them::

    report = quantize_model(model, "rtn", n_bits=4, granularity="group", group_size=128)
    report = quantize_model(model, "gptq", calibration=tokens, n_bits=4, group_size=128)
    print(report.summary())

It quantizes every ``nn.Linear`` of the model except the ``exclude``-d ones (the LM head by default),
**in place**: the model you pass is modified (pass ``copy=True``, or ``copy.deepcopy`` it yourself, to
keep the original). ``nn.Embedding`` weights are never touched; a head whose weight is *tied* to the
embedding is given its own copy first when it is quantized. The weights are *fake*-quantized: they
hold the dequantized values in their original dtype, so the model runs unchanged and its accuracy is
that of the format; its memory is *reported* as the format would store it.

Methods (see :data:`METHODS`; :func:`register_method` plugs in new ones):

==============  =============  ===========================================================================
method          calibration    what it does
==============  =============  ===========================================================================
``rtn``         no             round to nearest on an integer grid, per tensor / channel / group
                               (:mod:`quantlab.granularity`)
``nf4``         no             QLoRA's NormalFloat-4 in blocks (:mod:`quantlab.formats`)
``gguf_*``      no             llama.cpp's Q8_0, Q4_0, Q4_1, Q4_K, Q6_K round trip (:mod:`quantlab.gguf`)
``fp16/bf16``   no             cast to 16 bits and back
``gptq``        yes            GPTQ, block by block (:func:`quantlab.gptq.gptq_quantize_model`)
``awq``         yes            AWQ scale and clip search, then its quantizer
                               (:func:`quantlab.awq.awq_quantize_model`)
``awq+gptq``    yes            AWQ's scaling and clipping, then GPTQ instead of round to nearest
``smoothquant`` yes            smoothing (alpha) then W8A8 simulation (:mod:`quantlab.smoothquant`)
==============  =============  ===========================================================================

The :class:`QuantReport` records, per layer, the relative weight error and (when calibration tokens
are given) the relative output error on the *original* model's inputs, both measured in the original
layer's coordinates (AWQ and SmoothQuant rescale input columns and output rows; that rescaling is
undone before comparing, so only the quantization error is counted). Storage is counted as the
format stores it: codes plus every scale and zero-point (:func:`quantlab.packing.bits_per_weight`),
e.g. 4-bit codes in groups of 128 with an fp16 scale and a 4-bit zero-point cost
``4 + (16 + 4) / 128 = 4.156`` bits per weight.

Model adapters say where a transformer keeps its blocks and which norm feeds which linears; ``"auto"``
recognises quantlab's Llama (SmolLM2) and the byte-level TinyGPT by their module structure.

References:
    Frantar et al., "GPTQ: Accurate Post-Training Quantization for Generative Pre-trained
    Transformers", ICLR 2023.
    Lin et al., "AWQ: Activation-aware Weight Quantization for On-Device LLM Compression and
    Acceleration", MLSys 2024 (Sec. 5 combines AWQ with GPTQ).
    Xiao et al., "SmoothQuant: Accurate and Efficient Post-Training Quantization for Large Language
    Models", ICML 2023.
    Dettmers et al., "QLoRA: Efficient Finetuning of Quantized LLMs", NeurIPS 2023 (NF4).
    Gerganov et al., llama.cpp / GGML (the GGUF block formats).
    Nagel et al., "A White Paper on Neural Network Quantization", 2021 (granularity, Sec. 2.4).
"""

from __future__ import annotations

import copy as _copy
import fnmatch
import math
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from dataclasses import replace as _replace
from types import MappingProxyType
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from quantlab import awq as _awq
from quantlab import formats as _formats
from quantlab import gguf as _gguf
from quantlab import gptq as _gptq
from quantlab import smoothquant as _sq
from quantlab._checks import check_float_tensor, check_int, check_probability
from quantlab.eval import LayerError, collect_linear_inputs, layer_output_error, results_table
from quantlab.granularity import GRANULARITIES, SCHEMES, fake_quantize_weight
from quantlab.packing import bits_per_weight

__all__ = [
    "ADAPTERS",
    "METHODS",
    "LayerQuantReport",
    "Method",
    "ModelAdapter",
    "QuantContext",
    "QuantReport",
    "detect_adapter",
    "module_bytes",
    "quantize_model",
    "register_method",
]


# -----------------------------------------------------------------------------
# Small helpers: exclusion patterns, calibration tokens, storage


def _matches(name: str, patterns: Sequence[str]) -> bool:
    """A pattern matches a module named exactly like it, ending with ``"." + pattern``, or as a glob."""
    return any(name == p or name.endswith("." + p) or fnmatch.fnmatchcase(name, p) for p in patterns)


def _check_exclude(exclude: object) -> list[str]:
    if isinstance(exclude, str):
        raise TypeError(
            f"exclude must be a collection of names, got the string {exclude!r}; use ({exclude!r},)"
        )
    if exclude is None:
        return []
    if not isinstance(exclude, Iterable):
        raise TypeError(
            f"exclude must be a collection of module names or globs, got {type(exclude).__name__}"
        )
    patterns = list(exclude)
    for p in patterns:
        if not isinstance(p, str):
            raise TypeError(f"exclude must hold strings (module names or globs), got {p!r}")
    return patterns


def _check_calibration(calibration: object) -> torch.Tensor | None:
    """``None``, a ``(n_samples, seq)`` integer tensor, or a list of ``(batch, seq)`` ones -> ``(n, seq)``."""
    if calibration is None:
        return None
    if isinstance(calibration, torch.Tensor):
        batches = [calibration]
    elif isinstance(calibration, Sequence) and not isinstance(calibration, (str, bytes)) and calibration:
        batches = list(calibration)
    else:
        raise TypeError(
            "calibration must be token ids (n_samples, seq) as an integer tensor, or a non-empty list of "
            f"(batch, seq) tensors, got {type(calibration).__name__}"
        )
    for i, b in enumerate(batches):
        ok = isinstance(b, torch.Tensor) and not (
            b.is_floating_point() or b.is_complex() or b.dtype == torch.bool
        )
        if not ok:
            kind = b.dtype if isinstance(b, torch.Tensor) else type(b).__name__
            raise TypeError(f"calibration[{i}] must be an integer tensor of token ids, got {kind}")
        if b.ndim != 2 or b.numel() == 0:
            raise ValueError(f"calibration[{i}] must have shape (batch, seq), got {tuple(b.shape)}")
        if b.shape[1] != batches[0].shape[1]:
            raise ValueError(
                f"calibration batches must share one sequence length: batch 0 has {batches[0].shape[1]}, "
                f"batch {i} has {b.shape[1]}"
            )
    return torch.cat(batches, dim=0).long()  # (n_samples, seq)


def _chunks(tokens: torch.Tensor, batch_size: int) -> list[torch.Tensor]:
    """Split ``(n, seq)`` tokens into ``(<= batch_size, seq)`` model inputs."""
    return list(tokens.split(batch_size, dim=0))


def _unique_tensors(tensors: Iterable[torch.Tensor]) -> list[torch.Tensor]:
    """Drop tensors sharing memory with an earlier one (tied weights are stored once)."""
    seen: set[tuple[int, int]] = set()
    out = []
    for t in tensors:
        key = (t.untyped_storage().data_ptr(), t.storage_offset()) if t.numel() else (id(t), 0)
        if key not in seen:
            seen.add(key)
            out.append(t)
    return out


def module_bytes(model: nn.Module, buffers: bool = True) -> int:
    """Bytes a module's tensors occupy in memory right now (tied weights counted once).

    This is what the process actually holds: a fake-quantized model still stores float32 (or
    whatever dtype) values, so it measures the same before and after :func:`quantize_model`; the
    report's ``memory_after`` is what the format would store.

    Args:
        model: any module.
        buffers: also count registered buffers (e.g. the weights of ``W8A8Linear``).

    Returns:
        Bytes, an int.

    >>> module_bytes(nn.Linear(4, 2, bias=False))
    32
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    tensors = list(model.parameters()) + (list(model.buffers()) if buffers else [])
    return sum(t.numel() * t.element_size() for t in _unique_tensors(tensors))


def _relative_error(W: torch.Tensor, W_hat: torch.Tensor) -> float:
    """``||W_hat - W||_F^2 / ||W||_F^2`` with float64 sums (0 for an exact copy, also of an all-zero W)."""
    dtype = torch.promote_types(W_hat.dtype, torch.float32)  # no-op for float32, exact for 16-bit weights
    W = W.to(dtype)
    D = W_hat.to(dtype) - W  # (out, in)
    noise = float(torch.sum(D * D, dtype=torch.float64))
    signal = float(torch.sum(W * W, dtype=torch.float64))
    if noise == 0.0:
        return 0.0
    return noise / signal if signal > 0 else math.inf


# -----------------------------------------------------------------------------
# Model adapters: where the blocks are, which linears each method's driver visits


@dataclass(frozen=True)
class ModelAdapter:
    """How one family of transformers is laid out, for the methods that work block by block.

    Attributes:
        name: short name (``"llama"``, ``"tiny_gpt"``).
        blocks: dotted attribute path from the model to its ``nn.ModuleList`` of blocks.
        signature: module paths every block has; ``"auto"`` picks the first adapter they all match.
        gptq: the :class:`quantlab.gptq.LayerAdapter` (true-sequential groups of linears).
        awq: the :class:`quantlab.awq.BlockAdapter` (scale groups, linears exempt from clipping).
        smoothquant: the :class:`quantlab.smoothquant.LayerAdapter` (norm -> linears sites).
    """

    name: str
    blocks: str
    signature: tuple[str, ...]
    gptq: _gptq.LayerAdapter
    awq: _awq.BlockAdapter
    smoothquant: _sq.LayerAdapter

    def get_blocks(self, model: nn.Module) -> list[nn.Module] | None:
        """The model's blocks if the model has this layout, else None."""
        obj: Any = model
        for part in self.blocks.split("."):
            obj = getattr(obj, part, None)
            if obj is None:
                return None
        if not isinstance(obj, (nn.ModuleList, nn.Sequential)) or len(obj) == 0:
            return None
        return list(obj)

    def matches(self, model: nn.Module) -> bool:
        """Whether every block of ``model`` has every path of :attr:`signature`."""
        blocks = self.get_blocks(model)
        if blocks is None:
            return False
        for block in blocks:
            for path in self.signature:
                try:
                    block.get_submodule(path)
                except AttributeError:
                    return False
        return True


ADAPTERS: Mapping[str, ModelAdapter] = MappingProxyType(
    {
        "llama": ModelAdapter(
            name="llama",
            blocks="model.layers",
            signature=(
                "input_layernorm",
                "self_attn.q_proj",
                "self_attn.o_proj",
                "mlp.gate_proj",
                "mlp.down_proj",
            ),
            gptq=_gptq.ADAPTERS["llama"],
            awq=_awq.LLAMA_ADAPTER,
            smoothquant=_sq.LLAMA_ADAPTER,
        ),
        "tiny_gpt": ModelAdapter(
            name="tiny_gpt",
            blocks="blocks",
            signature=("ln_1", "attn.q", "attn.proj", "mlp.fc", "mlp.proj"),
            gptq=_gptq.ADAPTERS["tiny_gpt"],
            awq=_awq.TINY_GPT_ADAPTER,
            smoothquant=_sq.TINY_GPT_ADAPTER,
        ),
    }
)


def detect_adapter(model: nn.Module) -> ModelAdapter:
    """The first adapter of :data:`ADAPTERS` whose layout ``model`` has (quantlab Llama, TinyGPT).

    Raises:
        ValueError: when no adapter matches; the message says what each one looks for.
    """
    for adapter in ADAPTERS.values():
        if adapter.matches(model):
            return adapter
    looked = "; ".join(f"{a.name}: {a.blocks}[i].{{{', '.join(a.signature)}}}" for a in ADAPTERS.values())
    raise ValueError(
        f"adapter='auto' recognises no layout in {type(model).__name__} (looked for {looked}); "
        "pass adapter= one of these names or a ModelAdapter for your model"
    )


def _resolve_adapter(model: nn.Module, adapter: object, required: bool) -> ModelAdapter | None:
    if isinstance(adapter, ModelAdapter):
        chosen = adapter
    elif adapter == "auto":
        if not required:
            return next((a for a in ADAPTERS.values() if a.matches(model)), None)
        return detect_adapter(model)
    elif isinstance(adapter, str) and adapter in ADAPTERS:
        chosen = ADAPTERS[adapter]
    else:
        raise ValueError(
            f"adapter must be 'auto', one of {sorted(ADAPTERS)} or a ModelAdapter, got {adapter!r}"
        )
    if not chosen.matches(model):
        raise ValueError(
            f"the model does not have the {chosen.name!r} layout: expected {chosen.blocks}[i] blocks with "
            f"{list(chosen.signature)}"
        )
    return chosen


# -----------------------------------------------------------------------------
# Reports


@dataclass(frozen=True)
class LayerQuantReport:
    """What quantization did to one linear layer.

    Attributes:
        name: qualified module name, e.g. ``"model.layers.0.self_attn.q_proj"``.
        shape: ``(out_features, in_features)``.
        format: the storage format, e.g. ``"int4 g128 asym"``, ``"Q4_K"``.
        bits_per_weight: codes plus scale / zero-point overhead, per weight.
        weight_rel_error: ``||W_q - W||^2 / ||W||^2`` (in the original layer's coordinates).
        output_rel_error: ``||Y_q - Y||^2 / ||Y||^2`` on the original model's calibration inputs of this
            layer, or None without calibration.
        output_sqnr_db: ``-10 log10(output_rel_error)``, or None.
        bytes_before: bytes of the weight as stored before (its dtype).
        bytes_after: bytes in the quantized format (``numel * bits_per_weight / 8``).
    """

    name: str
    shape: tuple[int, int]
    format: str
    bits_per_weight: float
    weight_rel_error: float
    output_rel_error: float | None
    output_sqnr_db: float | None
    bytes_before: int
    bytes_after: float

    @property
    def numel(self) -> int:
        return self.shape[0] * self.shape[1]

    @property
    def weight_sqnr_db(self) -> float:
        """``-10 log10(weight_rel_error)`` (``inf`` for an exact copy)."""
        e = self.weight_rel_error
        return math.inf if e == 0 else -10 * math.log10(e)


@dataclass
class QuantReport:
    """The result of :func:`quantize_model`.

    Attributes:
        method: the method's name.
        config: every option the method ran with (defaults filled in).
        adapter: the adapter's name, or None (per-layer methods on an unrecognised model).
        layers: one :class:`LayerQuantReport` per quantized linear, in ``named_modules()`` order.
        excluded: names of the linears left alone.
        memory_before: bytes of the model's parameters before (tied weights once).
        memory_after: the same with every quantized weight counted at its format's size.
        seconds: wall time of the whole call; ``quantize_seconds``: of the method alone (no error
            measurement, no input collection).
        notes: anything worth knowing (untied heads, patterns that matched nothing, ...).
        details: the method driver's own result (``"gptq"``: :class:`quantlab.gptq.GPTQModelReport`,
            ``"awq"``: :class:`quantlab.awq.AWQModelResult`, ``"smoothing"``: ``{norm: s}``).
        model: the quantized model (the one passed in, or its copy with ``copy=True``).
    """

    method: str
    config: dict[str, Any]
    adapter: str | None
    layers: list[LayerQuantReport] = field(repr=False)
    excluded: list[str]
    memory_before: int
    memory_after: float
    seconds: float
    quantize_seconds: float
    notes: list[str] = field(default_factory=list)
    details: dict[str, Any] = field(default_factory=dict, repr=False)
    model: nn.Module | None = field(default=None, repr=False)

    @property
    def n_params(self) -> int:
        """Weights quantized (sum over :attr:`layers`)."""
        return sum(layer.numel for layer in self.layers)

    @property
    def bits_per_weight(self) -> float:
        """Average true bits per weight over the quantized linears (weighted by their size)."""
        return sum(layer.numel * layer.bits_per_weight for layer in self.layers) / self.n_params

    @property
    def compression(self) -> float:
        """``memory_before / memory_after`` of the whole model."""
        return self.memory_before / self.memory_after

    @property
    def weight_rel_error(self) -> float:
        """Mean over layers of :attr:`LayerQuantReport.weight_rel_error`."""
        return sum(layer.weight_rel_error for layer in self.layers) / len(self.layers)

    @property
    def output_rel_error(self) -> float | None:
        """Mean over layers of the relative output error, or None without calibration."""
        errs = [layer.output_rel_error for layer in self.layers]
        return None if any(e is None for e in errs) else sum(errs) / len(errs)

    def rows(self) -> list[dict[str, Any]]:
        """One dict per layer (``results_table(report.rows())`` or :meth:`table`)."""
        return [
            {
                "name": r.name,
                "shape": r.shape,
                "format": r.format,
                "bits_per_weight": r.bits_per_weight,
                "weight_rel_error": r.weight_rel_error,
                "weight_sqnr_db": r.weight_sqnr_db,
                "output_rel_error": r.output_rel_error,
                "output_sqnr_db": r.output_sqnr_db,
                "bytes_before": r.bytes_before,
                "bytes_after": r.bytes_after,
            }
            for r in self.layers
        ]

    def table(self):
        """The per-layer rows as a ``pandas.DataFrame``."""
        return results_table(self.rows())

    def summary(self) -> dict[str, Any]:
        """One flat dict for a comparison table across methods."""
        return {
            "method": self.method,
            "layers": len(self.layers),
            "params": self.n_params,
            "bits_per_weight": self.bits_per_weight,
            "memory_before_mb": self.memory_before / 1e6,
            "memory_after_mb": self.memory_after / 1e6,
            "compression": self.compression,
            "weight_rel_error": self.weight_rel_error,
            "output_rel_error": self.output_rel_error,
            "seconds": self.seconds,
        }

    def __str__(self) -> str:
        out = self.output_rel_error
        return (
            f"QuantReport({self.method}: {len(self.layers)} linears, {self.n_params:,} weights at "
            f"{self.bits_per_weight:.3f} bits/weight; model {self.memory_before / 1e6:.1f} MB -> "
            f"{self.memory_after / 1e6:.1f} MB; mean relative weight error {self.weight_rel_error:.3g}"
            + ("" if out is None else f", output error {out:.3g}")
            + f"; {self.seconds:.1f} s)"
        )


# -----------------------------------------------------------------------------
# Methods: the registry entry


@dataclass
class QuantContext:
    """Everything a model-level method needs, and where it records the rescalings it applied.

    Attributes:
        model: the model, modified in place.
        targets: ``{qualified name: nn.Linear}`` to quantize (everything not excluded).
        excluded: names of the linears that must come out bit-for-bit unchanged.
        calibration: ``(n_samples, seq)`` token ids.
        batches: the same, split into model inputs of at most ``batch_size`` sequences.
        adapter: the model's :class:`ModelAdapter`.
        config: the method's options.
        col_scale: ``{name: (in,)}`` factors folded into a layer's input columns (``W[:, j] *= c_j``
            while its input is divided by ``c``); see :meth:`scale_columns`.
        row_scale: ``{name: (out,)}`` factors folded into a layer's output rows.
        details, notes: filled in for the report.
    """

    model: nn.Module
    targets: dict[str, nn.Linear]
    excluded: list[str]
    calibration: torch.Tensor | None
    batches: list[torch.Tensor]
    adapter: ModelAdapter | None
    config: dict[str, Any]
    col_scale: dict[str, torch.Tensor] = field(default_factory=dict)
    row_scale: dict[str, torch.Tensor] = field(default_factory=dict)
    details: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def scale_columns(self, name: str, s: torch.Tensor) -> None:
        """Record that layer ``name`` now holds ``W diag(s)`` and reads ``x / s`` (AWQ, SmoothQuant)."""
        s = s.detach().double().cpu()
        self.col_scale[name] = self.col_scale[name] * s if name in self.col_scale else s

    def scale_rows(self, name: str, r: torch.Tensor) -> None:
        """Record that layer ``name`` now holds ``diag(r) W``: its output is multiplied by ``r``."""
        r = r.detach().double().cpu()
        self.row_scale[name] = self.row_scale[name] * r if name in self.row_scale else r

    def in_block(self, name: str) -> bool:
        """Whether the module ``name`` lives inside one of the adapter's blocks."""
        return self.adapter is not None and name.startswith(self.adapter.blocks + ".")


@dataclass(frozen=True)
class Method:
    """One quantization method in the registry (:data:`METHODS`).

    A method is either **per layer** (``weight_fn``: a pure function from a weight to its fake-quantized
    values; :func:`quantize_model` loops over the layers) or **model level** (``model_fn``: works on
    the whole model through a :class:`QuantContext`, e.g. GPTQ's block-by-block driver).

    Attributes:
        name: the registry key.
        description: one line for tables.
        defaults: every option and its default; other keyword arguments are rejected.
        bits_fn: ``(shape (out, in), config) -> bits per weight`` as the format stores it.
        format_fn: ``(shape, config) -> str``, a short label of the storage format.
        weight_fn: ``(W (out, in) float32, config) -> W_q (out, in)``, for per-layer methods; a pure
            function: it must return a new tensor and leave ``W`` as it is.
        model_fn: ``(ctx) -> None``, for model-level methods.
        check_fn: ``(in_features, config) -> None``: raise ``ValueError``/``TypeError`` for a bad
            config before anything is modified (default: a dry run of ``weight_fn`` on a tiny matrix).
        check_weight_fn: ``(W, config) -> None``: raise for a weight the method cannot take (e.g. one
            that overflows float16), run on every real weight before anything is modified.
        prepare_fn: ``(config, given) -> config``: resolve defaults that depend on other options
            (``given`` holds the names the caller passed).
        needs_calibration: the method refuses to run without calibration tokens.
        needs_adapter: the method needs a :class:`ModelAdapter` (blocks, norms).
    """

    name: str
    description: str
    defaults: Mapping[str, Any]
    bits_fn: Callable[[tuple[int, int], dict[str, Any]], float]
    format_fn: Callable[[tuple[int, int], dict[str, Any]], str]
    weight_fn: Callable[[torch.Tensor, dict[str, Any]], torch.Tensor] | None = None
    model_fn: Callable[[QuantContext], None] | None = None
    check_fn: Callable[[int, dict[str, Any]], None] | None = None
    check_weight_fn: Callable[[torch.Tensor, dict[str, Any]], None] | None = None
    prepare_fn: Callable[[dict[str, Any], set[str]], dict[str, Any]] | None = None
    needs_calibration: bool = False
    needs_adapter: bool = False

    def __post_init__(self) -> None:
        if (self.weight_fn is None) == (self.model_fn is None):
            raise ValueError(f"method {self.name!r} needs exactly one of weight_fn and model_fn")


_REGISTRY: dict[str, Method] = {}
#: Every registered method by name (read-only view; add methods with :func:`register_method`).
METHODS: Mapping[str, Method] = MappingProxyType(_REGISTRY)


def register_method(method: Method, replace: bool = False) -> Method:
    """Add a method to :data:`METHODS` so ``quantize_model(model, method.name)`` finds it.

    The registry is the one deliberately mutable global of quantlab: it is how a lab or a user plugs in
    a new method without editing this module.

    Args:
        method: the :class:`Method`.
        replace: allow overwriting a method of the same name.

    Returns:
        ``method`` (so it can be used as an expression).
    """
    if not isinstance(method, Method):
        raise TypeError(f"method must be a Method, got {type(method).__name__}")
    if method.name in _REGISTRY and not replace:
        raise ValueError(f"a method named {method.name!r} is already registered; pass replace=True")
    _REGISTRY[method.name] = method
    return method


def _dry_run_check(method: Method) -> Callable[[int, dict[str, Any]], None]:
    """Validate a per-layer method's config by quantizing a tiny ``(2, in)`` matrix with it."""

    def check(in_features: int, config: dict[str, Any]) -> None:
        w = torch.randn(2, in_features, generator=torch.Generator().manual_seed(0))  # (2, in)
        method.weight_fn(w, config)

    return check


# -----------------------------------------------------------------------------
# Per-layer methods: round to nearest, NF4, GGUF blocks, 16-bit casts


def _rtn_prepare(config: dict[str, Any], given: set[str]) -> dict[str, Any]:
    if config["granularity"] != "group" and "group_size" not in given:
        config["group_size"] = None  # the default group size only applies to granularity="group"
    if config["scheme"] != "minmax" and "symmetric" not in given:
        config["symmetric"] = None  # absmax is symmetric, affine asymmetric, by definition
    return config


def _rtn_symmetric(config: dict[str, Any]) -> bool:
    return config["scheme"] == "absmax" or (config["scheme"] == "minmax" and bool(config["symmetric"]))


def _rtn_weight(W: torch.Tensor, config: dict[str, Any]) -> torch.Tensor:
    if config["granularity"] not in GRANULARITIES:
        raise ValueError(f"granularity must be one of {GRANULARITIES}, got {config['granularity']!r}")
    if config["scheme"] not in SCHEMES:
        raise ValueError(f"scheme must be one of {SCHEMES}, got {config['scheme']!r}")
    return fake_quantize_weight(
        W,
        config["n_bits"],
        config["granularity"],
        config["group_size"],
        config["scheme"],
        config["symmetric"],
    )


def _rtn_bits(shape: tuple[int, int], config: dict[str, Any]) -> float:
    out_features, in_features = shape
    zp_bits = 0 if _rtn_symmetric(config) else config["n_bits"]
    kwargs = {"scale_bits": config["scale_bits"], "zero_point_bits": zp_bits}
    if config["granularity"] == "tensor":
        return bits_per_weight(config["n_bits"], group_size=out_features * in_features, **kwargs)
    if config["granularity"] == "channel":
        return bits_per_weight(config["n_bits"], in_features=in_features, **kwargs)
    return bits_per_weight(config["n_bits"], group_size=config["group_size"], **kwargs)


def _rtn_format(shape: tuple[int, int], config: dict[str, Any]) -> str:
    g = {"tensor": "per-tensor", "channel": "per-channel"}.get(
        config["granularity"], f"g{config['group_size']}"
    )
    return f"int{config['n_bits']} {g} {'sym' if _rtn_symmetric(config) else 'asym'}"


def _nf4_weight(W: torch.Tensor, config: dict[str, Any]) -> torch.Tensor:
    if not isinstance(config["double_quant"], bool):
        raise TypeError(f"double_quant must be a bool, got {config['double_quant']!r}")
    codes, absmax = _formats.nf4_quantize(W, config["block_size"])
    if config["double_quant"]:
        absmax = _formats.nf4_double_dequantize(*_formats.nf4_double_quantize(absmax, 256), 256)
    return _formats.nf4_dequantize(codes, absmax, config["block_size"]).reshape(W.shape)


def _nf4_bits(shape: tuple[int, int], config: dict[str, Any]) -> float:
    n = shape[0] * shape[1]
    n_blocks = -(-n // config["block_size"])  # the tensor is cut into blocks in element order
    if config["double_quant"]:  # 8-bit absmax + an fp32 scale per 256 of them + the fp32 mean
        scale_bits = 8 * n_blocks + 32 * -(-n_blocks // 256) + 32
    else:
        scale_bits = 32 * n_blocks  # one fp32 absmax per block
    return (4 * n + scale_bits) / n


def _gguf_type(shape: tuple[int, int], config: dict[str, Any]) -> str:
    """The ggml type a layer is stored in: the method's, or the fallback when rows don't tile into blocks."""
    primary = config["ggml_type"]
    in_features = shape[1]
    fallback = config["fallback"]
    if fallback is not None and (
        not isinstance(fallback, str) or fallback.upper() not in _gguf.BLOCK_FORMATS
    ):
        raise ValueError(f"fallback must be None or one of {list(_gguf.BLOCK_FORMATS)}, got {fallback!r}")
    if in_features % _gguf.BLOCK_FORMATS[primary].block_size == 0:
        return primary
    if fallback is None:
        compatible = [
            t for t, f in _gguf.BLOCK_FORMATS.items() if in_features % f.block_size == 0 and t != "F32"
        ]
        raise ValueError(
            f"{primary} stores rows in blocks of {_gguf.BLOCK_FORMATS[primary].block_size} weights, but "
            f"in_features={in_features} is not a multiple of it (llama.cpp then falls back to another type); "
            f"pass fallback= one of {compatible}"
        )
    fallback = fallback.upper()
    if in_features % _gguf.BLOCK_FORMATS[fallback].block_size != 0:
        raise ValueError(
            f"fallback={fallback!r} has blocks of {_gguf.BLOCK_FORMATS[fallback].block_size}, which do not "
            f"tile in_features={in_features} either"
        )
    return fallback


def _gguf_weight(W: torch.Tensor, config: dict[str, Any]) -> torch.Tensor:
    ggml_type = _gguf_type(tuple(W.shape), config)
    raw = _gguf.quantize(W, ggml_type)  # row-major blocks: exactly the GGUF layout of an (out, in) weight
    return torch.from_numpy(_gguf.dequantize(raw, ggml_type)).reshape(W.shape)  # (out, in)


def _gguf_bits(shape: tuple[int, int], config: dict[str, Any]) -> float:
    return _gguf.BLOCK_FORMATS[_gguf_type(shape, config)].bits_per_weight


def _cast_weight(dtype: torch.dtype) -> Callable[[torch.Tensor, dict[str, Any]], torch.Tensor]:
    def weight_fn(W: torch.Tensor, config: dict[str, Any]) -> torch.Tensor:
        return W.to(dtype).to(W.dtype)

    return weight_fn


def _cast_check(dtype: torch.dtype) -> Callable[[torch.Tensor, dict[str, Any]], None]:
    def check_weight(W: torch.Tensor, config: dict[str, Any]) -> None:
        if not bool(torch.isfinite(W.to(dtype)).all()):
            raise ValueError(
                f"|w| reaches {float(W.abs().max()):.4g}: beyond the largest {dtype} "
                f"({torch.finfo(dtype).max:.4g}), it would become inf"
            )

    return check_weight


# -----------------------------------------------------------------------------
# Model-level methods: GPTQ, AWQ, AWQ + GPTQ, SmoothQuant


class _Hidden(nn.Module):
    """Stands in for an excluded linear while a driver runs: it computes the same thing but is no
    ``nn.Linear`` and holds the linear outside the module tree, so drivers neither see nor touch it."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        object.__setattr__(self, "_inner", inner)  # not registered as a submodule, on purpose

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self._inner(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:  # adapters read shapes (e.g. v_proj.weight.shape)
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.__dict__["_inner"], name)


def _set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


class _hide:
    """Context manager replacing the named in-block modules by :class:`_Hidden` stand-ins, then restoring."""

    def __init__(self, model: nn.Module, names: Iterable[str]) -> None:
        self.model, self.names = model, list(names)
        self.saved: dict[str, nn.Module] = {}

    def __enter__(self) -> _hide:
        for name in self.names:
            self.saved[name] = self.model.get_submodule(name)
            _set_module(self.model, name, _Hidden(self.saved[name]))
        return self

    def __exit__(self, *exc: object) -> None:
        for name, module in self.saved.items():
            _set_module(self.model, name, module)


_GPTQ_KEYS = ("n_bits", "group_size", "symmetric", "act_order", "static_groups", "block_size", "damp")


def _gptq_bits(shape: tuple[int, int], config: dict[str, Any]) -> float:
    out_features, in_features = shape
    symmetric = config["symmetric"] if "symmetric" in config else not config["zero_point"]
    zp_bits = 0 if symmetric else config["n_bits"]  # packed n-bit zero-points (GPTQ's qzeros)
    gs = config["group_size"]
    share = {"group_size": gs} if gs is not None else {"in_features": in_features}
    bits = bits_per_weight(config["n_bits"], scale_bits=16, zero_point_bits=zp_bits, **share)
    if config["act_order"] and gs is not None and not config["static_groups"]:
        bits += 32 / out_features  # g_idx: one int32 group index per input column
    return bits


def _gptq_format(shape: tuple[int, int], config: dict[str, Any]) -> str:
    symmetric = config["symmetric"] if "symmetric" in config else not config["zero_point"]
    g = f"g{config['group_size']}" if config["group_size"] is not None else "per-channel"
    return f"int{config['n_bits']} {g} {'sym' if symmetric else 'asym'}"


def _gptq_check(in_features: int, config: dict[str, Any]) -> None:
    cfg = {k: config[k] for k in _GPTQ_KEYS if k in config}
    if "symmetric" not in cfg:
        cfg["symmetric"] = not config["zero_point"]
    W = torch.randn(2, in_features, generator=torch.Generator().manual_seed(0))  # (2, in)
    _gptq.gptq_quantize(W, torch.eye(in_features), **cfg)
    if not isinstance(config.get("true_sequential", True), bool):
        raise TypeError(f"true_sequential must be a bool, got {config['true_sequential']!r}")


def _gptq_layer_groups(ctx: QuantContext, block_excluded: dict[int, set[str]]) -> Any:
    """GPTQ's ``layer_groups``: the adapter's minus the excluded names, if every block excludes the same."""
    groups = ctx.adapter.gptq.layer_groups
    if not ctx.config.get("true_sequential", True) or groups is None:
        return "all"
    sets = list(block_excluded.values())
    if any(s != sets[0] for s in sets):
        ctx.notes.append(
            "exclusions differ between blocks, so GPTQ quantized each block's linears from one pass "
            "(layer_groups='all') instead of the true-sequential order"
        )
        return "all"
    kept = [tuple(n for n in g if n not in sets[0]) for g in groups]
    return [g for g in kept if g]


def _gptq_layerwise(ctx: QuantContext, names: list[str], cfg: dict[str, Any]) -> None:
    """GPTQ for linears outside the blocks (e.g. an included LM head), on the current model's inputs."""
    helpers = {n: _gptq.GPTQ(ctx.model.get_submodule(n)) for n in names}
    handles = [h.register_hook() for h in helpers.values()]
    was_training = ctx.model.training
    ctx.model.eval()
    try:
        for batch in ctx.batches:
            ctx.model(batch)
    finally:
        for handle in handles:
            handle.remove()
        ctx.model.train(was_training)
    for helper in helpers.values():
        helper.quantize(apply=True, **cfg)


def _run_gptq(ctx: QuantContext, cfg: dict[str, Any]) -> None:
    """GPTQ on every target: the block driver inside the blocks, layer-wise GPTQ outside them."""
    prefix = ctx.adapter.blocks + "."
    n_blocks = len(ctx.adapter.get_blocks(ctx.model))
    block_excluded: dict[int, set[str]] = {b: set() for b in range(n_blocks)}
    hidden = [n for n in ctx.excluded if n.startswith(prefix)]
    for name in hidden:
        b, _, rel = name[len(prefix) :].partition(".")
        block_excluded[int(b)].add(rel)
    with _hide(ctx.model, hidden):
        report = _gptq.gptq_quantize_model(
            ctx.model,
            ctx.batches,
            adapter=ctx.adapter.gptq,
            layer_groups=_gptq_layer_groups(ctx, block_excluded),
            **cfg,
        )
    ctx.details["gptq"] = report
    done = {layer.name for layer in report.layers}
    rest = [n for n in ctx.targets if n not in done]
    if rest:
        _gptq_layerwise(ctx, rest, cfg)
        ctx.notes.append(f"quantized with layer-wise GPTQ outside the block driver: {rest}")


def _apply_gptq(ctx: QuantContext) -> None:
    _run_gptq(ctx, {k: ctx.config[k] for k in _GPTQ_KEYS})


_AWQ_SEARCH_KEYS = (
    "n_grid", "auto_scale", "auto_clip", "clip_n_grid", "max_shrink", "n_sample_tokens", "clip_method",
    "oc_batch_size",
)  # fmt: skip


def _awq_adapter(ctx: QuantContext) -> _awq.BlockAdapter:
    """The model's AWQ adapter without the scale groups that would rescale an excluded linear."""
    base = ctx.adapter.awq
    names = {id(m): n for n, m in ctx.model.named_modules()}
    excluded = set(ctx.excluded)
    dropped: list[str] = []

    def scale_groups(block: nn.Module) -> list[_awq.ScaleGroup]:
        prefix = names[id(block)] + "."
        kept = []
        for g in base.scale_groups(block):
            if any(prefix + n in excluded for n in (g.prev_op, *g.linears)):
                dropped.append(prefix + g.prev_op)
            else:
                kept.append(g)
        return kept

    ctx.details["awq_dropped_scale_groups"] = dropped
    return _replace(base, scale_groups=scale_groups)


def _run_awq(ctx: QuantContext, quantize: bool) -> None:
    """AWQ's search (and, with ``quantize``, its quantizer) on the blocks; records the rescalings."""
    cfg = ctx.config
    prefix = ctx.adapter.blocks + "."
    hidden = [n for n in ctx.excluded if n.startswith(prefix)]
    with _hide(ctx.model, hidden):
        result = _awq.awq_quantize_model(
            ctx.model,
            ctx.calibration,
            _awq_adapter(ctx),
            n_bits=cfg["n_bits"],
            group_size=cfg["group_size"],
            zero_point=cfg["zero_point"],
            quantize=quantize,
            **{k: cfg[k] for k in _AWQ_SEARCH_KEYS},
        )
    ctx.details["awq"] = result
    dropped = ctx.details["awq_dropped_scale_groups"]
    if dropped:
        ctx.notes.append(f"AWQ scale groups not searched (they would rescale an excluded linear): {dropped}")
    for rec in result.scales:
        for name in rec.linears:
            ctx.scale_columns(name, rec.scales)
        prev = ctx.model.get_submodule(rec.prev_op)
        if isinstance(prev, nn.Linear):  # its last len(s) output rows were divided by s
            r = torch.ones(prev.out_features, dtype=torch.float64)
            r[-rec.scales.numel() :] = 1.0 / rec.scales.double().cpu()
            ctx.scale_rows(rec.prev_op, r)


def _apply_awq(ctx: QuantContext) -> None:
    _run_awq(ctx, quantize=True)
    cfg = ctx.config
    rest = [n for n in ctx.targets if not ctx.in_block(n)]
    for name in rest:  # outside the blocks there is no op to fold a scale into: AWQ's quantizer alone
        lin = ctx.targets[name]
        lin.weight.data = _awq.awq_quantize(
            lin.weight.data, cfg["n_bits"], cfg["group_size"], cfg["zero_point"]
        )
    if rest:
        ctx.notes.append(
            f"quantized with AWQ's round-to-nearest (no scale search) outside the blocks: {rest}"
        )


def _apply_awq_gptq(ctx: QuantContext) -> None:
    _run_awq(ctx, quantize=False)  # scale and clip only; the weights stay in full precision
    cfg = {k: ctx.config[k] for k in _GPTQ_KEYS if k != "symmetric"}
    _run_gptq(ctx, {**cfg, "symmetric": not ctx.config["zero_point"]})


def _awq_check(in_features: int, config: dict[str, Any]) -> None:
    W = torch.randn(2, in_features, generator=torch.Generator().manual_seed(0))  # (2, in)
    _awq.awq_quantize(W, config["n_bits"], config["group_size"], config["zero_point"])
    for key in ("auto_scale", "auto_clip"):
        if not isinstance(config[key], bool):
            raise TypeError(f"{key} must be a bool, got {config[key]!r}")
    if config["clip_method"] not in ("reference", "matmul"):
        raise ValueError(f"clip_method must be 'reference' or 'matmul', got {config['clip_method']!r}")


def _awq_gptq_check(in_features: int, config: dict[str, Any]) -> None:
    _awq_check(in_features, config)
    _gptq_check(in_features, config)


def _awq_bits(shape: tuple[int, int], config: dict[str, Any]) -> float:
    zp_bits = config["n_bits"] if config["zero_point"] else 0
    gs = config["group_size"]
    share = {"group_size": gs} if gs not in (None, -1) else {"in_features": shape[1]}
    return bits_per_weight(config["n_bits"], scale_bits=16, zero_point_bits=zp_bits, **share)


def _awq_format(shape: tuple[int, int], config: dict[str, Any]) -> str:
    g = f"g{config['group_size']}" if config["group_size"] not in (None, -1) else "per-channel"
    return f"int{config['n_bits']} {g} {'asym' if config['zero_point'] else 'sym'}"


def _apply_smoothquant(ctx: QuantContext) -> None:
    cfg = ctx.config
    targets = set(ctx.targets)
    groups = _sq.find_smooth_groups(ctx.model, ctx.adapter.smoothquant)
    kept = [g for g in groups if set(g.linears) <= targets]  # a site must rescale all of its readers
    if len(kept) < len(groups):
        ctx.notes.append(
            f"not smoothed (they feed an excluded linear): {[g.norm for g in groups if g not in kept]}"
        )
    applied: dict[str, torch.Tensor] = {}
    if kept:
        act = _sq.collect_act_scales(ctx.model, ctx.batches, names=[g.linears[0] for g in kept])
        for g in kept:
            norm = ctx.model.get_submodule(g.norm)
            fcs = [ctx.model.get_submodule(n) for n in g.linears]
            s = _sq.smooth_norm_linears(norm, fcs, act[g.linears[0]], cfg["alpha"])
            applied[g.norm] = s
            for name in g.linears:
                ctx.scale_columns(name, s)
    ctx.details["smoothing"] = applied
    act_scales = None
    if cfg["act_quant"] == "per_tensor_static":  # static ranges must be measured on the smoothed model
        act_scales = _sq.collect_act_scales(ctx.model, ctx.batches, names=list(ctx.targets))
    converted = _sq.quantize_model_w8a8(
        ctx.model,
        weight_quant=cfg["weight_quant"],
        act_quant=cfg["act_quant"],
        exclude=[n for n, m in ctx.model.named_modules() if isinstance(m, nn.Linear) and n not in targets],
        act_scales=act_scales,
        quantize_output=cfg["quantize_output"],
        n_bits=cfg["n_bits"],
    )
    if set(converted) != targets:  # the suffix rule of `exclude` could in principle catch a nested name
        raise RuntimeError(f"W8A8 conversion touched {sorted(set(converted) ^ targets)} unexpectedly")


def _smoothquant_check(in_features: int, config: dict[str, Any]) -> None:
    check_probability(config["alpha"], "alpha")
    W = torch.randn(2, in_features, generator=torch.Generator().manual_seed(0))  # (2, in)
    static = config["act_quant"] == "per_tensor_static"
    _sq.W8A8Linear(W, None, config["weight_quant"], config["act_quant"], 1.0 if static else None,
                   config["quantize_output"], config["n_bits"])  # fmt: skip


def _smoothquant_bits(shape: tuple[int, int], config: dict[str, Any]) -> float:
    if config["weight_quant"] == "per_channel":
        return bits_per_weight(config["n_bits"], in_features=shape[1], scale_bits=16)
    return bits_per_weight(config["n_bits"], group_size=shape[0] * shape[1], scale_bits=16)


# -----------------------------------------------------------------------------
# The built-in registry


def _register_builtins() -> None:
    rtn = Method(
        name="rtn",
        description="round to nearest on an integer grid (per tensor / channel / group)",
        defaults=MappingProxyType(
            {
                "n_bits": 4,
                "granularity": "group",
                "group_size": 128,
                "symmetric": False,
                "scheme": "minmax",
                "scale_bits": 16,
            }  # fmt: skip
        ),
        bits_fn=_rtn_bits,
        format_fn=_rtn_format,
        weight_fn=_rtn_weight,
        prepare_fn=_rtn_prepare,
    )
    nf4 = Method(
        name="nf4",
        description="QLoRA NormalFloat-4, absmax per block",
        defaults=MappingProxyType({"block_size": 64, "double_quant": False}),
        bits_fn=_nf4_bits,
        format_fn=lambda shape, c: f"nf4 b{c['block_size']}" + (" dq" if c["double_quant"] else ""),
        weight_fn=_nf4_weight,
    )
    methods = [rtn, nf4]
    for ggml_type in ("Q8_0", "Q4_0", "Q4_1", "Q4_K", "Q6_K"):
        methods.append(
            Method(
                name=f"gguf_{ggml_type.lower()}",
                description=f"llama.cpp {ggml_type} block round trip",
                defaults=MappingProxyType({"fallback": None}),
                bits_fn=lambda shape, c, t=ggml_type: _gguf_bits(shape, {**c, "ggml_type": t}),
                format_fn=lambda shape, c, t=ggml_type: _gguf_type(shape, {**c, "ggml_type": t}),
                weight_fn=lambda W, c, t=ggml_type: _gguf_weight(W, {**c, "ggml_type": t}),
            )
        )
    for name, dtype in (("fp16", torch.float16), ("bf16", torch.bfloat16)):
        methods.append(
            Method(
                name=name,
                description=f"cast to {dtype} and back",
                defaults=MappingProxyType({}),
                bits_fn=lambda shape, c: 16.0,
                format_fn=lambda shape, c, n=name: n,
                weight_fn=_cast_weight(dtype),
                check_weight_fn=_cast_check(dtype),
            )
        )
    gptq_defaults = {"n_bits": 4, "group_size": 128, "symmetric": False, "act_order": False,
                     "static_groups": False, "block_size": 128, "damp": 0.01,
                     "true_sequential": True}  # fmt: skip
    awq_defaults = {"n_bits": 4, "group_size": 128, "zero_point": True, "n_grid": 20, "auto_scale": True,
                    "auto_clip": True, "clip_n_grid": 20, "max_shrink": 0.5,
                    "n_sample_tokens": 512, "clip_method": "reference", "oc_batch_size": None}  # fmt: skip
    methods += [
        Method(
            name="gptq",
            description="GPTQ, block by block with second-order error feedback",
            defaults=MappingProxyType(gptq_defaults),
            bits_fn=_gptq_bits,
            format_fn=_gptq_format,
            model_fn=_apply_gptq,
            check_fn=_gptq_check,
            needs_calibration=True,
            needs_adapter=True,
        ),
        Method(
            name="awq",
            description="AWQ activation-aware scale and clip search, then round to nearest",
            defaults=MappingProxyType(awq_defaults),
            bits_fn=_awq_bits,
            format_fn=_awq_format,
            model_fn=_apply_awq,
            check_fn=_awq_check,
            needs_calibration=True,
            needs_adapter=True,
        ),
        Method(
            name="awq+gptq",
            description="AWQ scaling and clipping, then GPTQ",
            defaults=MappingProxyType(
                {
                    **awq_defaults,
                    **{k: v for k, v in gptq_defaults.items() if k not in awq_defaults and k != "symmetric"},
                }
            ),
            bits_fn=_gptq_bits,  # GPTQ's storage, zero-points as AWQ's zero_point says
            format_fn=_gptq_format,
            model_fn=_apply_awq_gptq,
            check_fn=_awq_gptq_check,
            needs_calibration=True,
            needs_adapter=True,
        ),
        Method(
            name="smoothquant",
            description="SmoothQuant smoothing, then W8A8 (weights and activations) simulation",
            defaults=MappingProxyType(
                {
                    "alpha": 0.5,
                    "n_bits": 8,
                    "weight_quant": "per_channel",
                    "act_quant": "per_token",
                    "quantize_output": False,
                }  # fmt: skip
            ),
            bits_fn=_smoothquant_bits,
            format_fn=lambda shape, c: f"W{c['n_bits']}A{c['n_bits']} {c['weight_quant']}/{c['act_quant']}",
            model_fn=_apply_smoothquant,
            check_fn=_smoothquant_check,
            needs_calibration=True,
            needs_adapter=True,
        ),
    ]
    for m in methods:
        register_method(m)


_register_builtins()


# -----------------------------------------------------------------------------
# The entry point


def _get_method(method: object) -> Method:
    if isinstance(method, Method):
        return method
    if not isinstance(method, str) or method not in METHODS:
        raise ValueError(f"unknown method {method!r}; valid methods: {sorted(METHODS)}")
    return METHODS[method]


def _resolve_config(method: Method, config: dict[str, Any]) -> dict[str, Any]:
    unknown = sorted(set(config) - set(method.defaults))
    if unknown:
        valid = sorted(method.defaults) or "none (this method takes no options)"
        raise ValueError(f"unknown option(s) {unknown} for method {method.name!r}; valid options: {valid}")
    resolved = {**method.defaults, **config}
    if method.prepare_fn is not None:
        resolved = method.prepare_fn(resolved, set(config))
    return resolved


def _untie(model: nn.Module, targets: dict[str, nn.Linear]) -> list[str]:
    """Give every target whose weight is shared with another module (a tied LM head) its own copy."""
    owners: dict[int, int] = {}
    for _, module in model.named_modules(remove_duplicate=False):
        for p in module.parameters(recurse=False):
            owners[id(p)] = owners.get(id(p), 0) + 1
    untied = []
    for name, linear in targets.items():
        if owners.get(id(linear.weight), 0) > 1:
            w = linear.weight
            linear.weight = nn.Parameter(w.detach().clone(), requires_grad=w.requires_grad)
            untied.append(name)
    return untied


class _InOriginalBasis(nn.Module):
    """A rescaled layer seen from the original layer's side: ``module(x / col) / row``."""

    def __init__(self, module: nn.Module, col: torch.Tensor | None, row: torch.Tensor | None) -> None:
        super().__init__()
        self.module, self.col, self.row = module, col, row

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.module(x if self.col is None else x / self.col.to(x.dtype))
        return y if self.row is None else y / self.row.to(y.dtype)


class _Affine(nn.Module):
    """``x -> x W^T + b`` for a weight that is not (yet) inside an ``nn.Linear``."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.weight, self.bias = weight, bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight.to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))


def _measure(
    W: torch.Tensor,
    b: torch.Tensor | None,
    module: nn.Module,
    col: torch.Tensor | None,
    row: torch.Tensor | None,
    X: torch.Tensor | None,
) -> tuple[float, LayerError | None]:
    """Relative weight error and output error of ``module`` against the original ``(W, b)``."""
    W_q = module.weight.detach()  # (out, in) as stored now
    if col is not None or row is not None:
        W_q = W_q.double()
        if col is not None:
            W_q = W_q / col.view(1, -1)  # undo W[:, j] *= c_j
        if row is not None:
            W_q = W_q / row.view(-1, 1)  # undo W[i, :] *= r_i
    rel = _relative_error(W, W_q)
    if X is None or X.shape[0] == 0:
        return rel, None
    err = layer_output_error(_Affine(W, b), _InOriginalBasis(module, col, row), X)
    return rel, err


@torch.no_grad()
def quantize_model(
    model: nn.Module,
    method: str | Method,
    *,
    calibration: torch.Tensor | Sequence[torch.Tensor] | None = None,
    exclude: Iterable[str] = ("lm_head",),
    adapter: str | ModelAdapter = "auto",
    copy: bool = False,
    batch_size: int = 8,
    error_tokens: int = 256,
    **config: Any,
) -> QuantReport:
    """Quantize every ``nn.Linear`` of ``model`` except ``exclude`` with ``method``, **in place**.

    The model passed in is modified (its linear weights are replaced by their fake-quantized values,
    or, for ``"smoothquant"``, the linears by ``W8A8Linear`` modules and the norms rescaled). Pass
    ``copy=True`` to quantize a deep copy instead and find it in ``report.model``. Embeddings are never
    modified; a linear whose weight is tied to another module (SmolLM2's head shares the embedding)
    gets its own copy before it is quantized.

    Everything is checked before anything is modified: the method name, the option names and values
    (each distinct layer width is dry-run), the calibration tokens, the adapter.

    Args:
        model: the model (e.g. from :func:`quantlab.models.smollm2.load_smollm2` or
            :func:`quantlab.models.tiny_gpt.load_tiny_gpt`).
        method: a name in :data:`METHODS` (``"rtn"``, ``"nf4"``, ``"gguf_q4_k"``, ``"gptq"``, ...) or a
            :class:`Method`.
        calibration: token ids ``(n_samples, seq)`` (or a list of ``(batch, seq)`` tensors), e.g.
            :func:`quantlab.data.calibration_batches`. Required by gptq / awq / awq+gptq / smoothquant;
            for the other methods it is only used to measure each layer's output error.
        exclude: module names or globs left unquantized (a pattern matches a name equal to it, ending in
            ``"." + pattern``, or as an ``fnmatch`` glob such as ``"*.down_proj"``).
        adapter: ``"auto"``, ``"llama"``, ``"tiny_gpt"`` or a :class:`ModelAdapter` (needed by the
            block-wise methods).
        copy: quantize ``copy.deepcopy(model)`` and leave ``model`` untouched.
        batch_size: calibration sequences per forward pass.
        error_tokens: calibration tokens per layer used for the output error (0 to skip it).
        **config: the method's options; ``METHODS[method].defaults`` lists them with their defaults.
            rtn: ``n_bits``, ``granularity`` ("tensor"/"channel"/"group"), ``group_size``,
            ``symmetric``, ``scheme`` ("minmax"/"absmax"/"affine"), ``scale_bits``. nf4: ``block_size``,
            ``double_quant``. gguf_*: ``fallback`` (type for rows that do not tile into blocks).
            gptq: ``n_bits``, ``group_size``, ``symmetric``, ``act_order``, ``static_groups``,
            ``block_size``, ``damp``, ``true_sequential``. awq: ``n_bits``, ``group_size``,
            ``zero_point``, ``n_grid``, ``auto_scale``, ``auto_clip``, ``clip_n_grid``, ``max_shrink``,
            ``n_sample_tokens``, ``clip_method`` ("reference" is llm-awq's arithmetic; "matmul" is much
            faster on a CPU), ``oc_batch_size``. smoothquant: ``alpha``, ``n_bits``, ``weight_quant``,
            ``act_quant``, ``quantize_output``.

    Returns:
        A :class:`QuantReport` (per-layer errors, true bits per weight, memory before/after, time).

    Raises:
        ValueError: unknown method or option, missing calibration, a config the layers cannot take
            (e.g. a group size that does not divide ``in_features``), no linear left to quantize.
        TypeError: a model that is not an ``nn.Module``, calibration that is not integer token ids.
    """
    tick = time.perf_counter()
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    m = _get_method(method)
    cfg = _resolve_config(m, config)
    patterns = _check_exclude(exclude)
    tokens = _check_calibration(calibration)
    if m.needs_calibration and tokens is None:
        free = sorted(n for n, x in METHODS.items() if not x.needs_calibration)
        raise ValueError(
            f"method {m.name!r} needs calibration= token ids (n_samples, seq), e.g. from "
            f"quantlab.data.calibration_batches; methods without calibration: {free}"
        )
    batch_size = check_int(batch_size, "batch_size")
    error_tokens = check_int(error_tokens, "error_tokens")
    if batch_size < 1 or error_tokens < 0:
        raise ValueError(f"need batch_size >= 1 and error_tokens >= 0, got {batch_size} and {error_tokens}")
    if not isinstance(copy, bool):
        raise TypeError(f"copy must be a bool, got {copy!r}")

    linears = {n: mod for n, mod in model.named_modules() if isinstance(mod, nn.Linear)}
    if not linears:
        raise ValueError(f"{type(model).__name__} has no nn.Linear layer to quantize")
    excluded = [n for n in linears if _matches(n, patterns)]
    if len(excluded) == len(linears):
        raise ValueError(f"exclude={patterns} excludes every nn.Linear of the model; nothing to quantize")
    notes = [
        f"exclude pattern {p!r} matched no linear"
        for p in patterns
        if not any(_matches(n, [p]) for n in linears)
    ]
    ad = _resolve_adapter(model, adapter, required=m.needs_adapter)
    check = m.check_fn or _dry_run_check(m)
    for in_features in sorted({lin.in_features for n, lin in linears.items() if n not in excluded}):
        try:
            check(in_features, cfg)
            m.bits_fn((2, in_features), cfg)
            m.format_fn((2, in_features), cfg)
        except (ValueError, TypeError) as err:
            raise type(err)(
                f"method {m.name!r} with {cfg} on layers with in_features={in_features}: {err}"
            ) from err

    for name, lin in linears.items():  # data checks: every real weight, still before any change
        if name in excluded:
            continue
        try:
            check_float_tensor(lin.weight, f"{name}.weight")
            if m.check_weight_fn is not None:
                m.check_weight_fn(lin.weight.detach(), cfg)
        except (ValueError, TypeError) as err:
            raise type(err)(f"method {m.name!r} cannot quantize {name}: {err}") from err

    if copy:
        model = _copy.deepcopy(model)
    linears = {n: mod for n, mod in model.named_modules() if isinstance(mod, nn.Linear)}
    targets = {n: lin for n, lin in linears.items() if n not in excluded}
    memory_before = module_bytes(model, buffers=False)
    untied = _untie(model, targets)
    if untied:
        notes.append(f"untied from the embedding before quantizing (the embedding is unchanged): {untied}")
    batches = [] if tokens is None else _chunks(tokens.to(next(model.parameters()).device), batch_size)

    # Inputs of every target on the original model, to measure output errors afterwards.
    inputs: dict[str, torch.Tensor] = {}
    if tokens is not None and error_tokens > 0:
        n_seq = min(tokens.shape[0], -(-error_tokens // tokens.shape[1]))
        first = _chunks(tokens[:n_seq].to(batches[0].device), batch_size)
        inputs = collect_linear_inputs(model, first, list(targets), max_rows=error_tokens)

    layers: list[LayerQuantReport] = []
    details: dict[str, Any] = {}

    def record(name: str, W: torch.Tensor, b: torch.Tensor | None, module: nn.Module,
               col: torch.Tensor | None = None, row: torch.Tensor | None = None) -> None:  # fmt: skip
        rel, err = _measure(W, b, module, col, row, inputs.get(name))
        shape = (W.shape[0], W.shape[1])
        bpw = m.bits_fn(shape, cfg)
        layers.append(
            LayerQuantReport(
                name=name,
                shape=shape,
                format=m.format_fn(shape, cfg),
                bits_per_weight=bpw,
                weight_rel_error=rel,
                output_rel_error=None if err is None else err.rel_mse,
                output_sqnr_db=None if err is None else err.sqnr_db,
                bytes_before=W.numel() * W.element_size(),
                bytes_after=W.numel() * bpw / 8,
            )
        )

    quantize_seconds = 0.0
    if m.weight_fn is not None:
        for name, lin in targets.items():
            W = lin.weight.detach()  # (out, in) still the original: measured before it is overwritten
            t0 = time.perf_counter()
            W_q = m.weight_fn(W.float(), cfg).to(W.dtype)  # a new tensor (weight_fn is pure)
            quantize_seconds += time.perf_counter() - t0
            record(name, W, None if lin.bias is None else lin.bias.detach(), _Affine(W_q, lin.bias))
            lin.weight.data.copy_(W_q)
    else:
        originals = {n: (lin.weight.detach().clone(), None if lin.bias is None else lin.bias.detach().clone())
                     for n, lin in targets.items()}  # fmt: skip
        ctx = QuantContext(model, targets, excluded, tokens, batches, ad, cfg, notes=notes)
        t0 = time.perf_counter()
        m.model_fn(ctx)
        quantize_seconds = time.perf_counter() - t0
        details = ctx.details
        for name in targets:
            W, b = originals.pop(name)
            record(name, W, b, model.get_submodule(name), ctx.col_scale.get(name), ctx.row_scale.get(name))

    shared = sum(r.bytes_before for r in layers if r.name not in untied)
    memory_after = memory_before - shared + sum(r.bytes_after for r in layers)
    return QuantReport(
        method=m.name,
        config=cfg,
        adapter=None if ad is None else ad.name,
        layers=layers,
        excluded=excluded,
        memory_before=memory_before,
        memory_after=memory_after,
        seconds=time.perf_counter() - tick,
        quantize_seconds=quantize_seconds,
        notes=notes,
        details=details,
        model=model,
    )
