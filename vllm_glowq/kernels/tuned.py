"""Launch tables tuned on one GPU model for the tensor-core kernel's warpgroup MMA.

`bench/kernel_microbench.py --sweep-wgmma --tuned-out FILE` times the warpgroup-MMA launches of
each layer shape at the token counts asked for, beside dequantize + cuBLAS (forward()'s other
path), and writes the fastest of each as a table. The plugin reads the table named after the GPU
(`configs/NVIDIA_H200.json` beside this file: the device name with spaces as underscores, as
vLLM names its fused-MoE tables) or the file that VLLM_GLOWQ_TUNED_CONFIGS names:

    {"device": "NVIDIA H200", "triton": "3.6.0", "command": "...",
     "layers": {"6144x4096": {"256": {"block_n": 64, "block_t": 64, ...}, "2048": "dense"}}}

Layers are keyed "N x K" (outputs x inputs). An entry at T tokens serves T/2 < tokens <= T, so a
sweep at powers of two covers every count between its smallest and largest; shapes and counts
a table lacks keep w4a16's rules (choose_mma_config, dense above WGMMA_MAX_TOKENS).
"""

from __future__ import annotations

import functools
import json
import os
from pathlib import Path

from ..format import GlowQFormatError

ENV_TUNED = "VLLM_GLOWQ_TUNED_CONFIGS"
DENSE = "dense"  # an entry that sends the layer to dequantize + cuBLAS
CONFIGS = Path(__file__).with_name("configs")

Table = dict[tuple[int, int], dict[int, "dict | str"]]


def table_path(device_name: str) -> Path | None:
    """The table for this GPU: VLLM_GLOWQ_TUNED_CONFIGS if set, else the packaged one if any."""
    if os.environ.get(ENV_TUNED):
        return Path(os.environ[ENV_TUNED])
    packaged = CONFIGS / f"{device_name.replace(' ', '_')}.json"
    return packaged if packaged.is_file() else None


@functools.cache
def load(path: Path | None, fields: frozenset[str]) -> Table:
    """{(N, K): {tokens: launch fields or DENSE}, in increasing tokens} from `path` (None: an empty
    table); `fields`: the launch configuration's field names, checked here so a stale table fails
    at load, not mid-serve."""
    if path is None:
        return {}
    try:
        layers = json.loads(path.read_text())["layers"]
        table = {}
        for shape, entries in layers.items():
            n, k = (int(v) for v in shape.split("x"))
            table[n, k] = dict(sorted((int(tokens), entry) for tokens, entry in entries.items()))
    except (OSError, ValueError, KeyError, AttributeError) as exc:
        raise GlowQFormatError(f"{ENV_TUNED}: cannot read the launch table {path} ({type(exc).__name__}: {exc}); "
                               "write it with bench/kernel_microbench.py --sweep-wgmma --tuned-out, or unset the "
                               "variable") from exc
    for (n, k), entries in table.items():
        for tokens, entry in entries.items():
            unknown = set(entry) - fields if isinstance(entry, dict) else set() if entry == DENSE else {entry}
            if unknown:
                raise GlowQFormatError(f"{ENV_TUNED}: launch table {path}, layer {n}x{k} at {tokens} tokens: "
                                       f"unknown {', '.join(map(str, sorted(unknown)))}; sweep it again with this "
                                       "version")
    return table


def lookup(table: Table, n: int, k: int, tokens: int) -> dict | str | None:
    """The tuned launch (fields or DENSE) for `tokens` rows of an N x K layer, or None when the
    table has no entry T with T/2 < tokens <= T."""
    for entry_tokens, entry in table.get((n, k), {}).items():  # sorted at load: the smallest T wins
        if entry_tokens // 2 < tokens <= entry_tokens:
            return entry
    return None
