"""Tests for quantlab.gguf: llama.cpp's block formats, byte for byte, and reading/writing .gguf files.

Independent oracles:

* ``data/gguf_reference_blocks.npz``: 16 super-blocks of 256 float32 inputs (normal, heavy tails, ties,
  mixed block scales, signed zeros, fp32-subnormal / fp16-underflow / fp16-overflow scales, ...) and the
  bytes llama.cpp's reference quantizers ``quantize_row_{q8_0,q4_0,q4_1,q4_K,q6_K}_ref`` produce for them
  (ggml-quants.c, compiled with gcc 12 -O2 for x86-64, i.e. without FMA contraction, as ggml-base is),
  plus per-super-block CRC-32s of their output on :func:`stress_inputs`;
* the ``gguf`` package's numpy quantizers (Q8_0, Q4_0, Q4_1) and dequantizers (all five formats);
* ``gguf.GGUFReader`` for the container; hand-computed blocks; error bounds from the formats' definitions.
"""

from __future__ import annotations

import warnings
import zlib
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as GT
from hypothesis import given, settings
from hypothesis import strategies as st

from quantlab import gguf as qg

REFERENCE = Path(__file__).resolve().parent / "data" / "gguf_reference_blocks.npz"
SMOLLM2 = Path(__file__).resolve().parents[1] / "data" / "cache" / "SmolLM2-135M-Instruct.Q4_1.gguf"
QUANTIZED = ["Q8_0", "Q4_0", "Q4_1", "Q4_K", "Q6_K"]
WITH_GGUF_QUANTIZER = ["Q8_0", "Q4_0", "Q4_1"]  # gguf 0.19 has numpy quantizers for these
# byte ranges of the fp16 fields of each block (the rest are codes/scales that any byte value encodes)
FP16_FIELDS = {"Q8_0": [0], "Q4_0": [0], "Q4_1": [0, 2], "Q4_K": [0, 2], "Q6_K": [208]}
EPS32 = float(np.finfo(np.float32).eps)


def normal(seed: int, *shape: int, scale: float = 1.0) -> np.ndarray:
    return (np.random.default_rng(seed).standard_normal(shape) * scale).astype(np.float32)


def fp16(value: float) -> float:
    """The float16 rounding of a float32 value, back as a Python float."""
    return float(np.float16(np.float32(value)))


def fp16_le_bytes(value: float) -> list[int]:
    return np.array([value], dtype="<f2").view(np.uint8).tolist()


def blocks_of(raw: np.ndarray, ggml_type: str) -> np.ndarray:
    return raw.reshape(-1, qg.BLOCK_FORMATS[ggml_type].bytes_per_block)


def field16(blocks: np.ndarray, start: int) -> np.ndarray:
    """The fp16 field at byte ``start`` of every block, as float64."""
    return np.ascontiguousarray(blocks[:, start : start + 2]).view("<f2")[:, 0].astype(np.float64)


# -----------------------------------------------------------------------------
# The table


def test_block_formats_match_ggml_sizes():
    for name, fmt in qg.BLOCK_FORMATS.items():
        assert (fmt.block_size, fmt.bytes_per_block) == gguf.GGML_QUANT_SIZES[GT[name]]
        assert fmt.bits_per_weight == fmt.bpw == 8 * fmt.bytes_per_block / fmt.block_size


def test_bits_per_weight_from_the_issue():
    bpw = {name: qg.BLOCK_FORMATS[name].bits_per_weight for name in QUANTIZED}
    assert bpw == {"Q8_0": 8.5, "Q4_0": 4.5, "Q4_1": 5.0, "Q4_K": 4.5, "Q6_K": 6.5625}
    block_size, nbytes, _ = qg.BLOCK_FORMATS["Q4_K"]
    assert (block_size, nbytes) == (256, 144)


# -----------------------------------------------------------------------------
# Byte-exact against llama.cpp's reference quantizers and the gguf package


@pytest.mark.parametrize("ggml_type", QUANTIZED)
def test_matches_llama_cpp_reference_bytes(ggml_type):
    reference = np.load(REFERENCE)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # the "fp16_overflow" super-block warns, by design
        ours = qg.quantize(reference["x"], ggml_type)
    n_super = reference["names"].size
    differs = (ours.reshape(n_super, -1) != reference[ggml_type].reshape(n_super, -1)).any(axis=1)
    assert [str(name) for name in reference["names"][differs]] == []


def stress_inputs(n_super: int = 512) -> np.ndarray:
    """Reproducible inputs built with exact IEEE operations only (no libm), so they are the same bits on
    every platform: bell-shaped sums of uniforms, Pareto-like tails ``1/u``, power-of-two block scales."""
    rng = np.random.default_rng(2025)
    u = rng.random((n_super, 256, 4))
    bell = u[..., 0] + u[..., 1] + u[..., 2] + u[..., 3] - 2.0  # (n_super, 256)
    tails = np.where(u[..., 0] < 0.05, (u[..., 1] - 0.5) / (u[..., 2] + 1e-3), bell)
    scale = 2.0 ** rng.integers(-12, 8, (n_super, 16, 1))  # one power of two per 16 weights
    x = np.where(rng.random((n_super, 1)) < 0.5, bell, tails).reshape(n_super, 16, 16) * scale
    return x.astype(np.float32).reshape(-1)


@pytest.mark.parametrize("ggml_type", QUANTIZED)
def test_matches_llama_cpp_reference_checksums(ggml_type):
    # 512 super-blocks: summation-order slips in the K-quant searches show up in ~1% of super-blocks,
    # so this many catch them; the reference bytes are kept as one CRC-32 per super-block
    reference = np.load(REFERENCE)
    ours = qg.quantize(stress_inputs(), ggml_type).reshape(512, -1)
    crcs = np.array([zlib.crc32(row.tobytes()) for row in ours], dtype=np.uint32)
    assert np.flatnonzero(crcs != reference[f"{ggml_type}_crc32"]).tolist() == []


def test_signed_zeros_follow_c_not_the_gguf_package():
    # C keeps max = +0.0 unless some |x| > 0, so Q4_0's d is 0 / -8 = -0.0 even when x[0] is -0.0 (the
    # gguf package takes x[0] itself and writes +0.0); Q4_1 keeps the first zero as min, sign included
    x = np.zeros(32, dtype=np.float32)
    x[0] = -0.0
    assert qg.quantize_q4_0(x)[:2].tolist() == [0x00, 0x80]
    assert gguf.quants.quantize(x, GT.Q4_0)[:2].tolist() == [0x00, 0x00]
    assert qg.quantize_q4_1(x)[:4].tolist() == [0x00, 0x00, 0x00, 0x80]  # d = +0.0, m = -0.0
    x[0], x[1] = 0.0, -0.0
    assert qg.quantize_q4_1(x)[:4].tolist() == [0x00, 0x00, 0x00, 0x00]


def _inputs(kind: str, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    if kind == "normal":
        return normal(seed, 64, 256, scale=0.02)
    if kind == "heavy_tails":  # outliers dominate some blocks
        return (rng.standard_t(2, (32, 256)) * 3.0).astype(np.float32)
    if kind == "half_integers":  # x * id lands exactly on k + 0.5 in many blocks: the tie rules matter
        return (rng.integers(-16, 17, (32, 256)) * 0.5).astype(np.float32)
    if kind == "positive":
        return np.abs(normal(seed, 32, 256)) + np.float32(1.0)
    if kind == "block_scales":  # every block at its own scale, 1e-4 .. 1e4
        return (normal(seed, 512, 32) * 10.0 ** rng.uniform(-4, 4, (512, 1))).astype(np.float32)
    raise AssertionError(kind)


@pytest.mark.parametrize("kind", ["normal", "heavy_tails", "half_integers", "positive", "block_scales"])
@pytest.mark.parametrize("ggml_type", WITH_GGUF_QUANTIZER)
def test_quantize_matches_gguf_reference(ggml_type, kind):
    x = _inputs(kind, seed=len(kind))
    ours = qg.quantize(x, ggml_type)
    theirs = gguf.quants.quantize(x.reshape(-1, 256), GT[ggml_type]).reshape(-1)
    np.testing.assert_array_equal(ours, theirs)


def test_quantize_q8_0_many_blocks_matches_gguf():
    x = normal(1, 2048, 512, scale=0.05)  # 32768 blocks
    np.testing.assert_array_equal(qg.quantize_q8_0(x), gguf.quants.quantize(x, GT.Q8_0).reshape(-1))


def _random_blocks(ggml_type: str, n_blocks: int, seed: int) -> np.ndarray:
    """Arbitrary bytes for every code/scale field, finite fp16 values in the fp16 fields."""
    rng = np.random.default_rng(seed)
    raw = rng.integers(0, 256, (n_blocks, qg.BLOCK_FORMATS[ggml_type].bytes_per_block), dtype=np.uint8)
    for start in FP16_FIELDS[ggml_type]:
        raw[:, start : start + 2] = rng.standard_normal((n_blocks, 1)).astype("<f2").view(np.uint8)
    return raw.reshape(-1)


@pytest.mark.parametrize("ggml_type", QUANTIZED)
def test_dequantize_matches_gguf_reference_on_arbitrary_bytes(ggml_type):
    raw = _random_blocks(ggml_type, 300, seed=3)
    ours = qg.dequantize(raw, ggml_type)
    theirs = gguf.quants.dequantize(raw.reshape(1, -1), GT[ggml_type]).reshape(-1)
    np.testing.assert_array_equal(ours, theirs)


@pytest.mark.parametrize("ggml_type", QUANTIZED)
def test_named_entry_points_agree_with_dispatch(ggml_type):
    x = normal(4, 4, 512)
    suffix = ggml_type.lower()
    raw = getattr(qg, f"quantize_{suffix}")(x)
    assert raw.dtype == np.uint8 and raw.ndim == 1
    np.testing.assert_array_equal(raw, qg.quantize(x, ggml_type))
    values = getattr(qg, f"dequantize_{suffix}")(raw)
    assert values.dtype == np.float32 and values.shape == (x.size,)
    np.testing.assert_array_equal(values, qg.dequantize(raw, ggml_type))


# -----------------------------------------------------------------------------
# Hand-computed blocks


def test_q8_0_rounds_halves_away_from_zero():
    x = np.zeros(32, dtype=np.float32)
    x[:6] = [127.0, 2.5, -2.5, 0.5, -1.5, np.nextafter(np.float32(0.5), np.float32(0))]  # d = 1, id = 1
    raw = qg.quantize_q8_0(x)
    assert raw[:2].tolist() == fp16_le_bytes(1.0)
    # roundf: 2.5 -> 3, -2.5 -> -3, 0.5 -> 1, -1.5 -> -2; 0.49999997 -> 0 (floor(x + 0.5) would give 1)
    assert raw[2:8].view(np.int8).tolist() == [127, 3, -3, 1, -2, 0]
    assert torch.round(torch.tensor([2.5, -2.5, 0.5])).tolist() == [2.0, -2.0, 0.0]  # what C does NOT do


def test_q4_0_scale_comes_from_the_first_largest_magnitude():
    x = np.zeros(32, dtype=np.float32)
    x[3], x[7] = 4.0, -4.0  # same magnitude: the first one (+4) sets d = 4 / -8 = -0.5
    raw = qg.quantize_q4_0(x)
    assert raw[:2].tolist() == fp16_le_bytes(-0.5)
    codes = np.concatenate([raw[2:] & 0x0F, raw[2:] >> 4])
    # +4 -> 4 * -2 + 8.5 = 0.5 -> 0; -4 -> 16.5 -> 16, clipped to 15; zeros -> 8.5 -> 8
    assert codes[3] == 0 and codes[7] == 15 and set(np.delete(codes, [3, 7]).tolist()) == {8}
    np.testing.assert_array_equal(qg.dequantize_q4_0(raw)[[3, 7]], [4.0, -3.5])  # the clipped one is off by d


def test_q4_0_ties_truncate_upward_and_nibbles_pair_j_with_j_plus_16():
    x = np.zeros(32, dtype=np.float32)
    x[0], x[1], x[2], x[17] = -8.0, 0.5, -0.5, 3.0  # max = -8: d = 1, id = 1
    raw = qg.quantize_q4_0(x)
    assert raw[:2].tolist() == fp16_le_bytes(1.0)
    # code = (int)(x + 8.5): 0.5 -> 9, -0.5 -> 8 (ties go up), element 17 in the high nibble of byte 1
    assert raw[2:5].tolist() == [0 | 8 << 4, 9 | 11 << 4, 8 | 8 << 4]


def test_q4_1_hand_computed_block():
    x = (np.arange(32) % 16 - 3).astype(np.float32)  # min -3, max 12: d = 1, m = -3, code = x + 3
    raw = qg.quantize_q4_1(x)
    assert raw[:4].tolist() == fp16_le_bytes(1.0) + fp16_le_bytes(-3.0)
    assert raw[4:].tolist() == [17 * j for j in range(16)]  # element j and j+16 share code j
    np.testing.assert_array_equal(qg.dequantize_q4_1(raw), x)


def test_q4_k_hand_computed_ramp():
    # every sub-block is 0..15 twice: the min-max grid fits exactly (error 0, nothing beats it), so all
    # eight sub-scales are 1 and all mins 0 -> 6-bit scale 63, d = fp16(1/63), dmin = 0
    x = np.tile(np.arange(32) % 16, 8).astype(np.float32)
    raw = qg.quantize_q4_k(x)
    assert raw.size == 144
    assert raw[0:4].tolist() == fp16_le_bytes(np.float32(1) / np.float32(63)) + [0, 0]
    # scales 0-3 = 63 with the top bits (63 >> 4 = 3) of scales 4-7 in bits 6-7; mins all 0
    assert raw[4:16].tolist() == [255] * 4 + [0] * 4 + [15] * 4
    assert raw[16:].tolist() == [17 * (l % 16) for l in range(32)] * 4
    step = fp16(np.float32(1) / np.float32(63)) * 63
    np.testing.assert_allclose(qg.dequantize_q4_k(raw), step * x, rtol=1e-6)


def test_q4_k_hand_computed_shifted_ramp_uses_the_min():
    x = np.tile(np.arange(32) % 16 - 5, 8).astype(np.float32)  # min -5: fitted exactly with the_min = 5
    raw = qg.quantize_q4_k(x)
    assert raw[2:4].tolist() == fp16_le_bytes(np.float32(5) / np.float32(63))
    assert raw[4:16].tolist() == [255] * 8 + [255] * 4  # all six-bit scales and mins are 63
    assert raw[16:].tolist() == [17 * (l % 16) for l in range(32)] * 4  # code = x + 5
    d, dmin = fp16(np.float32(1) / np.float32(63)), fp16(np.float32(5) / np.float32(63))
    np.testing.assert_allclose(qg.dequantize_q4_k(raw), d * 63 * (x + 5) - dmin * 63, rtol=1e-6, atol=1e-6)


def test_q6_k_hand_computed_integer_block_is_exact():
    # integers in [-32, 31] with -32 in every 16-group: every sub-scale is exactly 1, so the fp16 scale is
    # d = 1 / (-128 / 1) = -1/128, every int8 sub-scale -128, and d * sc = 1 decodes the integers exactly
    rng = np.random.default_rng(5)
    x = rng.integers(-32, 32, 256).astype(np.float32)
    x[::16] = -32
    raw = qg.quantize_q6_k(x)
    assert raw.size == 210
    assert raw[208:210].tolist() == fp16_le_bytes(-1 / 128)
    assert raw[192:208].view(np.int8).tolist() == [-128] * 16
    np.testing.assert_array_equal(qg.dequantize_q6_k(raw), x)


def test_pack_unpack_scale_min_k4_all_values():
    grid = np.arange(64, dtype=np.uint8)
    scales = np.stack([np.roll(grid, k)[:8] for k in range(64)])  # (64, 8): every value in every slot
    mins = np.stack([np.roll(grid[::-1], 3 * k)[:8] for k in range(64)])
    packed = qg.pack_scale_min_k4(scales, mins)
    assert packed.shape == (64, 12)
    got_scales, got_mins = qg.unpack_scale_min_k4(packed)
    np.testing.assert_array_equal(got_scales, scales)
    np.testing.assert_array_equal(got_mins, mins)
    # the gguf package's unpacking of the same bytes (its Q4_K dequantizer relies on it)
    theirs = gguf.quants.Q4_K.get_scale_min(packed)
    np.testing.assert_array_equal(theirs[0], scales)
    np.testing.assert_array_equal(theirs[1], mins)
    with pytest.raises(ValueError, match=r"\[0, 63\]"):
        qg.pack_scale_min_k4(scales + 1, mins)


def test_make_qkx2_quants_never_worse_than_min_max_grid():
    x = normal(6, 200, 32)
    weights = np.sqrt((x * x).mean(axis=1, keepdims=True)) + np.abs(x)
    scale, the_min, codes = qg.make_qkx2_quants(x, weights)
    assert codes.dtype == np.uint8 and codes.max() <= 15 and (the_min >= 0).all()
    fitted = scale[:, None].astype(np.float64) * codes - the_min[:, None]
    lo = np.minimum(x.min(axis=1, keepdims=True), 0).astype(np.float64)
    step = (x.max(axis=1, keepdims=True) - lo) / 15
    naive = lo + step * np.clip(np.rint((x - lo) / step), 0, 15)
    err = (weights * (fitted - x) ** 2).sum(axis=1)
    err_naive = (weights * (naive - x) ** 2).sum(axis=1)
    assert (err <= err_naive * (1 + 1e-4) + 1e-9).all()
    assert (err < err_naive * 0.999).mean() > 0.5  # the search usually finds a strictly better grid


def test_make_qx_quants_scale_is_the_least_squares_fit_of_its_codes():
    x = normal(7, 100, 16)
    scale, codes = qg.make_qx_quants(x, nmax=32)
    assert codes.dtype == np.uint8 and codes.max() <= 63
    ell = codes.astype(np.float64) - 32
    w = x.astype(np.float64) ** 2  # rmse_type 1: weights x^2
    np.testing.assert_allclose(scale, (w * x * ell).sum(axis=1) / (w * ell * ell).sum(axis=1), rtol=1e-5)


# -----------------------------------------------------------------------------
# Edge cases: zeros, constants, fp16 underflow and overflow


def test_all_zero_blocks():
    zeros = np.zeros(512, dtype=np.float32)
    for ggml_type in ["Q8_0", "Q4_1", "Q4_K", "Q6_K"]:
        raw = qg.quantize(zeros, ggml_type)
        assert not raw.any(), ggml_type
        assert not qg.dequantize(raw, ggml_type).any()
    # Q4_0: d = max / -8 with max = +0.0 is -0.0 (fp16 0x8000), and every code is (int)(0 + 8.5) = 8
    raw = blocks_of(qg.quantize_q4_0(zeros), "Q4_0")
    assert (raw[:, :2] == [0x00, 0x80]).all() and (raw[:, 2:] == 0x88).all()
    assert not qg.dequantize_q4_0(raw.reshape(-1)).any()


@pytest.mark.parametrize("value", [0.7, -0.7, 0.25, -123.0])
def test_constant_blocks(value):
    x = np.full(256, value, dtype=np.float32)
    q8 = blocks_of(qg.quantize_q8_0(x), "Q8_0")
    assert (q8[:, 2:].view(np.int8) == np.sign(value) * 127).all()
    q41 = blocks_of(qg.quantize_q4_1(x), "Q4_1")
    assert not q41[:, :2].any() and not q41[:, 4:].any()  # d = 0, codes 0, the value lives in m
    np.testing.assert_array_equal(qg.dequantize_q4_1(q41.reshape(-1)), fp16(value))
    for ggml_type in QUANTIZED:
        got = qg.dequantize(qg.quantize(x, ggml_type), ggml_type)
        # one fp16 rounding of a scale (2^-11 relative), amplified by at most the 6-bit scale of Q4_K
        np.testing.assert_allclose(got, value, rtol=2e-3, err_msg=ggml_type)
        np.testing.assert_array_equal(got, gguf.quants.dequantize(qg.quantize(x, ggml_type), GT[ggml_type]))


def test_tiny_values_scale_underflows_fp16():
    x = normal(8, 64, scale=1e-9)  # d = amax / 127 ~ 1e-11, far below the smallest fp16 subnormal (6e-8)
    for ggml_type in ["Q8_0", "Q4_0", "Q4_1"]:
        blocks = blocks_of(qg.quantize(x, ggml_type), ggml_type)
        assert not blocks[:, :2].any() or ggml_type == "Q4_0"  # Q4_0 may store -0.0
        assert field16(blocks, 0).tolist() == [0.0, 0.0]
        # the codes still use the float32 d (as in C), so they are not all zero...
        assert blocks[:, 4 if ggml_type == "Q4_1" else 2 :].any()
        # ...but they decode to (signed) zeros
        assert not qg.dequantize(blocks.reshape(-1), ggml_type).any()
    np.testing.assert_array_equal(
        blocks_of(qg.quantize_q8_0(x), "Q8_0"), gguf.quants.quantize(x.reshape(2, 32), GT.Q8_0)
    )


def test_subnormal_fp16_scale_is_stored_and_bounds_the_error():
    x = np.random.default_rng(9).uniform(-1e-5, 1e-5, 32).astype(np.float32)
    x[0] = 1e-5  # the largest: d = 1e-5 / 127 = 7.9e-8, an fp16 subnormal (spacing 2^-24 = 6e-8)
    raw = qg.quantize_q8_0(x)
    d32 = np.float32(1e-5) / np.float32(127)
    assert raw[:2].tolist() == fp16_le_bytes(d32)
    bits = int(raw[:2].view("<u2")[0])
    assert bits & 0x7C00 == 0 and bits != 0  # exponent 0, mantissa != 0: subnormal
    codes = raw[2:].view(np.int8).astype(np.float64)
    d16 = fp16(d32)
    err = np.abs(x - qg.dequantize_q8_0(raw))
    assert (err <= float(d32) * (0.5 + 1e-4) + np.abs(codes) * abs(float(d32) - d16) + 1e-12).all()


def test_scale_overflowing_fp16_is_stored_as_inf_with_a_warning():
    x = normal(10, 32)
    x[0] = 1.0e7  # d = 1e7 / 127 = 78740 > 65504, the largest fp16
    with pytest.warns(RuntimeWarning, match="float16 range"):
        raw = qg.quantize_q8_0(x)
    assert raw[:2].tolist() == [0x00, 0x7C]  # +inf, exactly what llama.cpp writes
    with np.errstate(over="ignore", invalid="ignore"):
        np.testing.assert_array_equal(raw, gguf.quants.quantize(x, GT.Q8_0).reshape(-1))
        assert np.isinf(qg.dequantize_q8_0(raw)[0])  # and the block decodes to inf (and NaN for code 0)


# -----------------------------------------------------------------------------
# Inputs and errors


def test_accepts_torch_and_other_float_dtypes():
    x = normal(11, 8, 256)
    ref = qg.quantize_q4_k(x)
    np.testing.assert_array_equal(qg.quantize_q4_k(torch.from_numpy(x)), ref)
    np.testing.assert_array_equal(qg.quantize_q4_k(x.reshape(-1)), ref)  # row-major flattening
    np.testing.assert_array_equal(qg.quantize_q4_k(x.astype(np.float64)), ref)  # float64 -> float32 exactly
    xb = torch.from_numpy(x).to(torch.bfloat16)
    np.testing.assert_array_equal(qg.quantize_q8_0(xb), qg.quantize_q8_0(xb.float().numpy()))
    np.testing.assert_array_equal(qg.dequantize_q4_k(torch.from_numpy(ref)), qg.dequantize_q4_k(ref))
    np.testing.assert_array_equal(qg.dequantize_q4_k(ref.tobytes()), qg.dequantize_q4_k(ref))


@pytest.mark.parametrize("ggml_type", QUANTIZED)
def test_wrong_length_names_argument_and_multiple(ggml_type):
    block = qg.BLOCK_FORMATS[ggml_type].block_size
    with pytest.raises(ValueError, match=rf"x has {block + 1} elements.*multiple of {block}"):
        qg.quantize(np.ones(block + 1, dtype=np.float32), ggml_type)
    nbytes = qg.BLOCK_FORMATS[ggml_type].bytes_per_block
    with pytest.raises(ValueError, match=rf"raw has {nbytes - 1} bytes.*multiple of {nbytes}"):
        qg.dequantize(np.zeros(nbytes - 1, dtype=np.uint8), ggml_type)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_inputs_raise(bad):
    x = np.zeros(256, dtype=np.float32)
    x[17] = bad
    for ggml_type in QUANTIZED:
        with pytest.raises(ValueError, match="NaN or Inf"):
            qg.quantize(x, ggml_type)
    with pytest.raises(ValueError, match="NaN or Inf"):
        qg.quantize_q8_0(torch.from_numpy(x[:32]))
    with pytest.raises(ValueError, match="NaN or Inf"):  # finite in float64, inf in float32
        qg.quantize_q8_0(np.full(32, 1e39))


def test_wrong_types_raise():
    with pytest.raises(TypeError, match="floating-point"):
        qg.quantize_q8_0(np.arange(32))
    with pytest.raises(TypeError, match="floating-point"):
        qg.quantize_q4_0(torch.arange(32))
    with pytest.raises(TypeError, match="numpy array or torch.Tensor"):
        qg.quantize_q4_1([0.0] * 32)
    with pytest.raises(TypeError, match="uint8"):
        qg.dequantize_q8_0(np.zeros(34, dtype=np.float32))
    with pytest.raises(ValueError, match="must not be empty"):
        qg.quantize_q8_0(np.zeros(0, dtype=np.float32))
    with pytest.raises(ValueError, match="ggml_type must be one of"):
        qg.quantize(np.zeros(32, dtype=np.float32), "Q5_0")


# -----------------------------------------------------------------------------
# Properties (hypothesis)

finite = st.floats(-1e4, 1e4, allow_nan=False, allow_infinity=False, allow_subnormal=False, width=32)


def block_arrays(block: int, max_blocks: int = 6):
    return st.integers(1, max_blocks).flatmap(
        lambda n: st.lists(finite, min_size=n * block, max_size=n * block).map(
            lambda v: np.array(v, dtype=np.float32)
        )
    )


@settings(max_examples=60, deadline=None)
@given(block_arrays(32))
def test_q8_0_error_is_at_most_half_a_step(x):
    raw = blocks_of(qg.quantize_q8_0(x), "Q8_0")
    d32 = (np.abs(x.reshape(-1, 32)).max(axis=1) / np.float32(127)).astype(np.float64)[:, None]
    d16 = field16(raw, 0)[:, None]
    codes = raw[:, 2:].view(np.int8).astype(np.float64)
    err = np.abs(x.reshape(-1, 32).astype(np.float64) - qg.dequantize_q8_0(raw.reshape(-1)).reshape(-1, 32))
    # half a step of the float32 scale (+ the float32 rounding of x * (1/d)), plus the fp16 rounding of d
    bound = d32 * (0.5 + 127 * 4 * EPS32) + np.abs(codes) * np.abs(d32 - d16) + 1e-30
    assert (err <= bound).all()


@settings(max_examples=60, deadline=None)
@given(block_arrays(32))
def test_q4_0_and_q4_1_error_bounds(x):
    xb = x.reshape(-1, 32).astype(np.float64)
    raw0 = blocks_of(qg.quantize_q4_0(x), "Q4_0")
    d16 = np.abs(field16(raw0, 0))[:, None]
    amax = np.abs(xb).max(axis=1, keepdims=True)
    d32 = amax / 8
    err0 = np.abs(xb - qg.dequantize_q4_0(raw0.reshape(-1)).reshape(-1, 32))
    # within half a step, except the opposite-sign end that is clipped to code 15 (within one step)
    assert (err0 <= d32 * (1 + 1e-5) + 8 * np.abs(d32 - d16) + 1e-30).all()
    codes = np.concatenate([raw0[:, 2:] & 15, raw0[:, 2:] >> 4], axis=1)
    inside = codes < 15
    assert (err0 <= d32 * (0.5 + 1e-5) + 8 * np.abs(d32 - d16) + 1e-30)[inside].all()

    raw1 = blocks_of(qg.quantize_q4_1(x), "Q4_1")
    d1 = (xb.max(axis=1, keepdims=True) - xb.min(axis=1, keepdims=True)) / 15
    d1_16, m16 = field16(raw1, 0)[:, None], field16(raw1, 2)[:, None]
    err1 = np.abs(xb - qg.dequantize_q4_1(raw1.reshape(-1)).reshape(-1, 32))
    bound1 = d1 * (0.5 + 1e-5) + 15 * np.abs(d1 - d1_16) + np.abs(xb.min(axis=1, keepdims=True) - m16)
    rounding = (
        2 * EPS32 * (np.abs(xb).max(axis=1, keepdims=True) + 15 * np.abs(d1_16))
    )  # of q*d + m in float32
    assert (err1 <= bound1 + rounding + 1e-30).all()


@settings(max_examples=40, deadline=None)
@given(block_arrays(32), st.floats(1e-2, 1e3))
def test_q8_0_and_q4_0_are_idempotent(x, target):
    # rescale each block so that its fp16 scale is a normal number: then requantizing the decoded
    # values reproduces the bytes exactly (the largest code maps back to the same scale)
    xb = x.reshape(-1, 32).astype(np.float64)
    amax = np.abs(xb).max(axis=1, keepdims=True)
    x = np.where(amax > 0, xb / np.where(amax > 0, amax, 1) * target, target).astype(np.float32).reshape(-1)
    for ggml_type in ["Q8_0", "Q4_0"]:
        raw = qg.quantize(x, ggml_type)
        np.testing.assert_array_equal(qg.quantize(qg.dequantize(raw, ggml_type), ggml_type), raw)


def _assert_nearest_grid_point(
    x: np.ndarray, xhat: np.ndarray, step: np.ndarray, lo: np.ndarray, n_codes: int
):
    """``xhat`` is the point of the grid ``lo + step * k`` (k = 0..n_codes-1) nearest to ``x``."""
    hi = lo + step * (n_codes - 1)
    distance_outside = np.maximum(lo - x, 0) + np.maximum(x - hi, 0)
    slack = 1e-5 * (np.abs(step) + np.abs(lo) + np.abs(x))
    assert (np.abs(x - xhat) <= np.maximum(np.abs(step) / 2, distance_outside) + slack).all()


@settings(max_examples=20, deadline=None)
@given(block_arrays(256, max_blocks=3))
def test_q4_k_requantizes_to_the_nearest_point_of_the_stored_grid(x):
    raw = blocks_of(qg.quantize_q4_k(x), "Q4_K")
    d, dmin = field16(raw, 0)[:, None], field16(raw, 2)[:, None]
    sc, m = qg.unpack_scale_min_k4(raw[:, 4:16])
    step = (d * sc)[:, :, None]  # (n, 8, 1)
    lo = -(dmin * m)[:, :, None]
    xhat = qg.dequantize_q4_k(raw.reshape(-1)).reshape(-1, 8, 32)
    xs = x.reshape(-1, 8, 32).astype(np.float64)
    live = np.broadcast_to(step != 0, xs.shape)  # C skips sub-blocks whose decoded scale is 0
    _assert_nearest_grid_point(
        xs[live], xhat[live], np.broadcast_to(step, xs.shape)[live], np.broadcast_to(lo, xs.shape)[live], 16
    )
    assert (d >= 0).all() and (dmin >= 0).all()


@settings(max_examples=20, deadline=None)
@given(block_arrays(256, max_blocks=3))
def test_q6_k_requantizes_to_the_nearest_point_of_the_stored_grid(x):
    raw = blocks_of(qg.quantize_q6_k(x), "Q6_K")
    step = (field16(raw, 208)[:, None] * raw[:, 192:208].view(np.int8))[:, :, None]  # (n, 16, 1)
    xs = x.reshape(-1, 16, 16).astype(np.float64)
    xhat = qg.dequantize_q6_k(raw.reshape(-1)).reshape(-1, 16, 16)
    live = np.broadcast_to(step != 0, xs.shape)
    steps = np.broadcast_to(step, xs.shape)[live]
    # grid d*sc*(q - 32): for a negative step the grid runs downward, so the lowest point is 31 steps away
    lo = np.where(steps > 0, -32 * steps, 31 * steps)
    _assert_nearest_grid_point(xs[live], xhat[live], np.abs(steps), lo, 64)


@settings(max_examples=20, deadline=None)
@given(st.sampled_from(QUANTIZED), st.integers(1, 40))
def test_byte_length_is_blocks_times_bytes_per_block(ggml_type, n_blocks):
    fmt = qg.BLOCK_FORMATS[ggml_type]
    x = normal(n_blocks, n_blocks * fmt.block_size)
    raw = qg.quantize(x, ggml_type)
    assert raw.shape == (n_blocks * fmt.bytes_per_block,) and raw.dtype == np.uint8
    assert qg.dequantize(raw, ggml_type).shape == (x.size,)


# -----------------------------------------------------------------------------
# GGUF files


def _tensors() -> dict[str, tuple]:
    return {
        "token_embd.weight": (normal(20, 40, 64), "Q8_0"),
        "blk.0.attn_q.weight": (normal(21, 16, 96), "Q4_0"),
        "blk.0.ffn_up.weight": (normal(22, 6, 512), "Q4_K"),
        "blk.0.ffn_down.weight": (torch.from_numpy(normal(23, 4, 256)), "Q6_K"),
        "blk.0.attn_k.weight": (normal(24, 8, 64), "Q4_1"),
        "blk.0.attn_norm.weight": (normal(25, 64), "F32"),
        "blk.0.attn_v.weight": (normal(26, 3, 32), "F16"),
        "raw.weight": (blocks_of(qg.quantize_q8_0(normal(27, 5, 64)), "Q8_0").reshape(5, 68), "Q8_0"),
    }


METADATA = {
    "general.architecture": "llama",
    "general.name": "quantlab test",
    "llama.context_length": 8192,
    "llama.rope.freq_base": 100000.0,
    "llama.attention.layer_norm_rms_epsilon": np.float32(1e-5),
    "test.flag": True,
    "test.negative": -7,
    "test.big": 2**40,
    "test.float64": np.float64(0.1),
    "test.strings": ["a", "bé", ""],
    "test.ints": [1, -2, 3],
    "test.floats": [0.5, 1.5],
}


@pytest.fixture(scope="module")
def written(tmp_path_factory) -> Path:
    return qg.write_gguf(tmp_path_factory.mktemp("gguf") / "tiny.gguf", _tensors(), METADATA)


def _expected(data, ggml_type) -> tuple[np.ndarray, np.ndarray, tuple[int, ...]]:
    """(raw bytes, dequantized values, shape) a tensor entry should produce."""
    data = data.numpy() if isinstance(data, torch.Tensor) else data
    if data.dtype == np.uint8:
        values = qg.dequantize(data.reshape(-1), ggml_type)
        return data.reshape(-1), values, (data.shape[0], values.size // data.shape[0])
    raw = qg.quantize(data, ggml_type)
    return raw, qg.dequantize(raw, ggml_type), data.shape


def test_write_then_read_back_with_read_gguf(written):
    f = qg.read_gguf(written)
    assert f.version == 3
    for key, value in METADATA.items():
        stored_as_float32 = isinstance(value, float | np.float32) and key != "test.float64"
        assert f.metadata[key] == (float(np.float32(value)) if stored_as_float32 else value), key
    assert type(f.metadata["test.flag"]) is bool and type(f.metadata["llama.context_length"]) is int
    assert list(f.tensor_info) == list(_tensors())
    for name, (data, ggml_type) in _tensors().items():
        raw, values, shape = _expected(data, ggml_type)
        info = f.tensor_info[name]
        assert (info.ggml_type, info.type, info.shape, info.nbytes) == (ggml_type, ggml_type, shape, raw.size)
        assert info.offset % 32 == 0
        np.testing.assert_array_equal(f.raw_tensor(name), raw)
        loaded = f.load_tensor(name)
        assert loaded.dtype == torch.float32 and tuple(loaded.shape) == shape
        np.testing.assert_array_equal(loaded.numpy().reshape(-1), values)
    np.testing.assert_array_equal(
        f.load_tensor("blk.0.attn_norm.weight").numpy(), _tensors()["blk.0.attn_norm.weight"][0]
    )


def test_write_then_read_back_with_gguf_reader(written):
    reader = gguf.GGUFReader(written)
    fields = {k: v.contents() for k, v in reader.fields.items()}
    assert fields["general.architecture"] == "llama"
    assert fields["llama.context_length"] == 8192
    assert reader.fields["llama.context_length"].types == [gguf.GGUFValueType.UINT32]
    assert reader.fields["llama.rope.freq_base"].types == [gguf.GGUFValueType.FLOAT32]
    assert fields["test.strings"] == ["a", "bé", ""]
    ours = qg.read_gguf(written)
    assert {k: v for k, v in fields.items() if not k.startswith("GGUF.")} == ours.metadata
    for t in reader.tensors:
        data, ggml_type = _tensors()[t.name]
        raw, values, shape = _expected(data, ggml_type)
        assert t.tensor_type.name == ggml_type
        assert tuple(reversed(t.shape.tolist())) == shape
        assert t.data_offset == ours.tensor_info[t.name].offset
        np.testing.assert_array_equal(np.asarray(t.data).view(np.uint8).reshape(-1), raw)
        theirs = gguf.quants.dequantize(np.asarray(t.data), t.tensor_type).reshape(-1)
        np.testing.assert_array_equal(theirs, values)


def test_unsupported_tensor_type_is_named(tmp_path):
    path = tmp_path / "q5.gguf"
    writer = gguf.GGUFWriter(path, "llama")
    q5 = gguf.quants.quantize(normal(30, 2, 64), GT.Q5_0)
    writer.add_tensor("w", q5, raw_dtype=GT.Q5_0)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    f = qg.read_gguf(path)
    assert f.tensor_info["w"].ggml_type == "Q5_0" and f.tensor_info["w"].shape == (2, 64)
    np.testing.assert_array_equal(f.raw_tensor("w"), q5.reshape(-1))
    with pytest.raises(NotImplementedError, match="Q5_0"):
        f.load_tensor("w")
    with pytest.raises(KeyError, match="no tensor named"):
        f.load_tensor("missing.weight")


def test_missing_file_says_how_to_fetch_it(tmp_path):
    with pytest.raises(FileNotFoundError, match="make setup"):
        qg.read_gguf(tmp_path / "nope.gguf")


def test_truncated_or_corrupt_file_says_delete_and_refetch(written, tmp_path):
    data = written.read_bytes()
    last = qg.read_gguf(written).tensor_info["raw.weight"]
    cuts = [0, 3, 10, 40, len(data) // 3, last.offset + last.nbytes // 2]
    for cut in cuts:
        bad = tmp_path / f"cut{cut}.gguf"
        bad.write_bytes(data[:cut])
        with pytest.raises(ValueError, match=r"corrupt or truncated.*delete it and re-run `make setup`"):
            qg.read_gguf(bad)
    garbage = tmp_path / "garbage.gguf"
    garbage.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    with pytest.raises(ValueError, match="corrupt"):
        qg.read_gguf(garbage)


def test_write_gguf_rejects_bad_entries(tmp_path):
    with pytest.raises(ValueError, match="multiple of 32"):
        qg.write_gguf(tmp_path / "a.gguf", {"w": (normal(0, 4, 48), "Q8_0")})
    with pytest.raises(ValueError, match="ggml_type must be one of"):
        qg.write_gguf(tmp_path / "b.gguf", {"w": (normal(0, 4, 64), "Q3_K")})
    with pytest.raises(TypeError, match=r"metadata\['x'\]"):
        qg.write_gguf(tmp_path / "c.gguf", {}, {"x": {"nested": 1}})
    with pytest.raises(TypeError, match="tuple"):
        qg.write_gguf(tmp_path / "d.gguf", {"w": normal(0, 4, 64)})
    assert not any(tmp_path.iterdir())  # nothing half-written


# -----------------------------------------------------------------------------
# The real SmolLM2-135M-Instruct file


@pytest.fixture(scope="module")
def smollm2() -> qg.GGUFFile:
    if not SMOLLM2.exists():
        pytest.skip(f"{SMOLLM2.name} is absent; `make setup` fetches it")
    return qg.read_gguf(SMOLLM2)


@pytest.mark.smollm2
def test_smollm2_metadata(smollm2):
    md = smollm2.metadata
    assert md["general.architecture"] == "llama"
    arch = md["general.architecture"]
    assert (md[f"{arch}.attention.head_count"], md[f"{arch}.attention.head_count_kv"]) == (9, 3)
    assert (
        md[f"{arch}.embedding_length"]
        == md[f"{arch}.attention.head_count"] * md[f"{arch}.rope.dimension_count"]
    )
    assert md[f"{arch}.context_length"] == 8192 and md[f"{arch}.rope.freq_base"] == 100000.0
    assert (md["tokenizer.ggml.model"], md["tokenizer.ggml.pre"]) == ("gpt2", "smollm")
    assert (
        len(md["tokenizer.ggml.tokens"]) == md[f"{arch}.vocab_size"] == len(md["tokenizer.ggml.token_type"])
    )
    assert all(isinstance(t, str) for t in md["tokenizer.ggml.merges"][:100])


@pytest.mark.smollm2
def test_smollm2_tensor_types_and_shapes(smollm2):
    types = {info.ggml_type for info in smollm2.tensor_info.values()}
    assert "Q4_1" in types and types <= set(qg.BLOCK_FORMATS)
    md = smollm2.metadata
    emb, vocab = md["llama.embedding_length"], md["llama.vocab_size"]
    assert smollm2.tensor_info["token_embd.weight"].shape == (vocab, emb)
    assert smollm2.tensor_info["blk.0.attn_q.weight"].shape == (emb, emb)
    assert smollm2.tensor_info["blk.0.ffn_up.weight"].shape == (md["llama.feed_forward_length"], emb)
    n_blocks = md["llama.block_count"]
    assert sum(name.startswith(f"blk.{n_blocks - 1}.") for name in smollm2.tensor_info) == 9


@pytest.mark.smollm2
@pytest.mark.parametrize(
    "name", ["blk.0.attn_q.weight", "blk.7.ffn_down.weight", "token_embd.weight", "output_norm.weight"]
)
def test_smollm2_tensors_match_gguf_dequantize(smollm2, name):
    info = smollm2.tensor_info[name]
    raw = smollm2.raw_tensor(name)
    ours = smollm2.load_tensor(name)
    assert ours.dtype == torch.float32 and tuple(ours.shape) == info.shape
    if info.ggml_type == "F32":
        np.testing.assert_array_equal(ours.numpy(), raw.view("<f4"))
        return
    rows = slice(None, None, 7)  # every 7th row keeps the 49152-row embedding check quick
    theirs = gguf.quants.dequantize(raw.reshape(info.shape[0], -1)[rows], GT[info.ggml_type])
    np.testing.assert_array_equal(ours.numpy()[rows], theirs)


@pytest.mark.smollm2
@pytest.mark.parametrize("name", ["blk.0.attn_q.weight", "token_embd.weight"])
def test_smollm2_requantizing_reproduces_the_file_bytes(smollm2, name):
    # the file was written by llama.cpp's reference quantizers; the decoded weights lie on their own
    # grids, so quantizing them again with quantlab must give back the stored bytes exactly
    info = smollm2.tensor_info[name]
    np.testing.assert_array_equal(
        qg.quantize(smollm2.load_tensor(name), info.ggml_type), smollm2.raw_tensor(name)
    )
