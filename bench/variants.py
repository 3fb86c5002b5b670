"""The benchmark's other checkpoints, derived from one symmetric GlowQ checkpoint in seconds.

All variants share the GlowQ checkpoint's int4 codes and scales (round-to-nearest is
deterministic, so a separate calibration would produce the same codes), written once and
hard-linked into every folder:

* `int4`       plain int4 through the plugin: no factors (`lowrank_units` empty).
* `glowq_s`    GlowQ-S: the factors of the top half of the units, ranked by the calibration
               report's metric (the same rule as `--restore 0.5`).
* `permodule`  per-module correction (share = "module"): every member of a group gets its own
               B. The benchmark gives each member a copy of its group's shared B, so the
               corrected function equals GlowQ's while the serving cost (one B x per module,
               three in qkv and two in gate_up) is exactly that of a per-module calibration
               with the same rank; only speed is measured with it, never accuracy.
* `gptq`       the same codes in the AutoGPTQ layout for vLLM's in-tree GPTQ path
               (quant_method gptq, sym, desc_act false, group 128; qzeros 0x77777777, the
               GPTQ "zero - 1" encoding of the implicit zero point 8; g_idx = k // group).
* `lora`       the per-module correction as EoRA users serve it: a PEFT LoRA adapter
               (lora_A = B_i, lora_B = A_i, r = lora_alpha = rank, so the scaling is 1) for every
               q/k/v/o/gate/up/down projection, served on top of `gptq` with --enable-lora.
               Like `permodule`, each member carries its group's B, so speed is what it measures.

    python bench/variants.py GLOWQ_CKPT OUT_ROOT [--only int4,gptq]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

from offline_calibrate.reference import read_tensors
from offline_calibrate.writer import split_shards
from vllm_glowq.format import (
    FACTOR_A,
    FACTOR_B,
    PACK_FACTOR,
    QWEIGHT,
    SHARE_GROUP,
    SHARE_MODULE,
    GlowQConfig,
    tensor_name,
    unit_members,
)

VARIANTS = ("int4", "glowq_s", "permodule", "gptq", "lora")
GPTQ_SYM_ZEROS = 0x77777777  # eight nibbles of 7 (fits a signed int32)
SKIP_FILES = ("config.json", "glowq_report.json", "model.safetensors.index.json")


def save_sharded(tensors: dict[str, torch.Tensor], folder: Path, stem: str) -> list[Path]:
    """`stem-00001.safetensors`, ... (no index: vLLM and transformers' loaders glob the folder)."""
    paths = []
    for i, shard in enumerate(split_shards(tensors), start=1):
        path = folder / f"{stem}-{i:05d}.safetensors"
        save_file(shard, path, metadata={"format": "pt"})
        paths.append(path)
    return paths


def _new_folder(source: Path, out: Path, base_files: list[Path], quant_config: dict) -> Path:
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    for file in source.iterdir():
        if file.is_file() and file.suffix != ".safetensors" and file.name not in SKIP_FILES:
            shutil.copy2(file, out / file.name)
    for file in base_files:
        os.link(file, out / file.name)
    config = json.loads((source / "config.json").read_text())
    config["quantization_config"] = quant_config
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return out


def glowq_s_units(report: dict, lowrank_units: list[str], fraction: float = 0.5) -> list[str]:
    """The units `--restore FRACTION` keeps: the top of the report's ranking, in layer order."""
    ranking = report["selection"]["ranking"]
    keep = set(ranking[: max(1, round(fraction * len(ranking)))])
    return [u for u in lowrank_units if u in keep]


def derive(source: str | Path, out_root: str | Path, only: tuple[str, ...] = VARIANTS) -> dict[str, Path]:
    source, out_root = Path(source), Path(out_root)
    config = json.loads((source / "config.json").read_text())
    glowq = GlowQConfig.from_dict(config["quantization_config"])
    if glowq.share != SHARE_GROUP or not glowq.lowrank_units:
        raise ValueError(f"{source} must be a full GlowQ checkpoint (share=group with factors)")
    report = json.loads((source / "glowq_report.json").read_text())
    tensors = read_tensors(source)
    factors = {k: v for k, v in tensors.items() if k.endswith((FACTOR_A, FACTOR_B))}
    base = {k: v for k, v in tensors.items() if k not in factors}
    shared = out_root / "_shared"
    shared.mkdir(parents=True, exist_ok=True)
    base_files = save_sharded(base, shared, "int4")
    made: dict[str, Path] = {}

    def glowq_dict(**changes) -> dict:
        fields = glowq.to_dict()
        fields.update(changes)
        return GlowQConfig.from_dict(fields).to_dict()

    if "int4" in only:
        made["int4"] = _new_folder(source, out_root / "int4", base_files, glowq_dict(lowrank_units=[]))
    if "glowq_s" in only:
        units = glowq_s_units(report, glowq.lowrank_units)
        folder = _new_folder(source, out_root / "glowq_s", base_files, glowq_dict(lowrank_units=units))
        picked = {}
        for unit in units:
            picked[tensor_name(unit, FACTOR_B)] = factors[tensor_name(unit, FACTOR_B)]
            for member in unit_members(unit, SHARE_GROUP):
                picked[tensor_name(member, FACTOR_A)] = factors[tensor_name(member, FACTOR_A)]
        save_sharded(picked, folder, "factors")
        made["glowq_s"] = folder
    if "permodule" in only:
        per_module, modules = {}, []
        for unit in glowq.lowrank_units:
            b = factors[tensor_name(unit, FACTOR_B)]
            for member in unit_members(unit, SHARE_GROUP):
                modules.append(member)
                per_module[tensor_name(member, FACTOR_B)] = b.clone()
                per_module[tensor_name(member, FACTOR_A)] = factors[tensor_name(member, FACTOR_A)]
        cfg = glowq_dict(share=SHARE_MODULE, lowrank_units=modules)
        folder = _new_folder(source, out_root / "permodule", base_files, cfg)
        save_sharded(per_module, folder, "factors")
        made["permodule"] = folder
    if "gptq" in only:
        made["gptq"] = _write_gptq(source, out_root / "gptq", base, base_files, glowq)
    if "lora" in only:
        made["lora"] = _write_lora(out_root / "lora", factors, glowq)
    return made


def _write_lora(out: Path, factors: dict[str, torch.Tensor], glowq: GlowQConfig) -> Path:
    """A PEFT LoRA adapter holding every member's (B, A) as (lora_A, lora_B)."""
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    tensors, targets = {}, set()
    for unit in glowq.lowrank_units:
        b = factors[tensor_name(unit, FACTOR_B)]
        for member in unit_members(unit, SHARE_GROUP):
            prefix = f"base_model.model.{member}"
            tensors[f"{prefix}.lora_A.weight"] = b.clone()
            tensors[f"{prefix}.lora_B.weight"] = factors[tensor_name(member, FACTOR_A)]
            targets.add(member.rpartition(".")[2])
    save_file(tensors, out / "adapter_model.safetensors", metadata={"format": "pt"})
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": glowq.rank, "lora_alpha": glowq.rank,
              "lora_dropout": 0.0, "bias": "none", "target_modules": sorted(targets), "fan_in_fan_out": False}
    (out / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n")
    return out


def _write_gptq(source: Path, out: Path, base: dict, base_files: list[Path], glowq: GlowQConfig) -> Path:
    if not glowq.sym or glowq.modules_to_not_convert or glowq.group_size == -1:
        raise ValueError("the GPTQ copy needs symmetric codes, a fixed group size and no full-precision modules")
    quant_config = {
        "quant_method": "gptq",
        "bits": glowq.bits,
        "group_size": glowq.group_size,
        "desc_act": False,
        "sym": True,
        "lm_head": False,
        "checkpoint_format": "gptq",
    }
    folder = _new_folder(source, out, base_files, quant_config)
    extras = {}
    for name, qweight in base.items():
        if not name.endswith("." + QWEIGHT):
            continue
        module = name[: -len(QWEIGHT) - 1]
        k, n = qweight.shape[0] * PACK_FACTOR, qweight.shape[1]
        if n % PACK_FACTOR:
            raise ValueError(f"{module}: out_features {n} is not a multiple of {PACK_FACTOR} (GPTQ qzeros)")
        groups = k // glowq.group_size
        extras[f"{module}.qzeros"] = torch.full((groups, n // PACK_FACTOR), GPTQ_SYM_ZEROS, dtype=torch.int32)
        extras[f"{module}.g_idx"] = torch.arange(k, dtype=torch.int32) // glowq.group_size
    save_sharded(extras, folder, "gptq-zeros")
    return folder


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Derive the benchmark variants from a symmetric GlowQ checkpoint.")
    parser.add_argument("glowq_checkpoint")
    parser.add_argument("out_root")
    parser.add_argument("--only", default=",".join(VARIANTS))
    args = parser.parse_args(argv)
    start = time.perf_counter()
    made = derive(args.glowq_checkpoint, args.out_root, tuple(args.only.split(",")))
    for name, path in made.items():
        print(f"{name}: {path}")
    print(f"derived {len(made)} variants in {time.perf_counter() - start:.1f} s", flush=True)


if __name__ == "__main__":
    main()
