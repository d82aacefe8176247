"""Exercises of lab 02 (granularity and formats): per-group quantization, 4-bit packing / unpacking.

References are calls into :mod:`quantlab.granularity` and :mod:`quantlab.packing`. The packing
exercises use that module's ``low_first`` layout: element ``2j`` of a row is the *low* nibble (bits 0-3)
of byte ``j`` and element ``2j + 1`` the high nibble (the GPTQ / AutoGPTQ convention).

References:
    Frantar et al., "GPTQ", ICLR 2023 (per-group quantization; low-bits-first packing of its kernels).
    Dettmers et al., "QLoRA", NeurIPS 2023 (blockwise absmax quantization with 64-weight blocks).
"""

from __future__ import annotations

import torch

from quantlab.exercises.core import Case, Exercise, Mistake
from quantlab.granularity import fake_quantize_weight
from quantlab.packing import pack_codes, unpack_codes

__all__ = ["EXERCISES"]


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# -----------------------------------------------------------------------------
# 02.per_group_quantize: symmetric absmax fake quantization, one scale per group of columns


def _ref_per_group(w, n_bits, group_size):
    return fake_quantize_weight(w, n_bits, "group", group_size, scheme="absmax")


def _per_group_cases() -> list[Case]:
    g = _gen(3)
    outlier = torch.randn(4, 32, generator=g)
    outlier[1, 5] = 20.0
    zeros = torch.randn(4, 16, generator=g)
    zeros[2] = 0.0
    zeros[0, 4:8] = 0.0
    # every group's absmax is 1.75 = 7 * 0.25, so the 4-bit scale is 0.25 and w / scale hits k + 0.5
    ties = torch.tensor([[1.75, 0.125, -0.375, 0.625, -1.75, 0.875, 1.125, -0.125]])
    return [
        Case(
            "random (16, 64), 4 bits, group 16", (torch.randn(16, 64, generator=g), 4, 16), "4 groups per row"
        ),
        Case("group = whole row, 8 bits", (torch.randn(4, 32, generator=g), 8, 32), "1 group per row"),
        Case(
            "odd shape (6, 12), 3 bits, group 3", (torch.randn(6, 12, generator=g), 3, 3), "4 groups per row"
        ),
        Case("an outlier in one group", (outlier, 4, 8), "w[1, 5] = 20"),
        Case("all-zero row and group", (zeros, 4, 4), "row 2 and w[0, 4:8] are 0"),
        Case("ties at .5", (ties, 4, 4), "scale 0.25 in both groups, w / scale = k + 0.5"),
        Case("2 bits, group 8", (torch.randn(8, 16, generator=g), 2, 8), "codes -1, 0, 1"),
    ]


def _absmax_fq(wg, n_bits, dim=-1):
    """Absmax fake quantization of ``wg`` reducing over ``dim`` (the helper the mistakes reuse)."""
    qmax = 2 ** (n_bits - 1) - 1
    scale = wg.abs().amax(dim=dim, keepdim=True) / qmax
    scale = torch.where(scale == 0, torch.ones_like(scale), scale)
    return torch.clamp(torch.round(wg / scale), -qmax, qmax) * scale


def _g_wrong_axis(w, n_bits, group_size):
    return _ref_per_group(w.T.contiguous(), n_bits, group_size).T


def _g_strided(w, n_bits, group_size):
    out_features, in_features = w.shape
    wg = w.reshape(out_features, group_size, in_features // group_size)  # (out, group_size, n_groups)
    return _absmax_fq(wg, n_bits, dim=1).reshape(out_features, in_features)


def _g_per_channel(w, n_bits, group_size):
    return _absmax_fq(w, n_bits, dim=-1)


def _g_per_tensor(w, n_bits, group_size):
    return _absmax_fq(w.reshape(1, -1), n_bits).reshape(w.shape)


def _grouped(w, group_size):
    return w.reshape(w.shape[0], w.shape[1] // group_size, group_size)  # (out, n_groups, group_size)


def _g_max_not_absmax(w, n_bits, group_size):
    wg = _grouped(w, group_size)
    qmax = 2 ** (n_bits - 1) - 1
    scale = wg.amax(dim=-1, keepdim=True) / qmax
    scale = torch.where(scale == 0, torch.ones_like(scale), scale)
    return (torch.clamp(torch.round(wg / scale), -qmax, qmax) * scale).reshape(w.shape)


def _g_qmax_power_of_two(w, n_bits, group_size):
    wg = _grouped(w, group_size)
    half = 2 ** (n_bits - 1)
    scale = wg.abs().amax(dim=-1, keepdim=True) / half
    scale = torch.where(scale == 0, torch.ones_like(scale), scale)
    return (torch.clamp(torch.round(wg / scale), -half, half - 1) * scale).reshape(w.shape)


def _g_no_zero_guard(w, n_bits, group_size):
    wg = _grouped(w, group_size)
    qmax = 2 ** (n_bits - 1) - 1
    scale = wg.abs().amax(dim=-1, keepdim=True) / qmax
    return (torch.clamp(torch.round(wg / scale), -qmax, qmax) * scale).reshape(w.shape)


def _g_floor(w, n_bits, group_size):
    wg = _grouped(w, group_size)
    qmax = 2 ** (n_bits - 1) - 1
    scale = wg.abs().amax(dim=-1, keepdim=True) / qmax
    scale = torch.where(scale == 0, torch.ones_like(scale), scale)
    return (torch.clamp(torch.floor(wg / scale), -qmax, qmax) * scale).reshape(w.shape)


def _g_codes(w, n_bits, group_size):
    wg = _grouped(w, group_size)
    qmax = 2 ** (n_bits - 1) - 1
    scale = wg.abs().amax(dim=-1, keepdim=True) / qmax
    scale = torch.where(scale == 0, torch.ones_like(scale), scale)
    return torch.clamp(torch.round(wg / scale), -qmax, qmax).reshape(w.shape)


def _g_asymmetric(w, n_bits, group_size):
    return fake_quantize_weight(w, n_bits, "group", group_size, scheme="affine")


PER_GROUP_QUANTIZE = Exercise(
    id="02.per_group_quantize",
    title="Per-group symmetric (absmax) fake quantization of a weight matrix",
    signature="fake_quantize_per_group(w, n_bits, group_size) -> w_hat",
    hint=(
        "reshape w to (out, in // group_size, group_size), scale = max|w| over the last dim / "
        "(2**(n_bits-1) - 1) (1 where it is 0), round(w / scale), clamp, multiply back, reshape to (out, in)"
    ),
    reference=_ref_per_group,
    cases=_per_group_cases,
    output_name="w_hat",
    rtol=1e-5,
    atol=1e-6,
    mistakes=(
        Mistake(
            "groups taken along the wrong axis: a group is group_size consecutive INPUT columns of one row, "
            "w.reshape(out, in // group_size, group_size), not a block of rows.",
            _g_wrong_axis,
        ),
        Mistake(
            "groups are not consecutive columns: reshape to (out, in // group_size, group_size) and reduce "
            "over the last dim (reshaping to (out, group_size, in // group_size) interleaves the groups).",
            _g_strided,
        ),
        Mistake(
            "one scale per row (per-channel): every group of group_size columns needs its own scale.",
            _g_per_channel,
        ),
        Mistake(
            "one scale for the whole tensor (per-tensor): every group needs its own scale.", _g_per_tensor
        ),
        Mistake(
            "used max(w) instead of max(|w|): the scale must cover the most negative weight too.",
            _g_max_not_absmax,
        ),
        Mistake(
            "divided by 2**(n_bits-1) instead of 2**(n_bits-1) - 1: the symmetric absmax grid is "
            "[-(2**(n_bits-1) - 1), 2**(n_bits-1) - 1] (7 at 4 bits).",
            _g_qmax_power_of_two,
        ),
        Mistake(
            "an all-zero group gives scale 0 and 0 / 0 = NaN: give such groups scale 1 (any positive scale "
            "quantizes zeros to code 0).",
            _g_no_zero_guard,
        ),
        Mistake("used floor instead of round: torch.round(w / scale).", _g_floor),
        Mistake(
            "returned the integer codes; return the dequantized weights, codes * scale, shape (out, in).",
            _g_codes,
        ),
        Mistake(
            "used asymmetric (min-max, zero-point) parameters; this exercise is symmetric absmax: "
            "scale = max|w| / (2**(n_bits-1) - 1), zero-point 0.",
            _g_asymmetric,
        ),
    ),
)


# -----------------------------------------------------------------------------
# 02.pack_int4 / 02.unpack_int4: two 4-bit codes per byte, element 2j in the low nibble


def _ref_pack(codes):
    return pack_codes(codes, 4, torch.uint8, order="low_first")


def _pack_cases() -> list[Case]:
    g = _gen(4)
    u8 = torch.uint8
    return [
        Case("8 codes", (torch.tensor([1, 2, 3, 4, 5, 6, 7, 8], dtype=u8),), "bytes 0x21, 0x43, 0x65, 0x87"),
        Case("0 and 15 alternating", (torch.tensor([0, 15, 15, 0], dtype=u8),), "bytes 0xF0, 0x0F"),
        Case(
            "random (3, 16)", (torch.randint(0, 16, (3, 16), generator=g).to(u8),), "pack along the last dim"
        ),
        Case("3-D (2, 3, 4)", (torch.randint(0, 16, (2, 3, 4), generator=g).to(u8),), ""),
        Case("all 15", (torch.full((6,), 15, dtype=u8),), "every byte is 0xFF"),
        Case("(16, 2): one byte per row", (torch.randint(0, 16, (16, 2), generator=g).to(u8),), ""),
    ]


def _nibbles(codes):
    c = codes.to(torch.int64)
    return c[..., 0::2], c[..., 1::2]  # (..., n / 2) each: even and odd elements


def _p_swapped(codes):
    lo, hi = _nibbles(codes)
    return ((lo << 4) | hi).to(torch.uint8)


def _p_gguf_halves(codes):
    c = codes.to(torch.int64)
    half = c.shape[-1] // 2
    return (c[..., :half] | (c[..., half:] << 4)).to(torch.uint8)


def _p_shift_8(codes):
    lo, hi = _nibbles(codes)
    return ((lo | (hi << 8)) & 0xFF).to(torch.uint8)


def _p_no_shift(codes):
    lo, hi = _nibbles(codes)
    return (lo | hi).to(torch.uint8)


def _p_first_axis(codes):
    return _ref_pack(codes.movedim(0, -1).contiguous()).movedim(-1, 0)


def _p_int64(codes):
    lo, hi = _nibbles(codes)
    return lo | (hi << 4)


PACK_INT4 = Exercise(
    id="02.pack_int4",
    title="Pack two 4-bit codes per byte (element 2j in the low nibble)",
    signature="pack_int4(codes) -> packed",
    hint="even elements codes[..., 0::2] in the low nibble, odd ones shifted left by 4; return torch.uint8",
    reference=_ref_pack,
    cases=_pack_cases,
    output_name="the packed bytes",
    check_dtype=True,
    mistakes=(
        Mistake(
            "nibble order swapped: element 2j goes in the LOW nibble (bits 0-3) and element 2j + 1 in the "
            "high nibble: byte = codes[2j] | (codes[2j + 1] << 4).",
            _p_swapped,
        ),
        Mistake(
            "paired element j with element j + n/2 (that is GGUF Q4_0's layout); here neighbours 2j and "
            "2j + 1 share a byte: codes[..., 0::2] and codes[..., 1::2].",
            _p_gguf_halves,
        ),
        Mistake("shifted by 8 bits; a nibble is 4 bits wide: codes[2j + 1] << 4.", _p_shift_8),
        Mistake("forgot to shift the second code into the high nibble (<< 4) before combining.", _p_no_shift),
        Mistake(
            "packed along the first axis; pack along the LAST axis (in_features), pairs codes[..., 2j] and "
            "codes[..., 2j + 1].",
            _p_first_axis,
        ),
        Mistake(
            "returned a wider integer dtype; packed bytes must be torch.uint8 (.to(torch.uint8)).", _p_int64
        ),
    ),
)


def _ref_unpack(packed):
    return unpack_codes(packed, 4, 2 * packed.shape[-1], torch.uint8, order="low_first")


def _unpack_cases() -> list[Case]:
    g = _gen(5)
    u8 = torch.uint8
    return [
        Case("4 bytes", (torch.tensor([0x21, 0x43, 0x65, 0x87], dtype=u8),), "codes 1..8"),
        Case("0xF0, 0x0F, 0xAB", (torch.tensor([0xF0, 0x0F, 0xAB], dtype=u8),), "codes 0, 15, 15, 0, 11, 10"),
        Case(
            "random (3, 8)", (torch.randint(0, 256, (3, 8), generator=g).to(u8),), "unpack along the last dim"
        ),
        Case("3-D (2, 2, 3)", (torch.randint(0, 256, (2, 2, 3), generator=g).to(u8),), ""),
        Case("all 0xFF", (torch.full((5,), 0xFF, dtype=u8),), "every code is 15"),
    ]


def _split(packed):
    p = packed.to(torch.int64)
    return p & 0x0F, p >> 4  # (..., n / 2) each


def _interleave(a, b):
    return torch.stack([a, b], dim=-1).reshape(*a.shape[:-1], 2 * a.shape[-1]).to(torch.uint8)


def _u_swapped(packed):
    lo, hi = _split(packed)
    return _interleave(hi, lo)


def _u_no_mask(packed):
    p = packed.to(torch.int64)
    return _interleave(p, p >> 4)


def _u_concatenated(packed):
    lo, hi = _split(packed)
    return torch.cat([lo, hi], dim=-1).to(torch.uint8)


def _u_shift_8(packed):
    lo, _ = _split(packed)
    return _interleave(lo, packed.to(torch.int64) >> 8)


def _u_unshifted_high(packed):
    p = packed.to(torch.int64)
    return _interleave(p & 0x0F, p & 0xF0)


UNPACK_INT4 = Exercise(
    id="02.unpack_int4",
    title="Unpack two 4-bit codes per byte (the inverse of pack_int4)",
    signature="unpack_int4(packed) -> codes",
    hint="packed & 0x0F is element 2j, packed >> 4 is element 2j + 1; interleave them (torch.stack)",
    reference=_ref_unpack,
    cases=_unpack_cases,
    output_name="the codes",
    mistakes=(
        Mistake(
            "nibble order swapped: the LOW nibble (byte & 0x0F) is element 2j, the high nibble (byte >> 4) "
            "element 2j + 1.",
            _u_swapped,
        ),
        Mistake(
            "forgot to mask the low nibble: byte & 0x0F (without the mask the high nibble's bits leak into "
            "the code).",
            _u_no_mask,
        ),
        Mistake(
            "concatenated all low nibbles, then all high nibbles; interleave them so that codes[2j] and "
            "codes[2j + 1] come from byte j: torch.stack([low, high], dim=-1).reshape(..., n).",
            _u_concatenated,
        ),
        Mistake("shifted by 8 bits; the high nibble is byte >> 4.", _u_shift_8),
        Mistake(
            "kept the high nibble in place (byte & 0xF0); shift it down to a code in [0, 15]: byte >> 4.",
            _u_unshifted_high,
        ),
    ),
)

EXERCISES: tuple[Exercise, ...] = (PER_GROUP_QUANTIZE, PACK_INT4, UNPACK_INT4)
