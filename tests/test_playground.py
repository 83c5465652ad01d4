"""The playground page in a real headless Chromium (Debian's /usr/bin/chromium, driven by
Playwright's Python package; no browser download)."""
import json
import os
import re
from pathlib import Path

import httpx
import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

CHROMIUM = os.environ.get("GPTMOD_CHROMIUM", "/usr/bin/chromium")
try:
    from playwright.sync_api import sync_playwright
except ImportError:
    sync_playwright = None


def needs_browser(test):
    test = pytest.mark.skipif(sync_playwright is None,
                              reason="playwright is not installed (pip install playwright)")(test)
    return pytest.mark.skipif(not Path(CHROMIUM).exists(),
                              reason=f"no Chromium at {CHROMIUM} (apt-get install chromium)")(test)


from gptmod_ext.serve import STATIC_DIR  # noqa: E402
from gptmod_ext.tokenizer import byte_tokenizer  # noqa: E402
from serve_util import API_KEY, live_server, make_tiny_run  # noqa: E402

BROWSER_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                "--disable-background-networking", "--disable-component-update", "--disable-sync"]

# Records every length the generated text takes, to see that it arrives in pieces.
WATCH_OUTPUT = """() => {
  window.__lengths = [];
  const out = document.getElementById('output');
  new MutationObserver(() => window.__lengths.push(out.textContent.length))
    .observe(out, {childList: true, characterData: true, subtree: true});
}"""


def test_page_is_self_contained():
    html = (STATIC_DIR / "playground.html").read_text()
    # No external assets: no http(s) URLs in src/href attributes, no imports.
    assert "src=\"http" not in html and "href=\"http" not in html and "@import" not in html
    for control in ("prompt", "max_tokens", "temperature", "top_p", "top_k", "seed", "generate"):
        assert f'id="{control}"' in html


@pytest.fixture
def page():
    """A fresh page in a headless Chromium, closed after the test."""
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=BROWSER_ARGS, headless=True)
        try:
            yield browser.new_page()
        finally:
            browser.close()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    run_dir = make_tiny_run(tmp_path_factory.mktemp("playground") / "tiny")
    with live_server(run_dir, "--api-key", API_KEY) as url:
        yield url


@needs_browser
def test_generate_streams_into_the_page(server, page):
    requests = []
    page.on("request", lambda r: requests.append(r.url))
    page.goto(server + "/")
    assert page.title() == "gptmod_ext playground"
    page.fill("#api_key", API_KEY)
    page.fill("#prompt", "Hello from the browser")
    page.fill("#max_tokens", "120")
    page.fill("#temperature", "0")
    page.evaluate(WATCH_OUTPUT)
    page.click("#generate")
    page.wait_for_selector("#output[data-done='1']", timeout=60_000)

    text = page.inner_text("#output")
    assert text.startswith("Hello from the browser")
    assert len(text) > len("Hello from the browser")
    lengths = page.evaluate("window.__lengths")
    assert len(set(lengths)) > 5, lengths          # it arrived in many pieces ...
    assert lengths == sorted(lengths)               # ... and only grew
    status = page.inner_text("#status")
    assert "tokens/s" in status and "120 tokens" in status, status
    rate = float(status.split("·")[1].split("tokens/s")[0])
    assert rate > 0
    assert "finished: length" in status
    assert page.is_enabled("#generate")
    # Every request stayed on the server: no external assets.
    assert all(u.startswith(server) for u in requests), requests


@needs_browser
def test_page_shows_errors(server, page):
    page.goto(server + "/")
    page.fill("#api_key", "wrong-key")
    page.click("#generate")
    page.wait_for_selector("#status.error", timeout=30_000)
    assert "401" in page.inner_text("#status")


def test_page_has_no_canned_prompt_and_knows_the_document_start(server):
    # The prompt box starts empty (a run may be trained on anything: a fairy-tale opening made
    # no sense for a model of Python code); an empty prompt starts a new document with the
    # tokenizer's own start token, which the server writes into the page.
    html = httpx.get(server + "/").text
    assert "Once upon a time" not in html
    assert re.search(r'<textarea id="prompt"[^>]*></textarea>', html)
    tok = byte_tokenizer()  # make_tiny_run's tokenizer
    assert f'data-doc-start="{tok.eot_id}"' in html


@needs_browser
def test_empty_prompt_starts_a_new_document(server, page):
    bodies = []
    page.on("request", lambda r: bodies.append(r.post_data) if r.method == "POST" else None)
    page.goto(server + "/")
    page.fill("#api_key", API_KEY)
    page.fill("#max_tokens", "8")
    page.click("#generate")
    page.wait_for_selector("#output[data-done='1']", timeout=60_000)
    assert "error" not in (page.get_attribute("#status", "class") or "")
    assert "8 tokens" in page.inner_text("#status")
    sent = json.loads(bodies[-1])
    start = int(page.evaluate("document.body.dataset.docStart"))
    assert sent["prompt"] == [start]
