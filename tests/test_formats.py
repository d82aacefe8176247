"""Tests for quantlab.formats: simulated floats, NF4 (bitsandbytes layout), ternary, the format table."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from quantlab.formats import (
    FLOAT_FORMATS,
    NF4_VALUES,
    dynamic_map,
    format_table,
    format_values,
    fp_fake_quantize_scaled,
    fp_quantize,
    nf4_code,
    nf4_dequantize,
    nf4_double_dequantize,
    nf4_double_quantize,
    nf4_fake_quantize,
    nf4_pack,
    nf4_quantize,
    nf4_unpack,
    quantize_to_format,
    ternary_dequantize,
    ternary_quantize,
)

TORCH_DTYPES = {
    "fp32": torch.float32,
    "fp16": torch.float16,
    "bf16": torch.bfloat16,
    "fp8_e4m3": torch.float8_e4m3fn,
    "fp8_e5m2": torch.float8_e5m2,
}

wide_floats = arrays(
    np.float32,
    st.integers(1, 64),
    elements=st.floats(-1e5, 1e5, width=32, allow_nan=False, allow_infinity=False),
)


# -----------------------------------------------------------------------------
# Simulated floats: cross-checks against torch's own casts


@pytest.mark.parametrize("name", ["fp16", "bf16", "fp8_e4m3", "fp8_e5m2"])
def test_matches_torch_cast_on_random_magnitudes(gen, name):
    x = torch.randn(50_000, generator=gen, dtype=torch.float64) * torch.exp(
        torch.randn(50_000, generator=gen, dtype=torch.float64) * 8
    )
    x = x.float()  # magnitudes from 1e-20 to 1e20: subnormals, normals and overflow
    assert torch.equal(quantize_to_format(x, name), x.to(TORCH_DTYPES[name]).float())


@pytest.mark.parametrize("name", ["fp8_e4m3", "fp8_e5m2"])
def test_matches_torch_cast_on_every_tie(name):
    v = format_values(name)
    v = torch.cat([-v.flip(0), v])
    mids = ((v[1:] + v[:-1]) / 2).float()  # exactly halfway between neighbours: ties to even
    assert torch.equal(quantize_to_format(mids, name), mids.to(TORCH_DTYPES[name]).float())


@settings(max_examples=40, deadline=None)
@given(wide_floats, st.sampled_from(["fp16", "bf16", "fp8_e4m3", "fp8_e5m2"]))
def test_matches_torch_cast_property(xs, name):
    x = torch.from_numpy(xs)
    assert torch.equal(quantize_to_format(x, name), x.to(TORCH_DTYPES[name]).float())


@settings(max_examples=40, deadline=None)
@given(wide_floats, st.integers(2, 5), st.integers(0, 7))
def test_fp_quantize_idempotent_monotone_and_relative_error(xs, exp_bits, man_bits):
    x = torch.from_numpy(xs).double()
    q = fp_quantize(x, exp_bits, man_bits)
    assert torch.equal(fp_quantize(q, exp_bits, man_bits), q)
    order = x.argsort()
    assert bool((q[order][1:] >= q[order][:-1]).all())
    # inside the normal range the relative error is at most half an ulp: 2^-(M+1)
    bias = 2 ** (exp_bits - 1) - 1
    max_value = (2 - 2.0**-man_bits) * 2.0 ** (2**exp_bits - 2 - bias)
    normal = (x.abs() >= 2.0 ** (1 - bias)) & (x.abs() <= max_value)
    rel = ((q - x).abs() / x.abs())[normal]
    assert bool((rel <= 2.0 ** -(man_bits + 1)).all())


# -----------------------------------------------------------------------------
# Hand-computed values of each format


def test_fp4_e2m1_values_and_rounding():
    assert format_values("fp4_e2m1").tolist() == [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0]
    x = torch.tensor([0.25, 0.26, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 5.1, 7.0, 100.0, -2.6, -0.1])
    # 0.25 tie -> 0 (even), 0.75 tie -> 1.0, 1.25 tie -> 1.0, 1.75 tie -> 2.0, 2.5 tie -> 2, 3.5 tie -> 4,
    # 5.0 tie between 4 and 6 -> 4 (mantissa 0 is even), saturation at 6
    want = [0.0, 0.5, 1.0, 1.0, 2.0, 2.0, 4.0, 4.0, 6.0, 6.0, 6.0, -3.0, -0.0]
    assert quantize_to_format(x, "fp4_e2m1").tolist() == want


def test_fp8_e4m3_hand_values():
    f = FLOAT_FORMATS["fp8_e4m3"]
    assert (f.max_value, f.min_normal, f.min_subnormal) == (448.0, 2.0**-6, 2.0**-9)
    x = torch.tensor([448.0, 449.0, 464.0, 465.0, 1e6, 1.0625, 2.0**-9, 2.0**-10, 0.0029296875])
    # 464 is halfway between 448 (1.110 x 2^8) and 480 (not a value): ties to even -> 448, saturate beyond
    # 2^-10 is halfway between 0 and the smallest subnormal 2^-9 -> 0 (even); 1.5 * 2^-9 -> 2^-8 (even)
    want = [448.0, 448.0, 448.0, 448.0, 448.0, 1.0, 2.0**-9, 0.0, 2.0**-8]
    assert quantize_to_format(x, "fp8_e4m3").tolist() == want
    assert len(format_values("fp8_e4m3")) == 127  # 128 non-negative codes minus the NaN S.1111.111


def test_fp8_e5m2_hand_values_overflow_and_saturation():
    x = torch.tensor([57344.0, 61439.0, 61440.0, 1e9, 1.125, 1.375, 2.0**-16])
    # 61440 is halfway between 57344 (1.11 x 2^15) and 65536 (= inf): ties to even -> inf
    want = [57344.0, 57344.0, float("inf"), float("inf"), 1.0, 1.5, 2.0**-16]
    assert quantize_to_format(x, "fp8_e5m2").tolist() == want
    sat = quantize_to_format(x, "fp8_e5m2", saturate=True).tolist()
    assert sat[:4] == [57344.0, 57344.0, 57344.0, 57344.0]
    assert len(format_values("fp8_e5m2")) == 124  # 128 non-negative codes minus inf and 3 NaNs


def test_fp16_and_bf16_hand_values():
    x = torch.tensor([65504.0, 65519.0, 65520.0, 1.0 + 2.0**-11, 2.0**-24, 2.0**-25])
    want = [65504.0, 65504.0, float("inf"), 1.0, 2.0**-24, 0.0]  # 1 + 2^-11 and 2^-25 are ties to even
    assert quantize_to_format(x, "fp16").tolist() == want
    assert quantize_to_format(torch.tensor([1.0 + 2.0**-8, 1.0 + 3 * 2.0**-8]), "bf16").tolist() == [
        1.0,
        1.0 + 2.0**-6,
    ]


def test_sign_and_negative_zero_are_kept():
    q = quantize_to_format(torch.tensor([-1e-30, -5.0]), "fp8_e4m3")
    assert q.tolist() == [-0.0, -5.0] and torch.signbit(q[0])


def test_fp_fake_quantize_scaled():
    x_hat, scale = fp_fake_quantize_scaled(torch.tensor([0.1, -0.3, 3.0]), "fp4_e2m1")
    assert scale.item() == 0.5  # 3.0 / 6
    assert x_hat.tolist() == [0.0, -0.25, 3.0]  # 0.2 -> 0 and -0.6 -> -0.5 on the E2M1 grid
    w = torch.tensor([[1.0, 448.0], [0.0, 0.0]])
    w_hat, scale = fp_fake_quantize_scaled(w, "fp8_e4m3", axis=0)
    assert scale.tolist() == [1.0, 1.0] and torch.equal(w_hat, w)


def test_fp_bad_input():
    with pytest.raises(TypeError, match="x"):
        fp_quantize(torch.tensor([1, 2]), 4, 3)
    with pytest.raises(ValueError, match="x"):
        fp_quantize(torch.tensor([float("nan")]), 4, 3)
    with pytest.raises(ValueError, match="x"):
        quantize_to_format(torch.tensor([float("inf")]), "fp16")
    with pytest.raises(ValueError, match="x"):
        quantize_to_format(torch.empty(0), "fp16")
    with pytest.raises(ValueError, match="exp_bits"):
        fp_quantize(torch.ones(2), 0, 3)
    with pytest.raises(ValueError, match="man_bits"):
        fp_quantize(torch.ones(2), 4, 24)
    with pytest.raises(TypeError, match="man_bits"):
        fp_quantize(torch.ones(2), 4, 3.0)
    with pytest.raises(ValueError, match="fmt"):
        quantize_to_format(torch.ones(2), "fp6")
    with pytest.raises(ValueError, match="saturate"):
        quantize_to_format(torch.ones(2), "fp8_e4m3", saturate=False)
    with pytest.raises(ValueError, match="max_value"):
        fp_quantize(torch.ones(2), 4, 3, max_value=-1.0)
    with pytest.raises(ValueError, match="max_value"):
        fp_quantize(torch.ones(2), 4, 3, max_value=450.0)  # not a value of E4M3
    with pytest.raises(ValueError, match="max_value"):
        fp_quantize(torch.ones(2), 1, 2)


# -----------------------------------------------------------------------------
# NF4


def test_nf4_table_exact_float32_constants():
    want = [
        -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
        -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
        0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
        0.7229568362236023, 1.0,
    ]  # fmt: skip
    code = nf4_code()
    assert code.dtype == torch.float32 and code.tolist() == want  # every value is exactly a float32
    assert list(NF4_VALUES) == want
    assert bool((code[1:] > code[:-1]).all())


def _nf4_reference(x: torch.Tensor, block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Brute-force NF4: float32 1/absmax per block, clamp, argmin over all 16 distances (first wins).

    A partial last block of a half tensor is multiplied by a 0-d float32 tensor, which keeps the half
    dtype: written the same way here as in bitsandbytes' reference code.
    """
    flat = x.reshape(-1)
    n = flat.numel()
    n_full = n // block_size
    absmax = flat[: n_full * block_size].reshape(n_full, block_size).abs().amax(dim=1).float()  # (n_full,)
    full = flat[: n_full * block_size].reshape(n_full, block_size)  # (n_full, block_size)
    scaled = torch.clamp(full * (1 / absmax[:, None]), -1, 1)
    parts = [scaled.reshape(-1)]
    if n % block_size:
        tail = flat[n_full * block_size :]
        tail_max = tail.abs().amax().float()
        absmax = torch.cat([absmax, tail_max.reshape(1)])
        parts.append(torch.clamp(tail * (1 / tail_max), -1, 1).float())
    scaled = torch.cat(parts)
    codes = torch.argmin((scaled[:, None] - nf4_code()).abs(), dim=1)
    return codes.to(torch.uint8), absmax


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("n,block_size", [(64 * 5, 64), (1000, 64), (37, 64), (300, 32), (257, 128)])
def test_nf4_matches_brute_force_argmin(gen, dtype, n, block_size):
    x = (torch.randn(n, generator=gen) * 0.02).to(dtype)
    x[: min(n, block_size)] = 0.0  # an all-zero block
    codes, absmax = nf4_quantize(x, block_size)
    ref_codes, ref_absmax = _nf4_reference(x, block_size)
    assert torch.equal(codes, ref_codes) and torch.equal(absmax, ref_absmax)


def test_nf4_brute_force_on_midpoints_and_their_neighbours():
    code = nf4_code()
    mids = (code[1:] + code[:-1]) / 2  # float32 midpoints, some rounded up, some down
    x = torch.cat([mids, torch.nextafter(mids, torch.tensor(2.0)), torch.nextafter(mids, torch.tensor(-2.0))])
    x = torch.cat([torch.tensor([1.0]), x])  # absmax 1: scaled values are the inputs themselves
    codes, _ = nf4_quantize(x, block_size=x.numel())
    assert torch.equal(codes, _nf4_reference(x, x.numel())[0])


def test_nf4_exact_tie_goes_to_the_lower_code():
    # 0.0796/2 and -0.0911/2 are exact float32 midpoints (halving is exact): ties between codes 7|8 and 6|7
    x = torch.tensor([NF4_VALUES[8] / 2, NF4_VALUES[6] / 2, 1.0], dtype=torch.float32)
    codes, absmax = nf4_quantize(x)
    assert codes.tolist() == [7, 6, 15] and absmax.tolist() == [1.0]


def test_nf4_hand_example_multiplies_by_reciprocal():
    x = torch.tensor([0.0, 0.5, -1.0, 2.0, 3.0, -0.9, 0.3])
    codes, absmax = nf4_quantize(x, block_size=2)
    # blocks [0, .5] [-1, 2] [3, -.9] [.3]: scaled [0, 1] [-.5, 1] [1, -.3] [1]
    # -0.5 is nearest to -0.525 (code 2); -0.3 to -0.284 (code 4)
    assert codes.tolist() == [7, 15, 2, 15, 15, 4, 15]
    assert absmax.tolist() == [0.5, 2.0, 3.0, pytest.approx(0.3)]
    assert codes.dtype == torch.uint8 and absmax.dtype == torch.float32
    # multiplying by fl(1/3) and dividing by 3 land on opposite sides of the 5|6 decision point:
    # x * fl(1/3) = -0.13791174 -> code 5 (bitsandbytes), x / 3 = -0.13791172 -> code 6
    x = torch.tensor([3.0, -0.41373518109321594])
    assert nf4_quantize(x)[0].tolist() == [15, 5]


def test_nf4_zero_block_like_bitsandbytes():
    x = torch.zeros(70)
    x[64:] = torch.tensor([0.5, -0.25, 0.0, 0.1, 0.2, 0.3])
    codes, absmax = nf4_quantize(x)
    assert absmax.tolist() == [0.0, 0.5]
    assert codes[:64].tolist() == [0] * 64  # 0 * (1/0) = NaN: the argmin search returns index 0
    out = nf4_dequantize(codes, absmax)
    assert out[:64].abs().sum().item() == 0.0  # -1.0 * 0 = -0.0


def test_nf4_dequantize_error_bound(gen):
    x = torch.randn(4, 100, generator=gen)
    codes, absmax = nf4_quantize(x)
    assert codes.shape == (400,)
    x_hat = nf4_dequantize(codes, absmax).reshape(x.shape)
    assert torch.equal(x_hat, nf4_fake_quantize(x))
    widest_gap = (nf4_code()[1:] - nf4_code()[:-1]).max()  # 0.3038
    per_elem_absmax = absmax.repeat_interleave(64)[:400].reshape(x.shape)
    assert bool(((x_hat - x).abs() <= widest_gap / 2 * per_elem_absmax * (1 + 1e-6)).all())


def test_nf4_pack_first_element_in_high_nibble():
    assert nf4_pack(torch.tensor([1, 2, 15, 0], dtype=torch.uint8)).tolist() == [0x12, 0xF0]
    assert nf4_pack(torch.tensor([3, 4, 5])).tolist() == [0x34, 0x57]  # odd: padded with 7 (value 0.0)
    codes, _ = nf4_quantize(torch.randn(131, generator=torch.Generator().manual_seed(5)))
    packed = nf4_pack(codes)
    assert packed.shape == (66,)
    assert torch.equal(nf4_unpack(packed, 131), codes)
    assert nf4_unpack(packed).shape == (132,) and nf4_unpack(packed)[-1].item() == 7
    low = torch.cat([codes[1::2], torch.tensor([7], dtype=torch.uint8)])  # (66,)
    assert torch.equal(packed, (codes[0::2] << 4) | low)


def test_nf4_bad_input():
    with pytest.raises(TypeError, match="x"):
        nf4_quantize(torch.arange(64))
    with pytest.raises(ValueError, match="x"):
        nf4_quantize(torch.tensor([1.0, float("nan")]))
    with pytest.raises(ValueError, match="x"):
        nf4_quantize(torch.empty(0))
    with pytest.raises(ValueError, match="block_size"):
        nf4_quantize(torch.ones(4), block_size=0)
    with pytest.raises(ValueError, match="absmax"):
        nf4_dequantize(torch.zeros(65, dtype=torch.uint8), torch.ones(1))
    with pytest.raises(ValueError, match="codes"):
        nf4_dequantize(torch.tensor([16]), torch.ones(1))
    with pytest.raises(TypeError, match="codes"):
        nf4_dequantize(torch.tensor([1.0]), torch.ones(1))
    with pytest.raises(ValueError, match="n"):
        nf4_unpack(torch.zeros(2, dtype=torch.uint8), 5)


def test_double_quantization(gen):
    m = dynamic_map()
    assert m.shape == (256,) and bool((m[1:] >= m[:-1]).all())
    assert 0.0 in m.tolist() and m.max().item() == 1.0
    absmax = torch.rand(1000, generator=gen) * 0.2 + 0.01
    codes, absmax2, offset = nf4_double_quantize(absmax)
    assert codes.dtype == torch.uint8 and codes.shape == (1000,) and absmax2.shape == (4,)
    assert offset.item() == pytest.approx(absmax.mean().item())
    rec = nf4_double_dequantize(codes, absmax2, offset)
    # the dynamic map's widest gap near +-1 is 0.9 / 64 (2 ** 6 fractions between 0.1 and 1)
    assert (rec - absmax).abs().max() <= absmax2.max() * 0.9 / 64 / 2 * (1 + 1e-5)


# -----------------------------------------------------------------------------
# Ternary


def test_ternary_hand_example():
    w = torch.tensor([0.1, -2.0, 0.7, 1.2, -0.5, 0.0])
    codes, gamma = ternary_quantize(w)
    assert gamma.item() == pytest.approx(4.5 / 6)  # mean |w| = 0.75
    # w / 0.75001: 0.133 -> 0, -2.67 -> -1, 0.93 -> 1, 1.6 -> 1, -0.67 -> -1, 0 -> 0
    assert codes.tolist() == [0, -1, 1, 1, -1, 0] and codes.dtype == torch.int8
    assert ternary_dequantize(codes, gamma).tolist() == pytest.approx([0, -0.75, 0.75, 0.75, -0.75, 0])


def test_ternary_properties(gen):
    w = torch.randn(64, 64, generator=gen)
    codes, gamma = ternary_quantize(w)
    assert set(codes.unique().tolist()) <= {-1, 0, 1}
    # |w| < (gamma + eps) / 2 rounds to 0; larger rounds to +-1 with w's sign
    small = w.abs() < (gamma + 1e-5) / 2
    assert bool((codes[small] == 0).all()) and bool((codes[~small] == torch.sign(w[~small])).all())
    codes0, gamma0 = ternary_quantize(torch.zeros(3, 3))
    assert gamma0.item() == 0.0 and codes0.abs().sum().item() == 0
    with pytest.raises(ValueError, match="eps"):
        ternary_quantize(torch.zeros(3), eps=0.0)
    with pytest.raises(TypeError, match="w"):
        ternary_quantize(torch.zeros(3, dtype=torch.int8))


# -----------------------------------------------------------------------------
# Format table


def test_format_table_against_torch_finfo():
    rows = {row["name"]: row for row in format_table()}
    names = {"fp32", "fp16", "bf16", "fp8_e4m3", "fp8_e5m2", "fp4_e2m1", "nf4", "int8", "int4", "ternary"}
    assert set(rows) >= names
    for name, dtype in TORCH_DTYPES.items():
        fi = torch.finfo(dtype)
        assert rows[name]["max"] == fi.max and rows[name]["min"] == fi.min
        assert rows[name]["step_near_1"] == fi.eps
        assert rows[name]["min_positive"] == fi.tiny * fi.eps  # smallest subnormal
        assert rows[name]["bits"] == fi.bits
    assert rows["fp4_e2m1"]["max"] == 6.0 and rows["fp4_e2m1"]["step_near_1"] == 0.5
    assert rows["fp8_e4m3"]["overflow"] == "saturate" and rows["fp8_e5m2"]["overflow"] == "inf"
    assert rows["nf4"]["step_near_1"] == pytest.approx(1.0 - 0.7229568362236023)
    assert (rows["int4"]["min"], rows["int4"]["max"]) == (-8.0, 7.0)
    for row in rows.values():
        keys = {"name", "kind", "bits", "min", "max", "min_positive", "step_near_1", "has_inf", "overflow"}
        assert set(row) == keys
