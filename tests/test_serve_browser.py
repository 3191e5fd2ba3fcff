"""The web page in a real headless Chromium (Debian's /usr/bin/chromium driven by Playwright): upload,
ask, see the answer stream in; a DICOM upload shows the rendered image. Fails if Chromium is missing,
unless TINYMED_SKIP_BROWSER=1."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from PIL import Image
from pydicom.data import get_testdata_file

from conftest import save_tiny_model
from tinymed.models import generate_answers, load_model
from tinymed.serve.app import ServeConfig, create_app
from tinymed.serve.background import BackgroundServer

CHROMIUM = Path("/usr/bin/chromium")
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]
QUESTION = "Is there a lesion?"

pytestmark = pytest.mark.browser


@pytest.fixture(scope="module")
def browser():
    if os.environ.get("TINYMED_SKIP_BROWSER") == "1":
        pytest.skip("TINYMED_SKIP_BROWSER=1")
    assert CHROMIUM.exists(), "Chromium is missing: apt-get install -y chromium (or set TINYMED_SKIP_BROWSER=1)"
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), args=ARGS)
        yield browser
        browser.close()


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    texts = ["is there a lesion in the left lung? yes no", "what modality is this? ct mri x-ray axial"] * 40
    folder = save_tiny_model(tmp_path_factory.mktemp("tiny"), texts, text_layers=1, seed=0)  # answers in readable tokens
    lm = load_model(folder, device="cpu")
    with BackgroundServer(create_app(lm, ServeConfig(model_name="tiny"))) as server:
        yield lm, server


@pytest.fixture
def page(browser, served):
    context = browser.new_context(viewport={"width": 1024, "height": 600})  # a small laptop screen
    page = context.new_page()
    requests: list[str] = []
    page.on("request", lambda r: requests.append(r.url))
    page.goto(served[1].url + "/")
    page.wait_for_function("() => document.getElementById('model-info').textContent.includes('tiny')")
    yield page
    context.close()
    assert all(url.startswith(served[1].url) or url.startswith("data:") for url in requests), "page left the server"


def test_upload_ask_and_watch_the_answer_stream(page, served, tmp_path):
    lm, _ = served
    image = Image.new("RGB", (80, 60), color=(200, 40, 90))
    image.save(tmp_path / "chest.png")
    expected = generate_answers(lm, [image], [QUESTION], max_new_tokens=8)[0].text
    assert "decision support, not a diagnosis" in page.inner_text("#disclaimer").lower()
    assert "quantization none" in page.inner_text("#model-info") and "device cpu" in page.inner_text("#model-info")

    page.set_input_files("#file", str(tmp_path / "chest.png"))
    page.wait_for_selector("#preview:not([hidden])")
    page.fill("#question", QUESTION)
    page.fill("#max-tokens", "8")
    page.evaluate("""() => { window.answerGrowth = [];
        new MutationObserver((records) => records.forEach(() => window.answerGrowth.push(1)))
            .observe(document.getElementById('answer'), {childList: true, characterData: true, subtree: true}); }""")
    page.click("#ask")
    page.wait_for_function("() => document.getElementById('stats').textContent.includes('tokens/s')", timeout=30_000)
    assert page.inner_text("#answer") == expected
    assert "latency" in page.inner_text("#stats") and page.inner_text("#error") == ""
    growth = page.evaluate("window.answerGrowth")
    assert len(growth) > 1, "the answer was written in one piece, not token by token"
    assert page.evaluate("document.scrollingElement.scrollWidth <= window.innerWidth")  # no sideways scrolling
    assert page.locator("#ask").bounding_box()["x"] + 10 < 1024


def test_dicom_upload_shows_the_rendered_image(page):
    page.set_input_files("#file", get_testdata_file("CT_small.dcm"))
    page.wait_for_selector("#preview:not([hidden])")
    page.wait_for_function("() => document.getElementById('preview').naturalWidth > 0")
    assert page.evaluate("document.getElementById('preview').src").startswith("data:image/png;base64,")
    assert page.evaluate("document.getElementById('preview').naturalWidth") == 128
    assert "DICOM CT" in page.inner_text("#image-info")


def test_bad_upload_shows_the_servers_reason(page, tmp_path):
    (tmp_path / "notes.dcm").write_bytes(Path(get_testdata_file("waveform_ecg.dcm")).read_bytes())
    page.set_input_files("#file", str(tmp_path / "notes.dcm"))
    page.wait_for_function("() => document.getElementById('error').textContent.length > 0")
    assert "no pixel data" in page.inner_text("#error") and page.locator("#preview").is_hidden()
