"""Calibration and evaluation text: local text/jsonl files, `datasets` names, or random tokens.

The same dataset, seed, sample count and length always give the same token windows.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

RANDOM_DATASET = "random"
_LOG = logging.getLogger(__name__)


class DatasetError(ValueError):
    pass


def read_text(dataset: str) -> str:
    """The text of a local .txt/.jsonl file, or of a `datasets` name (when reachable)."""
    path = Path(dataset)
    if path.exists():
        if path.is_dir():
            raise DatasetError(f"dataset {dataset!r} is a directory; pass a .txt or .jsonl file")
        raw = path.read_text(encoding="utf-8", errors="replace")
        text = _jsonl_text(raw, dataset) if path.suffix == ".jsonl" else raw
    else:
        text = _hub_text(dataset)
    if not text.strip():
        raise DatasetError(f"dataset {dataset!r} is empty: it holds no text to calibrate or evaluate on")
    return text


def _jsonl_text(raw: str, name: str) -> str:
    docs = []
    for number, line in enumerate(raw.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DatasetError(f"{name}:{number} is not valid JSON ({exc.msg})") from None
        text = record.get("text") if isinstance(record, dict) else record
        if not isinstance(text, str):
            raise DatasetError(f"{name}:{number} has no string field 'text'")
        docs.append(text)
    return "\n\n".join(docs)


def _hub_text(name: str) -> str:
    try:
        import datasets
    except ImportError:
        raise DatasetError(
            f"dataset {name!r} is not a local file, and the `datasets` package is not installed "
            "to fetch it by name; pass a .txt/.jsonl file or 'random'"
        ) from None
    config, _, split = name.partition(":")[2].partition(":")
    try:
        data = datasets.load_dataset(name.partition(":")[0], config or None, split=split or "train")
    except Exception as exc:  # the hub raises many types; all mean "cannot get it"
        raise DatasetError(f"dataset {name!r} could not be loaded ({type(exc).__name__}: {exc})") from None
    return "\n\n".join(t for t in data["text"] if t)


def tokenize(text: str, tokenizer) -> torch.Tensor:
    """All tokens of the text, without special tokens, as a 1-D long tensor."""
    ids = tokenizer(text, add_special_tokens=False, return_attention_mask=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.long)


def windows(tokens: torch.Tensor, seq_len: int, bos_token_id: int | None) -> torch.Tensor:
    """Non-overlapping windows [n, seq_len]; each starts with BOS when the model has one."""
    body = seq_len - (bos_token_id is not None)
    n = tokens.numel() // body
    out = tokens[: n * body].reshape(n, body)
    if bos_token_id is not None:
        out = torch.cat([torch.full((n, 1), bos_token_id, dtype=torch.long), out], dim=1)
    return out


def calibration_windows(
    dataset: str, tokenizer, vocab_size: int, samples: int, seq_len: int, seed: int, extra: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """`samples` calibration windows plus `extra` held-out windows of the same kind.

    Windows are drawn without replacement in a seeded random order, so the held-out ones never
    overlap the calibration ones.
    """
    generator = torch.Generator().manual_seed(seed)
    bos = tokenizer.bos_token_id if tokenizer is not None else None
    wanted = samples + extra
    if dataset == RANDOM_DATASET:
        _LOG.warning("calibrating on random tokens: pass --dataset with real text for useful statistics")
        low = len(getattr(tokenizer, "all_special_ids", []) or [])
        body = torch.randint(low, vocab_size, (wanted, seq_len), generator=generator)
        if bos is not None:
            body[:, 0] = bos
        return body[:samples], body[samples:]
    all_windows = windows(tokenize(read_text(dataset), tokenizer), seq_len, bos)
    if all_windows.shape[0] < wanted:
        raise DatasetError(
            f"dataset {dataset!r} gives {all_windows.shape[0]} windows of {seq_len} tokens, but "
            f"{samples} calibration{f' + {extra} held-out' if extra else ''} samples are needed; "
            "use more text, fewer --samples or a shorter --seq-len"
        )
    order = torch.randperm(all_windows.shape[0], generator=generator)[:wanted]
    chosen = all_windows[order]
    return chosen[:samples], chosen[samples:]
