"""The chat engine holds its limits whatever page drives it (the Gradio page is tested in test_chat.py)."""

import io
import threading
import time

import pytest
from PIL import Image

from semhitok.mllm.chat import ChatEngine, UploadRejected, image_caption
from semhitok.mllm.sample import load_sampler


@pytest.fixture(scope="module")
def engine(tiny_mllm_dir):
    decoder, visual = load_sampler(tiny_mllm_dir, "cpu")
    return ChatEngine(decoder, visual, max_upload_bytes=100_000, max_pixels=1_000_000, max_new_tokens=4,
                      max_prompt_tokens=64, max_sessions=3)


def test_image_requests_are_recognised_in_many_phrasings_and_questions_are_not():
    asks = {"/image a red bus": "a red bus", "draw a red bus": "a red bus", "Draw me a picture of two dogs.": "two dogs",
            "paint a bowl of fruit": "a bowl of fruit", "show me a photo of a cat on a sofa": "a cat on a sofa",
            "Can you generate a red bus on a street?": "a red bus on a street",
            "could you please create an image of a lighthouse": "a lighthouse",
            "make a picture of a mountain lake!": "a mountain lake", "generate an image of a bus": "a bus",
            "please draw a tree": "a tree", "give me an illustration of a robot": "a robot"}
    for text, caption in asks.items():
        assert image_caption(text) == caption, text
    for text in ("What is in this photo?", "show me what is in the picture", "make it shorter",
                 "can you generate a caption for this image?", "generate a description of the photo",
                 "Is there a drawing of a bus here?", "what does the painting show?"):
        assert image_caption(text) is None, text


def test_uploads_over_the_size_or_pixel_limit_or_not_images_are_refused(engine):
    with pytest.raises(UploadRejected, match="limit is 0.1 MB"):
        engine.upload("s", b"x" * 200_000)
    big = io.BytesIO()
    Image.new("RGB", (1500, 1000)).save(big, format="PNG")  # a small file of 1.5 M pixels
    with pytest.raises(UploadRejected, match="1,000,000 pixels"):
        engine.upload("s", big.getvalue())
    with pytest.raises(UploadRejected, match="not an image"):
        engine.upload("s", b"this is text")


def test_a_too_long_prompt_is_refused_and_the_session_still_answers(engine):
    with pytest.raises(UploadRejected, match="64 tokens"):
        engine.message("long", "word " * 24_000)  # 120K characters: refused before tokenizing
    assert "long" not in engine.sessions or engine.sessions["long"].turns == []
    assert engine.message("long", "what is this?")["kind"] == "text"


def test_a_failed_turn_leaves_the_session_as_it_was(engine):
    assert engine.message("fail", "hello")["kind"] == "text"
    before = list(engine.sessions["fail"].turns)
    answer_stream = engine.decoder.answer_stream

    def broken(*a, **k):
        yield "half an answer"
        raise RuntimeError("injected")
    engine.decoder.answer_stream = broken
    try:
        with pytest.raises(RuntimeError, match="injected"):
            engine.message("fail", "this turn fails")
    finally:
        engine.decoder.answer_stream = answer_stream
    assert engine.sessions["fail"].turns == before
    assert engine.message("fail", "and this one works")["kind"] == "text"
    assert len(engine.sessions["fail"].turns) == len(before) + 2


def test_an_abandoned_stream_changes_nothing_and_undo_takes_the_last_turn_back(engine):
    assert engine.message("undo", "first question")["kind"] == "text"
    first = list(engine.sessions["undo"].turns)
    stream = engine.message_stream("undo", "second question")
    next(stream)  # the page went away after the first partial answer
    stream.close()
    assert engine.sessions["undo"].turns == first
    assert engine.message("undo", "third question")["kind"] == "text" and len(engine.sessions["undo"].turns) == 4
    assert engine.undo("undo") and engine.sessions["undo"].turns == first
    assert not engine.undo("undo")  # one step back only
    engine.reset("undo")
    assert "undo" not in engine.sessions


def test_a_long_conversation_forgets_its_oldest_turns_instead_of_failing(engine):
    for i in range(12):  # ~54 tokens each: far more than the tiny model's 512-token context in total
        assert engine.message("chatty", f"question {i}: " + "tell me more about the bus " * 5)["kind"] == "text"
    turns = engine.sessions["chatty"].turns
    assert turns[-2][1].startswith("question 11") and not any(t.startswith("question 0:") for _, t in turns)


def test_concurrent_requests_run_the_model_on_one_thread(engine):
    """The web server runs handlers on a pool of threads; the model must still see one thread (a shared
    static cache, CUDA graphs recorded per thread), also while answers stream."""
    seen, stream = set(), engine.decoder.stream

    def spy(*a, **k):
        for token in stream(*a, **k):
            seen.add(threading.get_ident())
            yield token
    engine.decoder.stream = spy
    replies = {}
    try:
        clients = [threading.Thread(target=lambda i=i: replies.update({i: engine.message(f"t{i}", "hello?")})) for i in range(3)]
        clients.append(threading.Thread(target=lambda: replies.update({3: engine.message("t3", "draw a bus")})))
        for c in clients:
            c.start()
        for c in clients:
            c.join()
    finally:
        engine.decoder.stream = stream
    assert [replies[i]["kind"] for i in range(4)] == ["text", "text", "text", "image"]
    assert len(seen) == 1 and threading.get_ident() not in seen


def test_sessions_are_capped_and_idle_ones_evicted(engine):
    engine.sessions.clear()
    for sid in ("a", "b", "c", "d"):
        engine.session(sid)
    assert list(engine.sessions) == ["b", "c", "d"]  # max_sessions=3: the least recently used went
    engine.session("b")
    engine.session_ttl_s = 0.0
    try:
        time.sleep(0.01)
        engine.session("e")
        assert list(engine.sessions) == ["e"]
    finally:
        engine.session_ttl_s = 3600.0
