"""SemHiTok: one discrete image tokenizer for understanding and generation, and the stack around it.

Subpackages map onto the repository's top-level folders:
    semhitok.tokenizer       <- tokenizer/        (SemHiTok model, training, encode/decode API)
    semhitok.data_pipelines  <- data_pipelines/   (pre-tokenization, sequence building, packing)
    semhitok.mllm            <- mllm/             (Qwen2.5 with the visual vocabulary, trainer, sampling)
    semhitok.eval            <- eval/             (metrics and benchmark harnesses; nothing imports it)
"""

from pathlib import Path

__version__ = "0.1.0"

REPO_ROOT = Path(__file__).resolve().parent.parent
CONFIG_DIR = REPO_ROOT / "configs"
