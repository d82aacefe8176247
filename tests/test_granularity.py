"""Tests for quantlab.granularity: per-tensor / per-channel / per-group weights, per-token activations."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from quantlab.granularity import (
    compute_params,
    dequantize_weight,
    expand_params,
    fake_quantize_per_token,
    fake_quantize_weight,
    group_view,
    params_from_range,
    per_token_params,
    quantize_weight,
    scheme_qrange,
)
from quantlab.uniform import absmax_params, fake_quantize, minmax_params, qrange

EPS32 = torch.finfo(torch.float32).eps
SCHEMES = ["absmax", "affine", "minmax"]


@st.composite
def grouped_weights(draw):
    """A float32 weight (out, n_groups * group_size) and its group size."""
    out = draw(st.integers(1, 4))
    group_size = draw(st.sampled_from([1, 2, 4, 8]))
    n_groups = draw(st.integers(1, 4))
    w = draw(
        arrays(
            np.float32,
            (out, n_groups * group_size),
            elements=st.floats(-50, 50, width=32, allow_subnormal=False),
        )
    )
    return torch.from_numpy(w), group_size


# -----------------------------------------------------------------------------
# Shapes


def test_param_shapes_for_every_granularity(weight):
    out, in_features = weight.shape
    for scheme in SCHEMES:
        s, z = compute_params(weight, 4, "tensor", scheme=scheme)
        assert s.shape == z.shape == (1, 1)
        s, z = compute_params(weight, 4, "channel", scheme=scheme)
        assert s.shape == z.shape == (out, 1)
        s, z = compute_params(weight, 4, "group", 16, scheme=scheme)
        assert s.shape == z.shape == (out, in_features // 16)
        codes, s, z = quantize_weight(weight, 4, "group", 16, scheme=scheme)
        assert codes.shape == weight.shape and s.shape == (out, 4)
        assert fake_quantize_weight(weight, 4, "group", 16, scheme=scheme).shape == weight.shape


def test_group_view_shapes_and_is_a_view(weight):
    assert group_view(weight, "tensor").shape == (1, 1, weight.numel())
    assert group_view(weight, "channel").shape == (8, 1, 64)
    view = group_view(weight, "group", 16)
    assert view.shape == (8, 4, 16)
    assert view.data_ptr() == weight.data_ptr()
    assert torch.equal(view[1, 2], weight[1, 32:48])  # group g of row r = columns g*gs .. (g+1)*gs


def test_codes_dtype_follows_the_code_range(weight):
    assert quantize_weight(weight, 4, scheme="minmax")[0].dtype == torch.uint8
    assert quantize_weight(weight, 8, scheme="absmax")[0].dtype == torch.int8
    assert quantize_weight(weight, 12, scheme="affine")[0].dtype == torch.int32


# -----------------------------------------------------------------------------
# Agreement with quantlab.uniform


def test_per_tensor_and_per_channel_match_uniform(weight):
    s, z = compute_params(weight, 4, "tensor", scheme="minmax")
    ref_s, ref_z = minmax_params(weight.reshape(1, -1), 4)
    assert torch.equal(s, ref_s) and torch.equal(z, ref_z)
    s, z = compute_params(weight, 4, "channel", scheme="minmax", symmetric=True)
    ref_s, ref_z = minmax_params(weight, 4, symmetric=True)
    assert torch.equal(s, ref_s) and torch.equal(z, ref_z)
    s, _ = compute_params(weight, 8, "tensor", scheme="absmax")
    assert torch.equal(s.reshape(()), absmax_params(weight, 8, dim=None)[0])
    s, _ = compute_params(weight, 8, "channel", scheme="absmax")
    assert torch.equal(s, absmax_params(weight, 8, dim=-1)[0])


@pytest.mark.parametrize("scheme", SCHEMES)
def test_group_params_equal_uniform_params_on_each_group_slice(weight, scheme):
    s, z = compute_params(weight, 3, "group", 16, scheme=scheme)
    for g in range(4):
        block = weight[:, 16 * g : 16 * (g + 1)]  # (out, group_size)
        ref_s, ref_z = compute_params(block, 3, "channel", scheme=scheme)
        assert torch.equal(s[:, g : g + 1], ref_s) and torch.equal(z[:, g : g + 1], ref_z)
    if scheme == "minmax":
        ref_s, ref_z = minmax_params(weight[:, 16:32], 3)
        assert torch.equal(s[:, 1:2], ref_s) and torch.equal(z[:, 1:2], ref_z)


@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("granularity,group_size", [("tensor", None), ("channel", None), ("group", 8)])
def test_fake_quantize_weight_equals_uniform_fake_quantize(weight, scheme, granularity, group_size):
    s, z = compute_params(weight, 4, granularity, group_size, scheme=scheme)
    qmin, qmax = scheme_qrange(scheme, 4)
    wg = group_view(weight, granularity, group_size)
    ref = fake_quantize(wg, s.unsqueeze(-1), z.unsqueeze(-1), qmin, qmax).reshape(weight.shape)
    assert torch.equal(fake_quantize_weight(weight, 4, granularity, group_size, scheme=scheme), ref)


@pytest.mark.parametrize("scheme", SCHEMES)
def test_quantize_then_dequantize_equals_fake_quantize(weight, scheme):
    for granularity, group_size in [("group", 16), ("tensor", None), ("channel", None)]:
        codes, s, z = quantize_weight(weight, 4, granularity, group_size, scheme=scheme)
        fake = fake_quantize_weight(weight, 4, granularity, group_size, scheme=scheme)
        assert torch.equal(dequantize_weight(codes, s, z), fake)


def test_expand_params_repeats_each_group(weight):
    s, _ = compute_params(weight, 4, "group", 16)
    full = expand_params(s, weight.shape)
    assert full.shape == weight.shape
    assert torch.equal(full[:, 16:32], s[:, 1:2].expand(8, 16))
    with pytest.raises(ValueError, match="params"):
        expand_params(s, (8, 62))


# -----------------------------------------------------------------------------
# Hand-computed examples


def test_hand_example_per_group_minmax():
    w = torch.tensor([[0.1, 0.4, -1.0, 2.0]])
    codes, s, z = quantize_weight(w, 2, "group", 2)
    # group 0: range [0, 0.4] -> s = 0.4/3, z = 0; group 1: range [-1, 2] -> s = 1, z = 1
    assert s.tolist() == [[pytest.approx(0.4 / 3), 1.0]]
    assert z.tolist() == [[0.0, 1.0]]
    assert codes.tolist() == [[1, 3, 0, 3]]  # round(0.75) = 1, round(3) = 3; -1 + 1 = 0, 2 + 1 = 3


def test_hand_example_per_channel_absmax():
    w = torch.tensor([[1.0, -0.5, 0.2], [0.0, 0.0, 0.0]])
    codes, s, z = quantize_weight(w, 3, "channel", scheme="absmax")  # grid [-3, 3]
    assert s.flatten().tolist() == [pytest.approx(1 / 3), 1.0]  # an all-zero row gets scale 1
    assert codes.tolist() == [[3, -2, 1], [0, 0, 0]]  # -1.5 -> -2 (half to even), 0.6 -> 1


def test_hand_example_per_token():
    x = torch.tensor([[[0.2, -1.0], [3.0, 1.4]]])  # (batch=1, tokens=2, features=2)
    s, z = per_token_params(x, 2)
    assert s.shape == (1, 2, 1)
    assert s.flatten().tolist() == [1.0, 3.0]
    assert fake_quantize_per_token(x, 2).tolist() == [[[0.0, -1.0], [3.0, 0.0]]]


def test_params_from_range_hand_example():
    s, z = params_from_range(torch.tensor([-1.0, 0.0]), torch.tensor([2.0, 0.0]), 2, "minmax")
    assert s.tolist() == [1.0, pytest.approx(2 / 3)]  # an empty range becomes [-1, 1] (GPTQ)
    assert z.tolist() == [1.0, 2.0]  # round(1.0), round(1 / (2/3)) = round(1.5) = 2
    with pytest.raises(ValueError, match="xmin"):
        params_from_range(torch.tensor(1.0), torch.tensor(0.0), 4)


# -----------------------------------------------------------------------------
# Properties


@settings(max_examples=30, deadline=None)
@given(grouped_weights(), st.sampled_from(SCHEMES), st.integers(2, 8))
def test_group_of_whole_row_equals_per_channel(wg, scheme, n_bits):
    w, _ = wg
    in_features = w.shape[1]
    per_group = compute_params(w, n_bits, "group", in_features, scheme=scheme)
    per_channel = compute_params(w, n_bits, "channel", scheme=scheme)
    assert torch.equal(per_group[0], per_channel[0]) and torch.equal(per_group[1], per_channel[1])
    assert torch.equal(
        fake_quantize_weight(w, n_bits, "group", in_features, scheme=scheme),
        fake_quantize_weight(w, n_bits, "channel", scheme=scheme),
    )


@settings(max_examples=30, deadline=None)
@given(grouped_weights(), st.sampled_from(["absmax", "affine", "minmax"]), st.integers(2, 8))
def test_round_trip_error_at_most_half_a_step(wg, scheme, n_bits):
    w, group_size = wg
    s, _ = compute_params(w, n_bits, "group", group_size, scheme=scheme)
    err = (fake_quantize_weight(w, n_bits, "group", group_size, scheme=scheme) - w).abs()
    half_step = expand_params(s, w.shape) / 2
    # asymmetric ranges are stretched to contain 0 and the integer zero-point shifts the grid by at most
    # half a step at one end, so every value stays inside the grid's range: error <= s/2 (+ float rounding)
    assert bool((err <= half_step * (1 + 8 * EPS32) + 8 * EPS32 * w.abs()).all())


@settings(max_examples=30, deadline=None)
@given(grouped_weights(), st.sampled_from(SCHEMES), st.integers(2, 8))
def test_fake_quantize_is_idempotent(wg, scheme, n_bits):
    # (GPTQ's symmetric min-max is left out on purpose: an all-positive group keeps xmin = 0 with the
    # zero-point at 2^(b-1), so its top values clip and re-quantizing shrinks the range again)
    w, group_size = wg
    symmetric = None
    once = fake_quantize_weight(w, n_bits, "group", group_size, scheme=scheme, symmetric=symmetric)
    twice = fake_quantize_weight(once, n_bits, "group", group_size, scheme=scheme, symmetric=symmetric)
    # the parameters are recomputed from `once`; they can differ from the first ones in the last bit
    # only, which moves grid points by a few ulps and never changes a code
    torch.testing.assert_close(twice, once, rtol=8 * EPS32, atol=0.0)


@settings(max_examples=30, deadline=None)
@given(grouped_weights(), st.sampled_from(SCHEMES), st.integers(2, 8), st.booleans())
def test_codes_in_range_and_monotone_within_a_group(wg, scheme, n_bits, sym):
    w, group_size = wg
    symmetric = sym if scheme == "minmax" else None
    w = w.reshape(w.shape[0], -1, group_size).sort(dim=-1).values.reshape(w.shape)  # sorted in each group
    codes, _, _ = quantize_weight(w, n_bits, "group", group_size, scheme=scheme, symmetric=symmetric)
    qmin, qmax = scheme_qrange(scheme, n_bits)
    c = codes.to(torch.int64)
    assert bool(((c >= qmin) & (c <= qmax)).all())
    cg = c.reshape(w.shape[0], -1, group_size)
    assert bool((cg[..., 1:] >= cg[..., :-1]).all())
    fq = fake_quantize_weight(w, n_bits, "group", group_size, scheme=scheme, symmetric=symmetric)
    fg = fq.reshape(w.shape[0], -1, group_size)
    assert bool((fg[..., 1:] >= fg[..., :-1]).all())


def test_smaller_groups_never_increase_the_error(gen):
    w = torch.randn(32, 256, generator=gen)
    errors = [
        (fake_quantize_weight(w, 4, "tensor", scheme="absmax") - w).pow(2).mean(),
        (fake_quantize_weight(w, 4, "channel", scheme="absmax") - w).pow(2).mean(),
        (fake_quantize_weight(w, 4, "group", 128, scheme="absmax") - w).pow(2).mean(),
        (fake_quantize_weight(w, 4, "group", 32, scheme="absmax") - w).pow(2).mean(),
    ]
    assert errors == sorted(errors, reverse=True)


def test_per_token_matches_absmax_params_per_row(gen):
    x = torch.randn(2, 5, 16, generator=gen)
    s, z = per_token_params(x, 8)
    ref_s, _ = absmax_params(x, 8, dim=-1)
    assert torch.equal(s, ref_s) and bool((z == 0).all())
    qmin, qmax = qrange(8, restricted=True)
    assert torch.equal(fake_quantize_per_token(x, 8), fake_quantize(x, ref_s, 0.0, qmin, qmax))
    y = fake_quantize_per_token(x, 8, scheme="affine")
    assert y.shape == x.shape
    assert (y - x).abs().max() <= ((x.amax(-1) - x.amin(-1)) / 255).max() * 0.5 * (1 + 1e-5)


def test_minmax_symmetric_all_positive_group_clips_gptq_quirk():
    w = torch.tensor([[1.0, 0.5]])
    once = fake_quantize_weight(w, 2, scheme="minmax", symmetric=True)  # s = 1/3, z = 2: grid [-2/3, 1/3]
    assert once.tolist() == [[pytest.approx(1 / 3), pytest.approx(1 / 3)]]


def test_stochastic_rounding_is_reproducible(weight):
    a = fake_quantize_weight(weight, 4, rounding="stochastic", generator=torch.Generator().manual_seed(3))
    b = fake_quantize_weight(weight, 4, rounding="stochastic", generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b)
    assert not torch.equal(a, fake_quantize_weight(weight, 4))


# -----------------------------------------------------------------------------
# Bad input


@pytest.mark.parametrize("bad", [0, 17])
def test_bad_n_bits_value(weight, bad):
    with pytest.raises(ValueError, match="n_bits"):
        compute_params(weight, bad)


def test_bad_n_bits_type(weight):
    with pytest.raises(TypeError, match="n_bits"):
        fake_quantize_weight(weight, 4.0)
    with pytest.raises(ValueError, match="n_bits"):
        compute_params(weight, 1, scheme="absmax")  # the restricted grid needs 2 bits


def test_bad_group_size(weight):
    with pytest.raises(ValueError, match="group_size"):
        compute_params(weight, 4, "group", 10)
    with pytest.raises(ValueError, match="group_size"):
        compute_params(weight, 4, "group", 0)
    with pytest.raises(ValueError, match="group_size"):
        compute_params(weight, 4, "group")
    with pytest.raises(ValueError, match="group_size"):
        compute_params(weight, 4, "channel", 16)
    with pytest.raises(TypeError, match="group_size"):
        compute_params(weight, 4, "group", 16.0)


def test_bad_granularity_scheme_symmetric(weight):
    with pytest.raises(ValueError, match="granularity"):
        compute_params(weight, 4, "row")
    with pytest.raises(ValueError, match="scheme"):
        compute_params(weight, 4, scheme="percentile")
    with pytest.raises(ValueError, match="symmetric"):
        compute_params(weight, 4, scheme="absmax", symmetric=False)
    with pytest.raises(ValueError, match="symmetric"):
        compute_params(weight, 4, scheme="affine", symmetric=True)


def test_bad_tensors():
    with pytest.raises(ValueError, match="w"):
        compute_params(torch.empty(0, 4), 4)
    with pytest.raises(ValueError, match="w"):
        compute_params(torch.zeros(8), 4)
    with pytest.raises(TypeError, match="w"):
        fake_quantize_weight(torch.zeros(2, 4, dtype=torch.int64), 4)
    w = torch.zeros(2, 4)
    w[1, 2] = float("nan")
    with pytest.raises(ValueError, match="w contains NaN or Inf"):
        fake_quantize_weight(w, 4, "group", 2)
    w[1, 2] = float("-inf")
    with pytest.raises(ValueError, match="w contains NaN or Inf"):
        quantize_weight(w, 4)
    with pytest.raises(ValueError, match="x contains NaN or Inf"):
        fake_quantize_per_token(torch.tensor([[1.0, float("inf")]]), 8)
    with pytest.raises(TypeError, match="x"):
        per_token_params(torch.ones(2, 3, dtype=torch.int32), 8)
    with pytest.raises(ValueError, match="x"):
        per_token_params(torch.empty(0, 3), 8)


def test_bad_dequantize_shapes():
    with pytest.raises(TypeError, match="codes"):
        dequantize_weight([[1, 2]], torch.ones(1, 1), torch.zeros(1, 1))
    with pytest.raises(ValueError, match="codes"):
        dequantize_weight(torch.zeros(4, dtype=torch.uint8), torch.ones(1, 1), torch.zeros(1, 1))
    with pytest.raises(ValueError, match="scale"):
        dequantize_weight(torch.zeros(2, 6, dtype=torch.uint8), torch.ones(2, 4), torch.zeros(2, 4))
    with pytest.raises(ValueError, match="zero_point"):
        dequantize_weight(torch.zeros(2, 6, dtype=torch.uint8), torch.ones(2, 3), torch.zeros(2, 1))
