"""The Triton W4A16 kernels (interpreted on this CPU) against the pure-PyTorch reference."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from quantlab.kernels import w4a16 as K
from quantlab.packing import pack_codes

pytestmark = pytest.mark.skipif(not K.triton_available(), reason="Triton is not installable on this platform")


def _layer(n, k, group_size, container, seed=0):
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 16, (n, k), generator=g)
    packed = pack_codes(codes, 4, container=container, order="low_first")
    n_groups = k // group_size
    scale = torch.rand(n, n_groups, generator=g) * 0.1 + 0.01
    zero_point = torch.randint(0, 16, (n, n_groups), generator=g).float()
    return codes, packed, scale, zero_point


def _bound(x, w):
    """Float32 summation error bound for x @ w.T: gamma_K * (|x| @ |w|^T) with gamma_K = K u / (1 - K u)."""
    k = x.shape[1]
    u = torch.finfo(torch.float32).eps / 2
    gamma = k * u / (1 - k * u)
    return gamma * (x.abs().double() @ w.abs().double().T) + 1e-30


def test_unpack_reference_matches_the_codes():
    codes, packed, _, _ = _layer(5, 64, 32, torch.uint8)
    assert torch.equal(K.unpack_int4_reference(packed, 64), codes.int())
    codes, packed, _, _ = _layer(5, 64, 32, torch.int32)
    assert torch.equal(K.unpack_int4_reference(packed, 64), codes.int())


@pytest.mark.parametrize("container", [torch.uint8, torch.int32])
@pytest.mark.parametrize("group_size", [32, 64, 128])
def test_dequant_kernel_equals_reference(container, group_size):
    codes, packed, scale, zero_point = _layer(37, 256, group_size, container)
    out = K.dequantize_int4(packed, scale, zero_point, group_size, block=512)
    ref = K.dequantize_int4_reference(packed, scale, zero_point, group_size)
    assert torch.equal(out, ref)  # one multiply and one subtract per element: exactly the same floats


@pytest.mark.parametrize("container", [torch.uint8, torch.int32])
@pytest.mark.parametrize("group_size", [32, 64, 128])
@pytest.mark.parametrize(("m", "n", "k"), [(1, 64, 128), (17, 45, 256), (40, 70, 384)])
def test_matmul_kernel_equals_reference(container, group_size, m, n, k):
    if k % group_size:
        pytest.skip("group size must divide K")  # 384 % 256 never occurs: all sizes here divide
    _, packed, scale, zero_point = _layer(n, k, group_size, container, seed=m + n)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(1))
    y = K.w4a16_matmul(x, packed, scale, zero_point, group_size, block_m=16, block_n=32, block_k=32)
    w = K.dequantize_int4_reference(packed, scale, zero_point, group_size)
    exact = x.double() @ w.double().T
    assert y.shape == (m, n) and y.dtype == torch.float32
    assert bool(((y.double() - exact).abs() <= 2 * _bound(x, w)).all())


def test_several_programs_along_both_axes_and_k_iterations():
    # 3 programs along M, 4 along N, 8 steps along K: a wrong offset anywhere cannot pass
    _, packed, scale, zero_point = _layer(100, 256, 32, torch.uint8, seed=3)
    x = torch.randn(40, 256)
    y = K.w4a16_matmul(x, packed, scale, zero_point, 32, block_m=16, block_n=32, block_k=32)
    w = K.dequantize_int4_reference(packed, scale, zero_point, 32)
    assert bool(((y.double() - x.double() @ w.double().T).abs() <= 2 * _bound(x, w)).all())


def test_fp16_activations_accumulate_in_fp32():
    _, packed, scale, zero_point = _layer(64, 512, 128, torch.uint8, seed=4)
    x = torch.randn(16, 512).half()
    y = K.w4a16_matmul(x, packed, scale, zero_point, 128)
    assert y.dtype == torch.float16
    w = K.dequantize_int4_reference(packed, scale, zero_point, 128)
    exact = x.double() @ w.double().T
    # the only fp16 rounding is the final store: half an fp16 ulp of the result, plus the fp32 sum bound
    ulp = torch.finfo(torch.float16).eps * exact.abs()
    assert bool(((y.double() - exact).abs() <= ulp / 2 + 2 * _bound(x.float(), w) + 1e-7).all())


def test_g_idx_runs_act_order_layers_unchanged():
    n, k, group_size = 48, 128, 32
    codes, packed, scale, zero_point = _layer(n, k, group_size, torch.uint8, seed=5)
    g_idx = torch.randperm(k, generator=torch.Generator().manual_seed(0)) // group_size  # scattered groups
    x = torch.randn(9, k)
    y = K.w4a16_matmul(x, packed, scale, zero_point, group_size, g_idx=g_idx)
    ref = K.w4a16_matmul_reference(x, packed, scale, zero_point, group_size, g_idx=g_idx)
    w = K.dequantize_int4_reference(packed, scale, zero_point, group_size, g_idx=g_idx)
    assert bool(((y.double() - ref.double()).abs() <= 4 * _bound(x, w)).all())


@settings(max_examples=8, deadline=None)
@given(m=st.integers(1, 33), n=st.integers(1, 40), k_groups=st.integers(1, 4))
def test_kernel_matches_reference_on_ragged_shapes(m, n, k_groups):
    k = 32 * k_groups
    _, packed, scale, zero_point = _layer(n, k, 32, torch.uint8, seed=m * 100 + n)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(n))
    y = K.w4a16_matmul(x, packed, scale, zero_point, 32)
    w = K.dequantize_int4_reference(packed, scale, zero_point, 32)
    assert bool(((y.double() - x.double() @ w.double().T).abs() <= 2 * _bound(x, w)).all())


def test_bytes_moved_shows_the_4x_weight_reduction():
    fp16 = K.bytes_moved(1, 4096, 4096, weight_bits=16, group_size=None)
    int4 = K.bytes_moved(1, 4096, 4096, weight_bits=4, group_size=None)
    assert fp16["weight"] == 4 * int4["weight"]
    # at batch 1 the weight dominates the traffic, so int4 gives ~4x more FLOPs per byte
    assert 3.9 < int4["intensity"] / fp16["intensity"] < 4.0


@pytest.mark.parametrize(
    ("kwargs", "exc", "match"),
    [
        ({"packed": torch.zeros(8, 16, dtype=torch.int16)}, TypeError, "uint8"),
        ({"packed": torch.zeros(8, 15, dtype=torch.uint8)}, ValueError, "needs shape"),
        ({"group_size": 48}, ValueError, "group_size=48"),
        ({"x": torch.randint(0, 3, (4, 32))}, TypeError, "floating-point"),
        ({"x": torch.randn(32, 4).T}, ValueError, "contiguous"),
        ({"scale": torch.ones(8, 3)}, ValueError, "scale must have shape"),
        ({"block_k": 24}, ValueError, "block_k"),
        ({"x": torch.randn(4, 64)}, ValueError, "needs shape"),
    ],
)
def test_bad_input(kwargs, exc, match):
    _, packed, scale, zero_point = _layer(8, 32, 16, torch.uint8)
    args = {
        "x": torch.randn(4, 32),
        "packed": packed,
        "scale": scale,
        "zero_point": zero_point,
        "group_size": 16,
    }
    args.update(kwargs)
    with pytest.raises(exc, match=match):
        K.w4a16_matmul(**args)
