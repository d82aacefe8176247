"""Number formats beyond uniform integers: simulated floats (FP16 ... FP4), NF4 and ternary weights.

Floating-point formats
----------------------
A float with ``E`` exponent bits, ``M`` mantissa bits and bias ``B`` represents
``(-1)^s * 1.m * 2^(e - B)`` (normal numbers) and ``(-1)^s * 0.m * 2^(1 - B)`` (subnormals, exponent
field 0). Its grid is *relative*: the step between neighbours is ``2^(e - M)`` in the binade
``[2^e, 2^(e+1))``, so the relative error is about the same for tiny and huge values.
:func:`fp_quantize` rounds any real number onto such a grid (round to nearest, ties to even, like a
hardware cast) and returns it in a wider float dtype: "simulated" or "fake" low-precision floats.

=========  ===  ===  ====  =============  ===========  ========================================
format     E    M    bias  max            inf / NaN    overflow (|x| beyond max after rounding)
=========  ===  ===  ====  =============  ===========  ========================================
FP16       5    10   15    65504          yes / yes    IEEE: becomes inf (``saturate=False``)
BF16       8    7    127   3.39e38        yes / yes    IEEE: becomes inf
FP8 E4M3   4    3    7     448            no  / yes    saturates to +-448 (the "fn" variant)
FP8 E5M2   5    2    15    57344          yes / yes    IEEE: becomes inf; ``saturate=True`` clamps
FP4 E2M1   2    1    1     6              no  / no     saturates to +-6
=========  ===  ===  ====  =============  ===========  ========================================

*Saturate* means a value too large for the format is replaced by the largest finite value of the
same sign; *overflow* means it becomes +-inf. E4M3 spends its all-ones exponent on normal numbers
(only ``S.1111.111`` is NaN), which is why its max is 448 and not 240, and why it cannot represent
inf: ``torch.float8_e4m3fn`` casts saturate, and so does :func:`fp_quantize` for it. E5M2 keeps IEEE
semantics (``torch.float8_e5m2`` casts overflow to inf), the FP8 training recipe uses it for
gradients with a scale that keeps values in range. A value overflows only if it rounds past the max:
``57344 < |x| < 61440`` still rounds *down* to 57344 in E5M2.

NF4 (QLoRA)
-----------
NormalFloat-4 has 16 values placed at quantiles of a normal distribution, normalised to ``[-1, 1]``
with an exact 0 (the table below is bitsandbytes' float32 table). A tensor is flattened, cut into
blocks of 64 (the last may be shorter), each block is scaled by *multiplying* with ``1 / absmax``
(a float32 reciprocal, as bitsandbytes does; dividing differs in the last bit) and clamped to
``[-1, 1]``, and each value takes the index of the nearest table entry; a value exactly halfway
between two entries takes the *lower* one. An all-zero block has ``absmax = 0``: bitsandbytes
computes ``0 * (1 / 0) = NaN``, its nearest-code search returns index 0, and dequantization gives
``-1.0 * 0 = -0.0``; :func:`nf4_quantize` reproduces this byte for byte. Two codes share a byte,
the first element in the **high** nibble.

Ternary (BitNet b1.58)
----------------------
``gamma = mean |W|``, ``W_q = clamp(round(W / (gamma + eps)), -1, 1)`` (Ma et al. 2024, Eq. 1-3), 1.58
bits of information per weight.

References:
    Micikevicius et al., "FP8 Formats for Deep Learning", 2022 (E4M3 / E5M2, Table 1, saturation).
    IEEE 754-2019 (binary16, rounding to nearest even, overflow to infinity).
    Open Compute Project, "OCP Microscaling Formats (MX) Specification v1.0", 2023 (FP4 E2M1).
    Dettmers et al., "QLoRA: Efficient Finetuning of Quantized LLMs", NeurIPS 2023 (NF4, Sec. 3,
    block size 64, double quantization with 8-bit floats and block size 256).
    Dettmers, "8-Bit Approximations for Parallelism in Deep Learning", ICLR 2016 (the dynamic 8-bit
    map used for double quantization).
    Ma et al., "The Era of 1-bit LLMs: All Large Language Models are in 1.58 Bits", 2024 (absmean
    ternary quantization; ``eps = 1e-5`` as in the authors' released training code).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from types import MappingProxyType

import torch

from quantlab._checks import check_float_tensor, check_int, check_positive
from quantlab.packing import pack_codes, unpack_codes
from quantlab.uniform import qrange

__all__ = [
    "FLOAT_FORMATS",
    "NF4_VALUES",
    "FloatFormat",
    "dynamic_map",
    "format_table",
    "format_values",
    "fp_fake_quantize_scaled",
    "fp_quantize",
    "nf4_code",
    "nf4_dequantize",
    "nf4_double_dequantize",
    "nf4_double_quantize",
    "nf4_fake_quantize",
    "nf4_pack",
    "nf4_quantize",
    "nf4_unpack",
    "quantize_to_format",
    "ternary_dequantize",
    "ternary_quantize",
]


# -----------------------------------------------------------------------------
# Simulated floating point


@dataclass(frozen=True)
class FloatFormat:
    """A binary floating-point format.

    Attributes:
        name: short name, e.g. ``"fp8_e4m3"``.
        exp_bits, man_bits: exponent and mantissa (fraction) field widths; 1 sign bit besides.
        bias: exponent bias.
        max_value: largest finite value.
        has_inf: whether the format has infinities.
        saturate: default overflow behaviour: True clamps to ``+-max_value``, False gives ``+-inf``.
    """

    name: str
    exp_bits: int
    man_bits: int
    bias: int
    max_value: float
    has_inf: bool
    saturate: bool

    @property
    def bits(self) -> int:
        """Total width: sign + exponent + mantissa."""
        return 1 + self.exp_bits + self.man_bits

    @property
    def min_normal(self) -> float:
        """Smallest positive normal value, ``2^(1 - bias)``."""
        return 2.0 ** (1 - self.bias)

    @property
    def min_subnormal(self) -> float:
        """Smallest positive value, ``2^(1 - bias - man_bits)``."""
        return 2.0 ** (1 - self.bias - self.man_bits)

    @property
    def eps(self) -> float:
        """Step just above 1.0, ``2^-man_bits`` (``torch.finfo(dtype).eps``)."""
        return 2.0**-self.man_bits


def _ieee_max(exp_bits: int, man_bits: int, bias: int) -> float:
    """Largest finite value when the all-ones exponent is reserved for inf/NaN: ``(2 - 2^-M) 2^emax``."""
    return (2.0 - 2.0**-man_bits) * 2.0 ** (2**exp_bits - 2 - bias)


FLOAT_FORMATS: MappingProxyType[str, FloatFormat] = MappingProxyType(
    {
        "fp32": FloatFormat("fp32", 8, 23, 127, _ieee_max(8, 23, 127), True, False),
        "fp16": FloatFormat("fp16", 5, 10, 15, 65504.0, True, False),
        "bf16": FloatFormat("bf16", 8, 7, 127, _ieee_max(8, 7, 127), True, False),
        "fp8_e4m3": FloatFormat("fp8_e4m3", 4, 3, 7, 448.0, False, True),
        "fp8_e5m2": FloatFormat("fp8_e5m2", 5, 2, 15, 57344.0, True, False),
        "fp4_e2m1": FloatFormat("fp4_e2m1", 2, 1, 1, 6.0, False, True),
    }
)


def _get_format(fmt: str | FloatFormat) -> FloatFormat:
    if isinstance(fmt, FloatFormat):
        return fmt
    if fmt not in FLOAT_FORMATS:
        raise ValueError(f"fmt must be a FloatFormat or one of {tuple(FLOAT_FORMATS)}, got {fmt!r}")
    return FLOAT_FORMATS[fmt]


def _round_to_grid(a: torch.Tensor, bias: int, man_bits: int) -> torch.Tensor:
    """Round non-negative float64 ``a`` to the float grid of (bias, man_bits), unbounded above."""
    _, e = torch.frexp(a)  # a = m * 2^e with m in [0.5, 1): floor(log2(a)) = e - 1
    exponent = torch.clamp(e - 1, min=1 - bias)  # subnormals share the smallest normal binade's step
    step = torch.ldexp(torch.ones_like(a), exponent - man_bits)  # 2^(exponent - M)
    return torch.round(a / step) * step  # exact: division by a power of two, integer times power of two


def fp_quantize(
    x: torch.Tensor,
    exp_bits: int,
    man_bits: int,
    bias: int | None = None,
    max_value: float | None = None,
    saturate: bool = True,
) -> torch.Tensor:
    """Round ``x`` to the nearest value of a binary float format (ties to even), with subnormals.

    For ``|x|`` in the binade ``[2^e, 2^(e+1))`` the step is ``2^(e - M)``; below the smallest normal
    ``2^(1 - B)`` the step stays ``2^(1 - B - M)`` (subnormals). Rounding up may carry into the next
    binade, which is representable, so ``q = round_half_even(|x| / step) * step`` is exact. A result
    beyond ``max_value`` saturates to ``+-max_value`` or overflows to ``+-inf``. The sign (and -0.0)
    is kept. Computed in float64, where every step here is exact.

    Args:
        x: finite floating-point tensor, any shape.
        exp_bits: exponent bits ``E``, 1..8.
        man_bits: mantissa bits ``M``, 0..23.
        bias: exponent bias; default ``2^(E-1) - 1``.
        max_value: largest finite value; default IEEE-style ``(2 - 2^-M) * 2^(2^E - 2 - bias)``
            (all-ones exponent reserved). Pass 448 for E4M3, 6 for E2M1.
        saturate: clamp results beyond ``max_value`` to ``+-max_value`` (True) or return ``+-inf``.

    Returns:
        Tensor of ``x``'s shape in ``x``'s dtype promoted to at least float32 (so that every value of
        a format up to FP32 is held exactly).

    >>> fp_quantize(torch.tensor([0.3, 1.2, 2.6, 5.1, 7.0, -100.0]), 2, 1, bias=1, max_value=6.0)
    tensor([ 0.5000,  1.0000,  3.0000,  6.0000,  6.0000, -6.0000])
    >>> fp_quantize(torch.tensor([70000.0]), 5, 10, saturate=False)  # FP16 overflows to inf
    tensor([inf])
    """
    check_float_tensor(x, "x")
    exp_bits = check_int(exp_bits, "exp_bits")
    man_bits = check_int(man_bits, "man_bits")
    if not 1 <= exp_bits <= 8:
        raise ValueError(f"exp_bits must be in [1, 8], got {exp_bits}")
    if not 0 <= man_bits <= 23:
        raise ValueError(f"man_bits must be in [0, 23], got {man_bits}")
    bias = 2 ** (exp_bits - 1) - 1 if bias is None else check_int(bias, "bias")
    if max_value is None:
        if exp_bits < 2:
            raise ValueError("exp_bits=1 with the IEEE default leaves no normal numbers; pass max_value")
        max_value = _ieee_max(exp_bits, man_bits, bias)
    max_value = check_positive(max_value, "max_value")
    on_grid = _round_to_grid(torch.tensor([max_value], dtype=torch.float64), bias, man_bits).item()
    if on_grid != max_value:
        raise ValueError(f"max_value={max_value} is not a value of the format (nearest: {on_grid})")
    if not isinstance(saturate, bool):
        raise TypeError(f"saturate must be a bool, got {saturate!r}")
    out_dtype = torch.promote_types(x.dtype, torch.float32)
    xd = x.to(torch.float64)
    q = _round_to_grid(xd.abs(), bias, man_bits)
    limit = torch.tensor(max_value if saturate else math.inf, dtype=torch.float64, device=x.device)
    q = torch.where(q > max_value, limit, q)
    return torch.copysign(q, xd).to(out_dtype)


def quantize_to_format(x: torch.Tensor, fmt: str | FloatFormat, saturate: bool | None = None) -> torch.Tensor:
    """Round ``x`` onto a named float format (see :data:`FLOAT_FORMATS` and the module table).

    Args:
        x: finite floating-point tensor.
        fmt: ``"fp32"``, ``"fp16"``, ``"bf16"``, ``"fp8_e4m3"``, ``"fp8_e5m2"``, ``"fp4_e2m1"`` or a
            :class:`FloatFormat`.
        saturate: None for the format's own behaviour (E4M3 and E2M1 saturate, the others overflow to
            inf), or force it.

    Returns:
        As :func:`fp_quantize`.

    >>> quantize_to_format(torch.tensor([500.0, 1.0625, 1.1875]), "fp8_e4m3")  # saturation, two ties
    tensor([448.0000,   1.0000,   1.2500])
    >>> quantize_to_format(torch.tensor([61440.0]), "fp8_e5m2")
    tensor([inf])
    """
    f = _get_format(fmt)
    if saturate is not None and not saturate and not f.has_inf:
        raise ValueError(
            f"{f.name} has no infinity to overflow to; it can only saturate, got saturate={saturate}"
        )
    sat = f.saturate if saturate is None else saturate
    return fp_quantize(x, f.exp_bits, f.man_bits, f.bias, f.max_value, sat)


def format_values(fmt: str | FloatFormat) -> torch.Tensor:
    """Every non-negative finite value of a float format of at most 8 bits, ascending (float64).

    >>> format_values("fp4_e2m1").tolist()
    [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0]
    """
    f = _get_format(fmt)
    if f.bits > 8:
        raise ValueError(f"format_values enumerates formats of at most 8 bits, got {f.name} ({f.bits} bits)")
    values = set()
    for e_field in range(2**f.exp_bits):
        for m_field in range(2**f.man_bits):
            if e_field == 0:
                v = m_field * 2.0 ** (1 - f.bias - f.man_bits)  # subnormal
            else:
                v = (1 + m_field * 2.0**-f.man_bits) * 2.0 ** (e_field - f.bias)
            if v <= f.max_value:
                values.add(v)
    return torch.tensor(sorted(values), dtype=torch.float64)


def fp_fake_quantize_scaled(
    x: torch.Tensor, fmt: str | FloatFormat, axis: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale ``x`` so that its absmax maps to the format's max, round onto the format, scale back.

    The recipe of FP8 inference (a per-tensor or per-channel scale ``amax / max_value`` kept in
    higher precision): it uses the format's whole range instead of wasting it on small values.

    Args:
        x: finite floating-point tensor.
        fmt: a format name or :class:`FloatFormat`.
        axis: None for one scale, or the dimension to keep (``0`` for the rows of a weight).

    Returns:
        ``(x_hat, scale)``: ``x_hat`` like ``x`` (dtype promoted to float32), ``scale`` 0-d or
        ``(x.shape[axis],)``. An all-zero slice gets scale 1.

    >>> fp_fake_quantize_scaled(torch.tensor([0.1, -0.3, 3.0]), "fp4_e2m1")
    (tensor([ 0.0000, -0.2500,  3.0000]), tensor(0.5000))
    """
    check_float_tensor(x, "x")
    f = _get_format(fmt)
    if axis is None:
        amax = x.abs().amax()
        scale_b = scale = torch.where(amax > 0, amax / f.max_value, torch.ones_like(amax))
    else:
        axis = check_int(axis, "axis")
        if not -x.ndim <= axis < x.ndim:
            raise ValueError(f"axis must be None or in [{-x.ndim}, {x.ndim - 1}], got {axis}")
        rows = x.movedim(axis, 0).reshape(x.shape[axis], -1)  # (C, N)
        amax = rows.abs().amax(dim=1)  # (C,)
        scale = torch.where(amax > 0, amax / f.max_value, torch.ones_like(amax))  # (C,)
        shape = [1] * x.ndim
        shape[axis] = -1
        scale_b = scale.reshape(shape)  # broadcastable to x
    x_hat = quantize_to_format(x / scale_b, f, saturate=True) * scale_b
    return x_hat, scale


# -----------------------------------------------------------------------------
# NF4: the NormalFloat-4 table, block-wise absmax, nearest code

# bitsandbytes' float32 NF4 table (QLoRA, Appendix E), index = 4-bit code.
NF4_VALUES: tuple[float, ...] = (
    -1.0,
    -0.6961928009986877,
    -0.5250730514526367,
    -0.39491748809814453,
    -0.28444138169288635,
    -0.18477343022823334,
    -0.09105003625154495,
    0.0,
    0.07958029955625534,
    0.16093020141124725,
    0.24611230194568634,
    0.33791524171829224,
    0.44070982933044434,
    0.5626170039176941,
    0.7229568362236023,
    1.0,
)


def nf4_code(device: torch.device | str | None = None) -> torch.Tensor:
    """The 16 NF4 values as a fresh float32 tensor (code ``i`` -> value ``NF4_VALUES[i]``).

    >>> nf4_code()[7], nf4_code()[15]
    (tensor(0.), tensor(1.))
    """
    return torch.tensor(NF4_VALUES, dtype=torch.float32, device=device)


def _check_block_size(block_size: object) -> int:
    block_size = check_int(block_size, "block_size")
    if block_size <= 0:
        raise ValueError(f"block_size must be a positive int, got {block_size}")
    return block_size


def _decision_thresholds(code: torch.Tensor) -> torch.Tensor:
    """For each pair of neighbours ``a < b`` of a sorted table, the smallest float32 ``s`` that the
    search ``argmin_i |s - code[i]|`` (float32 arithmetic, first minimum wins) sends to ``b``.

    The test ``|s - b| < |s - a|`` is monotone in ``s``, so it flips exactly once, within a few ulps of
    the midpoint; the threshold is found by trying the float32 neighbours of the midpoint. (A tie, with
    ``s`` exactly halfway, keeps ``a``: the lower code.)

    Args:
        code: ``(K,)`` float32 table, ascending, neighbours far apart compared to an ulp.

    Returns:
        ``(K - 1,)`` float32 thresholds, ascending.
    """
    a, b = code[:-1].unsqueeze(1), code[1:].unsqueeze(1)  # (K-1, 1)
    mid = ((a.double() + b.double()) / 2).float()  # (K-1, 1)
    up = torch.full_like(mid, math.inf)
    steps = [mid]
    lo_side, hi_side = mid, mid
    for _ in range(64):  # 64 ulps either side is far more than the float32 rounding of the distances
        lo_side, hi_side = torch.nextafter(lo_side, -up), torch.nextafter(hi_side, up)
        steps += [lo_side, hi_side]
    cand = torch.cat(steps, dim=1)  # (K-1, 129)
    goes_up = (cand - b).abs() < (cand - a).abs()  # the float32 comparison the argmin makes
    if not bool((goes_up.any(dim=1) & (~goes_up).any(dim=1)).all()):
        raise RuntimeError("decision threshold not bracketed; the code table is too dense for float32")
    return torch.where(goes_up, cand, up).amin(dim=1)  # (K-1,)


def _nearest_code(scaled: torch.Tensor, code: torch.Tensor) -> torch.Tensor:
    """Index of the nearest table value for each element, the lower index on ties; NaN -> index 0.

    Equal, element for element, to bitsandbytes' ``argmin(|scaled - code|)`` over the whole table in
    float32 (first minimum wins, and an all-NaN row gives index 0), without its ``(n, 16)`` temporary.
    Only the two table neighbours of a value can be nearest (neighbouring entries are much farther apart
    than an ulp, so a farther entry's rounded distance cannot tie with a nearer one), and between two
    neighbours the choice flips at one float32 threshold: the code is the number of thresholds
    ``<= scaled``.

    Args:
        scaled: ``(n,)`` float32 values (NaN allowed).
        code: ``(K,)`` sorted float32 table.

    Returns:
        ``(n,)`` int64 indices in ``[0, K - 1]``.
    """
    thresholds = _decision_thresholds(code)  # (K-1,)
    idx = torch.bucketize(scaled, thresholds, right=True)  # number of thresholds <= scaled
    return torch.where(torch.isnan(scaled), torch.zeros_like(idx), idx)


def _blockwise_scale(x: torch.Tensor, block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """bitsandbytes' block scaling: ``(clamp(x * (1 / absmax), -1, 1) per block, absmax)``.

    Returns ``scaled`` ``(n,)`` float32 and ``absmax`` ``(n_blocks,)`` float32. Full blocks are scaled
    in float32; a partial last block of a float16/bfloat16 input is rounded to the input's precision
    after scaling, exactly as bitsandbytes' reference code does (its 0-d float32 factor does not
    promote a half tensor), so the codes match it byte for byte for every input dtype.
    """
    flat = x.reshape(-1)  # (n,)
    n = flat.numel()
    n_full, rem = divmod(n, block_size)
    n_blocks = n_full + (rem > 0)
    absmax = torch.zeros(n_blocks, dtype=torch.float32, device=x.device)
    full = flat[: n_full * block_size].reshape(n_full, block_size)  # (n_full, block_size)
    absmax[:n_full] = full.abs().amax(dim=1).float()
    inv = 1.0 / absmax[:n_full].unsqueeze(1)  # (n_full, 1) float32 reciprocal; 1/0 = inf
    scaled_full = torch.clamp(full.float() * inv, -1.0, 1.0).reshape(-1)  # (n_full * block_size,)
    if not rem:
        return scaled_full, absmax
    tail = flat[n_full * block_size :]  # (rem,)
    absmax[-1] = tail.abs().amax().float()
    # float32 product rounded once to the tail's dtype: what `half_tensor * float32_0d_tensor` computes
    scaled_tail = torch.clamp((tail.float() * (1.0 / absmax[-1])).to(tail.dtype), -1.0, 1.0).float()  # (rem,)
    return torch.cat([scaled_full, scaled_tail]), absmax


def nf4_quantize(x: torch.Tensor, block_size: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """NF4 block-wise quantization (QLoRA Sec. 3), code-for-code equal to bitsandbytes ``quantize_4bit``.

    ``x`` is flattened in element (row-major) order and cut into blocks of ``block_size``, the last
    possibly shorter. Per block: ``absmax = max |x|``, ``scaled = clamp(x * (1 / absmax), -1, 1)``
    (float32 reciprocal), ``code = argmin_i |scaled - NF4[i]|`` with ties to the lower index.

    Args:
        x: finite float16 / bfloat16 / float32 / float64 tensor, any shape, non-empty (float64 is
            rounded to float32 first; bitsandbytes does not accept it).
        block_size: elements per block (64 in QLoRA).

    Returns:
        ``(codes, absmax)``: ``codes`` is a 1-D ``torch.uint8`` tensor of ``x.numel()`` values in
        ``0..15``, one per element in element order (pack with :func:`nf4_pack`); ``absmax`` is a 1-D
        float32 tensor of ``ceil(numel / block_size)`` block maxima (0 for an all-zero block, whose
        codes are all 0 like bitsandbytes' and dequantize to -0.0).

    >>> codes, absmax = nf4_quantize(torch.tensor([0.0, 0.5, -1.0, 2.0]), block_size=2)
    >>> codes.tolist(), absmax.tolist()  # -1.0 / 2.0 = -0.5 is nearest to NF4[2] = -0.525
    ([7, 15, 2, 15], [0.5, 2.0])
    """
    check_float_tensor(x, "x")
    block_size = _check_block_size(block_size)
    if x.dtype == torch.float64:
        x = x.float()
    scaled, absmax = _blockwise_scale(x, block_size)
    codes = _nearest_code(scaled, nf4_code(x.device))
    return codes.to(torch.uint8), absmax


def nf4_dequantize(codes: torch.Tensor, absmax: torch.Tensor, block_size: int = 64) -> torch.Tensor:
    """Inverse of :func:`nf4_quantize`: ``NF4[code] * absmax`` of the element's block (float32).

    Args:
        codes: integer tensor of 4-bit codes in element order, any shape (e.g. the 1-D codes of
            :func:`nf4_quantize`; reshape the result to the weight's shape).
        absmax: ``(ceil(numel / block_size),)`` float block maxima.
        block_size: as used to quantize.

    Returns:
        float32 tensor with the shape of ``codes``.

    >>> nf4_dequantize(torch.tensor([7, 15, 0, 15], dtype=torch.uint8), torch.tensor([0.5, 2.0]), 2)
    tensor([ 0.0000,  0.5000, -2.0000,  2.0000])
    """
    block_size = _check_block_size(block_size)
    if not isinstance(codes, torch.Tensor) or codes.is_floating_point() or codes.dtype == torch.bool:
        kind = getattr(codes, "dtype", type(codes).__name__)
        raise TypeError(f"codes must be an integer tensor, got {kind}")
    if codes.numel() == 0:
        raise ValueError("codes must not be empty")
    if int(codes.min()) < 0 or int(codes.max()) > 15:
        raise ValueError(
            f"codes must be 4-bit values in [0, 15], got values in [{int(codes.min())}, {int(codes.max())}]"
        )
    check_float_tensor(absmax, "absmax", ndim=1)
    n = codes.numel()
    n_blocks = -(-n // block_size)
    if absmax.numel() != n_blocks:
        raise ValueError(
            f"absmax must have ceil({n} / {block_size}) = {n_blocks} entries, got {absmax.numel()}"
        )
    values = nf4_code(codes.device)[codes.reshape(-1).long()]  # (n,)
    per_element = absmax.float().repeat_interleave(block_size)[:n]  # (n,) the block's absmax
    return (values * per_element).reshape(codes.shape)


def nf4_fake_quantize(x: torch.Tensor, block_size: int = 64) -> torch.Tensor:
    """NF4 quantize then dequantize; float32 with ``x``'s shape.

    >>> nf4_fake_quantize(torch.tensor([[0.3, -1.0]]), block_size=2)
    tensor([[ 0.3379, -1.0000]])
    """
    codes, absmax = nf4_quantize(x, block_size)
    return nf4_dequantize(codes, absmax, block_size).reshape(x.shape)


def nf4_pack(codes: torch.Tensor) -> torch.Tensor:
    """Pack 4-bit codes two per byte, the first element in the **high** nibble (bitsandbytes layout).

    An odd count is padded with code 7 (the value 0.0), as bitsandbytes pads the scaled values with 0.

    Args:
        codes: integer codes ``0..15``, any shape; packed in element order.

    Returns:
        1-D ``torch.uint8`` tensor of ``ceil(numel / 2)`` bytes.

    >>> [hex(b) for b in nf4_pack(torch.tensor([1, 2, 15])).tolist()]
    ['0x12', '0xf7']
    """
    if not isinstance(codes, torch.Tensor):
        raise TypeError(f"codes must be a torch.Tensor, got {type(codes).__name__}")
    flat = codes.reshape(-1)  # (n,)
    if flat.numel() % 2:
        flat = torch.cat([flat, torch.full((1,), 7, dtype=flat.dtype, device=flat.device)])
    return pack_codes(flat, 4, torch.uint8, order="high_first")


def nf4_unpack(packed: torch.Tensor, n: int | None = None) -> torch.Tensor:
    """Inverse of :func:`nf4_pack`: high nibble first, ``torch.uint8``, 1-D.

    Args:
        packed: 1-D ``torch.uint8`` bytes.
        n: number of codes to keep (drops the padding nibble of an odd count); default ``2 * bytes``.

    Returns:
        ``(n,)`` uint8 codes.

    >>> nf4_unpack(torch.tensor([0x12, 0xF7], dtype=torch.uint8), 3)
    tensor([ 1,  2, 15], dtype=torch.uint8)
    """
    if not isinstance(packed, torch.Tensor) or packed.dtype != torch.uint8 or packed.ndim != 1:
        raise TypeError("packed must be a 1-D torch.uint8 tensor from nf4_pack")
    n = 2 * packed.numel() if n is None else check_int(n, "n")
    if not 0 < n <= 2 * packed.numel():
        raise ValueError(f"n must be in [1, {2 * packed.numel()}] for {packed.numel()} bytes, got {n}")
    return unpack_codes(packed, 4, 2 * packed.numel(), torch.uint8, order="high_first")[:n]


# -----------------------------------------------------------------------------
# Double quantization of the absmax constants (QLoRA)


def dynamic_map() -> torch.Tensor:
    """The signed 8-bit "dynamic tree" map of Dettmers (2016) that QLoRA uses for its second quantization.

    256 sorted values in ``[-1, 1]``: for ``i = 0..6`` the ``2^i`` midpoints of ``linspace(0.1, 1,
    2^i + 1)`` scaled by ``10^(i - 6)``, with both signs, plus 0 and 1. Small magnitudes get a fine
    grid, like a float with a variable-length exponent.

    Returns:
        ``(256,)`` float32 tensor, ascending.

    >>> m = dynamic_map()
    >>> m.shape, m[0].item(), m[-1].item()
    (torch.Size([256]), -0.992968738079071, 1.0)
    """
    values: list[float] = [0.0, 1.0]
    for i in range(7):
        edges = torch.linspace(0.1, 1.0, 2**i + 1)
        mids = (edges[:-1] + edges[1:]) / 2.0
        magnitude = (10.0 ** (i - 6)) * mids
        values += magnitude.tolist() + (-magnitude).tolist()
    return torch.tensor(sorted(values), dtype=torch.float32)


def nf4_double_quantize(
    absmax: torch.Tensor, block_size: int = 256
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Quantize NF4's float32 ``absmax`` constants to 8 bits (QLoRA's double quantization, Sec. 3).

    The mean is subtracted (the constants are all positive, so centring uses the signed map
    better), then blocks of ``block_size`` are scaled by their own absmax and mapped to the nearest
    entry of :func:`dynamic_map`. Cost: ``8 / 64 + 32 / (64 * 256) = 0.127`` bits per weight instead
    of ``32 / 64 = 0.5``. The scheme follows bitsandbytes; exact bit equality with it is not claimed.

    Args:
        absmax: ``(n_blocks,)`` float32 constants from :func:`nf4_quantize`.
        block_size: constants per second-level block (256 in QLoRA).

    Returns:
        ``(codes, absmax2, offset)``: ``(n_blocks,)`` uint8 codes, ``(ceil(n_blocks / block_size),)``
        float32 second-level maxima and the 0-d float32 mean that was subtracted.

    >>> a = torch.tensor([0.5, 1.0, 1.5])
    >>> nf4_double_dequantize(*nf4_double_quantize(a))  # -1 is not in the map: -0.993 * 0.5 + 1
    tensor([0.5035, 1.0000, 1.5000])
    """
    check_float_tensor(absmax, "absmax", ndim=1)
    block_size = _check_block_size(block_size)
    offset = absmax.float().mean()
    centred = absmax.float() - offset  # (n_blocks,)
    scaled, absmax2 = _blockwise_scale(centred, block_size)
    codes = _nearest_code(scaled, dynamic_map().to(absmax.device))
    return codes.to(torch.uint8), absmax2, offset


def nf4_double_dequantize(
    codes: torch.Tensor, absmax2: torch.Tensor, offset: torch.Tensor, block_size: int = 256
) -> torch.Tensor:
    """Recover the NF4 ``absmax`` constants from :func:`nf4_double_quantize` (float32, 1-D)."""
    block_size = _check_block_size(block_size)
    n = codes.numel()
    values = dynamic_map().to(codes.device)[codes.reshape(-1).long()]  # (n,)
    per_element = absmax2.float().repeat_interleave(block_size)[:n]  # (n,)
    return values * per_element + offset


# -----------------------------------------------------------------------------
# Ternary weights: BitNet b1.58


def ternary_quantize(w: torch.Tensor, eps: float = 1e-5) -> tuple[torch.Tensor, torch.Tensor]:
    """BitNet b1.58 absmean quantization: ``W_q = clamp(round(W / (gamma + eps)), -1, 1)``.

    ``gamma = mean |W|`` over the whole tensor (Ma et al. 2024, Eq. 1-3). Rounding is half-to-even
    (``torch.round``), so ``|W| = 0.5 (gamma + eps)`` exactly gives 0.

    Args:
        w: finite floating-point weight, any shape.
        eps: small constant keeping the division finite for an all-zero weight.

    Returns:
        ``(codes, gamma)``: ``int8`` codes in ``{-1, 0, 1}`` with ``w``'s shape and the 0-d scale
        ``gamma`` (dequantize with ``codes * gamma``).

    >>> codes, gamma = ternary_quantize(torch.tensor([0.1, -2.0, 0.7, 1.2]))
    >>> codes.tolist(), round(gamma.item(), 4)
    ([0, -1, 1, 1], 1.0)
    """
    check_float_tensor(w, "w")
    eps = check_positive(eps, "eps", allow_zero=True)
    gamma = w.abs().mean()
    if eps == 0 and gamma == 0:
        raise ValueError("w is all zeros and eps=0: gamma + eps = 0; use eps > 0")
    codes = torch.clamp(torch.round(w / (gamma + eps)), -1, 1)
    return codes.to(torch.int8), gamma


def ternary_dequantize(codes: torch.Tensor, gamma: torch.Tensor | float) -> torch.Tensor:
    """``codes * gamma`` as float32 (or ``gamma``'s float dtype)."""
    g = torch.as_tensor(gamma)
    dtype = g.dtype if g.is_floating_point() else torch.float32
    return codes.to(dtype) * g.to(dtype)


# -----------------------------------------------------------------------------
# A table of every format


def format_table() -> list[dict[str, object]]:
    """One row per format: name, bits, range, smallest positive value, step near 1.0, overflow rule.

    ``step_near_1`` is the distance from 1.0 to its neighbour above (the machine epsilon,
    ``torch.finfo(dtype).eps``) or, where 1.0 is the largest value (NF4, ternary), below. Integer,
    NF4 and ternary ranges are in units of their scale.

    Returns:
        A list of dicts with keys ``name``, ``kind``, ``bits``, ``min``, ``max``, ``min_positive``,
        ``step_near_1``, ``has_inf``, ``overflow``.

    >>> [row["max"] for row in format_table() if row["name"].startswith("fp8")]
    [448.0, 57344.0]
    """
    rows: list[dict[str, object]] = []
    for f in FLOAT_FORMATS.values():
        rows.append(
            {
                "name": f.name,
                "kind": "float",
                "bits": f.bits,
                "min": -f.max_value,
                "max": f.max_value,
                "min_positive": f.min_subnormal,
                "step_near_1": f.eps,
                "has_inf": f.has_inf,
                "overflow": "saturate" if f.saturate else "inf",
            }
        )
    for n_bits in (8, 4):
        qmin, qmax = qrange(n_bits)
        rows.append(
            {
                "name": f"int{n_bits}",
                "kind": "integer (x scale)",
                "bits": n_bits,
                "min": float(qmin),
                "max": float(qmax),
                "min_positive": 1.0,
                "step_near_1": 1.0,
                "has_inf": False,
                "overflow": "clamp",
            }
        )
    rows.append(
        {
            "name": "nf4",
            "kind": "normal float (x absmax)",
            "bits": 4,
            "min": NF4_VALUES[0],
            "max": NF4_VALUES[-1],
            "min_positive": NF4_VALUES[8],
            "step_near_1": NF4_VALUES[15] - NF4_VALUES[14],
            "has_inf": False,
            "overflow": "clamp",
        }
    )
    rows.append(
        {
            "name": "ternary",
            "kind": "ternary (x gamma)",
            "bits": round(math.log2(3), 2),
            "min": -1.0,
            "max": 1.0,
            "min_positive": 1.0,
            "step_near_1": 1.0,
            "has_inf": False,
            "overflow": "clamp",
        }
    )
    return rows
