"""Self-checking exercises: check a student's function against the library, diagnose the mistake.

In a lab, an exercise is a solution cell followed by a check cell::

    def asymmetric_quantize(x, scale, zero_point, n_bits):
        # BEGIN SOLUTION
        ...
        # END SOLUTION

    from quantlab import exercises
    exercises.check("01.asymmetric_quantize", asymmetric_quantize)

``python -m quantlab.exercises student`` turns the instructor labs into student notebooks (solutions
replaced by ``raise NotImplementedError("hint: ...")``) and ``python -m quantlab.exercises check 01``
grades a student notebook. See :mod:`quantlab.exercises.core` for how checks and diagnoses work and
:mod:`quantlab.exercises.notebooks` for the notebook tools.
"""

from quantlab.exercises.core import (
    CHECK_MODULES,
    Case,
    Exercise,
    Mistake,
    check,
    get_exercise,
    list_exercises,
    registry,
)

__all__ = [
    "CHECK_MODULES",
    "Case",
    "Exercise",
    "Mistake",
    "check",
    "get_exercise",
    "list_exercises",
    "registry",
]
