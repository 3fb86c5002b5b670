"""bench/accuracy_int8_factors.py's checkpoint copy: every factor rounded to int8 rows, B found
under the format's names (dense units and an MoE layer's shared experts' B), the rest unchanged."""

from __future__ import annotations

import sys

import torch
from safetensors.torch import load_file
from vllm_helpers import REPO_ROOT

sys.path.insert(0, str(REPO_ROOT / "bench"))
import accuracy_int8_factors  # noqa: E402

from vllm_glowq.format import FACTOR_A, FACTOR_B  # noqa: E402


def tensors_of(folder) -> dict[str, torch.Tensor]:
    found = {}
    for path in folder.glob("*.safetensors"):
        found.update(load_file(str(path)))
    return found


def test_int8_copy_rounds_every_factor_and_keeps_the_rest(glowq_checkpoints, tmp_path):
    checkpoint = glowq_checkpoints.get("qwen3_moe")
    copy, changes = accuracy_int8_factors.with_int8_factors(checkpoint, tmp_path / "int8")
    before, after = tensors_of(checkpoint), tensors_of(copy)
    assert before.keys() == after.keys()
    assert (copy / "config.json").read_text() == (checkpoint / "config.json").read_text()
    factors = [n for n in before if n.rpartition(".")[2] in (FACTOR_A, FACTOR_B)]
    assert any(".experts." in n for n in factors) and any("self_attn" in n for n in factors)
    for name, tensor in before.items():
        if name in factors:
            step = tensor.float().abs().amax(dim=-1, keepdim=True) / 127
            error = (after[name].float() - tensor.float()).abs()
            assert (error <= step * 0.5 + 2e-3 * tensor.float().abs()).all(), name  # + fp16 storage
            assert not torch.equal(after[name], tensor), name
        else:
            assert torch.equal(after[name], tensor), name
    assert len(changes) == sum(n.endswith(FACTOR_A) for n in factors)
    assert 0 < max(changes) < 0.02
