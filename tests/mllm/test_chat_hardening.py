"""The chat server holds its limits, over HTTP on 127.0.0.1 (bounded loops, short socket timeouts)."""

import json
import socket
import threading
import time

import pytest

from semhitok.mllm.chat import ChatEngine, make_server
from semhitok.mllm.sample import load_sampler


@pytest.fixture(scope="module")
def engine(tiny_mllm_dir):
    decoder, visual = load_sampler(tiny_mllm_dir, "cpu")
    return ChatEngine(decoder, visual, max_upload_bytes=100_000, max_pixels=1_000_000, max_new_tokens=4,
                      max_prompt_tokens=64, max_sessions=3)


@pytest.fixture
def server(engine):
    srv = make_server(engine, "127.0.0.1", 0, workers=2, queue=0, timeout=1.5)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield srv.server_address[1]
    srv.shutdown()
    srv.server_close()


def exchange(port: int, request: bytes) -> tuple[int, dict]:
    """Send raw bytes, read the whole answer (the server closes); (status, JSON body)."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(request)
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), json.loads(body or b"{}")


def post(port: int, path: str, body: bytes, length: str | None = None) -> tuple[int, dict]:
    header = f"Content-Length: {len(body) if length is None else length}\r\n" if length != "omit" else ""
    return exchange(port, f"POST {path} HTTP/1.1\r\nHost: x\r\n{header}\r\n".encode() + body)


def message(port: int, session: str, text: str) -> tuple[int, dict]:
    return post(port, "/api/message", json.dumps({"session": session, "text": text}).encode())


def test_content_length_is_checked_before_the_body_is_read(server):
    assert post(server, "/api/message", b"", "abc")[0] == 400
    assert post(server, "/api/message", b"", "-1")[0] == 400
    assert post(server, "/api/message", b"{}", "omit")[0] == 411
    start = time.monotonic()
    status, body = post(server, "/api/upload", b"", str(300 * 2**20))  # announced, never sent: not waited for
    assert status == 413 and "limit is 0.1 MB" in body["error"] and time.monotonic() - start < 5
    assert post(server, "/api/message", b"[1, 2]")[0] == 400  # JSON but not an object
    assert post(server, "/api/message", b'{"text": "\xff\xfe"}')[0] == 400  # not UTF-8


def test_idle_connections_time_out_and_the_pool_is_bounded(server):
    idle = [socket.create_connection(("127.0.0.1", server), timeout=10) for _ in range(2)]  # hold both workers
    try:
        time.sleep(0.2)
        status, body = exchange(server, b"GET / HTTP/1.1\r\n\r\n")
        assert status == 503 and "busy" in body["error"]
        deadline = time.monotonic() + 10  # the workers free themselves after the 1.5 s socket timeout
        while time.monotonic() < deadline and exchange(server, b"GET /nothing HTTP/1.1\r\n\r\n")[0] == 503:
            time.sleep(0.2)
        assert exchange(server, b"GET /nothing HTTP/1.1\r\n\r\n")[0] == 404
    finally:
        for s in idle:
            s.close()


def test_a_too_long_prompt_is_refused_and_the_session_still_answers(server, engine):
    status, body = message(server, "long", "word " * 24_000)  # 120K characters
    assert status == 400 and "64 tokens" in body["error"]
    assert engine.sessions["long"].turns == [] if "long" in engine.sessions else True
    status, body = message(server, "long", "what is this?")
    assert status == 200 and body["kind"] == "text"


def test_a_failed_turn_leaves_the_session_as_it_was(server, engine):
    assert message(server, "fail", "hello")[0] == 200
    before = list(engine.sessions["fail"].turns)
    answer = engine.decoder.answer
    engine.decoder.answer = lambda *a, **k: (_ for _ in ()).throw(RuntimeError("injected"))
    try:
        status, body = message(server, "fail", "this turn fails")
    finally:
        engine.decoder.answer = answer
    assert status == 500 and engine.sessions["fail"].turns == before
    status, body = message(server, "fail", "and this one works")
    assert status == 200 and len(engine.sessions["fail"].turns) == len(before) + 2


def test_a_long_conversation_forgets_its_oldest_turns_instead_of_failing(engine):
    for i in range(12):  # ~54 tokens each: far more than the tiny model's 512-token context in total
        assert engine.message("chatty", f"question {i}: " + "tell me more about the bus " * 5)["kind"] == "text"
    turns = engine.sessions["chatty"].turns
    assert turns[-2][1].startswith("question 11") and not any(t.startswith("question 0:") for _, t in turns)


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
