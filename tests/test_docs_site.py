"""The built documentation site, loaded in a real browser (headless Chromium).

Build the site first (``python -m sphinx -W --keep-going -n -b html docs docs/_build/html``).
The test serves it with ``python -m http.server`` on 127.0.0.1, as a plain file server would,
and loads the front page, the API page of ``hvp``, a guide with maths, the search page and a
notebook of the gallery. Each page must render what it is for, load every resource it asks
for (images, MathJax, the search index: nothing from the network) and log no console error.
A screenshot of each page goes to docs/_build/screenshots/. Skips when there is no built
site, no Chromium or no Playwright (``pip install -e ".[docs]"``; Chromium from the system,
e.g. ``apt-get install chromium``: Playwright downloads no browser here).
"""

import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).parent.parent
SITE = ROOT / "docs" / "_build" / "html"
SHOTS = ROOT / "docs" / "_build" / "screenshots"
BROWSER = next(
    (shutil.which(b) for b in ("chromium", "chromium-browser", "google-chrome") if shutil.which(b)),
    None,
)
FLAGS = [
    "--no-sandbox",  # CI runs as root
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]

pytestmark = [
    pytest.mark.docs_site,
    pytest.mark.skipif(not (SITE / "index.html").exists(), reason="no built site in docs/_build"),
    pytest.mark.skipif(BROWSER is None, reason="no Chromium on this machine"),
]


@pytest.fixture(scope="module")
def server():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "http.server",
            str(port),
            "--bind",
            "127.0.0.1",
            "--directory",
            SITE,
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    base = f"http://127.0.0.1:{port}/"
    for _ in range(100):
        try:
            urllib.request.urlopen(base, timeout=1).close()
            break
        except OSError:
            time.sleep(0.1)
    yield base
    proc.terminate()
    proc.wait(timeout=10)


@pytest.fixture(scope="module")
def browser():
    sync_api = pytest.importorskip("playwright.sync_api")
    SHOTS.mkdir(parents=True, exist_ok=True)
    with sync_api.sync_playwright() as p:
        # a fresh profile in a temporary folder for every launch
        b = p.chromium.launch(executable_path=BROWSER, args=FLAGS)
        yield b
        b.close()


class Visit:
    """A page loaded with every console error, failed request and HTTP error recorded."""

    def __init__(self, browser, base, path, shot):
        self.problems = []
        self.page = browser.new_page(viewport={"width": 1280, "height": 900})
        self.page.on(
            "console",
            lambda m: m.type == "error" and self.problems.append(f"console: {m.text}"),
        )
        self.page.on("pageerror", lambda e: self.problems.append(f"page error: {e}"))
        self.page.on("requestfailed", lambda r: self.problems.append(f"failed: {r.url}"))
        self.page.on(
            "response",
            lambda r: r.status >= 400 and self.problems.append(f"HTTP {r.status}: {r.url}"),
        )
        self.page.route(  # the site must need nothing outside the file server
            lambda url: not url.startswith(base),
            lambda route: (self.problems.append(f"external: {route.request.url}"), route.abort()),
        )
        self.page.goto(base + path, wait_until="networkidle")
        self.shot = SHOTS / f"{shot}.png"

    def finish(self):
        self.page.screenshot(path=str(self.shot), full_page=False)
        self.page.close()
        assert not self.problems, self.problems


def test_front_page(browser, server):
    v = Visit(browser, server, "index.html", "front")
    assert "hessfunc" in v.page.title()
    text = v.page.inner_text("article")
    assert "hessian_matrix" in text and "Guides" in text
    assert v.page.locator("form[action*='search']").count() >= 1  # the search box
    v.finish()


def test_api_page_of_hvp(browser, server):
    v = Visit(browser, server, "api/generated/hessfunc.hvp.html", "api_hvp")
    signature = v.page.inner_text("dt#hessfunc\\.hvp")
    assert signature.startswith("hvp(") and "params" in signature and "mode" in signature
    body = v.page.inner_text("article").lower()  # the theme may capitalise headings
    for section in ("parameters", "returns", "cost", "example"):
        assert section in body, section
    v.finish()


def test_guide_maths_is_rendered(browser, server):
    v = Visit(browser, server, "guides/spectral.html", "guide_spectral")
    v.page.wait_for_selector("mjx-container", timeout=30_000)
    v.page.wait_for_function(
        "() => window.MathJax && MathJax.startup && MathJax.startup.promise"
        " && document.querySelectorAll('.math').length"
        " === document.querySelectorAll('.math mjx-container').length",
        timeout=30_000,
    )
    assert v.page.locator("mjx-container").count() >= 3
    text = v.page.inner_text("article")
    assert "\\operatorname" not in text and "\\sum" not in text  # no raw TeX left
    v.finish()


def test_search_finds_hvp(browser, server):
    v = Visit(browser, server, "search.html?q=hvp", "search_hvp")
    v.page.wait_for_selector("#search-results ul li a", timeout=30_000)
    links = v.page.eval_on_selector_all("#search-results li a", "els => els.map(e => e.href)")
    assert any(link.split("#")[0].endswith("api/generated/hessfunc.hvp.html") for link in links)
    v.finish()


def test_gallery_notebook_with_plots(browser, server):
    v = Visit(browser, server, "gallery/notebooks/05_spectrum.html", "gallery_spectrum")
    images = v.page.eval_on_selector_all(
        "article img", "els => els.map(e => [e.src, e.complete && e.naturalWidth > 0])"
    )
    assert images, "the executed notebook shows no plot"
    assert all(ok for _, ok in images), images
    assert v.page.locator("article .cell_output").count() > 0  # executed outputs
    v.page.locator("article img").first.scroll_into_view_if_needed()  # the shot shows a plot
    v.finish()


def test_gallery_index_shows_a_card_per_notebook(browser, server):
    v = Visit(browser, server, "gallery/index.html", "gallery_index")
    notebooks = sorted((ROOT / "notebooks").glob("*.ipynb"))
    assert v.page.locator(".nb-card").count() == len(notebooks)
    images = v.page.eval_on_selector_all(
        ".nb-card img", "els => els.map(e => e.complete && e.naturalWidth > 0)"
    )
    assert images and all(images)
    v.finish()
