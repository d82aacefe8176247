"""The machinery behind every self-checking exercise: cases, known mistakes, diagnosis, registry.

An :class:`Exercise` knows the reference implementation (a call into the library), how to build its
test :class:`Case` s (random inputs with fixed seeds *and* adversarial ones: ties at .5, all-zero rows,
outliers, odd shapes, several group counts), and a list of :class:`Mistake` s: small, deliberately
wrong implementations of the mistakes students actually make, each with the hint that fixes it.

:func:`check` runs the student's function on every case and compares with the reference. When the
results differ it also runs every known mistake on the same cases: the mistake whose outputs equal the
student's (on all cases, or failing that on the most cases) is the likely diagnosis. This is why a
hint can be specific ("rounded before dividing by the scale") instead of "wrong answer".

Exercises live in modules named in :data:`CHECK_MODULES` (one per lab, e.g. ``checks_uniform.py`` for
lab 01); each exposes a tuple ``EXERCISES`` whose ids start with the lab number. A later lab adds one
``lab -> module`` entry and nothing else changes. Modules are imported on first use, one lab at a time,
so checking a lab 01 exercise never imports (say) Triton for lab 07.
"""

from __future__ import annotations

import functools
import importlib
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

import torch

__all__ = [
    "CHECK_MODULES",
    "Case",
    "Exercise",
    "Mistake",
    "check",
    "diagnose",
    "first_difference",
    "get_exercise",
    "list_exercises",
    "registry",
    "run_cases",
]

# lab number -> "module" holding that lab's ``EXERCISES`` tuple, or "module:NAME" for a tuple with another
# name (one module may serve two labs). In lab order; a new lab adds its entry.
CHECK_MODULES: Mapping[str, str] = MappingProxyType(
    {
        "01": "quantlab.exercises.checks_uniform",
        "02": "quantlab.exercises.checks_granularity",
        "03": "quantlab.exercises.checks_outliers",
        "04": "quantlab.exercises.checks_outliers:LAB04_EXERCISES",
        "05": "quantlab.exercises.checks_gptq",
        "06": "quantlab.exercises.checks_awq",
        "07": "quantlab.exercises.checks_triton",
    }
)


@dataclass(frozen=True)
class Case:
    """One input to test on: ``fn(*args)``; ``name`` says what it probes (shown on failure)."""

    name: str
    args: tuple[Any, ...]
    describe: str = ""


@dataclass(frozen=True)
class Mistake:
    """A known-wrong implementation and the hint that names the mistake."""

    hint: str
    fn: Callable[..., Any]


@dataclass(frozen=True)
class Exercise:
    """A self-checking exercise.

    Attributes:
        id: ``"<lab>.<name>"``, e.g. ``"01.asymmetric_quantize"``.
        title: one line shown in reports.
        signature: the function the student writes, e.g. ``"asymmetric_quantize(x, scale, zp, n_bits)"``.
        hint: the hint in the student notebook's stub (a ``# HINT:`` line in the cell overrides it).
        reference: the correct implementation (calls into the library).
        cases: builds the list of :class:`Case` (deterministic: fixed seeds).
        mistakes: known-wrong implementations with their hints.
        rtol, atol: tolerances for float outputs (0 for exact comparison of codes and bytes).
        check_dtype: require the output dtype to equal the reference's (bytes must be ``uint8``).
        output_name: how failure messages name the output (``"the codes"``).
        output_names: names of the elements when the output is a tuple (``("scale", "zero_point")``).
    """

    id: str
    title: str
    signature: str
    hint: str
    reference: Callable[..., Any]
    cases: Callable[[], list[Case]]
    mistakes: tuple[Mistake, ...] = field(default=())
    rtol: float = 0.0
    atol: float = 0.0
    check_dtype: bool = False
    output_name: str = "the result"
    output_names: tuple[str, ...] = ()

    @property
    def lab(self) -> str:
        """The lab number, the part of the id before the dot."""
        return self.id.split(".", 1)[0]


# -----------------------------------------------------------------------------
# Comparing outputs


def _fmt_index(index: Sequence[int]) -> str:
    return "[" + ", ".join(str(i) for i in index) + "]"


def _fmt_number(v: float) -> str:
    if math.isnan(v):
        return "nan"
    return f"{v:.6g}"


def _as_tensor(value: Any) -> torch.Tensor | None:
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, int | float) and not isinstance(value, bool):
        return torch.tensor(value, dtype=torch.float64)
    return None


def first_difference(
    expected: Any,
    got: Any,
    *,
    rtol: float = 0.0,
    atol: float = 0.0,
    check_dtype: bool = False,
    what: str = "the result",
    names: Sequence[str] = (),
    inputs: tuple[Any, ...] = (),
) -> str | None:
    """Describe the first way ``got`` differs from ``expected``; ``None`` if they agree.

    Tensors (or tuples of tensors) are compared by shape, then by value with
    ``|got - expected| <= atol + rtol * |expected|`` (exactly when both are 0); equal values always
    match (also equal infinities, whose difference is NaN), and a NaN matches only a NaN.
    Python numbers are accepted where the reference returns a 0-d tensor.

    Args:
        expected: the reference output.
        got: the student's output.
        rtol, atol: tolerances for floating-point outputs.
        check_dtype: also require equal dtypes.
        what: how to name the output in the message.
        names: for tuple outputs, the name of each element (default ``what[i]``).
        inputs: the call's arguments; a tensor input with the output's shape is quoted at the index.

    Returns:
        A one-line description such as ``"at index [0, 3]: expected 2, got 3 (input 0.625)"``.
    """
    if isinstance(expected, tuple):
        if not isinstance(got, tuple | list) or len(got) != len(expected):
            kind = (
                f"a {type(got).__name__} of length {len(got)}"
                if isinstance(got, tuple | list)
                else (type(got).__name__)
            )
            return f"{what} should be a tuple of {len(expected)} values, got {kind}"
        for i, (e, g) in enumerate(zip(expected, got, strict=True)):
            name = names[i] if i < len(names) else f"{what}[{i}]"
            diff = first_difference(
                e, g, rtol=rtol, atol=atol, check_dtype=check_dtype, what=name, inputs=inputs
            )
            if diff is not None:
                return diff
        return None
    exp_t = _as_tensor(expected)
    got_t = _as_tensor(got)
    if exp_t is None:
        raise TypeError(f"cannot compare a reference output of type {type(expected).__name__}")
    if got_t is None:
        return f"{what} should be a torch.Tensor, got {type(got).__name__} ({got!r:.60})"
    if got_t.is_complex() or got_t.dtype == torch.bool:
        return f"{what} has dtype {got_t.dtype}, expected {exp_t.dtype}"
    if got_t.numel() == 1 and exp_t.numel() == 1:
        got_t = got_t.reshape(exp_t.shape)  # a 0-d tensor, a 1-element tensor and a float all pass
    if tuple(got_t.shape) != tuple(exp_t.shape):
        return f"{what} has shape {tuple(got_t.shape)}, expected {tuple(exp_t.shape)}"
    if check_dtype and got_t.dtype != exp_t.dtype:
        return f"{what} has dtype {got_t.dtype}, expected {exp_t.dtype}"
    e64 = exp_t.detach().to(torch.float64).cpu()
    g64 = got_t.detach().to(torch.float64).cpu()
    bad = ~(torch.abs(g64 - e64) <= atol + rtol * torch.abs(e64))
    bad |= torch.isnan(g64) ^ torch.isnan(e64)
    bad &= ~(torch.isnan(g64) & torch.isnan(e64))
    bad &= ~(g64 == e64)  # inf == inf: the tolerance test above says NaN for it
    if not bool(bad.any()):
        return None
    n_bad = int(bad.sum())
    flat = int(torch.nonzero(bad.reshape(-1))[0])
    index = [int(i) for i in torch.unravel_index(torch.tensor(flat), e64.shape)] if e64.ndim else []
    where = f" at index {_fmt_index(index)}" if index else ""
    e_v, g_v = float(e64.reshape(-1)[flat]), float(g64.reshape(-1)[flat])
    msg = f"{what}{where}: expected {_fmt_number(e_v)}, got {_fmt_number(g_v)}"
    for x in inputs:
        if isinstance(x, torch.Tensor) and tuple(x.shape) == tuple(e64.shape) and e64.ndim:
            msg += f" (input value {_fmt_number(float(x.reshape(-1)[flat]))})"
            break
    if n_bad > 1:
        msg += f"; {n_bad} of {e64.numel()} values differ"
    return msg


# -----------------------------------------------------------------------------
# Running a function on the cases


def _clone(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.clone()
    if isinstance(value, tuple | list):
        return type(value)(_clone(v) for v in value)
    return value


def _same_inputs(a: tuple[Any, ...], b: tuple[Any, ...]) -> bool:
    for x, y in zip(a, b, strict=True):
        if isinstance(x, torch.Tensor) and not torch.equal(x, y):
            return False
    return True


@dataclass
class _Outcome:
    """What one call produced: a value, or an exception."""

    value: Any = None
    error: BaseException | None = None
    mutated: bool = False


def _call(fn: Callable[..., Any], case: Case) -> _Outcome:
    args = _clone(case.args)
    try:
        value = fn(*args)
    except NotImplementedError:
        raise
    except Exception as exc:  # the student's code may raise anything; that is a result to report
        return _Outcome(error=exc)
    return _Outcome(value=value, mutated=not _same_inputs(args, case.args))


def run_cases(fn: Callable[..., Any], cases: Sequence[Case]) -> list[_Outcome]:
    """Call ``fn`` on fresh copies of every case's arguments (NotImplementedError propagates)."""
    return [_call(fn, case) for case in cases]


def _agree(exercise: Exercise, a: _Outcome, b: _Outcome) -> bool:
    """Whether two outcomes are the same: both raised (of any type: a reshape that fails in a
    mistake's code may fail with another exception in the student's), or equal values."""
    if a.error is not None or b.error is not None:
        return a.error is not None and b.error is not None
    try:
        diff = first_difference(
            a.value, b.value, rtol=exercise.rtol, atol=exercise.atol, check_dtype=exercise.check_dtype
        )
    except TypeError:
        return False
    return diff is None


def diagnose(exercise: Exercise, cases: Sequence[Case], student: Sequence[_Outcome]) -> list[str]:
    """Hints of the known mistakes whose outputs match the student's.

    A mistake that reproduces the student's outputs on every case is certain; if none does, the
    mistakes that match on the first failing case, best match count first.
    """
    reference = run_cases(exercise.reference, cases)
    failing = [
        i for i, (r, s) in enumerate(zip(reference, student, strict=True)) if not _agree(exercise, r, s)
    ]
    if not failing:
        return []
    scored = []
    for mistake in exercise.mistakes:
        outcomes = run_cases(mistake.fn, cases)
        matches = [_agree(exercise, m, s) for m, s in zip(outcomes, student, strict=True)]
        scored.append((sum(matches), matches[failing[0]], mistake.hint))
    certain = [hint for n, _, hint in scored if n == len(cases)]
    if certain:
        return certain
    partial = sorted((s for s in scored if s[1]), key=lambda s: -s[0])
    return [hint for _, _, hint in partial[:2]]


# -----------------------------------------------------------------------------
# The registry and check()


@functools.cache
def _lab_exercises(lab: str) -> Mapping[str, Exercise]:
    """The exercises of one lab, keyed by id (imports that lab's module on first use)."""
    module_name, _, attribute = CHECK_MODULES[lab].partition(":")
    found: dict[str, Exercise] = {}
    for exercise in getattr(importlib.import_module(module_name), attribute or "EXERCISES"):
        if exercise.lab != lab:
            raise RuntimeError(f"{module_name} defines {exercise.id!r}, outside lab {lab}")
        if exercise.id in found:
            raise RuntimeError(f"exercise id {exercise.id!r} is defined twice in {module_name}")
        found[exercise.id] = exercise
    return MappingProxyType(found)


def registry() -> Mapping[str, Exercise]:
    """All exercises keyed by id, in lab order (imports every lab's module)."""
    return MappingProxyType({k: v for lab in CHECK_MODULES for k, v in _lab_exercises(lab).items()})


def get_exercise(exercise_id: str) -> Exercise:
    """The exercise with this id; ``ValueError`` listing the known ids otherwise."""
    lab = exercise_id.split(".", 1)[0] if isinstance(exercise_id, str) else None
    if lab in CHECK_MODULES and exercise_id in _lab_exercises(lab):
        return _lab_exercises(lab)[exercise_id]
    known = sorted(_lab_exercises(lab)) if lab in CHECK_MODULES else sorted(CHECK_MODULES)
    what = "known ids" if lab in CHECK_MODULES else "labs with exercises"
    raise ValueError(f"unknown exercise id {exercise_id!r}; {what}: {known}")


def list_exercises(lab: str | None = None) -> list[Exercise]:
    """Exercises in registry order, optionally only those of one lab (``"01"``)."""
    if lab is None:
        return list(registry().values())
    return list(_lab_exercises(lab).values()) if lab in CHECK_MODULES else []


def _describe(case: Case) -> str:
    return f"'{case.name}'" + (f" ({case.describe})" if case.describe else "")


def check(exercise_id: str, fn: Callable[..., Any], *, quiet: bool = False) -> None:
    """Test ``fn`` against the library on every case of the exercise; explain the first failure.

    Args:
        exercise_id: e.g. ``"01.asymmetric_quantize"`` (see :func:`list_exercises`).
        fn: the student's function.
        quiet: do not print the success line.

    Raises:
        AssertionError: when ``fn`` is not implemented, raises, modifies its input, or returns a
            different result on some case; the message names the case, the first differing value and,
            when a known mistake reproduces the output, the likely mistake and how to fix it.
    """
    exercise = get_exercise(exercise_id)
    if not callable(fn):
        raise TypeError(
            f"fn must be the function you wrote for {exercise.signature}, got {type(fn).__name__}"
        )
    cases = exercise.cases()
    try:
        student = run_cases(fn, cases)
    except NotImplementedError as exc:
        detail = str(exc) or exercise.hint
        raise AssertionError(f"{exercise.id}: not implemented yet. {detail}") from None
    reference = run_cases(exercise.reference, cases)
    problems: list[tuple[Case, str]] = []
    for case, ref, got in zip(cases, reference, student, strict=True):
        if ref.error is not None:  # a bug in the exercise itself, not the student's
            raise RuntimeError(f"the reference of {exercise.id} failed on case {case.name!r}") from ref.error
        if got.error is not None:
            problems.append((case, f"your function raised {type(got.error).__name__}: {got.error}"))
        elif got.mutated:
            problems.append((case, "your function modified its input in place; work on a copy"))
        else:
            diff = first_difference(
                ref.value,
                got.value,
                rtol=exercise.rtol,
                atol=exercise.atol,
                check_dtype=exercise.check_dtype,
                what=exercise.output_name,
                names=exercise.output_names,
                inputs=case.args,
            )
            if diff is not None:
                problems.append((case, diff))
    if not problems:
        if not quiet:
            names = "; ".join(c.name for c in cases)
            print(f"\u2705 {exercise.id} passed all {len(cases)} checks ({names}).")
        return
    hints = diagnose(exercise, cases, student)
    case, detail = problems[0]
    lines = [
        f"{exercise.id}: {len(problems)} of {len(cases)} checks failed.",
        f"First failure, case {_describe(case)}: {detail}",
    ]
    if len(problems) > 1:
        lines.append("Also failing: " + "; ".join(repr(c.name) for c, _ in problems[1:]) + ".")
    if len(hints) == 1:
        lines.append(f"Likely mistake: {hints[0]}")
    elif hints:
        lines.append("Likely mistake, one of: " + " | ".join(hints))
    else:
        lines.append(f"Hint: {exercise.hint}")
    raise AssertionError("\n".join(lines))
