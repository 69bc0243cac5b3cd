"""The chat demo end to end in a real headless Chromium (Debian's chromium + chromedriver, via Selenium)."""

import io
import json
import threading
import urllib.request

import pytest
from PIL import Image
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

from semhitok.mllm.chat import ChatEngine, make_server
from semhitok.mllm.sample import load_sampler
from tests.conftest import SAMPLE

PHOTO = next((SAMPLE / "images").glob("*.jpg"))


@pytest.fixture(scope="module")
def chat_url(tiny_mllm_dir):
    decoder, visual = load_sampler(tiny_mllm_dir, "cpu")
    engine = ChatEngine(decoder, visual, max_upload_bytes=200_000, max_pixels=1_000_000, max_new_tokens=8)
    server = make_server(engine, "127.0.0.1", 0)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    opts = webdriver.ChromeOptions()
    opts.binary_location = "/usr/bin/chromium"
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 f"--user-data-dir={tmp_path_factory.mktemp('chromium')}"):
        opts.add_argument(flag)
    driver = webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=opts)
    yield driver
    driver.quit()


def messages(browser, css: str):
    return browser.find_elements(By.CSS_SELECTOR, css)


def send(browser, text: str) -> None:
    box = browser.find_element(By.ID, "message")
    box.send_keys(text)
    browser.find_element(By.ID, "send").click()


def test_upload_ask_and_generate_in_a_browser(chat_url, browser, tmp_path):
    browser.get(chat_url)
    wait = WebDriverWait(browser, 120)
    browser.find_element(By.ID, "upload").send_keys(str(PHOTO))
    wait.until(lambda b: any("ask me about it" in m.text for m in messages(b, ".msg.bot")))

    send(browser, "What is in this photo?")
    wait.until(lambda b: len(messages(b, ".msg.answer")) == 1)
    send(browser, "And what colour is it?")  # a second turn of the same conversation
    wait.until(lambda b: len(messages(b, ".msg.answer")) == 2)

    send(browser, "/image a red bus on a street")
    wait.until(lambda b: messages(b, "img.generated") and b.execute_script(
        "const i = document.querySelector('img.generated'); return i.complete && i.naturalWidth > 0;"))
    assert browser.execute_script("return document.querySelector('img.generated').naturalWidth") == 64
    browser.save_screenshot(str(tmp_path / "chat.png"))

    # a bad file is a message in the chat, and the page keeps working
    bad = tmp_path / "not_a_photo.jpg"
    bad.write_text("this is text")
    browser.find_element(By.ID, "upload").send_keys(str(bad))
    wait.until(lambda b: any("not an image" in m.text for m in messages(b, ".msg.error")))
    send(browser, "still there?")
    wait.until(lambda b: len(messages(b, ".msg.answer")) == 3)


def post(url: str, data: bytes, headers: dict) -> tuple[int, dict]:
    request = urllib.request.Request(url, data=data, headers=headers, method="POST")
    try:
        with urllib.request.urlopen(request) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def test_uploads_over_the_size_or_pixel_limit_are_refused(chat_url):
    status, body = post(f"{chat_url}/api/upload", b"x" * 300_000, {"X-Session": "s"})
    assert status == 413 and "limit is 0.2 MB" in body["error"]
    big = io.BytesIO()
    Image.new("RGB", (1500, 1000)).save(big, format="PNG")  # small file, 1.5 M pixels
    status, body = post(f"{chat_url}/api/upload", big.getvalue(), {"X-Session": "s"})
    assert status == 400 and "1,000,000 pixels" in body["error"]
    status, body = post(f"{chat_url}/api/message", b"{not json", {"Content-Type": "application/json"})
    assert status == 400


def test_concurrent_requests_run_the_model_on_one_thread(tiny_mllm_dir):
    """The HTTP server answers each request on a new thread; the model must still see one thread (a shared
    static cache, CUDA graphs recorded per thread)."""
    decoder, visual = load_sampler(tiny_mllm_dir, "cpu")
    engine = ChatEngine(decoder, visual, max_upload_bytes=200_000, max_pixels=1_000_000, max_new_tokens=4)
    seen, decode = set(), decoder.decode
    decoder.decode = lambda *a, **k: seen.add(threading.get_ident()) or decode(*a, **k)
    replies = {}
    clients = [threading.Thread(target=lambda i=i: replies.update({i: engine.message(f"s{i}", "hello?")})) for i in range(4)]
    for c in clients:
        c.start()
    for c in clients:
        c.join()
    assert sorted(replies) == [0, 1, 2, 3] and all(r["kind"] == "text" for r in replies.values())
    assert len(seen) == 1 and threading.get_ident() not in seen
