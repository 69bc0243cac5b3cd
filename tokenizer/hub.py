"""Every tokenizer kind's Hub side: its model card and push_to_hub (loading by Hub id: semhitok.common.hub)."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

from semhitok.common.hub import push_folder
from semhitok.common.model_card import training_sources, write_model_card

USAGE = """```python
from semhitok.tokenizer import load_tokenizer, preprocess
from PIL import Image

tok = load_tokenizer("{repo}")  # a Hub id (huggingface_hub's cache) or a local directory
ids = tok.encode(preprocess([Image.open("photo.jpg").convert("RGB")], tok.image_size))  # [1, h, w] ([1, h, w, L]: L codes)
images = tok.decode(ids)  # [1, 3, H, W] in [-1, 1]
```"""


# kind -> (the card's title, what the tokenizer is: one line)
KIND_CARDS = {
    "semhitok": ("SemHiTok", "SemHiTok image tokenizer (arXiv 2503.06764)"),
    "dualtoken": ("DualToken", "DualToken image tokenizer (arXiv 2503.14324): one SigLIP tower, a residual-quantized "
                               "semantic and pixel vocabulary, several codes per position"),
    "toklip": ("TokLIP", "TokLIP image tokenizer (arXiv 2505.05422): VQGAN ids read by a causal token encoder "
                         "aligned with a SigLIP teacher"),
}


def write_tokenizer_card(folder: Path, target: Path | None = None, repo: str | None = None) -> Path:
    """README.md for a tokenizer directory of any kind, from its config.json; `target`: where the directory will
    live (finds the run's config and eval summary)."""
    meta = json.loads((Path(folder) / "config.json").read_text())
    teacher = None if meta.get("teacher") == "random" else meta.get("teacher")
    kind = meta.get("model_type")
    if kind != "semhitok":
        title, about = KIND_CARDS.get(kind, (str(kind), f"{kind} image tokenizer"))
        return write_model_card(folder, title=f"{title} image tokenizer", pipeline_tag="image-feature-extraction",
                                about=[about, "", f"- teacher: {teacher or 'a randomly initialised SigLIP (tiny preset)'}",
                                       f"- trained stages: {meta.get('trained_stages')}"],
                                usage=USAGE.format(repo=repo or "ORG/NAME"), base_model=teacher,
                                tags=["image-tokenizer", "vq", kind], sources=training_sources(target or folder),
                                run_dir=target or folder)
    siglip = meta.get("siglip_config") or {}
    size, patch = siglip.get("image_size", 0), siglip.get("patch_size", 1)
    m = 1 if meta.get("fusion") == "semantic_only" else meta.get("pix_codes_per_group")
    about = [
        "SemHiTok image tokenizer: a semantic branch (SigLIP student, semantic-priority codebook) and a pixel branch "
        "(semantic-guided hierarchical codebook), one id per patch.",
        "",
        f"- image size {size} px, {size // patch}x{size // patch} ids per image",
        f"- vocabulary {meta.get('sem_codebook_size', 0) * m:,} ids = {meta.get('sem_codebook_size'):,} semantic codes x "
        f"{m} pixel codes (fusion: {meta.get('fusion')})",
        f"- semantic teacher: {teacher or 'a randomly initialised SigLIP (tiny preset)'}",
        f"- trained stages: {meta.get('trained_stages')}",
    ]
    return write_model_card(folder, title="SemHiTok image tokenizer", about=about, pipeline_tag="image-feature-extraction",
                            usage=USAGE.format(repo=repo or "ORG/NAME"), base_model=teacher, tags=["image-tokenizer", "vq"],
                            sources=training_sources(target or folder), run_dir=target or folder)


def push_tokenizer(model, repo_id: str, private: bool | None = None, token: str | None = None, api=None) -> str:
    """A fresh export of `model` (any kind: weights, config, card) uploaded to `repo_id` -> the commit URL."""
    with tempfile.TemporaryDirectory(prefix="semhitok-push-") as tmp:
        out = Path(tmp) / "export"
        model.save_pretrained(out)
        write_tokenizer_card(out, repo=repo_id)
        return push_folder(out, repo_id, private, token, api=api)


class PushToHubMixin:
    """push_to_hub for every tokenizer kind (a VisualTokenizer's save_pretrained, then the card, then the upload)."""

    def push_to_hub(self, repo_id: str, private: bool | None = None, token: str | None = None) -> str:
        """Upload a fresh export (weights, config, model card) to the Hub repo `repo_id` -> the commit URL."""
        return push_tokenizer(self, repo_id, private, token)
