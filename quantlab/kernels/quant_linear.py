"""``QuantLinear``: an ``nn.Linear`` replacement that stores packed 4-bit weights.

The weight lives in memory as 4-bit codes (two per byte, or eight per int32 word) plus one fp16
scale and zero-point per group of ``group_size`` input columns: ~4.25 bits per weight at group 128
instead of 16. ``forward`` runs the fused Triton kernel (:func:`quantlab.kernels.w4a16.w4a16_matmul`)
on CUDA tensors and the pure-PyTorch reference on the CPU (the Triton interpreter is exact but far too
slow for a whole model; pass ``backend="triton"`` to force it on small layers).

Any of quantlab's weight quantizers can fill one: round-to-nearest (:meth:`QuantLinear.from_linear`),
or the codes/scales/zero-points that GPTQ and AWQ produce (:meth:`QuantLinear.from_quantized`,
with ``g_idx`` for GPTQ's act-order).

References:
    Frantar et al., "GPTQ", ICLR 2023; Lin et al., "AWQ", MLSys 2024 (group-wise int4 storage).
"""

from __future__ import annotations

import torch
from torch import nn

from quantlab._checks import check_group_size, check_int
from quantlab.kernels.w4a16 import triton_available, w4a16_matmul, w4a16_matmul_reference
from quantlab.packing import pack_codes, unpack_codes
from quantlab.uniform import minmax_params, quantize

__all__ = ["BACKENDS", "QuantLinear", "module_memory_bytes", "quantize_linears"]

BACKENDS = ("auto", "triton", "reference")


class QuantLinear(nn.Module):
    """A linear layer ``y = x W^T + b`` whose ``W (out_features, in_features)`` is stored as int4.

    Buffers:
        packed: ``(out, in / 2)`` uint8 or ``(out, in / 8)`` int32 codes, ``low_first`` along ``in``.
        scale: ``(out, n_groups)`` fp16.
        zero_point: ``(out, n_groups)`` fp16 (integer values; fp16 holds them exactly).
        g_idx: ``(in,)`` int32 group of each input column, or an empty tensor for ``k // group_size``.
        bias: ``(out,)`` or None.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        group_size: int = 128,
        bias: bool = True,
        container: torch.dtype = torch.uint8,
        backend: str = "auto",
    ) -> None:
        super().__init__()
        self.in_features = check_int(in_features, "in_features")
        self.out_features = check_int(out_features, "out_features")
        self.group_size = check_group_size(group_size, self.in_features)
        if container not in (torch.uint8, torch.int32):
            raise ValueError(f"container must be torch.uint8 or torch.int32, got {container}")
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        self.backend = backend
        per = 2 if container == torch.uint8 else 8
        if self.in_features % per:
            raise ValueError(
                f"in_features={self.in_features} must be divisible by {per} to pack into {container}"
            )
        n_groups = self.in_features // self.group_size
        self.register_buffer("packed", torch.zeros(out_features, in_features // per, dtype=container))
        self.register_buffer("scale", torch.ones(out_features, n_groups, dtype=torch.float16))
        self.register_buffer("zero_point", torch.zeros(out_features, n_groups, dtype=torch.float16))
        self.register_buffer("g_idx", torch.zeros(0, dtype=torch.int32))
        self.register_buffer("bias", torch.zeros(out_features, dtype=torch.float16) if bias else None)

    # -- construction ----------------------------------------------------

    @classmethod
    def from_quantized(
        cls,
        codes: torch.Tensor,
        scale: torch.Tensor,
        zero_point: torch.Tensor,
        group_size: int,
        bias: torch.Tensor | None = None,
        g_idx: torch.Tensor | None = None,
        container: torch.dtype = torch.uint8,
        backend: str = "auto",
    ) -> QuantLinear:
        """Build from integer codes ``(out, in)`` in ``[0, 15]`` and per-group ``(out, n_groups)`` parameters.

        ``g_idx`` (``(in,)``) gives each input column's group when groups are not contiguous (GPTQ with
        act-order); otherwise column ``k`` belongs to group ``k // group_size``.
        """
        out_features, in_features = codes.shape
        layer = cls(in_features, out_features, group_size, bias is not None, container, backend)
        n_groups = in_features // group_size if g_idx is None else scale.shape[1]
        if scale.shape != (out_features, n_groups) or zero_point.shape != (out_features, n_groups):
            raise ValueError(
                f"scale and zero_point must have shape ({out_features}, {n_groups}), "
                f"got {tuple(scale.shape)} and {tuple(zero_point.shape)}"
            )
        layer.packed = pack_codes(codes, 4, container=container, order="low_first")
        layer.scale = scale.to(torch.float16).contiguous()
        layer.zero_point = zero_point.to(torch.float16).contiguous()
        if g_idx is not None:
            layer.g_idx = g_idx.to(torch.int32).contiguous()
        if bias is not None:
            layer.bias = bias.detach().to(torch.float16).clone()
        return layer

    @classmethod
    def from_linear(
        cls,
        linear: nn.Linear,
        group_size: int = 128,
        symmetric: bool = False,
        container: torch.dtype = torch.uint8,
        backend: str = "auto",
    ) -> QuantLinear:
        """Round-to-nearest 4-bit quantization of an ``nn.Linear`` with GPTQ's min-max quantizer per group."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"linear must be an nn.Linear, got {type(linear).__name__}")
        w = linear.weight.detach().float()
        out_features, in_features = w.shape
        group_size = check_group_size(group_size, in_features)
        n_groups = in_features // group_size
        grouped = w.reshape(out_features * n_groups, group_size)  # (out * n_groups, group_size)
        scale, zero_point = minmax_params(grouped, n_bits=4, symmetric=symmetric)  # (out * n_groups, 1)
        codes = quantize(grouped, scale, zero_point, 0, 15).reshape(out_features, in_features)  # (out, in)
        return cls.from_quantized(
            codes,
            scale.reshape(out_features, n_groups),
            zero_point.reshape(out_features, n_groups),
            group_size,
            bias=linear.bias,
            container=container,
            backend=backend,
        )

    # -- use ---------------------------------------------------------------

    def codes(self) -> torch.Tensor:
        """The unpacked integer codes ``(out, in)``."""
        return unpack_codes(self.packed, 4, self.in_features, container=self.packed.dtype, order="low_first")

    def dequantized_weight(self) -> torch.Tensor:
        """``(out, in)`` fp32 weight ``(code - zero_point) * scale``."""
        g_idx = self.g_idx if self.g_idx.numel() else torch.arange(self.in_features) // self.group_size
        codes = self.codes().float()
        return (codes - self.zero_point.float()[:, g_idx.long()]) * self.scale.float()[:, g_idx.long()]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features).contiguous()  # (tokens, in)
        g_idx = self.g_idx if self.g_idx.numel() else None
        use_triton = self.backend == "triton" or (self.backend == "auto" and x.is_cuda and triton_available())
        matmul = w4a16_matmul if use_triton else w4a16_matmul_reference
        y = matmul(
            x2, self.packed, self.scale, self.zero_point, self.group_size, g_idx=g_idx
        )  # (tokens, out)
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y.reshape(*lead, self.out_features)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"group_size={self.group_size}, "
            f"container={self.packed.dtype}, backend={self.backend}"
        )


def quantize_linears(
    model: nn.Module,
    group_size: int = 128,
    exclude: tuple[str, ...] = ("lm_head",),
    symmetric: bool = False,
    backend: str = "auto",
) -> list[str]:
    """Replace every ``nn.Linear`` of ``model`` (in place) by a round-to-nearest :class:`QuantLinear`.

    Args:
        model: the model to modify.
        group_size: input columns per group; a layer whose ``in_features`` it does not divide is left
            in full precision and not listed.
        exclude: name suffixes to keep in full precision (the LM head by default; embeddings are
            ``nn.Embedding`` and never touched).
        symmetric, backend: see :class:`QuantLinear`.

    Returns:
        The names of the replaced layers.
    """
    replaced = []
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            full = f"{name}.{child_name}" if name else child_name
            if not isinstance(child, nn.Linear) or any(full.endswith(e) for e in exclude):
                continue
            if child.in_features % group_size or child.in_features % 2:
                continue
            setattr(
                module, child_name, QuantLinear.from_linear(child, group_size, symmetric, backend=backend)
            )
            replaced.append(full)
    return replaced


def module_memory_bytes(model: nn.Module) -> int:
    """Bytes of every parameter and buffer of ``model`` (tied tensors counted once)."""
    seen: set[int] = set()
    total = 0
    for t in list(model.parameters()) + list(model.buffers()):
        if t is None or t.data_ptr() in seen:
            continue
        seen.add(t.data_ptr())
        total += t.numel() * t.element_size()
    return total
