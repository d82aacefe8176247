#!/usr/bin/env bash
# Fail fast, with a clear message, when the Python that would create .venv is not 3.11.
py="${1:-python3}"
if ! command -v "$py" >/dev/null 2>&1; then
  echo "error: no Python found ('$py'). quantlab needs Python 3.11 (e.g. 'conda env create -f environment.yml'," \
       "or install python3.11 and re-run make)." >&2
  exit 1
fi
ver=$("$py" -c 'import sys; print("%d.%d" % sys.version_info[:2])')
if [ "$ver" != "3.11" ]; then
  echo "error: $py is Python $ver, but quantlab pins Python 3.11 (torch==2.13.0 and the lock are resolved for it)." >&2
  echo "       Install Python 3.11 and run: make SYSPY=python3.11 ..., or 'conda env create -f environment.yml'." >&2
  exit 1
fi
