"""Tests for quantlab.exercises.checks_outliers: every checker accepts the reference and other correct
implementations, rejects every known mistake with its own hint, and diagnoses mistakes written the way
a student would write them (the diagnosis must come from the outputs, not from the code)."""

from __future__ import annotations

import itertools

import pytest
import torch

from quantlab import exercises
from quantlab.exercises import checks_outliers, core
from quantlab.outliers import int8_matmul_with_outliers

OWN = checks_outliers.EXERCISES + checks_outliers.LAB04_EXERCISES
PAIRS = [(ex, m) for ex in OWN for m in ex.mistakes]


@pytest.fixture(autouse=True)
def _one_thread():
    """The cases are tiny: a thread pool only adds overhead (a lot of it on a busy machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _failure(exercise_id, fn) -> str:
    with pytest.raises(AssertionError) as info:
        exercises.check(exercise_id, fn, quiet=True)
    return str(info.value)


def _likely(message: str) -> list[str]:
    return [line for line in message.splitlines() if line.startswith("Likely mistake")]


# -----------------------------------------------------------------------------
# Registry and cases


def test_ids_and_labs():
    assert [ex.id for ex in OWN] == ["03.outlier_columns", "03.int8_decomposition", "04.smoothing_factors"]
    assert [ex.id for ex in exercises.list_exercises("03")] == ["03.outlier_columns", "03.int8_decomposition"]
    assert [ex.id for ex in exercises.list_exercises("04")] == ["04.smoothing_factors"]


@pytest.mark.parametrize("ex", OWN, ids=lambda ex: ex.id)
def test_cases_are_deterministic_and_float16_exact(ex):
    for ca, cb in zip(ex.cases(), ex.cases(), strict=True):
        for x, y in zip(ca.args, cb.args, strict=True):
            if isinstance(x, torch.Tensor):
                assert torch.equal(x, y), (ex.id, ca.name)
                if ex.id == "03.int8_decomposition":  # the library quantizes A.half(): make float32 exact
                    assert torch.equal(x.half().float(), x), (ex.id, ca.name)


def test_decomposition_cases_do_not_depend_on_the_absmax_reading():
    """Leaving out the outlier *elements* (bitsandbytes) or whole outlier *columns* gives the same row
    absmax on every case, so both readings of the paper pass."""
    for case in checks_outliers.INT8_DECOMPOSITION.cases():
        A, _, t = case.args
        if t == 0:
            continue
        cols = (A.abs() >= t).any(dim=0)
        by_element = A.abs().masked_fill(A.abs() >= t, 0).amax(dim=1)
        by_column = A.abs().masked_fill(cols, 0).amax(dim=1)
        assert torch.equal(by_element, by_column), case.name


# -----------------------------------------------------------------------------
# The reference passes, every known mistake fails with its own hint


@pytest.mark.parametrize("ex", OWN, ids=lambda ex: ex.id)
def test_reference_passes(ex, capsys):
    assert exercises.check(ex.id, ex.reference) is None
    assert f"passed all {len(ex.cases())} checks" in capsys.readouterr().out


@pytest.mark.parametrize("ex,mistake", PAIRS, ids=lambda v: getattr(v, "id", None) or v.fn.__name__)
def test_each_known_mistake_is_rejected_with_its_hint(ex, mistake):
    message = _failure(ex.id, mistake.fn)
    assert _likely(message) == [f"Likely mistake: {mistake.hint}"], message


@pytest.mark.parametrize("ex", OWN, ids=lambda ex: ex.id)
def test_mistakes_are_distinguishable_from_each_other(ex):
    cases = ex.cases()
    outcomes = {m.fn.__name__: core.run_cases(m.fn, cases) for m in ex.mistakes}
    for (n1, o1), (n2, o2) in itertools.combinations(outcomes.items(), 2):
        assert not all(core._agree(ex, a, b) for a, b in zip(o1, o2, strict=True)), (n1, n2)


def test_the_bitsandbytes_variant_differs_from_eq7_only_through_the_outlier_weights():
    """The reference (Eq. 7, W's own columns) and the library's output (int8-dequantized columns) agree
    exactly when there are no outliers, and differ by at most |A_O| |W_O - W_hat_O| otherwise."""
    ex = checks_outliers.INT8_DECOMPOSITION
    for case in ex.cases():
        A, W, t = case.args
        ref = ex.reference(A, W, t)
        lib, dec = int8_matmul_with_outliers(A, W, t)
        if dec.n_outliers == 0:
            assert torch.equal(ref, lib), case.name
        else:
            cols = dec.outlier_cols
            bound = A[:, cols].abs() @ (W[:, cols] - dec.B_outlier).abs().T  # (tokens, out)
            assert bool(((ref - lib).abs() <= bound + 1e-5).all()), case.name
            assert float((ref - lib).abs().max()) > ex.atol, case.name  # and the checker sees it


# -----------------------------------------------------------------------------
# Correct implementations written differently pass


def _outlier_columns_loop(A, threshold):
    if threshold == 0:
        return torch.tensor([], dtype=torch.long)
    found = [j for j in range(A.shape[1]) if bool((A[:, j].abs() >= threshold).any())]
    return torch.tensor(found, dtype=torch.long)


def _outlier_columns_where(A, threshold):
    mask = (A.abs() >= threshold).any(dim=0) & (threshold > 0)
    return torch.where(mask)[0]


def _llm_int8_columns(A, W, threshold):
    """Student version: zero whole outlier columns, divide by the step (absmax / 127), integer matmul."""
    cols = (A.abs() >= threshold).any(dim=0) if threshold > 0 else torch.zeros(A.shape[1], dtype=torch.bool)
    A_reg = A.masked_fill(cols, 0.0)
    step_A = A_reg.abs().amax(dim=1, keepdim=True) / 127
    step_A[step_A == 0] = 1.0
    step_W = W.abs().amax(dim=1, keepdim=True) / 127
    codes_A = torch.round(A_reg / step_A).to(torch.int32)
    codes_W = torch.round(W / step_W).to(torch.int32)
    acc = codes_A @ codes_W.T  # (tokens, out), exact integers
    return acc * step_A * step_W.T + A[:, cols] @ W[:, cols].T


def _llm_int8_elements(A, W, threshold):
    """Student version: mask outlier elements for the absmax (bitsandbytes), float64 throughout."""
    A64, W64 = A.double(), W.double()
    big = A64.abs() >= threshold if threshold > 0 else torch.zeros_like(A64, dtype=torch.bool)
    cols = big.any(dim=0)
    m_A = A64.abs().masked_fill(big, 0).amax(dim=1, keepdim=True)
    codes_A = torch.where(m_A > 0, torch.round(A64 * 127 / m_A.clamp(min=1e-300)), 0.0)
    codes_A[:, cols] = 0
    m_W = W64.abs().amax(dim=1, keepdim=True)
    codes_W = torch.round(W64 * 127 / m_W)
    out = (codes_A @ codes_W.T) * (m_A * m_W.T) / 127**2
    return (out + A64[:, cols] @ W64[:, cols].T).float()


def _smoothing_cat(act_scales, weights, alpha):
    w = torch.cat(weights, dim=0).abs().max(dim=0).values.clamp(min=1e-5)
    return torch.clamp(act_scales**alpha * w ** (alpha - 1), min=1e-5)


def _smoothing_exp_log(act_scales, weights, alpha):
    w = torch.stack([x.abs().amax(0) for x in weights]).amax(0).clamp(min=1e-5)
    a = act_scales.double()
    s = torch.where(a > 0, torch.exp(alpha * torch.log(a.clamp(min=1e-300))), 0.0 if alpha > 0 else 1.0)
    return (s / w.double() ** (1 - alpha)).clamp(min=1e-5).float()


@pytest.mark.parametrize(
    "exercise_id,fn",
    [
        ("03.outlier_columns", _outlier_columns_loop),
        ("03.outlier_columns", _outlier_columns_where),
        ("03.int8_decomposition", _llm_int8_columns),
        ("03.int8_decomposition", _llm_int8_elements),
        ("04.smoothing_factors", _smoothing_cat),
        ("04.smoothing_factors", _smoothing_exp_log),
    ],
    ids=lambda v: getattr(v, "__name__", v),
)
def test_other_correct_implementations_pass(exercise_id, fn, capsys):
    exercises.check(exercise_id, fn)
    assert "\u2705" in capsys.readouterr().out


# -----------------------------------------------------------------------------
# Student-style wrong implementations get the right diagnosis


def _oc_strict_student(A, threshold):
    if threshold == 0:
        return torch.tensor([], dtype=torch.long)
    return torch.tensor([j for j in range(A.shape[1]) if A[:, j].abs().max() > threshold], dtype=torch.long)


def _oc_signed_student(A, threshold):
    if threshold == 0:
        return torch.tensor([], dtype=torch.long)
    return torch.where(A.max(dim=0).values >= threshold)[0]


def _oc_elements_student(A, threshold):
    if threshold == 0:
        return torch.tensor([], dtype=torch.long)
    rows, cols = torch.where(A.abs() >= threshold)
    return cols


def _oc_unflattened_student(A, threshold):
    return torch.argwhere((A.abs() >= threshold).any(0) & (threshold > 0))


def _dec_forgot_fp16_student(A, W, threshold):
    cols = (A.abs() >= threshold).any(dim=0)
    A_reg = A.clone()
    A_reg[:, cols] = 0
    sa = A_reg.abs().max(dim=1, keepdim=True).values / 127
    sa[sa == 0] = 1
    sw = W.abs().max(dim=1, keepdim=True).values / 127
    return ((A_reg / sa).round() * sa) @ ((W / sw).round() * sw).T


def _dec_twice_student(A, W, threshold):
    cols = (A.abs() >= threshold).any(dim=0) if threshold else torch.zeros(A.shape[1], dtype=torch.bool)
    m = A.masked_fill(cols, 0).abs().amax(1, keepdim=True)
    m = torch.where(m == 0, torch.ones_like(m), m)
    sw = W.abs().amax(1, keepdim=True) / 127
    int8 = (torch.round(A * 127 / m) * m / 127) @ (torch.round(W / sw) * sw).T  # outliers not zeroed
    return int8 + A[:, cols] @ W[:, cols].T


def _dec_int8_cast_student(A, W, threshold):
    cols = (A.abs() >= threshold).any(dim=0) if threshold else torch.zeros(A.shape[1], dtype=torch.bool)
    A_reg = A.masked_fill(cols, 0)
    m = A_reg.abs().amax(1, keepdim=True)
    m[m == 0] = 1
    mw = W.abs().amax(1, keepdim=True)
    qa = (A_reg * 127 / m).to(torch.int8)  # truncates
    qw = (W * 127 / mw).to(torch.int8)
    return (qa.float() @ qw.float().T) * m * mw.T / 127**2 + A[:, cols] @ W[:, cols].T


def _dec_no_guard_student(A, W, threshold):
    cols = (A.abs() >= threshold).any(dim=0) if threshold else torch.zeros(A.shape[1], dtype=torch.bool)
    A_reg = A.masked_fill(cols, 0)
    m = A_reg.abs().amax(1, keepdim=True)
    mw = W.abs().amax(1, keepdim=True)
    out = (torch.round(A_reg * 127 / m) @ torch.round(W * 127 / mw).T) * m * mw.T / 127**2
    return out + A[:, cols] @ W[:, cols].T


def _s_swapped_student(act_scales, weights, alpha):
    w = torch.cat(weights).abs().amax(0).clamp(min=1e-5)
    return (act_scales ** (1 - alpha) / w**alpha).clamp(min=1e-5)


def _s_only_q_student(act_scales, weights, alpha):
    w = weights[0].abs().max(0).values.clamp(min=1e-5)
    return (act_scales**alpha / w ** (1 - alpha)).clamp(min=1e-5)


def _s_rows_student(act_scales, weights, alpha):
    w = torch.cat([x.abs().amax(1) for x in weights]).clamp(min=1e-5)
    return (act_scales**alpha / w ** (1 - alpha)).clamp(min=1e-5)


STUDENT_MISTAKES = [
    ("03.outlier_columns", _oc_strict_student, "used > instead of >="),
    ("03.outlier_columns", _oc_signed_student, "forgot the absolute value"),
    ("03.outlier_columns", _oc_elements_student, "one index per outlier ELEMENT"),
    ("03.outlier_columns", _oc_unflattened_student, "(n, 1) matrix"),
    ("03.int8_decomposition", _dec_forgot_fp16_student, "never added back"),
    ("03.int8_decomposition", _dec_twice_student, "counted twice"),
    ("03.int8_decomposition", _dec_int8_cast_student, "truncated toward zero"),
    ("03.int8_decomposition", _dec_no_guard_student, "0 / 0 = NaN"),
    ("03.int8_decomposition", lambda A, W, t: int8_matmul_with_outliers(A, W, t)[0], "int8-DEQUANTIZED"),
    ("04.smoothing_factors", _s_swapped_student, "exponents are swapped"),
    ("04.smoothing_factors", _s_only_q_student, "used only the first weight"),
    ("04.smoothing_factors", _s_rows_student, "per OUTPUT row"),
]


@pytest.mark.parametrize(
    "exercise_id,fn,hint", STUDENT_MISTAKES, ids=[f"{e}-{h[:20]}" for e, _, h in STUDENT_MISTAKES]
)
def test_student_written_mistakes_get_the_right_diagnosis(exercise_id, fn, hint):
    message = _failure(exercise_id, fn)
    likely = _likely(message)
    assert len(likely) == 1 and likely[0].startswith("Likely mistake: ") and hint in likely[0], message


def test_failure_message_names_the_case_and_value():
    message = _failure("03.outlier_columns", _oc_strict_student)
    assert "case 'values exactly at the threshold'" in message
    assert message.startswith("03.outlier_columns: 1 of 7 checks failed.")
