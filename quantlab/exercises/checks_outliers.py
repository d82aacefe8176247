"""Exercises of labs 03 (activation outliers, LLM.int8()) and 04 (SmoothQuant).

* ``03.outlier_columns``: LLM.int8()'s outlier rule, the columns of ``A`` with an element
  ``|a| >= threshold`` (reference :func:`quantlab.outliers.outlier_columns`).
* ``03.int8_decomposition``: the mixed-precision matmul of the paper's Eq. 7, vector-wise int8 for the
  regular columns plus a 16-bit matmul of the outlier columns with the weight's own columns (reference:
  the int8 part of :func:`quantlab.outliers.int8_matmul_with_outliers` plus ``A[:, O] @ W[:, O].T``).
  bitsandbytes, and :func:`~quantlab.outliers.int8_matmul_with_outliers`, multiply the outlier
  columns by the *int8-dequantized* weight instead (it keeps only int8 weights); that variant is
  listed below as a known mistake so that a student who copied it is told the difference.
* ``04.smoothing_factors``: SmoothQuant's ``s_j = max|X_j|^alpha / max_i max|W_i[:, j]|^(1-alpha)``
  with the reference code's clamps (reference :func:`quantlab.smoothquant.smoothing_factors`).

Every case's tensors are exactly representable in float16 (LLM.int8() quantizes ``A.half()``), so a
float32 implementation computes the same codes as the library; no row's absmax depends on whether the
outlier *elements* or whole outlier *columns* are left out (both are correct readings of the paper).
The cases are chosen so that each known mistake gives a different output (values exactly at the
threshold separate ``>`` from ``>=``, a threshold of 0, an all-zero token row, a dead input channel,
alpha away from 0.5, ...).

References:
    Dettmers et al., "LLM.int8(): 8-bit Matrix Multiplication for Transformers at Scale", NeurIPS 2022
    (Sec. 3.1 vector-wise quantization, Sec. 3.2 / Eq. 7 mixed-precision decomposition).
    Xiao et al., "SmoothQuant", ICML 2023 (Sec. 4, Eq. 4 migration strength alpha).
"""

from __future__ import annotations

import torch

from quantlab.exercises.core import Case, Exercise, Mistake
from quantlab.outliers import int8_matmul_with_outliers, outlier_columns
from quantlab.smoothquant import SCALE_EPS, smoothing_factors

__all__ = ["EXERCISES", "LAB04_EXERCISES"]

_Q = 127  # the restricted int8 grid [-127, 127]


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _f16(x: torch.Tensor) -> torch.Tensor:
    """Round to the nearest float16 value (kept as float32): the library quantizes ``A.half()``."""
    return x.half().float()


# -----------------------------------------------------------------------------
# 03.outlier_columns: columns of A with at least one |a| >= threshold (none when threshold == 0)


def _ref_outlier_columns(A, threshold):
    return outlier_columns(A, threshold)


def _outlier_columns_cases() -> list[Case]:
    g = _gen(30)
    a = torch.randn(16, 32, generator=g)
    a[3, 5], a[11, 17], a[0, 30] = 8.0, -12.0, 6.5
    at = 0.5 * torch.randn(6, 10, generator=g)
    at[2, 1], at[4, 7], at[1, 8] = 6.0, -6.0, 5.99
    tall = torch.randn(40, 8, generator=g)
    tall[7, 2], tall[33, 6] = 9.0, -7.0
    order = torch.randn(5, 24, generator=g)
    order[0, 20], order[1, 3], order[4, 20], order[2, 11] = 7.0, -9.0, 6.2, 30.0
    column_mean = torch.randn(8, 12, generator=g) * 0.1
    column_mean[:, 4] = 7.0  # a whole column above the threshold: its mean is too
    column_mean[6, 9] = -50.0  # one huge element: the column mean is only ~6.3
    return [
        Case("three outliers, threshold 6", (a, 6.0), "(16, 32) N(0, 1) with +8, -12, +6.5 planted"),
        Case("values exactly at the threshold", (at, 6.0), "+6.0 and -6.0 count, 5.99 does not"),
        Case("threshold 0 turns the rule off", (a, 0.0), "no outlier columns"),
        Case("no outliers", (torch.randn(4, 16, generator=g), 6.0), "an empty (0,) index tensor"),
        Case("more tokens than features", (tall, 6.0), "(40, 8): columns are features, not tokens"),
        Case("several outliers in one column", (order, 6.0), "column 20 twice, rows in any order"),
        Case("one huge element", (column_mean, 6.0), "column 9 has one |a| = 50 and tiny values"),
    ]


def _oc_strict(A, threshold):
    if threshold == 0:
        return torch.zeros(0, dtype=torch.int64)
    return torch.nonzero((A.abs() > threshold).any(dim=0)).flatten()


def _oc_no_abs(A, threshold):
    if threshold == 0:
        return torch.zeros(0, dtype=torch.int64)
    return torch.nonzero((A >= threshold).any(dim=0)).flatten()


def _oc_rows(A, threshold):
    if threshold == 0:
        return torch.zeros(0, dtype=torch.int64)
    return torch.nonzero((A.abs() >= threshold).any(dim=1)).flatten()


def _oc_not_flat(A, threshold):
    if threshold == 0:
        return torch.zeros(0, 1, dtype=torch.int64)
    return torch.nonzero((A.abs() >= threshold).any(dim=0))


def _oc_threshold_zero(A, threshold):
    return torch.nonzero((A.abs() >= threshold).any(dim=0)).flatten()


def _oc_column_mean(A, threshold):
    if threshold == 0:
        return torch.zeros(0, dtype=torch.int64)
    return torch.nonzero(A.abs().mean(dim=0) >= threshold).flatten()


def _oc_per_element(A, threshold):
    if threshold == 0:
        return torch.zeros(0, dtype=torch.int64)
    return torch.nonzero(A.abs() >= threshold)[:, 1]


OUTLIER_COLUMNS = Exercise(
    id="03.outlier_columns",
    title="LLM.int8()'s outlier columns: features with at least one |a| >= threshold",
    signature="find_outlier_columns(A, threshold) -> sorted int64 column indices",
    hint=(
        "mask = A.abs() >= threshold; a column is an outlier if ANY of its tokens is: mask.any(dim=0); "
        "return torch.nonzero(...).flatten(); threshold 0 means no outliers"
    ),
    reference=_ref_outlier_columns,
    cases=_outlier_columns_cases,
    output_name="the outlier column indices",
    mistakes=(
        Mistake(
            "used > instead of >=: a value exactly at the threshold (|a| = 6.0) is an outlier.", _oc_strict
        ),
        Mistake(
            "forgot the absolute value: large NEGATIVE values are outliers too (A.abs() >= threshold).",
            _oc_no_abs,
        ),
        Mistake(
            "found outlier tokens (rows) instead of feature columns: reduce over the tokens, "
            "mask.any(dim=0), one entry per column of A.",
            _oc_rows,
        ),
        Mistake(
            "returned torch.nonzero's (n, 1) matrix; flatten it to a 1-D tensor of indices (.flatten()).",
            _oc_not_flat,
        ),
        Mistake(
            "with threshold 0 every column is returned; LLM.int8() (and bitsandbytes) use threshold 0 "
            "to turn the decomposition OFF: return no columns.",
            _oc_threshold_zero,
        ),
        Mistake(
            "compared the column's MEAN |a| with the threshold; one element |a| >= threshold is enough "
            "(mask.any(dim=0)).",
            _oc_column_mean,
        ),
        Mistake(
            "returned one index per outlier ELEMENT (torch.nonzero(mask)[:, 1]): duplicates, in row order. "
            "Reduce over the tokens first, mask.any(dim=0), then take the nonzero indices.",
            _oc_per_element,
        ),
    ),
)


# -----------------------------------------------------------------------------
# 03.int8_decomposition: X W^T = X[:, O] W[:, O]^T (16-bit) + s_X s_W^T / 127^2 (X_i8 W_i8^T)


def _ref_decomposition(A, W, threshold):
    _, dec = int8_matmul_with_outliers(A, W, threshold)
    cols = dec.outlier_cols
    return dec.int8_output + A[:, cols] @ W[:, cols].T  # (tokens, out): Eq. 7 with W's own columns


def _away_from_ties(x: torch.Tensor, threshold: float) -> torch.Tensor:
    """Nudge the values whose code ``|x| * 127 / absmax`` is within 0.02 of a tie (k + 0.5), row by row.

    float16 values have few mantissa bits, so exact or near ties are common; there ``x * (127 / m)``
    (the library), ``x * 127 / m`` and ``x / (m / 127)`` may round differently, and a correct student
    would fail. Rows' absmax leave out the outlier columns (``|x| >= threshold``; none if 0).
    """
    for _ in range(20):
        if threshold > 0:
            cols = (x.abs() >= threshold).any(dim=0)  # (cols,)
        else:
            cols = torch.zeros(x.shape[1], dtype=torch.bool)
        reg = x.masked_fill(cols, 0.0)  # (rows, cols)
        m = reg.abs().amax(dim=1, keepdim=True)  # (rows, 1)
        v = reg.abs() * _Q / torch.where(m > 0, m, torch.ones_like(m))
        near = (v - v.floor() - 0.5).abs() < 0.02
        if not bool(near.any()):
            return x
        x = torch.where(near, _f16(x * 1.03), x)
    raise RuntimeError("could not move the case's values away from rounding ties")


def _decomposition_cases() -> list[Case]:
    g = _gen(31)

    def problem(tokens, fin, fout, outliers, w_scale=0.05, threshold=6.0, w_rows=None):
        A = torch.randn(tokens, fin, generator=g)
        for _, j in outliers:
            # The other values of an outlier column stay small, so no row's absmax depends on whether
            # the outlier elements (bitsandbytes) or the whole outlier columns are left out of it.
            A[:, j] *= 0.1
        for (i, j), v in outliers.items():
            A[i, j] = v
        W = w_scale * torch.randn(fout, fin, generator=g)
        if w_rows is not None:
            W = W * w_rows.unsqueeze(1)  # rows of very different size
        return _away_from_ties(_f16(A), threshold), _away_from_ties(_f16(W), 0.0)

    A1, W1 = problem(12, 64, 16, {(2, 7): 20.0, (9, 40): -35.0, (5, 7): 14.0})
    A2, W2 = problem(8, 32, 24, {(1, 3): 6.0, (6, 20): -6.0, (3, 11): 9.5})  # exactly at the threshold
    A3, W3 = problem(10, 48, 8, {(0, 1): 50.0, (0, 2): 25.0, (7, 30): -18.0})  # two outliers in one row
    A4, W4 = problem(6, 32, 12, {(4, 9): 12.0})
    A4[2] = 0.0  # an all-zero token row (padding)
    A5, W5 = problem(16, 40, 10, {(3, 5): 30.0}, w_scale=1.0, threshold=0.0)
    A6, W6 = problem(9, 24, 7, {}, w_rows=torch.linspace(0.2, 5.0, 7))
    return [
        Case("three outliers, threshold 6", (A1, W1, 6.0), "A (12, 64), W (16, 64); columns 7 and 40"),
        Case("values exactly at the threshold", (A2, W2, 6.0), "+6.0 and -6.0 are outliers"),
        Case("two outliers in one token", (A3, W3, 6.0), "row 0 has 50 and 25"),
        Case("an all-zero token", (A4, W4, 6.0), "row 2 is all zeros (padding)"),
        Case("threshold 0 = decomposition off", (A5, W5, 0.0), "plain vector-wise int8, |a| up to 30"),
        Case("no outliers, weight rows of different size", (A6, W6, 6.0), "one scale per weight row"),
    ]


def _split(A, threshold, strict=False):
    if threshold == 0:
        return torch.zeros(A.shape[1], dtype=torch.bool)
    big = A.abs() > threshold if strict else A.abs() >= threshold
    return big.any(dim=0)  # (in,) outlier columns


def _decompose(
    A,
    W,
    threshold,
    *,
    strict=False,
    zero_outliers_in_int8=True,
    add_fp16=True,
    absmax_with_outliers=False,
    w_outlier_dequant=False,
    qmax=_Q,
    rounder=torch.round,
    a_per_tensor=False,
    w_mode="row",
    nan_on_zero=False,
):
    """A configurable LLM.int8() from which every mistake below is one switch away from correct."""
    cols = _split(A, threshold, strict)
    A_reg = A.clone()
    if not absmax_with_outliers:
        A_reg[:, cols] = 0.0
    m_A = A_reg.abs().amax() if a_per_tensor else A_reg.abs().amax(dim=1, keepdim=True)  # (tokens, 1)
    safe_A = m_A if nan_on_zero else torch.where(m_A > 0, m_A, torch.ones_like(m_A))
    A_q = A.clone()
    if zero_outliers_in_int8:
        A_q[:, cols] = 0.0
    codes_A = rounder(A_q * qmax / safe_A)
    if w_mode == "row":
        m_W = W.abs().amax(dim=1, keepdim=True)  # (out, 1)
    elif w_mode == "tensor":
        m_W = W.abs().amax()
    else:  # "column": one scale per input channel, (1, in)
        m_W = W.abs().amax(dim=0, keepdim=True)
    codes_W = rounder(W * qmax / m_W)
    W_hat = codes_W * m_W / qmax  # (out, in)
    out = (codes_A * safe_A / qmax) @ W_hat.T  # (tokens, out)
    if add_fp16:
        W_o = W_hat[:, cols] if w_outlier_dequant else W[:, cols]
        out = out + A[:, cols] @ W_o.T
    return out


def _d_no_decomposition(A, W, threshold):
    return _decompose(A, W, 0.0)


def _d_counted_twice(A, W, threshold):
    return _decompose(A, W, threshold, zero_outliers_in_int8=False)


def _d_dropped_outliers(A, W, threshold):
    return _decompose(A, W, threshold, add_fp16=False)


def _d_absmax_with_outliers(A, W, threshold):
    return _decompose(A, W, threshold, absmax_with_outliers=True)


def _d_strict(A, W, threshold):
    return _decompose(A, W, threshold, strict=True)


def _d_threshold_zero_all(A, W, threshold):
    if threshold == 0:
        return A @ W.T  # every column "reaches" |a| >= 0: everything in 16 bits
    return _decompose(A, W, threshold)


def _d_a_per_tensor(A, W, threshold):
    return _decompose(A, W, threshold, a_per_tensor=True)


def _d_w_per_tensor(A, W, threshold):
    return _decompose(A, W, threshold, w_mode="tensor")


def _d_w_per_column(A, W, threshold):
    return _decompose(A, W, threshold, w_mode="column")


def _d_128(A, W, threshold):
    return _decompose(A, W, threshold, qmax=128)


def _d_truncate(A, W, threshold):
    return _decompose(A, W, threshold, rounder=torch.trunc)


def _d_nan_on_zero_row(A, W, threshold):
    return _decompose(A, W, threshold, nan_on_zero=True)


def _d_bitsandbytes(A, W, threshold):
    return int8_matmul_with_outliers(A, W, threshold)[0]


INT8_DECOMPOSITION = Exercise(
    id="03.int8_decomposition",
    title="LLM.int8(): vector-wise int8 matmul plus the outlier columns in 16 bits (Eq. 7)",
    signature="llm_int8_matmul(A, W, threshold) -> (tokens, out)",
    hint=(
        "O = outlier columns of A; int8 part: zero A's outlier columns, per-row absmax m_A and "
        "per-weight-row m_W, codes round(x * 127 / m), (codes_A @ codes_W.T) * m_A m_W^T / 127**2; "
        "then add A[:, O] @ W[:, O].T"
    ),
    reference=_ref_decomposition,
    cases=_decomposition_cases,
    output_name="the output",
    rtol=1e-4,
    atol=1e-4,
    mistakes=(
        Mistake(
            "no decomposition: the outliers stayed in the int8 matmul and set the scale of their whole "
            "token. Find the outlier columns, take them out of the int8 part and multiply them in 16 bits.",
            _d_no_decomposition,
        ),
        Mistake(
            "the outlier columns are counted twice: set them to 0 in the int8 part (A[:, O] = 0 before "
            "quantizing) since A[:, O] @ W[:, O].T already adds them.",
            _d_counted_twice,
        ),
        Mistake(
            "the outliers were removed but never added back: add the 16-bit part A[:, O] @ W[:, O].T.",
            _d_dropped_outliers,
        ),
        Mistake(
            "the row absmax of A still includes the outliers, so they still set the step of every other "
            "feature of their token: take the absmax AFTER zeroing the outlier columns.",
            _d_absmax_with_outliers,
        ),
        Mistake(
            "used > instead of >=: a value exactly at the threshold (|a| = 6.0) is an outlier.", _d_strict
        ),
        Mistake(
            "with threshold 0 every column went to 16 bits (the exact product); threshold 0 turns the "
            "decomposition OFF: no outlier columns, plain vector-wise int8.",
            _d_threshold_zero_all,
        ),
        Mistake(
            "one scale for the whole of A (per-tensor); vector-wise quantization gives every token (row) "
            "its own absmax: A_reg.abs().amax(dim=1, keepdim=True).",
            _d_a_per_tensor,
        ),
        Mistake(
            "one scale for the whole weight (per-tensor); vector-wise quantization gives every output row "
            "of W its own absmax: W.abs().amax(dim=1, keepdim=True).",
            _d_w_per_tensor,
        ),
        Mistake(
            "the weight's scales are per INPUT column (amax over dim 0); they must be per output row "
            "(amax over dim 1) so that they factor out of the integer matmul as the outer product m_A m_W^T.",
            _d_w_per_column,
        ),
        Mistake(
            "divided by 128: the symmetric int8 grid used by LLM.int8() is [-127, 127], code = "
            "round(x * 127 / absmax).",
            _d_128,
        ),
        Mistake(
            "truncated toward zero (int() / .to(torch.int8) / torch.trunc) instead of rounding to the "
            "nearest code (torch.round).",
            _d_truncate,
        ),
        Mistake(
            "an all-zero token row has absmax 0 and 0 / 0 = NaN: give such rows codes 0 (e.g. divide by "
            "torch.where(m > 0, m, 1)).",
            _d_nan_on_zero_row,
        ),
        Mistake(
            "you multiplied the outlier columns by the int8-DEQUANTIZED weight, which is what bitsandbytes "
            "(and quantlab.outliers) do because they keep only the int8 weight; this exercise follows the "
            "paper's Eq. 7: use the weight's own 16-bit columns, A[:, O] @ W[:, O].T.",
            _d_bitsandbytes,
        ),
    ),
)


# -----------------------------------------------------------------------------
# 04.smoothing_factors: s_j = max|X_j|^alpha / max_i max|W_i[:, j]|^(1 - alpha), clamped at 1e-5


def _ref_smoothing(act_scales, weights, alpha):
    return smoothing_factors(act_scales, weights, alpha)


def _smoothing_cases() -> list[Case]:
    g = _gen(40)
    act = torch.rand(64, generator=g) * 2 + 0.1
    act[[3, 17, 40]] = torch.tensor([60.0, 25.0, 120.0])  # outlier channels
    q = 0.05 * torch.randn(64, 64, generator=g)
    k = 0.05 * torch.randn(16, 64, generator=g)
    v = 0.05 * torch.randn(16, 64, generator=g)
    v[:, 9] *= 10.0  # channel 9's largest weight is in v, not in q
    dead_act = torch.rand(32, generator=g) + 0.5
    dead_act[6] = 0.0  # a channel that never fired during calibration
    dead_w = torch.randn(48, 32, generator=g)
    dead_w[:, 12] = 1e-7  # an input channel the weights (almost) ignore: max|W_12| is clamped to 1e-5
    neg = -torch.rand(8, 16, generator=g) - 0.1  # every weight negative: max W != max |W|
    return [
        Case("by hand", (torch.tensor([16.0, 1.0]), [torch.tensor([[1.0, 4.0]])], 0.5), "s = 4, 0.5"),
        Case("q, k, v, alpha 0.5", (act, [q, k, v], 0.5), "three (out_i, 64) weights share the input"),
        Case("q, k, v, alpha 0.8", (act, [q, k, v], 0.8), "most of the difficulty moves to the weights"),
        Case("alpha 0", (act, [q, k, v], 0.0), "s = 1 / max|W_j|"),
        Case("alpha 1", (act, [q, k, v], 1.0), "s = max|X_j|"),
        Case("a dead and an unread channel", (dead_act, [dead_w], 0.5), "max|X_6| = 0, |W[:, 12]| = 1e-7"),
        Case("one square weight, alpha 0.3", (act, [q], 0.3), "W (64, 64)"),
        Case("negative weights, alpha 0.6", (torch.rand(16, generator=g) + 0.5, [neg], 0.6), ""),
    ]


def _w_max(weights):
    return torch.stack([w.abs().amax(dim=0) for w in weights]).amax(dim=0)  # (in,)


def _s_swapped(act, weights, alpha):
    w = _w_max(weights).clamp(min=SCALE_EPS)
    return (act.pow(1 - alpha) / w.pow(alpha)).clamp(min=SCALE_EPS)


def _s_inverted(act, weights, alpha):
    w = _w_max(weights).clamp(min=SCALE_EPS)
    return (w.pow(1 - alpha) / act.clamp(min=SCALE_EPS).pow(alpha)).clamp(min=SCALE_EPS)


def _s_product(act, weights, alpha):
    w = _w_max(weights).clamp(min=SCALE_EPS)
    return (act.pow(alpha) * w.pow(1 - alpha)).clamp(min=SCALE_EPS)


def _s_row_max(act, weights, alpha):
    w = torch.stack([x.abs().amax(dim=1) for x in weights]).amax(dim=0).clamp(min=SCALE_EPS)
    return (act.pow(alpha) / w.pow(1 - alpha)).clamp(min=SCALE_EPS)


def _s_first_only(act, weights, alpha):
    w = weights[0].abs().amax(dim=0).clamp(min=SCALE_EPS)
    return (act.pow(alpha) / w.pow(1 - alpha)).clamp(min=SCALE_EPS)


def _s_mean(act, weights, alpha):
    w = torch.stack([x.abs().mean(dim=0) for x in weights]).amax(dim=0).clamp(min=SCALE_EPS)
    return (act.pow(alpha) / w.pow(1 - alpha)).clamp(min=SCALE_EPS)


def _s_no_abs(act, weights, alpha):
    w = torch.stack([x.amax(dim=0) for x in weights]).amax(dim=0).clamp(min=SCALE_EPS)
    return (act.pow(alpha) / w.pow(1 - alpha)).clamp(min=SCALE_EPS)


def _s_sqrt(act, weights, alpha):
    w = _w_max(weights).clamp(min=SCALE_EPS)
    return (act.sqrt() / w.sqrt()).clamp(min=SCALE_EPS)


def _s_no_weight_clamp(act, weights, alpha):
    return (act.pow(alpha) / _w_max(weights).pow(1 - alpha)).clamp(min=SCALE_EPS)


def _s_no_clamp(act, weights, alpha):
    w = _w_max(weights).clamp(min=SCALE_EPS)
    return act.pow(alpha) / w.pow(1 - alpha)


SMOOTHING_FACTORS = Exercise(
    id="04.smoothing_factors",
    title="SmoothQuant's smoothing factors s_j = max|X_j|^alpha / max|W_j|^(1 - alpha) (Eq. 4)",
    signature="smoothing_factors(act_scales, weights, alpha) -> s (in,)",
    hint=(
        "w_j = max over the weights of W.abs().amax(dim=0), clamped at 1e-5; "
        "s = (act_scales ** alpha / w ** (1 - alpha)).clamp(min=1e-5)"
    ),
    reference=_ref_smoothing,
    cases=_smoothing_cases,
    output_name="s",
    rtol=1e-5,
    atol=1e-9,
    mistakes=(
        Mistake(
            "the exponents are swapped: alpha goes on the ACTIVATION scale, 1 - alpha on the weight's "
            "(alpha = 1 moves all of the difficulty to the weights: s = max|X_j|).",
            _s_swapped,
        ),
        Mistake(
            "returned 1 / s: the activations are DIVIDED by s, so s must be large where max|X_j| is: "
            "s = max|X_j|^alpha / max|W_j|^(1 - alpha).",
            _s_inverted,
        ),
        Mistake("multiplied by the weight term; divide: max|X_j|^alpha / max|W_j|^(1 - alpha).", _s_product),
        Mistake(
            "took the weight maximum per OUTPUT row (dim=1); s has one entry per INPUT channel j, so reduce "
            "each weight over its rows: W.abs().amax(dim=0).",
            _s_row_max,
        ),
        Mistake(
            "used only the first weight; every linear that reads these activations (q, k and v) is "
            "multiplied by s, so take the maximum over all of them.",
            _s_first_only,
        ),
        Mistake("averaged |W| over the rows; SmoothQuant uses the maximum, W.abs().amax(dim=0).", _s_mean),
        Mistake(
            "forgot the absolute value of the weights: use max |W_j| (a negative column has max W < 0).",
            _s_no_abs,
        ),
        Mistake(
            "always used square roots (alpha = 0.5); use the alpha you are given: act ** alpha and "
            "w ** (1 - alpha).",
            _s_sqrt,
        ),
        Mistake(
            "the weight scale max|W_j| was not clamped: a channel whose weights are (almost) all 0 gets a "
            "huge s (or inf for exact zeros); clamp it at 1e-5 first, as the reference code does.",
            _s_no_weight_clamp,
        ),
        Mistake(
            "a channel with max|X_j| = 0 gives s = 0, which cannot be divided by: clamp s at 1e-5 "
            "(.clamp(min=1e-5)).",
            _s_no_clamp,
        ),
    ),
)

# One tuple per lab: the registry reads lab 03's as ``EXERCISES`` and lab 04's through the entry
# "quantlab.exercises.checks_outliers:LAB04_EXERCISES" of ``core.CHECK_MODULES``.
EXERCISES: tuple[Exercise, ...] = (OUTLIER_COLUMNS, INT8_DECOMPOSITION)
LAB04_EXERCISES: tuple[Exercise, ...] = (SMOOTHING_FACTORS,)
