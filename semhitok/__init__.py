"""SemHiTok: one discrete image tokenizer for understanding and generation, and the stack around it.

Subpackages map onto the repository's top-level folders:
    semhitok.tokenizer       <- tokenizer/        (SemHiTok model, training, encode/decode API)
    semhitok.data_pipelines  <- data_pipelines/   (pre-tokenization, sequence building, packing)
    semhitok.mllm            <- mllm/             (Qwen2.5 with the visual vocabulary, trainer, sampling)
    semhitok.eval            <- eval/             (metrics and benchmark harnesses; nothing imports it)

Shipped files (presets `configs/`, DeepSpeed JSONs `configs/deepspeed/`, the sample `data/`) live at the
repository root in a checkout and inside the package (`semhitok/configs`, `semhitok/data`) in a wheel;
RESOURCE_ROOT is whichever of the two holds them, so `RESOURCE_ROOT / "configs"` works in both.
"""

from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

try:
    __version__ = version("semhitok")
except PackageNotFoundError:  # imported from a checkout that was never installed
    __version__ = "0.1.0"

PACKAGE_DIR = Path(__file__).resolve().parent
REPO_ROOT = PACKAGE_DIR.parent  # the checkout (meaningful only when IS_CHECKOUT)
IS_CHECKOUT = (REPO_ROOT / "pyproject.toml").is_file() and (REPO_ROOT / "configs").is_dir()
RESOURCE_ROOT = REPO_ROOT if IS_CHECKOUT else PACKAGE_DIR
CONFIG_DIR = RESOURCE_ROOT / "configs"
