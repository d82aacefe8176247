"""Command line: ``python -m quantlab.exercises {student,check,list}``.

* ``student [--force] [--labs labs] [--out student]``: write the student notebooks (``make student``).
  Exits 1 if a student notebook edited since it was generated was left alone (use ``--force``).
* ``check LAB [--student-dir student] [--timeout 600]``: execute ``student/<LAB>_*.ipynb`` from a fresh
  kernel and report each exercise (``make check LAB=01``). Exits 1 unless every exercise passes.
* ``list [LAB]``: the registered exercises.
"""

from __future__ import annotations

import argparse
import sys
import textwrap

from quantlab.exercises.core import list_exercises
from quantlab.exercises.notebooks import generate, grade


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m quantlab.exercises", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    student = sub.add_parser("student", help="write student notebooks from the instructor labs")
    student.add_argument("--labs", default="labs", help="folder of instructor notebooks (default: labs)")
    student.add_argument("--out", default="student", help="folder of student notebooks (default: student)")
    student.add_argument(
        "--force", action="store_true", help="replace edited student notebooks (old file kept as a .bak-*)"
    )
    check = sub.add_parser("check", help="grade one student notebook in a fresh kernel")
    check.add_argument("lab", help="lab number, e.g. 01, or a notebook path")
    check.add_argument("--student-dir", default="student", help="folder of student notebooks")
    check.add_argument("--timeout", type=int, default=600, help="seconds allowed per cell (default: 600)")
    listing = sub.add_parser("list", help="list the registered exercises")
    listing.add_argument("lab", nargs="?", default=None, help="only this lab, e.g. 01")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the command line; returns the exit status."""
    args = _parser().parse_args(argv)
    if args.command == "student":
        try:
            results = generate(args.labs, args.out, force=args.force)
        except ValueError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        for result in results:
            print(result)
        refused = [r for r in results if r.action == "refused"]
        if refused:
            print(
                f"{len(refused)} notebook(s) were edited since they were generated and were NOT overwritten; "
                "rerun with --force to replace them (the old files are kept as backups).",
                file=sys.stderr,
            )
            return 1
        return 0
    if args.command == "check":
        lab = args.lab.zfill(2) if args.lab.isdigit() else args.lab
        try:
            path, grades = grade(lab, args.student_dir, timeout=args.timeout)
        except ValueError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        print(f"Graded {path} (executed from a fresh kernel)")
        for g in grades:
            print(f"  {'PASS' if g.passed else 'FAIL'}  {g.exercise_id}")
            if not g.passed:
                print(textwrap.indent(g.message, "        "))
        n_pass = sum(g.passed for g in grades)
        print(f"{n_pass}/{len(grades)} exercises passed.")
        return 0 if grades and n_pass == len(grades) else 1
    for exercise in list_exercises(args.lab.zfill(2) if args.lab and args.lab.isdigit() else args.lab):
        print(f"{exercise.id:32s} {exercise.signature}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
