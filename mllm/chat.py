"""`semhitok chat`: a small web chat over one model, no framework (stdlib HTTP server + one page).

    semhitok chat --model runs/tiny/mllm/final --port 7860      # open http://127.0.0.1:7860

Upload a photo and ask about it; ask for a picture ("/image ...", "draw ...", "generate an image of ...")
and it is generated with CFG; every session keeps its turns and its current image (an uploaded one, or the
last one generated), so follow-up questions work. Uploads above --max-upload-mb or --max-pixels, and files
that are not images, get a message in the chat, never a crash. Requests run one at a time on the model.

Limits the server holds: Content-Length is checked before a body is read (missing, malformed, negative or
over the limit: refused without buffering it); every socket has a timeout; connections are served by a
fixed pool of worker threads with a bounded queue (beyond it: 503 at once); a message longer than
max_prompt_tokens is refused, and a conversation that outgrows the model's context forgets its oldest
turns; a turn that fails leaves its session as it was; sessions idle longer than session_ttl_s are
evicted, and at most max_sessions are kept (the least recently used goes first).

API (JSON): POST /api/upload (body: the file; header X-Session) -> {"message"} or {"error"};
            POST /api/message {"session", "text"} -> {"kind": "text", "text"} | {"kind": "image", "image": data URL}
"""

from __future__ import annotations

import base64
import io
import json
import logging
import re
import threading
import time
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, HTTPServer

import torch

from semhitok.mllm.sample import Decoder, SamplingConfig
from semhitok.tokenizer import ImageLimits, ImageRejected, encode_images, open_rgb, to_pil
from semhitok.tokenizer.interface import VisualTokenizer

log = logging.getLogger("semhitok")
IMAGE_REQUEST = re.compile(r"^\s*(?:/image\s+|draw\s+|generate (?:an? )?(?:image|picture) of\s+)(?P<caption>.+)$", re.I | re.S)


class UploadRejected(ValueError):
    pass


@dataclass
class Session:
    turns: list[tuple[str, str]] = field(default_factory=list)
    image_ids: torch.Tensor | None = None  # [h, w], the image questions refer to
    image_is_new: bool = False  # the next user turn carries <image>
    last_used: float = field(default_factory=time.monotonic)


class ChatEngine:
    """The model side of the chat, independent of HTTP (the handler only moves JSON and bytes)."""

    MAX_SESSION_ID = 128  # characters

    def __init__(self, decoder: Decoder, visual: VisualTokenizer, max_upload_bytes: int, max_pixels: int,
                 sampling: SamplingConfig | None = None, max_new_tokens: int = 128, max_prompt_tokens: int = 512,
                 max_sessions: int = 1000, session_ttl_s: float = 3600.0):
        self.decoder, self.visual = decoder, visual
        self.max_upload_bytes, self.max_pixels, self.max_new_tokens = max_upload_bytes, max_pixels, max_new_tokens
        self.max_prompt_tokens, self.max_sessions, self.session_ttl_s = max_prompt_tokens, max_sessions, session_ttl_s
        self.context = decoder.model.lm.config.max_position_embeddings  # prompt + answer must fit
        self.sampling = sampling or SamplingConfig(temperature=1.0, top_k=0)  # CFG scale 2, the paper's
        self.sessions: OrderedDict[str, Session] = OrderedDict()  # least recently used first
        self._sessions_lock = threading.Lock()
        # The model runs on one thread, one request at a time: the decoder's static cache is shared, and
        # compiled CUDA graphs are recorded per thread (the HTTP server makes a thread per request).
        self.model_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="semhitok-model")

    def session(self, sid: str) -> Session:
        """The session `sid` (new if unknown); idle sessions past session_ttl_s and the least recently used
        beyond max_sessions are evicted."""
        if len(sid) > self.MAX_SESSION_ID:
            raise UploadRejected(f"session id longer than {self.MAX_SESSION_ID} characters")
        now = time.monotonic()
        with self._sessions_lock:
            while self.sessions and now - next(iter(self.sessions.values())).last_used > self.session_ttl_s:
                self.sessions.popitem(last=False)
            state = self.sessions.pop(sid, None) or Session()
            state.last_used = now
            self.sessions[sid] = state
            while len(self.sessions) > self.max_sessions:
                self.sessions.popitem(last=False)
            return state

    def upload(self, sid: str, data: bytes) -> str:
        if len(data) > self.max_upload_bytes:
            raise UploadRejected(f"the file is {len(data) / 2**20:.1f} MB; the limit is {self.max_upload_bytes / 2**20:.1f} MB")
        try:  # the one bounded loader: size and aspect ratio checked before decoding, any mode to RGB
            img = open_rgb(data, ImageLimits(max_pixels=self.max_pixels))
        except ImageRejected as err:
            if err.kind == "corrupt_image":
                raise UploadRejected(f"that file is not an image I can read ({err})") from None
            raise UploadRejected(f"the image cannot be used: {err}") from None
        ids = self.model_thread.submit(encode_images, self.visual, [img], self.decoder.seq_cfg.understanding_image).result()[0]
        state = self.session(sid)
        state.image_ids, state.image_is_new = ids.cpu(), True
        return f"got your {img.width}x{img.height} image; ask me about it"

    def message(self, sid: str, text: str) -> dict:
        text = text.strip()
        if not text:
            raise UploadRejected("empty message")
        # a character bound first (32 per allowed token, far above any tokenizer's average: huge texts are never
        # tokenized), then the token count
        if len(text) > 32 * self.max_prompt_tokens or len(self.decoder.tokenizer.encode(text)) > self.max_prompt_tokens:
            raise UploadRejected(f"the message is too long: the limit is {self.max_prompt_tokens} tokens")
        return self.model_thread.submit(self._reply, self.session(sid), text).result()

    @torch.no_grad()
    def _reply(self, state: Session, text: str) -> dict:
        """On the model thread: a generated image for an image request, else the model's answer."""
        if request := IMAGE_REQUEST.match(text):
            ids = self.decoder.image_ids([request["caption"].strip()], self.sampling)
            image = self.visual.decode(ids.to(self.visual.device))[0]
            state.image_ids, state.image_is_new = ids[0].cpu(), True
            buf = io.BytesIO()
            to_pil(image).save(buf, format="PNG")
            return {"kind": "image", "image": "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()}
        text = text.replace("<image>", "")  # only an upload or a generated picture places the image
        attach = state.image_ids is not None and state.image_is_new
        turns = [*state.turns, ("user", "<image>\n" + text if attach else text)]
        turns = self._fit_context(turns, state.image_ids)
        image = state.image_ids if any("<image>" in t for _, t in turns) else None
        reply = self.decoder.answer(self._visible_turns(turns), image, SamplingConfig(temperature=0.0), self.max_new_tokens)
        # only a turn that succeeded changes the session (a failed one must not poison the next)
        state.turns, state.image_is_new = [*turns, ("assistant", reply)], state.image_is_new and not attach
        return {"kind": "text", "text": reply}

    def _fit_context(self, turns: list[tuple[str, str]], image_ids) -> list[tuple[str, str]]:
        """Drop the oldest exchanges until the prompt plus the answer fit the model's context."""
        ids = None if image_ids is None else image_ids.flatten().numpy()
        while True:
            visible = self._visible_turns(turns)
            image = ids if any("<image>" in t for _, t in visible) else None
            if len(self.decoder.builder.chat_prompt(visible, image)) + self.max_new_tokens <= self.context:
                return turns
            if len(turns) <= 1:
                raise UploadRejected(f"the message does not fit the model's context of {self.context} tokens")
            turns = turns[2:]

    @staticmethod
    def _visible_turns(turns: list[tuple[str, str]]) -> list[tuple[str, str]]:
        """One image per conversation: only the latest upload keeps its <image> tag."""
        last = max((i for i, (_, t) in enumerate(turns) if "<image>" in t), default=-1)
        return [(r, t if i == last else t.replace("<image>\n", "")) for i, (r, t) in enumerate(turns)]


def make_handler(engine: ChatEngine):
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, fmt, *args):
            log.debug("chat: " + fmt, *args)

        def _send(self, status: int, body: bytes, content_type: str) -> None:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def _json(self, status: int, obj: dict) -> None:
            self._send(status, json.dumps(obj).encode(), "application/json")

        def do_GET(self):
            if self.path in ("/", "/index.html"):
                self._send(HTTPStatus.OK, PAGE.encode(), "text/html; charset=utf-8")
            else:
                self._json(HTTPStatus.NOT_FOUND, {"error": "not found"})

        def _body(self, limit: int) -> bytes | None:
            """The request body, or None after answering the error (the length is checked before reading)."""
            raw = self.headers.get("Content-Length")
            if raw is None:
                self._json(HTTPStatus.LENGTH_REQUIRED, {"error": "Content-Length required"})
                return None
            if not raw.strip().isdigit():
                self.close_connection = True
                self._json(HTTPStatus.BAD_REQUEST, {"error": f"bad Content-Length {raw[:40]!r}"})
                return None
            length = int(raw)
            if length > limit:
                self._drain(length)
                what = "file" if self.path == "/api/upload" else "request"
                self._json(HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                           {"error": f"the {what} is {length / 2**20:.1f} MB; the limit is {limit / 2**20:.1f} MB"})
                return None
            return self.rfile.read(length)

        def _drain(self, length: int) -> None:
            """Discard a refused body in small pieces (nothing buffered) so the client reads the answer; a body
            far over the limit is not read at all: the connection is closed after the answer."""
            self.close_connection = True
            if length > DRAIN_LIMIT:
                return
            try:
                while length > 0:
                    piece = self.rfile.read(min(length, 2**16))
                    if not piece:
                        break
                    length -= len(piece)
            except OSError:
                pass

        def do_POST(self):
            limit = engine.max_upload_bytes if self.path == "/api/upload" else MAX_MESSAGE_BYTES
            body = self._body(limit)
            if body is None:
                return
            try:
                if self.path == "/api/upload":
                    return self._json(HTTPStatus.OK, {"message": engine.upload(self.headers.get("X-Session", ""), body)})
                if self.path == "/api/message":
                    request = json.loads(body or b"{}")
                    if not isinstance(request, dict):
                        raise UploadRejected("expected a JSON object {\"session\", \"text\"}")
                    return self._json(HTTPStatus.OK, engine.message(str(request.get("session", "")), str(request.get("text", ""))))
                self._json(HTTPStatus.NOT_FOUND, {"error": "not found"})
            except (UploadRejected, ValueError) as err:  # ValueError: bad JSON or UTF-8, a prompt the decoder refuses
                self._json(HTTPStatus.BAD_REQUEST, {"error": str(err)})
            except Exception as err:  # a reply, not a dead server
                log.exception("chat request failed")
                self._json(HTTPStatus.INTERNAL_SERVER_ERROR, {"error": f"internal error: {type(err).__name__}"})

    return Handler


MAX_MESSAGE_BYTES = 256 * 2**10  # a /api/message body (the text is capped in tokens after that)
DRAIN_LIMIT = 64 * 2**20  # a refused body up to this size is read and discarded so the client sees the answer
BUSY = json.dumps({"error": "the server is busy; try again"}).encode()


class BoundedHTTPServer(HTTPServer):
    """Connections are served by a fixed pool of `workers` threads; at most `queue` more wait for one, and
    any beyond that get 503 at once. Every connection's socket times out after `timeout` seconds."""

    daemon_threads = True

    def __init__(self, address, handler, workers: int = 8, queue: int = 32, timeout: float = 30.0):
        handler.timeout = timeout  # StreamRequestHandler applies it to the socket
        super().__init__(address, handler)
        self.pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="semhitok-http")
        self.slots = threading.BoundedSemaphore(workers + queue)

    def process_request(self, request, client_address):
        if not self.slots.acquire(blocking=False):
            try:
                request.settimeout(1.0)
                request.sendall(b"HTTP/1.0 503 Service Unavailable\r\nContent-Type: application/json\r\n"
                                b"Content-Length: %d\r\nConnection: close\r\n\r\n%s" % (len(BUSY), BUSY))
            except OSError:
                pass
            self.shutdown_request(request)
            return
        self.pool.submit(self._serve, request, client_address)

    def _serve(self, request, client_address):
        try:
            self.finish_request(request, client_address)
        except Exception:
            self.handle_error(request, client_address)
        finally:
            self.shutdown_request(request)
            self.slots.release()

    def server_close(self):
        super().server_close()
        self.pool.shutdown(wait=False, cancel_futures=True)


def make_server(engine: ChatEngine, host: str = "127.0.0.1", port: int = 7860, workers: int = 8, queue: int = 32,
                timeout: float = 30.0) -> BoundedHTTPServer:
    """The HTTP server (call serve_forever); port 0 picks a free one (see server.server_address)."""
    return BoundedHTTPServer((host, port), make_handler(engine), workers, queue, timeout)


PAGE = """<!doctype html>
<html><head><meta charset="utf-8"><title>SemHiTok chat</title>
<style>
 body { font-family: system-ui, sans-serif; max-width: 760px; margin: 2em auto; }
 #log { border: 1px solid #ccc; border-radius: 6px; padding: 1em; min-height: 300px; }
 .msg { margin: .4em 0; padding: .4em .6em; border-radius: 6px; }
 .user { background: #e8f0fe; } .bot { background: #f1f3f4; } .error { background: #fde8e8; color: #a00; }
 img.generated, img.uploaded { width: 256px; image-rendering: pixelated; display: block; }
 form { display: flex; gap: .5em; margin-top: 1em; } #message { flex: 1; }
</style></head>
<body>
<h2>SemHiTok chat</h2>
<div id="log"></div>
<form id="form">
 <input type="file" id="upload" accept="image/*">
 <input type="text" id="message" placeholder="ask about the image, or: /image a red bus">
 <button type="submit" id="send">Send</button>
</form>
<script>
const session = Math.random().toString(36).slice(2);
const log = document.getElementById("log");
function add(cls, text, src) {
  const div = document.createElement("div");
  div.className = "msg " + cls;
  if (text) div.textContent = text;
  if (src) { const img = document.createElement("img"); img.src = src; img.className = cls === "user" ? "uploaded" : "generated"; div.appendChild(img); }
  log.appendChild(div);
  return div;
}
async function call(path, body, headers) {
  try {
    const r = await fetch(path, {method: "POST", body: body, headers: headers});
    return await r.json();
  } catch (e) { return {error: "request failed: " + e}; }
}
document.getElementById("upload").addEventListener("change", async (ev) => {
  const file = ev.target.files[0];
  if (!file) return;
  add("user", "uploaded " + file.name, URL.createObjectURL(file));
  const res = await call("/api/upload", file, {"X-Session": session});
  if (res.error) add("error", res.error); else add("bot", res.message);
  ev.target.value = "";
});
document.getElementById("form").addEventListener("submit", async (ev) => {
  ev.preventDefault();
  const box = document.getElementById("message");
  const text = box.value.trim();
  if (!text) return;
  box.value = "";
  add("user", text);
  const pending = add("bot pending", "...");
  const res = await call("/api/message", JSON.stringify({session: session, text: text}), {"Content-Type": "application/json"});
  pending.remove();
  if (res.error) add("error", res.error);
  else if (res.kind === "image") add("bot", "", res.image);
  else add("bot answer", res.text || "(empty answer)");
});
</script>
</body></html>
"""
