"""Build the quantlab Jupyter Book with warnings as errors.

    python tools/build_book.py --execute      # `make book`: execute every lab (cached), build _build/html
    python tools/build_book.py --no-execute   # `make test`: render the committed lab outputs into
                                              # _build/check/_build/html without executing anything

Prints the wall time and the size of the built site.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def site_size_mb(html: Path) -> float:
    return sum(p.stat().st_size for p in html.rglob("*") if p.is_file()) / 1e6


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    group = parser.add_mutually_exclusive_group(required=True)
    group.add_argument("--execute", action="store_true", help="execute the labs (jupyter-cache)")
    group.add_argument("--no-execute", action="store_true", help="render committed outputs only")
    args = parser.parse_args(argv)

    jb = shutil.which("jupyter-book", path=str(Path(sys.executable).parent))
    if jb is None:
        print("error: jupyter-book is not installed in this environment; run `make book`", file=sys.stderr)
        return 1
    if args.execute:
        config, out = ROOT / "_config.yml", ROOT
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
    html = out / "_build" / "html"
    if rc != 0:
        print(f"error: the book build failed after {elapsed:.0f} s (warnings are errors)", file=sys.stderr)
        return rc
    print(f"book built in {elapsed:.0f} s: {html / 'index.html'} ({site_size_mb(html):.1f} MB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
