"""Hub ids (`org/name`): the files calibration reads, and only those, through huggingface_hub.

First the small files (config, tokenizer, generation config, the weights' index), so that a
model the calibrator refuses costs no download; then, once everything the config allows has
been checked, the weight files the index names (or the single `model.safetensors`). A GGUF
file in a hub repository is fetched alone and at once: its config is inside it. When the
hub cannot be reached (HF_HUB_OFFLINE=1, no network), the files come from the local cache, and
one error names whatever is missing there.
"""

from __future__ import annotations

import json
from pathlib import Path

from .loading import ModelLoadError
from .shards import SAFETENSORS_INDEX, SINGLE_FILE
from .source import BIN_FILE, BIN_INDEX

CONFIG_FILE = "config.json"
METADATA_FILES = [
    CONFIG_FILE, "generation_config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
    "added_tokens.json", "tokenizer.model", "vocab.json", "vocab.txt", "merges.txt", "chat_template.jinja",
    "chat_template.json", SAFETENSORS_INDEX, BIN_INDEX,
]


def is_hub_id(model: str) -> bool:
    """`org/name` that is not a path on this machine."""
    return not Path(model).expanduser().exists() and not model.startswith((".", "/", "~")) and model.count("/") == 1


def fetch_metadata(repo_id: str) -> Path:
    """The local snapshot folder of `repo_id` holding its config and tokenizer files."""
    return fetch_files(repo_id, METADATA_FILES, required=[CONFIG_FILE])


def fetch_files(repo_id: str, files: list[str], required: list[str] | None = None) -> Path:
    """The local snapshot folder of `repo_id` holding those of `files` that it has; every one of
    `required` (default: all of `files`) must be among them."""
    folder = _snapshot(repo_id, files)
    _require(repo_id, folder, files if required is None else required)
    return folder


def fetch_weights(model: str, folder: Path) -> None:
    """Bring the hub model's weight files into its snapshot `folder`."""
    if (folder / SAFETENSORS_INDEX).is_file() or (folder / BIN_INDEX).is_file():
        fetch_files(model, _indexed_files(folder))
        return
    for single in (SINGLE_FILE, BIN_FILE):  # the .bin only where there is no safetensors file
        _snapshot(model, [single])
        if (folder / single).is_file():
            return
    _require(model, folder, [SINGLE_FILE])


def _indexed_files(folder: Path) -> list[str]:
    index = folder / (SAFETENSORS_INDEX if (folder / SAFETENSORS_INDEX).is_file() else BIN_INDEX)
    try:
        return sorted(set(json.loads(index.read_text())["weight_map"].values()))
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise ModelLoadError(f"{index} is not a weights index ({exc}); fetch it again") from None


def _snapshot(repo_id: str, files: list[str]) -> Path | None:
    """Download `files` of `repo_id` that exist there (or find them in the cache when the hub
    cannot be reached); the snapshot folder, or None when the cache has none."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import GatedRepoError, LocalEntryNotFoundError, RepositoryNotFoundError

    try:
        return Path(snapshot_download(repo_id, allow_patterns=files))
    except LocalEntryNotFoundError as exc:  # offline: nothing cached, or a partial snapshot
        snapshot = getattr(exc, "snapshot_path", None)
        return Path(snapshot) if snapshot else None
    except GatedRepoError:
        raise ModelLoadError(f"{repo_id} is a gated model on the Hugging Face hub: accept its terms on the hub and "
                             "log in (hf auth login), or pass a local model folder") from None
    except RepositoryNotFoundError:
        raise ModelLoadError(f"the Hugging Face hub has no model {repo_id} (or it is private: log in with hf auth "
                             "login); pass an existing hub id or a local model folder") from None


def _require(repo_id: str, folder: Path | None, files: list[str]) -> None:
    missing = files if folder is None else [name for name in files if not (folder / name).is_file()]
    if missing:
        from huggingface_hub import constants

        raise ModelLoadError(
            f"{repo_id} is not a local folder, and {', '.join(missing)} of it could not be fetched from the Hugging "
            f"Face hub nor found in the cache ({constants.HF_HUB_CACHE}); connect to the hub (HF_HUB_OFFLINE unset), "
            f"or download them there with: hf download {repo_id} {' '.join(missing)}"
        )
