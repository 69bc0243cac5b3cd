"""Real SigLIP checkpoint layouts with random weights: what `hf download google/siglip-*` puts on disk
(a full SiglipModel: text + vision towers, `vision_model.` prefix, nested vision_config), depth cut."""

from pathlib import Path

import torch
from transformers import SiglipConfig, SiglipModel

# the vision_config of each google/siglip-* repo (num_hidden_layers: 24 and 27 there)
VISION = {
    "google/siglip-large-patch16-256": dict(hidden_size=1024, intermediate_size=4096, num_attention_heads=16,
                                            image_size=256, patch_size=16),
    "google/siglip-so400m-patch14-384": dict(hidden_size=1152, intermediate_size=4304, num_attention_heads=16,
                                             image_size=384, patch_size=14),
}
TINY_TEXT = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, vocab_size=64,
                 max_position_embeddings=16)


def vision_config(name: str, layers: int = 1) -> dict:
    return {**VISION[name], "num_hidden_layers": layers}


def siglip_model_dir(name: str, out: Path, layers: int = 1, seed: int = 0) -> SiglipModel:
    """save_pretrained of a random SiglipModel with `name`'s vision tower cut to `layers`; returns the model."""
    torch.manual_seed(seed)
    vision = vision_config(name, layers)
    model = SiglipModel(SiglipConfig(text_config={**TINY_TEXT, "projection_size": vision["hidden_size"]},
                                     vision_config=vision))
    model.save_pretrained(out)
    return model
