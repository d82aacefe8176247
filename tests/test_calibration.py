"""Tests for quantlab.calibration: range estimators, observers, MSE clipping, static vs dynamic scales."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from quantlab.calibration import (
    MinMaxObserver,
    StaticActivationQuantizer,
    fake_quantize_dynamic,
    fake_quantize_static,
    minmax_range,
    mse_clip_search,
    percentile_range,
    quantile,
)
from quantlab.granularity import fake_quantize_per_token, params_from_range
from quantlab.uniform import absmax_params

# -----------------------------------------------------------------------------
# min-max, quantile, percentile


def test_minmax_range_per_tensor_and_per_axis():
    x = torch.tensor([[1.0, -3.0, 2.0], [0.5, 4.0, -1.0]])
    lo, hi = minmax_range(x)
    assert (lo.item(), hi.item()) == (-3.0, 4.0) and lo.shape == ()
    lo, hi = minmax_range(x, axis=0)
    assert lo.tolist() == [-3.0, -1.0] and hi.tolist() == [2.0, 4.0]
    lo, hi = minmax_range(x, axis=-1)
    assert lo.tolist() == [0.5, -3.0, -1.0] and hi.tolist() == [1.0, 4.0, 2.0]


@settings(max_examples=30, deadline=None)
@given(
    arrays(np.float32, st.integers(1, 50), elements=st.floats(-1e3, 1e3, width=32)),
    st.floats(0.0, 1.0),
)
def test_quantile_matches_numpy_linear_interpolation(xs, q):
    got = quantile(torch.from_numpy(xs), q).item()
    want = float(np.quantile(xs.astype(np.float64), q))
    assert got == pytest.approx(want, rel=1e-5, abs=1e-4)


def test_quantile_per_axis_and_hand_values():
    x = torch.tensor([[0.0, 1.0, 2.0, 10.0], [4.0, 3.0, 2.0, 1.0]])
    assert quantile(x, 0.5, axis=0).tolist() == [1.5, 2.5]
    assert quantile(x[0], 0.0).item() == 0.0 and quantile(x[0], 1.0).item() == 10.0
    assert quantile(x[0], 0.75).item() == pytest.approx(4.0)  # position 2.25: 2 + 0.25 * (10 - 2)


def test_percentile_range(gen):
    x = torch.arange(101.0)
    lo, hi = percentile_range(x, 90.0)
    assert (lo.item(), hi.item()) == (10.0, 90.0)
    assert [t.item() for t in percentile_range(x, 100.0)] == [0.0, 100.0]
    lo, hi = percentile_range(x - 50.0, 90.0, symmetric=True)
    assert (lo.item(), hi.item()) == (-45.0, 45.0)
    y = torch.randn(10_000, generator=gen)
    y[0] = 100.0  # one outlier barely moves the 99.9th percentile
    assert percentile_range(y, 99.9)[1].item() < 5.0 < minmax_range(y)[1].item()


def test_range_estimators_bad_input():
    with pytest.raises(TypeError, match="x"):
        minmax_range(torch.arange(4))
    with pytest.raises(ValueError, match="x"):
        minmax_range(torch.tensor([1.0, float("nan")]))
    with pytest.raises(ValueError, match="x"):
        percentile_range(torch.empty(0))
    with pytest.raises(ValueError, match="axis"):
        minmax_range(torch.zeros(2, 3), axis=2)
    with pytest.raises(ValueError, match="percentile"):
        percentile_range(torch.zeros(3), 20.0)
    with pytest.raises(ValueError, match="q"):
        quantile(torch.zeros(3), 1.5)


# -----------------------------------------------------------------------------
# Observer


def test_running_minmax_observer_equals_minmax_of_everything(gen):
    obs = MinMaxObserver(axis=-1)
    batches = [torch.randn(4, 6, generator=gen) * (i + 1) for i in range(5)]
    for b in batches:
        obs.update(b)
    lo, hi = obs.range()
    ref_lo, ref_hi = minmax_range(torch.cat(batches), axis=-1)
    assert torch.equal(lo, ref_lo) and torch.equal(hi, ref_hi)
    assert obs.n_updates == 5


def test_ema_observer_hand_values():
    obs = MinMaxObserver(averaging_constant=0.25)
    obs.update(torch.tensor([-4.0, 4.0]))  # initialises the range: [-4, 4]
    obs.update(torch.tensor([0.0, 8.0]))  # min: -4 + 0.25 * (0 + 4) = -3; max: 4 + 0.25 * (8 - 4) = 5
    assert [t.item() for t in obs.range()] == [-3.0, 5.0]
    obs.update(torch.tensor([-3.0, 1.0]))  # min stays -3; max: 5 + 0.25 * (1 - 5) = 4
    assert [t.item() for t in obs.range()] == [-3.0, 4.0]
    obs.reset()
    with pytest.raises(RuntimeError, match="update"):
        obs.range()


def test_observer_bad_input():
    with pytest.raises(ValueError, match="averaging_constant"):
        MinMaxObserver(averaging_constant=1.5)
    with pytest.raises(ValueError, match="averaging_constant"):
        MinMaxObserver(averaging_constant=0.0)
    with pytest.raises(TypeError, match="axis"):
        MinMaxObserver(axis=1.0)
    obs = MinMaxObserver(axis=-1)
    obs.update(torch.zeros(2, 3))
    with pytest.raises(ValueError, match="shape"):
        obs.update(torch.zeros(2, 4))
    with pytest.raises(TypeError, match="x"):
        obs.update(torch.zeros(2, 3, dtype=torch.int64))


# -----------------------------------------------------------------------------
# MSE-optimal clipping


def test_mse_clip_search_hand_example():
    x = torch.tensor([0.1, 0.2, -0.15, 0.05, 4.0])
    res = mse_clip_search(x, 2, ratios=torch.tensor([0.05, 1.0]))
    # ratio 1: s = 4, the four small values round to 0: mean((0.01, 0.04, 0.0225, 0.0025, 0)) = 0.015
    # ratio 0.05: s = 0.2, 4.0 clips to 0.2: error dominated by 3.8^2 / 5 = 2.888
    assert res.errors.tolist() == [pytest.approx(2.8910, abs=1e-4), pytest.approx(0.015)]
    assert res.best_ratio.item() == 1.0
    assert (res.xmin.item(), res.xmax.item()) == (pytest.approx(-0.15), 4.0)


def test_mse_clip_search_clips_a_gaussian(gen):
    x = torch.randn(4096, generator=gen)
    res = mse_clip_search(x, 3)
    assert res.errors.shape == res.ratios.shape == (100,)
    best = int(res.errors.argmin())
    assert res.best_ratio.item() == pytest.approx(res.ratios[best].item())
    assert 0.3 < res.best_ratio.item() < 0.9  # clipping the tails pays off at 3 bits
    assert res.errors[best] <= res.errors[-1]  # never worse than plain min-max (ratio 1)
    # the recorded error at the best ratio is the error of fake-quantizing with the returned range
    s, z = params_from_range(res.xmin, res.xmax, 3, "absmax")
    xq = s * torch.clamp(torch.round(x / s) + z, -3, 3)
    assert (xq - x).pow(2).mean().item() == pytest.approx(res.errors[best].item(), rel=1e-5)


def test_mse_clip_search_per_row(gen):
    w = torch.randn(4, 512, generator=gen)
    w[1] *= 0.01
    w[2, 0] = 30.0  # an outlier row
    res = mse_clip_search(w, 4, scheme="minmax", axis=0, ratios=torch.linspace(0.1, 1.0, 19))
    assert res.best_ratio.shape == (4,) and res.errors.shape == (19, 4)
    for r in range(4):
        alone = mse_clip_search(w[r], 4, scheme="minmax", ratios=torch.linspace(0.1, 1.0, 19))
        assert res.best_ratio[r].item() == pytest.approx(alone.best_ratio.item())
    best = res.errors.min(dim=0).values  # (4,)
    assert bool((best <= res.errors[-1]).all())  # no row is worse than its plain min-max range


def test_mse_clip_search_bad_input():
    x = torch.randn(8)
    with pytest.raises(ValueError, match="ratios"):
        mse_clip_search(x, 4, ratios=torch.tensor([0.0, 1.0]))
    with pytest.raises(ValueError, match="ratios"):
        mse_clip_search(x, 4, ratios=torch.tensor([]))
    with pytest.raises(ValueError, match="n_bits"):
        mse_clip_search(x, 0)
    with pytest.raises(ValueError, match="norm"):
        mse_clip_search(x, 4, norm=-1.0)


# -----------------------------------------------------------------------------
# Static vs dynamic activation scales


def test_static_scale_clips_a_new_outlier_dynamic_does_not(gen):
    calib = [torch.randn(16, 32, generator=gen) for _ in range(4)]
    q = StaticActivationQuantizer(n_bits=8)
    for batch in calib:
        q.observe(batch)
    q.freeze()
    amax = torch.cat(calib).abs().max()
    assert q.scale.item() == pytest.approx(amax.item() / 127)
    x = torch.randn(4, 32, generator=gen)
    x[0, 0] = 10 * amax  # larger than anything seen in calibration
    static = q(x)
    assert static[0, 0].item() == pytest.approx(amax.item())  # clipped to the calibrated range
    dynamic = fake_quantize_dynamic(x, 8)
    assert torch.equal(dynamic, fake_quantize_per_token(x, 8))
    assert dynamic[0, 0].item() == pytest.approx(x[0, 0].item())
    # rows without the outlier: the dynamic per-token scale is finer than the static one
    assert (dynamic[1:] - x[1:]).abs().max() <= (static[1:] - x[1:]).abs().max()


def test_static_quantizer_percentile_and_per_feature(gen):
    calib = torch.randn(64, 8, generator=gen)
    q = StaticActivationQuantizer(n_bits=8, axis=-1, percentile=99.0)
    q.observe(calib)
    q.freeze()
    lo, hi = percentile_range(calib, 99.0, axis=-1)
    ref_s, _ = params_from_range(lo, hi, 8, "absmax")
    assert q.scale.shape == (8,) and torch.equal(q.scale, ref_s)


def test_fake_quantize_static_hand_example():
    out = fake_quantize_static(torch.tensor([0.5, 3.0, -3.0]), 1.0 / 127, 0.0, 8)
    assert out.tolist() == [pytest.approx(64 / 127), pytest.approx(1.0), pytest.approx(-1.0)]
    s, z = absmax_params(torch.tensor([2.0]), 8, dim=None)
    assert fake_quantize_static(torch.tensor([2.0]), s, z, 8).item() == pytest.approx(2.0)


def test_static_quantizer_misuse():
    q = StaticActivationQuantizer()
    with pytest.raises(RuntimeError, match="freeze"):
        q(torch.zeros(2))
    with pytest.raises(RuntimeError, match="update"):
        q.freeze()
    with pytest.raises(ValueError, match="axis"):
        StaticActivationQuantizer(axis=0)
    with pytest.raises(ValueError, match="scale"):
        fake_quantize_static(torch.zeros(2), 0.0, 0.0, 8)
    with pytest.raises(ValueError, match="scheme"):
        StaticActivationQuantizer(scheme="mse")
