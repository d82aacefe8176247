"""Tests for quantlab.gptq: the blocked algorithm against the plain one, GPTQ's invariants, bad input,
the Hessian accumulation and the model-level driver."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from quantlab.gptq import (
    ADAPTERS,
    GPTQ,
    GPTQResult,
    HessianAccumulator,
    LayerAdapter,
    _round_to_grid,
    get_adapter,
    gptq_quantize,
    gptq_quantize_model,
    gptq_quantize_reference,
    proxy_loss,
    rtn_quantize,
)
from quantlab.uniform import dequantize, minmax_params, quantize

EPS32 = torch.finfo(torch.float32).eps


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """These matrices are tiny: a second thread only adds OpenMP synchronization (slow on shared cores)."""
    n_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n_threads)


def layer(out: int, n: int, tokens: int, seed: int, dead: tuple[int, ...] = ()) -> tuple[torch.Tensor, ...]:
    """A random weight ``(out, n)`` and the Hessian ``2/N XᵀX`` of correlated, non-centred tokens."""
    g = torch.Generator().manual_seed(seed)
    W = 0.05 * torch.randn(out, n, generator=g)
    mix = torch.eye(n) + torch.randn(n, n, generator=g) / math.sqrt(n)  # correlates the features
    X = torch.randn(tokens, n, generator=g) @ mix + 0.3 * torch.randn(n, generator=g)  # (tokens, n)
    X[:, list(dead)] = 0.0
    acc = HessianAccumulator(n)
    acc.add_batch(X)
    return W, acc.H, X


def damped(H: torch.Tensor, result: GPTQResult) -> torch.Tensor:
    """The Hessian GPTQ actually used: dead diagonal set to 1, plus the damping."""
    H = H.clone()
    dead = result.dead.nonzero().flatten()
    H[dead, dead] = 1.0
    return H + result.damp_value * torch.eye(H.shape[0])


# -----------------------------------------------------------------------------
# A run derived by hand


def test_hand_derived_example():
    # 2 bits, one row [1, 0.2, 0.2, -0.5]: range [-0.5, 1], scale 0.5, zero-point round(0.5/0.5) = 1,
    # grid {-0.5, 0, 0.5, 1}. H couples only columns 1 and 2; damp = 0.
    # col 0: 1.0 -> code 3, no error.  col 1: 0.2 -> code 1 (q = 0), w - q = 0.2.
    # H_F⁻¹ over F = {1, 2, 3}: the {1, 2} block is [[2, 1], [1, 2]]⁻¹ = [[2, -1], [-1, 2]] / 3, so
    # col 2 += -(0.2) / (2/3) * (-1/3) = +0.1 -> 0.3 -> code 2 (q = 0.5), where RTN gives code 1.
    # loss: 0.2² / (2/3) / 2 = 0.03 for col 1; after eliminating col 1, [H⁻¹]_22 = 1/2:
    # 0.2² / (1/2) / 2 = 0.04 for col 2. Total 0.07 = ½ ΔW H ΔWᵀ with ΔW = [0, 0.2, -0.3, 0].
    W = torch.tensor([[1.0, 0.2, 0.2, -0.5]])
    H = torch.tensor([[1.0, 0, 0, 0], [0, 2, 1, 0], [0, 1, 2, 0], [0, 0, 0, 1]])
    for result in (
        gptq_quantize(W, H, n_bits=2, damp=0.0, trace=True),
        gptq_quantize_reference(W, H, 2, damp=0.0),
    ):
        assert result.codes.tolist() == [[3, 1, 2, 0]]
        assert result.Q.tolist() == [[1.0, 0.0, 0.5, -0.5]]
        assert result.error == pytest.approx(0.07, rel=16 * EPS32)
        assert result.losses[0].tolist() == pytest.approx([0.0, 0.03, 0.04, 0.0], rel=16 * EPS32)
    assert rtn_quantize(W, n_bits=2).codes.tolist() == [[3, 1, 1, 0]]
    assert proxy_loss(W, result.Q, H) == pytest.approx(0.14)
    assert proxy_loss(W, rtn_quantize(W, n_bits=2).Q, H) == pytest.approx(0.24)
    # The trace shows the error feedback: after column 1, column 2 holds 0.3.
    trace = gptq_quantize(W, H, n_bits=2, damp=0.0, trace=True).trace
    assert trace[1].W[0].tolist() == pytest.approx([1.0, 0.0, 0.3, -0.5], abs=4 * EPS32)
    assert [s.error for s in trace] == pytest.approx([0.0, 0.03, 0.07, 0.07], rel=16 * EPS32)


# -----------------------------------------------------------------------------
# The blocked algorithm against the plain column-by-column one


ASYM_CONFIGS = [
    dict(n_bits=4),
    dict(n_bits=3, act_order=True),
    dict(n_bits=4, group_size=32, static_groups=True),
    dict(n_bits=2, group_size=32, static_groups=True, act_order=True),
    dict(n_bits=4, group_size=32),
    dict(n_bits=4, group_size=32, act_order=True),
]


@pytest.mark.parametrize("config", ASYM_CONFIGS, ids=str)
@pytest.mark.parametrize("seed", [0, 1])
def test_blocked_equals_column_by_column(config, seed):
    W, H, _ = layer(24, 128, 256, seed, dead=(5,))
    # Dynamic groups are fitted on stale weights mid-block (module docstring, step 8): block_size=1
    # (or any block_size dividing group_size) is the exact counterpart of the plain algorithm.
    block_sizes = [1, 32] if "group_size" in config and not config.get("static_groups") else [1, 16, 128]
    plain = gptq_quantize_reference(W, H, **config)
    plain64 = gptq_quantize_reference(W, H, **config, dtype=torch.float64)
    for block_size in block_sizes:
        fast = gptq_quantize(W, H, **config, block_size=block_size)
        # Same decisions; Q agrees to float32 rounding of the (identical) grids.
        assert torch.equal(fast.codes, plain.codes)
        torch.testing.assert_close(fast.Q, plain.Q, rtol=0, atol=64 * EPS32 * float(W.abs().max()))
        assert torch.equal(fast.perm, plain.perm)
        # float64 elimination: the same codes, up to rounding ties (none on these seeds).
        assert (fast.codes != plain64.codes).float().mean() <= 0.005
        assert fast.error == pytest.approx(plain64.error, rel=1e-4)


@pytest.mark.parametrize("config", [dict(), dict(group_size=32, static_groups=True, act_order=True)], ids=str)
def test_blocked_vs_column_by_column_symmetric(config):
    # The symmetric grid puts a row's extreme weight exactly on a rounding tie (max / scale = 2^(b-1) - ½),
    # so float noise can flip a code and the flip cascades through that row's feedback: allow a few.
    W, H, _ = layer(24, 128, 256, 3)
    fast = gptq_quantize(W, H, symmetric=True, **config)
    plain = gptq_quantize_reference(W, H, symmetric=True, **config)
    assert (fast.codes != plain.codes).float().mean() <= 0.02
    assert fast.error == pytest.approx(plain.error, rel=0.01)


def test_dynamic_groups_are_fitted_on_the_stale_block():
    # One block of 128 with groups of 32: every group is fitted on W before the block's updates, i.e.
    # on the original W, which is exactly what static groups do. block_size=1 fits on fresh weights.
    W, H, _ = layer(16, 128, 256, 4)
    stale = gptq_quantize(W, H, group_size=32, block_size=128)
    static = gptq_quantize(W, H, group_size=32, static_groups=True)
    fresh = gptq_quantize(W, H, group_size=32, block_size=1)
    assert torch.equal(stale.codes, static.codes) and torch.equal(stale.group_scale, static.group_scale)
    assert torch.equal(fresh.group_scale[:, 0], stale.group_scale[:, 0])  # the first group: no updates yet
    assert not torch.equal(fresh.group_scale[:, 1:], stale.group_scale[:, 1:])
    assert torch.equal(fresh.codes, gptq_quantize_reference(W, H, group_size=32).codes)


# The reference code (IST-DASLab/gptq, quant.py and GPTQ.fasterquant), transcribed line by line on plain
# tensors; only ``maxq`` is a Python int instead of a 0-d tensor. gptq_quantize computes the same
# numbers in another memory layout, so its Q and error must be bit-identical to these.


class _ReferenceQuantizer:
    """quant.py ``Quantizer`` in per-channel weight mode (``perchannel=True, mse=False``)."""

    def __init__(self, bits: int, sym: bool) -> None:
        self.maxq, self.sym = 2**bits - 1, sym

    def find_params(self, x: torch.Tensor) -> None:
        tmp = torch.zeros(x.shape[0])
        xmin = torch.minimum(x.min(1)[0], tmp)
        xmax = torch.maximum(x.max(1)[0], tmp)
        if self.sym:
            xmax = torch.maximum(torch.abs(xmin), xmax)
            tmp = xmin < 0
            if torch.any(tmp):
                xmin[tmp] = -xmax[tmp]
        tmp = (xmin == 0) & (xmax == 0)
        xmin[tmp] = -1
        xmax[tmp] = +1
        self.scale = (xmax - xmin) / self.maxq
        if self.sym:
            self.zero = torch.full_like(self.scale, (self.maxq + 1) / 2)
        else:
            self.zero = torch.round(-xmin / self.scale)
        self.scale = self.scale.reshape(-1, 1)
        self.zero = self.zero.reshape(-1, 1)


def _reference_quantize(x, scale, zero, maxq):
    q = torch.clamp(torch.round(x / scale) + zero, 0, maxq)
    return scale * (q - zero)


def _reference_fasterquant(W, H, bits, groupsize=-1, sym=False, actorder=False, static_groups=False,
                           blocksize=128, percdamp=0.01):  # fmt: skip
    W = W.clone().float()
    H = H.clone()
    columns = W.shape[1]
    quantizer = _ReferenceQuantizer(bits, sym)
    quantizer.find_params(W)
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    if static_groups:
        groups = []
        for i in range(0, columns, groupsize):
            quantizer_g = copy.deepcopy(quantizer)
            quantizer_g.find_params(W[:, i : (i + groupsize)])
            groups.append(quantizer_g)
    if actorder:
        perm = torch.argsort(torch.diag(H), descending=True)
        W = W[:, perm]
        H = H[perm][:, perm]
        invperm = torch.argsort(perm)
    Losses = torch.zeros_like(W)
    Q = torch.zeros_like(W)
    damp = percdamp * torch.mean(torch.diag(H))
    diag = torch.arange(columns)
    H[diag, diag] += damp
    H = torch.linalg.cholesky(H)
    H = torch.cholesky_inverse(H)
    H = torch.linalg.cholesky(H, upper=True)
    Hinv = H
    for i1 in range(0, columns, blocksize):
        i2 = min(i1 + blocksize, columns)
        count = i2 - i1
        W1 = W[:, i1:i2].clone()
        Q1 = torch.zeros_like(W1)
        Err1 = torch.zeros_like(W1)
        Losses1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        for i in range(count):
            w = W1[:, i]
            d = Hinv1[i, i]
            if groupsize != -1:
                if not static_groups:
                    if (i1 + i) % groupsize == 0:
                        quantizer.find_params(W[:, (i1 + i) : (i1 + i + groupsize)])
                else:
                    idx = i1 + i
                    if actorder:
                        idx = perm[idx]
                    quantizer = groups[idx // groupsize]
            q = _reference_quantize(w.unsqueeze(1), quantizer.scale, quantizer.zero, quantizer.maxq).flatten()
            Q1[:, i] = q
            Losses1[:, i] = (w - q) ** 2 / d**2
            err1 = (w - q) / d
            W1[:, i:] -= err1.unsqueeze(1).matmul(Hinv1[i, i:].unsqueeze(0))
            Err1[:, i] = err1
        Q[:, i1:i2] = Q1
        Losses[:, i1:i2] = Losses1 / 2
        W[:, i2:] -= Err1.matmul(Hinv[i1:i2, i2:])
    if actorder:
        Q = Q[:, invperm]
    return Q, torch.sum(Losses).item()


@pytest.mark.parametrize(
    "config",
    [
        dict(n_bits=4),
        dict(n_bits=3, symmetric=True, act_order=True, block_size=16),
        dict(n_bits=4, group_size=32),  # dynamic groups, each starting a block
        dict(n_bits=2, group_size=16, block_size=40),  # groups starting mid-block: the stale fit
        dict(n_bits=4, group_size=32, act_order=True, block_size=24),
        dict(n_bits=3, group_size=32, static_groups=True, act_order=True, block_size=48),
        dict(n_bits=8, group_size=32, symmetric=True, static_groups=True),
    ],
    ids=str,
)
@pytest.mark.parametrize("shape", [(24, 128), (300, 96)], ids=str)
def test_matches_the_reference_code_bit_for_bit(config, shape):
    out, n = shape
    W, H, _ = layer(out, n, 256, seed=out + n, dead=(5,))
    W[0] *= 40  # a row with a wide grid
    Q_ref, error_ref = _reference_fasterquant(
        W,
        H,
        config["n_bits"],
        groupsize=config.get("group_size") or -1,
        sym=config.get("symmetric", False),
        actorder=config.get("act_order", False),
        static_groups=config.get("static_groups", False),
        blocksize=config.get("block_size", 128),
    )
    r = gptq_quantize(W, H, **config)
    assert torch.equal(r.Q, Q_ref) and r.error == error_ref
    traced = gptq_quantize(W, H, **config, trace=True)  # the snapshot path computes the same numbers
    assert torch.equal(traced.Q, Q_ref) and traced.error == error_ref and torch.equal(traced.codes, r.codes)


def test_identity_hessian_is_round_to_nearest():
    # With H = I there is nothing to compensate with: GPTQ is RTN on the same grid.
    W, _, _ = layer(16, 64, 8, 5)
    for kwargs in (dict(), dict(group_size=16), dict(group_size=16, symmetric=True, n_bits=3)):
        fast = gptq_quantize(W, torch.eye(64), **kwargs)
        rtn = rtn_quantize(W, **kwargs)
        assert torch.equal(fast.codes, rtn.codes) and torch.equal(fast.Q, rtn.Q)
        assert torch.equal(fast.scale, rtn.scale) and torch.equal(fast.zero_point, rtn.zero_point)


# -----------------------------------------------------------------------------
# GPTQ's loss and invariants


@pytest.mark.parametrize(
    "config",
    [
        dict(n_bits=4),
        dict(n_bits=3, group_size=32),
        dict(n_bits=4, act_order=True),
        dict(n_bits=2, group_size=16, act_order=True, static_groups=True),
        dict(n_bits=4, symmetric=True),
    ],
    ids=str,
)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_gptq_beats_rtn_on_the_proxy_loss(config, seed):
    W, H, _ = layer(32, 128, 512, seed)
    rtn_config = {k: v for k, v in config.items() if k in ("n_bits", "group_size", "symmetric")}
    gptq = proxy_loss(W, gptq_quantize(W, H, **config).Q, H)
    rtn = proxy_loss(W, rtn_quantize(W, **rtn_config).Q, H)
    assert gptq < rtn


@pytest.mark.parametrize("config", ASYM_CONFIGS[:4], ids=str)
def test_error_is_the_obs_loss(config):
    # The OBS losses add up to the final quadratic error ½ tr(ΔW H ΔWᵀ) of the damped H.
    W, H, _ = layer(24, 96, 256, 6, dead=(0, 7))
    result = gptq_quantize(W, H, block_size=32, **config)
    W0 = W.clone()
    W0[:, result.dead] = 0.0
    assert result.error == pytest.approx(0.5 * proxy_loss(W0, result.Q, damped(H, result)), rel=1e-4)
    assert result.error == pytest.approx(float(result.losses.double().sum()), rel=1e-6)
    assert result.error == pytest.approx(
        gptq_quantize_reference(W, H, **config, dtype=torch.float64).error, rel=1e-4
    )


@given(
    seed=st.integers(0, 1000),
    k=st.integers(-4, 4),
    config=st.sampled_from(
        [dict(), dict(group_size=16), dict(group_size=16, act_order=True), dict(symmetric=True)]
    ),
)
@settings(max_examples=12, deadline=None)
def test_hessian_scale_invariance(seed, k, config):
    # H -> 4^k H scales every Cholesky factor by an exact power of two: identical bits; error scales.
    W, H, _ = layer(8, 48, 64, seed)
    a = gptq_quantize(W, H, block_size=16, **config)
    b = gptq_quantize(W, H * 4.0**k, block_size=16, **config)
    assert torch.equal(a.codes, b.codes) and torch.equal(a.Q, b.Q)
    assert b.error == pytest.approx(a.error * 4.0**k, rel=1e-6)


def test_hessian_scale_invariance_generic_factor():
    W, H, _ = layer(32, 128, 256, 7)
    a = gptq_quantize(W, H)
    b = gptq_quantize(W, 3.7 * H)
    assert (a.codes != b.codes).float().mean() <= 0.005  # only float ties may flip
    assert b.error == pytest.approx(3.7 * a.error, rel=1e-3)


@given(
    seed=st.integers(0, 10_000),
    n_bits=st.sampled_from([1, 2, 3, 4, 8]),
    group_size=st.sampled_from([None, 8, 16, 48]),
    symmetric=st.booleans(),
    act_order=st.booleans(),
    static_groups=st.booleans(),
    block_size=st.sampled_from([1, 7, 16, 128]),
)
@settings(max_examples=25, deadline=None)
def test_codes_grid_and_q_are_consistent(
    seed, n_bits, group_size, symmetric, act_order, static_groups, block_size
):
    static_groups = static_groups and group_size is not None
    W, H, _ = layer(6, 48, 32, seed, dead=(seed % 48,))
    r = gptq_quantize(W, H, n_bits, group_size, symmetric, act_order, static_groups, block_size)
    maxq = 2**n_bits - 1
    assert r.codes.dtype == torch.uint8 and r.codes.shape == W.shape
    assert int(r.codes.min()) >= 0 and int(r.codes.max()) <= maxq
    assert torch.equal(r.Q, r.scale * (r.codes.float() - r.zero_point))  # exactly the dequantized codes
    assert bool((r.scale > 0).all())
    if symmetric:
        assert bool((r.zero_point == 2 ** (n_bits - 1)).all())
    else:
        assert bool((r.zero_point >= 0).all() and (r.zero_point <= maxq).all())
    assert sorted(r.perm.tolist()) == list(range(48))
    if group_size is None:
        assert r.group_scale is None and r.g_idx is None
        scale, zero = minmax_params(W, n_bits, symmetric)  # per row, fitted on the original W
        assert torch.equal(r.scale, scale.expand_as(W)) and torch.equal(r.zero_point, zero.expand_as(W))
    else:
        assert r.group_scale.shape == (6, 48 // group_size)
        assert torch.equal(r.scale, r.group_scale[:, r.g_idx])
        assert torch.equal(r.zero_point, r.group_zero_point[:, r.g_idx])
        assert torch.equal(torch.bincount(r.g_idx), torch.full((48 // group_size,), group_size))


def test_round_to_grid_is_the_uniform_quantizer():
    g = torch.Generator().manual_seed(8)
    w = torch.randn(1000, generator=g)
    w[:10] = torch.arange(10) * 0.25 - 1.125  # exact ties
    scale, zero = torch.full((1000,), 0.25), torch.full((1000,), 7.0)
    codes, q = _round_to_grid(w, scale, zero, 15)
    expected = quantize(w.unsqueeze(1), scale.unsqueeze(1), zero.unsqueeze(1), 0, 15)  # (1000, 1)
    assert torch.equal(codes, expected.flatten())
    assert torch.equal(q, dequantize(expected, scale.unsqueeze(1), zero.unsqueeze(1)).flatten())
    out = (torch.empty(1000), torch.empty(1000))  # the in-place variant of the blocked loop
    codes_out, q_out = _round_to_grid(w, scale, zero, 15, out=out)
    assert codes_out is out[0] and q_out is out[1]
    assert torch.equal(codes_out, codes) and torch.equal(q_out, q)


# -----------------------------------------------------------------------------
# Dead columns, act-order, static groups


def test_dead_columns():
    dead = (3, 17, 30)
    W, H, _ = layer(12, 64, 128, 9, dead=dead)
    assert bool((torch.diag(H)[list(dead)] == 0).all())
    r = gptq_quantize(W, H, act_order=True)
    assert r.dead.nonzero().flatten().tolist() == list(dead)
    # Dead inputs get H_ii = 1 before sorting and damping: it shows in the order and the damping.
    H1 = H.clone()
    H1[list(dead), list(dead)] = 1.0
    assert torch.equal(r.perm, torch.argsort(torch.diag(H1), descending=True))
    assert r.damp_value == pytest.approx(0.01 * float(torch.diag(H1).mean()), rel=16 * EPS32)
    assert bool((r.Q[:, list(dead)] == 0).all())
    assert torch.equal(r.codes[:, list(dead)].float(), r.zero_point[:, list(dead)])
    # The per-row grid is fitted before the dead columns are zeroed (their weights still count).
    scale, _ = minmax_params(W, 4)
    assert torch.equal(r.scale[:, 0], scale.flatten())
    # Static groups are fitted after: the dead entries are 0 in the group ranges.
    W[:, 3] = 100.0
    r = gptq_quantize(W, H, group_size=16, static_groups=True)
    W0 = W.clone()
    W0[:, list(dead)] = 0.0
    assert torch.equal(r.group_scale[:, 0], minmax_params(W0[:, :16], 4)[0].flatten())


def test_act_order_round_trip():
    W, H, _ = layer(16, 64, 128, 10)
    H = H * torch.linspace(0.5, 2.0, 64).sqrt().outer(torch.linspace(0.5, 2.0, 64).sqrt())  # spread diag
    for config in (dict(), dict(group_size=16)):
        r = gptq_quantize(W, H, act_order=True, block_size=16, **config)
        perm = r.perm
        assert sorted(perm.tolist()) == list(range(64))
        assert bool((torch.diag(H)[perm].diff() <= 0).all())  # diag(H) descending
        # Act-order is GPTQ on the permuted problem, returned in the original order.
        p = gptq_quantize(W[:, perm], H[perm][:, perm], block_size=16, **config)
        inv = torch.argsort(perm)
        assert torch.equal(r.codes, p.codes[:, inv]) and torch.equal(r.Q, p.Q[:, inv])
        assert torch.equal(r.scale, p.scale[:, inv]) and r.error == p.error
        if config:
            assert torch.equal(r.group_scale, p.group_scale)  # groups of consecutive permuted columns
            assert torch.equal(r.g_idx, inv // 16)


def test_static_groups_with_act_order():
    W, H, _ = layer(16, 64, 128, 11)
    r = gptq_quantize(W, H, group_size=16, static_groups=True, act_order=True)
    scale, zero = minmax_params(W.reshape(16 * 4, 16), 4)  # (64, 1): every original group
    assert torch.equal(r.group_scale, scale.reshape(16, 4))
    assert torch.equal(r.group_zero_point, zero.reshape(16, 4))
    assert torch.equal(r.g_idx, torch.arange(64) // 16)  # a column's group is its original index // 16
    assert not torch.equal(r.perm, torch.arange(64))


# -----------------------------------------------------------------------------
# Trace and callback


def test_trace_and_callback():
    W, H, _ = layer(6, 16, 64, 12)
    seen = []
    r = gptq_quantize(W, H, group_size=8, block_size=4, act_order=True, trace=True, callback=seen.append)
    plain = gptq_quantize(W, H, group_size=8, block_size=1, act_order=True, trace=True)
    assert len(r.trace) == 16 and [s.step for s in seen] == list(range(16))
    assert [s.column for s in r.trace] == r.perm.tolist()
    for step, step1 in zip(r.trace, plain.trace, strict=True):
        done = step.quantized
        assert int(done.sum()) == step.step + 1 and bool(done[step.column])
        assert torch.equal(step.W[:, done], r.Q[:, done])
        assert torch.equal(step.codes, r.codes[:, step.column])
        # The lazily updated snapshot is the eagerly updated one (block_size=1), up to rounding.
        torch.testing.assert_close(step.W, step1.W, rtol=0, atol=1e-5)
    assert torch.equal(r.trace[-1].W, r.Q)
    assert r.trace[-1].error == pytest.approx(r.error, rel=1e-5)
    assert gptq_quantize(W, H).trace is None


# -----------------------------------------------------------------------------
# Hessian accumulation and the one-layer helper


def test_hessian_accumulator_equals_batch_formula():
    g = torch.Generator().manual_seed(13)
    batches = [
        torch.randn(2, 5, 8, generator=g),
        torch.randn(7, 8, generator=g),
        torch.randn(1, 3, 8, generator=g),
    ]
    acc = HessianAccumulator(8)
    for X in batches:
        acc.add_batch(X)
    # The reference counts samples (the leading dim of a 3-D input; a 2-D input is one sample).
    assert acc.n_samples == 2 + 1 + 1 and acc.n_tokens == 10 + 7 + 3
    X = torch.cat([b.reshape(-1, 8) for b in batches]).double()  # (20, 8)
    expected = 2 / 4 * X.T @ X
    torch.testing.assert_close(
        acc.H.double(), expected, rtol=0, atol=64 * EPS32 * float(expected.abs().max())
    )
    with pytest.raises(ValueError, match="in_features"):
        acc.add_batch(torch.randn(3, 7))


def test_gptq_helper_hooks_a_linear():
    torch.manual_seed(14)
    lin = nn.Linear(32, 8, bias=False)
    original = lin.weight.detach().clone()
    helper = GPTQ(lin)
    with pytest.raises(ValueError, match="calibration"):
        helper.quantize()
    handle = helper.register_hook()
    acc = HessianAccumulator(32)
    for _ in range(3):
        X = torch.randn(4, 10, 32)
        lin(X)
        acc.add_batch(X)
    handle.remove()
    lin(torch.randn(2, 32))  # after removal: not recorded
    assert helper.hessian.n_samples == 12 and torch.equal(helper.H, acc.H)
    result = helper.quantize(n_bits=3, group_size=8)
    assert torch.equal(lin.weight.detach(), result.Q)
    assert torch.equal(result.codes, gptq_quantize(original, acc.H, n_bits=3, group_size=8).codes)
    with pytest.raises(TypeError, match="nn.Linear"):
        GPTQ(nn.Conv1d(2, 2, 1))


# -----------------------------------------------------------------------------
# Bad input


def _ok() -> dict:
    W, H, _ = layer(4, 16, 32, 15)
    return dict(W=W, H=H)


@pytest.mark.parametrize(
    ("change", "error", "match"),
    [
        (dict(H=torch.ones(16, 8)), ValueError, "square"),
        (dict(H=torch.eye(8)), ValueError, "in_features"),
        (dict(H=torch.eye(16) + torch.triu(torch.ones(16, 16), 1) * 1e-3), ValueError, "symmetric"),
        (dict(W=torch.ones(4, 16, 1)), ValueError, "dimensions"),
        (dict(W=torch.ones(4, 16, dtype=torch.int32)), TypeError, "floating-point"),
        (dict(W=torch.full((4, 16), float("nan"))), ValueError, "NaN"),
        (dict(H=torch.eye(16) * float("inf")), ValueError, "NaN or Inf"),
        (dict(W=[[1.0]]), TypeError, "torch.Tensor"),
        (dict(group_size=5), ValueError, "group_size=5"),
        (dict(group_size=0), ValueError, "group_size"),
        (dict(n_bits=0), ValueError, "n_bits"),
        (dict(n_bits=17), ValueError, "n_bits"),
        (dict(n_bits=4.0), TypeError, "n_bits"),
        (dict(block_size=0), ValueError, "block_size"),
        (dict(block_size=-3), ValueError, "block_size"),
        (dict(damp=-0.01), ValueError, "damp"),
        (dict(damp=float("nan")), ValueError, "damp"),
        (dict(symmetric=1), TypeError, "symmetric"),
        (dict(act_order="yes"), TypeError, "act_order"),
        (dict(static_groups=True), ValueError, "static_groups"),
        (dict(callback=3), TypeError, "callback"),
    ],
    ids=lambda v: str(v)[:40] if not isinstance(v, dict) else ",".join(v),
)
def test_bad_input(change, error, match):
    kwargs = {**_ok(), **change}
    with pytest.raises(error, match=match):
        gptq_quantize(**kwargs)
    if not {"callback", "block_size"} & set(change):  # the plain version has neither
        with pytest.raises(error, match=match):
            gptq_quantize_reference(**kwargs)


def test_not_positive_definite_suggests_damp():
    W = torch.ones(2, 2)
    H = torch.tensor([[1.0, 2.0], [2.0, 1.0]])  # eigenvalues 3 and -1
    with pytest.raises(ValueError, match="larger damp"):
        gptq_quantize(W, H, damp=0.0)
    with pytest.raises(ValueError, match="larger damp"):
        gptq_quantize(W, H, damp=0.5)  # + 0.5 * mean(diag) = 0.5 is not enough
    gptq_quantize(W, H, damp=1.5)  # + 1.5 makes it positive definite
    with pytest.raises(ValueError, match="larger damp"):
        gptq_quantize_reference(W, torch.zeros(2, 2) + torch.tensor([[0.0, 0.0], [0.0, -1.0]]), damp=0.0)


# -----------------------------------------------------------------------------
# The model-level driver on a tiny Llama-shaped transformer


class ToyAttention(nn.Module):
    def __init__(self, d: int, n_heads: int) -> None:
        super().__init__()
        self.n_heads = n_heads
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = (nn.Linear(d, d, bias=False) for _ in range(4))

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        B, T, d = x.shape

        def heads(t: torch.Tensor) -> torch.Tensor:
            return t.view(B, T, self.n_heads, d // self.n_heads).transpose(1, 2)  # (B, h, T, hd)

        y = F.scaled_dot_product_attention(
            heads(self.q_proj(x)), heads(self.k_proj(x)), heads(self.v_proj(x)), attn_mask=mask
        )
        return self.o_proj(y.transpose(1, 2).reshape(B, T, d))  # (B, T, d)


class ToyMLP(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.gate_proj, self.up_proj = nn.Linear(d, 2 * d, bias=False), nn.Linear(d, 2 * d, bias=False)
        self.down_proj = nn.Linear(2 * d, d, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class ToyBlock(nn.Module):
    """HF-style: extra positional and keyword arguments, a tuple output."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.input_layernorm, self.post_attention_layernorm = nn.RMSNorm(d), nn.RMSNorm(d)
        self.self_attn, self.mlp = ToyAttention(d, 2), ToyMLP(d)

    def forward(self, x: torch.Tensor, pos: torch.Tensor, *, mask: torch.Tensor) -> tuple[torch.Tensor, None]:
        x = x + pos + self.self_attn(self.input_layernorm(x), mask)
        return x + self.mlp(self.post_attention_layernorm(x)), None


class ToyModel(nn.Module):
    def __init__(self, vocab: int = 32, d: int = 32, n_layers: int = 2, seq: int = 16) -> None:
        super().__init__()
        self.model = nn.Module()
        self.model.embed_tokens = nn.Embedding(vocab, d)
        self.model.layers = nn.ModuleList(ToyBlock(d) for _ in range(n_layers))
        self.pos = nn.Parameter(0.1 * torch.randn(seq, d))

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        T = idx.shape[1]
        x = self.model.embed_tokens(idx)  # (B, T, d)
        mask = torch.ones(T, T, dtype=torch.bool).tril()  # (T, T) causal
        for layer in self.model.layers:
            x = layer(x, self.pos[:T], mask=mask)[0]
        return x


def toy_setup(seed: int = 16) -> tuple[ToyModel, list[torch.Tensor], list[torch.Tensor]]:
    torch.manual_seed(seed)
    model = ToyModel()
    g = torch.Generator().manual_seed(seed)
    calib = [torch.randint(0, 32, (4, 16), generator=g) for _ in range(4)]
    held_out = [torch.randint(0, 32, (4, 16), generator=g) for _ in range(4)]
    return model, calib, held_out


@torch.no_grad()
def output_error(model: nn.Module, reference: nn.Module, batches: list[torch.Tensor]) -> float:
    return sum(float(((model(b) - reference(b)) ** 2).mean()) for b in batches)


def test_driver_beats_rtn_on_the_model_output():
    model, calib, held_out = toy_setup()
    reference = copy.deepcopy(model)
    rtn = copy.deepcopy(model)
    with torch.no_grad():
        for m in rtn.model.layers.modules():
            if isinstance(m, nn.Linear):
                m.weight.copy_(rtn_quantize(m.weight, n_bits=3, group_size=16).Q)
    model.train()
    report = gptq_quantize_model(model, calib, adapter="llama", n_bits=3, group_size=16)
    assert model.training  # restored (the run itself is in eval mode)
    assert output_error(model, reference, held_out) < output_error(rtn, reference, held_out)
    assert [layer.name for layer in report.layers[:7]] == [
        f"model.layers.0.{n}"
        for n in (
            "self_attn.k_proj",
            "self_attn.v_proj",
            "self_attn.q_proj",
            "self_attn.o_proj",
            "mlp.up_proj",
            "mlp.gate_proj",
            "mlp.down_proj",
        )
    ]
    assert len(report.layers) == 14 and report.skipped == []
    assert [layer.group for layer in report.layers[:7]] == [0, 0, 0, 1, 2, 2, 3]
    assert all(layer.error > 0 and layer.seconds >= 0 for layer in report.layers)
    assert all(layer.n_samples == 16 and layer.n_tokens == 256 for layer in report.layers)
    assert report.total_error == pytest.approx(sum(r["error"] for r in report.rows()))
    assert report.config["n_bits"] == 3 and report.results is None


def test_driver_is_sequential():
    # Block 1 is quantized from the activations of the *quantized* block 0 (and inside a block, o_proj
    # from the outputs of the quantized q/k/v): rebuild that Hessian by hand and compare.
    model, calib, _ = toy_setup(17)
    original = copy.deepcopy(model)
    report = gptq_quantize_model(model, calib, adapter="llama", keep_results=True, n_bits=4)
    hybrid = copy.deepcopy(original)
    hybrid.model.layers[0] = copy.deepcopy(model.model.layers[0])  # quantized block 0, original block 1
    attn = hybrid.model.layers[1].self_attn
    for name in ("q_proj", "k_proj", "v_proj"):
        getattr(attn, name).weight.data.copy_(getattr(model.model.layers[1].self_attn, name).weight)
    helpers = {name: GPTQ(getattr(attn, name)) for name in ("k_proj", "o_proj")}
    handles = [h.register_hook() for h in helpers.values()]
    with torch.no_grad():
        for b in calib:
            hybrid(b)
    for h in handles:
        h.remove()
    for name, helper in helpers.items():
        expected = gptq_quantize(getattr(original.model.layers[1].self_attn, name).weight, helper.H, n_bits=4)
        got = report.results[f"model.layers.1.self_attn.{name}"]
        assert (got.codes != expected.codes).float().mean() <= 0.01  # same H up to float summation order
    # "all" quantizes a block from one pass: o_proj then sees the unquantized q/k/v, and differs.
    model_all, _, _ = toy_setup(17)
    report_all = gptq_quantize_model(model_all, calib, layer_groups="all", keep_results=True, n_bits=4)
    assert {layer.group for layer in report_all.layers} == {0}
    name = "model.layers.0.self_attn.o_proj"
    assert not torch.equal(report_all.results[name].codes, report.results[name].codes)


def test_driver_custom_adapter_prefix_and_skipped():
    model, calib, _ = toy_setup(18)

    def prefix(m: ToyModel, idx: torch.Tensor) -> tuple:
        return (m.model.embed_tokens(idx), m.pos[: idx.shape[1]])

    mask = torch.ones(16, 16, dtype=torch.bool).tril()
    adapter = LayerAdapter(blocks="model.layers", layer_groups=(("mlp.down_proj",),), prefix=prefix)

    # The prefix returns positional arguments only; a block wrapper supplies the mask keyword.
    class WithMask(nn.Module):
        def __init__(self, block: nn.Module) -> None:
            super().__init__()
            self.block = block

        def forward(self, x: torch.Tensor, pos: torch.Tensor) -> tuple:
            return self.block(x, pos, mask=mask)

    model.model.layers = nn.ModuleList(WithMask(b) for b in model.model.layers)
    adapter = LayerAdapter(blocks="model.layers", layer_groups=(("block.mlp.down_proj",),), prefix=prefix)
    before = {n: p.clone() for n, p in model.named_parameters()}
    report = gptq_quantize_model(model, calib, adapter=adapter, n_bits=4)
    assert [layer.name for layer in report.layers] == [
        f"model.layers.{i}.block.mlp.down_proj" for i in (0, 1)
    ]
    assert len(report.skipped) == 12
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed == {f"model.layers.{i}.block.mlp.down_proj.weight" for i in (0, 1)}


def test_driver_bad_input():
    model, calib, _ = toy_setup(19)
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(TypeError, match="unknown GPTQ options"):
        gptq_quantize_model(model, calib, bits=4)
    with pytest.raises(ValueError, match="adapter"):
        gptq_quantize_model(model, calib, adapter="bert")
    with pytest.raises(ValueError, match="no attribute path"):
        gptq_quantize_model(model, calib, adapter="nanogpt")
    with pytest.raises(ValueError, match="not an nn.Linear"):
        gptq_quantize_model(model, calib, layer_groups=[["self_attn.w_proj"]])
    with pytest.raises(ValueError, match="layer_groups"):
        gptq_quantize_model(model, calib, layer_groups="some")
    with pytest.raises(ValueError, match="group_size=24"):
        gptq_quantize_model(model, calib, group_size=24)  # checked before any weight changes
    with pytest.raises(ValueError, match="empty"):
        gptq_quantize_model(model, [])
    with pytest.raises(ValueError, match="n_bits"):
        gptq_quantize_model(model, calib, n_bits=0)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert get_adapter(ADAPTERS["llama"]) is ADAPTERS["llama"]


# -----------------------------------------------------------------------------
# The presets on quantlab's own models (random weights, tiny configs)


def test_presets_match_quantlab_models():
    from quantlab.models.llama import Llama, LlamaConfig
    from quantlab.models.tiny_gpt import GPTConfig, TinyGPT

    torch.manual_seed(20)
    g = torch.Generator().manual_seed(20)
    llama = Llama(LlamaConfig(vocab_size=32, dim=16, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=32))
    gpt = TinyGPT(GPTConfig(block_size=16, n_layer=2, n_head=2, n_embd=16))
    for model, adapter, per_block in ((llama, "llama", 7), (gpt, "tiny_gpt", 6)):
        calib = [torch.randint(0, 32, (2, 12), generator=g) for _ in range(3)]
        reference = copy.deepcopy(model)
        report = gptq_quantize_model(model, calib, adapter=adapter, n_bits=8, group_size=8)
        assert len(report.layers) == 2 * per_block and report.skipped == []
        with torch.no_grad():
            out, ref = model(calib[0]), reference(calib[0])
        assert float((out - ref).abs().max()) < 0.05 * float(ref.abs().max())  # 8-bit: a small change
        assert not torch.equal(out, ref)
