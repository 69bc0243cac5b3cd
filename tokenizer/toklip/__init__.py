"""TokLIP (Lin et al.): a frozen VQGAN's codes semanticized by a causal ViT token encoder (see model.py)."""
