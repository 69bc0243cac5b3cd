"""SemHiTok (arXiv 2503.06764), the stack's own tokenizer kind beside dualtoken/ and toklip/: model.py (a
semantic branch with the semantic-priority codebook, a pixel branch with the semantic-guided hierarchical
codebook) and train.py (stage 1 and stage 2 tasks in tokenizer/trainer.py's loop)."""
