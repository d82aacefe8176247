"""Tests for quantlab.uniform: code ranges, rounding, parameters, quantize/dequantize, STE."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from quantlab.uniform import (
    absmax_params,
    affine_params,
    dequantize,
    fake_quantize,
    fake_quantize_ste,
    minmax_fake_quantize,
    minmax_params,
    qrange,
    quantize,
    round_half_away_from_zero,
    round_half_to_even,
    round_stochastic,
    round_values,
)

TIES = torch.tensor([0.5, 1.5, 2.5, -0.5, -2.5])
EPS32 = torch.finfo(torch.float32).eps

finite_rows = arrays(
    np.float32,
    st.tuples(st.integers(1, 4), st.integers(1, 16)),
    elements=st.floats(-100, 100, width=32, allow_subnormal=False),
)


# -----------------------------------------------------------------------------
# qrange


@pytest.mark.parametrize("n_bits", range(1, 17))
def test_qrange_signed_and_unsigned(n_bits):
    assert qrange(n_bits) == (-(2 ** (n_bits - 1)), 2 ** (n_bits - 1) - 1)
    assert qrange(n_bits, signed=False) == (0, 2**n_bits - 1)


def test_qrange_hand_values():
    assert qrange(4) == (-8, 7)
    assert qrange(4, restricted=True) == (-7, 7)
    assert qrange(2, restricted=True) == (-1, 1)
    assert qrange(1) == (-1, 0)


@pytest.mark.parametrize("bad", [0, 17, -3])
def test_qrange_rejects_out_of_range_bits(bad):
    with pytest.raises(ValueError, match="n_bits"):
        qrange(bad)


@pytest.mark.parametrize("bad", [4.0, True, "4"])
def test_qrange_rejects_non_int_bits(bad):
    with pytest.raises(TypeError, match="n_bits"):
        qrange(bad)


def test_qrange_restricted_needs_signed_and_two_bits():
    with pytest.raises(ValueError, match="signed"):
        qrange(4, signed=False, restricted=True)
    with pytest.raises(ValueError, match="n_bits"):
        qrange(1, restricted=True)


# -----------------------------------------------------------------------------
# Rounding


def test_round_half_to_even_ties():
    assert round_half_to_even(TIES).tolist() == [0.0, 2.0, 2.0, -0.0, -2.0]
    assert round_values(TIES, "half_to_even").tolist() == [0.0, 2.0, 2.0, -0.0, -2.0]


def test_round_half_away_from_zero_ties():
    assert round_half_away_from_zero(TIES).tolist() == [1.0, 2.0, 3.0, -1.0, -3.0]
    assert round_values(TIES, "half_away_from_zero").tolist() == [1.0, 2.0, 3.0, -1.0, -3.0]


def test_rounding_modes_agree_off_ties(gen):
    x = torch.randn(1000, generator=gen) * 10
    x = x[(x - x.floor() - 0.5).abs() > 1e-3]
    assert torch.equal(round_half_to_even(x), round_half_away_from_zero(x))


def test_round_half_away_from_zero_just_below_half():
    # floor(|x| + 0.5) would round the addition itself and give 1 here; C's roundf gives 0
    x = torch.nextafter(torch.tensor([0.5, -0.5]), torch.tensor(0.0))  # 0.49999997, -0.49999997
    assert round_half_away_from_zero(x).tolist() == [0.0, -0.0]


def test_round_stochastic_is_unbiased_and_reproducible():
    x = torch.full((20000,), 0.3)
    r1 = round_stochastic(x, torch.Generator().manual_seed(1))
    r2 = round_stochastic(x, torch.Generator().manual_seed(1))
    assert torch.equal(r1, r2)
    assert set(r1.unique().tolist()) <= {0.0, 1.0}
    # Bernoulli(0.3) mean: standard error sqrt(0.3 * 0.7 / 20000) = 0.00324; allow 4 of them
    assert abs(r1.mean().item() - 0.3) < 4 * math.sqrt(0.3 * 0.7 / 20000)
    neg = round_stochastic(torch.full((20000,), -2.75), torch.Generator().manual_seed(2))
    assert set(neg.unique().tolist()) <= {-3.0, -2.0}
    assert abs(neg.mean().item() + 2.75) < 4 * math.sqrt(0.25 * 0.75 / 20000)


def test_round_stochastic_keeps_integers():
    x = torch.tensor([-3.0, 0.0, 5.0])
    assert torch.equal(round_stochastic(x, torch.Generator().manual_seed(0)), x)


def test_round_values_rejects_unknown_mode():
    with pytest.raises(ValueError, match="rounding"):
        round_values(TIES, "nearest")


# -----------------------------------------------------------------------------
# quantize / dequantize / fake_quantize with given parameters


def test_quantize_hand_example():
    assert quantize(torch.tensor([-1.0, 0.26, 0.5, 9.0]), 0.25, 0, -8, 7).tolist() == [-4.0, 1.0, 2.0, 7.0]
    assert quantize(torch.tensor([0.0, 1.0]), 0.5, 3, 0, 15).tolist() == [3.0, 5.0]


def test_dequantize_hand_example_and_dtype():
    out = dequantize(torch.tensor([0, 3, 15], dtype=torch.uint8), 0.5, 3)
    assert out.dtype == torch.float32
    assert out.tolist() == [-1.5, 0.0, 6.0]


def test_fake_quantize_hand_example():
    assert fake_quantize(torch.tensor([0.3, -0.9, 5.0]), 0.5, 0, -2, 1).tolist() == [0.5, -1.0, 0.5]


@settings(max_examples=40, deadline=None)
@given(finite_rows, st.integers(2, 8))
def test_round_trip_error_at_most_half_a_step(xs, n_bits):
    x = torch.from_numpy(xs)
    scale, zp = absmax_params(x, n_bits, dim=-1)
    qmin, qmax = qrange(n_bits, restricted=True)
    err = (fake_quantize(x, scale, zp, qmin, qmax) - x).abs()
    # half a step, plus the float32 rounding of x / scale and of scale * code
    assert bool((err <= scale / 2 * (1 + 4 * EPS32) + 4 * EPS32 * x.abs()).all())


@settings(max_examples=40, deadline=None)
@given(finite_rows, st.integers(2, 8))
def test_fake_quantize_is_idempotent(xs, n_bits):
    x = torch.from_numpy(xs)
    scale, zp = minmax_params(x, n_bits)
    once = minmax_fake_quantize(x, scale, zp, n_bits)
    assert torch.equal(minmax_fake_quantize(once, scale, zp, n_bits), once)


@settings(max_examples=40, deadline=None)
@given(finite_rows, st.integers(1, 8))
def test_quantize_is_monotone_and_codes_in_range(xs, n_bits):
    x = torch.from_numpy(xs)
    scale, zp = minmax_params(x, n_bits)
    xs_sorted = x.sort(dim=1).values
    q = quantize(xs_sorted, scale, zp, 0, 2**n_bits - 1)
    assert bool((q[:, 1:] >= q[:, :-1]).all())
    assert bool(((q >= 0) & (q <= 2**n_bits - 1)).all())
    assert torch.equal(q, q.round())


def test_quantize_bad_inputs():
    x = torch.tensor([1.0, 2.0])
    with pytest.raises(TypeError, match="x"):
        quantize(torch.tensor([1, 2]), 1.0, 0, -8, 7)
    with pytest.raises(ValueError, match="scale"):
        quantize(x, 0.0, 0, -8, 7)
    with pytest.raises(ValueError, match="scale"):
        quantize(x, torch.tensor([1.0, -1.0]), 0, -8, 7)
    with pytest.raises(ValueError, match="qmin"):
        quantize(x, 1.0, 0, 7, 7)
    with pytest.raises(ValueError, match="x"):
        quantize(torch.tensor([1.0, float("nan")]), 1.0, 0, -8, 7)
    with pytest.raises(ValueError, match="x"):
        quantize(torch.tensor([float("inf")]), 1.0, 0, -8, 7)
    with pytest.raises(ValueError, match="x"):
        quantize(torch.empty(0), 1.0, 0, -8, 7)
    with pytest.raises(TypeError, match="codes"):
        dequantize([1, 2], 1.0, 0)


# -----------------------------------------------------------------------------
# absmax / affine / minmax parameters


def test_absmax_params_hand_example():
    scale, zp = absmax_params(torch.tensor([[1.0, -127.0], [0.5, 0.25]]), 8)
    assert scale.shape == (2, 1)
    assert scale[0].item() == 1.0
    assert scale[1].item() == pytest.approx(0.5 / 127)
    assert zp.abs().sum().item() == 0.0
    s_tensor, _ = absmax_params(torch.tensor([[1.0, -4.0], [2.0, 0.5]]), 4, dim=None)
    assert s_tensor.item() == pytest.approx(4.0 / 7)


def test_absmax_params_zero_row_and_eps():
    scale, _ = absmax_params(torch.zeros(2, 3), 8)
    assert scale.flatten().tolist() == [1.0, 1.0]
    scale, _ = absmax_params(torch.zeros(1, 3), 8, eps=1e-5)
    assert scale.item() == pytest.approx(1e-5 / 127)


def test_absmax_codes_never_clip(gen):
    x = torch.randn(16, 32, generator=gen)
    scale, zp = absmax_params(x, 4)
    q = quantize(x, scale, zp, -8, 7)
    assert q.min() >= -7 and q.max() <= 7  # the restricted grid: -8 is never used
    assert bool((q.abs().amax(dim=1) == 7).all())  # each row's absmax hits the last code


def test_affine_params_hand_example():
    scale, zp = affine_params(torch.tensor(-1.0), torch.tensor(3.0), n_bits=2)
    assert scale.item() == pytest.approx(4.0 / 3)
    assert zp.item() == 1.0  # round(0 - (-1) / (4/3)) = round(0.75)


def test_affine_params_stretch_range_to_zero_and_represent_zero(gen):
    lo = torch.rand(10, generator=gen) + 0.1  # all-positive ranges
    hi = lo + torch.rand(10, generator=gen)
    scale, zp = affine_params(lo, hi, n_bits=8)
    assert torch.equal(zp, torch.zeros(10))  # range stretched to [0, hi]
    assert torch.allclose(scale, hi / 255)
    lo2, hi2 = -torch.rand(10, generator=gen) - 0.1, torch.rand(10, generator=gen) + 0.1
    scale2, zp2 = affine_params(lo2, hi2, n_bits=8, signed=True)
    assert bool(((zp2 >= -128) & (zp2 <= 127)).all())
    assert torch.equal(fake_quantize(torch.zeros(10), scale2, zp2, -128, 127), torch.zeros(10))


def test_affine_params_degenerate_and_bad_range():
    scale, zp = affine_params(torch.tensor(0.0), torch.tensor(0.0), n_bits=8)
    assert (scale.item(), zp.item()) == (1.0, 0.0)
    with pytest.raises(ValueError, match="xmin"):
        affine_params(torch.tensor(1.0), torch.tensor(0.0))


def _gptq_find_params(x: torch.Tensor, n_bits: int, sym: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Independent re-statement of GPTQ's Quantizer.find_params (per row), written with Python floats."""
    maxq = 2**n_bits - 1
    scales, zeros = [], []
    for row in x.tolist():
        xmin, xmax = min(min(row), 0.0), max(max(row), 0.0)
        if sym:
            xmax = max(abs(xmin), xmax)
            if xmin < 0:
                xmin = -xmax
        if xmin == 0 and xmax == 0:
            xmin, xmax = -1.0, 1.0
        s = torch.tensor(xmax, dtype=torch.float32) - torch.tensor(xmin, dtype=torch.float32)
        s = s / maxq
        if sym:
            z = torch.full((), (maxq + 1) / 2)
        else:
            z = torch.round(-torch.tensor(xmin, dtype=torch.float32) / s)
        scales.append(s)
        zeros.append(z)
    return torch.stack(scales).unsqueeze(1), torch.stack(zeros).unsqueeze(1)


@pytest.mark.parametrize("sym", [False, True])
def test_minmax_params_match_gptq_reference(gen, sym):
    x = torch.randn(12, 20, generator=gen)
    x[3] = 0.0  # dead row
    x[4] = x[4].abs() + 0.1  # all positive
    x[5] = -x[5].abs() - 0.1  # all negative
    scale, zp = minmax_params(x, 4, symmetric=sym)
    ref_scale, ref_zp = _gptq_find_params(x, 4, sym)
    assert torch.equal(scale, ref_scale)
    assert torch.equal(zp, ref_zp)


def test_minmax_symmetric_grid_is_minus8s_to_7s():
    x = torch.tensor([[-1.6, 0.3, 1.6]])
    scale, zp = minmax_params(x, 4, symmetric=True)
    assert zp.item() == 8.0
    s = scale.item()
    assert s == pytest.approx(3.2 / 15)
    out = minmax_fake_quantize(torch.tensor([[-100.0, 100.0]]), scale, zp, 4)
    assert out.flatten().tolist() == pytest.approx([-8 * s, 7 * s])


def test_minmax_asymmetric_zero_point_is_round_of_minus_min_over_scale():
    x = torch.tensor([[-1.0, 2.0], [-0.3, 0.2]])
    scale, zp = minmax_params(x, 2)
    assert scale.flatten().tolist() == pytest.approx([1.0, 0.5 / 3])
    assert zp.flatten().tolist() == [1.0, 2.0]  # round(1.0), round(0.3 / (0.5/3)) = round(1.8)


def test_minmax_all_zero_row_gets_range_minus1_to_1():
    scale, zp = minmax_params(torch.zeros(1, 4), 4)
    assert scale.item() == pytest.approx(2.0 / 15)
    # round(-(-1) / scale) with float32 scale = fl(2/15) = 0.13333334 > 2/15: 1 / scale = 7.4999996 -> 7
    assert scale.item() > 2.0 / 15
    assert zp.item() == 7.0
    scale_s, zp_s = minmax_params(torch.zeros(1, 4), 4, symmetric=True)
    assert (scale_s.item(), zp_s.item()) == (pytest.approx(2.0 / 15), 8.0)


def test_minmax_all_positive_row_symmetric_keeps_xmin_zero():
    scale, zp = minmax_params(torch.tensor([[0.5, 3.0]]), 4, symmetric=True)
    assert scale.item() == pytest.approx(3.0 / 15)  # (xmax - 0) / 15, not 2 * xmax / 15
    assert zp.item() == 8.0


def test_minmax_params_bad_inputs():
    with pytest.raises(ValueError, match="x"):
        minmax_params(torch.zeros(4), 4)
    with pytest.raises(TypeError, match="x"):
        minmax_params(torch.zeros(2, 2, dtype=torch.int32), 4)
    with pytest.raises(ValueError, match="n_bits"):
        minmax_params(torch.zeros(2, 2), 0)


# -----------------------------------------------------------------------------
# Straight-through estimator


def test_ste_forward_equals_fake_quantize_and_gradient_is_1_inside_0_outside():
    x = torch.tensor([-3.0, -0.8, 0.0, 0.26, 0.7, 0.75, 2.0], requires_grad=True)
    y = fake_quantize_ste(x, 0.25, 0.0, -4, 3)  # representable range [-1.0, 0.75]
    assert torch.equal(y.detach(), fake_quantize(x.detach(), 0.25, 0.0, -4, 3))
    y.sum().backward()
    assert x.grad.tolist() == [0.0, 1.0, 1.0, 1.0, 1.0, 1.0, 0.0]


def test_ste_with_per_row_params_and_zero_point():
    x = torch.tensor([[0.0, 1.0, 5.0], [-2.0, 0.1, 0.2]], requires_grad=True)
    scale = torch.tensor([[0.5], [0.1]])
    zp = torch.tensor([[2.0], [0.0]])
    y = fake_quantize_ste(x, scale, zp, 0, 7)  # rows: [-1.0, 2.5] and [0.0, 0.7]
    y.sum().backward()
    assert x.grad.tolist() == [[1.0, 1.0, 0.0], [0.0, 1.0, 1.0]]
