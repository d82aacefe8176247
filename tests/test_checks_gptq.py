"""Tests for quantlab.exercises.checks_gptq: the lab 05 checkers accept the reference and from-scratch
solutions written in other (correct) ways, reject every known mistake with its own hint, and diagnose
mistakes written the way a student would write them (the diagnosis must come from the outputs, not from
the code)."""

from __future__ import annotations

import itertools

import pytest
import torch

from quantlab.exercises import core
from quantlab.exercises.checks_gptq import EXERCISES
from quantlab.gptq import HessianAccumulator, rtn_quantize
from quantlab.uniform import minmax_fake_quantize, minmax_params

BY_ID = {ex.id: ex for ex in EXERCISES}
PAIRS = [(ex, m) for ex in EXERCISES for m in ex.mistakes]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # Small tensors: on a shared, loaded CPU intra-op threads only add spin-wait overhead.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(autouse=True)
def _registered(monkeypatch):
    """Check through core.check as the lab does, with lab 05 registered (until core.py lists it)."""
    monkeypatch.setattr(core, "get_exercise", lambda exercise_id: BY_ID[exercise_id])


def _failure(exercise_id, fn) -> str:
    with pytest.raises(AssertionError) as info:
        core.check(exercise_id, fn, quiet=True)
    return str(info.value)


# -----------------------------------------------------------------------------
# Student-style solutions: the lab's loop with the body written in different ways


def _lab_loop(body):
    """The skeleton the lab gives (grid on the original W, H⁻¹, rounding); ``body`` is the student's part."""

    def gptq_columns(W, H, n_bits):
        scale, zero_point = minmax_params(W, n_bits)  # (out, 1) each
        scale, zero_point = scale.double(), zero_point.double()
        W = W.double().clone()  # (out, in)
        Hinv = torch.linalg.inv(H.double())  # (in, in)
        Q = torch.zeros_like(W)
        for q in range(W.shape[1]):
            w = W[:, q]  # (out,) a view: the student's body may change W in place
            w_hat = minmax_fake_quantize(w[:, None], scale, zero_point, n_bits)[:, 0]  # (out,)
            Q[:, q] = w_hat
            W, Hinv = body(W, Hinv, H.double(), q, w.clone(), w_hat)
        return Q

    return gptq_columns


def _body_outer(W, Hinv, H, q, w, w_hat):
    # update every column (the finished ones have H⁻¹[q, done] = 0 after their elimination)
    d = Hinv[q, q]
    W = W - torch.outer((w - w_hat) / d, Hinv[q])
    Hinv = Hinv - torch.outer(Hinv[:, q], Hinv[q]) / d
    return W, Hinv


def _body_reinvert(W, Hinv, H, q, w, w_hat):
    # OBQ without the elimination trick: invert the Hessian of the free columns q.. afresh every time
    Hf_inv = torch.linalg.inv(H[q:, q:])  # (in - q, in - q)
    W = W.clone()
    W[:, q:] -= torch.outer((w - w_hat) / Hf_inv[0, 0], Hf_inv[0])
    return W, Hinv


def _body_delta_formula(W, Hinv, H, q, w, w_hat):
    # δ = -(w_q - q) / [H⁻¹]_qq · H⁻¹[:, q], applied to the free columns only, via an explicit mask
    free = torch.arange(W.shape[1]) > q
    delta = -((w - w_hat) / Hinv[q, q])[:, None] * Hinv[:, q][None, :]  # (out, in)
    W = W + delta * free
    Hinv = Hinv - Hinv[:, [q]] @ Hinv[[q], :] / Hinv[q, q]
    return W, Hinv


def _cholesky_columns(W, H, n_bits):
    # GPTQ's Cholesky form: row q of the upper factor of H⁻¹ holds every elimination already
    scale, zero_point = minmax_params(W, n_bits)
    W = W.double().clone()
    U = torch.linalg.cholesky(torch.linalg.inv(H.double()), upper=True)  # H⁻¹ = UᵀU
    Q = torch.zeros_like(W)
    for q in range(W.shape[1]):
        w_hat = minmax_fake_quantize(W[:, q : q + 1], scale.double(), zero_point.double(), n_bits)[:, 0]
        Q[:, q] = w_hat
        err = (W[:, q] - w_hat) / U[q, q]
        W[:, q + 1 :] -= torch.outer(err, U[q, q + 1 :])
    return Q


def _body_forgot_everything(W, Hinv, H, q, w, w_hat):
    return W, Hinv


def _body_squared_via_u(W, Hinv, H, q, w, w_hat):
    # divided by [H⁻¹]_qq² (written with a power of the diagonal, elimination by torch.outer)
    d = torch.diagonal(Hinv)[q]
    W = W.clone()
    W[:, q + 1 :] = W[:, q + 1 :] - torch.outer((w - w_hat) / d.pow(2), Hinv[q, q + 1 :])
    return W, Hinv - torch.outer(Hinv[:, q], Hinv[q, :]) / d


def _body_sign(W, Hinv, H, q, w, w_hat):
    err = (w_hat - w) / Hinv[q, q]  # q - w instead of w - q, then still subtracted
    W[:, q + 1 :] -= torch.outer(err, Hinv[q, q + 1 :])
    return W, Hinv - torch.outer(Hinv[:, q], Hinv[q, :]) / Hinv[q, q]


def _body_no_elimination(W, Hinv, H, q, w, w_hat):
    for j in range(q + 1, W.shape[1]):  # a loop over the free columns instead of an outer product
        W[:, j] -= (w - w_hat) / Hinv[q, q] * Hinv[q, j]
    return W, Hinv


def _body_h(W, Hinv, H, q, w, w_hat):
    W = W.clone()
    W[:, q + 1 :] -= torch.outer((w - w_hat) / H[q, q], H[q, q + 1 :])
    return W, Hinv


def _hessian_running_average(batches):
    # the reference code's update: H *= n / (n + m); n += m; H += (sqrt(2 / n) X)ᵀ (sqrt(2 / n) X)
    H, n = 0.0, 0
    for X in batches:
        m = X.shape[0]
        Xf = X.reshape(-1, X.shape[-1])  # (tokens, in)
        H = H * n / (n + m)
        n += m
        Xs = (2 / n) ** 0.5 * Xf
        H = H + Xs.T @ Xs
    return H


def _hessian_einsum(batches):
    n = sum(X.shape[0] for X in batches)
    return 2 / n * sum(torch.einsum("bti,btj->ij", X.double(), X.double()) for X in batches)


def _hessian_cat_tokens_as_n(batches):
    X = torch.cat([b.reshape(-1, b.shape[-1]) for b in batches])  # (tokens, in)
    return 2 / X.shape[0] * X.T @ X


def _hessian_no_two(batches):
    n = sum(X.shape[0] for X in batches)
    return torch.stack([X.flatten(0, 1).T @ X.flatten(0, 1) for X in batches]).sum(0) / n


def _hessian_batches(batches):
    H = torch.zeros(batches[0].shape[-1], batches[0].shape[-1])
    for X in batches:
        Xf = X.reshape(-1, X.shape[-1])
        H += 2 * Xf.T @ Xf
    return H / len(batches)


def _hessian_overwrite(batches):
    n = sum(X.shape[0] for X in batches)
    for X in batches:
        Xf = X.reshape(-1, X.shape[-1])
        H = (2 / n) * (Xf.T @ Xf)
    return H


def _hessian_covariance(batches):
    X = torch.cat([b.reshape(-1, b.shape[-1]) for b in batches])
    n = sum(b.shape[0] for b in batches)
    return 2 / n * (X - X.mean(0, keepdim=True)).T @ (X - X.mean(0, keepdim=True))


# -----------------------------------------------------------------------------
# The module


def test_exercises_belong_to_lab_05_with_unique_ids_and_hints():
    assert [ex.id for ex in EXERCISES] == ["05.column_update", "05.hessian"]
    assert all(ex.lab == "05" for ex in EXERCISES)
    assert len({m.hint for ex in EXERCISES for m in ex.mistakes}) == sum(len(ex.mistakes) for ex in EXERCISES)


def test_cases_are_deterministic():
    for ex in EXERCISES:
        for a, b in zip(ex.cases(), ex.cases(), strict=True):
            assert a.name == b.name
            for x, y in zip(a.args, b.args, strict=True):
                if isinstance(x, list):
                    assert all(torch.equal(u, v) for u, v in zip(x, y, strict=True)), (ex.id, a.name)
                elif isinstance(x, torch.Tensor):
                    assert torch.equal(x, y), (ex.id, a.name)
                else:
                    assert x == y


def test_column_cases_have_error_feedback_that_matters():
    """Correlated inputs (off-diagonal H), [H⁻¹]_qq far from 1, and GPTQ differing from RTN in every case."""
    ex = BY_ID["05.column_update"]
    for case in ex.cases():
        W, H, n_bits = case.args
        assert torch.equal(H, H.T)
        off = H - torch.diag(torch.diag(H))
        assert float(off.abs().max()) > 0.3 * float(torch.diag(H).min()), case.name
        d = torch.diag(torch.linalg.inv(H.double()))
        assert float((d - 1).abs().min()) > 0.05, case.name  # dividing by d once or twice differs
        Q = ex.reference(W, H, n_bits)
        assert not torch.allclose(Q, rtn_quantize(W, n_bits).Q), case.name


def test_column_reference_is_column_by_column_gptq_from_scratch():
    """The reference (the library) equals an independent float64 implementation of Eqs. 2-3."""
    ex = BY_ID["05.column_update"]
    for case in ex.cases():
        expected = _lab_loop(_body_outer)(*case.args)
        step = case.args[0].abs().max() / 2 ** case.args[2]  # less than one quantization step
        assert torch.allclose(ex.reference(*case.args).double(), expected, rtol=0, atol=1e-4 * float(step))


def test_hessian_cases_separate_samples_batches_and_tokens():
    for case in BY_ID["05.hessian"].cases():
        (batches,) = case.args
        samples = sum(X.shape[0] for X in batches)
        tokens = sum(X.shape[0] * X.shape[1] for X in batches)
        assert len({samples, tokens}) == 2
        assert len({X.shape[0] * X.shape[1] for X in batches}) == 1  # XXᵀ can be summed over batches
        X = torch.cat([b.reshape(-1, b.shape[-1]) for b in batches])
        assert float(X.mean(0).abs().max()) > 0.1  # centring changes H
    counts = [(len(c.args[0]), sum(X.shape[0] for X in c.args[0])) for c in BY_ID["05.hessian"].cases()]
    assert any(batches != samples for batches, samples in counts)


def test_hessian_reference_is_two_over_n_xtx():
    for case in BY_ID["05.hessian"].cases():
        (batches,) = case.args
        X = torch.cat([b.reshape(-1, b.shape[-1]) for b in batches]).double()  # (tokens, in)
        n = sum(b.shape[0] for b in batches)
        H = BY_ID["05.hessian"].reference(batches)
        assert isinstance(H, torch.Tensor) and H.dtype == torch.float32
        eps = torch.finfo(torch.float32).eps
        expected = 2 / n * X.T @ X
        atol = 64 * eps * float(expected.abs().max())  # float32 accumulation over <= 48 tokens
        assert torch.allclose(H.double(), expected, rtol=64 * eps, atol=atol)


# -----------------------------------------------------------------------------
# The reference passes, every known mistake fails with its own hint


@pytest.mark.parametrize("ex", EXERCISES, ids=lambda ex: ex.id)
def test_reference_passes_and_prints_success(ex, capsys):
    assert core.check(ex.id, ex.reference) is None
    out = capsys.readouterr().out
    assert out.startswith("\u2705 " + ex.id) and f"passed all {len(ex.cases())} checks" in out


@pytest.mark.parametrize("ex,mistake", PAIRS, ids=lambda v: getattr(v, "id", None) or v.fn.__name__)
def test_each_known_mistake_is_rejected_with_its_hint(ex, mistake):
    message = _failure(ex.id, mistake.fn)
    assert f"Likely mistake: {mistake.hint}" in message
    assert "First failure, case" in message


@pytest.mark.parametrize("ex", EXERCISES, ids=lambda ex: ex.id)
def test_mistakes_are_distinguishable_from_each_other_and_from_the_reference(ex):
    cases = ex.cases()
    outcomes = {m.hint: core.run_cases(m.fn, cases) for m in ex.mistakes}
    outcomes["<reference>"] = core.run_cases(ex.reference, cases)
    for (h1, o1), (h2, o2) in itertools.combinations(outcomes.items(), 2):
        same = all(core._agree(ex, a, b) for a, b in zip(o1, o2, strict=True))
        assert not same, f"{ex.id}: '{h1[:40]}' and '{h2[:40]}' give identical outputs"


def test_mistakes_raise_only_where_the_mistake_itself_fails():
    """A mistake that raises 'matches' any student function raising on the same case, so only the
    elimination without the division may raise, and only where H⁻¹ then overflows (24 columns)."""
    for ex in EXERCISES:
        cases = ex.cases()
        for m in ex.mistakes:
            raised = [c.name for c, o in zip(cases, core.run_cases(m.fn, cases), strict=True) if o.error]
            expected = ["2 bits, 24 columns"] if m.fn.__name__ == "_c_elimination_not_divided" else []
            assert raised == expected, m.fn.__name__


# -----------------------------------------------------------------------------
# Solutions and mistakes as a student would write them


@pytest.mark.parametrize(
    "fn",
    [_lab_loop(_body_outer), _lab_loop(_body_reinvert), _lab_loop(_body_delta_formula), _cholesky_columns],
    ids=["outer-product", "re-invert H_F", "delta-with-mask", "cholesky"],
)
def test_correct_column_updates_pass(fn):
    assert core.check("05.column_update", fn, quiet=True) is None


@pytest.mark.parametrize(
    "body,expected",
    [
        (_body_forgot_everything, "forgot to update the remaining columns"),
        (_body_squared_via_u, "divided the error by [H⁻¹]_qq squared"),
        (_body_sign, "sign error in the update"),
        (_body_no_elimination, "did not remove column q from H⁻¹"),
        (_body_h, "used H instead of H⁻¹ in the update"),
    ],
    ids=["no-update", "squared", "sign", "no-elimination", "used-H"],
)
def test_student_written_column_mistakes_are_diagnosed(body, expected):
    message = _failure("05.column_update", _lab_loop(body))
    assert f"Likely mistake: {expected}" in message


@pytest.mark.parametrize(
    "fn", [_hessian_running_average, _hessian_einsum], ids=["running-average", "einsum-float64"]
)
def test_correct_hessians_pass(fn):
    assert core.check("05.hessian", fn, quiet=True) is None


@pytest.mark.parametrize(
    "fn,expected",
    [
        (_hessian_no_two, "forgot the factor 2"),
        (_hessian_batches, "divided by the number of batches"),
        (_hessian_cat_tokens_as_n, "averaged over tokens"),
        (_hessian_overwrite, "overwrote H with each batch"),
        (_hessian_covariance, "subtracted the mean of the activations"),
    ],
    ids=["no-2", "per-batch", "per-token", "overwrite", "covariance"],
)
def test_student_written_hessian_mistakes_are_diagnosed(fn, expected):
    message = _failure("05.hessian", fn)
    assert f"Likely mistake: {expected}" in message


def test_xxt_is_reported_as_a_shape_error_and_diagnosed():
    def xxt(batches):
        n = sum(X.shape[0] for X in batches)
        H = 0
        for X in batches:
            Xf = X.reshape(-1, X.shape[-1])
            H = H + Xf @ Xf.T
        return 2 * H / n

    message = _failure("05.hessian", xxt)
    assert "has shape (24, 24), expected (8, 8)" in message
    assert "Likely mistake: computed XXᵀ" in message


def test_hessian_accumulator_is_what_the_checker_compares_with():
    """The reference is HessianAccumulator itself, fed batch by batch (same bits, not only same values)."""
    (batches,) = BY_ID["05.hessian"].cases()[0].args
    acc = HessianAccumulator(batches[0].shape[-1])
    for X in batches:
        acc.add_batch(X)
    assert torch.equal(BY_ID["05.hessian"].reference(batches), acc.H)
    assert acc.n_samples == 6 and acc.n_tokens == 48
