"""Student notebooks: generate them from the instructor labs, refuse to clobber edits, grade them.

An instructor lab marks each exercise's solution with two comment lines inside a code cell::

    def minmax_calibrate(x, n_bits):
        # BEGIN SOLUTION
        # HINT: stretch the range to contain 0 first
        ...
        # END SOLUTION

and checks it in a following cell with ``exercises.check("01.minmax_calibration", minmax_calibrate)``.
:func:`make_student_notebook` replaces every region (markers included) by::

        # YOUR CODE HERE
        raise NotImplementedError("hint: stretch the range to contain 0 first")

The hint comes from a ``# HINT:`` line inside the region, else one elsewhere in the cell (kept there),
else the registry's hint of the exercise checked in that cell or the cells after it. Everything else is
kept; outputs and execution counts are cleared.

:func:`generate` writes the student notebooks and a manifest ``.generated.json`` holding a hash of each
generated notebook's cell *sources* (so re-saving in JupyterLab, which changes outputs and metadata, is
not an edit, but changing any cell is). A student notebook whose hash differs from the manifest is
never overwritten, unless ``force``; then the old file is kept as ``<name>.bak-<timestamp>``.

:func:`grade` executes a student notebook from a fresh kernel with ``nbclient`` (errors allowed) and
reports, per exercise, whether its check cell passed and the diagnosis when it did not.
"""

from __future__ import annotations

import copy
import datetime
import hashlib
import json
import os
import re
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nbformat

from quantlab.exercises.core import get_exercise, list_exercises

__all__ = [
    "BEGIN",
    "END",
    "HINT",
    "MANIFEST",
    "ExerciseGrade",
    "GenerateResult",
    "content_hash",
    "execute_notebook",
    "exercise_ids",
    "find_student_notebook",
    "generate",
    "grade",
    "grade_notebook",
    "has_solution",
    "make_student_notebook",
    "strip_solutions",
]

BEGIN = "# BEGIN SOLUTION"
END = "# END SOLUTION"
HINT = "# HINT:"
MANIFEST = ".generated.json"
STUB_MARKER = "# YOUR CODE HERE"

_CHECK_CALL = re.compile(r"""\bcheck\(\s*["']([\w.-]+)["']""")


# -----------------------------------------------------------------------------
# Cells


def exercise_ids(source: str) -> list[str]:
    """Exercise ids checked in a cell's source (``check("01.x", fn)`` calls)."""
    return _CHECK_CALL.findall(source)


def has_solution(source: str) -> bool:
    """Whether a cell's source holds a solution region."""
    return any(line.strip().startswith(BEGIN) for line in source.splitlines())


def _hint_of(lines: list[str]) -> str | None:
    for line in lines:
        if line.strip().startswith(HINT):
            return line.strip()[len(HINT) :].strip()
    return None


def _outside_regions(lines: list[str]) -> list[str]:
    """The lines of a cell that are not inside a solution region."""
    out, inside = [], False
    for line in lines:
        stripped = line.strip()
        if stripped.startswith(BEGIN):
            inside = True
        elif stripped.startswith(END):
            inside = False
        elif not inside:
            out.append(line)
    return out


def strip_solutions(source: str, hints: str | Sequence[str] | None = None) -> str:
    """Replace every ``# BEGIN SOLUTION`` .. ``# END SOLUTION`` region by a ``NotImplementedError`` stub.

    The stub's hint is, in order of preference: a ``# HINT:`` line inside the region; a ``# HINT:`` line
    elsewhere in the cell (kept in place); ``hints`` (one string for every region, or one per region in
    order, e.g. the registry hints of the exercises checked after the cell); a generic hint.

    Args:
        source: a code cell's source.
        hints: fallback hint(s).

    Returns:
        The student version of the source.

    Raises:
        ValueError: on unbalanced or nested markers (with the line number).

    >>> cell = "def f(x):\\n    # BEGIN SOLUTION\\n    return x\\n    # END SOLUTION"
    >>> print(strip_solutions(cell, "return x"))
    def f(x):
        # YOUR CODE HERE
        raise NotImplementedError('hint: return x')
    """
    lines = source.splitlines()
    fallback = [hints] if isinstance(hints, str) else list(hints or [])
    cell_hint = _hint_of(_outside_regions(lines))
    out: list[str] = []
    region: list[str] | None = None
    indent = ""
    n_regions = 0
    for number, line in enumerate(lines, start=1):
        stripped = line.strip()
        if stripped.startswith(BEGIN):
            if region is not None:
                raise ValueError(f"line {number}: '{BEGIN}' inside another solution region")
            region, indent = [], line[: len(line) - len(line.lstrip())]
        elif stripped.startswith(END):
            if region is None:
                raise ValueError(f"line {number}: '{END}' without a '{BEGIN}' before it")
            own = fallback[min(n_regions, len(fallback) - 1)] if fallback else None
            text = _hint_of(region) or cell_hint or own or "see the explanation above"
            out.append(f"{indent}{STUB_MARKER}")
            out.append(f"{indent}raise NotImplementedError({'hint: ' + text!r})")
            region = None
            n_regions += 1
        elif region is not None:
            region.append(line)
        else:
            out.append(line)
    if region is not None:
        raise ValueError(f"'{BEGIN}' without a matching '{END}'")
    return "\n".join(out)


def content_hash(nb: nbformat.NotebookNode) -> str:
    """SHA-256 of a notebook's cell types and sources (outputs and metadata do not count)."""
    cells = [[cell.cell_type, cell.source] for cell in nb.cells]
    return hashlib.sha256(json.dumps(cells, ensure_ascii=False).encode()).hexdigest()


def make_student_notebook(nb: nbformat.NotebookNode, source_name: str = "") -> nbformat.NotebookNode:
    """The student version of an instructor notebook (a copy; ``nb`` is not modified).

    Args:
        nb: the instructor notebook.
        source_name: where it came from, recorded in ``metadata.quantlab.generated_from``.

    Returns:
        A notebook with solution regions stubbed out and all outputs cleared.
    """
    student = copy.deepcopy(nb)
    cells = student.cells
    for i, cell in enumerate(cells):
        if cell.cell_type != "code":
            continue
        if has_solution(cell.source):
            ids = exercise_ids(cell.source)
            for later in cells[i + 1 :]:  # the check cell(s) that follow, up to the next exercise
                if later.cell_type == "code" and has_solution(later.source):
                    break
                if later.cell_type == "code":
                    ids += exercise_ids(later.source)
            hints = []  # region k of the cell gets the hint of the k-th exercise checked after it
            for exercise_id in ids:
                try:
                    hints.append(get_exercise(exercise_id).hint)
                except ValueError:  # not a registered id: the cell's # HINT: line or a generic hint
                    continue
            try:
                cell.source = strip_solutions(cell.source, hints)
            except ValueError as exc:
                raise ValueError(f"{source_name or 'notebook'} cell {i}: {exc}") from None
        cell.outputs = []
        cell.execution_count = None
        for key in ("execution", "collapsed", "scrolled"):
            cell.metadata.pop(key, None)
    student.metadata.pop("widgets", None)
    student.metadata["quantlab"] = {"generated_from": source_name, "student": True}
    return student


# -----------------------------------------------------------------------------
# Generating the student folder


@dataclass(frozen=True)
class GenerateResult:
    """What :func:`generate` did with one notebook."""

    name: str
    action: str  # "created", "updated", "unchanged", "refused" or "replaced"
    backup: Path | None = None

    def __str__(self) -> str:
        text = f"{self.action:>9}  {self.name}"
        if self.action == "refused":
            text += "  (edited since it was generated; use --force to replace it, a backup is kept)"
        if self.backup is not None:
            text += f"  (old version kept as {self.backup.name})"
        return text


def _read_manifest(path: Path) -> dict[str, Any]:
    if not path.exists():
        return {"notebooks": {}}
    data = json.loads(path.read_text())
    if not isinstance(data, dict) or not isinstance(data.get("notebooks"), dict):
        raise ValueError(f"{path} is not a quantlab manifest (expected a 'notebooks' mapping)")
    return data


def _lab_notebooks(labs_dir: Path) -> list[Path]:
    return sorted(p for p in labs_dir.glob("*.ipynb") if not p.name.startswith("."))


def generate(
    labs_dir: str | os.PathLike[str] = "labs",
    out_dir: str | os.PathLike[str] = "student",
    *,
    force: bool = False,
    now: datetime.datetime | None = None,
) -> list[GenerateResult]:
    """Write the student version of every ``labs_dir/*.ipynb`` into ``out_dir``.

    Args:
        labs_dir: folder of instructor notebooks.
        out_dir: folder of student notebooks (created if missing), with its manifest.
        force: replace student notebooks edited since they were generated (old file kept as a backup).
        now: timestamp for backup names (default: the current time).

    Returns:
        One :class:`GenerateResult` per notebook; ``"refused"`` ones were left untouched.
    """
    labs, out = Path(labs_dir), Path(out_dir)
    if not labs.is_dir():
        raise ValueError(f"labs_dir={str(labs)!r} is not a folder")
    notebooks = _lab_notebooks(labs)
    if not notebooks:
        raise ValueError(f"labs_dir={str(labs)!r} holds no .ipynb notebooks")
    out.mkdir(parents=True, exist_ok=True)
    manifest_path = out / MANIFEST
    manifest = _read_manifest(manifest_path)
    stamp = (now or datetime.datetime.now()).strftime("%Y%m%d-%H%M%S")
    results = []
    for path in notebooks:
        student = make_student_notebook(nbformat.read(path, as_version=4), source_name=str(path))
        new_hash = content_hash(student)
        target = out / path.name
        backup = None
        if target.exists():
            try:
                current = content_hash(nbformat.read(target, as_version=4))
            except Exception:  # an unreadable notebook counts as edited: never destroy it silently
                current = None
            recorded = manifest["notebooks"].get(path.name, {}).get("sha256")
            if current is None or current != recorded:
                if not force:
                    results.append(GenerateResult(path.name, "refused"))
                    continue
                backup = target.with_name(f"{target.name}.bak-{stamp}")
                shutil.copy2(target, backup)
                action = "replaced"
            elif current == new_hash:
                results.append(GenerateResult(path.name, "unchanged"))
                continue
            else:
                action = "updated"
        else:
            action = "created"
        nbformat.write(student, target)
        manifest["notebooks"][path.name] = {"sha256": new_hash, "generated_from": str(path)}
        results.append(GenerateResult(path.name, action, backup))
    manifest["generator"] = "python -m quantlab.exercises student"
    manifest_path.write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")
    return results


# -----------------------------------------------------------------------------
# Grading


@dataclass(frozen=True)
class ExerciseGrade:
    """The outcome of one exercise in a graded notebook."""

    exercise_id: str
    passed: bool
    message: str = ""


def find_student_notebook(lab: str, student_dir: str | os.PathLike[str] = "student") -> Path:
    """The student notebook of a lab: ``"01"``/``"1"`` -> ``student/01_*.ipynb``, or a path as given."""
    as_path = Path(lab)
    if as_path.suffix == ".ipynb":
        if not as_path.exists():
            raise ValueError(f"notebook {lab!r} does not exist")
        return as_path
    folder = Path(student_dir)
    prefix = f"{int(lab):02d}_" if lab.isdigit() else f"{lab}"
    matches = sorted(p for p in folder.glob(f"{prefix}*.ipynb"))
    if len(matches) != 1:
        found = [p.name for p in sorted(folder.glob("*.ipynb"))] if folder.is_dir() else []
        raise ValueError(
            f"lab={lab!r} matches {len(matches)} notebooks in {str(folder)!r} (expected 1); "
            f"notebooks there: {found}. Run `make student` first?"
        )
    return matches[0]


def _error_text(outputs: list[Any]) -> str | None:
    for output in outputs:
        if output.get("output_type") == "error":
            ename, evalue = output.get("ename", "Error"), output.get("evalue", "")
            return evalue if ename == "AssertionError" else f"{ename}: {evalue}"
    return None


def execute_notebook(
    path: str | os.PathLike[str], timeout: int = 600, extra_env: dict[str, str] | None = None
) -> nbformat.NotebookNode:
    """Run a notebook top to bottom in a fresh kernel, errors allowed; the file is not modified.

    Figures run in live mode (``QUANTLAB_STATIC`` is removed from the kernel's environment): nothing
    is rendered, and live mode skips the static precomputation. The kernel starts in the notebook's
    folder.

    Args:
        path: the notebook.
        timeout: seconds allowed per cell.
        extra_env: variables added to the kernel's environment (e.g. ``{"OMP_NUM_THREADS": "1"}`` when
            many notebooks are graded at once on a shared machine).

    Returns:
        The executed notebook (outputs filled in).
    """
    from nbclient import NotebookClient

    path = Path(path)
    nb = nbformat.read(path, as_version=4)
    env = {k: v for k, v in os.environ.items() if k != "QUANTLAB_STATIC"}
    env.update(extra_env or {})
    client = NotebookClient(
        nb,
        timeout=timeout,
        kernel_name="python3",
        allow_errors=True,
        resources={"metadata": {"path": str(path.parent.resolve())}},
    )
    client.execute(env=env)
    return nb


def grade_notebook(nb: nbformat.NotebookNode, lab: str | None = None) -> list[ExerciseGrade]:
    """Grade an *executed* notebook: each check cell passed if it raised no error.

    Args:
        nb: a notebook executed with errors allowed (see :func:`execute_notebook`).
        lab: lab number (``"01"``); its registered exercises without a check cell count as failed.

    Returns:
        One :class:`ExerciseGrade` per exercise, in notebook order.
    """
    grades: dict[str, ExerciseGrade] = {}
    solution_error = None
    for cell in nb.cells:
        if cell.cell_type != "code":
            continue
        error = _error_text(cell.get("outputs", []))
        if STUB_MARKER in cell.source or has_solution(cell.source):
            solution_error = error
        for exercise_id in exercise_ids(cell.source):
            if cell.get("execution_count") is None and not cell.get("outputs"):
                grades[exercise_id] = ExerciseGrade(exercise_id, False, "the check cell did not run")
            elif error is None:
                grades[exercise_id] = ExerciseGrade(exercise_id, True)
            elif any(
                error.startswith(f"{other}:") for other in exercise_ids(cell.source) if other != exercise_id
            ):
                # another check in the same cell failed first, so this one never ran
                grades[exercise_id] = ExerciseGrade(
                    exercise_id, False, "not run: a check before it in the same cell failed"
                )
            else:
                if solution_error is not None and solution_error != error:
                    error = f"your solution cell failed first: {solution_error}\n{error}"
                grades[exercise_id] = ExerciseGrade(exercise_id, False, error)
    for exercise in list_exercises(lab) if lab is not None else []:
        if exercise.id not in grades:
            grades[exercise.id] = ExerciseGrade(exercise.id, False, "no check cell for this exercise found")
    return list(grades.values())


def grade(
    lab: str, student_dir: str | os.PathLike[str] = "student", timeout: int = 600
) -> tuple[Path, list[ExerciseGrade]]:
    """Execute a student notebook from a fresh kernel and grade each exercise's check cell.

    Args:
        lab: lab number (``"01"``) or a notebook path.
        student_dir: where the student notebooks are.
        timeout: seconds allowed per cell.

    Returns:
        ``(path, grades)``: one :class:`ExerciseGrade` per exercise of the lab (missing check cells fail).
    """
    path = find_student_notebook(lab, student_dir)
    nb = execute_notebook(path, timeout)
    return path, grade_notebook(nb, path.name.split("_", 1)[0])
