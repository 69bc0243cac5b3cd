"""The tokenizer's Hub side: its model card and push_to_hub (loading by Hub id: semhitok.common.hub)."""

from __future__ import annotations

import tempfile
from pathlib import Path

from semhitok.common.hub import push_folder
from semhitok.common.model_card import training_sources, write_model_card

USAGE = """```python
from semhitok.tokenizer import load_tokenizer, preprocess
from PIL import Image

tok = load_tokenizer("{repo}")  # a Hub id (huggingface_hub's cache) or a local directory
ids = tok.encode(preprocess([Image.open("photo.jpg").convert("RGB")], tok.image_size))  # [1, h, w], id = sem * m + pix
images = tok.decode(ids)  # [1, 3, H, W] in [-1, 1]
```"""


def write_tokenizer_card(folder: Path, model, target: Path | None = None, repo: str | None = None) -> Path:
    """README.md for a SemHiTok directory; `target`: where the directory will live (finds the run's config/eval)."""
    cfg = model.config
    teacher = None if cfg.teacher == "random" else cfg.teacher
    about = [
        "SemHiTok image tokenizer: a semantic branch (SigLIP student, semantic-priority codebook) and a pixel branch "
        "(semantic-guided hierarchical codebook), one id per patch.",
        "",
        f"- image size {model.image_size} px, {model.grid}x{model.grid} ids per image",
        f"- vocabulary {cfg.vocab_size:,} ids = {cfg.sem_codebook_size:,} semantic codes x {cfg.codes_per_group} pixel codes "
        f"(fusion: {cfg.fusion})",
        f"- semantic teacher: {teacher or 'a randomly initialised SigLIP (tiny preset)'}",
        f"- trained stages: {model.trained_stages}",
    ]
    return write_model_card(folder, title="SemHiTok image tokenizer", about=about, pipeline_tag="image-feature-extraction",
                            usage=USAGE.format(repo=repo or "ORG/NAME"), base_model=teacher, tags=["image-tokenizer", "vq"],
                            datasets=training_sources(target or folder), run_dir=target or folder)


def push_tokenizer(model, repo_id: str, private: bool | None = None, token: str | None = None, api=None) -> str:
    """A fresh export of `model` (weights, config, card) uploaded to `repo_id` -> the commit URL."""
    with tempfile.TemporaryDirectory(prefix="semhitok-push-") as tmp:
        out = Path(tmp) / "export"
        model.save_pretrained(out)
        write_tokenizer_card(out, model, repo=repo_id)
        return push_folder(out, repo_id, private, token, api=api)
