"""SemHiTok processor for transformers' remote code: AutoProcessor.from_pretrained(dir, trust_remote_code=True).

Self-contained (torch, transformers, safetensors, PIL, numpy). (text with one "<image>" per image, images) ->
input_ids where each "<image>" becomes <|vision_start|> visual ids <|vision_end|>, the ids coming from the
encoding half of the SemHiTok tokenizer in the export's visual_tokenizer/ (SigLIP student + semantic codebook,
pixel encoder + hierarchical codebook: id = semantic id * m + pixel id). Decoding ids to pixels is not here:
use semhitok (`semhitok.tokenizer.load_tokenizer(dir + "/visual_tokenizer").decode(ids)`).

    processor = AutoProcessor.from_pretrained(d, trust_remote_code=True)
    model = AutoModelForCausalLM.from_pretrained(d, trust_remote_code=True)
    prompt = processor.apply_chat_template([{"role": "user", "content": "<image>\\nWhat is in the picture?"}])
    inputs = processor(text=prompt, images=Image.open("photo.jpg"))
    out = model.generate(**inputs)   # stops at <|im_end|> / <|endoftext|> (generation_config.json)
    print(processor.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True))
"""

import json

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file
from transformers import AutoTokenizer, SiglipVisionConfig, SiglipVisionModel
from transformers.utils import cached_file

IMAGE = "<image>"
VISUAL = "visual_tokenizer"


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
        self.m = 1 if self.semantic_only else cfg["pix_codes_per_group"]
        k = cfg["sem_codebook_size"]
        self.semantic = nn.Module()
        self.semantic.encoder = SiglipVisionModel(siglip)
        self.semantic.to_code = nn.Linear(siglip.hidden_size, cfg["sem_code_dim"])
        self.semantic.codebook = nn.Module()
        self.semantic.codebook.register_buffer("embed", torch.zeros(k, cfg["sem_code_dim"]))
        if not self.semantic_only:
            width = cfg.get("pix_width") or cfg["pix_encoder_width"]
            heads = cfg.get("pix_heads") or cfg["pix_encoder_heads"]
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
        group = l2norm(self.pixel.codebook.codes.float()[sem])  # [B, N, m, d]: the patch's own sub-codebook
        pix = torch.einsum("bnd,bnmd->bnm", zp, group).argmax(-1)
        return sem * self.m + pix


def to_rgb(img: Image.Image, size: int) -> Image.Image:
    """As semhitok reads images: a large JPEG decoded at the smallest DCT scale keeping both sides >= size,
    transparency over white. (16-bit and float modes are not rescaled here as semhitok does.)"""
    if img.format == "JPEG" and min(img.size) >= 2 * size:
        img.draft("RGB", (size, size))
    if img.mode in ("RGBA", "LA", "PA", "La", "RGBa") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("RGB")
    return img.convert("RGB")


def square(img: Image.Image, size: int, mode: str) -> Image.Image:
    """pad: pad to square with the image's mean colour, then resize (understanding); crop: centre crop."""
    img = to_rgb(img, size)
    w, h = img.size
    if mode == "pad":
        if w != h:
            fill = tuple(int(round(c)) for c in np.asarray(img, dtype=np.float64).reshape(-1, 3).mean(0))
            canvas = Image.new("RGB", (max(w, h), max(w, h)), fill)
            canvas.paste(img, ((max(w, h) - w) // 2, (max(w, h) - h) // 2))
            img = canvas
        return img.resize((size, size), Image.BICUBIC)
    scale = size / min(w, h)
    nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
    img = img.resize((nw, nh), Image.BICUBIC)
    left, top = (nw - size) // 2, (nh - size) // 2
    return img.crop((left, top, left + size, top + size))


class SemHiTokProcessor:
    """Text tokenizer + visual encoder -> model inputs (input_ids, attention_mask)."""

    def __init__(self, tokenizer, visual: VisualEncoder, text_vocab_size: int, image_start: int, image_end: int,
                 image_mode: str = "pad"):
        self.tokenizer, self.visual = tokenizer, visual
        self.text_vocab_size, self.image_start, self.image_end, self.image_mode = text_vocab_size, image_start, image_end, image_mode

    @classmethod
    def register_for_auto_class(cls, auto_class: str = "AutoProcessor") -> None:
        pass  # AutoProcessor calls this on remote classes; nothing to register

    @classmethod
    def from_pretrained(cls, name_or_path, **kwargs) -> "SemHiTokProcessor":
        hub = {k: kwargs[k] for k in ("cache_dir", "revision", "token", "local_files_only") if k in kwargs}
        with open(cached_file(name_or_path, "processor_config.json", **hub)) as f:
            cfg = json.load(f)
        with open(cached_file(name_or_path, f"{VISUAL}/config.json", **hub)) as f:
            visual = VisualEncoder(json.load(f)).load(cached_file(name_or_path, f"{VISUAL}/model.safetensors", **hub))
        tokenizer = AutoTokenizer.from_pretrained(name_or_path, trust_remote_code=kwargs.get("trust_remote_code"), **hub)
        return cls(tokenizer, visual, cfg["text_vocab_size"], cfg["image_start"], cfg["image_end"], cfg.get("image_mode", "pad"))

    def encode_images(self, images: list) -> torch.Tensor:
        """PIL images -> visual ids [B, N] in [0, K*m)"""
        size = self.visual.image_size
        arrays = [np.asarray(square(img, size, self.image_mode), dtype=np.float32) / 127.5 - 1.0 for img in images]
        batch = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()
        return self.visual(batch.to(next(self.visual.parameters()).device)).cpu()

    def __call__(self, text, images=None, return_tensors: str = "pt", **pad_kwargs):
        """text: a string or a list (one row each); images: a PIL image or a list, one per "<image>" in order."""
        texts = [text] if isinstance(text, str) else list(text)
        images = [] if images is None else [images] if isinstance(images, Image.Image) else list(images)
        images = [img for item in images for img in (item if isinstance(item, (list, tuple)) else [item])]
        marked = "".join(self.tokenizer.convert_ids_to_tokens([self.image_start, self.image_end]))
        rows = [self.tokenizer(t.replace(IMAGE, marked))["input_ids"] for t in texts]
        n_spans = sum(row.count(self.image_start) for row in rows)
        if n_spans != len(images):
            raise ValueError(f"the text has {n_spans} image place(s) ({IMAGE} or <|vision_start|>), {len(images)} image(s) given")
        ids = iter(self.encode_images(images) + self.text_vocab_size if images else [])
        rows = [[x for tok in row for x in ([tok, *next(ids).tolist()] if tok == self.image_start else [tok])] for row in rows]
        return self.tokenizer.pad({"input_ids": rows}, padding=True, return_tensors=return_tensors, **pad_kwargs)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True, **kwargs) -> str:
        """The tokenizer's chat format as text; put "<image>" in a message where its image goes."""
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt, **kwargs)

    def decode(self, ids, **kwargs) -> str:
        """Text ids -> text (visual ids, which only an image span holds, are left out)."""
        ids = ids.tolist() if torch.is_tensor(ids) else list(ids)
        return self.tokenizer.decode([i for i in ids if i < len(self.tokenizer)], **kwargs)

    def batch_decode(self, rows, **kwargs) -> list[str]:
        return [self.decode(row, **kwargs) for row in rows]
