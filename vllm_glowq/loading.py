"""Checkpoint-tensor bookkeeping for one GlowQ linear or expert layer.

vLLM checks neither that every shard of a fused parameter arrived (a checkpoint without
`up_proj.glowq_A` loads silently with zeros) nor, with a readable message, that shapes agree
(its loaders `assert` deep inside). Every parameter's loader is therefore wrapped: the wrapper
checks the full checkpoint tensor against the shape the config implies, records the shard,
and only then hands it to vLLM's own loader. After loading, `raise_if_incomplete` names the
first tensor that never came. These checks stay as a second line behind the front-end
validator (validate.py), which normally refuses such checkpoints before an engine starts.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch

from .format import QZEROS, GlowQFormatError

# vLLM's shard id: "q"/"k"/"v", 0/1 (gate/up), None (unfused); (shard, expert) for experts
ShardKey = str | int | tuple[str, int] | None
Transform = Callable[[torch.Tensor, ShardKey], torch.Tensor]
VLLM_WEIGHT_LOADING_LOGGER = "vllm.model_executor.models.utils"  # vLLM's AutoWeightsLoader


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


class ZeroPointDtypeNotice(logging.Filter):
    """Drops vLLM's "Attempted to load weight ...qzeros with dtype torch.int32 into parameter
    with dtype torch.uint8" warning, which it logs once per unfused layer and checkpoint.

    The difference is by design: zero points arrive packed (int32, eight per word) and the
    parameter holds them unpacked (uint8) until loading ends, because packed words of fused
    members cannot be concatenated when a member's out-features are not a multiple of 8. The
    loader wrapper unpacks every one, so the warning reports nothing a user can act on; every
    other dtype warning passes through.
    """

    MESSAGE = "Attempted to load weight %s with dtype %s into parameter with dtype %s"

    def filter(self, record: logging.LogRecord) -> bool:
        if record.msg != self.MESSAGE or not isinstance(record.args, tuple) or len(record.args) != 3:
            return True
        name, source, target = record.args
        return not (str(name).endswith(f".{QZEROS}") and source == torch.int32 and target == torch.uint8)


def quiet_zero_point_dtype_notices() -> None:
    """Install the filter on the vLLM logger that emits the warning (once per process)."""
    logger = logging.getLogger(VLLM_WEIGHT_LOADING_LOGGER)
    if not any(isinstance(f, ZeroPointDtypeNotice) for f in logger.filters):
        logger.addFilter(ZeroPointDtypeNotice())
