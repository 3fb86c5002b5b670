"""A random-weight checkpoint of a real architecture's shapes (Llama, Qwen3-MoE), generated on
the GPU and written straight to safetensors.

`offline_calibrate.tiny.make_random_model` builds the model through transformers on the CPU,
which takes minutes for Llama-3-8B's 8 billion parameters; this draws each tensor on the
device (seconds) and writes sharded safetensors with the index transformers and vLLM read.
Speed does not depend on the weights' values, so the benchmark only needs the right shapes and
finite, well-scaled activations (std 0.02 like HF's initializer, norms at 1).

    python bench/make_model.py OUT [--shape llama3-8b] [--arch llama] [--device cuda]
    python bench/make_model.py OUT --arch qwen3_moe --shape qwen3-30b-a3b --layers auto --work-root /root/bench-moe

`--layers auto` takes as many of the shape's decoder layers as the disk under --work-root holds
together with what the MoE benchmark derives from this model (the GlowQ checkpoint and the int4
codes of the plain-int4 variants, `disk_plan`), keeping --reserve-gib free.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import torch

from offline_calibrate.tiny import MOE_SHAPES, SHAPES, build_config, build_tokenizer
from offline_calibrate.writer import save_tensors

GIB = 1024**3
# Each decoder layer's tensors per architecture, as (name, shape) with sizes named by DIMENSIONS;
# "{e}" repeats a tensor for every expert. Norms are 1-D, set to ones.
LAYER_TENSORS: dict[str, list[tuple[str, tuple[str, ...]]]] = {
    "llama": [
        ("input_layernorm.weight", ("h",)),
        ("self_attn.q_proj.weight", ("q", "h")), ("self_attn.k_proj.weight", ("kv", "h")),
        ("self_attn.v_proj.weight", ("kv", "h")), ("self_attn.o_proj.weight", ("h", "q")),
        ("post_attention_layernorm.weight", ("h",)),
        ("mlp.gate_proj.weight", ("i", "h")), ("mlp.up_proj.weight", ("i", "h")), ("mlp.down_proj.weight", ("h", "i")),
    ],
    "qwen3_moe": [
        ("input_layernorm.weight", ("h",)),
        ("self_attn.q_proj.weight", ("q", "h")), ("self_attn.k_proj.weight", ("kv", "h")),
        ("self_attn.v_proj.weight", ("kv", "h")), ("self_attn.o_proj.weight", ("h", "q")),
        ("self_attn.q_norm.weight", ("d",)), ("self_attn.k_norm.weight", ("d",)),
        ("post_attention_layernorm.weight", ("h",)),
        ("mlp.gate.weight", ("experts", "h")),  # the router
        ("mlp.experts.{e}.gate_proj.weight", ("moe_i", "h")), ("mlp.experts.{e}.up_proj.weight", ("moe_i", "h")),
        ("mlp.experts.{e}.down_proj.weight", ("h", "moe_i")),
    ],
}
CAUSAL_LM_CLASSES = {"llama": "LlamaForCausalLM", "qwen3_moe": "Qwen3MoeForCausalLM"}  # config.json's architectures
MODEL_TENSORS = [("model.embed_tokens.weight", ("vocab", "h")), ("model.norm.weight", ("h",)),
                 ("lm_head.weight", ("vocab", "h"))]  # untied head


def dimensions(dims: dict[str, int]) -> dict[str, int]:
    """The sizes LAYER_TENSORS names, from a config's keys."""
    hd = dims.get("head_dim", dims["hidden_size"] // dims["num_attention_heads"])
    return {"h": dims["hidden_size"], "i": dims["intermediate_size"], "vocab": dims["vocab_size"], "d": hd,
            "q": dims["num_attention_heads"] * hd, "kv": dims["num_key_value_heads"] * hd,
            "experts": dims.get("num_experts", 0), "moe_i": dims.get("moe_intermediate_size", 0)}


def tensor_shapes(arch: str, dims: dict[str, int], layers: range | None = None) -> dict[str, tuple[int, ...]]:
    """Every tensor of the model (or only of `layers`, without the embeddings and head)."""
    size = dimensions(dims)
    resolve = lambda names: tuple(size[n] for n in names)  # noqa: E731
    shapes: dict[str, tuple[int, ...]] = {}
    for layer in range(dims["num_hidden_layers"]) if layers is None else layers:
        for name, shape in LAYER_TENSORS[arch]:
            for e in range(size["experts"]) if "{e}" in name else [None]:
                shapes[f"model.layers.{layer}.{name.format(e=e)}"] = resolve(shape)
    if layers is None:
        shapes.update({name: resolve(shape) for name, shape in MODEL_TENSORS})
    return shapes


def model_dims(shape: str, arch: str, layers: int | None = None) -> dict[str, int]:
    dims = {**SHAPES[shape], **MOE_SHAPES.get(shape, {}).get(arch, {})}
    if layers is not None:
        dims["num_hidden_layers"] = layers
    return dims


def disk_plan(shape: str, arch: str, rank: int = 64, group_size: int = 128) -> dict[str, float]:
    """Bytes the MoE benchmark writes from this model, per decoder layer and fixed (embeddings,
    head): the bf16 model, the GlowQ checkpoint (offline_calibrate's estimate from the format),
    and bench/variants.py's shared int4 codes with the GPTQ copy's zero points and g_idx."""
    from offline_calibrate.options import CalibrationOptions
    from offline_calibrate.preflight import estimated_checkpoint_bytes, model_linears

    def total(layers: int) -> dict[str, int]:
        dims = model_dims(shape, arch, layers)
        bf16 = 2 * sum(_numel(s) for s in tensor_shapes(arch, dims).values())
        config = build_config(arch, dims, torch.bfloat16)
        linears = model_linears(config)
        options = dict(rank=rank, group_size=group_size, sym=True, share="group")
        glowq = estimated_checkpoint_bytes(config, linears, CalibrationOptions(**options))
        codes = estimated_checkpoint_bytes(config, linears, CalibrationOptions(**{**options, "rank": 0}))
        gptq = sum(4 * k + 4 * (k // group_size) * (n // 8) for k, n in linears.quantizable.values())
        return {"bf16": bf16, "glowq": glowq, "int4_codes": codes, "gptq_extras": gptq}

    one, two = total(1), total(2)
    per_layer = {key: two[key] - one[key] for key in one}
    return {"per_layer": per_layer, "fixed": {key: one[key] - per_layer[key] for key in one}}


def layers_that_fit(shape: str, arch: str, free_bytes: int, reserve_bytes: int,
                    group_size: int = 128) -> tuple[int, dict]:
    """The most decoder layers (at most the shape's own count) whose benchmark files fit."""
    plan = disk_plan(shape, arch, group_size=group_size)
    per_layer, fixed = sum(plan["per_layer"].values()), sum(plan["fixed"].values())
    fit = int((free_bytes - reserve_bytes - fixed) // per_layer)
    return max(0, min(SHAPES[shape]["num_hidden_layers"], fit)), plan


def _numel(shape: tuple[int, ...]) -> int:
    count = 1
    for size in shape:
        count *= size
    return count


def make_model(
    output: str | Path,
    shape: str = "llama3-8b",
    dtype: torch.dtype = torch.bfloat16,
    device: str = "cuda",
    seed: int = 0,
    std: float = 0.02,
    arch: str = "llama",
    layers: int | None = None,
) -> Path:
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    dims = model_dims(shape, arch, layers)
    config = build_config(arch, dims, dtype)
    config.initializer_range = std
    config.architectures = [CAUSAL_LM_CLASSES[arch]]  # vLLM picks the model class (and the runner) by it
    gen = torch.Generator(device=device).manual_seed(seed)
    tensors = {}
    for name, tshape in tensor_shapes(arch, dims).items():
        if len(tshape) == 1:
            tensors[name] = torch.ones(tshape, dtype=dtype)
        else:
            tensors[name] = (torch.randn(tshape, generator=gen, device=device, dtype=torch.float32) * std).to(dtype).cpu()
    save_tensors(output, tensors)
    config.save_pretrained(output)
    build_tokenizer().save_pretrained(output)
    return output


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("output")
    parser.add_argument("--shape", default="llama3-8b", choices=sorted(SHAPES))
    parser.add_argument("--arch", default="llama", choices=sorted(LAYER_TENSORS))
    parser.add_argument("--layers", default=None, help="decoder layers: N, or auto (as many as the disk holds)")
    parser.add_argument("--work-root", default=None, help="the folder whose disk --layers auto plans for")
    parser.add_argument("--reserve-gib", type=float, default=8.0, help="left free by --layers auto")
    parser.add_argument("--group-size", type=int, default=128, help="the calibration's, for --layers auto's plan")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--std", type=float, default=0.02)
    args = parser.parse_args(argv)
    layers = None
    if args.layers == "auto":
        root = Path(args.work_root or Path(args.output).parent)
        root.mkdir(parents=True, exist_ok=True)
        free = shutil.disk_usage(root).free
        layers, plan = layers_that_fit(args.shape, args.arch, free, int(args.reserve_gib * GIB), args.group_size)
        gib = {part: {k: round(v / GIB, 3) for k, v in sizes.items()} for part, sizes in plan.items()}
        print(f"disk plan: {free / GIB:.1f} GiB free under {root}, {args.reserve_gib} GiB kept free, GiB "
              f"{json.dumps(gib)} -> {layers} of {SHAPES[args.shape]['num_hidden_layers']} layers", flush=True)
        if layers < 1:
            raise SystemExit(f"not even one decoder layer of {args.shape} fits the {free / GIB:.1f} GiB free under "
                             f"{root} with its benchmark variants; free some space or lower --reserve-gib")
    elif args.layers is not None:
        layers = int(args.layers)
    start = time.perf_counter()
    path = make_model(args.output, args.shape, device=args.device, seed=args.seed, std=args.std, arch=args.arch,
                      layers=layers)
    print(f"wrote {path} ({args.arch}, {args.shape}, {layers or 'all'} layers, random bf16) in "
          f"{time.perf_counter() - start:.1f} s", flush=True)


if __name__ == "__main__":
    main()
