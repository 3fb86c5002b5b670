"""A random-weight Llama checkpoint of any shape, generated on the GPU and written straight to
safetensors.

`offline_calibrate.tiny.make_random_model` builds the model through transformers on the CPU,
which takes minutes for Llama-3-8B's 8 billion parameters; this draws each tensor on the
device (seconds) and writes sharded safetensors with the index transformers and vLLM read.
Speed does not depend on the weights' values, so the benchmark only needs the right shapes and
finite, well-scaled activations (std 0.02 like HF's initializer, norms at 1).

    python bench/make_model.py OUT [--shape llama3-8b] [--device cuda]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from offline_calibrate.tiny import SHAPES, build_config, build_tokenizer
from offline_calibrate.writer import save_tensors

def llama_tensor_shapes(dims: dict[str, int]) -> dict[str, tuple[int, ...]]:
    """Every tensor of a Hugging Face LlamaForCausalLM (untied head, no biases)."""
    h, i, v = dims["hidden_size"], dims["intermediate_size"], dims["vocab_size"]
    hd = dims.get("head_dim", h // dims["num_attention_heads"])
    q, kv = dims["num_attention_heads"] * hd, dims["num_key_value_heads"] * hd
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (v, h)}
    for layer in range(dims["num_hidden_layers"]):
        p = f"model.layers.{layer}"
        shapes.update({
            f"{p}.input_layernorm.weight": (h,),
            f"{p}.self_attn.q_proj.weight": (q, h),
            f"{p}.self_attn.k_proj.weight": (kv, h),
            f"{p}.self_attn.v_proj.weight": (kv, h),
            f"{p}.self_attn.o_proj.weight": (h, q),
            f"{p}.post_attention_layernorm.weight": (h,),
            f"{p}.mlp.gate_proj.weight": (i, h),
            f"{p}.mlp.up_proj.weight": (i, h),
            f"{p}.mlp.down_proj.weight": (h, i),
        })
    shapes["model.norm.weight"] = (h,)
    shapes["lm_head.weight"] = (v, h)
    return shapes

def make_model(
    output: str | Path,
    shape: str | dict[str, int] = "llama3-8b",
    dtype: torch.dtype = torch.bfloat16,
    device: str = "cuda",
    seed: int = 0,
    std: float = 0.02,
) -> Path:
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    dims = dict(SHAPES[shape]) if isinstance(shape, str) else dict(shape)
    config = build_config("llama", dims, dtype)
    config.initializer_range = std
    gen = torch.Generator(device=device).manual_seed(seed)
    tensors = {}
    for name, tshape in llama_tensor_shapes(dims).items():
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
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--std", type=float, default=0.02)
    args = parser.parse_args(argv)
    start = time.perf_counter()
    path = make_model(args.output, args.shape, device=args.device, seed=args.seed, std=args.std)
    print(f"wrote {path} ({args.shape}, random bf16) in {time.perf_counter() - start:.1f} s", flush=True)

if __name__ == "__main__":
    main()
