"""Build the quantlab Jupyter Book with warnings as errors.

    python tools/build_book.py --execute      # `make book`: execute every lab (cached), build _build/html
    python tools/build_book.py --no-execute   # `make test`: render the committed lab outputs into
                                              # _build/check/_build/html without executing anything

With ``--execute``, the labs whose code changed since the last build are executed *before* Sphinx
starts, two at a time on 2 cores (``--jobs``; each kernel then uses one torch thread, because GPTQ's
column loop and the kernels' Python overhead do not scale with threads while two notebooks do), and
stored in the same jupyter-cache that Jupyter Book reads (``_build/.jupyter_cache``). Jupyter Book
then finds every lab cached and only renders. A lab whose code cells are unchanged is not executed
again (the cache hashes code cells, not prose), and the labs' own results cache (``.results_cache/``)
makes a re-executed lab skip measurements whose inputs did not change.

Prints each lab's execution time, the total wall time and the size of the built site, and writes
them to ``_build/build_report.json``, which the book's status page shows.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import shutil
import subprocess
import sys
import time
import traceback
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
CACHE = ROOT / "_build" / ".jupyter_cache"  # where myst-nb looks when the book is built in ROOT
REPORT = ROOT / "_build" / "build_report.json"


def site_size_mb(html: Path) -> float:
    return sum(p.stat().st_size for p in html.rglob("*") if p.is_file()) / 1e6


def toc_notebooks() -> list[Path]:
    """The notebooks listed in ``_toc.yml``, in reading order."""
    toc = yaml.safe_load((ROOT / "_toc.yml").read_text())
    files: list[str] = []

    def walk(node) -> None:
        if isinstance(node, dict):
            if "file" in node:
                files.append(node["file"])
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for item in node:
                walk(item)

    walk(toc)
    return [ROOT / f"{f}.ipynb" for f in files if (ROOT / f"{f}.ipynb").is_file()]


def expected_cost(path: Path, previous: dict[str, float]) -> float:
    """Seconds a lab is expected to take: its last measured time, else a rough guess from its code.

    Only the order of execution depends on this (longest first, so that no long lab starts last).
    """
    if path.name in previous:
        return previous[path.name]
    import nbformat

    code = "".join(c.source for c in nbformat.read(path, as_version=4).cells if c.cell_type == "code")
    return len(code) / 100 + (1000 if "load_smollm2" in code else 0)  # the real-model labs are slow


def _execute(job: tuple[str, int, int]) -> dict:
    """Worker: execute one notebook from a fresh kernel in its folder; return it with its time."""
    import nbformat
    from jupyter_cache.executors.utils import single_nb_execution

    path, timeout, threads = job
    if threads:
        # inherited by the kernel process, read by torch/OpenMP when it starts
        os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = str(threads)
    nb = nbformat.read(path, as_version=4)
    try:
        result = single_nb_execution(nb, cwd=str(Path(path).parent), timeout=timeout, allow_errors=False)
    except Exception:  # the kernel died or could not start: report it like a failing cell
        return {"path": path, "nb": None, "seconds": 0.0, "error": traceback.format_exc()}
    return {
        "path": path,
        "nb": result.nb if result.err is None else None,
        "seconds": result.time,
        "error": result.exc_string,
    }


def execute_outdated(jobs: int, timeout: int) -> tuple[bool, dict]:
    """Execute the toc's notebooks that have no cached execution; store them in the jupyter-cache.

    Returns ``(all succeeded, report)``; the report has every lab's status and seconds.
    """
    import nbformat
    from jupyter_cache import get_cache
    from jupyter_cache.base import CacheBundleIn

    cache = get_cache(str(CACHE))
    previous = {}
    if REPORT.is_file():
        previous = {
            k: v["seconds"]
            for k, v in json.loads(REPORT.read_text()).get("labs", {}).items()
            if v.get("seconds")
        }
    labs = toc_notebooks()
    outdated, report = [], {}
    for path in labs:
        try:
            record = cache.match_cache_notebook(nbformat.read(path, as_version=4))
            report[path.name] = {"status": "cached", "seconds": record.data.get("execution_seconds")}
        except KeyError:
            outdated.append(path)
    outdated.sort(key=lambda p: expected_cost(p, previous), reverse=True)
    workers = max(1, min(jobs, len(outdated)))
    # One worker keeps torch's default threads; several share the cores (1 thread each on 2 cores).
    threads = 0 if workers == 1 else max(1, (os.cpu_count() or 2) // workers)
    print(
        f">> {len(labs) - len(outdated)} of {len(labs)} labs are cached; executing {len(outdated)} "
        f"with {workers} worker(s)" + (f", {threads} torch thread(s) each" if threads else ""),
        flush=True,
    )
    ok = True
    t0 = time.perf_counter()
    if outdated:
        with mp.get_context("spawn").Pool(workers) as pool:
            for out in pool.imap_unordered(_execute, [(str(p), timeout, threads) for p in outdated]):
                name = Path(out["path"]).name
                if out["nb"] is None:
                    ok = False
                    report[name] = {"status": "failed", "seconds": out["seconds"]}
                    print(
                        f"   FAILED {name} after {out['seconds']:.0f} s\n{out['error']}",
                        file=sys.stderr,
                        flush=True,
                    )
                    continue
                cache.cache_notebook_bundle(
                    CacheBundleIn(out["nb"], out["path"], data={"execution_seconds": out["seconds"]}),
                    check_validity=False,
                    overwrite=True,
                )
                report[name] = {"status": "executed", "seconds": out["seconds"]}
                print(f"   {name}: {out['seconds']:.0f} s", flush=True)
    elapsed = time.perf_counter() - t0
    print(f">> labs executed in {elapsed:.0f} s", flush=True)
    ordered = {p.name: report[p.name] for p in labs}
    return ok, {"labs": ordered, "execution_wall_s": elapsed, "workers": workers, "threads": threads}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    group = parser.add_mutually_exclusive_group(required=True)
    group.add_argument("--execute", action="store_true", help="execute the labs (jupyter-cache)")
    group.add_argument("--no-execute", action="store_true", help="render committed outputs only")
    parser.add_argument(
        "--jobs",
        type=int,
        default=int(os.environ.get("QUANTLAB_BOOK_JOBS", "2")),
        help="labs executed at the same time (default 2, or $QUANTLAB_BOOK_JOBS)",
    )
    args = parser.parse_args(argv)
    if args.jobs < 1:
        parser.error(f"--jobs must be >= 1, got {args.jobs}")

    jb = shutil.which("jupyter-book", path=str(Path(sys.executable).parent))
    if jb is None:
        print("error: jupyter-book is not installed in this environment; run `make book`", file=sys.stderr)
        return 1
    t_start = time.perf_counter()
    report = None
    if args.execute:
        config, out = ROOT / "_config.yml", ROOT
        timeout = int(yaml.safe_load(config.read_text()).get("execute", {}).get("timeout", 900))
        ok, report = execute_outdated(args.jobs, timeout)
        if not ok:
            print("error: a lab failed to execute (traceback above); the book was not built", file=sys.stderr)
            return 1
        # the status page reads this while Sphinx runs; the total is added when the build ends
        REPORT.parent.mkdir(parents=True, exist_ok=True)
        previous_total = json.loads(REPORT.read_text()).get("total_wall_s") if REPORT.is_file() else None
        REPORT.write_text(json.dumps({**report, "previous_total_wall_s": previous_total}, indent=1))
    else:
        out = ROOT / "_build" / "check"
        out.mkdir(parents=True, exist_ok=True)
        cfg = yaml.safe_load((ROOT / "_config.yml").read_text())
        cfg.setdefault("execute", {})["execute_notebooks"] = "off"
        # Paths in the config are relative to the config file: point them back at the repository.
        local = cfg.get("sphinx", {}).get("local_extensions", {})
        for name, path in local.items():
            local[name] = str(ROOT / path)
        config = out / "_config.yml"
        config.write_text(yaml.safe_dump(cfg, sort_keys=False))
    cmd = [jb, "build", str(ROOT), "--config", str(config), "--path-output", str(out), "-W", "--keep-going"]
    t0 = time.perf_counter()
    rc = subprocess.call(cmd, cwd=ROOT)
    elapsed = time.perf_counter() - t0
    total = time.perf_counter() - t_start
    html = out / "_build" / "html"
    if rc != 0:
        print(f"error: the book build failed after {total:.0f} s (warnings are errors)", file=sys.stderr)
        return rc
    size = site_size_mb(html)
    if report is not None:
        REPORT.write_text(
            json.dumps({**report, "sphinx_wall_s": elapsed, "total_wall_s": total, "site_mb": size}, indent=1)
        )
    print(f"book built in {total:.0f} s (Sphinx {elapsed:.0f} s): {html / 'index.html'} ({size:.1f} MB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
