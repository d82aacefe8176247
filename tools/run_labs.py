"""Execute labs in place so they are committed with fresh outputs (`make outputs`).

Each notebook runs from a fresh kernel in ``labs/`` with ``QUANTLAB_STATIC=1`` (static figures, as in
the book). Volatile metadata (timings, widget state) is stripped so diffs show only real changes.
Prints each lab's wall time; fails if an output leaks an absolute path of this machine.

    python tools/run_labs.py                 # every lab
    python tools/run_labs.py 01 05           # labs whose name starts with 01 or 05
"""

from __future__ import annotations

import os
import re
import sys
import time
from pathlib import Path

import nbformat
from nbclient import NotebookClient

ROOT = Path(__file__).resolve().parents[1]
LABS = ROOT / "labs"
_ABS_PATH = re.compile(r"(/(?:work|root|tmp)/|/home/[^/\s]+/)")


def strip_volatile(nb: nbformat.NotebookNode) -> None:
    nb.metadata.pop("widgets", None)
    for cell in nb.cells:
        cell.metadata.pop("execution", None)
        cell.metadata.pop("collapsed", None)
        if cell.cell_type == "code":
            cell.outputs = merge_streams(cell.outputs)


def merge_streams(outputs: list) -> list:
    """Join consecutive stream outputs of the same stream (prints that arrived one by one) into one."""
    merged: list = []
    for out in outputs:
        prev = merged[-1] if merged else None
        if out.output_type == "stream" and prev is not None and prev.output_type == "stream":
            if prev.name == out.name:
                prev.text += out.text
                continue
        merged.append(out)
    return merged


def leaked_paths(nb: nbformat.NotebookNode) -> list[str]:
    text = nbformat.writes(nb)
    return sorted(set(_ABS_PATH.findall(text)))


def run(path: Path, timeout: int = 900) -> float:
    nb = nbformat.read(path, as_version=4)
    client = NotebookClient(
        nb, timeout=timeout, kernel_name="python3", resources={"metadata": {"path": str(LABS)}}
    )
    t0 = time.perf_counter()
    client.execute()
    elapsed = time.perf_counter() - t0
    strip_volatile(nb)
    leaks = leaked_paths(nb)
    if leaks:
        raise RuntimeError(
            f"{path.name}: outputs contain machine-specific paths {leaks}; print relative paths"
        )
    nbformat.write(nb, path)
    return elapsed


def main(argv: list[str]) -> int:
    os.environ.setdefault("QUANTLAB_STATIC", "1")
    labs = sorted(LABS.glob("*.ipynb"))
    if argv:
        labs = [p for p in labs if any(p.name.startswith(a) for a in argv)]
    if not labs:
        print(f"error: no lab matches {argv}", file=sys.stderr)
        return 1
    for path in labs:
        elapsed = run(path)
        print(f"{path.name:45s} {elapsed:7.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
