"""Tests for quantlab.exercises.checks_awq: the lab 06 checkers accept the reference (and a from-scratch
solution), reject every known mistake with its own hint, and diagnose mistakes written the way a
student would write them (the diagnosis must come from the outputs, not from the code)."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from quantlab.awq import awq_quantize
from quantlab.exercises import core
from quantlab.exercises.checks_awq import EXERCISES

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
    """Check through core.check as the lab does, with lab 06 registered (until core.py lists it)."""
    monkeypatch.setattr(core, "get_exercise", lambda exercise_id: BY_ID[exercise_id])


def _failure(exercise_id, fn) -> str:
    with pytest.raises(AssertionError) as info:
        core.check(exercise_id, fn, quiet=True)
    return str(info.value)


# -----------------------------------------------------------------------------
# The module


def test_exercises_belong_to_lab_06_with_unique_ids():
    assert [ex.id for ex in EXERCISES] == ["06.search_scales", "06.salient_channels"]
    assert all(ex.lab == "06" for ex in EXERCISES)
    assert len({m.hint for ex in EXERCISES for m in ex.mistakes}) == sum(len(ex.mistakes) for ex in EXERCISES)


def test_cases_are_deterministic():
    for ex in EXERCISES:
        for a, b in zip(ex.cases(), ex.cases(), strict=True):
            assert a.name == b.name
            for x, y in zip(a.args, b.args, strict=True):
                if isinstance(x, torch.Tensor):
                    assert torch.equal(x, y), (ex.id, a.name)
                else:
                    assert x == y


def test_the_cases_probe_what_they_claim():
    cases = {c.name: c for c in BY_ID["06.search_scales"].cases()}
    _, X, *_ = cases["a tie: every grid point has the same loss"].args
    assert torch.equal(X.abs().mean(0), torch.ones(X.shape[1]))
    ratio, scales, history = BY_ID["06.search_scales"].reference(
        *cases["a tie: every grid point has the same loss"].args
    )
    assert float(ratio) == 0.0 and torch.equal(scales, torch.ones_like(scales))
    assert len(set(history.tolist())) == 1  # exactly equal losses: only the tie-break decides
    _, X, *_ = cases["a dead input channel"].args
    assert float(X.abs().mean(0).min()) == 0.0
    for case in BY_ID["06.salient_channels"].cases():
        W, X, fraction = case.args
        n = X.shape[1]
        k = BY_ID["06.salient_channels"].reference(W, X, fraction).numel()
        assert k == max(1, round(fraction * n))
    counts = {c.args[1].shape[1]: c.args[2] for c in BY_ID["06.salient_channels"].cases()}
    assert math.floor(counts[576] * 576) != round(counts[576] * 576)  # floor differs from round
    assert math.ceil(counts[1536] * 1536) != round(counts[1536] * 1536)  # ceil differs from round
    assert round(counts[32] * 32) == 0  # the "at least one" rule matters


# -----------------------------------------------------------------------------
# The reference passes, every known mistake fails with its own hint


@pytest.mark.parametrize("ex", EXERCISES, ids=lambda ex: ex.id)
def test_reference_passes_and_prints_success(ex, capsys):
    assert core.check(ex.id, ex.reference) is None
    out = capsys.readouterr().out
    assert out.startswith("\u2705 " + ex.id) and f"passed all {len(ex.cases())} checks" in out


@pytest.mark.parametrize("ex,mistake", PAIRS, ids=lambda v: getattr(v, "id", None) or v.hint[:40])
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
    missing 1e-4 floor may raise, and only on the dead channel (awq_quantize refuses W * inf)."""
    for ex in EXERCISES:
        cases = ex.cases()
        for m in ex.mistakes:
            raised = [c.name for c, o in zip(cases, core.run_cases(m.fn, cases), strict=True) if o.error]
            expected = ["a dead input channel"] if m.fn.__name__ == "_s_no_floor" else []
            assert raised == expected, m.hint[:50]


def test_missing_floor_is_diagnosed_from_the_error():
    message = _failure("06.search_scales", _student_search(floor=False))
    assert "case 'a dead input channel'" in message and "your function raised ValueError" in message
    assert "Likely mistake: forgot to floor s_X**ratio at 1e-4" in message


# -----------------------------------------------------------------------------
# Solutions written from scratch, as in the lab


def solution_search_scales(W, X, n_bits, group_size, n_grid):
    s_x = X.abs().mean(dim=0)  # (in,)
    y = X @ W.T  # (tokens, out)
    best_loss, best_ratio, best_scales, losses = float("inf"), None, None, []
    for i in range(n_grid):
        ratio = i / n_grid
        s = s_x.pow(ratio).clamp(min=1e-4)
        s = s / (s.max() * s.min()).sqrt()
        W_q = awq_quantize(W * s, n_bits, group_size) / s
        loss = (y - X @ W_q.T).pow(2).mean().item()
        losses.append(loss)
        if loss < best_loss:
            best_loss, best_ratio, best_scales = loss, ratio, s
    return best_ratio, best_scales, torch.tensor(losses)


def solution_salient(W, X, fraction):
    n = X.shape[1]
    k = max(1, round(fraction * n))
    return X.abs().mean(dim=0).argsort(descending=True)[:k]


def test_from_scratch_solutions_pass(capsys):
    core.check("06.search_scales", solution_search_scales)
    core.check("06.salient_channels", solution_salient)
    assert capsys.readouterr().out.count("\u2705") == 2


# -----------------------------------------------------------------------------
# Student-style wrong implementations, written differently from the registry's mistakes


def _student_search(stat="mean", grid="ok", normalise=True, loss_on="X", compare="<", floor=True):
    def fn(W, X, n_bits, group_size, n_grid):
        s_x = X.abs().max(dim=0).values if stat == "max" else X.abs().mean(dim=0)
        ratios = [i / n_grid for i in range(n_grid)] if grid == "ok" else list(torch.linspace(0, 1, n_grid))
        y = X @ W.T
        best_loss, best_ratio, best_scales, losses = float("inf"), None, None, []
        for ratio in ratios:
            ratio = float(ratio)
            s = torch.clamp(s_x**ratio, min=1e-4) if floor else s_x**ratio
            if normalise:
                s = s / torch.sqrt(s.max() * s.min())
            W_q = awq_quantize(W * s, n_bits, group_size) / s
            x_in = X / s if loss_on == "X/s" else X
            loss = float(((x_in @ W_q.T) - y).square().mean())
            losses.append(loss)
            better = loss <= best_loss if compare == "<=" else loss < best_loss
            if better:
                best_loss, best_ratio, best_scales = loss, ratio, s
        return torch.tensor(best_ratio), best_scales, torch.tensor(losses)

    return fn


def _student_salient_by_weight(W, X, fraction):
    score = W.abs().sum(dim=0)  # column sums instead of means: same ranking as the mean |w|
    return score.sort(descending=True).indices[: max(1, round(fraction * W.shape[1]))]


def _student_salient_smallest(W, X, fraction):
    return X.abs().mean(dim=0).sort().indices[: max(1, round(fraction * X.shape[1]))]


def _student_salient_int(W, X, fraction):
    k = int(X.shape[1] * fraction) or 1
    return X.abs().sum(dim=0).topk(k).indices


STUDENT_MISTAKES = [
    ("06.search_scales", _student_search(stat="max"), "MEAN of |x|"),
    ("06.search_scales", _student_search(grid="linspace"), "included ratio 1.0 in the grid"),
    ("06.search_scales", _student_search(normalise=False), "forgot to normalise by sqrt(max(s) * min(s))"),
    ("06.search_scales", _student_search(loss_on="X/s"), "measured the loss on the scaled X"),
    ("06.search_scales", _student_search(compare="<="), "kept the last best on ties (<= instead of <)"),
    ("06.salient_channels", _student_salient_by_weight, "ranked by weight magnitude instead of activation"),
    ("06.salient_channels", _student_salient_smallest, "took the smallest channels"),
    ("06.salient_channels", _student_salient_int, "int(fraction * in) rounds down"),
]


@pytest.mark.parametrize(
    "exercise_id,fn,hint", STUDENT_MISTAKES, ids=[f"{e}-{h[:25]}" for e, _, h in STUDENT_MISTAKES]
)
def test_student_written_mistakes_get_the_right_diagnosis(exercise_id, fn, hint):
    message = _failure(exercise_id, fn)
    assert "Likely mistake: " in message and hint in message, message


def test_a_stub_reports_not_implemented():
    def stub(W, X, fraction):
        raise NotImplementedError("hint: rank by X.abs().mean(0)")

    assert "not implemented yet" in _failure("06.salient_channels", stub)


def test_failure_message_names_the_output_and_the_case():
    message = _failure("06.search_scales", _student_search(compare="<="))
    assert "case 'a tie: every grid point has the same loss'" in message
    assert "best_ratio" in message
