"""The search page in a real headless browser (Debian's chromium driven by Playwright): load the
page, enter the API key, search by text and by image, check that the thumbnails shown are the
hits ``Retriever`` returns, and save a screenshot in the test's temporary folder."""

from __future__ import annotations

import os
import shutil

import pytest
from serve_helpers import API_KEY, COLORS, build_gallery, png_bytes, start_service, tiny_model

from mmformer.retrieval import Index, Retriever

CHROMIUM = os.environ.get("MMFORMER_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
LAUNCH_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]

sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install -e .[dev])")
pytestmark = pytest.mark.skipif(
    CHROMIUM is None,
    reason="no chromium browser on PATH (.ci/run installs Debian's "
    "chromium; or set MMFORMER_CHROMIUM to a chromium binary)",
)


@pytest.fixture(scope="module")
def served(tmp_path_factory, one_thread):
    model = tiny_model()
    index_dir = build_gallery(tmp_path_factory.mktemp("browser"), model)
    thread = start_service(model, index_dir)
    yield model, index_dir, thread.server
    thread.stop()


def shown_ids(page, k: int) -> list[str]:
    page.wait_for_function(
        f"document.querySelectorAll('#results .hit img[src^=\"blob:\"]').length === {k}", timeout=20_000
    )
    return page.eval_on_selector_all("#results .hit", "cards => cards.map(c => c.dataset.id)")


def test_search_page_in_headless_chromium(served, tmp_path):
    model, index_dir, server = served
    retriever = Retriever(model, Index.open(index_dir))
    query_png = tmp_path / "query.png"
    query_png.write_bytes(png_bytes(COLORS["blue"], "circle"))
    with sync_api.sync_playwright() as pw:
        context = pw.chromium.launch_persistent_context(
            str(tmp_path / "profile"),
            executable_path=CHROMIUM,
            headless=True,
            args=LAUNCH_ARGS,
            viewport={"width": 1000, "height": 760},
        )
        try:
            page = context.new_page()
            errors = []
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto(f"http://127.0.0.1:{server.http_port}/")
            page.wait_for_selector("#status.error")  # no key yet: /v1/info answers 401, shown as an error
            assert "API key" in page.inner_text("#status")
            page.fill("#key", API_KEY)
            page.dispatch_event("#key", "change")
            page.wait_for_function("document.getElementById('status').textContent === 'ready'")
            assert page.inner_text("#index") == "shapes (20 images)"

            page.fill("#k", "6")
            page.fill("#query", "a red circle")
            page.click("#search")
            ids = shown_ids(page, 6)
            expected = retriever.search_text(["a red circle"], k=6)[0]
            assert ids == [h.id for h in expected]
            captions = page.eval_on_selector_all("#results .caption", "els => els.map(e => e.textContent)")
            assert captions == [h.metadata["caption"] for h in expected]
            scores = page.eval_on_selector_all("#results .score", "els => els.map(e => e.textContent)")
            assert scores == [f"{h.score:.3f}" for h in expected]
            # every thumbnail decoded to a real image
            sizes = page.eval_on_selector_all("#results img", "els => els.map(e => [e.naturalWidth, e.naturalHeight])")
            assert sizes == [[40, 40]] * 6

            page.set_input_files("#file", str(query_png))  # search by image
            page.wait_for_function(
                "document.querySelector('#results .hit') && "
                "document.querySelector('#results .hit').dataset.id === 'shapes/blue-circle.png'",
                timeout=20_000,
            )
            ids = shown_ids(page, 6)
            assert ids == [h.id for h in retriever.search_image([str(query_png)], k=6)[0]]
            page.screenshot(path=str(tmp_path / "search.png"), full_page=True)
            assert (tmp_path / "search.png").stat().st_size > 5_000
            assert errors == []
        finally:
            context.close()
