"""fss-demo: the page's prediction equals fss.predict at the query's size; the HTTP API and
its bad-input answers; the page itself in a headless Chromium (upload, paint, segment)."""

from __future__ import annotations

import base64
import io
import shutil
import socket
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import fss
from fss.demo import create_app, main, segment
from fss.models import HSNet

INPUT_SIZE = 64
QUERY_SIZE = (53, 71)    # H, W: neither square nor the model's size
SUPPORT_SIZE = (60, 45)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    net = HSNet(backbone="resnet18", weights=None).eval()
    # What fss.load_model attaches; the input size keeps the test fast.
    net.checkpoint_info = {"input": {"image_size": INPUT_SIZE}}
    return net


def picture(size: tuple[int, int], seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    array = rng.integers(0, 255, size=(*size, 3), dtype=np.uint8)
    array[size[0] // 4: 3 * size[0] // 4, size[1] // 4: 3 * size[1] // 4] = (200, 40, 40)
    return Image.fromarray(array)


def box_mask(size: tuple[int, int]) -> Image.Image:
    mask = np.zeros(size, dtype=np.uint8)
    mask[size[0] // 4: 3 * size[0] // 4, size[1] // 4: 3 * size[1] // 4] = 255
    return Image.fromarray(mask)


def decode(data_url: str) -> np.ndarray:
    assert data_url.startswith("data:image/png;base64,")
    return np.array(Image.open(io.BytesIO(base64.b64decode(data_url.split(",", 1)[1]))))


def png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def test_segment_equals_fss_predict_at_the_query_size(model):
    query, support, mask = picture(QUERY_SIZE, 1), picture(SUPPORT_SIZE, 2), box_mask(SUPPORT_SIZE)
    result = segment(model, query, [support], [mask])
    expected = fss.predict(model, query, [support], [mask])
    assert (result["height"], result["width"]) == QUERY_SIZE
    returned = decode(result["mask"])
    assert returned.shape == QUERY_SIZE and set(np.unique(returned)) <= {0, 255}
    np.testing.assert_array_equal(returned, expected * 255)
    assert result["foreground"] == round(float(expected.mean()), 4)
    overlay = decode(result["overlay"])
    assert overlay.shape == (*QUERY_SIZE, 3)
    query_rgb = np.array(query)
    # Tinted where the mask is, untouched elsewhere.
    np.testing.assert_array_equal(overlay[expected == 0], query_rgb[expected == 0])
    if expected.any():
        assert (overlay[expected == 1] != query_rgb[expected == 1]).any()
    share = round(float((np.array(mask) > 0).mean()), 4)
    assert result["supports"] == [{"width": SUPPORT_SIZE[1], "height": SUPPORT_SIZE[0],
                                   "foreground": share}]


def test_http_api_answers_masks_and_one_line_errors(model):
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    client = TestClient(create_app(model))
    page = client.get("/")
    assert page.status_code == 200 and "<canvas" in page.text and "hsnet (resnet18" in page.text
    assert client.get("/api/model").json() == {"model": "hsnet", "backbone": "resnet18",
                                               "input_size": INPUT_SIZE}
    query, supports = picture(QUERY_SIZE, 1), [picture(SUPPORT_SIZE, 2), picture((40, 40), 3)]
    masks = [box_mask(SUPPORT_SIZE), box_mask((20, 20))]  # the second is stretched to 40x40
    files = [("query", ("q.png", png(query), "image/png"))]
    files += [("supports", (f"s{i}.png", png(s), "image/png")) for i, s in enumerate(supports)]
    files += [("masks", (f"m{i}.png", png(m), "image/png")) for i, m in enumerate(masks)]
    answer = client.post("/api/predict", files=files)
    assert answer.status_code == 200, answer.text
    result = answer.json()
    expected = fss.predict(model, query, supports, masks, resize_mask=True)
    np.testing.assert_array_equal(decode(result["mask"]), expected * 255)
    assert (result["height"], result["width"]) == QUERY_SIZE

    broken = [("query", ("q.png", b"not an image", "image/png")), *files[1:]]
    answer = client.post("/api/predict", files=broken)
    assert answer.status_code == 400
    assert answer.json() == {"error": "query image 'q.png' is not an image PIL can read (PNG, JPEG, ...)"}
    empty = np.zeros(SUPPORT_SIZE, dtype=np.uint8)
    files_empty = [*files[:3], ("masks", ("m0.png", png(Image.fromarray(empty)), "image/png")),
                   files[4]]
    answer = client.post("/api/predict", files=files_empty)
    assert answer.status_code == 400 and "empty" in answer.json()["error"]
    answer = client.post("/api/predict", files=files[:-1])  # two supports, one mask
    assert answer.status_code == 400
    assert answer.json()["error"].startswith("2 support images but 1 masks")


def test_cli_refuses_a_missing_checkpoint_in_one_line(tmp_path, capsys):
    assert main(["--checkpoint", str(tmp_path / "none.ckpt")]) == 2
    error = capsys.readouterr().err
    assert error.startswith("error: checkpoint ") and "does not exist" in error
    assert len(error.strip().splitlines()) == 1


# ------------------------------------------------------------------ the page in a browser
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")


def _browser_missing() -> str | None:
    try:
        import selenium  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as error:
        return f"{error.name} is not installed (pip install -e '.[dev]')"
    if not CHROMIUM or not CHROMEDRIVER:
        return "no chromium / chromedriver on PATH (Debian: apt-get install chromium chromium-driver)"
    return None


@pytest.fixture(scope="module")
def server(model):
    reason = _browser_missing()
    if reason:
        pytest.skip(reason)
    import uvicorn

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    app_server = uvicorn.Server(uvicorn.Config(create_app(model), host="127.0.0.1", port=port,
                                               log_level="warning"))
    thread = threading.Thread(target=app_server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not app_server.started:
        assert time.monotonic() < deadline, "the demo server did not start"
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}/"
    app_server.should_exit = True
    thread.join(timeout=10)


@pytest.fixture(scope="module")
def browser(server):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                 "--window-size=1400,1800"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.set_script_timeout(60)
    yield driver
    driver.quit()


def _segment_in_page(driver) -> dict:
    from selenium.webdriver.support.ui import WebDriverWait

    driver.execute_script("document.body.dataset.state = 'waiting'; window.lastResult = null;")
    driver.find_element("id", "segment").click()
    WebDriverWait(driver, 120).until(
        lambda d: d.execute_script("return document.body.dataset.state") == "done")
    status = driver.find_element("id", "status")
    assert "error" not in (status.get_attribute("class") or ""), status.text
    return driver.execute_script("return window.lastResult")


def _mask_pixels(driver) -> np.ndarray:
    """The mask the page shows, read back from its <img> (naturalWidth x naturalHeight)."""
    values = driver.execute_async_script("""
        const done = arguments[arguments.length - 1];
        const image = document.getElementById('mask');
        const read = () => {
          const canvas = document.createElement('canvas');
          canvas.width = image.naturalWidth; canvas.height = image.naturalHeight;
          const context = canvas.getContext('2d');
          context.drawImage(image, 0, 0);
          const data = context.getImageData(0, 0, canvas.width, canvas.height).data;
          const grey = [];
          for (let i = 0; i < data.length; i += 4) grey.push(data[i]);
          done([canvas.height, canvas.width, grey]);
        };
        if (image.complete && image.naturalWidth) read(); else image.onload = read;
    """)
    height, width, grey = values
    return np.array(grey, dtype=np.uint8).reshape(height, width)


@pytest.mark.browser
def test_page_paints_a_mask_and_shows_the_prediction(browser, server, model, tmp_path):
    from selenium.webdriver.common.action_chains import ActionChains

    query_path, support_path = tmp_path / "query.png", tmp_path / "support.jpg"
    picture(QUERY_SIZE, 1).save(query_path)
    picture(SUPPORT_SIZE, 2).save(support_path, quality=95)
    browser.get(server)
    browser.find_element("css selector", ".support-image").send_keys(str(support_path))
    browser.find_element("id", "query").send_keys(str(query_path))
    canvas = browser.find_element("css selector", "canvas.view")
    browser.execute_script(
        "arguments[0].style.width = '240px'; arguments[0].style.height = '320px';", canvas)
    # Paint a stroke across the middle of the support (the canvas is 45x60 shown at 240x320).
    (ActionChains(browser).move_to_element(canvas).move_by_offset(-60, 0).click_and_hold()
     .move_by_offset(40, 10).move_by_offset(40, 10).move_by_offset(40, -10).release().perform())
    result = _segment_in_page(browser)
    assert (result["height"], result["width"]) == QUERY_SIZE
    painted = result["supports"][0]
    assert (painted["height"], painted["width"]) == SUPPORT_SIZE
    assert 0.02 < painted["foreground"] < 0.6  # a 12-px brush (2.25 support px) stroke
    shown = _mask_pixels(browser)
    assert shown.shape == QUERY_SIZE and set(np.unique(shown)) <= {0, 255}
    np.testing.assert_array_equal(shown, decode(result["mask"]))


@pytest.mark.browser
def test_page_with_an_uploaded_mask_gives_fss_predict(browser, server, model, tmp_path):
    query_path, support_path, mask_path = (tmp_path / "q.png", tmp_path / "s.png",
                                           tmp_path / "m.png")
    query, support, mask = picture(QUERY_SIZE, 4), picture(SUPPORT_SIZE, 5), box_mask(SUPPORT_SIZE)
    query.save(query_path)
    support.save(support_path)
    mask.save(mask_path)
    browser.get(server)
    browser.find_element("css selector", ".support-image").send_keys(str(support_path))
    # The mask file is read once the image has been decoded by the page.
    from selenium.webdriver.support.ui import WebDriverWait

    WebDriverWait(browser, 30).until(lambda d: d.execute_script(
        "return document.querySelector('canvas.view').width") == SUPPORT_SIZE[1])
    browser.find_element("css selector", ".support-mask").send_keys(str(mask_path))
    WebDriverWait(browser, 30).until(lambda d: d.execute_script(
        "return document.querySelector('.support').dataset.mask") == "uploaded")
    browser.find_element("id", "query").send_keys(str(query_path))
    result = _segment_in_page(browser)
    # The uploaded box, pixel for pixel.
    assert result["supports"][0]["foreground"] == round(float((np.array(mask) > 0).mean()), 4)
    expected = fss.predict(model, query, [support], [mask])
    np.testing.assert_array_equal(_mask_pixels(browser), expected * 255)


def test_docs_name_the_command():
    text = (Path(__file__).resolve().parents[2] / "docs" / "demo.md").read_text()
    assert "fss-demo --checkpoint" in text
