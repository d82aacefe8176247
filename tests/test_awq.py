"""Tests for quantlab.awq: the quantizer, the scale and clip searches, apply_scale, ablations, the driver."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from quantlab.awq import (
    LLAMA_ADAPTER,
    TINY_GPT_ADAPTER,
    AWQModelResult,
    BlockAdapter,
    ScaledActivation,
    ScaleGroup,
    activation_stat,
    apply_awq_results,
    apply_clip,
    apply_scale,
    awq_quantize,
    awq_quantize_model,
    output_mse,
    pseudo_quantize_blocks,
    quantize_keep_channels_fp,
    quantize_with_scales,
    random_channels,
    ratio_scales,
    salient_channels,
    scale_channels_fixed,
    search_block_scales,
    search_clip,
    search_scales,
)
from quantlab.uniform import minmax_params

F32_EPS = torch.finfo(torch.float32).eps
F64_EPS = torch.finfo(torch.float64).eps


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # These tensors are small: on a shared, loaded CPU, intra-op threads only add spin-wait overhead
    # (about 10 s instead of 90 s for this file). Restored afterwards for the other test modules.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def heavy_tailed_layer(
    out_f: int = 128, in_f: int = 256, tokens: int = 512, n_outliers: int = 3, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A linear layer whose inputs have a few channels with ~30x larger magnitude (as in LLMs)."""
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(out_f, in_f, generator=g) * 0.05
    channel_scale = torch.exp(0.3 * torch.randn(in_f, generator=g))  # (in,) mildly varying
    outliers = torch.randperm(in_f, generator=g)[:n_outliers]
    channel_scale[outliers] = 30.0
    X = torch.randn(tokens, in_f, generator=g) * channel_scale
    return W, X, outliers


# -----------------------------------------------------------------------------
# The quantizer


def test_awq_quantizer_range_excludes_zero_worked_example():
    # Group [1, 2] at 2 bits: scale = 1/3, zero = clamp(-round(3), 0, 3) = 0, codes clamp([3, 6]) = [3, 3].
    w = torch.tensor([[1.0, 2.0]])
    w_q, scale, zero = awq_quantize(w, n_bits=2, group_size=2, return_params=True)
    assert torch.equal(w_q, torch.tensor([[1.0, 1.0]]))
    assert scale.item() == pytest.approx(1 / 3) and zero.item() == 0
    # GPTQ's min-max quantizer stretches the range to [0, 2] instead: a different scale.
    gptq_scale, _ = minmax_params(w, n_bits=2)
    assert gptq_scale.item() == pytest.approx(2 / 3)


@settings(max_examples=40, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    n_bits=st.integers(2, 8),
    out_f=st.integers(1, 6),
    n_groups=st.integers(1, 4),
    group_size=st.sampled_from([2, 8, 32]),
)
def test_awq_quantize_error_within_half_step_when_range_contains_zero(
    seed, n_bits, out_f, n_groups, group_size
):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out_f, n_groups * group_size, generator=g)
    w[:, ::group_size] = -w[:, 1::group_size].abs() - 0.1  # every group has a negative ...
    w[:, 1::group_size] = w[:, 1::group_size].abs() + 0.1  # ... and a positive entry
    w_q, scale, zero = awq_quantize(w, n_bits, group_size, return_params=True)
    assert scale.shape == zero.shape == (out_f, n_groups)
    step = scale.repeat_interleave(group_size, dim=1)  # (out, in)
    assert bool(((w - w_q).abs() <= step / 2 * (1 + 8 * F32_EPS) + 8 * F32_EPS * w.abs()).all())
    codes = w_q / step + zero.repeat_interleave(group_size, dim=1)
    assert bool(((codes - codes.round()).abs() < 1e-3).all())
    assert codes.round().min() >= 0 and codes.round().max() <= 2**n_bits - 1


def test_awq_quantize_symmetric_branch():
    w = torch.tensor([[0.7, -1.4, 0.2, 0.0]])
    w_q, scale, zero = awq_quantize(w, n_bits=4, group_size=4, zero_point=False, return_params=True)
    assert scale.item() == pytest.approx(1.4 / 7) and zero.item() == 0
    codes = w_q / scale
    assert torch.allclose(codes, codes.round(), atol=1e-5)
    assert bool(((w - w_q).abs() <= scale / 2 + 1e-6).all())


def test_awq_quantize_group_size_none_is_one_group_per_row_and_zero_group_stays_zero():
    w = torch.randn(4, 16, generator=torch.Generator().manual_seed(1))
    assert torch.equal(awq_quantize(w, 4, None), awq_quantize(w, 4, 16))
    assert torch.equal(awq_quantize(w, 4, -1), awq_quantize(w, 4, 16))
    zeros = torch.zeros(2, 8)
    assert torch.equal(awq_quantize(zeros, 4, 4), zeros)  # the 1e-5 floor on the range avoids 0/0


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), n_bits=st.integers(2, 8), power=st.integers(-3, 3))
def test_quantize_with_unit_or_power_of_two_scales_is_plain_quantization(seed, n_bits, power):
    W = torch.randn(8, 64, generator=torch.Generator().manual_seed(seed))
    plain = awq_quantize(W, n_bits, 16)
    assert torch.equal(quantize_with_scales(W, torch.ones(64), n_bits, 16), plain)
    # A power of two scales every group's range, step and codes' pre-images exactly.
    assert torch.equal(quantize_with_scales(W, torch.full((64,), 2.0**power), n_bits, 16), plain)


# -----------------------------------------------------------------------------
# The scale search


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), ratio=st.floats(0.0, 0.95))
def test_ratio_scales_are_normalised(seed, ratio):
    stat = torch.rand(32, generator=torch.Generator().manual_seed(seed)) * 10
    s = ratio_scales(stat, ratio)
    assert (s.max() * s.min()).sqrt().item() == pytest.approx(1.0, abs=4 * F32_EPS)
    assert bool((s > 0).all())


def test_activation_stat_is_mean_abs_per_channel():
    X = torch.randn(3, 5, 7, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(activation_stat(X), X.abs().mean(dim=(0, 1)), rtol=1e-6)


def test_search_scales_picks_first_minimum_and_reports_consistent_history():
    W, X, _ = heavy_tailed_layer()
    bias = torch.randn(W.shape[0], generator=torch.Generator().manual_seed(5))
    res = search_scales(W, X, n_bits=4, group_size=64, n_grid=20, bias=bias)
    assert res.ratios == [i / 20 for i in range(20)]
    assert len(res.loss_history) == 20
    first_min = res.loss_history.index(min(res.loss_history))
    assert res.best_loss == min(res.loss_history)
    assert res.best_ratio == res.ratios[first_min]
    assert torch.equal(res.scales, ratio_scales(activation_stat(X), res.best_ratio))
    # Each loss is the output MSE of Q(W s)/s on the unscaled X, recomputed independently.
    for r, loss in zip(res.ratios[::5], res.loss_history[::5], strict=True):
        W_q = quantize_with_scales(W, ratio_scales(res.stat, r), 4, 64)
        assert loss == pytest.approx(output_mse(W, W_q, X, bias), rel=1e-6)
    assert res.rtn_loss == pytest.approx(output_mse(W, awq_quantize(W, 4, 64), X, bias), rel=1e-6)


def test_search_scales_ties_keep_the_first_ratio():
    # Every channel has the same mean |x|: s = 1 for every ratio, so all losses tie.
    g = torch.Generator().manual_seed(0)
    X = torch.sign(torch.randn(64, 32, generator=g))
    W = torch.randn(16, 32, generator=g)
    res = search_scales(W, X, n_bits=3, group_size=8, n_grid=10)
    assert len(set(res.loss_history)) == 1
    assert res.best_ratio == 0.0 and torch.equal(res.scales, torch.ones(32))


def test_search_block_scales_on_a_single_linear_matches_search_scales_and_restores_weights():
    W, X, _ = heavy_tailed_layer(64, 128, 256)
    lin = nn.Linear(128, 64)
    lin.weight.data = W.clone()
    original = lin.weight.data
    block = search_block_scales([lin], X.reshape(2, 128, 128), lin, n_bits=4, group_size=32)
    single = search_scales(W, X, n_bits=4, group_size=32, bias=lin.bias.data)
    assert block.loss_history == single.loss_history
    assert block.best_ratio == single.best_ratio and torch.equal(block.scales, single.scales)
    assert lin.weight.data_ptr() == original.data_ptr() and torch.equal(lin.weight.data, W)


def test_search_block_scales_restores_weights_when_block_fn_fails():
    lin = nn.Linear(16, 8)
    before = lin.weight.data.clone()
    calls = []

    def flaky(x):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("boom")
        return lin(x)

    with pytest.raises(RuntimeError, match="boom"):
        search_block_scales([lin], torch.randn(32, 16), flaky, group_size=8)
    assert torch.equal(lin.weight.data, before)


def test_awq_beats_rtn_on_heavy_tailed_layer():
    W, X, _ = heavy_tailed_layer()
    res = search_scales(W, X, n_bits=3, group_size=64)
    assert res.best_ratio > 0
    assert res.best_loss < 0.9 * res.rtn_loss


# -----------------------------------------------------------------------------
# apply_scale preserves the function before quantization


def _positive_scales(n: int, seed: int) -> torch.Tensor:
    return torch.exp(torch.randn(n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64))


@pytest.mark.parametrize("norm_cls", [nn.LayerNorm, nn.RMSNorm])
def test_apply_scale_norm_to_linears_preserves_function(norm_cls):
    torch.manual_seed(0)
    norm = norm_cls(24).double()
    with torch.no_grad():
        norm.weight.copy_(torch.randn(24, dtype=torch.float64))
        if getattr(norm, "bias", None) is not None:
            norm.bias.copy_(torch.randn(24, dtype=torch.float64))
    fcs = [nn.Linear(24, n).double() for n in (12, 24, 8)]
    x = torch.randn(5, 7, 24, dtype=torch.float64) * 3
    before = [fc(norm(x)) for fc in fcs]
    apply_scale(norm, fcs, _positive_scales(24, 1))
    for b, fc in zip(before, fcs, strict=True):
        after = fc(norm(x))
        assert torch.allclose(after, b, rtol=0, atol=1e3 * F64_EPS * b.abs().max().item())


def test_apply_scale_linear_to_linear_preserves_function():
    torch.manual_seed(0)
    fc1, fc2 = nn.Linear(16, 32).double(), nn.Linear(32, 8).double()
    x = torch.randn(10, 16, dtype=torch.float64)
    before = fc2(fc1(x))
    apply_scale(fc1, [fc2], _positive_scales(32, 2))
    after = fc2(fc1(x))
    assert torch.allclose(after, before, rtol=0, atol=1e3 * F64_EPS * before.abs().max().item())


def test_apply_scale_scaled_activation_to_linear_preserves_function():
    torch.manual_seed(0)
    act = ScaledActivation(nn.GELU(), torch.ones(32, dtype=torch.float64))
    fc = nn.Linear(32, 8).double()
    x = torch.randn(10, 32, dtype=torch.float64)
    before = fc(act(x))
    apply_scale(act, [fc], _positive_scales(32, 3))
    after = fc(act(x))
    assert torch.allclose(after, before, rtol=0, atol=1e3 * F64_EPS * before.abs().max().item())


def test_apply_scale_bad_input():
    fc1, fc2, fc3 = nn.Linear(8, 8), nn.Linear(8, 4), nn.Linear(8, 4)
    with pytest.raises(ValueError, match="exactly one linear"):
        apply_scale(fc1, [fc2, fc3], torch.ones(8))
    with pytest.raises(ValueError, match="in_features"):
        apply_scale(nn.LayerNorm(8), [nn.Linear(6, 4)], torch.ones(8))
    with pytest.raises(ValueError, match="> 0"):
        apply_scale(nn.LayerNorm(8), [fc2], -torch.ones(8))
    with pytest.raises(TypeError, match="ScaledActivation"):
        apply_scale(nn.GELU(), [fc2], torch.ones(8))
    with pytest.raises(TypeError, match="nn.Linear"):
        apply_scale(nn.LayerNorm(8), fc2, torch.ones(8))


# -----------------------------------------------------------------------------
# The clip search


def _sampled_group_errors(W, W_q, xs, group_size):
    """Mean over tokens of the squared error of each group's partial dot product, (out, n_groups)."""
    out_f, in_f = W.shape
    d = (W_q - W).double().reshape(out_f, in_f // group_size, group_size)  # (out, n_groups, group_size)
    x = xs.double().reshape(xs.shape[0], in_f // group_size, group_size)  # (tokens, n_groups, group_size)
    return torch.einsum("tgk,cgk->ctg", x, d).pow(2).mean(dim=1)  # (out, n_groups)


def test_clip_search_never_increases_the_sampled_error():
    W, X, _ = heavy_tailed_layer(96, 256, 1100)
    res = search_clip(W, X, n_bits=3, group_size=64, n_sample_tokens=512, return_details=True)
    # 1100 // 512 = 2: every 2nd token, 550 of them.
    assert res.n_tokens_used == 550
    xs = X[::2]
    err_clip = _sampled_group_errors(W, awq_quantize(apply_clip(W, res.max_val), 3, 64), xs, 64)
    err_none = _sampled_group_errors(W, awq_quantize(W, 3, 64), xs, 64)
    assert bool((err_clip <= err_none * (1 + 1e-5)).all())
    assert bool((res.best_err <= res.noclip_err).all())
    assert bool((res.max_val < res.org_max_val).any())  # it does clip somewhere
    # Thresholds lie on the grid max * (1 - i / 20), i < 10.
    i = (res.shrink * 20).round()
    assert bool(((res.shrink * 20 - i).abs() < 1e-4).all()) and i.max() <= 9 and i.min() >= 0


def test_clip_search_token_sampling_and_batching_do_not_change_the_result():
    W, X, _ = heavy_tailed_layer(70, 128, 1100, seed=3)
    full = search_clip(W, X, n_bits=4, group_size=32, n_sample_tokens=512)
    assert torch.equal(full, search_clip(W, X[::2], n_bits=4, group_size=32, n_sample_tokens=550))
    assert torch.equal(full, search_clip(W, X.reshape(2, 550, 128), n_bits=4, group_size=32))
    for oc in (1, 7, 70, 256):
        assert torch.equal(full, search_clip(W, X, n_bits=4, group_size=32, oc_batch_size=oc))


def test_clip_search_matmul_method_agrees_up_to_float_ties():
    W, X, _ = heavy_tailed_layer(64, 128, 512, seed=4)
    ref = search_clip(W, X, n_bits=3, group_size=32, return_details=True)
    fast = search_clip(W, X, n_bits=3, group_size=32, method="matmul")
    err_fast = _sampled_group_errors(W, awq_quantize(apply_clip(W, fast), 3, 32), X, 32)
    err_ref = _sampled_group_errors(W, awq_quantize(apply_clip(W, ref.max_val), 3, 32), X, 32)
    assert bool((err_fast <= err_ref * (1 + 1e-4) + 1e-12).all())
    assert (fast == ref.max_val).float().mean() > 0.95


def test_clip_search_max_shrink_zero_keeps_the_range_and_apply_clip_clamps_per_group():
    W, X, _ = heavy_tailed_layer(16, 64, 64)
    mv = search_clip(W, X, group_size=16, max_shrink=0.0, n_sample_tokens=64)
    assert torch.equal(mv, W.abs().reshape(16, 4, 16).amax(dim=-1))
    assert torch.equal(apply_clip(W, mv), W)
    half = mv / 2
    clipped = apply_clip(W, half.unsqueeze(-1))  # the reference's (out, n_groups, 1) is accepted too
    expected = torch.maximum(torch.minimum(W, half.repeat_interleave(16, 1)), -half.repeat_interleave(16, 1))
    assert torch.equal(clipped, expected)


# -----------------------------------------------------------------------------
# The reference code (mit-han-lab/llm-awq, awq/quantize/{quantizer,auto_scale,auto_clip}.py), transcribed
# line by line; quantlab's quantizer and searches must return bit-identical numbers.


def _reference_pseudo_quantize_tensor(w, n_bit=8, zero_point=True, q_group_size=-1):
    org_w_shape = w.shape
    if q_group_size > 0:
        assert org_w_shape[-1] % q_group_size == 0
        w = w.reshape(-1, q_group_size)
    assert w.dim() == 2
    if zero_point:
        max_val = w.amax(dim=1, keepdim=True)
        min_val = w.amin(dim=1, keepdim=True)
        max_int = 2**n_bit - 1
        min_int = 0
        scales = (max_val - min_val).clamp(min=1e-5) / max_int
        zeros = (-torch.round(min_val / scales)).clamp_(min_int, max_int)
    else:
        max_val = w.abs().amax(dim=1, keepdim=True)
        max_val = max_val.clamp(min=1e-5)
        max_int = 2 ** (n_bit - 1) - 1
        min_int = -(2 ** (n_bit - 1))
        scales = max_val / max_int
        zeros = 0
    w = (torch.clamp(torch.round(w / scales) + zeros, min_int, max_int) - zeros) * scales
    return w.reshape(org_w_shape)


def _reference_auto_clip_layer(w, input_feat, n_bit, q_config, n_grid=20, max_shrink=0.5, n_sample_token=512):
    group_size = q_config["q_group_size"] if q_config["q_group_size"] > 0 else w.shape[1]
    input_feat = input_feat.view(-1, input_feat.shape[-1])
    input_feat = input_feat.reshape(1, input_feat.shape[0], -1, group_size)
    input_feat = input_feat[:, 0 :: input_feat.shape[1] // n_sample_token]
    w = w.reshape(w.shape[0], 1, -1, group_size)
    oc_batch_size = 256 if w.shape[0] % 256 == 0 else 64
    assert w.shape[0] % oc_batch_size == 0
    w_all = w
    best_max_val_all = []
    for i_b in range(w.shape[0] // oc_batch_size):
        w = w_all[i_b * oc_batch_size : (i_b + 1) * oc_batch_size]
        org_max_val = w.abs().amax(dim=-1, keepdim=True)
        best_max_val = org_max_val.clone()
        min_errs = torch.ones_like(org_max_val) * 1e9
        org_out = (input_feat * w).sum(dim=-1)
        for i_s in range(int(max_shrink * n_grid)):
            max_val = org_max_val * (1 - i_s / n_grid)
            min_val = -max_val
            cur_w = torch.clamp(w, min_val, max_val)
            q_w = _reference_pseudo_quantize_tensor(cur_w, n_bit=n_bit, **q_config)
            cur_out = (input_feat * q_w).sum(dim=-1)
            err = (cur_out - org_out).pow(2).mean(dim=1).view(min_errs.shape)
            cur_best_idx = err < min_errs
            min_errs[cur_best_idx] = err[cur_best_idx]
            best_max_val[cur_best_idx] = max_val[cur_best_idx]
        best_max_val_all.append(best_max_val)
    best_max_val = torch.cat(best_max_val_all, dim=0)
    return best_max_val.squeeze(1)


@torch.no_grad()  # the reference's auto_scale_block is decorated so
def _reference_search_module_scale(block, linears2scale, x, w_quantize_func):
    with torch.no_grad():
        org_out = block(x)
    x_max = x.abs().view(-1, x.shape[-1]).mean(0)  # get_act_scale
    best_error, best_ratio, best_scales = float("inf"), -1, None
    n_grid = 20
    history = []
    org_sd = {k: v.cpu() for k, v in block.state_dict().items()}
    for ratio in range(n_grid):
        ratio = ratio * 1 / n_grid
        scales = x_max.pow(ratio).clamp(min=1e-4).view(-1)
        scales = scales / (scales.max() * scales.min()).sqrt()
        for fc in linears2scale:
            fc.weight.mul_(scales.view(1, -1))
            fc.weight.data = w_quantize_func(fc.weight.data) / (scales.view(1, -1))
        out = block(x)
        loss = (org_out - out).float().pow(2).mean().item()
        history.append(loss)
        if loss < best_error:
            best_error, best_ratio, best_scales = loss, ratio, scales
        block.load_state_dict(org_sd)
    return best_scales.view(-1).detach(), best_ratio, history


@pytest.mark.parametrize(
    "n_bits, group_size, zero_point", [(4, 32, True), (3, 64, True), (2, 256, True), (4, 32, False)]
)
def test_quantizer_and_clip_search_match_the_reference_code_bit_for_bit(n_bits, group_size, zero_point):
    W, X, _ = heavy_tailed_layer(128, 256, 600, seed=n_bits)
    W[0, :32] = W[0, :32].abs()  # an all-positive group: its zero-point is clamped
    q_config = {"zero_point": zero_point, "q_group_size": group_size}
    expected = _reference_pseudo_quantize_tensor(W, n_bits, **q_config)
    assert torch.equal(awq_quantize(W, n_bits, group_size, zero_point), expected)
    if group_size == W.shape[1]:  # one group per row, the reference's q_group_size=-1
        assert torch.equal(
            awq_quantize(W, n_bits, -1), _reference_pseudo_quantize_tensor(W, n_bits, True, -1)
        )
    expected = _reference_auto_clip_layer(W, X, n_bits, q_config, n_sample_token=256)
    for method in ("reference", "matmul"):
        res = search_clip(W, X, n_bits, group_size, n_sample_tokens=256, zero_point=zero_point, method=method)
        if method == "reference":
            assert torch.equal(res, expected.reshape(res.shape))
        else:  # other float sums: the same thresholds but for near-ties
            assert (res == expected.reshape(res.shape)).float().mean() > 0.95


class _GatedMLP(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.gate = nn.Linear(dim, hidden, bias=False)
        self.up = nn.Linear(dim, hidden, bias=False)
        self.down = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(F.silu(self.gate(x)) * self.up(x))


@pytest.mark.parametrize("n_bits, group_size", [(4, 32), (3, 64)])
def test_block_scale_search_matches_the_reference_code_bit_for_bit(n_bits, group_size):
    torch.manual_seed(7)
    mlp = _GatedMLP(128, 192)
    _, X, _ = heavy_tailed_layer(8, 128, 256, seed=n_bits)
    X = X.reshape(2, 128, 128)
    reference_mlp = copy.deepcopy(mlp)
    scales, ratio, history = _reference_search_module_scale(
        reference_mlp,
        [reference_mlp.gate, reference_mlp.up],
        X,
        lambda w: _reference_pseudo_quantize_tensor(w, n_bits, zero_point=True, q_group_size=group_size),
    )
    res = search_block_scales([mlp.gate, mlp.up], X, mlp, n_bits, group_size, n_grid=20)
    assert res.loss_history == history and res.best_ratio == ratio and torch.equal(res.scales, scales)


# -----------------------------------------------------------------------------
# Ablation helpers


def test_salient_and_random_channel_selection():
    stat = torch.tensor([0.1, 5.0, 0.3, 2.0, 0.2])
    assert torch.equal(salient_channels(stat, 0.4), torch.tensor([1, 3]))
    assert salient_channels(stat, 0.01).tolist() == [1]  # at least one channel
    g1, g2 = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
    r = random_channels(4096, 0.01, g1)
    assert r.numel() == 41 and r.unique().numel() == 41 and torch.equal(r, r.sort().values)
    assert torch.equal(r, random_channels(4096, 0.01, g2))


def test_keep_channels_fp_and_fixed_scaling():
    W, X, _ = heavy_tailed_layer(32, 64, 64)
    keep = torch.tensor([3, 40])
    W_keep = quantize_keep_channels_fp(W, keep, 4, 16)
    rtn = awq_quantize(W, 4, 16)
    assert torch.equal(W_keep[:, keep], W[:, keep])
    others = torch.ones(64, dtype=torch.bool)
    others[keep] = False
    assert torch.equal(W_keep[:, others], rtn[:, others])
    assert torch.equal(scale_channels_fixed(W, keep, 1.0, 4, 16), rtn)
    s = torch.ones(64)
    s[keep] = 2.0
    assert torch.equal(scale_channels_fixed(W, keep, 2.0, 4, 16), quantize_with_scales(W, s, 4, 16))


def test_salient_channels_matter_on_heavy_tailed_layer():
    """The paper's Tables 1-2 on a synthetic layer: salient-by-activation >> random; scaling helps."""
    W, X, outliers = heavy_tailed_layer(128, 256, 512, n_outliers=3)
    stat = activation_stat(X)
    salient = salient_channels(stat, 0.01)
    assert set(salient.tolist()) <= set(outliers.tolist())
    rtn = output_mse(W, awq_quantize(W, 3, 64), X)
    keep_salient = output_mse(W, quantize_keep_channels_fp(W, salient, 3, 64), X)
    rand = random_channels(256, 0.01, torch.Generator().manual_seed(0))
    keep_random = output_mse(W, quantize_keep_channels_fp(W, rand, 3, 64), X)
    assert keep_salient < 0.5 * keep_random
    assert keep_salient < 0.5 * rtn
    assert output_mse(W, scale_channels_fixed(W, salient, 2.0, 3, 64), X) < rtn


# -----------------------------------------------------------------------------
# The model-level driver on a tiny self-made model


class _Attn(nn.Module):
    def __init__(self, d: int, n_head: int) -> None:
        super().__init__()
        self.n_head = n_head
        self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        B, T, d = x.shape

        def heads(t):
            return t.view(B, T, self.n_head, d // self.n_head).transpose(1, 2)  # (B, h, T, hd)

        y = F.scaled_dot_product_attention(
            heads(self.q(x)), heads(self.k(x)), heads(self.v(x)), attn_mask=mask
        )
        return self.o(y.transpose(1, 2).reshape(B, T, d))  # (B, T, d)


class _MLP(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(d, 2 * d), nn.GELU(), nn.Linear(2 * d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class _Block(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.norm1, self.attn, self.norm2, self.mlp = nn.LayerNorm(d), _Attn(d, 2), nn.LayerNorm(d), _MLP(d)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), mask)
        return x + self.mlp(self.norm2(x))


class _TinyModel(nn.Module):
    def __init__(self, vocab: int = 32, d: int = 32, n_layer: int = 2) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.blocks = nn.ModuleList(_Block(d) for _ in range(n_layer))
        self.head = nn.Linear(d, vocab)
        with torch.no_grad():  # a few large embedding channels: the heavy tails AWQ is about
            self.embed.weight[:, :2] *= 20
            for b in self.blocks:
                for norm in (b.norm1, b.norm2):
                    norm.weight.copy_(torch.exp(torch.randn(d)))
                    norm.bias.normal_()

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        T = idx.shape[1]
        mask = torch.ones(T, T, dtype=torch.bool).tril()  # (T, T)
        x = self.embed(idx)
        for b in self.blocks:
            x = b(x, mask)
        return self.head(x)


def _tiny_groups(block: nn.Module) -> list[ScaleGroup]:
    return [
        ScaleGroup("norm1", ("attn.q", "attn.k", "attn.v"), "attn"),
        ScaleGroup("attn.v", ("attn.o",)),
        ScaleGroup("norm2", ("mlp.fc1",), "mlp"),
        ScaleGroup("mlp.act", ("mlp.fc2",)),  # a parameter-free activation: wrapped in ScaledActivation
    ]


TINY_ADAPTER = BlockAdapter(lambda m: m.blocks, _tiny_groups, no_clip=("attn.q", "attn.k"))


def _tiny_setup(dtype=torch.float32):
    torch.manual_seed(0)
    model = _TinyModel().to(dtype).eval()
    tokens = torch.randint(0, 32, (4, 32), generator=torch.Generator().manual_seed(1))
    return model, tokens


def test_driver_scaling_alone_preserves_the_model_function():
    model, tokens = _tiny_setup(torch.float64)
    with torch.no_grad():
        before = model(tokens)
    res = awq_quantize_model(
        model, tokens, TINY_ADAPTER, n_bits=4, group_size=16, auto_clip=False, quantize=False
    )
    assert isinstance(model.blocks[0].mlp.act, ScaledActivation)
    assert [r.prev_op for r in res.scales[:4]] == [
        "blocks.0.norm1",
        "blocks.0.attn.v",
        "blocks.0.norm2",
        "blocks.0.mlp.act",
    ]
    assert any(r.best_ratio > 0 for r in res.scales)
    with torch.no_grad():
        after = model(tokens)
    assert torch.allclose(after, before, rtol=0, atol=1e4 * F64_EPS * before.abs().max().item())


def test_driver_searches_on_captured_full_precision_inputs():
    model, tokens = _tiny_setup()
    ref = copy.deepcopy(model)
    res = awq_quantize_model(
        model, [tokens[:2], tokens[2:]], TINY_ADAPTER, n_bits=4, group_size=16, n_sample_tokens=64
    )
    # Block 0's first group, searched by hand: input norm1(embed(tokens)), loss on the attention output.
    b0 = ref.blocks[0]
    mask = torch.ones(32, 32, dtype=torch.bool).tril()
    with torch.no_grad():
        x = b0.norm1(ref.embed(tokens))
    by_hand = search_block_scales([b0.attn.q, b0.attn.k, b0.attn.v], x, lambda t: b0.attn(t, mask), 4, 16)
    assert torch.equal(res.scales[0].scales, by_hand.scales)
    assert res.scales[0].loss_history == by_hand.loss_history
    # Clip search: every linear but q and k, one threshold per (out, group).
    assert set(res.clips) == {
        f"blocks.{i}.{n}" for i in range(2) for n in ("attn.v", "attn.o", "mlp.fc1", "mlp.fc2")
    }
    assert res.clips["blocks.1.mlp.fc2"].shape == (32, 4)


def test_driver_results_replay_on_a_fresh_copy():
    model, tokens = _tiny_setup()
    fresh = copy.deepcopy(model)
    res = awq_quantize_model(model, tokens, TINY_ADAPTER, n_bits=3, group_size=16, n_sample_tokens=128)
    assert isinstance(res, AWQModelResult)
    apply_awq_results(fresh, res)
    pseudo_quantize_blocks(fresh, TINY_ADAPTER, n_bits=3, group_size=16)
    for (name, p), (_, q) in zip(model.named_parameters(), fresh.named_parameters(), strict=True):
        assert torch.equal(p, q), name


def test_driver_beats_rtn_on_the_tiny_model():
    model, tokens = _tiny_setup()
    rtn = copy.deepcopy(model)
    with torch.no_grad():
        reference = model(tokens)
    awq_quantize_model(model, tokens, TINY_ADAPTER, n_bits=3, group_size=16, n_sample_tokens=128)
    pseudo_quantize_blocks(rtn, TINY_ADAPTER, n_bits=3, group_size=16)
    with torch.no_grad():
        err_awq = (model(tokens) - reference).pow(2).mean()
        err_rtn = (rtn(tokens) - reference).pow(2).mean()
    assert err_awq < err_rtn


@pytest.mark.parametrize("n_kv_heads", [4, 2])
def test_llama_adapter_preserves_function_and_skips_v_o_under_gqa(n_kv_heads):
    from quantlab.models.llama import Llama, LlamaConfig

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, dim=32, n_layers=2, n_heads=4, n_kv_heads=n_kv_heads, hidden_dim=64)
    model = Llama(cfg).double().eval()
    tokens = torch.randint(0, 64, (2, 16))
    with torch.no_grad():
        before = model(tokens)
    res = awq_quantize_model(model, tokens, LLAMA_ADAPTER, group_size=16, auto_clip=False, quantize=False)
    assert len(res.scales) == 2 * (4 if n_kv_heads == 4 else 3)
    assert ("model.layers.0.self_attn.v_proj" in [r.prev_op for r in res.scales]) == (n_kv_heads == 4)
    with torch.no_grad():
        after = model(tokens)
    assert torch.allclose(after, before, rtol=0, atol=1e4 * F64_EPS * before.abs().max().item())
    clips = awq_quantize_model(
        copy.deepcopy(model), tokens, LLAMA_ADAPTER, group_size=16, n_sample_tokens=32
    ).clips
    assert not any("q_proj" in n or "k_proj" in n for n in clips) and len(clips) == 2 * 5


def test_tiny_gpt_adapter_preserves_function():
    from quantlab.models.tiny_gpt import GPTConfig, TinyGPT

    torch.manual_seed(0)
    model = TinyGPT(GPTConfig(block_size=16, n_layer=2, n_head=2, n_embd=32)).double().eval()
    tokens = torch.randint(0, 256, (2, 16))
    with torch.no_grad():
        before = model(tokens)
    res = awq_quantize_model(model, tokens, TINY_GPT_ADAPTER, group_size=16, auto_clip=False, quantize=False)
    assert [r.prev_op for r in res.scales[:3]] == ["blocks.0.ln_1", "blocks.0.attn.v", "blocks.0.ln_2"]
    with torch.no_grad():
        after = model(tokens)
    assert torch.allclose(after, before, rtol=0, atol=1e4 * F64_EPS * before.abs().max().item())


# -----------------------------------------------------------------------------
# Bad input


def test_bad_input_raises_clear_errors():
    W, X, _ = heavy_tailed_layer(16, 64, 64)
    with pytest.raises(ValueError, match="in_features=64"):
        search_scales(W, X[:, :32])
    with pytest.raises(ValueError, match="n_sample_tokens=512"):
        search_clip(W, X, group_size=16)
    with pytest.raises(ValueError, match="n_grid"):
        search_scales(W, X, group_size=16, n_grid=0)
    with pytest.raises(TypeError, match="n_grid"):
        search_scales(W, X, group_size=16, n_grid=2.5)
    with pytest.raises(ValueError, match="group_size=48"):
        search_scales(W, X, group_size=48)
    with pytest.raises(ValueError, match="group_size=48"):
        awq_quantize(W, group_size=48)
    bad = X.clone()
    bad[3, 5] = math.nan
    with pytest.raises(ValueError, match="NaN"):
        search_scales(W, bad, group_size=16)
    with pytest.raises(ValueError, match="NaN"):
        search_clip(W, bad, group_size=16, n_sample_tokens=64)
    with pytest.raises(ValueError, match="max_shrink"):
        search_clip(W, X, group_size=16, n_sample_tokens=64, max_shrink=1.5)
    with pytest.raises(ValueError, match="method"):
        search_clip(W, X, group_size=16, n_sample_tokens=64, method="fast")
    with pytest.raises(TypeError, match="floating-point"):
        search_scales(W, X.long())
    with pytest.raises(ValueError, match="bias"):
        search_scales(W, X, group_size=16, bias=torch.zeros(3))
    with pytest.raises(ValueError, match="n_bits"):
        awq_quantize(W, n_bits=1, group_size=16, zero_point=False)
    with pytest.raises(ValueError, match="> 0"):
        quantize_with_scales(W, torch.zeros(64), group_size=16)
    with pytest.raises(ValueError, match="keep_idx"):
        quantize_keep_channels_fp(W, [70], group_size=16)
    with pytest.raises(ValueError, match="fraction"):
        salient_channels(activation_stat(X), 0.0)
    with pytest.raises(ValueError, match="factor"):
        scale_channels_fixed(W, [1], -2.0, group_size=16)
    with pytest.raises(ValueError, match="max_val"):
        apply_clip(W, torch.ones(16, 5))


def test_driver_bad_input():
    model, tokens = _tiny_setup()
    with pytest.raises(ValueError, match="sequence length"):
        awq_quantize_model(model, [tokens, tokens[:, :8]], TINY_ADAPTER)
    with pytest.raises(TypeError, match="integer tensor"):
        awq_quantize_model(model, tokens.float(), TINY_ADAPTER)
    with pytest.raises(TypeError, match="BlockAdapter"):
        awq_quantize_model(model, tokens, "llama")
    with pytest.raises(ValueError, match="inspect"):
        ScaleGroup("norm1", ("attn.q", "attn.k"))
    wrong = BlockAdapter(lambda m: m.blocks, lambda b: [ScaleGroup("norm9", ("attn.q",))])
    with pytest.raises(ValueError, match="norm9"):
        awq_quantize_model(model, tokens, wrong, group_size=16, auto_clip=False)
    with pytest.raises(ValueError, match="n_sample_tokens"):
        awq_quantize_model(model, tokens, TINY_ADAPTER, group_size=16)  # 128 tokens < 512
