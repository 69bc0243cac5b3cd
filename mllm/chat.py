"""The model side of `semhitok chat` (the Gradio page is mllm/chat_app.py): sessions, limits, context fitting.

Upload a photo and ask about it; ask for a picture ("draw a red bus", "can you generate ...", "show me a
photo of ...", "/image ...", or the page's "Generate image" button) and it is generated with CFG; every
session keeps its turns and its current image (an uploaded one, or the last one generated), so follow-up
questions work. Answers stream: `message_stream` yields the reply as it grows.

Limits held here: uploads above max_upload_bytes or max_pixels, and files that are not images, are refused
with a message (bounded loading: size and aspect ratio checked before decoding); a message longer than
max_prompt_tokens is refused, and a conversation that outgrows the model's context forgets its oldest
turns; a turn that fails (or is abandoned mid-stream) leaves its session as it was; sessions idle longer
than session_ttl_s are evicted, and at most max_sessions are kept (the least recently used goes first).
The model runs on one thread, one request at a time.
"""

from __future__ import annotations

import queue
import re
import threading
import time
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import torch

from semhitok.common.config_io import ConfigError, check_positive, check_range
from semhitok.mllm.config import SamplingConfig
from semhitok.mllm.sample import Decoder, kind_sampling
from semhitok.tokenizer import ImageLimits, ImageRejected, encode_images, open_rgb, to_pil
from semhitok.tokenizer.interface import VisualTokenizer

ENCODER_MAX_PIXELS = ImageLimits().max_pixels  # encode_images' bound: a larger limit here would pass uploads it refuses
MAX_UPLOAD_MB = 1024.0  # the bounded loader reads the whole file into memory


@dataclass(frozen=True)
class ChatLimits:
    """The bounds of `semhitok chat` (its flags), checked before the model loads; one line names a bad one."""

    max_upload_mb: float = 10.0
    max_pixels: int = ENCODER_MAX_PIXELS
    max_new_tokens: int = 128  # the longest answer; the page's "Max answer length" goes up to it

    def __post_init__(self) -> None:
        check_positive(self, "max_upload_mb")
        check_range(self, 0, MAX_UPLOAD_MB, "max_upload_mb")
        check_range(self, 1, ENCODER_MAX_PIXELS, "max_pixels")
        check_range(self, 1, 65_536, "max_new_tokens")
        for name in ("max_pixels", "max_new_tokens"):
            if not isinstance(getattr(self, name), int) or isinstance(getattr(self, name), bool):
                raise ConfigError(f"{name}: must be an integer, got {getattr(self, name)!r}")

_NOUN = r"(?:image|picture|pic|photo(?:graph)?|drawing|painting|illustration|sketch|render(?:ing)?)s?"
_ASK = r"(?:(?:please|hey|ok(?:ay)?)[\s,]+)?(?:(?:can|could|would|will)\s+you\s+(?:please\s+)?)?"
_NOT_AN_IMAGE = r"(?:an?\s+|the\s+|some\s+)?(?:caption|description|summary|answer|text|story|poem|list|question|title)s?\b"
IMAGE_REQUEST = re.compile(rf"""^\s*(?:
    /image\s+
  | {_ASK}(?:draw|paint|sketch|render|illustrate)\s+(?:me\s+)?(?:(?:an?|the|some|one)\s+{_NOUN}\s+of\s+)?
  | {_ASK}(?:generate|create|make|show|give|produce|imagine)\s+(?:me\s+|us\s+)?(?:an?\s+|the\s+|some\s+|one\s+)?{_NOUN}\s+(?:of|showing|with)\s+
  | {_ASK}(?:generate|imagine)\s+(?!{_NOT_AN_IMAGE})
)(?P<caption>.+?)[\s.!?]*$""", re.I | re.S | re.X)


def image_caption(text: str) -> str | None:
    """The caption of an image request ("draw a red bus" -> "a red bus"), or None for anything else."""
    match = IMAGE_REQUEST.match(text)
    return match["caption"].strip() if match else None


class UploadRejected(ValueError):
    pass


@dataclass
class Session:
    turns: list[tuple[str, str]] = field(default_factory=list)
    image_ids: torch.Tensor | None = None  # [h, w], the image questions refer to
    image_is_new: bool = False  # the next user turn carries <image>
    last_used: float = field(default_factory=time.monotonic)
    before_last: tuple | None = None  # (turns, image_ids, image_is_new) before the last turn: `undo`


class ChatEngine:
    """The model side of the chat, independent of the web page."""

    MAX_SESSION_ID = 128  # characters

    def __init__(self, decoder: Decoder, visual: VisualTokenizer, max_upload_bytes: int, max_pixels: int,
                 sampling: SamplingConfig | None = None, max_new_tokens: int = 128, max_prompt_tokens: int = 512,
                 max_sessions: int = 1000, session_ttl_s: float = 3600.0, answer_sampling: SamplingConfig | None = None):
        ChatLimits(max_upload_bytes / 2**20, max_pixels, max_new_tokens)  # ranges (the CLI checked them already)
        self.decoder, self.visual = decoder, visual
        self.max_upload_bytes, self.max_pixels, self.max_new_tokens = max_upload_bytes, max_pixels, max_new_tokens
        self.limits = ImageLimits(max_pixels=max_pixels)  # the same bounds for the loader and the encoder
        self.max_prompt_tokens, self.max_sessions, self.session_ttl_s = max_prompt_tokens, max_sessions, session_ttl_s
        self.context = decoder.model.lm.config.max_position_embeddings  # prompt + answer must fit
        if max_new_tokens >= self.context:
            raise ConfigError(f"max_new_tokens: must be below the model's context of {self.context} tokens, got {max_new_tokens}")
        self.sampling = sampling or kind_sampling(visual.kind)  # images: CFG of the kind's paper, temperature 1
        self.answer_sampling = answer_sampling or SamplingConfig(temperature=0.0)  # answers: greedy
        self.sessions: OrderedDict[str, Session] = OrderedDict()  # least recently used first
        self._sessions_lock = threading.Lock()
        # The model runs on one thread, one request at a time: the decoder's static cache is shared, and
        # compiled CUDA graphs are recorded per thread (the web server runs handlers on a pool of threads).
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

    def reset(self, sid: str) -> None:
        """Forget the session (its turns and its image)."""
        self.model_thread.submit(lambda: self.sessions.pop(sid, None)).result()

    def undo(self, sid: str) -> bool:
        """Take back the last turn (for regenerating it); False when there is none to take back."""
        def run() -> bool:
            state = self.session(sid)
            if state.before_last is None:
                return False
            (state.turns, state.image_ids, state.image_is_new), state.before_last = state.before_last, None
            return True
        return self.model_thread.submit(run).result()

    def upload(self, sid: str, data: bytes) -> str:
        if len(data) > self.max_upload_bytes:
            raise UploadRejected(f"the file is {len(data) / 2**20:.1f} MB; the limit is {self.max_upload_bytes / 2**20:.1f} MB")
        try:  # the one bounded loader: size and aspect ratio checked before decoding, any mode to RGB
            img = open_rgb(data, self.limits)
        except ImageRejected as err:
            if err.kind == "corrupt_image":
                raise UploadRejected(f"that file is not an image I can read ({err})") from None
            raise UploadRejected(f"the image cannot be used: {err}") from None

        def run():
            try:
                ids = encode_images(self.visual, [img], self.decoder.seq_cfg.understanding_image, self.limits)[0]
            except ImageRejected as err:
                raise UploadRejected(f"the image cannot be used: {err}") from None
            state = self.session(sid)
            state.before_last = None  # a new picture: the last answer is not regenerated about it
            state.image_ids, state.image_is_new = ids.cpu(), True
        self.model_thread.submit(run).result()
        return f"got your {img.width}x{img.height} image; ask me about it"

    def message(self, sid: str, text: str, sampling: SamplingConfig | None = None, make_image: bool = False,
                answer_sampling: SamplingConfig | None = None, max_new_tokens: int | None = None) -> dict:
        """The whole reply: {"kind": "text", "text"} or {"kind": "image", "image": PIL image, "seed", "caption"}."""
        reply = None
        for reply in self.message_stream(sid, text, sampling, make_image, answer_sampling, max_new_tokens):
            pass
        return reply

    def message_stream(self, sid: str, text: str, sampling: SamplingConfig | None = None, make_image: bool = False,
                       answer_sampling: SamplingConfig | None = None, max_new_tokens: int | None = None):
        """Yields the reply as it grows ({"kind": "text", "text": the answer so far}, ...), or one image reply.
        An image request (image_caption), or any text with make_image, generates a picture with `sampling`;
        an answer is drawn with answer_sampling and is at most max_new_tokens long (defaults: the engine's;
        never above the engine's max_new_tokens). The work runs on the model thread."""
        text = text.strip()
        if not text:
            raise UploadRejected("empty message")
        max_new_tokens = self.max_new_tokens if max_new_tokens is None else max_new_tokens
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or not 1 <= max_new_tokens <= self.max_new_tokens:
            raise UploadRejected(f"the answer length must be 1 to {self.max_new_tokens} tokens, got {max_new_tokens!r}")
        # a character bound first (32 per allowed token, far above any tokenizer's average: huge texts are never
        # tokenized), then the token count
        if len(text) > 32 * self.max_prompt_tokens or len(self.decoder.tokenizer.encode(text)) > self.max_prompt_tokens:
            raise UploadRejected(f"the message is too long: the limit is {self.max_prompt_tokens} tokens")
        try:  # a typed <|im_end|><|im_start|>system ... would be read as the chat format's own turns
            self.decoder.builder.check_typed(text)
        except ValueError as err:
            raise UploadRejected(str(err)) from None
        caption = image_caption(text)
        if make_image and caption is None:
            caption = text
        sampling = (sampling or self.sampling) if caption is not None else (answer_sampling or self.answer_sampling)
        for item in self._on_model_thread(self._reply, self.session(sid), text, caption, sampling, max_new_tokens):
            if callable(item):  # the turn is complete and its reply delivered: the session takes it
                self.model_thread.submit(item).result()
            else:
                yield item

    def _on_model_thread(self, generator, *args):
        """Run generator(*args) on the model thread; yield its items here as they come. Abandoning this
        generator (a closed page) stops that one at its next item."""
        items, abandoned = queue.Queue(), threading.Event()

        def run():
            try:
                with torch.no_grad():
                    for item in generator(*args):
                        if abandoned.is_set():
                            return
                        items.put((True, item))
                items.put((False, None))
            except BaseException as err:  # handed to the caller
                items.put((False, err))

        self.model_thread.submit(run)
        try:
            while True:
                more, item = items.get()
                if not more:
                    if item is not None:
                        raise item
                    return
                yield item
        finally:
            abandoned.set()

    def _reply(self, state: Session, text: str, caption: str | None, sampling: SamplingConfig, max_new_tokens: int):
        """On the model thread: a generated image for an image request, else the model's answer, streamed;
        then the function that stores the turn in the session, run once the reply was delivered (a failed or
        abandoned turn must not change the session, nor poison the next)."""
        before = (state.turns, state.image_ids, state.image_is_new)
        if caption is not None:
            ids = self.decoder.image_ids([caption], sampling)
            image = to_pil(self.visual.decode(ids.to(self.visual.device))[0])
            yield {"kind": "image", "image": image, "seed": sampling.seed, "caption": caption}

            def store_image():
                state.image_ids, state.image_is_new, state.before_last = ids[0].cpu(), True, before
            yield store_image
            return
        text = text.replace("<image>", "")  # only an upload or a generated picture places the image
        attach = state.image_ids is not None and state.image_is_new
        turns = [*state.turns, ("user", "<image>\n" + text if attach else text)]
        turns = self._fit_context(turns, state.image_ids, max_new_tokens)
        image = state.image_ids if any("<image>" in t for _, t in turns) else None
        reply = ""
        for reply in self.decoder.answer_stream(self._visible_turns(turns), image, sampling, max_new_tokens):
            yield {"kind": "text", "text": reply}
        if not reply:
            yield {"kind": "text", "text": ""}

        def store_answer():
            state.turns, state.image_is_new = [*turns, ("assistant", reply)], state.image_is_new and not attach
            state.before_last = before
        yield store_answer

    def _fit_context(self, turns: list[tuple[str, str]], image_ids, max_new_tokens: int) -> list[tuple[str, str]]:
        """Drop the oldest exchanges until the prompt plus the answer fit the model's context."""
        ids = None if image_ids is None else image_ids.flatten().numpy()
        while True:
            visible = self._visible_turns(turns)
            image = ids if any("<image>" in t for _, t in visible) else None
            if len(self.decoder.builder.chat_prompt(visible, image)) + max_new_tokens <= self.context:
                return turns
            if len(turns) <= 1:
                raise UploadRejected(f"the message does not fit the model's context of {self.context} tokens")
            turns = turns[2:]

    @staticmethod
    def _visible_turns(turns: list[tuple[str, str]]) -> list[tuple[str, str]]:
        """One image per conversation: only the latest upload keeps its <image> tag."""
        last = max((i for i, (_, t) in enumerate(turns) if "<image>" in t), default=-1)
        return [(r, t if i == last else t.replace("<image>\n", "")) for i, (r, t) in enumerate(turns)]
