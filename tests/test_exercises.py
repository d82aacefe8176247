"""Tests for quantlab.exercises: checkers accept the reference, reject every known mistake with its own
hint (also when the mistake is written differently, as a student would), and the student-notebook
generator strips solutions and never clobbers a student's edits."""

from __future__ import annotations

import datetime
import itertools
import json

import nbformat
import pytest
import torch
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook, new_output

from quantlab import exercises
from quantlab.exercises import core, notebooks
from quantlab.exercises.__main__ import main

# This file tests the exercises of labs 01 and 02 in depth (later labs test their own checkers).
ALL = exercises.list_exercises("01") + exercises.list_exercises("02")
PAIRS = [(ex, m) for ex in ALL for m in ex.mistakes]


def _failure(exercise_id, fn) -> str:
    with pytest.raises(AssertionError) as info:
        exercises.check(exercise_id, fn, quiet=True)
    return str(info.value)


# -----------------------------------------------------------------------------
# Registry


def test_registry_has_the_lab_01_and_02_exercises():
    ids = {ex.id for ex in ALL}
    assert {
        "01.asymmetric_quantize",
        "01.asymmetric_dequantize",
        "01.minmax_calibration",
        "02.per_group_quantize",
        "02.pack_int4",
        "02.unpack_int4",
    } <= ids
    assert [ex.id for ex in exercises.list_exercises("02")] == [
        "02.per_group_quantize",
        "02.pack_int4",
        "02.unpack_int4",
    ]
    assert all(ex.lab == ex.id.split(".")[0] for ex in ALL)
    assert exercises.list_exercises("99") == []


def test_registry_covers_every_lab_module_with_unique_ids():
    everything = exercises.registry()
    assert set(exercises.CHECK_MODULES) == {ex.lab for ex in everything.values()}
    assert len(everything) == sum(len(exercises.list_exercises(lab)) for lab in exercises.CHECK_MODULES)


def test_unknown_id_and_non_callable_are_rejected():
    with pytest.raises(ValueError, match="unknown exercise id '01.nope'.*known ids"):
        exercises.check("01.nope", lambda x: x)
    with pytest.raises(ValueError, match="unknown exercise id '42.x'; labs with exercises"):
        exercises.get_exercise("42.x")
    with pytest.raises(TypeError, match="fn must be the function"):
        exercises.check("01.asymmetric_quantize", 42)


def test_cases_are_deterministic():
    for ex in ALL:
        a, b = ex.cases(), ex.cases()
        for ca, cb in zip(a, b, strict=True):
            for x, y in zip(ca.args, cb.args, strict=True):
                if isinstance(x, torch.Tensor):
                    assert torch.equal(x, y), (ex.id, ca.name)


# -----------------------------------------------------------------------------
# The reference passes, every known mistake fails with its own hint


@pytest.mark.parametrize("ex", ALL, ids=lambda ex: ex.id)
def test_reference_passes_and_prints_success(ex, capsys):
    assert exercises.check(ex.id, ex.reference) is None
    out = capsys.readouterr().out
    assert out.startswith("\u2705 " + ex.id) and f"passed all {len(ex.cases())} checks" in out


@pytest.mark.parametrize("ex,mistake", PAIRS, ids=lambda v: getattr(v, "id", None) or v.hint[:40])
def test_each_known_mistake_is_rejected_with_its_hint(ex, mistake):
    message = _failure(ex.id, mistake.fn)
    assert f"Likely mistake: {mistake.hint}" in message
    assert "First failure, case" in message


@pytest.mark.parametrize("ex", ALL, ids=lambda ex: ex.id)
def test_mistakes_are_distinguishable_from_each_other(ex):
    """Two mistakes with the same outputs on every case would make a diagnosis ambiguous."""
    cases = ex.cases()
    outcomes = {m.hint: core.run_cases(m.fn, cases) for m in ex.mistakes}
    for (h1, o1), (h2, o2) in itertools.combinations(outcomes.items(), 2):
        same = all(core._agree(ex, a, b) for a, b in zip(o1, o2, strict=True))
        assert not same, f"{ex.id}: '{h1[:40]}' and '{h2[:40]}' give identical outputs"


# Student-style wrong implementations, written differently from the registry's mistakes: the diagnosis
# must come from the outputs, not from the code.


def _quantize_half_up(x, scale, zero_point, n_bits):
    return ((x / scale + 0.5).floor() + zero_point).clamp(0, 2**n_bits - 1)


def _quantize_int_cast(x, scale, zero_point, n_bits):
    return ((x / scale).to(torch.int64) + zero_point.to(torch.int64)).clamp(0, 2**n_bits - 1)


def _quantize_unclamped(x, scale, zero_point, n_bits):
    return (x / scale).round() + zero_point


def _quantize_signed(x, scale, zero_point, n_bits):
    half = 1 << (n_bits - 1)
    return torch.minimum(
        torch.maximum(torch.round(x / scale) + zero_point, torch.tensor(-half)), torch.tensor(half - 1)
    )


def _quantize_round_first(x, scale, zero_point, n_bits):
    return torch.clamp(x.round() * (1.0 / scale) + zero_point, 0, 2**n_bits - 1)


def _dequantize_naive(codes, scale, zero_point):
    return (codes - zero_point) * scale


def _calibrate_unrounded(x, n_bits):
    lo, hi = min(float(x.min()), 0.0), max(float(x.max()), 0.0)
    scale = (hi - lo) / (2**n_bits - 1) or 1.0
    return scale, -lo / scale


def _calibrate_raw_range(x, n_bits):
    lo, hi = float(x.min()), float(x.max())
    scale = (hi - lo) / (2**n_bits - 1) or 1.0
    return torch.tensor(scale), torch.tensor(round(-lo / scale) * 1.0)


def _per_group_loops_wrong_axis(w, n_bits, group_size):
    out = torch.empty_like(w)
    qmax = 2 ** (n_bits - 1) - 1
    for c in range(w.shape[1]):
        for r0 in range(0, w.shape[0], group_size):
            block = w[r0 : r0 + group_size, c]
            s = block.abs().max() / qmax
            s = s if s > 0 else torch.tensor(1.0)
            out[r0 : r0 + group_size, c] = torch.clamp(torch.round(block / s), -qmax, qmax) * s
    return out


def _per_group_per_row(w, n_bits, group_size):
    qmax = 2 ** (n_bits - 1) - 1
    s = w.abs().max(dim=1, keepdim=True).values / qmax
    s[s == 0] = 1.0
    return (w / s).round().clamp(-qmax, qmax) * s


def _pack_swapped_loop(codes):
    flat = codes.reshape(-1, codes.shape[-1]).tolist()
    rows = [[(r[i] << 4) | r[i + 1] for i in range(0, len(r), 2)] for r in flat]
    return torch.tensor(rows, dtype=torch.uint8).reshape(*codes.shape[:-1], codes.shape[-1] // 2)


def _unpack_unmasked(packed):
    out = torch.empty(*packed.shape[:-1], 2 * packed.shape[-1], dtype=torch.uint8)
    out[..., 0::2] = packed
    out[..., 1::2] = packed >> 4
    return out


STUDENT_MISTAKES = [
    ("01.asymmetric_quantize", _quantize_half_up, "rounded ties upward"),
    ("01.asymmetric_quantize", _quantize_int_cast, "truncated toward zero"),
    ("01.asymmetric_quantize", _quantize_unclamped, "forgot to clamp"),
    ("01.asymmetric_quantize", _quantize_signed, "clamped to the signed range"),
    ("01.asymmetric_quantize", _quantize_round_first, "rounded before dividing by the scale"),
    ("01.asymmetric_dequantize", _dequantize_naive, "uint8 arithmetic, which wraps"),
    ("01.minmax_calibration", _calibrate_unrounded, "zero-point not rounded"),
    ("01.minmax_calibration", _calibrate_raw_range, "not stretched to contain 0"),
    ("02.per_group_quantize", _per_group_loops_wrong_axis, "groups taken along the wrong axis"),
    ("02.per_group_quantize", _per_group_per_row, "one scale per row (per-channel)"),
    ("02.pack_int4", _pack_swapped_loop, "nibble order swapped"),
    ("02.unpack_int4", _unpack_unmasked, "forgot to mask the low nibble"),
]


@pytest.mark.parametrize(
    "exercise_id,fn,hint", STUDENT_MISTAKES, ids=[f.__name__ for _, f, _ in STUDENT_MISTAKES]
)
def test_student_written_mistakes_get_the_right_diagnosis(exercise_id, fn, hint):
    message = _failure(exercise_id, fn)
    likely = [line for line in message.splitlines() if line.startswith("Likely mistake: ")]
    assert len(likely) == 1 and hint in likely[0], message


def test_equivalent_correct_implementations_pass(capsys):
    def quantize(x, scale, zero_point, n_bits):  # round via the library's own helper name, ints out
        return torch.clamp(torch.round(x / scale) + zero_point, 0, 2**n_bits - 1).to(torch.int32)

    def dequantize(codes, scale, zero_point):  # scale * codes - scale * zero_point: same up to rounding
        c = codes.to(torch.float64)
        return scale * c - scale * zero_point

    def calibrate(x, n_bits):  # Python floats instead of 0-d tensors
        lo, hi = min(float(x.min()), 0.0), max(float(x.max()), 0.0)
        scale = (hi - lo) / (2**n_bits - 1) or 1.0
        return scale, float(torch.round(torch.tensor(-lo / scale)))

    exercises.check("01.asymmetric_quantize", quantize)
    exercises.check("01.asymmetric_dequantize", dequantize)
    exercises.check("01.minmax_calibration", calibrate)
    assert capsys.readouterr().out.count("\u2705") == 3


# -----------------------------------------------------------------------------
# Other failure modes


def test_not_implemented_reports_the_hint():
    def stub(x, scale, zero_point, n_bits):
        raise NotImplementedError("hint: divide, round, add, clamp")

    message = _failure("01.asymmetric_quantize", stub)
    assert message == "01.asymmetric_quantize: not implemented yet. hint: divide, round, add, clamp"


def test_an_exception_is_reported_with_the_case():
    def broken(codes):
        return codes.reshape(3, -1)

    message = _failure("02.pack_int4", broken)
    assert "your function raised RuntimeError" in message and "case '8 codes'" in message


def test_in_place_modification_is_reported():
    def in_place(x, n_bits):
        scale, zero_point = core.get_exercise("01.minmax_calibration").reference(x.clone(), n_bits)
        x.zero_()
        return scale, zero_point

    assert "modified its input in place" in _failure("01.minmax_calibration", in_place)


def test_wrong_output_type_and_dtype_are_named():
    assert "should be a torch.Tensor, got list" in _failure("02.unpack_int4", lambda p: p.tolist())
    message = _failure("02.pack_int4", lambda c: c[..., 0::2].long() | (c[..., 1::2].long() << 4))
    assert "has dtype torch.int64, expected torch.uint8" in message
    assert "packed bytes must be torch.uint8" in message


def test_first_difference_describes_values_shapes_and_nans():
    e = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    assert core.first_difference(e, e.clone()) is None
    assert core.first_difference(e, e[0]) == "the result has shape (2,), expected (2, 2)"
    got = e.clone()
    got[1, 0] = float("nan")
    msg = core.first_difference(e, got, inputs=(e * 10,))
    assert msg == "the result at index [1, 0]: expected 3, got nan (input value 30)"
    assert core.first_difference(e, e + 1e-7, rtol=1e-6) is None
    both_nan = torch.tensor([float("nan")])
    assert core.first_difference(both_nan, both_nan.clone()) is None
    infinities = torch.tensor([float("inf"), -float("inf"), 1.0])
    assert core.first_difference(infinities, infinities.clone(), rtol=1e-3) is None
    assert core.first_difference(infinities, -infinities) == (
        "the result at index [0]: expected inf, got -inf; 3 of 3 values differ"
    )
    pair = (torch.tensor(1.0), torch.tensor(2.0))
    assert core.first_difference(pair, (1.0, 3.0), names=("scale", "zero_point")) == (
        "zero_point: expected 2, got 3"
    )
    assert "tuple of 2 values" in core.first_difference(pair, torch.tensor(1.0))


# -----------------------------------------------------------------------------
# Student notebooks: stripping solutions

SOLUTION_CELL = """def f(x):
    # some comment kept
    # BEGIN SOLUTION
    # HINT: double it
    y = 2 * x
    return y
    # END SOLUTION
"""


def test_strip_solutions_keeps_indentation_and_uses_the_region_hint():
    out = notebooks.strip_solutions(SOLUTION_CELL, hints="registry hint")
    assert out.splitlines() == [
        "def f(x):",
        "    # some comment kept",
        "    # YOUR CODE HERE",
        "    raise NotImplementedError('hint: double it')",
    ]
    compile(out, "<cell>", "exec")


def test_strip_solutions_hint_precedence_and_errors():
    plain = "def f():\n    # BEGIN SOLUTION\n    return 1\n    # END SOLUTION"
    assert "hint: from registry" in notebooks.strip_solutions(plain, "from registry")
    assert "see the explanation above" in notebooks.strip_solutions(plain)
    cell_hint = "# HINT: from the cell\n" + plain
    stripped = notebooks.strip_solutions(cell_hint, "from registry")
    assert "hint: from the cell" in stripped and stripped.startswith("# HINT: from the cell")
    two = (
        plain + "\n\n\ndef g():\n    # BEGIN SOLUTION\n    # HINT: own hint\n    return 2\n    # END SOLUTION"
    )
    stripped = notebooks.strip_solutions(two, ["first", "second"])
    assert "hint: first" in stripped and "hint: own hint" in stripped and "second" not in stripped
    stripped = notebooks.strip_solutions(plain + "\n" + plain.replace("f()", "g()"), ["first", "second"])
    assert "hint: first" in stripped and "hint: second" in stripped
    with pytest.raises(ValueError, match="without a matching"):
        notebooks.strip_solutions("# BEGIN SOLUTION\nx = 1")
    with pytest.raises(ValueError, match="line 1: '# END SOLUTION' without"):
        notebooks.strip_solutions("# END SOLUTION")
    with pytest.raises(ValueError, match="line 2: '# BEGIN SOLUTION' inside"):
        notebooks.strip_solutions("# BEGIN SOLUTION\n# BEGIN SOLUTION\n# END SOLUTION")


def _lab(tmp_path, name="01_demo.ipynb", title="# Demo"):
    labs = tmp_path / "labs"
    labs.mkdir(exist_ok=True)
    solution = new_code_cell("def f(x):\n    # BEGIN SOLUTION\n    return 2 * x\n    # END SOLUTION")
    solution.outputs = [new_output("stream", name="stdout", text="old output")]
    solution.execution_count = 3
    check = new_code_cell('from quantlab import exercises\nexercises.check("01.asymmetric_quantize", f)')
    nb = new_notebook(cells=[new_markdown_cell(title), solution, check])
    nbformat.write(nb, labs / name)
    return labs


def test_make_student_notebook_uses_the_registry_hint_and_clears_outputs(tmp_path):
    labs = _lab(tmp_path)
    nb = nbformat.read(labs / "01_demo.ipynb", as_version=4)
    student = notebooks.make_student_notebook(nb, "labs/01_demo.ipynb")
    assert nb.cells[1].outputs, "the instructor notebook must not be modified"
    sol = student.cells[1]
    assert "2 * x" not in sol.source and "BEGIN SOLUTION" not in sol.source
    assert exercises.get_exercise("01.asymmetric_quantize").hint in sol.source
    assert sol.outputs == [] and sol.execution_count is None
    assert student.cells[0].source == "# Demo" and student.cells[2].source == nb.cells[2].source
    assert student.metadata["quantlab"]["generated_from"] == "labs/01_demo.ipynb"


def test_generate_refuses_to_overwrite_edits_unless_forced(tmp_path):
    labs, out = _lab(tmp_path), tmp_path / "student"
    results = notebooks.generate(labs, out)
    assert [(r.name, r.action) for r in results] == [("01_demo.ipynb", "created")]
    manifest = json.loads((out / notebooks.MANIFEST).read_text())
    target = out / "01_demo.ipynb"
    assert manifest["notebooks"]["01_demo.ipynb"]["sha256"] == notebooks.content_hash(
        nbformat.read(target, as_version=4)
    )
    # regenerating an untouched notebook: nothing to do; running it (outputs only) is not an edit
    nb = nbformat.read(target, as_version=4)
    nb.cells[1].outputs = [new_output("stream", name="stdout", text="ran it")]
    nbformat.write(nb, target)
    assert notebooks.generate(labs, out)[0].action == "unchanged"
    # the instructor changes the lab: an unedited student notebook is updated
    _lab(tmp_path, title="# Demo, revised")
    assert notebooks.generate(labs, out)[0].action == "updated"
    # the student edits a cell: refused, file untouched
    nb = nbformat.read(target, as_version=4)
    nb.cells[1].source = "def f(x):\n    return x * 2  # my answer"
    nbformat.write(nb, target)
    before = target.read_bytes()
    result = notebooks.generate(labs, out)[0]
    assert result.action == "refused" and "--force" in str(result)
    assert target.read_bytes() == before
    assert main(["student", "--labs", str(labs), "--out", str(out)]) == 1
    assert target.read_bytes() == before
    # --force: replaced, the edited file kept as a timestamped backup
    now = datetime.datetime(2025, 1, 2, 3, 4, 5)
    result = notebooks.generate(labs, out, force=True, now=now)[0]
    assert result.action == "replaced"
    backup = out / "01_demo.ipynb.bak-20250102-030405"
    assert result.backup == backup and backup.read_bytes() == before
    assert "my answer" not in target.read_text()
    assert main(["student", "--labs", str(labs), "--out", str(out)]) == 0


def test_generate_treats_an_unknown_existing_file_as_edited(tmp_path):
    labs, out = _lab(tmp_path), tmp_path / "student"
    out.mkdir()
    (out / "01_demo.ipynb").write_text("not a notebook")
    assert notebooks.generate(labs, out)[0].action == "refused"
    assert (out / "01_demo.ipynb").read_text() == "not a notebook"


def test_generate_rejects_a_missing_labs_folder(tmp_path, capsys):
    with pytest.raises(ValueError, match="is not a folder"):
        notebooks.generate(tmp_path / "nope", tmp_path / "student")
    assert main(["student", "--labs", str(tmp_path / "nope"), "--out", str(tmp_path / "s")]) == 2
    assert "error:" in capsys.readouterr().err


def test_grade_notebook_reads_check_cells(tmp_path):
    ok = new_code_cell('exercises.check("01.asymmetric_quantize", f)')
    ok.outputs, ok.execution_count = [new_output("stream", name="stdout", text="passed")], 5
    bad = new_code_cell('exercises.check("01.minmax_calibration", g)')
    bad.outputs = [
        new_output("error", ename="AssertionError", evalue="01.minmax_calibration: wrong", traceback=[])
    ]
    bad.execution_count = 6
    nb = new_notebook(cells=[ok, bad])
    grades = notebooks.grade_notebook(nb, "01")
    assert [(g.exercise_id, g.passed) for g in grades] == [
        ("01.asymmetric_quantize", True),
        ("01.minmax_calibration", False),
        ("01.asymmetric_dequantize", False),
    ]
    assert grades[1].message == "01.minmax_calibration: wrong"
    assert "no check cell" in grades[2].message
    # two checks in one cell: the second never ran when the first failed
    both = new_code_cell('check("01.minmax_calibration", g)\ncheck("01.asymmetric_dequantize", h)')
    both.outputs, both.execution_count = bad.outputs, 7
    grades = notebooks.grade_notebook(new_notebook(cells=[both]))
    assert [(g.exercise_id, g.message) for g in grades] == [
        ("01.minmax_calibration", "01.minmax_calibration: wrong"),
        ("01.asymmetric_dequantize", "not run: a check before it in the same cell failed"),
    ]


def test_find_student_notebook(tmp_path):
    (tmp_path / "01_uniform.ipynb").write_text("{}")
    assert notebooks.find_student_notebook("1", tmp_path).name == "01_uniform.ipynb"
    assert notebooks.find_student_notebook("01", tmp_path).name == "01_uniform.ipynb"
    with pytest.raises(ValueError, match="matches 0 notebooks.*make student"):
        notebooks.find_student_notebook("02", tmp_path)


def test_cli_lists_exercises(capsys):
    assert main(["list", "2"]) == 0
    out = capsys.readouterr().out
    assert "02.pack_int4" in out and "01.minmax_calibration" not in out
