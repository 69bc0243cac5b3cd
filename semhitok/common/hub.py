"""Hugging Face Hub: load a tokenizer or MLLM by repo id or path, push an export.

    resolve_pretrained("runs/tiny/mllm/final")   # an existing directory: used as is
    resolve_pretrained("org/semhitok-tiny")       # a Hub repo: huggingface_hub's cache (HF_HOME, HF_HUB_CACHE,
                                                  # HF_ENDPOINT, HF_HUB_OFFLINE honoured), downloaded when online
    push_folder(export_dir, "org/name")           # create the repo (if needed) and upload the directory
    push_export(export_dir, "org/name", write_card)   # the same with a fresh card; the export's README.md
                                                      # becomes that card only once the upload succeeded

Offline with the repo not in the cache, loading fails with one line naming the download to run elsewhere; an
upload that cannot reach the Hub (or that the Hub refuses) raises PushFailed, one line saying what to do.
"""

from __future__ import annotations

import importlib
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Callable

from semhitok.common.io import loads_json

MLLM_MODEL_TYPE = "semhitok_mllm"
REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


class WeightsUnavailable(RuntimeError):
    """Pretrained weights could not be loaded (typically: offline and not in the local cache)."""


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
        raise WeightsUnavailable(f"{name} is neither a local directory nor in the Hugging Face cache, and the Hub is not "
                                 f"reachable ({type(err).__name__}): on a machine with network run `hf download {name} "
                                 f"--local-dir /path/{name.split('/')[-1]}` and pass that directory") from None


# A transformers LLM config's sizes: each an int >= 1 when present (num_hidden_layers=-1 or 0 would build a model of
# no layers, or fail inside transformers' validators with a multi-line error)
LLM_SIZES = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
             "num_key_value_heads", "max_position_embeddings", "head_dim")


def llm_config(base: dict, where: str, **extra):
    """A base LLM's config dict (with its model_type) -> its transformers config; ValueError (one line naming
    `where` and the field) for a config that is not an object, a size that is not an int >= 1, or one that
    transformers refuses."""
    if not isinstance(base, dict) or not isinstance(base.get("model_type"), str):
        raise ValueError(f"{where}: must be an object with a model_type (llama, qwen2, ...), got {type(base).__name__}")
    for key in LLM_SIZES:
        value = base.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ValueError(f"{where}: {key} must be an integer >= 1, got {value!r}")
    from transformers import AutoConfig

    base = dict(base)
    try:
        return AutoConfig.for_model(base.pop("model_type"), **base, **extra)
    except Exception as err:  # noqa: BLE001 (transformers raises ValueError, TypeError, KeyError and its validators' own)
        text = "; ".join(line.strip() for line in str(err).splitlines() if line.strip())[:300]
        raise ValueError(f"{where}: not a usable config ({type(err).__name__}: {text})") from None


def export_base_config(path: str | Path):
    """The base LLM's transformers config of a semhitok MLLM export (config.json's text_config), else None.

    Such a config.json is model_type "semhitok_mllm" with an auto_map to remote code: anything that only needs
    the base LLM's config (the text tokenizer, the LLM weights) is given this one instead of asking for it. A
    text_config that is present but unusable is a ValueError naming the file (llm_config)."""
    config_file = Path(path) / "config.json"
    try:
        meta = loads_json(config_file.read_bytes(), str(config_file))
    except (OSError, ValueError):
        return None
    if not isinstance(meta, dict) or meta.get("model_type") != MLLM_MODEL_TYPE or "text_config" not in meta:
        return None
    return llm_config(meta["text_config"], f"{config_file}: text_config")


class PushFailed(Exception):
    """An upload that did not happen: the Hub unreachable (no network, HF_HUB_OFFLINE set) or refusing (token)."""


def connection_errors() -> tuple[type[BaseException], ...]:
    """What huggingface_hub lets through when the Hub cannot be reached: ConnectionError (OfflineModeIsEnabled
    too), timeouts, and the errors of its HTTP client (requests, httpx for huggingface_hub 1.x, httpx2 for 2.x)."""
    errors: list[type[BaseException]] = [ConnectionError, TimeoutError]
    for client, name in (("requests", "RequestException"), ("httpx", "RequestError"), ("httpx2", "RequestError")):
        try:
            errors.append(getattr(importlib.import_module(client), name))
        except ImportError:
            pass
    return tuple(errors)


def push_failure(err: BaseException, repo_id: str) -> str:
    """One line: why an upload to repo_id failed and what to do."""
    from huggingface_hub import constants
    from huggingface_hub.errors import HfHubHTTPError, LocalTokenNotFoundError, OfflineModeIsEnabled

    reason = f"{type(err).__name__}: {(str(err).strip().splitlines() or [''])[0]}"
    if isinstance(err, OfflineModeIsEnabled):
        return f"upload to {repo_id}: HF_HUB_OFFLINE is set; unset it to upload"
    if isinstance(err, LocalTokenNotFoundError):
        return f"upload to {repo_id}: no Hub token; pass --token, set HF_TOKEN or run `hf auth login`"
    if isinstance(err, HfHubHTTPError):
        return f"upload to {repo_id} refused ({reason}): check the repo id and the token (--token, HF_TOKEN)"
    if isinstance(err, connection_errors()):
        return (f"upload to {repo_id}: the Hub at {constants.ENDPOINT} is not reachable ({reason}); check the network "
                "(or HF_ENDPOINT)")
    return f"upload to {repo_id} failed ({reason})"


def push_folder(folder: str | Path, repo_id: str, private: bool | None = None, token: str | None = None,
                commit_message: str | None = None, api=None) -> str:
    """Create `repo_id` (a model repo; kept if it exists) and upload `folder` in one commit -> the commit URL.
    `api`: an HfApi (default: a new one with `token`). Raises PushFailed when the Hub is unreachable or refuses."""
    if not REPO_ID.match(repo_id):
        raise ValueError(f"{repo_id!r} is not a Hub repo id of the form org/name")
    if api is None:
        from huggingface_hub import HfApi

        api = HfApi(token=token)
    try:
        api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True, token=token)
        info = api.upload_folder(repo_id=repo_id, folder_path=str(folder), repo_type="model", token=token,
                                 commit_message=commit_message or f"Upload {Path(folder).name} (semhitok export)")
    except (OSError, *connection_errors()) as err:  # huggingface_hub's own errors are OSErrors
        raise PushFailed(push_failure(err, repo_id)) from err
    return str(getattr(info, "commit_url", info))


def push_export(folder: str | Path, repo_id: str, write_card: Callable[..., Path], private: bool | None = None,
                token: str | None = None, api=None) -> tuple[str, Path]:
    """Upload an export with a fresh model card -> (commit URL, the export's card).

    The card (write_card(staging, folder, repo=repo_id), as write_mllm_card and write_tokenizer_card) is written
    into a staging folder of links to the export's files and uploaded from there; the export's own README.md is
    replaced by it only after the upload succeeded."""
    folder = Path(folder)
    with tempfile.TemporaryDirectory(prefix="semhitok-push-") as tmp:
        staging = Path(tmp) / folder.name
        staging.mkdir()
        for path in sorted(folder.rglob("*")):
            link = staging / path.relative_to(folder)
            if path.is_dir():
                link.mkdir(parents=True, exist_ok=True)
            elif path.parent != folder or path.name != "README.md":  # the card is written here, not through a link
                link.parent.mkdir(parents=True, exist_ok=True)
                os.symlink(path.resolve(), link)
        card = write_card(staging, folder, repo=repo_id)
        url = push_folder(staging, repo_id, private, token, api=api)
        shutil.copyfile(card, folder / card.name)
    return url, folder / card.name
