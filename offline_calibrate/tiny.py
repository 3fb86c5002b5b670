"""Random-weight Hugging Face models of real architectures, made locally.

The default init_std (0.25) gives peaked next-token distributions, so greedy decoding has
no near-ties that bf16 rounding could flip between two engines.

Used by the quick start (a default that needs no download), the tests (tiny models) and the
GPU benchmark (Llama-3-8B shapes: speed does not depend on the weights' values). The
tokenizer is byte-level with no merges, so it is built without any download and encodes any
text.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

SPECIAL_TOKENS = ("<unk>", "<s>", "</s>")
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)

SHAPES: dict[str, dict[str, int]] = {
    "tiny": dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=32, vocab_size=384, max_position_embeddings=1024),
    "llama3-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                      num_key_value_heads=8, head_dim=128, vocab_size=128256, max_position_embeddings=8192),
}
# Expert counts and sizes of the Mixture-of-Experts architectures, added to the shape's keys.
# The tiny ones keep every expert size a multiple of 64, so group size 32 fits at TP=2.
MOE_SHAPES: dict[str, dict[str, dict[str, int]]] = {
    "tiny": {
        "qwen3_moe": dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=64),
        "qwen2_moe": dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=64,
                          shared_expert_intermediate_size=128),
        "mixtral": dict(num_local_experts=4, num_experts_per_tok=2, intermediate_size=64),
    },
}
ARCHITECTURES = ("llama", "qwen2", "mistral", "qwen3", *MOE_SHAPES["tiny"])


def build_tokenizer():
    """A byte-level tokenizer (256 byte tokens + <unk>, <s>, </s>) with a chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    byte_chars = list(pre_tokenizers.ByteLevel.alphabet())
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    for ch in sorted(byte_chars):
        vocab[ch] = len(vocab)
    core = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    core.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(
        tokenizer_object=core,
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        chat_template=CHAT_TEMPLATE,
        add_bos_token=True,
    )


def build_config(arch: str, shape: str | dict[str, int], dtype: torch.dtype):
    from transformers import AutoConfig

    if arch not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {arch!r}; choose from {list(ARCHITECTURES)}")
    dims = dict(SHAPES[shape]) if isinstance(shape, str) else dict(shape)
    if isinstance(shape, str) and arch in MOE_SHAPES.get(shape, {}):
        dims.update(MOE_SHAPES[shape][arch])
    extra = {"attention_bias": False} if arch == "llama" else {}
    config = AutoConfig.for_model(
        arch,
        **dims,
        **extra,
        bos_token_id=1,
        eos_token_id=2,
        tie_word_embeddings=False,
        rms_norm_eps=1e-5,
        dtype=dtype,
    )
    return config


def make_random_model(
    output: str | Path,
    arch: str = "llama",
    shape: str | dict[str, int] = "tiny",
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
    init_std: float = 0.25,
) -> Path:
    """Write a random-weight causal LM (config, safetensors, tokenizer) to `output`."""
    from transformers import AutoModelForCausalLM

    output = Path(output)
    config = build_config(arch, shape, dtype)
    config.initializer_range = init_std
    torch.manual_seed(seed)
    with torch.device("cpu"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.save_pretrained(output, safe_serialization=True)
    build_tokenizer().save_pretrained(output)
    return output


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Write a random-weight HF causal LM (no download).")
    parser.add_argument("output")
    parser.add_argument("--arch", default="llama", choices=ARCHITECTURES)
    parser.add_argument("--shape", default="tiny", choices=sorted(SHAPES))
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    path = make_random_model(args.output, args.arch, args.shape, getattr(torch, args.dtype), args.seed)
    print(path)


if __name__ == "__main__":
    main()
