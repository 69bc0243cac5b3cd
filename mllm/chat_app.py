"""`semhitok chat`: the Gradio page over a ChatEngine (mllm/chat.py).

    semhitok chat --model runs/tiny/mllm/final            # http://127.0.0.1:7860 (this machine only)
    semhitok chat --model DIR --host 0.0.0.0 --port 7860  # other machines too: an explicit choice

The page, in three columns (they stack on a phone-width screen, the photo upload first): the photo to ask
about; a chat whose answers stream, with answer settings (temperature, max answer length) under it; the
generated image with a download button, its seed, and image settings (CFG scale, temperature, top-k, top-p,
seed: a fresh random seed per picture unless "Random seed" is unticked). "Generate image" draws the box's
text (typed requests such as "draw a red bus" or "can you generate ..." work too); Send or Generate with an
empty box says what to type. Regenerate, Clear and a transcript download; a row of examples (ChatExamples:
pictures with a question, which load like an upload and fill the box, and captions to draw, which fill the
box for "Generate image"). Works offline: no analytics, system fonts (no glyph needs an emoji font), no share
link; the console prints requests' errors only.

Limits: uploads are capped by Gradio (max_file_size) and by the engine (bytes, pixels: the encoder's);
at most `queue_size` requests wait, one runs on the model at a time (concurrency 1, and the engine's model
thread); every control has a range (PAGE_RANGES; the CLI refuses starting values outside it).
"""

from __future__ import annotations

import itertools
import logging
import os
import secrets
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path

from semhitok.common.config_io import ConfigError
from semhitok.common.io import read_json, read_jsonl
from semhitok.mllm.chat import ChatEngine, UploadRejected
from semhitok.mllm.config import SamplingConfig

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # before gradio's import: no calls home
import gradio as gr  # noqa: E402

log = logging.getLogger("semhitok")
LOOPBACK = ("127.0.0.1", "localhost", "::1")
MAX_SEED = 2**31 - 1  # random seeds are drawn below 2**31; a larger one is refused (no 300-digit file names)
MAX_QUEUE = 1000  # requests waiting for the model (each holds a connection open)
# (low, high) of every control on the page; `semhitok chat` refuses a starting value outside them
PAGE_RANGES = {"cfg_scale": (1.0, 10.0), "temperature": (0.0, 2.0), "top_p": (0.0, 1.0), "answer_temperature": (0.0, 2.0),
               "seed": (0, MAX_SEED)}
EMPTY_SEND = "Type a question in the box first (upload a photo to ask about it), then press Send."
EMPTY_GENERATE = "Type what to draw in the box first (for example: a red circle), then press Generate image."
CSS = """
#generated img, #chat img, .pixel-art img { image-rendering: pixelated; }
#generated img { width: 100%; height: 100%; object-fit: contain; }
@media (max-width: 640px) { .gradio-container { padding: 4px !important; } #controls button { min-width: 0 !important; } }
"""


def check_page(cfg_scale: float, temperature: float, top_k: int, top_p: float, answer_temperature: float, seed: int | None,
               queue_size: int, visual_vocab_size: int | None = None) -> None:
    """The page's starting values and queue within their ranges (ConfigError, one line, naming the first bad one)."""
    from types import SimpleNamespace

    from semhitok.common.config_io import check_range

    values = SimpleNamespace(cfg_scale=cfg_scale, temperature=temperature, top_p=top_p, answer_temperature=answer_temperature,
                             seed=0 if seed is None else seed, top_k=top_k, queue_size=queue_size)
    for name, (lo, hi) in PAGE_RANGES.items():
        check_range(values, lo, hi, name)
    check_range(values, 0, visual_vocab_size if visual_vocab_size is not None else 2**31, "top_k")
    check_range(values, 1, MAX_QUEUE, "queue_size")


def quiet_console() -> None:
    """Requests print nothing unless they fail: no line per HTTP request of Gradio's own startup checks (httpx),
    and no transformers FutureWarning per answer about `past_key_values` (the decoder, mllm/sample.py, passes
    the cache under that name, which transformers 5.x still accepts; renaming it to `cache` belongs there)."""
    logging.getLogger("httpx").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=r"`past_key_values` is deprecated", category=FutureWarning)


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
    rows = read_jsonl(world / "questions.jsonl")  # (depth-limited; a bad row is one line naming it)
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
    for row in read_jsonl(world / "prompts.jsonl"):
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
    rows = read_jsonl(holdout)
    questions = [(str(holdout.parent / r["image"]), SAMPLE_QUESTIONS[i % len(SAMPLE_QUESTIONS)]) for i, r in enumerate(rows[:n])]
    return ChatExamples(questions, [r["caption"] for r in rows[n : 2 * n]], "the shipped sample's held-out photos")


def trained_on_shapes(model: str | Path) -> bool:
    """The model's training mixture (semhitok_mllm.json) drew from the shapes world's sources (configs/shapes.yaml
    names them shapes_captions, shapes_llava, shapes_text)."""
    try:
        mixture = read_json(Path(model) / "semhitok_mllm.json")["sequence_config"]["mixture"]
        return any(str(m["source"]).startswith("shapes") for m in mixture)
    except (OSError, ValueError, KeyError, TypeError):
        return False


def rendered_world(cache: str | Path | None = None) -> Path:
    """A small shapes world (data_pipelines/world.py's default look; 16 held-out scenes, about 40 KB) rendered
    once into the user's cache: the examples of a shapes model whose run's world is not at hand (an export
    copied or downloaded alone)."""
    from semhitok.data_pipelines.world import WorldConfig, write_world

    cache = Path(cache) if cache else Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "semhitok" / "chat-world"
    return write_world(WorldConfig(train_scenes=1, holdout_scenes=16, text_rows=0), cache)


def chat_examples(world: str | Path | None, n: int = 4, model: str | Path | None = None) -> ChatExamples:
    """The run's shapes world when it has one (questions.jsonl and prompts.jsonl); for a model trained on the
    shapes world without its run's world, scenes rendered into the cache (rendered_world); else the shipped sample."""
    if world is None and model is not None and trained_on_shapes(model):
        try:
            world = rendered_world()
        except (OSError, ValueError) as err:  # an unwritable cache: the page still starts
            log.warning("chat: could not render shapes-world examples (%s: %s)", type(err).__name__, err)
    if world is not None and (Path(world) / "questions.jsonl").is_file() and (Path(world) / "prompts.jsonl").is_file():
        try:
            return world_examples(world, n)
        except (OSError, ValueError, KeyError, TypeError) as err:  # a damaged world: the page still starts
            log.warning("chat: no examples from %s (%s: %s); using the shipped sample's", world, type(err).__name__, err)
    return sample_examples(n)


def _sampling(cfg, temperature, top_k, top_p, answer_temperature, random_seed, seed) -> tuple[SamplingConfig, SamplingConfig]:
    """The page's controls -> the sampling of a picture and of an answer (one seed: a fresh one when random_seed;
    top-k and top-p are the picture's, an answer samples from the whole distribution at its temperature)."""
    if not random_seed and seed is not None and not 0 <= seed <= MAX_SEED:  # before int(): the page may send 1e300
        raise ValueError(f"the seed must be a whole number from 0 to {MAX_SEED}, got {seed:g}")
    seed = secrets.randbelow(MAX_SEED + 1) if random_seed or seed is None else int(seed)
    image = SamplingConfig(cfg_scale=float(cfg), temperature=float(temperature), top_k=int(top_k), top_p=float(top_p), seed=seed)
    return image, SamplingConfig(temperature=float(answer_temperature), seed=seed)


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
        gr.Markdown("### SemHiTok chat\nUpload a photo and ask about it, or ask for a picture: type *draw a red circle*, "
                    "or a description and press **Generate image**." + (" Examples are below." if examples else ""))
        last = gr.State(None)  # (text, make_image) of the last request: Regenerate sends it again
        # DOM order is the phone's order (columns stack): the photo to ask about, the chat, the generated image
        with gr.Row(equal_height=False):
            with gr.Column(scale=2, min_width=240, elem_id="ask-column"):
                photo = gr.Image(label="Photo to ask about", type="filepath", sources=["upload", "clipboard"], height=220,
                                 elem_id="photo")
            with gr.Column(scale=4, min_width=300, elem_id="chat-column"):
                chat = gr.Chatbot(label="Chat", height=380, elem_id="chat", layout="bubble")
                box = gr.Textbox(label="Message", show_label=False, placeholder="Ask about the photo, or: draw a red circle",
                                 lines=1, max_lines=6, elem_id="message")
                with gr.Row(elem_id="controls"):
                    send = gr.Button("Send", variant="primary", elem_id="send", min_width=60)
                    make = gr.Button("Generate image", elem_id="generate", min_width=60)
                with gr.Accordion("Answer settings", open=False, elem_id="answer-settings"):
                    answer_temperature = gr.Slider(*PAGE_RANGES["answer_temperature"], value=engine.answer_sampling.temperature,
                                                   step=0.05, label="Answer temperature (0: greedy)", elem_id="answer-temperature")
                    answer_length = gr.Slider(1, engine.max_new_tokens, value=engine.max_new_tokens, step=1,
                                              label="Max answer length (tokens)", elem_id="answer-length")
                with gr.Row(elem_id="history-controls"):
                    again = gr.Button("Regenerate", size="sm", elem_id="regenerate", min_width=60)
                    clear = gr.Button("Clear", size="sm", elem_id="clear", min_width=60)
                    transcript = gr.DownloadButton("Download chat", size="sm", elem_id="transcript", min_width=60)
            with gr.Column(scale=2, min_width=240, elem_id="draw-column"):
                picture = gr.Image(label="Generated image", format="png", interactive=False, buttons=["download", "fullscreen"],
                                   height=260, elem_id="generated")
                seed_used = gr.Markdown(elem_id="seed-used")
                with gr.Accordion("Image generation settings", open=False, elem_id="settings"):
                    cfg = gr.Slider(*PAGE_RANGES["cfg_scale"], value=sampling.cfg_scale, step=0.1, label="CFG scale", elem_id="cfg")
                    temperature = gr.Slider(*PAGE_RANGES["temperature"], value=sampling.temperature, step=0.05,
                                            label="Temperature (0: greedy)")
                    top_k = gr.Slider(0, engine.decoder.layout.visual_vocab_size, value=sampling.top_k, step=1,
                                      label="Top-k (0: off)")
                    top_p = gr.Slider(*PAGE_RANGES["top_p"], value=sampling.top_p, step=0.01, label="Top-p (1: off)")
                    fresh = gr.Checkbox(value=random_seed, label="Random seed for every request", elem_id="random-seed")
                    seed = gr.Number(value=sampling.seed, precision=0, minimum=0, maximum=MAX_SEED, label="Seed", elem_id="seed")
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
        controls = [cfg, temperature, top_k, top_p, answer_temperature, fresh, seed, answer_length]
        outputs = [chat, box, picture, seed_used, seed, last, transcript]

        def stream(sid: str, text: str, history: list, settings: tuple, make_image: bool):
            """Stream one reply into the chat: (chat, box, picture, seed_used, seed, last, transcript) updates.
            settings: the controls' values in order."""
            history = list(history or [])
            if not (text or "").strip():  # a note that fades, not a turn in the chat
                gr.Warning(EMPTY_GENERATE if make_image else EMPTY_SEND)
                yield gr.skip(), gr.skip(), gr.skip(), gr.skip(), gr.skip(), gr.skip(), gr.skip()
                return
            history += [{"role": "user", "content": text}, {"role": "assistant", "content": "…"}]
            yield history, "", gr.skip(), gr.skip(), gr.skip(), (text, make_image), gr.skip()
            try:
                *sampling_settings, answer_length = settings
                image_sampling, answer_sampling = _sampling(*sampling_settings)
                for reply in engine.message_stream(sid, text, image_sampling, make_image, answer_sampling, int(answer_length)):
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
        def respond(text, history, cfg, temperature, top_k, top_p, answer_t, fresh, seed, length, request: gr.Request):
            settings = (cfg, temperature, top_k, top_p, answer_t, fresh, seed, length)
            yield from stream(request.session_hash, text, history, settings, False)

        def generate(text, history, cfg, temperature, top_k, top_p, answer_t, fresh, seed, length, request: gr.Request):
            settings = (cfg, temperature, top_k, top_p, answer_t, fresh, seed, length)
            yield from stream(request.session_hash, text, history, settings, True)

        def regenerate(previous, history, cfg, temperature, top_k, top_p, answer_t, fresh, seed, length, request: gr.Request):
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
            settings = (cfg, temperature, top_k, top_p, answer_t, fresh, seed, length)
            yield from stream(request.session_hash, text, history, settings, make_image)

        def upload(path, history, request: gr.Request):
            """The photo questions will refer to: (chat, photo, last) updates."""
            history = list(history or [])
            if not path:
                return gr.skip(), gr.skip(), gr.skip()
            path = path if isinstance(path, str) else path.get("path")
            name = os.path.basename(path)
            history.append({"role": "user", "content": f"Photo: {name}"})
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
    check_page(engine.sampling.cfg_scale, engine.sampling.temperature, engine.sampling.top_k, engine.sampling.top_p,
               engine.answer_sampling.temperature, engine.sampling.seed, queue_size, engine.decoder.layout.visual_vocab_size)
    if not 0 <= port <= 65535:
        raise ValueError(f"port: must lie in [0, 65535], got {port}")
    if host not in LOOPBACK:
        log.warning("chat: serving on %s: other machines can reach this page (no authentication)", host)
    quiet_console()
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
