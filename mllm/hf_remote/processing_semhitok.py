"""SemHiTok processor for transformers' remote code: AutoProcessor.from_pretrained(dir, trust_remote_code=True).

Self-contained (torch, transformers, safetensors, PIL, numpy). (text with one "<image>" per image, images) ->
input_ids where each "<image>" becomes <|vision_start|> visual ids <|vision_end|>, the ids coming from the
encoding half of the SemHiTok tokenizer in the export's visual_tokenizer/ (SigLIP student + semantic codebook,
pixel encoder + hierarchical codebook: id = semantic id * m + pixel id). Decoding ids to pixels is not here:
use semhitok (`semhitok.tokenizer.load_tokenizer(dir + "/visual_tokenizer").decode(ids)`).

Chat messages hold a string ("<image>\\nWhat is in the picture?") or typed blocks as transformers' chat templates
take them ([{"type": "image", "image": pil}, {"type": "text", "text": "What is in the picture?"}]); typed blocks
become that string ("<image>" per image block, blocks joined by newlines) before the text tokenizer's own chat
template renders the conversation, so both spell the same tokens the model was trained on.

    processor = AutoProcessor.from_pretrained(d, trust_remote_code=True)
    model = AutoModelForImageTextToText.from_pretrained(d, trust_remote_code=True)
    messages = [{"role": "user", "content": [{"type": "image", "image": Image.open("photo.jpg")},
                                             {"type": "text", "text": "What is in the picture?"}]}]
    inputs = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True)
    out = model.generate(**inputs)   # stops at <|im_end|> / <|endoftext|> (generation_config.json)
    print(processor.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True))

or pipeline("image-text-to-text", model=d, trust_remote_code=True)(text=messages).
"""

import json
import os

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file
from transformers import AutoTokenizer, BatchFeature, ProcessorMixin, SiglipVisionConfig, SiglipVisionModel
from transformers.image_utils import load_image
from transformers.utils import cached_file

IMAGE = "<image>"
VISUAL = "visual_tokenizer"
# Put before the text tokenizer's chat template: typed content blocks -> the string the model was trained on
TYPED_CONTENT = (
    "{%- set ns = namespace(messages=[], text='') %}"
    "{%- for message in messages %}"
    "{%- if message['content'] is string or message['content'] is none %}{%- set ns.messages = ns.messages + [message] %}"
    "{%- else %}"
    "{%- set ns.text = '' %}"
    "{%- for block in message['content'] %}"
    "{%- if block['type'] == 'image' %}{%- set part = '" + IMAGE + "' %}"
    "{%- elif block['type'] == 'text' %}{%- set part = block['text'] %}"
    "{%- else %}{{- raise_exception('message content blocks are text or image, got type ' ~ block['type']) }}"
    "{%- endif %}"
    "{%- set ns.text = ns.text ~ ('' if loop.first else '\\n') ~ part %}"
    "{%- endfor %}"
    "{%- set ns.messages = ns.messages + [{'role': message['role'], 'content': ns.text}] %}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- set messages = ns.messages %}"
)
# What __call__ passes on to the text tokenizer; truncation is not among them (it would cut an image span)
TOKENIZER_KWARGS = ("add_special_tokens",)
PAD_KWARGS = ("padding", "pad_to_multiple_of", "padding_side", "return_attention_mask")


class Block(nn.Module):
    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.norm1, self.qkv, self.proj = nn.LayerNorm(width), nn.Linear(width, 3 * width), nn.Linear(width, width)
        self.norm2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(approximate="tanh"), nn.Linear(4 * width, width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, N, C]
        b, n, c = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        x = x + self.proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, c))
        return x + self.mlp(self.norm2(x))


class Transformer(nn.Module):
    def __init__(self, width: int, layers: int, heads: int, num_tokens: int):
        super().__init__()
        self.pos = nn.Parameter(torch.zeros(1, num_tokens, width))
        self.blocks = nn.ModuleList(Block(width, heads) for _ in range(layers))
        self.norm = nn.LayerNorm(width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.pos
        for block in self.blocks:
            x = block(x)
        return self.norm(x)


def l2norm(x: torch.Tensor) -> torch.Tensor:
    return F.normalize(x, dim=-1, eps=1e-6)


class VisualEncoder(nn.Module):
    """images [B, 3, S, S] in [-1, 1] -> visual ids [B, N] (N = grid * grid), from SemHiTok's config.json fields."""

    def __init__(self, cfg: dict):
        super().__init__()
        siglip = SiglipVisionConfig.from_dict({**cfg["siglip_config"], "vision_use_head": False})
        self.image_size, self.grid = siglip.image_size, siglip.image_size // siglip.patch_size
        self.semantic_only = cfg["fusion"] == "semantic_only"
        self.shared = cfg.get("pix_codebook") == "shared"  # one codebook of K * m codes, the id its index
        self.m = 1 if self.semantic_only else cfg["pix_codes_per_group"]
        k = cfg["sem_codebook_size"]
        self.semantic = nn.Module()
        self.semantic.encoder = SiglipVisionModel(siglip)
        self.semantic.to_code = nn.Linear(siglip.hidden_size, cfg["sem_code_dim"])
        self.semantic.codebook = nn.Module()
        self.semantic.codebook.register_buffer("embed", torch.zeros(k, cfg["sem_code_dim"]))
        if not self.semantic_only:
            width, heads = cfg["pix_encoder_width"], cfg["pix_encoder_heads"]
            self.patch = -(-self.image_size // self.grid)  # rounded up: the canvas is grid * patch px
            self.pixel = nn.Module()
            self.pixel.patch_embed = nn.Linear(self.patch * self.patch * 3, width)
            self.pixel.encoder = Transformer(width, cfg["pix_encoder_layers"], heads, self.grid * self.grid)
            self.pixel.to_code = nn.Linear(width, cfg["pix_code_dim"])
            self.pixel.codebook = nn.Module()
            self.pixel.codebook.codes = nn.Parameter(torch.zeros(k, self.m, cfg["pix_code_dim"]))

    def load(self, weights: str) -> "VisualEncoder":
        """The encoding half of a SemHiTok model.safetensors (the decoders' weights are left out)."""
        found = load_file(weights)
        missing = [k for k in self.state_dict() if k not in found]
        if missing:
            raise ValueError(f"{weights}: {len(missing)} encoder weight(s) missing (first: {missing[0]})")
        self.load_state_dict({k: found[k] for k in self.state_dict()})
        return self.eval()

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        z = l2norm(self.semantic.to_code(self.semantic.encoder(pixel_values=images).last_hidden_state))  # [B, N, c]
        sem = (z.float() @ self.semantic.codebook.embed.float().t()).argmax(-1)  # [B, N]
        if self.semantic_only:
            return sem
        canvas = self.grid * self.patch
        if images.shape[-1] != canvas:
            images = F.interpolate(images.float(), size=(canvas, canvas), mode="bilinear", antialias=True, align_corners=False)
        b, p = images.shape[0], self.patch
        patches = images.view(b, 3, self.grid, p, self.grid, p).permute(0, 2, 4, 3, 5, 1).reshape(b, self.grid ** 2, p * p * 3)
        zp = l2norm(self.pixel.to_code(self.pixel.encoder(self.pixel.patch_embed(patches))).float())  # [B, N, d]
        if self.shared:
            return (zp @ l2norm(self.pixel.codebook.codes.float().flatten(0, 1)).t()).argmax(-1)  # [B, N]
        group = l2norm(self.pixel.codebook.codes.float()[sem])  # [B, N, m, d]: the patch's own sub-codebook
        pix = torch.einsum("bnd,bnmd->bnm", zp, group).argmax(-1)
        return sem * self.m + pix


MAX_PIXELS, MAX_ASPECT_RATIO = 36_000_000, 20.0  # semhitok.tokenizer.data.ImageLimits' defaults


def to_rgb(img: Image.Image, size: int) -> Image.Image:
    """As semhitok reads images: the size checked on the header before any pixel is decoded (ValueError: at most
    MAX_PIXELS after a JPEG's draft, sides within MAX_ASPECT_RATIO), a large JPEG decoded at the smallest DCT scale
    keeping both sides >= size, transparency over white. (16-bit and float modes are not rescaled as semhitok does.)"""
    w, h = img.size
    if w < 1 or h < 1 or max(w, h) / min(w, h) > MAX_ASPECT_RATIO:
        raise ValueError(f"image of {w}x{h}: empty or an aspect ratio above {MAX_ASPECT_RATIO:g}")
    if img.format == "JPEG" and min(img.size) >= 2 * size:
        img.draft("RGB", (size, size))
    if img.size[0] * img.size[1] > MAX_PIXELS:
        raise ValueError(f"image of {img.size[0]}x{img.size[1]}: above the limit of {MAX_PIXELS:,} pixels")
    if img.mode in ("RGBA", "LA", "PA", "La", "RGBa") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("RGB")
    return img.convert("RGB")


def open_image(source) -> Image.Image:
    """A PIL image as is; a file path as semhitok opens it (no EXIF rotation, a large JPEG decoded at a DCT scale
    by to_rgb); a URL or base64 string through transformers' load_image."""
    if isinstance(source, Image.Image):
        return source
    if isinstance(source, (str, os.PathLike)) and os.path.isfile(source):
        return Image.open(source)
    return load_image(source)


def square(img: Image.Image, size: int, mode: str) -> Image.Image:
    """pad: resize the longer side to size, then pad to square with the vision processor's mean (LLaVA-1.5's
    expand2square: SigLIP's 0.5 -> 127) (understanding); crop: centre crop (as semhitok.tokenizer.data.square)."""
    img = to_rgb(img, size)
    w, h = img.size
    if mode == "pad":  # the longer side resized to size first: no max(w, h)^2 canvas
        fill = (127, 127, 127)  # semhitok.tokenizer.data.PAD_FILL (remote code imports nothing of semhitok)
        img = img.resize((max(1, round(w * size / max(w, h))), max(1, round(h * size / max(w, h)))), Image.BICUBIC)
        if img.width == img.height:
            return img
        canvas = Image.new("RGB", (size, size), fill)
        canvas.paste(img, ((size - img.width) // 2, (size - img.height) // 2))
        return canvas
    scale = size / min(w, h)
    nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
    img = img.resize((nw, nh), Image.BICUBIC)
    left, top = (nw - size) // 2, (nh - size) // 2
    return img.crop((left, top, left + size, top + size))


class SemHiTokProcessor(ProcessorMixin):
    """Text tokenizer + visual encoder -> model inputs (input_ids, attention_mask). apply_chat_template is
    transformers' own (add_generation_prompt defaults to False; tokenize=True loads the images of typed blocks)."""

    def __init__(self, tokenizer, visual: VisualEncoder, text_vocab_size: int, image_start: int, image_end: int,
                 image_mode: str = "pad", chat_template: str | None = None):
        if chat_template is None and isinstance(tokenizer.chat_template, str):
            chat_template = TYPED_CONTENT + tokenizer.chat_template
        super().__init__(tokenizer, chat_template=chat_template)
        self.visual = visual
        self.text_vocab_size, self.image_start, self.image_end, self.image_mode = text_vocab_size, image_start, image_end, image_mode

    @classmethod
    def from_pretrained(cls, name_or_path, **kwargs) -> "SemHiTokProcessor":
        hub = {k: kwargs[k] for k in ("cache_dir", "revision", "token", "local_files_only") if k in kwargs}
        with open(cached_file(name_or_path, "processor_config.json", **hub)) as f:
            cfg = json.load(f)
        with open(cached_file(name_or_path, f"{VISUAL}/config.json", **hub)) as f:
            visual = VisualEncoder(json.load(f)).load(cached_file(name_or_path, f"{VISUAL}/model.safetensors", **hub))
        tokenizer = AutoTokenizer.from_pretrained(name_or_path, trust_remote_code=kwargs.get("trust_remote_code"), **hub)
        if tokenizer.pad_token is None:  # LLaMA's: rows pad with eos, as generation_config.json's pad_token_id says
            tokenizer.pad_token = tokenizer.eos_token
        return cls(tokenizer, visual, cfg["text_vocab_size"], cfg["image_start"], cfg["image_end"], cfg.get("image_mode", "pad"))

    def to_dict(self) -> dict:
        """processor_config.json's fields (the visual encoder is weights, not config)."""
        return {"processor_class": type(self).__name__, "text_vocab_size": self.text_vocab_size, "image_start": self.image_start,
                "image_end": self.image_end, "image_mode": self.image_mode}

    def encode_images(self, images: list) -> torch.Tensor:
        """PIL images -> visual ids [B, N] in [0, K*m)"""
        size = self.visual.image_size
        arrays = [np.asarray(square(img, size, self.image_mode), dtype=np.float32) / 127.5 - 1.0 for img in images]
        batch = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()
        return self.visual(batch.to(next(self.visual.parameters()).device)).cpu()

    def __call__(self, text=None, images=None, videos=None, audio=None, return_tensors: str | None = "pt",
                 **kwargs) -> BatchFeature:
        """text: a string or a list (one row each); images: one per "<image>" in order, each a PIL image, a path, a
        URL or base64 (open_image; a list, or a list of lists per row). kwargs: add_special_tokens and the padding
        options (rows are padded to the longest by default)."""
        if videos is not None or audio is not None:
            raise ValueError(f"{type(self).__name__} takes text and images, not {'videos' if videos is not None else 'audio'}")
        unknown = sorted(set(kwargs) - set(TOKENIZER_KWARGS) - set(PAD_KWARGS))
        if unknown:
            raise TypeError(f"{type(self).__name__} got unexpected keyword argument(s): {', '.join(unknown)}")
        if text is None:
            raise ValueError("text is required: one \"<image>\" per image where it goes (or use apply_chat_template)")
        texts = [text] if isinstance(text, str) else list(text)
        images = [] if images is None else [images] if isinstance(images, (str, os.PathLike, Image.Image)) else list(images)
        images = [open_image(img) for item in images for img in (item if isinstance(item, (list, tuple)) else [item])]
        marked = "".join(self.tokenizer.convert_ids_to_tokens([self.image_start, self.image_end]))
        tokenize = {k: kwargs[k] for k in TOKENIZER_KWARGS if k in kwargs}
        rows = [self.tokenizer(t.replace(IMAGE, marked), **tokenize)["input_ids"] for t in texts]
        n_spans = sum(row.count(self.image_start) for row in rows)
        if n_spans != len(images):
            raise ValueError(f"the text has {n_spans} image place(s) ({IMAGE} or <|vision_start|>), {len(images)} image(s) given")
        ids = iter(self.encode_images(images) + self.text_vocab_size if images else [])
        rows = [[x for tok in row for x in ([tok, *next(ids).tolist()] if tok == self.image_start else [tok])] for row in rows]
        pad = {"padding": True, **{k: kwargs[k] for k in PAD_KWARGS if k in kwargs}}
        return BatchFeature(dict(self.tokenizer.pad({"input_ids": rows}, **pad)), tensor_type=return_tensors)

    def decode(self, ids, **kwargs) -> str:
        """Text ids -> text (visual ids, which only an image span holds, are left out)."""
        ids = ids.tolist() if torch.is_tensor(ids) else list(ids)
        return self.tokenizer.decode([i for i in ids if i < len(self.tokenizer)], **kwargs)

    def batch_decode(self, rows, **kwargs) -> list[str]:
        return [self.decode(row, **kwargs) for row in rows]

    def post_process_image_text_to_text(self, generated_outputs, skip_special_tokens: bool = True, **kwargs) -> list[str]:
        """generate's output [B, T] (or [T]) -> one text per row, what the image-text-to-text pipeline shows."""
        rows = generated_outputs.tolist() if torch.is_tensor(generated_outputs) else list(generated_outputs)
        rows = rows if rows and isinstance(rows[0], list) else [rows]
        return self.batch_decode(rows, skip_special_tokens=skip_special_tokens, **kwargs)
