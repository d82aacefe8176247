"""Exercises of lab 01 (uniform quantization): asymmetric quantize / dequantize, min-max calibration.

Each exercise's reference is a call into :mod:`quantlab.uniform`; its cases mix random inputs with
adversarial ones chosen so that every known mistake below gives a *different* output (exact ties at
``.5`` separate the rounding modes, inputs beyond the grid separate the clamps, all-positive inputs
reveal a range that was not stretched to contain 0, ...).

References:
    Jacob et al., "Quantization and Training of Neural Networks for Efficient Integer-Arithmetic-Only
    Inference", CVPR 2018, Eq. 1-2 (affine quantization, integer zero-point).
"""

from __future__ import annotations

import torch

from quantlab.exercises.core import Case, Exercise, Mistake
from quantlab.uniform import affine_params, dequantize, quantize

__all__ = ["EXERCISES"]


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# -----------------------------------------------------------------------------
# 01.asymmetric_quantize: codes = clamp(round(x / scale) + zero_point, 0, 2^b - 1)


def _ref_quantize(x, scale, zero_point, n_bits):
    return quantize(x, scale, zero_point, 0, 2**n_bits - 1)


def _quantize_cases() -> list[Case]:
    g = _gen(0)
    x = torch.randn(64, generator=g)
    s, z = affine_params(x.min(), x.max(), 4)
    rows = torch.randn(3, 5, generator=g) * torch.tensor([[1.0], [5.0], [0.1]])
    rs, rz = affine_params(rows.amin(dim=1, keepdim=True), rows.amax(dim=1, keepdim=True), 8)
    neg = -4 * torch.rand(32, generator=g)
    ns, nz = affine_params(neg.min(), neg.max(), 8)
    x2 = torch.randn(40, generator=g)
    s2, z2 = affine_params(x2.min(), x2.max(), 2)
    ties = (torch.arange(-12, 12, dtype=torch.float32) + 0.5) * 0.25  # x / scale = k + 0.5 exactly
    return [
        Case("random normal, 4 bits", (x, s, z, 4), "x ~ N(0, 1), 64 values, min-max scale and zero-point"),
        Case(
            "ties at .5",
            (ties, torch.tensor(0.25), torch.tensor(8.0), 4),
            "x / scale = k + 0.5, zero_point 8",
        ),
        Case(
            "values beyond the grid",
            (torch.linspace(-3, 3, 25), torch.tensor(0.1), torch.tensor(5.0), 4),
            "the 4-bit grid covers [-0.5, 1.0]; most values must be clipped",
        ),
        Case("per-row scale and zero-point", (rows, rs, rz, 8), "x (3, 5), scale and zero_point (3, 1)"),
        Case("all zeros", (torch.zeros(2, 4), torch.tensor(0.5), torch.tensor(3.0), 4), "zero_point 3"),
        Case("negative inputs, 8 bits", (neg, ns, nz, 8), "zero_point is 255"),
        Case("2 bits", (x2, s2, z2, 2), "codes 0..3"),
    ]


def _q_round_first(x, scale, zero_point, n_bits):
    return torch.clamp(torch.round(x) / scale + zero_point, 0, 2**n_bits - 1)


def _q_no_clamp(x, scale, zero_point, n_bits):
    return torch.round(x / scale) + zero_point


def _q_signed_clamp(x, scale, zero_point, n_bits):
    return torch.clamp(torch.round(x / scale) + zero_point, -(2 ** (n_bits - 1)), 2 ** (n_bits - 1) - 1)


def _q_clamp_to_2b(x, scale, zero_point, n_bits):
    return torch.clamp(torch.round(x / scale) + zero_point, 0, 2**n_bits)


def _q_floor(x, scale, zero_point, n_bits):
    return torch.clamp(torch.floor(x / scale) + zero_point, 0, 2**n_bits - 1)


def _q_trunc(x, scale, zero_point, n_bits):
    return torch.clamp(torch.trunc(x / scale) + zero_point, 0, 2**n_bits - 1)


def _q_half_up(x, scale, zero_point, n_bits):
    return torch.clamp(torch.floor(x / scale + 0.5) + zero_point, 0, 2**n_bits - 1)


def _q_half_away(x, scale, zero_point, n_bits):
    v = x / scale
    return torch.clamp(torch.sign(v) * torch.floor(v.abs() + 0.5) + zero_point, 0, 2**n_bits - 1)


def _q_sub_zero_point(x, scale, zero_point, n_bits):
    return torch.clamp(torch.round(x / scale) - zero_point, 0, 2**n_bits - 1)


def _q_zero_point_before_divide(x, scale, zero_point, n_bits):
    return torch.clamp(torch.round((x + zero_point) / scale), 0, 2**n_bits - 1)


def _q_times_scale(x, scale, zero_point, n_bits):
    return torch.clamp(torch.round(x * scale) + zero_point, 0, 2**n_bits - 1)


def _q_clamp_before_zero_point(x, scale, zero_point, n_bits):
    return torch.clamp(torch.round(x / scale), 0, 2**n_bits - 1) + zero_point


ASYMMETRIC_QUANTIZE = Exercise(
    id="01.asymmetric_quantize",
    title="Asymmetric quantization: real values to unsigned integer codes",
    signature="asymmetric_quantize(x, scale, zero_point, n_bits) -> codes",
    hint="divide by the scale, round (torch.round), add the zero-point, clamp to [0, 2**n_bits - 1]",
    reference=_ref_quantize,
    cases=_quantize_cases,
    output_name="the codes",
    mistakes=(
        Mistake("rounded before dividing by the scale: compute x / scale first, then round.", _q_round_first),
        Mistake(
            "forgot to clamp: codes must stay in [0, 2**n_bits - 1], values beyond the grid are clipped "
            "(torch.clamp).",
            _q_no_clamp,
        ),
        Mistake(
            "clamped to the signed range [-2**(n_bits-1), 2**(n_bits-1) - 1]; asymmetric codes are "
            "unsigned: [0, 2**n_bits - 1].",
            _q_signed_clamp,
        ),
        Mistake(
            "clamped to [0, 2**n_bits]: the largest n-bit code is 2**n_bits - 1 (15 for 4 bits).",
            _q_clamp_to_2b,
        ),
        Mistake("used floor instead of round: torch.round(x / scale) rounds to the nearest code.", _q_floor),
        Mistake(
            "truncated toward zero (int() / .long() / torch.trunc) instead of rounding to the nearest code "
            "(torch.round).",
            _q_trunc,
        ),
        Mistake(
            "rounded ties upward (floor(v + 0.5)); quantlab rounds half to even like torch.round "
            "(2.5 -> 2, 3.5 -> 4), which is unbiased.",
            _q_half_up,
        ),
        Mistake(
            "rounded ties away from zero (C's roundf); use torch.round, which rounds half to even "
            "(2.5 -> 2, -2.5 -> -2).",
            _q_half_away,
        ),
        Mistake(
            "subtracted the zero-point: quantize ADDS it (the code of 0.0 is zero_point); dequantize "
            "subtracts it.",
            _q_sub_zero_point,
        ),
        Mistake(
            "added the zero-point to x before dividing; it is a code: add it after round(x / scale).",
            _q_zero_point_before_divide,
        ),
        Mistake(
            "multiplied by the scale: quantize divides (x / scale), dequantize multiplies.", _q_times_scale
        ),
        Mistake(
            "clamped before adding the zero-point: the clamp bounds apply to the final codes, "
            "clamp(round(x / scale) + zero_point, 0, 2**n_bits - 1).",
            _q_clamp_before_zero_point,
        ),
    ),
)


# -----------------------------------------------------------------------------
# 01.asymmetric_dequantize: x_hat = scale * (codes - zero_point)


def _ref_dequantize(codes, scale, zero_point):
    return dequantize(codes, scale, zero_point)


def _dequantize_cases() -> list[Case]:
    g = _gen(1)
    codes = torch.randint(0, 16, (48,), generator=g).float()
    rows = torch.randint(0, 256, (3, 5), generator=g).float()
    return [
        Case(
            "random 4-bit codes", (codes, torch.tensor(0.37), torch.tensor(6.0)), "scale 0.37, zero_point 6"
        ),
        Case(
            "uint8 codes, int zero-point",
            (torch.tensor([0, 1, 2, 3, 9, 15], dtype=torch.uint8), 0.5, 3),
            "codes stored as torch.uint8, zero_point the Python int 3",
        ),
        Case(
            "per-row scale and zero-point",
            (rows, torch.tensor([[0.01], [0.2], [3.0]]), torch.tensor([[0.0], [128.0], [255.0]])),
            "codes (3, 5), scale and zero_point (3, 1)",
        ),
        Case(
            "codes equal to the zero-point",
            (torch.full((2, 3), 7.0), torch.tensor(0.25), torch.tensor(7.0)),
            "",
        ),
    ]


def _dq_no_zero_point(codes, scale, zero_point):
    return scale * codes.float()


def _dq_add_zero_point(codes, scale, zero_point):
    return scale * (codes.float() + zero_point)


def _dq_divide(codes, scale, zero_point):
    return (codes.float() - zero_point) / scale


def _dq_zero_point_after_scale(codes, scale, zero_point):
    return scale * codes.float() - zero_point


def _dq_uint8_wrap(codes, scale, zero_point):
    return scale * (codes - zero_point)


def _dq_rounded(codes, scale, zero_point):
    return torch.round(scale * (codes.float() - zero_point))


ASYMMETRIC_DEQUANTIZE = Exercise(
    id="01.asymmetric_dequantize",
    title="Asymmetric dequantization: integer codes back to real values",
    signature="asymmetric_dequantize(codes, scale, zero_point) -> x_hat",
    hint="convert the codes to float, subtract the zero-point, multiply by the scale",
    reference=_ref_dequantize,
    cases=_dequantize_cases,
    output_name="x_hat",
    rtol=1e-5,
    atol=1e-6,
    mistakes=(
        Mistake(
            "forgot to subtract the zero-point: x_hat = scale * (codes - zero_point).", _dq_no_zero_point
        ),
        Mistake(
            "added the zero-point; dequantize subtracts it: scale * (codes - zero_point).", _dq_add_zero_point
        ),
        Mistake("divided by the scale; dequantize multiplies: scale * (codes - zero_point).", _dq_divide),
        Mistake(
            "subtracted the zero-point after scaling; it is in code units, so subtract it from the codes "
            "first: scale * (codes - zero_point).",
            _dq_zero_point_after_scale,
        ),
        Mistake(
            "subtracted the zero-point in uint8 arithmetic, which wraps around below 0 (0 - 3 = 253): "
            "convert the codes to float first (codes.float()).",
            _dq_uint8_wrap,
        ),
        Mistake(
            "rounded the result: dequantized values are real numbers, multiples of the scale.", _dq_rounded
        ),
    ),
)


# -----------------------------------------------------------------------------
# 01.minmax_calibration: per-tensor affine parameters from the observed [min, max]


def _ref_calibrate(x, n_bits):
    return affine_params(x.min(), x.max(), n_bits)


def _calibrate_cases() -> list[Case]:
    g = _gen(2)
    outlier = torch.randn(1000, generator=g)
    outlier[123] = 50.0
    return [
        Case("random normal, 4 bits", (torch.randn(256, generator=g), 4), ""),
        Case("all positive (ReLU outputs)", (3 * torch.rand(100, generator=g) + 0.5, 8), "min(x) = 0.5 > 0"),
        Case("all negative", (-(torch.rand(50, generator=g) + 0.2), 4), "max(x) < 0"),
        Case("all zeros", (torch.zeros(16), 4), "min = max = 0"),
        Case("zero-point tie", (torch.tensor([-0.5, 2.5]), 2), "scale 1, -min / scale = 0.5 exactly"),
        Case("one outlier", (outlier, 8), "one value is 50"),
        Case(
            "2-D input, 3 bits", (torch.randn(4, 8, generator=g), 3), "one (scale, zero_point) for the tensor"
        ),
    ]


def _stretched(x):
    return torch.clamp(x.min(), max=0.0), torch.clamp(x.max(), min=0.0)


def _guard(scale):
    return torch.where(scale == 0, torch.ones_like(scale), scale)


def _c_unrounded(x, n_bits):
    lo, hi = _stretched(x)
    scale = _guard((hi - lo) / (2**n_bits - 1))
    return scale, -lo / scale


def _c_not_stretched(x, n_bits):
    lo, hi = x.min(), x.max()
    scale = _guard((hi - lo) / (2**n_bits - 1))
    return scale, torch.round(-lo / scale)


def _c_divide_2b(x, n_bits):
    lo, hi = _stretched(x)
    scale = _guard((hi - lo) / 2**n_bits)
    return scale, torch.round(-lo / scale)


def _c_zero_point_sign(x, n_bits):
    lo, hi = _stretched(x)
    scale = _guard((hi - lo) / (2**n_bits - 1))
    return scale, torch.round(lo / scale)


def _c_no_zero_guard(x, n_bits):
    lo, hi = _stretched(x)
    scale = (hi - lo) / (2**n_bits - 1)
    return scale, torch.round(-lo / scale)


def _c_floor(x, n_bits):
    lo, hi = _stretched(x)
    scale = _guard((hi - lo) / (2**n_bits - 1))
    return scale, torch.floor(-lo / scale)


def _c_half_up(x, n_bits):
    lo, hi = _stretched(x)
    scale = _guard((hi - lo) / (2**n_bits - 1))
    return scale, torch.floor(-lo / scale + 0.5)


MINMAX_CALIBRATION = Exercise(
    id="01.minmax_calibration",
    title="Min-max calibration: scale and zero-point from the observed range",
    signature="minmax_calibrate(x, n_bits) -> (scale, zero_point)",
    hint=(
        "stretch [min, max] to contain 0, scale = (max - min) / (2**n_bits - 1) (1 if that is 0), "
        "zero_point = round(-min / scale)"
    ),
    reference=_ref_calibrate,
    cases=_calibrate_cases,
    output_names=("scale", "zero_point"),
    rtol=1e-5,
    atol=1e-7,
    mistakes=(
        Mistake(
            "zero-point not rounded: it must be an integer code so that 0.0 is represented exactly "
            "(torch.round(-min / scale)).",
            _c_unrounded,
        ),
        Mistake(
            "the range was not stretched to contain 0: use min(x.min(), 0) and max(x.max(), 0); otherwise "
            "the zero-point leaves [0, 2**n_bits - 1] and 0.0 (padding, ReLU zeros) is not representable.",
            _c_not_stretched,
        ),
        Mistake(
            "divided the range by 2**n_bits; 2**n_bits codes have 2**n_bits - 1 steps between them.",
            _c_divide_2b,
        ),
        Mistake("the zero-point has the wrong sign: zero_point = round(-min / scale).", _c_zero_point_sign),
        Mistake(
            "an all-zero input gives scale 0 and a NaN zero-point (0 / 0): use scale 1 when max == min.",
            _c_no_zero_guard,
        ),
        Mistake("used floor for the zero-point; round it to the nearest integer (torch.round).", _c_floor),
        Mistake(
            "rounded the zero-point's ties upward (floor(v + 0.5)); use torch.round (half to even).",
            _c_half_up,
        ),
    ),
)

EXERCISES: tuple[Exercise, ...] = (ASYMMETRIC_QUANTIZE, ASYMMETRIC_DEQUANTIZE, MINMAX_CALIBRATION)
