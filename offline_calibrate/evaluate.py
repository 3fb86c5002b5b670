"""Perplexity of a plain model (HF folder, hub id, GGUF file) or a GlowQ checkpoint (through the
PyTorch reference forward)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .data import read_text, tokenize, windows
from .loading import check_seq_len, load_config, load_model, load_tokenizer
from .reference import load_reference_model
from .source import ModelSource, fetch_weights, resolve_source


def is_glowq_checkpoint(source: ModelSource) -> bool:
    config = source.folder / "config.json"
    return not source.gguf_file and config.is_file() and "quantization_config" in json.loads(config.read_text())


def load_for_eval(source: ModelSource, seq_len: int):
    """(model, tokenizer) for a GlowQ checkpoint or a plain model (folder or GGUF), in fp32 on
    the CPU. The model comes first: its config and (for a GlowQ checkpoint) every tensor header
    are checked before anything else is read."""
    if is_glowq_checkpoint(source):
        model = load_reference_model(source.folder, torch.float32)
    else:
        config = load_config(source)
        fetch_weights(source)
        model = load_model(source, config, seq_len, dtype=torch.float32)
    return model, load_tokenizer(source)


@torch.no_grad()
def mean_nll(model, batch_windows: torch.Tensor, device: torch.device | str = "cpu", progress: bool = False) -> float:
    """Token-weighted mean next-token NLL (nats) over windows [n, seq_len]."""
    total, count = 0.0, 0
    for window in tqdm(batch_windows, desc="perplexity", unit="window", disable=not progress):
        ids = window.unsqueeze(0).to(device)
        logits = model(ids, use_cache=False).logits[0, :-1].float()
        total += float(F.cross_entropy(logits, ids[0, 1:], reduction="sum"))
        count += ids.shape[1] - 1
    return total / count


def eval_windows(dataset: str, tokenizer, seq_len: int, max_tokens: int | None) -> torch.Tensor:
    """Non-overlapping windows of the dataset (BOS first), at most about max_tokens tokens."""
    tokens = tokenize(read_text(dataset), tokenizer)
    if max_tokens is not None:
        tokens = tokens[:max_tokens]
    out = windows(tokens, seq_len, tokenizer.bos_token_id)
    if out.shape[0] == 0:
        raise ValueError(f"dataset {dataset!r} has fewer tokens than one window of {seq_len}")
    return out


def evaluate(
    model: str | Path | ModelSource, dataset: str, seq_len: int = 512, max_tokens: int | None = None,
    gguf_file: str | None = None,
) -> dict:
    """Perplexity of `model` (a GlowQ checkpoint, or what source.resolve_source takes) on the
    dataset's non-overlapping windows; `nll` is the mean next-token negative log-likelihood in
    nats per predicted token, `perplexity` = exp(nll)."""
    source = resolve_source(model, gguf_file)
    loaded, tokenizer = load_for_eval(source, seq_len)
    check_seq_len(loaded.config, seq_len)
    data = eval_windows(dataset, tokenizer, seq_len, max_tokens)
    nll = mean_nll(loaded, data, progress=True)
    return {
        "model": str(source),
        "kind": "glowq" if is_glowq_checkpoint(source) else "gguf" if source.gguf_file else "hf",
        "dataset": dataset,
        "seq_len": seq_len,
        "windows": int(data.shape[0]),
        "tokens": int(data.shape[0] * (seq_len - 1)),
        "nll": nll,
        "perplexity": math.exp(nll),
    }
