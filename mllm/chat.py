"""`semhitok chat`: a small web chat over one model, no framework (stdlib HTTP server + one page).

    semhitok chat --model runs/tiny/mllm/final --port 7860      # open http://127.0.0.1:7860

Upload a photo and ask about it; ask for a picture ("/image ...", "draw ...", "generate an image of ...")
and it is generated with CFG; every session keeps its turns and its current image (an uploaded one, or the
last one generated), so follow-up questions work. Uploads above --max-upload-mb or --max-pixels, and files
that are not images, get a message in the chat, never a crash. Requests run one at a time on the model.

API (JSON): POST /api/upload (body: the file; header X-Session) -> {"message"} or {"error"};
            POST /api/message {"session", "text"} -> {"kind": "text", "text"} | {"kind": "image", "image": data URL}
"""

from __future__ import annotations

import base64
import io
import json
import logging
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import torch

from semhitok.mllm.sample import Decoder, SamplingConfig
from semhitok.tokenizer import ImageLimits, ImageRejected, SemHiTok, encode_images, open_rgb, to_pil

log = logging.getLogger("semhitok")
IMAGE_REQUEST = re.compile(r"^\s*(?:/image\s+|draw\s+|generate (?:an? )?(?:image|picture) of\s+)(?P<caption>.+)$", re.I | re.S)


class UploadRejected(ValueError):
    pass


@dataclass
class Session:
    turns: list[tuple[str, str]] = field(default_factory=list)
    image_ids: torch.Tensor | None = None  # [h, w], the image questions refer to
    image_is_new: bool = False  # the next user turn carries <image>


class ChatEngine:
    """The model side of the chat, independent of HTTP (the handler only moves JSON and bytes)."""

    def __init__(self, decoder: Decoder, visual: SemHiTok, max_upload_bytes: int, max_pixels: int,
                 sampling: SamplingConfig | None = None, max_new_tokens: int = 128):
        self.decoder, self.visual = decoder, visual
        self.max_upload_bytes, self.max_pixels, self.max_new_tokens = max_upload_bytes, max_pixels, max_new_tokens
        self.sampling = sampling or SamplingConfig(cfg_scale=4.0, temperature=1.0, top_k=0)
        self.sessions: dict[str, Session] = {}
        # The model runs on one thread, one request at a time: the decoder's static cache is shared, and
        # compiled CUDA graphs are recorded per thread (the HTTP server makes a thread per request).
        self.model_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="semhitok-model")

    def session(self, sid: str) -> Session:
        return self.sessions.setdefault(sid, Session())

    def upload(self, sid: str, data: bytes) -> str:
        if len(data) > self.max_upload_bytes:
            raise UploadRejected(f"the file is {len(data) / 2**20:.1f} MB; the limit is {self.max_upload_bytes / 2**20:.1f} MB")
        try:  # the one bounded loader: size and aspect ratio checked before decoding, any mode to RGB
            img = open_rgb(data, ImageLimits(max_pixels=self.max_pixels))
        except ImageRejected as err:
            if err.kind == "corrupt_image":
                raise UploadRejected(f"that file is not an image I can read ({err})") from None
            raise UploadRejected(f"the image cannot be used: {err}") from None
        ids = self.model_thread.submit(encode_images, self.visual, [img]).result()[0]
        state = self.session(sid)
        state.image_ids, state.image_is_new = ids.cpu(), True
        return f"got your {img.width}x{img.height} image; ask me about it"

    def message(self, sid: str, text: str) -> dict:
        text = text.strip()
        if not text:
            raise UploadRejected("empty message")
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
        if state.image_ids is not None and state.image_is_new:
            text, state.image_is_new = "<image>\n" + text, False
        state.turns.append(("user", text))
        image = state.image_ids if any("<image>" in t for _, t in state.turns) else None
        reply = self.decoder.answer(self._visible_turns(state), image, SamplingConfig(temperature=0.0), self.max_new_tokens)
        state.turns.append(("assistant", reply))
        return {"kind": "text", "text": reply}

    @staticmethod
    def _visible_turns(state: Session) -> list[tuple[str, str]]:
        """One image per conversation: only the latest upload keeps its <image> tag."""
        last = max((i for i, (_, t) in enumerate(state.turns) if "<image>" in t), default=-1)
        return [(r, t if i == last else t.replace("<image>\n", "")) for i, (r, t) in enumerate(state.turns)]


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

        def do_POST(self):
            length = int(self.headers.get("Content-Length") or 0)
            if length > engine.max_upload_bytes + 1024:
                self.rfile.read(length)  # drain it so the browser gets the answer
                return self._json(HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                                  {"error": f"the file is {length / 2**20:.1f} MB; the limit is {engine.max_upload_bytes / 2**20:.1f} MB"})
            body = self.rfile.read(length)
            try:
                if self.path == "/api/upload":
                    return self._json(HTTPStatus.OK, {"message": engine.upload(self.headers.get("X-Session", ""), body)})
                if self.path == "/api/message":
                    request = json.loads(body or b"{}")
                    return self._json(HTTPStatus.OK, engine.message(str(request.get("session", "")), str(request.get("text", ""))))
                self._json(HTTPStatus.NOT_FOUND, {"error": "not found"})
            except (UploadRejected, json.JSONDecodeError) as err:
                self._json(HTTPStatus.BAD_REQUEST, {"error": str(err)})
            except Exception as err:  # a reply, not a dead server
                log.exception("chat request failed")
                self._json(HTTPStatus.INTERNAL_SERVER_ERROR, {"error": f"internal error: {type(err).__name__}"})

    return Handler


def make_server(engine: ChatEngine, host: str = "127.0.0.1", port: int = 7860) -> ThreadingHTTPServer:
    """The HTTP server (call serve_forever); port 0 picks a free one (see server.server_address)."""
    return ThreadingHTTPServer((host, port), make_handler(engine))


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
