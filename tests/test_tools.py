"""Tests for the build helpers in tools/: the book build's lab pre-execution and run_labs' output hygiene."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import nbformat
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))

import build_book  # noqa: E402
import run_labs  # noqa: E402


def test_every_lab_is_in_the_toc_once():
    labs = build_book.toc_notebooks()
    assert len(labs) == len(set(labs))
    assert sorted(p.name for p in labs) == sorted(p.name for p in (ROOT / "labs").glob("*.ipynb"))


def test_merge_streams_joins_consecutive_prints_of_one_stream_only():
    out = [
        nbformat.v4.new_output("stream", name="stdout", text="a\n"),
        nbformat.v4.new_output("stream", name="stdout", text="b\n"),
        nbformat.v4.new_output("stream", name="stderr", text="warn\n"),
        nbformat.v4.new_output("display_data", data={"text/plain": "x"}),
        nbformat.v4.new_output("stream", name="stdout", text="c\n"),
    ]
    merged = run_labs.merge_streams(out)
    assert [(o.output_type, o.get("name"), o.get("text")) for o in merged] == [
        ("stream", "stdout", "a\nb\n"),
        ("stream", "stderr", "warn\n"),
        ("display_data", None, None),
        ("stream", "stdout", "c\n"),
    ]


@pytest.fixture
def tiny_book(tmp_path, monkeypatch):
    """A book with two one-cell notebooks, the build's paths pointed at it."""
    (tmp_path / "labs").mkdir()
    for name, code in (("a", "print(6 * 7)"), ("b", "import os\nprint(os.environ.get('OMP_NUM_THREADS'))")):
        nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(code)])
        nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
        nbformat.write(nb, tmp_path / "labs" / f"{name}.ipynb")
    toc = {"format": "jb-book", "root": "intro", "chapters": [{"file": "labs/a"}, {"file": "labs/b"}]}
    (tmp_path / "_toc.yml").write_text(yaml.safe_dump(toc))
    monkeypatch.setattr(build_book, "ROOT", tmp_path)
    monkeypatch.setattr(build_book, "CACHE", tmp_path / "_build" / ".jupyter_cache")
    monkeypatch.setattr(build_book, "REPORT", tmp_path / "_build" / "build_report.json")
    return tmp_path


def test_outdated_labs_are_executed_in_parallel_into_the_cache_jupyter_book_reads(tiny_book):
    from jupyter_cache import get_cache

    ok, report = build_book.execute_outdated(jobs=2, timeout=120)
    assert ok and report["workers"] == 2 and report["threads"] >= 1
    assert {v["status"] for v in report["labs"].values()} == {"executed"} and len(report["labs"]) == 2
    cache = get_cache(str(build_book.CACHE))
    for name, expected in (("a", "42\n"), ("b", f"{report['threads']}\n")):
        # what myst-nb does in `cache` mode: match the notebook as read from disk, merge the outputs
        _, merged = cache.merge_match_into_notebook(nbformat.read(tiny_book / "labs" / f"{name}.ipynb", 4))
        assert merged.cells[0].outputs[0].text == expected  # b: each kernel got the thread limit
    ok, again = build_book.execute_outdated(jobs=2, timeout=120)
    assert ok and {v["status"] for v in again["labs"].values()} == {"cached"}


def test_a_failing_lab_fails_the_build(tiny_book):
    nb = nbformat.read(tiny_book / "labs" / "a.ipynb", 4)
    nb.cells[0].source = "raise RuntimeError('boom')"
    nbformat.write(nb, tiny_book / "labs" / "a.ipynb")
    ok, report = build_book.execute_outdated(jobs=1, timeout=120)
    assert not ok and report["labs"]["a.ipynb"]["status"] == "failed"
    assert report["labs"]["b.ipynb"]["status"] == "executed"
    assert json.dumps(report)  # the report stays serializable for the status page
