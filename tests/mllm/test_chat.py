"""The Gradio chat page end to end in a real headless Chromium (Debian's chromium + chromedriver, via Selenium),
offline, with an examples row from a small shapes world. Screenshots go to $SEMHITOK_ARTIFACTS (else the
test's tmp dir); the path is printed."""

import io
import json
import os
import re
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from selenium import webdriver
from selenium.common.exceptions import TimeoutException
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.support.ui import WebDriverWait

from semhitok.cli import run_world
from semhitok.common.run_dir import record_run
from semhitok.data_pipelines.world import WorldConfig, write_world
from semhitok.mllm.chat import ChatEngine
from semhitok.mllm.chat_app import EMPTY_GENERATE, EMPTY_SEND, chat_examples, serve
from semhitok.mllm.config import SamplingConfig
from semhitok.mllm.sample import load_sampler
from semhitok.tokenizer import encode_images, open_rgb
from tests.conftest import SAMPLE, tiny_config

PHOTO = next((SAMPLE / "images").glob("*.jpg"))
PACE_S = 0.15  # per answer token: slow enough that the page shows partial answers (the tiny model is instant)


@pytest.fixture(scope="module")
def engine(tiny_mllm_dir):
    decoder, visual = load_sampler(tiny_mllm_dir, "cpu")
    stream = decoder.stream

    def paced(prompts, steps, vocab, *args, **kwargs):
        for token in stream(prompts, steps, vocab, *args, **kwargs):
            if vocab[0] == 0:  # text: the answer's tokens, not an image's
                time.sleep(PACE_S)
            yield token
    decoder.stream = paced
    # answers sampled (temperature 1): the random tiny model's greedy answer is empty
    return ChatEngine(decoder, visual, max_upload_bytes=200_000, max_pixels=1_000_000, max_new_tokens=12,
                      answer_sampling=SamplingConfig(temperature=1.0, seed=3))


@pytest.fixture(scope="module")
def examples(tmp_path_factory):
    """The examples of a run whose world is a small shapes world (held-out images, questions and prompts)."""
    world = write_world(WorldConfig(train_scenes=4, holdout_scenes=16, text_rows=4), tmp_path_factory.mktemp("run") / "world")
    found = chat_examples(world)
    assert len(found.questions) == len(found.prompts) == 4 and "shapes world" in found.source
    return found


@pytest.fixture(scope="module")
def chat_url(engine, examples):
    app = serve(engine, "127.0.0.1", 0, block=False, examples=examples)
    yield f"http://127.0.0.1:{app.server_port}"
    app.close()


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    opts = webdriver.ChromeOptions()
    opts.binary_location = "/usr/bin/chromium"
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync", "--window-size=1280,1000",
                 f"--user-data-dir={tmp_path_factory.mktemp('chromium')}"):
        opts.add_argument(flag)
    driver = webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=opts)
    yield driver
    driver.quit()


@pytest.fixture(scope="module")
def shots(tmp_path_factory) -> Path:
    out = Path(os.environ.get("SEMHITOK_ARTIFACTS") or tmp_path_factory.mktemp("screenshots")) / "chat"
    out.mkdir(parents=True, exist_ok=True)
    print(f"chat screenshots: {out}")
    return out


def bot_texts(b) -> list[str]:
    return [m.text for m in b.find_elements(By.CSS_SELECTOR, "#chat [data-testid='bot']")]


def shown(text: str) -> str:
    """A message's words as the page shows them: the chat renders Markdown, so its markup characters and spacing
    differ from the model's raw text (a sampled answer of the random tiny model holds `*`, `#`, `_`, line breaks)."""
    return re.sub(r"[\W_]+", "", text)


def ask(b, text: str, button: str = "send") -> None:
    box = b.find_element(By.CSS_SELECTOR, "#message textarea")
    box.send_keys(Keys.CONTROL, "a")
    box.send_keys(text)
    b.find_element(By.ID, button).click()


def idle(b) -> bool:
    """no request running: the Send button is enabled again and no progress indicator shows"""
    return not b.find_elements(By.CSS_SELECTOR, "#chat .generating, .progress-text, .eta-bar")


def generated(b, wait, previous: str | None = None) -> str:
    """Wait for a generated image other than `previous` in the picture panel -> its URL."""
    wait.until(lambda b: (src := b.execute_script("const i = document.querySelector('#generated img');"
                                                  "return i && i.complete && i.naturalWidth > 0 ? i.src : null;")) and src != previous)
    return b.find_element(By.CSS_SELECTOR, "#generated img").get_attribute("src")


def seed_used(b) -> int | None:
    match = re.search(r"seed used: (\d+)", b.find_element(By.ID, "seed-used").text)
    return int(match[1]) if match else None


def pixels(url: str) -> np.ndarray:
    with urllib.request.urlopen(url) as r:
        return np.asarray(Image.open(io.BytesIO(r.read())).convert("RGB"))


def set_number(b, css: str, value) -> None:
    field = b.find_element(By.CSS_SELECTOR, css)
    field.send_keys(Keys.CONTROL, "a")
    field.send_keys(str(value), Keys.TAB)


def test_upload_stream_generate_regenerate_clear_in_a_browser(chat_url, browser, engine, shots, tmp_path):
    b, wait = browser, WebDriverWait(browser, 60, poll_frequency=0.05)
    b.get(chat_url)
    wait.until(lambda b: b.find_elements(By.CSS_SELECTOR, "#photo input[type=file]"))

    b.find_element(By.CSS_SELECTOR, "#photo input[type=file]").send_keys(str(PHOTO))
    wait.until(lambda b: any("ask me about it" in t for t in bot_texts(b)))
    wait.until(lambda b: b.execute_script("const i = document.querySelector('#photo img'); return i && i.naturalWidth > 0;"))

    # the answer streams: record every text the last bot message shows while it grows
    b.execute_script("""
        window.seen = [];
        new MutationObserver(() => {
            const m = [...document.querySelectorAll("#chat [data-testid='bot']")].pop();
            const t = m ? m.innerText.trim() : "";
            if (t && t !== window.seen[window.seen.length - 1]) window.seen.push(t);
        }).observe(document.querySelector('#chat'), {subtree: true, childList: true, characterData: true});""")
    ask(b, "What is in this photo?")
    wait.until(lambda b: len(engine.sessions) == 1 and len(next(iter(engine.sessions.values())).turns) == 2 and idle(b))
    answer = next(iter(engine.sessions.values())).turns[-1][1]
    assert shown(answer), repr(answer)  # words to compare (a seed-dependent answer of only markup is all but impossible)
    try:
        wait.until(lambda b: shown(bot_texts(b)[-1]) == shown(answer))
    except TimeoutException:
        raise AssertionError(f"the page shows {bot_texts(b)[-1]!r}, the model said {answer!r}") from None
    downloads = tmp_path / "downloads"  # the transcript, as the browser downloads it
    b.execute_cdp_cmd("Browser.setDownloadBehavior", {"behavior": "allow", "downloadPath": str(downloads)})
    b.find_element(By.ID, "transcript").click()
    wait.until(lambda b: list(downloads.glob("chat-*.md")))
    transcript = next(downloads.glob("chat-*.md")).read_bytes().decode()  # as written: read_text() turns an answer's \r into \n
    assert "**You:** What is in this photo?" in transcript and answer.strip() in transcript
    partial = [shown(t) for t in b.execute_script("return window.seen") if t != "…" and "ask me about it" not in t]
    partial = [t for t in partial if t != shown(answer)]
    assert partial and all(len(t) < len(shown(answer)) for t in partial), (answer, partial)  # shown before it was whole

    # the answer settings sit in the chat's column: a max answer length of 2 tokens gives an answer of at most 2
    b.find_element(By.CSS_SELECTOR, "#answer-settings button, #answer-settings .label-wrap").click()
    length = wait.until(lambda b: b.find_elements(By.CSS_SELECTOR, "#answer-length input[type=number]"))[0]
    assert b.find_elements(By.CSS_SELECTOR, "#chat-column #answer-settings #answer-temperature")
    assert not b.find_elements(By.CSS_SELECTOR, "#settings #answer-temperature")
    set_number(b, "#answer-length input[type=number]", 2)
    wait.until(lambda b: length.get_attribute("value") == "2")
    lengths, answer_stream = [], engine.decoder.answer_stream

    def spy(turns, image, sampling, max_new_tokens):
        lengths.append(max_new_tokens)
        yield from answer_stream(turns, image, sampling, max_new_tokens)
    engine.decoder.answer_stream = spy
    try:
        ask(b, "And what else?")
        state = next(iter(engine.sessions.values()))
        wait.until(lambda b: len(state.turns) == 4 and idle(b))
    finally:
        engine.decoder.answer_stream = answer_stream
    assert lengths == [2]
    set_number(b, "#answer-length input[type=number]", engine.max_new_tokens)

    # a picture from the button, at a fixed seed; another seed gives another picture
    b.find_element(By.CSS_SELECTOR, "#settings button, #settings .label-wrap").click()
    # (the accordion opens with an animation: wait for the box, a loaded box is slow to draw it)
    wait.until(lambda b: b.find_elements(By.CSS_SELECTOR, "#random-seed input"))[0].click()  # untick: the seed field is used
    set_number(b, "#seed input", 1)
    ask(b, "a red bus on a street", "generate")
    first = generated(b, wait)
    wait.until(lambda b: seed_used(b) == 1)
    assert "a red bus on a street (seed 1)" in " ".join(bot_texts(b)[-2:])  # the caption, then the picture
    set_number(b, "#seed input", 2)
    ask(b, "a red bus on a street", "generate")
    second = generated(b, wait, first)
    wait.until(lambda b: seed_used(b) == 2)
    assert pixels(first).shape == pixels(second).shape == (64, 64, 3) and not np.array_equal(pixels(first), pixels(second))
    wait.until(idle)
    b.execute_script("window.scrollTo(0, 0)")
    b.save_screenshot(str(shots / "desktop.png"))

    # Regenerate with a random seed: the last exchange is replaced by a new picture, not added
    b.find_element(By.CSS_SELECTOR, "#random-seed input").click()
    messages = len(b.find_elements(By.CSS_SELECTOR, "#chat [data-testid=bot], #chat [data-testid=user]"))
    b.find_element(By.ID, "regenerate").click()
    third = generated(b, wait, second)
    wait.until(lambda b: seed_used(b) not in (None, 2))
    wait.until(idle)
    assert len(b.find_elements(By.CSS_SELECTOR, "#chat [data-testid=bot], #chat [data-testid=user]")) == messages
    assert not np.array_equal(pixels(second), pixels(third))

    # a typed request also makes a picture; a file that is not an image is a message, and the page goes on
    ask(b, "Can you draw a bowl of fruit?")
    generated(b, wait, third)
    bad = tmp_path / "not_a_photo.jpg"
    bad.write_text("this is text")
    b.find_element(By.CSS_SELECTOR, "#photo input[type=file]").send_keys(str(bad))
    wait.until(lambda b: any("not an image" in t for t in bot_texts(b)))

    b.find_element(By.ID, "clear").click()
    wait.until(lambda b: not b.find_elements(By.CSS_SELECTOR, "#chat [data-testid=bot], #chat [data-testid=user]") and not b.find_elements(By.CSS_SELECTOR, "#generated img"))
    assert not engine.sessions

    # offline: everything the page loaded came from this server
    loaded = b.execute_script("return performance.getEntriesByType('resource').map(e => e.name)")
    assert loaded and all(u.startswith(chat_url) or u.startswith(("data:", "blob:")) for u in loaded), \
        [u for u in loaded if not u.startswith(chat_url)]


def test_send_or_generate_with_an_empty_box_says_what_to_type(chat_url, browser, engine):
    b, wait = browser, WebDriverWait(browser, 60, poll_frequency=0.05)
    b.get(chat_url)
    wait.until(lambda b: b.find_elements(By.CSS_SELECTOR, "#message textarea"))
    sessions = len(engine.sessions)
    ask(b, "   ", "generate")  # blanks: as empty
    wait.until(lambda b: EMPTY_GENERATE in b.find_element(By.TAG_NAME, "body").text)
    ask(b, "", "send")
    wait.until(lambda b: EMPTY_SEND in b.find_element(By.TAG_NAME, "body").text)
    assert not b.find_elements(By.CSS_SELECTOR, "#chat [data-testid=bot], #chat [data-testid=user]")  # a note, not a turn
    assert len(engine.sessions) == sessions  # nothing reached the model


def box_value(b) -> str:
    return b.find_element(By.CSS_SELECTOR, "#message textarea").get_attribute("value")


def test_examples_fill_the_photo_and_the_box_and_go_to_the_model(chat_url, browser, engine, examples, shots):
    b, wait = browser, WebDriverWait(browser, 60, poll_frequency=0.05)
    b.get(chat_url)
    wait.until(lambda b: b.find_elements(By.CSS_SELECTOR, "#ask-examples tbody tr"))
    assert "shapes world" in b.find_element(By.ID, "examples-source").text
    rows = b.find_elements(By.CSS_SELECTOR, "#ask-examples tbody tr")
    assert [r.text.strip() for r in rows] == [q for _, q in examples.questions]
    wait.until(lambda b: b.execute_script("return [...document.querySelectorAll('#ask-examples tbody img')]"
                                          ".filter(i => i.complete && i.naturalWidth > 0).length") == len(examples.questions))
    drawings = b.find_elements(By.CSS_SELECTOR, "#draw-examples button")
    assert [d.text.strip() for d in drawings] == examples.prompts

    # a picture example: the preview shows it, the box holds its question, and the model has it as an upload
    image, question = examples.questions[2]
    rows[2].find_element(By.CSS_SELECTOR, "td").click()
    wait.until(lambda b: box_value(b) == question)
    wait.until(lambda b: b.execute_script("const i = document.querySelector('#photo img'); return i && i.naturalWidth > 0;"))
    wait.until(lambda b: any("ask me about it" in t for t in bot_texts(b)))
    state = next(reversed(engine.sessions.values()))  # this page's (the most recently used; an earlier test may leave its own)
    want = encode_images(engine.visual, [open_rgb(image)], engine.decoder.seq_cfg.understanding_image)[0].cpu()
    assert state.image_ids is not None and state.image_ids.equal(want)
    b.find_element(By.ID, "send").click()
    wait.until(lambda b: len(state.turns) == 2 and idle(b))
    assert state.turns[0] == ("user", "<image>\n" + question)

    # a drawing example fills the box; Generate image draws it
    drawings[1].click()
    wait.until(lambda b: box_value(b) == examples.prompts[1])
    b.find_element(By.ID, "generate").click()
    generated(b, wait)
    wait.until(idle)
    assert f"{examples.prompts[1]} (seed" in " ".join(bot_texts(b)[-2:])
    b.execute_script("document.getElementById('examples').scrollIntoView()")
    b.save_screenshot(str(shots / "examples.png"))
    b.find_element(By.ID, "clear").click()
    wait.until(lambda b: all(s is not state for s in engine.sessions.values()))  # this page's session is gone


def test_examples_come_from_the_runs_world_else_the_shipped_sample(tmp_path):
    """`semhitok chat` finds the world of the run that trained the model as `eval` finds its config; a model
    with no world nearby gets the shipped sample's photos and captions."""
    run = tmp_path / "run"
    record_run(run / "mllm", tiny_config(run), "mllm-train")
    write_world(WorldConfig(train_scenes=2, holdout_scenes=9, text_rows=2), run / "world")
    (run / "mllm" / "final").mkdir()
    assert run_world(run / "mllm" / "final") == run / "world"
    found = chat_examples(run_world(run / "mllm" / "final"))
    questions = [json.loads(line) for line in (run / "world" / "questions.jsonl").read_text().splitlines()]
    assert {(str(run / "world" / q["image"]), q["question"]) for q in questions} >= set(found.questions)
    assert len({image for image, _ in found.questions}) == len(found.questions) == 4  # one question per image
    prompts = {json.loads(line)["prompt"]: json.loads(line)["category"] for line in (run / "world" / "prompts.jsonl").open()}
    assert found.prompts and {prompts[p] for p in found.prompts} <= {"single_object", "position"}
    assert found.pixel_art  # 64 px flat colours: thumbnails scaled up unsmoothed

    assert run_world(tmp_path / "elsewhere" / "final") is None
    fallback = chat_examples(None)
    holdout = [json.loads(line) for line in (SAMPLE / "holdout.jsonl").read_text().splitlines()]
    assert len(fallback.questions) == 4 and all(Path(image).is_file() for image, _ in fallback.questions)
    assert "What is in this picture?" in [q for _, q in fallback.questions]
    assert fallback.prompts and set(fallback.prompts) <= {r["caption"] for r in holdout} and not fallback.pixel_art


def test_a_shapes_model_without_its_world_gets_scenes_rendered_into_the_cache(tmp_path, monkeypatch):
    """An export copied or downloaded alone: its mixture names the shapes world's sources, so a few held-out
    scenes are rendered at startup (once) into the user's cache; another model keeps the shipped sample."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    shapes, photos = tmp_path / "shapes_model", tmp_path / "photo_model"
    for model, source in ((shapes, "shapes_llava"), (photos, "coco_captions")):
        model.mkdir()
        (model / "semhitok_mllm.json").write_text(json.dumps({"sequence_config": {"mixture": [{"source": source}]}}))
    found = chat_examples(None, model=shapes)
    assert "shapes world" in found.source and found.pixel_art and len(found.questions) == len(found.prompts) == 4
    for image, _ in found.questions:
        assert Path(image).is_relative_to(tmp_path / "cache" / "semhitok") and Image.open(image).size == (64, 64)
    assert chat_examples(None, model=shapes).questions == found.questions  # rendered once, then reused
    assert "shipped sample" in chat_examples(None, model=photos).source


def test_the_page_fits_a_phone_screen(chat_url, browser, shots):
    b, wait = browser, WebDriverWait(browser, 60, poll_frequency=0.05)
    b.set_window_size(390, 844)
    try:
        b.get(chat_url)
        wait.until(lambda b: b.find_elements(By.CSS_SELECTOR, "#photo input[type=file]"))
        width = b.execute_script("return window.innerWidth")
        ask(b, "draw a red bus")
        generated(b, wait)
        wait.until(idle)
        assert b.execute_script("return document.documentElement.scrollWidth") <= width  # no sideways scrolling
        for element in ("send", "generate", "regenerate", "clear", "transcript", "photo", "generated", "chat", "message",
                        "ask-examples", "draw-examples"):
            box = b.find_element(By.ID, element).rect
            assert 0 <= box["x"] and box["x"] + box["width"] <= width and box["width"] > 0, (element, box, width)
        chat, photo = b.find_element(By.ID, "chat").rect, b.find_element(By.ID, "photo").rect
        generated_at = b.find_element(By.ID, "generated").rect["y"]
        assert photo["y"] + photo["height"] <= chat["y"] < generated_at  # stacked: the upload first, then the chat
        assert photo["y"] < b.execute_script("return window.innerHeight") / 2  # on the first screen, not 770 px down
        b.save_screenshot(str(shots / "phone.png"))
        b.execute_script("window.scrollTo(0, document.body.scrollHeight)")
        b.save_screenshot(str(shots / "phone_bottom.png"))
    finally:
        b.set_window_size(1280, 1000)


def test_chat_cli_serves_on_loopback_with_its_sampling_flags(tiny_mllm_dir, tmp_path, capsys):
    """`semhitok chat` as a user starts it: 127.0.0.1 unless --host says otherwise; the flags are the page's defaults."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, OMP_NUM_THREADS="1", GRADIO_ANALYTICS_ENABLED="False")
    cmd = [sys.executable, "-m", "semhitok.cli", "chat", "--model", str(tiny_mllm_dir), "--device", "cpu", "--port", str(port),
           "--cfg-scale", "3.5", "--top-k", "7", "--seed", "11"]
    log = tmp_path / "chat.log"
    with open(log, "w") as out, subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT) as proc:
        try:
            deadline, page = time.monotonic() + 90, None
            while page is None and time.monotonic() < deadline and proc.poll() is None:
                try:
                    page = urllib.request.urlopen(f"http://127.0.0.1:{port}/config", timeout=5).read().decode()
                except OSError:
                    time.sleep(0.5)
            assert page is not None and f"chat on http://127.0.0.1:{port}" in log.read_text(), log.read_text()[-3000:]
            assert "HTTP Request" not in log.read_text()  # a quiet console: no httpx line per startup check
            values = {c["props"].get("elem_id"): c["props"].get("value") for c in json.loads(page)["components"]}
            assert values["cfg"] == 3.5 and values["seed"] == 11 and values["random-seed"] is False
            other = socket.gethostbyname(socket.gethostname())  # another address of this machine, when it has one
            if not other.startswith("127."):
                with pytest.raises(OSError):
                    socket.create_connection((other, port), timeout=2).close()
        finally:
            proc.terminate()
            proc.wait(timeout=30)
    from semhitok.cli import main  # a bad flag: one line before the model loads (in-process: nothing to serve)

    capsys.readouterr()
    assert main([*cmd[3:6], "--top-p", "1.5"]) == 2
    said = capsys.readouterr()
    assert "top_p" in said.err + said.out and "Traceback" not in said.err
