"""The generated student notebooks fail exactly at their exercise check cells until solved, and pass
once the reference solutions are pasted back. Executes labs 01 and 02 twice each (live mode)."""

from __future__ import annotations

import shutil
from pathlib import Path

import nbformat
import pytest

from quantlab.exercises import notebooks
from quantlab.exercises.__main__ import main

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
LABS = ["01_uniform_quantization.ipynb", "02_granularity_and_formats.ipynb"]
# one torch thread per kernel: these small tensors gain nothing from two, and on a shared machine
# two spinning threads per kernel make every op 100x slower
ENV = {"OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def course(tmp_path_factory):
    root = tmp_path_factory.mktemp("course")
    (root / "labs").mkdir()
    for name in LABS:
        shutil.copy(REPO / "labs" / name, root / "labs" / name)
    results = notebooks.generate(root / "labs", root / "student")
    assert sorted((r.name, r.action) for r in results) == [(name, "created") for name in LABS]
    return root


def _error_cells(nb):
    return {
        i: out
        for i, cell in enumerate(nb.cells)
        for out in cell.get("outputs", [])
        if out.get("output_type") == "error"
    }


@pytest.mark.parametrize("name", LABS)
def test_student_notebook_fails_at_its_exercises_and_passes_when_solved(course, name, monkeypatch, capsys):
    lab = name.split("_")[0]
    instructor = nbformat.read(REPO / "labs" / name, as_version=4)
    student_path = course / "student" / name
    student = nbformat.read(student_path, as_version=4)
    code = [i for i, c in enumerate(instructor.cells) if c.cell_type == "code"]
    solution_cells = {i for i in code if notebooks.has_solution(instructor.cells[i].source)}
    check_cells = {i for i in code if notebooks.exercise_ids(instructor.cells[i].source)}
    assert solution_cells and check_cells and not solution_cells & check_cells

    # Only the solution regions changed, and no outputs were kept.
    assert len(student.cells) == len(instructor.cells)
    for i, (ins, stu) in enumerate(zip(instructor.cells, student.cells, strict=True)):
        if i in solution_cells:
            assert (
                "# END SOLUTION" not in stu.source and 'raise NotImplementedError("hint: ' not in stu.source
            )
            assert "raise NotImplementedError('hint: " in stu.source
        else:
            assert stu.source == ins.source
        assert stu.get("outputs", []) == []

    # Unsolved: every check cell fails with "not implemented yet", no other cell fails.
    executed = notebooks.execute_notebook(student_path, timeout=300, extra_env=ENV)
    errors = _error_cells(executed)
    assert set(errors) == check_cells
    assert all(
        e["ename"] == "AssertionError" and "not implemented yet" in e["evalue"] for e in errors.values()
    )
    grades = notebooks.grade_notebook(executed, lab)
    assert grades and not any(g.passed for g in grades)

    # `python -m quantlab.exercises check` reports the failures (reusing this execution).
    monkeypatch.setattr(notebooks, "execute_notebook", lambda path, timeout=600, extra_env=None: executed)
    assert main(["check", lab, "--student-dir", str(course / "student")]) == 1
    report = capsys.readouterr().out
    assert report.count("FAIL") == len(grades) and "not implemented yet" in report
    monkeypatch.undo()

    # Solved: paste the reference solutions back; the notebook runs without any error.
    for i in solution_cells:
        student.cells[i].source = instructor.cells[i].source
    solved_dir = course / "solved"
    solved_dir.mkdir(exist_ok=True)
    nbformat.write(student, solved_dir / name)
    executed = notebooks.execute_notebook(solved_dir / name, timeout=300, extra_env=ENV)
    assert _error_cells(executed) == {}
    grades = notebooks.grade_notebook(executed, lab)
    assert grades and all(g.passed for g in grades), grades
    ids = {g.exercise_id for g in grades}
    assert ids == {ex.id for ex in notebooks.list_exercises(lab)}
