"""`semhitok chat`: the Gradio page over a ChatEngine (mllm/chat.py).

    semhitok chat --model runs/tiny/mllm/final            # http://127.0.0.1:7860 (this machine only)
    semhitok chat --model DIR --host 0.0.0.0 --port 7860  # other machines too: an explicit choice

The page: a chat whose answers stream; a photo upload with its preview; a "Generate image" button (typed
requests such as "draw a red bus" or "can you generate ..." work too) with CFG scale, temperature, top-k,
top-p and seed controls (a fresh random seed per picture unless "Random seed" is unticked; the seed used is
shown); the generated image with a download button; Regenerate, Clear and a transcript download; a row of
examples (ChatExamples: pictures with a question, which load like an upload and fill the box, and captions
to draw, which fill the box for "Generate image"). Columns stack on a phone-width screen. Works offline: no
analytics, system fonts, no share link.

Limits: uploads are capped by Gradio (max_file_size) and by the engine (bytes, pixels); at most
`queue_size` requests wait, one runs on the model at a time (concurrency 1, and the engine's model thread).
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import secrets
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from semhitok.common.config_io import ConfigError
from semhitok.mllm.chat import ChatEngine, UploadRejected
from semhitok.mllm.sample import SamplingConfig

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # before gradio's import: no calls home
import gradio as gr  # noqa: E402

log = logging.getLogger("semhitok")
LOOPBACK = ("127.0.0.1", "localhost", "::1")
CSS = """
#generated img, #chat img, .pixel-art img { image-rendering: pixelated; }
#generated img { width: 100%; height: 100%; object-fit: contain; }
@media (max-width: 640px) { .gradio-container { padding: 4px !important; } #controls button { min-width: 0 !important; } }
"""


@dataclass
class ChatExamples:
    """The page's examples row: pictures with a question to ask about them, and captions to draw."""

    questions: list[tuple[str, str]] = field(default_factory=list)  # (image path, question)
    prompts: list[str] = field(default_factory=list)
    source: str = ""  # where they come from, shown above the row
    pixel_art: bool = False  # small flat-coloured images: thumbnails scaled up without smoothing

    def __bool__(self) -> bool:
        return bool(self.questions or self.prompts)


SAMPLE_QUESTIONS = ("What is in this picture?", "Describe the image.", "What colors do you see?", "Where was this taken?")
WORLD_QUESTION_TYPES = ("colour", "shape", "left_right", "count", "yes_no")  # data_pipelines/world.py's question types
WORLD_PROMPT_CATEGORIES = ("single_object", "position")


def world_examples(world: str | Path, n: int = 4) -> ChatExamples:
    """From a shapes world's held-out files (data_pipelines/world.py): n held-out images with a question each
    (one per image, the types in turn) and n prompts, single objects and positions in turn."""
    world = Path(world)
    rows = [json.loads(line) for line in (world / "questions.jsonl").read_text().splitlines() if line.strip()]
    questions, images = [], set()
    for k in range(n * len(WORLD_QUESTION_TYPES)):
        kind = WORLD_QUESTION_TYPES[k % len(WORLD_QUESTION_TYPES)]
        row = next((r for r in rows if r.get("type") == kind and r["image"] not in images), None)
        if row is not None:
            images.add(row["image"])
            questions.append((str(world / row["image"]), row["question"]))
        if len(questions) == n:
            break
    by_category = {c: [] for c in WORLD_PROMPT_CATEGORIES}
    for line in (world / "prompts.jsonl").read_text().splitlines():
        row = json.loads(line) if line.strip() else {}
        if row.get("category") in by_category and row["prompt"] not in by_category[row["category"]]:
            by_category[row["category"]].append(row["prompt"])
    prompts = [p for group in itertools.zip_longest(*by_category.values()) for p in group if p is not None][:n]
    return ChatExamples(questions, prompts, f"held-out scenes of the shapes world in {world}", pixel_art=True)


def sample_examples(n: int = 4) -> ChatExamples:
    """The shipped sample's held-out photos with generic questions, and other held-out photos' captions."""
    from semhitok import RESOURCE_ROOT

    holdout = RESOURCE_ROOT / "data" / "sample" / "holdout.jsonl"
    if not holdout.is_file():
        return ChatExamples()
    rows = [json.loads(line) for line in holdout.read_text().splitlines() if line.strip()]
    questions = [(str(holdout.parent / r["image"]), SAMPLE_QUESTIONS[i % len(SAMPLE_QUESTIONS)]) for i, r in enumerate(rows[:n])]
    return ChatExamples(questions, [r["caption"] for r in rows[n : 2 * n]], "the shipped sample's held-out photos")


def chat_examples(world: str | Path | None, n: int = 4) -> ChatExamples:
    """The run's shapes world when it has one (questions.jsonl and prompts.jsonl), else the shipped sample."""
    if world is not None and (Path(world) / "questions.jsonl").is_file() and (Path(world) / "prompts.jsonl").is_file():
        try:
            return world_examples(world, n)
        except (OSError, ValueError, KeyError, TypeError) as err:  # a damaged world: the page still starts
            log.warning("chat: no examples from %s (%s: %s); using the shipped sample's", world, type(err).__name__, err)
    return sample_examples(n)


def _sampling(cfg, temperature, top_k, top_p, answer_temperature, random_seed, seed) -> tuple[SamplingConfig, SamplingConfig]:
    """The page's controls -> the sampling of a picture and of an answer (one seed: a fresh one when random_seed)."""
    seed = secrets.randbelow(2**31) if random_seed or seed is None else int(seed)
    image = SamplingConfig(cfg_scale=float(cfg), temperature=float(temperature), top_k=int(top_k), top_p=float(top_p), seed=seed)
    return image, SamplingConfig(temperature=float(answer_temperature), top_p=float(top_p), seed=seed)


def _transcript(history: list[dict], folder: Path, sid: str) -> str:
    """The chat as Markdown in folder/chat-<sid>.md (rewritten after every turn) -> its path."""
    lines = []
    for msg in history:  # content: a string (ours) or a list of {"type": "text", "text"} / file blocks (Gradio's)
        blocks = msg["content"] if isinstance(msg["content"], list) else [msg["content"]]
        text = " ".join(b if isinstance(b, str) else b.get("text", "") if isinstance(b, dict) and b.get("type") == "text"
                        else "[image]" for b in blocks)
        lines.append(f"**{'You' if msg['role'] == 'user' else 'SemHiTok'}:** {text}\n")
    path = folder / f"chat-{sid[:16]}.md"
    path.write_text("\n".join(lines))
    return str(path)


def build_app(engine: ChatEngine, random_seed: bool = True, examples: ChatExamples | None = None) -> gr.Blocks:
    """The page; its controls start at the engine's sampling settings. random_seed: the "Random seed" box's
    starting state (ticked: a fresh seed for every request). examples: the examples row (None or empty: none)."""
    sampling = engine.sampling
    folder = Path(tempfile.mkdtemp(prefix="semhitok-chat-"))
    model_events = dict(concurrency_limit=1, concurrency_id="model")  # one request on the model at a time

    with gr.Blocks(title="SemHiTok chat", delete_cache=(3600, 3600)) as app:  # cached files live an hour
        gr.Markdown("### SemHiTok chat\nUpload a photo and ask about it, or ask for a picture "
                    "(*draw a red bus*, or type a description and press **Generate image**).")
        last = gr.State(None)  # (text, make_image) of the last request: Regenerate sends it again
        with gr.Row(equal_height=False):
            with gr.Column(scale=3, min_width=300):
                chat = gr.Chatbot(label="Chat", height=380, elem_id="chat", layout="bubble")
                box = gr.Textbox(label="Message", show_label=False, placeholder="Ask about the photo, or: draw a red bus", lines=1,
                                 max_lines=6, elem_id="message")
                with gr.Row(elem_id="controls"):
                    send = gr.Button("Send", variant="primary", elem_id="send", min_width=60)
                    make = gr.Button("Generate image", elem_id="generate", min_width=60)
                with gr.Row(elem_id="history-controls"):
                    again = gr.Button("Regenerate", size="sm", elem_id="regenerate", min_width=60)
                    clear = gr.Button("Clear", size="sm", elem_id="clear", min_width=60)
                    transcript = gr.DownloadButton("Download chat", size="sm", elem_id="transcript", min_width=60)
            with gr.Column(scale=2, min_width=260):
                photo = gr.Image(label="Photo to ask about", type="filepath", sources=["upload", "clipboard"], height=220,
                                 elem_id="photo")
                picture = gr.Image(label="Generated image", format="png", interactive=False, buttons=["download", "fullscreen"],
                                   height=260, elem_id="generated")
                seed_used = gr.Markdown(elem_id="seed-used")
                with gr.Accordion("Image generation settings", open=False, elem_id="settings"):
                    cfg = gr.Slider(1, 10, value=sampling.cfg_scale, step=0.1, label="CFG scale", elem_id="cfg")
                    temperature = gr.Slider(0, 2, value=sampling.temperature, step=0.05, label="Temperature (0: greedy)")
                    top_k = gr.Slider(0, engine.decoder.layout.visual_vocab_size, value=sampling.top_k, step=1,
                                      label="Top-k (0: off)")
                    top_p = gr.Slider(0, 1, value=sampling.top_p, step=0.01, label="Top-p (1: off)")
                    answer_temperature = gr.Slider(0, 2, value=engine.answer_sampling.temperature, step=0.05,
                                                   label="Answer temperature (0: greedy)", elem_id="answer-temperature")
                    fresh = gr.Checkbox(value=random_seed, label="Random seed for every request", elem_id="random-seed")
                    seed = gr.Number(value=sampling.seed, precision=0, minimum=0, label="Seed", elem_id="seed")
        picked = None
        if examples:
            with gr.Column(elem_id="examples", elem_classes=["pixel-art"] if examples.pixel_art else None):
                gr.Markdown(f"**Examples** from {examples.source}", elem_id="examples-source")
                with gr.Row(equal_height=False):
                    if examples.questions:
                        with gr.Column(scale=3, min_width=300):
                            picked = gr.Examples([list(q) for q in examples.questions], [photo, box], elem_id="ask-examples",
                                                 label="Ask about a picture (click one, then Send)")
                    if examples.prompts:
                        with gr.Column(scale=2, min_width=260):
                            gr.Examples([[p] for p in examples.prompts], [box], elem_id="draw-examples",
                                        label="Draw (click one, then Generate image)")
        controls = [cfg, temperature, top_k, top_p, answer_temperature, fresh, seed]
        outputs = [chat, box, picture, seed_used, seed, last, transcript]

        def stream(sid: str, text: str, history: list, settings: tuple, make_image: bool):
            """Stream one reply into the chat: (chat, box, picture, seed_used, seed, last, transcript) updates."""
            history = list(history or [])
            if not (text or "").strip():
                yield gr.skip(), gr.skip(), gr.skip(), gr.skip(), gr.skip(), gr.skip(), gr.skip()
                return
            history += [{"role": "user", "content": text}, {"role": "assistant", "content": "…"}]
            yield history, "", gr.skip(), gr.skip(), gr.skip(), (text, make_image), gr.skip()
            try:
                image_sampling, answer_sampling = _sampling(*settings)
                for reply in engine.message_stream(sid, text, image_sampling, make_image, answer_sampling):
                    if reply["kind"] == "text":
                        history[-1] = {"role": "assistant", "content": reply["text"] or "(empty answer)"}
                        yield history, gr.skip(), gr.skip(), gr.skip(), gr.skip(), gr.skip(), gr.skip()
                        continue
                    # a file written once (Gradio copies a file into its cache once; a PIL image on every yield)
                    png = folder / f"semhitok-{secrets.token_hex(4)}-seed{reply['seed']}.png"
                    reply["image"].save(png)
                    history[-1] = {"role": "assistant", "content": f"{reply['caption']} (seed {reply['seed']})"}
                    history.append({"role": "assistant", "content": {"path": str(png)}})
                    yield history, gr.skip(), str(png), f"seed used: **{reply['seed']}**", reply["seed"], gr.skip(), gr.skip()
            except (UploadRejected, ConfigError, ValueError) as err:  # a prompt or setting refused: a message
                history[-1] = {"role": "assistant", "content": f"⚠ {err}"}
            except Exception as err:  # a reply, not a dead page
                log.exception("chat request failed")
                history[-1] = {"role": "assistant", "content": f"⚠ internal error: {type(err).__name__}"}
            yield history, gr.skip(), gr.skip(), gr.skip(), gr.skip(), gr.skip(), _transcript(history, folder, sid)

        # (Gradio passes the request to a parameter annotated gr.Request; the controls' values come in order)
        def respond(text, history, cfg, temperature, top_k, top_p, answer_t, fresh, seed, request: gr.Request):
            yield from stream(request.session_hash, text, history, (cfg, temperature, top_k, top_p, answer_t, fresh, seed), False)

        def generate(text, history, cfg, temperature, top_k, top_p, answer_t, fresh, seed, request: gr.Request):
            yield from stream(request.session_hash, text, history, (cfg, temperature, top_k, top_p, answer_t, fresh, seed), True)

        def regenerate(previous, history, cfg, temperature, top_k, top_p, answer_t, fresh, seed, request: gr.Request):
            """Take the last exchange back and send its request again (a picture gets a new random seed)."""
            if previous is None:
                yield gr.skip(), gr.skip(), gr.skip(), gr.skip(), gr.skip(), gr.skip(), gr.skip()
                return
            engine.undo(request.session_hash)
            history = list(history or [])
            while history and history[-1]["role"] == "assistant":
                history.pop()
            if history:
                history.pop()  # the request itself: sent again below
            text, make_image = previous
            yield from stream(request.session_hash, text, history, (cfg, temperature, top_k, top_p, answer_t, fresh, seed),
                              make_image)

        def upload(path, history, request: gr.Request):
            """The photo questions will refer to: (chat, photo, last) updates."""
            history = list(history or [])
            if not path:
                return gr.skip(), gr.skip(), gr.skip()
            path = path if isinstance(path, str) else path.get("path")
            name = os.path.basename(path)
            history.append({"role": "user", "content": f"📷 {name}"})
            try:
                if os.path.getsize(path) > engine.max_upload_bytes:  # checked before the file is read
                    raise UploadRejected(f"the file is {os.path.getsize(path) / 2**20:.1f} MB; the limit is "
                                         f"{engine.max_upload_bytes / 2**20:.1f} MB")
                history.append({"role": "assistant", "content": engine.upload(request.session_hash, Path(path).read_bytes())})
                return history, gr.skip(), None
            except UploadRejected as err:
                history.append({"role": "assistant", "content": f"⚠ {err}"})
                return history, None, None

        def reset(request: gr.Request):
            engine.reset(request.session_hash)
            return [], None, None, "", None, None

        box.submit(respond, [box, chat, *controls], outputs, **model_events)
        send.click(respond, [box, chat, *controls], outputs, **model_events)
        make.click(generate, [box, chat, *controls], outputs, **model_events)
        again.click(regenerate, [last, chat, *controls], outputs, **model_events)
        # preprocess=False: the engine's bounded loader reads the file, not PIL here first
        photo.upload(upload, [photo, chat], [chat, photo, last], preprocess=False, **model_events)
        if picked is not None:  # a picked example's picture goes to the model as an upload does
            picked.load_input_event.then(upload, [photo, chat], [chat, photo, last], preprocess=False, **model_events)
        clear.click(reset, None, [chat, photo, picture, seed_used, last, transcript], **model_events)
    return app


def serve(engine: ChatEngine, host: str = "127.0.0.1", port: int = 7860, random_seed: bool = True, queue_size: int = 16,
          block: bool = True, examples: ChatExamples | None = None) -> gr.Blocks:
    """Build the page and serve it (port 0: a free one, see app.server_port); block=False returns at once
    (app.close() stops it)."""
    if host not in LOOPBACK:
        log.warning("chat: serving on %s: other machines can reach this page (no authentication)", host)
    app = build_app(engine, random_seed, examples)
    app.queue(max_size=queue_size, default_concurrency_limit=1)
    if port == 0:
        import socket

        with socket.socket() as s:
            s.bind((host, 0))
            port = s.getsockname()[1]
    theme = gr.themes.Default(font=["system-ui", "sans-serif"], font_mono=["ui-monospace", "monospace"])  # no web fonts
    app.launch(server_name=host, server_port=port, share=False, prevent_thread_lock=not block, quiet=True,
               max_file_size=engine.max_upload_bytes, ssr_mode=False, theme=theme, css=CSS, footer_links=[],
               show_error=False)
    return app
