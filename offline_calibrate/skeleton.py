"""The model without its weights: built on the meta device, a part filled in from the source
when the calibration reaches it and emptied again afterwards.

Building on the meta device costs no memory and no random initialisation, however large the
model. What checkpoints do not hold (the rotary embeddings' inverse frequencies, buffers that
are computed, not stored) is computed the way `from_pretrained` computes it, with the model's
own `_init_weights`, so the empty model runs exactly like a loaded one once filled.
"""

from __future__ import annotations

import torch

from .architectures import ArchitectureSpec
from .loading import ModelLoadError
from .source import WeightSource

OUTPUT_EMBEDDING = "lm_head.weight"  # absent from checkpoints whose head is the embedding


def empty_model(hf_config, dtype: torch.dtype) -> torch.nn.Module:
    """The causal LM of `hf_config` in `dtype` with every parameter on the meta device."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(hf_config, dtype=dtype)
    for path, module in model.named_modules():
        if module._non_persistent_buffers_set:
            _compute_buffers(model, path, module)
    return model.eval()


def _compute_buffers(model: torch.nn.Module, path: str, module: torch.nn.Module) -> None:
    """Compute a module's non-persistent buffers on the CPU with transformers' `_init_weights`
    (what from_pretrained does after building on the meta device); NaN before, so a buffer it
    does not compute is caught instead of left as garbage."""
    names = sorted(module._non_persistent_buffers_set)
    for name in names:
        meta = module._buffers[name]
        module._buffers[name] = torch.full(meta.shape, float("nan"), dtype=meta.dtype) if meta.is_floating_point() \
            else torch.zeros(meta.shape, dtype=meta.dtype)
    model._init_weights(module)
    if any(module._buffers[name].isnan().any() for name in names if module._buffers[name].is_floating_point()):
        import transformers

        raise ModelLoadError(
            f"transformers {transformers.__version__} did not compute the buffers {names} of {path} for a model "
            "built without its weights; glowq-calibrate needs transformers >= 5"
        )


def layer_state(model: torch.nn.Module, spec: ArchitectureSpec, index: int) -> dict[str, torch.Tensor]:
    """Decoder layer `index`'s meta tensors under the model's state-dict names."""
    prefix = f"{spec.layers_path}.{index}."
    return {prefix + name: tensor for name, tensor in model.get_submodule(prefix[:-1]).state_dict().items()}


def outside_state(model: torch.nn.Module, spec: ArchitectureSpec, head: bool = True) -> dict[str, torch.Tensor]:
    """The tensors outside the decoder layers (embeddings, final norm, and with `head` the
    output head unless it is the embedding itself)."""
    inside = f"{spec.layers_path}."
    state = {name: tensor for name, tensor in model.state_dict().items() if not name.startswith(inside)}
    if model.config.tie_word_embeddings or not head:
        state.pop(OUTPUT_EMBEDDING, None)
    return state


def fill(model: torch.nn.Module, wanted: dict[str, torch.Tensor], source: WeightSource,
         device: torch.device) -> None:
    """Replace the meta tensors `wanted` (model state-dict names) with the source's, on `device`."""
    tensors = {name: tensor.to(device) for name, tensor in source.read(wanted).items()}
    incompatible = model.load_state_dict(tensors, strict=False, assign=True)
    if incompatible.unexpected_keys:
        raise AssertionError(f"tensors the model has no place for: {incompatible.unexpected_keys}")
    if model.config.tie_word_embeddings:
        model.get_output_embeddings().weight = model.get_input_embeddings().weight


def place_buffers(model: torch.nn.Module, device: torch.device) -> None:
    """Move the computed buffers (rotary frequencies) to `device`."""
    for name, buffer in list(model.named_buffers()):
        owner, _, leaf = name.rpartition(".")
        model.get_submodule(owner)._buffers[leaf] = buffer.to(device)


def empty(module: torch.nn.Module) -> None:
    """Give a filled part's memory back: its tensors become meta tensors again."""
    module.to_empty(device="meta")
