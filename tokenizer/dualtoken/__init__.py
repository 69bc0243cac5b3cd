"""DualToken (arXiv 2503.14324): one SigLIP tower, shallow layers -> pixel vocabulary, deep layer -> semantic
vocabulary, both residual-quantized. config.py (architecture + loss weights), quantizer.py (residual VQ),
model.py (the VisualTokenizer), train.py (its task in tokenizer/trainer.py's loop)."""
