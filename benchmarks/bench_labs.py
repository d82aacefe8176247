"""Time every lab from a fresh kernel, as a student (or the book build) runs it, against its budget.

Run: ``python benchmarks/bench_labs.py`` (every lab) or ``python benchmarks/bench_labs.py 05 06``.
Each notebook is executed top to bottom in ``labs/`` with ``QUANTLAB_STATIC=1`` (the book's static
figures) and an **empty** results cache (a temporary ``QUANTLAB_CACHE_DIR``), so every measurement a
lab makes is really made: this is the cold time. ``--warm`` keeps one cache for all runs and runs each
lab twice, printing the second (warm) time too: that is what re-executing a changed lab costs.
Nothing in ``labs/`` is written.

Budgets (the course's promise, on 2 CPU cores): 60 s for a lab on synthetic data or the tiny GPT,
180 s for a lab that evaluates SmolLM2-135M. Prints one line per lab and exits with status 1 if a lab
fails or goes over its budget. Wall times depend on the machine and its load: run it on a quiet one.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import nbformat
from nbclient import NotebookClient

ROOT = Path(__file__).resolve().parents[1]
LABS = ROOT / "labs"
BUDGET_S = {"synthetic or tiny GPT": 60.0, "SmolLM2-135M": 180.0}


def budget(nb: nbformat.NotebookNode) -> tuple[str, float]:
    """The lab's budget class: labs that load SmolLM2 get the real-model budget."""
    code = "".join(c.source for c in nb.cells if c.cell_type == "code")
    kind = "SmolLM2-135M" if "load_smollm2" in code else "synthetic or tiny GPT"
    return kind, BUDGET_S[kind]


def run_once(path: Path, timeout: int) -> float:
    nb = nbformat.read(path, as_version=4)
    client = NotebookClient(
        nb, timeout=timeout, kernel_name="python3", resources={"metadata": {"path": str(LABS)}}
    )
    t0 = time.perf_counter()
    client.execute()
    return time.perf_counter() - t0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("labs", nargs="*", help="prefixes of the labs to time, e.g. 05 06 (default: all)")
    parser.add_argument(
        "--warm", action="store_true", help="also time a second run with the results cache kept"
    )
    parser.add_argument("--timeout", type=int, default=900, help="per-cell timeout in seconds (default 900)")
    args = parser.parse_args(argv)
    paths = sorted(LABS.glob("*.ipynb"))
    if args.labs:
        paths = [p for p in paths if any(p.name.startswith(prefix) for prefix in args.labs)]
        if not paths:
            parser.error(f"no lab in labs/ starts with any of {args.labs}")
    os.environ["QUANTLAB_STATIC"] = "1"
    threads = os.environ.get("OMP_NUM_THREADS", "torch default")
    print(f"{len(paths)} lab(s), {os.cpu_count()} CPU cores, torch threads: {threads}")
    print(
        f"{'lab':34s} {'budget class':22s} {'budget':>7s} {'cold':>7s}"
        + (f" {'warm':>7s}" if args.warm else "")
    )
    failed = False
    for path in paths:
        kind, limit = budget(nbformat.read(path, as_version=4))
        with tempfile.TemporaryDirectory(prefix="quantlab-bench-cache-") as cache:
            os.environ["QUANTLAB_CACHE_DIR"] = cache
            try:
                times = [run_once(path, args.timeout)]
                if args.warm:
                    times.append(run_once(path, args.timeout))
            except Exception as err:  # a failing cell: report it and go on with the next lab
                print(f"{path.name:34s} FAILED: {type(err).__name__}: {str(err).splitlines()[0][:200]}")
                failed = True
                continue
        over = times[0] > limit
        failed |= over
        cells = " ".join(f"{t:6.1f}s" for t in times)
        print(
            f"{path.name:34s} {kind:22s} {limit:6.0f}s {cells}" + ("  OVER BUDGET" if over else ""),
            flush=True,
        )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
