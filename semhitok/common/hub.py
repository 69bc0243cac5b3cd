"""Hugging Face Hub: load a tokenizer or MLLM by repo id or path, push an export.

    resolve_pretrained("runs/tiny/mllm/final")   # an existing directory: used as is
    resolve_pretrained("org/semhitok-tiny")       # a Hub repo: huggingface_hub's cache (HF_HOME, HF_HUB_CACHE,
                                                  # HF_ENDPOINT, HF_HUB_OFFLINE honoured), downloaded when online
    push_folder(export_dir, "org/name")           # create the repo (if needed) and upload the directory

Offline with the repo not in the cache, loading fails with one line naming the download to run elsewhere.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

MLLM_MODEL_TYPE = "semhitok_mllm"
REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def resolve_pretrained(name_or_path: str | Path, revision: str | None = None) -> Path:
    """A local directory -> itself; an `org/name` Hub id -> the local snapshot directory (cached or downloaded)."""
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return path
    name = str(name_or_path)
    if path.exists() or not REPO_ID.match(name):
        raise FileNotFoundError(f"{name}: no such model directory (and not a Hub repo id of the form org/name)")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError

    try:
        return Path(snapshot_download(name, revision=revision))
    except (RepositoryNotFoundError, RevisionNotFoundError) as err:
        raise FileNotFoundError(f"{name}: not a local directory, and the Hub has no such repo/revision "
                                f"({type(err).__name__})") from None
    except (LocalEntryNotFoundError, HfHubHTTPError, OSError) as err:
        from semhitok.tokenizer.model import WeightsUnavailable  # here: tokenizer.model imports this module

        raise WeightsUnavailable(f"{name} is neither a local directory nor in the Hugging Face cache, and the Hub is not "
                                 f"reachable ({type(err).__name__}): on a machine with network run `hf download {name} "
                                 f"--local-dir /path/{name.split('/')[-1]}` and pass that directory") from None


def export_base_config(path: str | Path):
    """The base LLM's transformers config of a semhitok MLLM export (config.json's text_config), else None.

    Such a config.json is model_type "semhitok_mllm" with an auto_map to remote code: anything that only needs
    the base LLM's config (the text tokenizer, the LLM weights) is given this one instead of asking for it."""
    config_file = Path(path) / "config.json"
    try:
        meta = json.loads(config_file.read_text())
    except (OSError, ValueError, UnicodeDecodeError):
        return None
    base = meta.get("text_config") if isinstance(meta, dict) and meta.get("model_type") == MLLM_MODEL_TYPE else None
    if not isinstance(base, dict) or "model_type" not in base:
        return None
    from transformers import AutoConfig

    base = dict(base)
    return AutoConfig.for_model(base.pop("model_type"), **base)


def push_folder(folder: str | Path, repo_id: str, private: bool | None = None, token: str | None = None,
                commit_message: str | None = None, api=None) -> str:
    """Create `repo_id` (a model repo; kept if it exists) and upload `folder` in one commit -> the commit URL.
    `api`: an HfApi (default: a new one with `token`)."""
    if not REPO_ID.match(repo_id):
        raise ValueError(f"{repo_id!r} is not a Hub repo id of the form org/name")
    if api is None:
        from huggingface_hub import HfApi

        api = HfApi(token=token)
    api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True, token=token)
    info = api.upload_folder(repo_id=repo_id, folder_path=str(folder), repo_type="model", token=token,
                             commit_message=commit_message or f"Upload {Path(folder).name} (semhitok export)")
    return str(getattr(info, "commit_url", info))
