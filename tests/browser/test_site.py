"""The built book, checked in a real browser (Debian's Chromium driven by Playwright).

For every page of the site: it loads with no JavaScript console error and no failed request to the
local server, every Plotly figure draws (a non-empty SVG), moving its slider (and clicking its
buttons) changes the drawing, and "predict first" answers open. The search page finds "GPTQ".
A screenshot of each page is kept in ``artifacts/screenshots/`` (not committed).

The site is ``$QUANTLAB_SITE`` if set, else the `make test` check build, else ``_build/html``.
Run through ``make browser-test`` (which installs Chromium when missing).
"""

from __future__ import annotations

import functools
import http.server
import os
import shutil
import threading
from pathlib import Path

import pytest

playwright_sync = pytest.importorskip("playwright.sync_api", reason="playwright is a test dependency")

ROOT = Path(__file__).resolve().parents[2]
ARTIFACTS = ROOT / "artifacts" / "screenshots"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
    "--disable-sync",
]
SKIP_PAGES = {"genindex.html", "search.html"}


def _site_dir() -> Path:
    if os.environ.get("QUANTLAB_SITE"):
        return Path(os.environ["QUANTLAB_SITE"])
    for candidate in (ROOT / "_build/check/_build/html", ROOT / "_build/html"):
        if (candidate / "index.html").exists():
            return candidate
    raise FileNotFoundError("no built site found: run `make book-check` (or `make book`) first")


def _chromium() -> str:
    path = os.environ.get("QUANTLAB_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
    if not Path(path).exists():
        raise FileNotFoundError("Chromium not found: run `make browser-test` (installs Debian's chromium)")
    return path


SITE = _site_dir()


def _is_redirect(path: Path) -> bool:
    return 'http-equiv="Refresh"' in path.read_text(errors="replace")[:300]


PAGES = sorted(
    str(p.relative_to(SITE))
    for p in SITE.rglob("*.html")
    if not any(part.startswith("_") for part in p.relative_to(SITE).parts)
    and p.name not in SKIP_PAGES
    and not _is_redirect(p)
)


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format, *args):  # noqa: A002 (signature fixed by the base class)
        pass


@pytest.fixture(scope="module")
def server():
    handler = functools.partial(_QuietHandler, directory=str(SITE))
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    with playwright_sync.sync_playwright() as p:
        context = p.chromium.launch_persistent_context(
            str(tmp_path_factory.mktemp("chromium-profile")),
            executable_path=_chromium(),
            args=CHROMIUM_ARGS,
            headless=True,
            viewport={"width": 1280, "height": 900},
        )
        yield context
        context.close()


def _open(browser, url: str):
    """Open ``url``; return the page and the lists of console errors and failed local requests."""
    page = browser.new_page()
    errors: list[str] = []
    failed: list[str] = []
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.on("response", lambda r: failed.append(f"{r.status} {r.url}") if r.status >= 400 else None)
    page.on("requestfailed", lambda r: failed.append(f"failed {r.url}"))
    page.goto(url, wait_until="load")
    page.wait_for_timeout(300)
    return page, errors, failed


def _svg_signature(page, index: int) -> str:
    return page.evaluate(
        "(i) => { const g = document.querySelectorAll('.js-plotly-plot')[i];"
        " return Array.from(g.querySelectorAll('.main-svg')).map(s => s.innerHTML).join('|'); }",
        index,
    )


def test_site_has_pages():
    assert "book/intro.html" in PAGES
    assert any(p.startswith("labs/") for p in PAGES)


@pytest.mark.parametrize("page_path", PAGES)
def test_page(browser, server, page_path):
    page, errors, failed = _open(browser, f"{server}/{page_path}")
    try:
        n_figs = page.evaluate("document.querySelectorAll('.js-plotly-plot').length")
        n_divs = page.evaluate("document.querySelectorAll('.plotly-graph-div').length")
        assert n_figs == n_divs, f"{n_divs - n_figs} Plotly figure(s) did not draw on {page_path}"
        for i in range(n_figs):
            drawn = page.evaluate(
                "(i) => { const g = document.querySelectorAll('.js-plotly-plot')[i];"
                " const r = g.getBoundingClientRect();"
                " return r.width > 0 && r.height > 0 && g.querySelectorAll('.main-svg *').length > 10; }",
                i,
            )
            assert drawn, f"figure {i} on {page_path} is empty"
            _check_controls(page, i, page_path)
        _check_reveals(page, page_path)
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(ARTIFACTS / (page_path.replace("/", "__") + ".png")), full_page=True)
        assert not errors, f"JavaScript console errors on {page_path}: {errors}"
        assert not failed, f"failed requests on {page_path}: {failed}"
    finally:
        page.close()


def _check_controls(page, i: int, page_path: str) -> None:
    """Move each slider to its last step and click a non-active button; the drawing must change."""
    fig = page.locator(".js-plotly-plot").nth(i)
    fig.scroll_into_view_if_needed()
    n_sliders = fig.locator("g.slider-container").count()
    for s in range(n_sliders):
        before = _svg_signature(page, i)
        rail = fig.locator("g.slider-container").nth(s).locator("rect.slider-rail-touch-rect").first
        box = rail.bounding_box()
        assert box is not None, f"slider {s} of figure {i} on {page_path} is not visible"
        # click near the far end of the rail: a different step from the initial one (which is not
        # always the first, so try both ends)
        for frac in (0.98, 0.02):
            page.mouse.click(box["x"] + box["width"] * frac, box["y"] + box["height"] / 2)
            page.wait_for_timeout(150)
            if _svg_signature(page, i) != before:
                break
        assert _svg_signature(page, i) != before, (
            f"moving slider {s} of figure {i} on {page_path} changed nothing"
        )
    buttons = fig.locator("g.updatemenu-button")
    if buttons.count() > 1:
        before = _svg_signature(page, i)
        for b in range(buttons.count()):
            buttons.nth(b).click(force=True)
            page.wait_for_timeout(150)
            if _svg_signature(page, i) != before:
                break
        assert _svg_signature(page, i) != before, f"no button of figure {i} on {page_path} changed the plot"


def _check_reveals(page, page_path: str) -> None:
    details = page.locator("details.quantlab-reveal")
    for d in range(details.count()):
        item = details.nth(d)
        assert item.get_attribute("open") is None, f"answer {d} on {page_path} is open before a click"
        item.locator("summary").click()
        assert item.get_attribute("open") is not None, f"answer {d} on {page_path} did not open"
        assert item.locator(".quantlab-reveal-answer").is_visible()


def test_index_redirects_to_the_introduction(browser, server):
    page = browser.new_page()
    try:
        page.goto(f"{server}/index.html")
        page.wait_for_url("**/book/intro.html", timeout=10000)
        assert "quantlab" in page.title().lower()
    finally:
        page.close()


def test_search_finds_gptq(browser, server):
    page, errors, failed = _open(browser, f"{server}/search.html?q=GPTQ")
    try:
        page.wait_for_selector("#search-results ul.search li", timeout=15000)
        hits = page.locator("#search-results ul.search li").count()
        assert hits >= 1
        assert not errors, errors
        assert not failed, failed
    finally:
        page.close()
