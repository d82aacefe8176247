"""How much memory a model needs: weights at a given format, their scale overhead, and the KV cache.

The arithmetic every quantization discussion starts from::

    weight bytes = n_params * bits_per_weight / 8
    bits_per_weight = n_bits + (bits of the scale and zero-point) / group_size     (group-wise formats)
    KV cache bytes  = 2 (K and V) * n_layers * n_kv_heads * head_dim * context * batch * bytes_per_value

Sizes are reported in decimal gigabytes (1 GB = 10^9 bytes), the unit model cards and the familiar
"a 70B model needs 140 GB in FP16" table use; :func:`gib` converts to binary GiB (what ``nvidia-smi``
shows).

Mixed formats such as llama.cpp's ``Q4_K_M`` store different tensors at different precisions, so their
true bits per weight depend on the architecture: :func:`format_bits_per_weight` computes it tensor by
tensor for a :class:`ModelPreset` instead of quoting a number.

References:
    Dettmers et al., "QLoRA: Efficient Finetuning of Quantized LLMs", NeurIPS 2023 (NF4 block size 64,
    double quantization of the absmax constants).
    Gerganov et al., llama.cpp / GGML (block formats Q8_0, Q4_0, Q4_K, Q6_K and the Q4_K_M recipe).
    Touvron et al., "Llama 2", 2023; Grattafiori et al., "The Llama 3 Herd of Models", 2024
    (architectures of the presets).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from quantlab._checks import check_int, check_n_bits, check_positive
from quantlab.gguf import BLOCK_FORMATS
from quantlab.packing import bits_per_weight as group_bits_per_weight

__all__ = [
    "FORMATS",
    "PRESETS",
    "MemoryReport",
    "ModelPreset",
    "WeightFormat",
    "format_bits_per_weight",
    "gib",
    "kv_cache_bytes",
    "memory_table",
    "model_memory",
    "weight_bytes",
]

GB = 1e9


def gib(n_bytes: float) -> float:
    """Bytes to binary gibibytes (2^30 bytes)."""
    return n_bytes / 2**30


# -----------------------------------------------------------------------------
# Bits per weight of a format


@dataclass(frozen=True)
class WeightFormat:
    """A storage format for weights.

    Attributes:
        name: short name used in tables.
        code_bits: bits of each weight's code alone (what is left when overhead is ignored).
        bits_per_weight: true bits per weight including scale/zero-point overhead, or ``None`` for a
            mixed format whose value depends on the architecture (see :func:`format_bits_per_weight`).
        description: one line for tables and the book.
    """

    name: str
    code_bits: float
    bits_per_weight: float | None
    description: str = ""


# Block formats are counted from their byte layout (quantlab.gguf): bits = 8 * bytes / weights per block.
_Q8_0 = BLOCK_FORMATS["Q8_0"].bits_per_weight  # fp16 scale + 32 int8 codes: 8.5
_Q4_0 = BLOCK_FORMATS["Q4_0"].bits_per_weight  # fp16 scale + 32 4-bit codes: 4.5
_Q4_K = BLOCK_FORMATS["Q4_K"].bits_per_weight  # fp16 d, dmin, 12 B of 6-bit scales/mins, 128 B codes
_Q6_K = BLOCK_FORMATS["Q6_K"].bits_per_weight  # 128 B low bits + 64 B high bits + 16 int8 scales + fp16 d

FORMATS: dict[str, WeightFormat] = {
    f.name: f
    for f in [
        WeightFormat("FP32", 32, 32.0, "IEEE single precision"),
        WeightFormat("FP16", 16, 16.0, "IEEE half precision (or BF16: same size)"),
        WeightFormat("INT8", 8, group_bits_per_weight(8), "8-bit per-channel, scale overhead negligible"),
        WeightFormat("INT4", 4, group_bits_per_weight(4), "4-bit per-channel, scale overhead negligible"),
        WeightFormat(
            "INT4-g128", 4, group_bits_per_weight(4, 128, 16, 4), "4-bit, group 128, fp16 scale + 4-bit zero"
        ),
        WeightFormat(
            "INT3-g128", 3, group_bits_per_weight(3, 128, 16, 3), "3-bit, group 128, fp16 scale + zero"
        ),
        WeightFormat("NF4", 4, group_bits_per_weight(4, 64, 32), "QLoRA NF4, block 64, fp32 absmax"),
        WeightFormat(
            "NF4-DQ",
            4,
            # double quantization: absmax in 8 bits, plus one fp32 constant per 256 absmax values
            4 + 8 / 64 + 32 / (64 * 256),
            "NF4 with double-quantized (8-bit, block 256) absmax",
        ),
        WeightFormat("Q8_0", 8, _Q8_0, "GGUF Q8_0: blocks of 32, fp16 scale"),
        WeightFormat("Q4_0", 4, _Q4_0, "GGUF Q4_0: blocks of 32, fp16 scale"),
        WeightFormat("Q4_K", 4, _Q4_K, "GGUF Q4_K: super-blocks of 256, 6-bit sub-block scales and mins"),
        WeightFormat("Q6_K", 6, _Q6_K, "GGUF Q6_K: super-blocks of 256, 8-bit sub-block scales"),
        WeightFormat("Q4_K_M", 4, None, "GGUF mix: Q4_K, with Q6_K for output, some attn_v and ffn_down"),
    ]
}


# -----------------------------------------------------------------------------
# Model presets (Llama-style decoder architectures)


@dataclass(frozen=True)
class ModelPreset:
    """A Llama-style decoder, enough to count parameters tensor by tensor and size the KV cache.

    Attributes:
        name: display name.
        n_layers, d_model, d_ff: depth, hidden size, MLP (SwiGLU) inner size.
        n_heads, n_kv_heads: query heads and key/value heads (grouped-query attention).
        vocab_size: embedding rows.
        tied_embeddings: the LM head reuses the embedding matrix.
        nominal_params: the size in the model's name (e.g. 70e9), used for the classic table.
    """

    name: str
    n_layers: int
    d_model: int
    d_ff: int
    n_heads: int
    n_kv_heads: int
    vocab_size: int
    tied_embeddings: bool = False
    nominal_params: float | None = None
    extra: dict = field(default_factory=dict, compare=False)

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    def tensors(self) -> list[tuple[str, int, int]]:
        """Every weight matrix as ``(gguf_name, n_params, layer_index)``; layer -1 for global tensors.

        Norm weights (vectors) are included with their size; they stay in float in every format.
        """
        d, kv = self.d_model, self.n_kv_heads * self.head_dim
        out: list[tuple[str, int, int]] = [("token_embd", self.vocab_size * d, -1)]
        for i in range(self.n_layers):
            out += [
                ("attn_q", d * d, i),
                ("attn_k", d * kv, i),
                ("attn_v", d * kv, i),
                ("attn_output", d * d, i),
                ("ffn_gate", d * self.d_ff, i),
                ("ffn_up", d * self.d_ff, i),
                ("ffn_down", self.d_ff * d, i),
                ("attn_norm", d, i),
                ("ffn_norm", d, i),
            ]
        out.append(("output_norm", d, -1))
        if not self.tied_embeddings:
            out.append(("output", self.vocab_size * d, -1))
        return out

    @property
    def n_params(self) -> int:
        """Exact parameter count from the architecture."""
        return sum(n for _, n, _ in self.tensors())


PRESETS: dict[str, ModelPreset] = {
    p.name: p
    for p in [
        ModelPreset("SmolLM2-135M", 30, 576, 1536, 9, 3, 49152, tied_embeddings=True, nominal_params=135e6),
        ModelPreset("Llama-2-7B", 32, 4096, 11008, 32, 32, 32000, nominal_params=7e9),
        ModelPreset("Llama-3-8B", 32, 4096, 14336, 32, 8, 128256, nominal_params=8e9),
        ModelPreset("Llama-2-13B", 40, 5120, 13824, 40, 40, 32000, nominal_params=13e9),
        ModelPreset("Llama-2-70B", 80, 8192, 28672, 64, 8, 32000, nominal_params=70e9),
    ]
}


def _more_bits(i: int, n: int) -> bool:
    """llama.cpp's ``use_more_bits``: first and last eighth of the layers, and every third in between."""
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


def _q4_k_m_bits(preset: ModelPreset) -> float:
    """Q4_K_M's true bits per weight: Q6_K for the output matrix and, in the layers chosen by
    ``use_more_bits``, for ``attn_v`` and ``ffn_down``; Q4_K for every other matrix; norms in F32."""
    total_bits = 0.0
    for name, n, layer in preset.tensors():
        if name.endswith("norm"):
            bits = 32.0
        elif name == "output" or (name in ("attn_v", "ffn_down") and _more_bits(layer, preset.n_layers)):
            bits = _Q6_K
        else:
            bits = _Q4_K
        total_bits += bits * n
    return total_bits / preset.n_params


def format_bits_per_weight(fmt: str | WeightFormat, preset: ModelPreset | None = None) -> float:
    """True bits per weight of a format, computed tensor by tensor for mixed formats.

    Args:
        fmt: a name in :data:`FORMATS` or a :class:`WeightFormat`.
        preset: the architecture, required for mixed formats (``Q4_K_M``).

    Returns:
        Bits per weight including scale overhead.

    >>> round(format_bits_per_weight("Q4_K_M", PRESETS["Llama-2-7B"]), 2)
    4.84
    """
    f = _lookup_format(fmt)
    if f.bits_per_weight is not None:
        return f.bits_per_weight
    if preset is None:
        raise ValueError(
            f"format {f.name!r} mixes precisions per tensor: pass preset= (one of {list(PRESETS)})"
        )
    if f.name == "Q4_K_M":
        return _q4_k_m_bits(preset)
    raise ValueError(f"no tensor recipe is known for mixed format {f.name!r}")


def _lookup_format(fmt: str | WeightFormat) -> WeightFormat:
    if isinstance(fmt, WeightFormat):
        return fmt
    if not isinstance(fmt, str):
        raise TypeError(f"fmt must be a format name or WeightFormat, got {type(fmt).__name__}")
    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}; valid formats: {list(FORMATS)}")
    return FORMATS[fmt]


# -----------------------------------------------------------------------------
# Memory


def weight_bytes(n_params: float, bits_per_weight: float) -> float:
    """Bytes to store ``n_params`` weights at ``bits_per_weight``.

    >>> weight_bytes(70e9, 16) / 1e9
    140.0
    """
    check_positive(n_params, "n_params")
    check_positive(bits_per_weight, "bits_per_weight")
    return n_params * bits_per_weight / 8


def kv_cache_bytes(preset: ModelPreset, context_length: int, batch_size: int = 1, kv_bits: int = 16) -> float:
    """Bytes of the key/value cache: ``2 * n_layers * n_kv_heads * head_dim * context * batch * kv_bits / 8``.

    Args:
        preset: the architecture (grouped-query attention shrinks the cache by ``n_heads / n_kv_heads``).
        context_length: tokens kept per sequence (>= 0).
        batch_size: sequences (>= 1).
        kv_bits: bits per cached value (16 for fp16, 8 for an int8/FP8 cache).

    >>> round(kv_cache_bytes(PRESETS["Llama-2-7B"], 4096) / 2**30, 3)
    2.0
    """
    context_length = check_int(context_length, "context_length")
    batch_size = check_int(batch_size, "batch_size")
    if context_length < 0:
        raise ValueError(f"context_length must be >= 0, got {context_length}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    check_n_bits(kv_bits, 1, 32, "kv_bits")
    per_token = 2 * preset.n_layers * preset.n_kv_heads * preset.head_dim
    return per_token * context_length * batch_size * kv_bits / 8


@dataclass(frozen=True)
class MemoryReport:
    """Memory of one model in one format (decimal GB).

    Attributes:
        model, fmt: names.
        n_params: parameters counted.
        bits_per_weight: true bits per weight, overhead included.
        weights_gb: the codes alone (``n_params * n_bits / 8`` at the format's nominal bits).
        overhead_gb: scales, zero-points, and the extra bits of mixed formats.
        kv_cache_gb: KV cache for the requested context and batch.
    """

    model: str
    fmt: str
    n_params: float
    bits_per_weight: float
    weights_gb: float
    overhead_gb: float
    kv_cache_gb: float

    @property
    def total_gb(self) -> float:
        return self.weights_gb + self.overhead_gb + self.kv_cache_gb


def model_memory(
    model: str | ModelPreset | float,
    fmt: str | WeightFormat = "FP16",
    context_length: int = 0,
    batch_size: int = 1,
    kv_bits: int = 16,
    use_nominal_params: bool = True,
) -> MemoryReport:
    """Memory of a model in a format, split into codes, overhead and KV cache.

    Args:
        model: a preset name (see :data:`PRESETS`), a :class:`ModelPreset`, or a raw parameter count.
        fmt: a format name (see :data:`FORMATS`) or a :class:`WeightFormat`.
        context_length, batch_size, kv_bits: KV cache size (needs a preset; 0 context means no cache).
        use_nominal_params: count the size in the model's name (70e9) rather than the exact architecture
            count (68.98e9 for Llama-2-70B), as the familiar tables do.

    Returns:
        A :class:`MemoryReport`.

    >>> r = model_memory("Llama-2-70B", "FP16")
    >>> r.total_gb
    140.0
    """
    preset: ModelPreset | None
    if isinstance(model, str):
        if model not in PRESETS:
            raise ValueError(
                f"unknown model {model!r}; valid presets: {list(PRESETS)} (or pass a parameter count)"
            )
        preset = PRESETS[model]
    elif isinstance(model, ModelPreset):
        preset = model
    else:
        preset = None
    if preset is not None:
        name = preset.name
        n_params = (
            preset.nominal_params if (use_nominal_params and preset.nominal_params) else preset.n_params
        )
    else:
        n_params = check_positive(model, "model")
        name = f"{n_params / 1e9:g}B"
    f = _lookup_format(fmt)
    bpw = format_bits_per_weight(f, preset)
    nominal = f.code_bits
    kv = 0.0
    if context_length:
        if preset is None:
            raise ValueError(
                "a KV cache size needs an architecture: pass a preset name, not a parameter count"
            )
        kv = kv_cache_bytes(preset, context_length, batch_size, kv_bits)
    return MemoryReport(
        model=name,
        fmt=f.name,
        n_params=float(n_params),
        bits_per_weight=bpw,
        weights_gb=weight_bytes(n_params, nominal) / GB,
        overhead_gb=n_params * (bpw - nominal) / 8 / GB,
        kv_cache_gb=kv / GB,
    )


def memory_table(
    models: list[str] | None = None, formats: list[str] | None = None, **kwargs
) -> list[MemoryReport]:
    """:func:`model_memory` for every (model, format) pair; defaults reproduce the classic table.

    >>> [round(r.total_gb) for r in memory_table(["Llama-2-70B"], ["FP32", "FP16", "INT8", "INT4"])]
    [280, 140, 70, 35]
    """
    models = models or ["Llama-2-7B", "Llama-3-8B", "Llama-2-13B", "Llama-2-70B"]
    formats = formats or ["FP32", "FP16", "INT8", "INT4"]
    return [model_memory(m, f, **kwargs) for m in models for f in formats]
