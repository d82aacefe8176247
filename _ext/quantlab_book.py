"""Sphinx extension for the quantlab book: ship plotly.js and MathJax with the site (no CDN).

The book must work offline and in a closed network (the browser test runs without internet), so
the two JavaScript libraries a page needs are copied from installed Python packages into
``_static/`` instead of being fetched from a CDN:

* ``plotly.min.js`` from the ``plotly`` package, loaded once per page in ``<head>``; the labs' static
  figures are plain ``<div>`` + ``Plotly.newPlot`` snippets (see ``quantlab.viz``).
* MathJax 3 (``tex-chtml.js`` and the components it loads lazily) from ``sphinx-mathjax-offline``.

It also provides the ``build-report`` directive of the status page: the lab execution times and the
build's wall time that ``tools/build_book.py --execute`` measured (``_build/build_report.json``).
"""

from __future__ import annotations

import importlib.metadata
import json
import shutil
from pathlib import Path

from docutils import nodes
from docutils.statemachine import StringList
from sphinx.util.docutils import SphinxDirective

# tex-chtml.js bundles the TeX input and CHTML output; these are the parts it loads lazily (fonts,
# menu, accessibility, autoloaded TeX packages). The speech-rule engine (sre/, 4 MB) is left out.
_MATHJAX_DIRS = ("a11y", "adaptors", "input", "output/chtml", "ui")


def _plotly_js() -> Path:
    import plotly

    return Path(plotly.__file__).parent / "package_data" / "plotly.min.js"


def _mathjax_dir() -> Path:
    dist = importlib.metadata.distribution("sphinx-mathjax-offline")
    return Path(str(dist.locate_file("sphinx-mathjax-offline/static/mathjax")))


def _on_builder_inited(app) -> None:
    # plotly.js goes in <head> without defer, so inline figure scripts in the body can call Plotly.
    app.add_js_file("plotly.min.js", priority=200)


def _dedupe_scripts(app, pagename, templatename, context, doctree) -> None:
    """Drop repeated inline scripts: sphinx-thebe 0.3 registers its ``const THEBE_JS_URL`` snippet once
    per read phase, and a second copy is a JavaScript error ("already been declared") on every page."""
    scripts = context.get("script_files")
    if not scripts:
        return
    seen: set[tuple[str, str]] = set()
    unique = []
    for js in scripts:
        # the same snippet is registered once with filename None and once with "": compare contents
        key = (getattr(js, "filename", None) or "", repr(sorted(getattr(js, "attributes", {}).items())))
        if key not in seen:
            seen.add(key)
            unique.append(js)
    scripts[:] = unique


def _on_build_finished(app, exc) -> None:
    if exc is not None or app.builder.format != "html":
        return
    static = Path(app.outdir) / "_static"
    static.mkdir(parents=True, exist_ok=True)
    shutil.copy2(_plotly_js(), static / "plotly.min.js")
    src = _mathjax_dir()
    dst = static / "mathjax"
    dst.mkdir(exist_ok=True)
    shutil.copy2(src / "tex-chtml.js", dst / "tex-chtml.js")
    for name in _MATHJAX_DIRS:
        shutil.copytree(src / name, dst / name, dirs_exist_ok=True)


class BuildReport(SphinxDirective):
    """Render ``_build/build_report.json`` (written by ``tools/build_book.py --execute``) as a table."""

    def _markdown(self, lines: list[str]) -> list:
        # the directive is used in a MyST page, whose nested content is parsed as Markdown
        container = nodes.container()
        self.state.nested_parse(StringList(lines), self.content_offset, container)
        return container.children

    def run(self):
        if self.config.nb_execution_mode == "off":
            return self._markdown([
                "This copy of the site was rendered from the outputs committed with the labs (the book "
                "check of `make test`), so no lab was executed while building it."
            ])
        path = Path(self.env.srcdir) / "_build" / "build_report.json"
        if not path.is_file():
            return self._markdown(["No build report: build the book with `make book`."])
        report = json.loads(path.read_text())
        rows = ["| lab | this build | execution time (s) |", "|---|---|---:|"]
        for name, lab in report["labs"].items():
            seconds = lab.get("seconds")
            status = {"cached": "cached (code unchanged)"}.get(lab["status"], lab["status"])
            rows.append(f"| `{name}` | {status} | {f'{seconds:.0f}' if seconds else '-'} |")
        executed = sum(v["status"] == "executed" for v in report["labs"].values())
        threads = f", {report['threads']} torch thread(s) each" if report.get("threads") else ""
        lines = [
            f"Labs executed in this build: {executed} of {len(report['labs'])}, in "
            f"{report['execution_wall_s']:.0f} s of wall time ({report['workers']} at a time{threads}).",
            "",
        ]
        if report.get("previous_total_wall_s"):
            lines += [f"The previous `make book` in this folder took {report['previous_total_wall_s']:.0f} s "
                      "in all (execution and rendering).", ""]
        return self._markdown(lines + rows)


def _always_reread_status(app, env, added, changed, removed):
    # the report changes with every build, the page's source does not
    return [doc for doc in env.found_docs if doc.endswith("status")]


def setup(app):
    app.add_directive("build-report", BuildReport)
    app.connect("env-get-outdated", _always_reread_status)
    app.connect("builder-inited", _on_builder_inited)
    app.connect("html-page-context", _dedupe_scripts, priority=100)
    app.connect("build-finished", _on_build_finished)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
