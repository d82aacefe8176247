"""Exercises of lab 07 (the Triton W4A16 kernel): the unpack step and the tile loop.

The student writes Triton kernels in the notebook and passes a small *launcher* to the checker:

* ``07.unpack_int4``: ``unpack(packed, n_codes) -> codes``; ``packed`` is a 1-D ``uint8`` (two codes per
  byte) or ``int32`` (eight per word) tensor packed ``low_first``; the launcher runs the student's kernel
  with ``BLOCK = 32`` so that every case spans several programs and ends in a ragged last block.
* ``07.w4a16_tile_loop``: ``matmul(x, packed, scale, zero_point, group_size) -> y``; the launcher runs the
  student's GEMM kernel with ``BLOCK_M = BLOCK_N = 16`` and ``BLOCK_K = 32``. The cases use several
  programs along both output axes and several iterations along K (with a ragged last K step), so a
  wrong offset anywhere cannot pass.

The known mistakes are emulated in PyTorch: each computes exactly what a kernel with that bug returns.

References:
    Tillet, Kung and Cox, "Triton", MAPL 2019; the Triton tutorials (vector add, matrix multiplication).
"""

from __future__ import annotations

import torch

from quantlab.exercises.core import Case, Exercise, Mistake
from quantlab.kernels.w4a16 import dequantize_int4_reference, unpack_int4_reference
from quantlab.packing import pack_codes

__all__ = ["BLOCK_K", "EXERCISES"]

BLOCK_K = 32  # the K step the lab's launcher uses; the tile-loop mistakes are emulated with it


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# -----------------------------------------------------------------------------
# 07.unpack_int4


def _per(packed: torch.Tensor) -> int:
    return 2 if packed.dtype == torch.uint8 else 8


def _ref_unpack(packed: torch.Tensor, n_codes: int) -> torch.Tensor:
    return unpack_int4_reference(packed.reshape(1, -1), n_codes)[0]


def _words(packed: torch.Tensor, n_codes: int) -> tuple[torch.Tensor, torch.Tensor]:
    offs = torch.arange(n_codes)
    return packed.to(torch.int32)[offs // _per(packed)], offs % _per(packed)


def _u_swapped(packed, n_codes):
    word, i = _words(packed, n_codes)
    return (word >> ((_per(packed) - 1 - i) * 4)) & 0xF


def _u_no_mask(packed, n_codes):
    word, i = _words(packed, n_codes)
    return word >> (i * 4)


def _u_shift_by_index(packed, n_codes):
    word, i = _words(packed, n_codes)
    return (word >> i) & 0xF


def _u_two_per_container(packed, n_codes):
    offs = torch.arange(n_codes)
    word = packed.to(torch.int32)[(offs // 2).clamp(max=packed.numel() - 1)]
    return (word >> ((offs % 2) * 4)) & 0xF


def _unpack_cases() -> list[Case]:
    g = _gen(7)
    c100 = torch.randint(0, 16, (100,), generator=g)
    c200 = torch.randint(0, 16, (200,), generator=g)
    top = torch.full((64,), 15)  # every nibble set: int32 words are -1, sign bits everywhere
    c8 = torch.tensor([1, 2, 3, 4, 5, 6, 7, 8])
    return [
        Case("uint8, 100 codes", (pack_codes(c100, 4), 100), "4 programs of 32 codes, the last one ragged"),
        Case(
            "int32, 200 codes",
            (pack_codes(c200, 4, container=torch.int32), 200),
            "8 codes per word, 7 programs",
        ),
        Case("int32, every nibble 15", (pack_codes(top, 4, container=torch.int32), 64), "words equal to -1"),
        Case("uint8, 8 codes", (pack_codes(c8, 4), 8), "codes 1..8: bytes 0x21, 0x43, 0x65, 0x87"),
    ]


UNPACK_INT4 = Exercise(
    id="07.unpack_int4",
    title="Unpack 4-bit codes in registers: one shift and one mask per element",
    signature="unpack(packed, n_codes) -> codes (your launcher around unpack_kernel)",
    hint="word = tl.load(packed_ptr + offs // PER, ...); code = (word >> ((offs % PER) * 4)) & 0xF",
    reference=_ref_unpack,
    cases=_unpack_cases,
    output_name="the unpacked codes",
    mistakes=(
        Mistake(
            "nibble order swapped: with the low_first layout element i of a container sits in bits 4i..4i+3, "
            "so shift right by (offs % PER) * 4, not by (PER - 1 - offs % PER) * 4.",
            _u_swapped,
        ),
        Mistake(
            "the mask is missing: after the shift the higher codes (and, for int32, the sign bits) are still "
            "there; keep only the low 4 bits with & 0xF.",
            _u_no_mask,
        ),
        Mistake(
            "shifted by the element index instead of 4 bits per element: shift by (offs % PER) * 4.",
            _u_shift_by_index,
        ),
        Mistake(
            "assumed two codes per container: the word holding element offs is offs // PER "
            "(PER = 8 for int32), "
            "and the nibble within it is offs % PER.",
            _u_two_per_container,
        ),
    ),
)


# -----------------------------------------------------------------------------
# 07.w4a16_tile_loop


def _ref_matmul(x, packed, scale, zero_point, group_size):
    w = dequantize_int4_reference(packed, scale, zero_point, group_size, x.shape[1])  # (N, K)
    return x.double() @ w.double().T


def _weight(packed, scale, zero_point, group_size, k):
    return dequantize_int4_reference(packed, scale, zero_point, group_size, k).double()  # (N, K)


def _t_no_advance(x, packed, scale, zero_point, group_size):
    k = x.shape[1]
    w = _weight(packed, scale, zero_point, group_size, k)
    n_steps = -(-k // BLOCK_K)
    first = slice(0, min(BLOCK_K, k))
    return n_steps * (x[:, first].double() @ w[:, first].T)


def _t_overwrite(x, packed, scale, zero_point, group_size):
    k = x.shape[1]
    w = _weight(packed, scale, zero_point, group_size, k)
    last = slice(((k - 1) // BLOCK_K) * BLOCK_K, k)
    return x[:, last].double() @ w[:, last].T


def _t_no_zero_point(x, packed, scale, zero_point, group_size):
    return _ref_matmul(x, packed, scale, torch.zeros_like(zero_point), group_size)


def _t_tile_group(x, packed, scale, zero_point, group_size):
    k = x.shape[1]
    codes = unpack_int4_reference(packed, k).double()  # (N, K)
    g = (torch.arange(k) // BLOCK_K * BLOCK_K) // group_size  # the group of the tile's first column
    w = (codes - zero_point.double()[:, g]) * scale.double()[:, g]
    return x.double() @ w.T


def _t_drop_ragged(x, packed, scale, zero_point, group_size):
    k = x.shape[1]
    full = (k // BLOCK_K) * BLOCK_K
    w = _weight(packed, scale, zero_point, group_size, k)
    return x[:, :full].double() @ w[:, :full].T


def _layer(n: int, k: int, group_size: int, seed: int):
    g = _gen(seed)
    codes = torch.randint(0, 16, (n, k), generator=g)
    scale = torch.rand(n, k // group_size, generator=g) * 0.1 + 0.02
    zero_point = torch.randint(4, 12, (n, k // group_size), generator=g).float()
    return pack_codes(codes, 4), scale, zero_point


def _tile_cases() -> list[Case]:
    cases = []
    for name, (m, n, k, gs, seed) in {
        "33 x 40 @ K=128, group 32: 3 x 3 programs, 4 K steps": (33, 40, 128, 32, 1),
        "5 x 48 @ K=80, group 16: a ragged last K step": (5, 48, 80, 16, 2),
        "17 x 20 @ K=256, group 128: groups wider than a K step": (17, 20, 256, 128, 3),
    }.items():
        packed, scale, zero_point = _layer(n, k, gs, seed)
        x = torch.randn(m, k, generator=_gen(seed + 10))
        cases.append(Case(name, (x, packed, scale, zero_point, gs)))
    return cases


W4A16_TILE_LOOP = Exercise(
    id="07.w4a16_tile_loop",
    title="The K loop of the fused W4A16 GEMM",
    signature="matmul(x, packed, scale, zero_point, group_size) -> y (your launcher around the GEMM kernel)",
    hint=(
        "for k0 in range(0, K, BLOCK_K): rk = k0 + tl.arange(0, BLOCK_K); load the x tile and the packed "
        "words with masks on rk < K, unpack, g = rk // group_size, w = (code - z) * s, "
        "acc += tl.dot(x, tl.trans(w))"
    ),
    reference=_ref_matmul,
    cases=_tile_cases,
    rtol=1e-4,
    atol=1e-4,
    output_name="y",
    mistakes=(
        Mistake(
            "the K offsets do not advance: every iteration reads the first K tile again; build them from the "
            "loop variable, rk = k0 + tl.arange(0, BLOCK_K).",
            _t_no_advance,
        ),
        Mistake(
            "the accumulator is overwritten: only the last K tile survives; use acc += tl.dot(...), with acc "
            "initialised once before the loop.",
            _t_overwrite,
        ),
        Mistake("the zero-point is not subtracted: w = (code - zero_point) * scale.", _t_no_zero_point),
        Mistake(
            "one group for the whole tile: each column has its own group, g = rk // group_size (a vector), "
            "not k0 // group_size.",
            _t_tile_group,
        ),
        Mistake(
            "the ragged last K step is dropped: loop while k0 < K and mask the loads with rk < K "
            "(other=0 so masked columns add nothing).",
            _t_drop_ragged,
        ),
    ),
)

EXERCISES = (UNPACK_INT4, W4A16_TILE_LOOP)
