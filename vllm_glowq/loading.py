"""Checkpoint-tensor bookkeeping for one GlowQ linear layer.

vLLM checks neither that every shard of a fused parameter arrived (a checkpoint without
`up_proj.glowq_A` loads silently with zeros) nor, with a readable message, that shapes agree
(its loaders `assert` deep inside). Every parameter's loader is therefore wrapped: the wrapper
checks the full checkpoint tensor against the shape the config implies, records the shard,
and only then hands it to vLLM's own loader. After loading, `raise_if_incomplete` names the
first tensor that never came.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from .format import FACTOR_A, FACTOR_B, GlowQConfig, GlowQFormatError

# vLLM's shard id: "q"/"k"/"v", 0/1 (gate/up), None (unfused); (shard, expert) for experts
ShardKey = str | int | tuple[str, int] | None
Transform = Callable[[torch.Tensor, ShardKey], torch.Tensor]


@dataclass(frozen=True)
class ExpectedTensor:
    """One checkpoint tensor the layer must receive, with its full (unsharded) shape."""

    checkpoint_name: str
    shape: tuple[int, ...]
    integer: bool  # int32 packed codes (qweight, qzeros) rather than floating point


class ExpectedTensors:
    """The tensors one layer expects, keyed by (parameter name, shard id), and which arrived."""

    def __init__(self, layer_prefix: str) -> None:
        self.layer_prefix = layer_prefix
        self._expected: dict[tuple[str, ShardKey], ExpectedTensor] = {}
        self._loaded: set[tuple[str, ShardKey]] = set()

    def expect(self, param_name: str, shard: ShardKey, tensor: ExpectedTensor) -> None:
        self._expected[(param_name, shard)] = tensor

    def expects(self, param_name: str, shard: ShardKey) -> bool:
        return (param_name, shard) in self._expected

    def wrap_loader(self, param_name: str, vllm_loader: Callable, transform: Transform | None = None) -> Callable:
        """A weight loader that validates and records, then delegates to `vllm_loader`.

        vLLM calls loaders as `(param, weight)` for unfused layers and as
        `(param, weight, shard_id)` from the fused layers' `load_weights`; both are accepted.
        `transform` reshapes a validated checkpoint tensor into what the parameter stores.
        """

        def load(param: torch.nn.Parameter, weight: torch.Tensor, shard: ShardKey = None, **kwargs) -> None:
            self._check(param_name, shard, weight)
            if transform is not None:
                weight = transform(weight, shard)
            if shard is None:
                vllm_loader(param, weight, **kwargs)
            else:
                vllm_loader(param, weight, shard, **kwargs)
            self._loaded.add((param_name, shard))

        return load

    def _check(self, param_name: str, shard: ShardKey, weight: torch.Tensor) -> None:
        expected = self._expected.get((param_name, shard))
        if expected is None:
            shard_text = "" if shard is None else f" (shard {shard!r})"
            raise GlowQFormatError(
                f"GlowQ checkpoint has an unexpected tensor {param_name!r}{shard_text} for layer "
                f"{self.layer_prefix!r}: its quantization_config does not describe it "
                "(check lowrank_units, share and modules_to_not_convert)."
            )
        if tuple(weight.shape) != expected.shape:
            raise GlowQFormatError(
                f"GlowQ checkpoint tensor {expected.checkpoint_name!r} has shape {list(weight.shape)}, "
                f"but the model and quantization_config (bits, group_size, rank) imply "
                f"{list(expected.shape)}."
            )
        if expected.integer and weight.dtype != torch.int32:
            raise GlowQFormatError(
                f"GlowQ checkpoint tensor {expected.checkpoint_name!r} has dtype {weight.dtype}; "
                "packed int4 codes must be int32."
            )
        if not expected.integer and not weight.dtype.is_floating_point:
            raise GlowQFormatError(
                f"GlowQ checkpoint tensor {expected.checkpoint_name!r} has dtype {weight.dtype}; "
                "scales and low-rank factors must be floating point."
            )

    def raise_if_incomplete(self) -> None:
        missing = [t.checkpoint_name for key, t in self._expected.items() if key not in self._loaded]
        if missing:
            raise GlowQFormatError(
                f"GlowQ checkpoint is missing tensor {missing[0]!r}"
                + (f" (and {len(missing) - 1} more for this layer)" if len(missing) > 1 else "")
                + f", which layer {self.layer_prefix!r} needs according to its quantization_config; "
                "re-run glowq-calibrate or fix lowrank_units."
            )


def check_factors_are_declared(folder: Path, glowq: GlowQConfig) -> None:
    """Refuse factor tensors for units that `lowrank_units` does not list.

    Such a layer has no factor parameters, and a fused layer's `load_weights` then hands the
    tensor to the layer object itself, which fails deep inside vLLM. Only the safetensors
    headers are read, so this is cheap enough to run before any engine starts.
    """
    from safetensors import safe_open

    found: set[str] = set()
    for file in sorted(folder.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as handle:
            for name in handle.keys():
                module, _, suffix = name.rpartition(".")
                if suffix in (FACTOR_A, FACTOR_B):  # B: a unit's own name, or its first expert's
                    found.add(glowq.unit_of(module))
    undeclared = sorted(found - set(glowq.lowrank_units))
    if undeclared:
        more = f" (and {len(undeclared) - 1} more)" if len(undeclared) > 1 else ""
        raise GlowQFormatError(
            f"GlowQ checkpoint {folder} has low-rank factors for unit {undeclared[0]!r}{more}, which "
            "quantization_config.lowrank_units does not list; add the unit there or drop its tensors."
        )
