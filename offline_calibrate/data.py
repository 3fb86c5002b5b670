"""Calibration and evaluation text: local .txt/.jsonl/.json files, `datasets` names, or random tokens.

The same dataset, seed, sample count and length always give the same token windows.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

RANDOM_DATASET = "random"
MAX_UNPRINTABLE_FRACTION = 0.01  # real text has almost no control characters
_PRINTABLE_SAMPLE_CHARS = 1_000_000
_LOG = logging.getLogger(__name__)


class DatasetError(ValueError):
    pass


def read_text(dataset: str) -> str:
    """The text of a local .txt/.jsonl/.json file, or of a `datasets` name (when reachable)."""
    path = Path(dataset)
    if path.exists():
        if path.is_dir():
            raise DatasetError(f"dataset {dataset!r} is a directory; pass a .txt, .jsonl or .json file")
        raw = _decode(path.read_bytes(), dataset)
        if path.suffix == ".jsonl":
            text = _jsonl_text(raw, dataset)
        elif path.suffix == ".json":
            text = _json_text(raw, dataset)
        else:
            text = raw
    else:
        text = _hub_text(dataset)
    if not text.strip():
        raise DatasetError(f"dataset {dataset!r} is empty: it holds no text to calibrate or evaluate on")
    _check_printable(text, dataset)
    return text


def _decode(data: bytes, name: str) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise DatasetError(
            f"dataset {name!r} is not UTF-8 text (byte {exc.start} is {data[exc.start]:#04x}); pass a text file "
            "(.txt, .jsonl or .json), not a binary one"
        ) from None


def _check_printable(text: str, name: str) -> None:
    """Refuse text that is mostly control characters (a binary file that happens to decode)."""
    sample = text[:_PRINTABLE_SAMPLE_CHARS]
    unprintable = sum(1 for ch in sample if not (ch.isprintable() or ch.isspace()))
    if unprintable > MAX_UNPRINTABLE_FRACTION * len(sample):
        raise DatasetError(
            f"dataset {name!r} does not look like text: {unprintable} of its first {len(sample)} characters "
            "are control characters; pass a text file (.txt, .jsonl or .json)"
        )


def _json_text(raw: str, name: str) -> str:
    """A .json file: a list of records (strings or objects with a 'text' field), or JSON lines."""
    try:
        records = json.loads(raw)
    except json.JSONDecodeError:
        return _jsonl_text(raw, name)  # JSON lines saved as .json; its errors name the line
    if not isinstance(records, list):
        raise DatasetError(
            f"{name} holds a JSON {type(records).__name__}; it must be a list of records (strings or objects "
            "with a 'text' field), or one record per line"
        )
    return "\n\n".join(_record_text(record, f"{name}: record {i}") for i, record in enumerate(records, start=1))


def _jsonl_text(raw: str, name: str) -> str:
    docs = []
    for number, line in enumerate(raw.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DatasetError(f"{name}:{number} is not valid JSON ({exc.msg})") from None
        docs.append(_record_text(record, f"{name}:{number}"))
    return "\n\n".join(docs)


def _record_text(record, where: str) -> str:
    text = record.get("text") if isinstance(record, dict) else record
    if not isinstance(text, str):
        raise DatasetError(f"{where} has no string field 'text'")
    return text


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
    """All tokens of the text, without special tokens, as a 1-D long tensor. (The whole text is
    one sequence on purpose, cut into windows later; verbose=False keeps the tokenizer from
    warning that it is longer than the model's maximum.)"""
    ids = tokenizer(text, add_special_tokens=False, return_attention_mask=False, verbose=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.long)


def windows(tokens: torch.Tensor, seq_len: int, bos_token_id: int | None) -> torch.Tensor:
    """Non-overlapping windows [n, seq_len]; each starts with BOS when the model has one."""
    if seq_len < 2:
        raise DatasetError(f"--seq-len must be at least 2 (a token and the next one to predict), got {seq_len}")
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
