"""The demo page (app.py) in a real browser and through its API: search, zero-shot, bad input, a screenshot.

`python app.py` is started on a free local port in quick mode with a tiny model trained here on eight
colour pictures (tests/demo_fixture.py); headless Chromium (Debian's chromium + chromium-driver) types a
Hindi query and uploads pictures through Selenium. Outside CI the browser test skips when Chromium is
missing; in CI (CI=true) a missing browser or Gradio fails.
"""
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from demo_fixture import COLOURS, ENGLISH, colour_table, train_colour_model
from PIL import Image

import clip_utils as cu

ROOT = Path(__file__).resolve().parents[1]
IN_CI = os.environ.get("CI", "").lower() in ("1", "true")
SCREENSHOT = ROOT / "images" / "demo.png"


def _missing(what: str) -> None:
    """Skip with the reason outside CI; fail in CI, where requirements-demo.txt and apt install everything."""
    if IN_CI:
        pytest.fail(f"{what} is missing in CI: .ci/run installs it (requirements-demo.txt, apt chromium)")
    pytest.skip(f"{what} is not installed (pip install -r requirements-demo.txt; apt-get install chromium "
                "chromium-driver fonts-noto-core)")


try:
    import gradio
    from gradio_client import Client, handle_file
    from gradio_client.exceptions import AppError
except ImportError:
    if IN_CI:
        raise
    pytest.skip("gradio is not installed: pip install -r requirements-demo.txt", allow_module_level=True)

from demo.app import parse_classes, read_upload  # noqa: E402  (needs gradio)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """The tiny colour model (saved under run/best) and an eight-picture gallery it has never seen."""
    folder = tmp_path_factory.mktemp("demo")
    model, tokenizer, cfg = train_colour_model(folder)
    gallery = list(colour_table(folder / "gallery", per_colour=1, seed=3)["image"].unique())
    return folder, model, tokenizer, cfg, gallery


@pytest.fixture(scope="module")
def server(trained):
    """`python app.py` on a free port, quick mode, offline; stopped (and its log shown on failure) at the end."""
    folder = trained[0]
    port = _free_port()
    env = {**os.environ, "CLIP_HINDI_MODE": "quick", "HF_HUB_OFFLINE": "1", "GRADIO_ANALYTICS_ENABLED": "False",
           "CLIP_HINDI_RUNS": str(folder / "runs"), "GRADIO_TEMP_DIR": str(folder / "gradio")}
    log = open(folder / "app.log", "w")
    proc = subprocess.Popen([sys.executable, "app.py", "--checkpoint", str(folder / "run" / "best"),
                             "--gallery", str(folder / "gallery"), "--port", str(port)],
                            cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.monotonic() + 180
        while True:
            if proc.poll() is not None:
                pytest.fail(f"app.py exited with {proc.returncode}:\n{(folder / 'app.log').read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(url, timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"app.py did not answer in 180 s:\n{(folder / 'app.log').read_text()[-3000:]}")
            time.sleep(0.5)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=15)
        log.close()


def test_fixture_model_learned_retrieval_an_untrained_one_lacks(trained):
    """The browser test's expectation is earned: the trained tiny model finds most colours, an untrained one doesn't."""
    _, model, tokenizer, cfg, gallery = trained
    untrained, untrained_tokenizer = cu.build_model(cfg, captions=list(COLOURS))

    def found(m, tok):
        m.eval()
        return sum(cu.search_images(word, m, tok, gallery, cfg, k=1)["image"][0].endswith(f"/{english}_0.png")
                   for word, english in zip(COLOURS, ENGLISH))

    assert found(model, tokenizer) >= 6 and found(untrained, untrained_tokenizer) <= 3


def test_class_names_and_uploads_are_checked(tmp_path):
    assert parse_classes(" लाल, नीला\nहरा\n\nलाल ,") == ["लाल", "नीला", "हरा"]
    assert parse_classes("  \n , ") == []
    (tmp_path / "notes.txt").write_text("not a picture")
    with pytest.raises(ValueError, match="notes.txt` is not an image"):
        read_upload(tmp_path / "notes.txt")
    Image.new("L", (300, 200)).save(tmp_path / "big.png")
    with pytest.raises(ValueError, match=r"300 × 200 pixels"):
        read_upload(tmp_path / "big.png", max_pixels=50_000)
    assert read_upload(tmp_path / "big.png").shape == (200, 300, 3)


def _huge_png(path: Path) -> Path:
    Image.new("L", (7000, 6000), 255).save(path)  # 42 megapixels in a few hundred kilobytes
    return path


def test_api_search_classify_and_bad_input(server, trained, tmp_path):
    folder, *_, gallery = trained
    client = Client(server, verbose=False)
    found = 0
    for word, english in zip(COLOURS, ENGLISH):
        items, status = client.predict(word, 3, api_name="/search")
        assert len(items) == 3 and word in status
        found += items[0]["caption"].startswith(f"1. {english}_0.png")
    assert found >= 6, found  # the same bar as the fixture test, through HTTP this time

    red = str(folder / "gallery" / "red_0.png")
    _, scores, status = client.predict(handle_file(red), "लाल\nनीला\nहरा\nपीला", api_name="/classify")
    assert scores["label"] == "लाल" and "4 prompts" in status

    for query in ("", "   \n "):
        items, status = client.predict(query, 3, api_name="/search")
        assert items == [] and "Type a description in Hindi" in status
    with pytest.raises(AppError, match="less than minimum"):  # the slider's own range check, a message too
        client.predict("लाल", 0, api_name="/search")
    (tmp_path / "notes.txt").write_text("not a picture")
    bad = {"notes.txt": "not an image the demo can read", "huge.png": "megapixels"}
    for name, message in bad.items():
        path = tmp_path / name if name == "notes.txt" else _huge_png(tmp_path / name)
        _, scores, status = client.predict(handle_file(str(path)), "लाल, नीला", api_name="/classify")
        assert message in status and "Traceback" not in status
    _, _, status = client.predict(handle_file(red), " , \n", api_name="/classify")
    assert "at least one Hindi class name" in status
    items, _ = client.predict("नीला", 1, api_name="/search")  # still serving after all of that
    assert items[0]["caption"].startswith("1. blue_0.png")


def test_notebook_launch_serves_in_process(trained):
    """What notebook 03's last cell calls: launch() on the model already in memory, without blocking."""
    from demo.app import launch

    folder, model, tokenizer, cfg, gallery = trained
    page = launch(model, tokenizer, cfg, gallery, source="the notebook's model", cache_dir=folder / "nb_cache",
                  share=False, prevent_thread_lock=True, server_name="127.0.0.1", server_port=_free_port(), quiet=True)
    try:
        items, status = Client(page.local_url, verbose=False).predict("नीला", 2, api_name="/search")
        assert items[0]["caption"].startswith("1. blue_0.png") and "2 of 8" in status
        assert list((folder / "nb_cache").glob("gallery-*.npy")), "the gallery embeddings are cached"
    finally:
        page.close()


def _browser():
    """Headless Chromium through its Debian driver, or a skip (a failure in CI) when either is missing."""
    binary = next((shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome") if shutil.which(n)), None)
    driver = shutil.which("chromedriver")
    if not binary or not driver:
        _missing("Chromium or chromedriver")
    try:
        from selenium import webdriver
    except ImportError:
        _missing("selenium")
    options = webdriver.ChromeOptions()
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1280,1000"):
        options.add_argument(flag)  # no sandbox: CI runs as root in a container
    options.binary_location = binary
    return webdriver.Chrome(options=options, service=webdriver.ChromeService(driver))


def test_in_a_real_browser(server, trained, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    folder = trained[0]
    browser = _browser()
    try:
        wait = WebDriverWait(browser, 60)
        text_of = lambda selector: browser.find_element(By.CSS_SELECTOR, selector).text

        def status_says(selector, words):
            wait.until(lambda _: words in text_of(selector), message=f"{selector} never said {words!r}")

        browser.get(server)
        query = wait.until(lambda b: b.find_element(By.CSS_SELECTOR, "#query textarea"))
        assert "Gallery: 8 images" in text_of("#about") and "quick mode" in text_of("#about")
        query.send_keys("लाल", Keys.ENTER)
        wait.until(lambda b: b.find_elements(By.CSS_SELECTOR, "#results .caption-label"))
        first = browser.find_elements(By.CSS_SELECTOR, "#results .caption-label")[0].text
        assert first.startswith("1. red_0.png"), first
        status_says("#search-status", "images for लाल")
        browser.save_screenshot(str(SCREENSHOT))

        query.send_keys(Keys.CONTROL, "a")
        query.send_keys(Keys.DELETE, "   ", Keys.ENTER)
        status_says("#search-status", "Type a description in Hindi")

        next(t for t in browser.find_elements(By.CSS_SELECTOR, "button[role=tab]") if "zero-shot" in t.text).click()
        upload = lambda path: wait.until(lambda b: b.find_element(By.CSS_SELECTOR, "#upload input[type=file]")
                                         ).send_keys(str(path))
        clear = lambda: browser.find_element(By.CSS_SELECTOR, "#upload button[aria-label=Clear]").click()
        upload(folder / "gallery" / "red_0.png")
        status_says("#classify-status", "among 8 classes")
        assert text_of("#scores [data-testid=label-output-value]") == "लाल"

        (tmp_path / "notes.txt").write_text("not a picture")
        for path, words in [(tmp_path / "notes.txt", "not an image the demo can read"),
                            (_huge_png(tmp_path / "huge.png"), "megapixels")]:
            clear()
            upload(path)
            status_says("#classify-status", words)

        box = browser.find_element(By.CSS_SELECTOR, "#classes textarea")
        box.send_keys(Keys.CONTROL, "a")
        box.send_keys(Keys.DELETE)  # as a person would: clear() alone fires no input event
        browser.find_element(By.ID, "classify-button").click()
        status_says("#classify-status", "at least one Hindi class name")
        assert "Traceback" not in browser.page_source
    finally:
        browser.quit()


def test_space_folder_runs_and_its_card_matches_the_pins(tmp_path):
    from demo.space import assemble_space

    photos = tmp_path / "photos" / "set1"
    photos.mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(photos / "a.png")
    space = assemble_space(tmp_path / "space", gallery=tmp_path / "photos")
    card = (space / "README.md").read_text(encoding="utf-8")
    meta = dict(line.split(": ", 1) for line in card.split("---")[1].strip().splitlines())
    assert meta["sdk"] == "gradio" and meta["app_file"] == "app.py" and (space / meta["app_file"]).exists()
    demo_pins = (ROOT / "requirements-demo.txt").read_text(encoding="utf-8")
    assert f"gradio=={meta['sdk_version']}" in demo_pins and meta["sdk_version"] == gradio.__version__
    requirements = (space / "requirements.txt").read_text(encoding="utf-8").split()
    assert "torch==" in " ".join(requirements) and not any(r.startswith(("pytest", "ruff")) for r in requirements)
    assert [p.name for p in (space / "gallery").iterdir()] == ["set1_a.png"]
    help_text = subprocess.run([sys.executable, "app.py", "--help"], cwd=space, capture_output=True, text=True,
                               timeout=120, env={**os.environ, "PYTHONPATH": ""})
    assert help_text.returncode == 0 and "--gallery" in help_text.stdout, help_text.stderr[-2000:]
