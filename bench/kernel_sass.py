"""Compile the project's W4A16 GEMM for Hopper (sm_90) without a GPU and count what it became.

Device time is scarce; the compiled code is not. For each launch configuration this prints the
registers and stack frame (cuobjdump's resource usage: a stack means spills), shared memory, the
layout conversions and shared-memory traffic Triton inserted (TTGIR), and the most frequent
SASS instructions (per weight, the one-token path should be about one FFMA and two integer
operations), and the same for the main loop alone (the longest backward branch) with its
instructions per weight. Uses the Triton installed here, which may be newer than the GPU
machine's: to match that one, put a copy of its version first on the path
(`pip install --no-deps --target DIR triton==3.6.0`, then `PYTHONPATH=DIR python ...`).

    python bench/kernel_sass.py                      # the configurations choose_gemm_config picks
    python bench/kernel_sass.py --block-m 1 --block-n 128 --warps 1
    python bench/kernel_sass.py --mma --block-m 16 --block-n 64 [--correct]   # the tensor-core kernel (Gluon)

For the tensor-core kernel --block-m is the token tile (block_t) and the K block is 128; its
main loop is the longest loop, which with --correct may be the shrink's.
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import subprocess
import tempfile

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from vllm_glowq.kernels import w4a16, w4a16_triton

POINTERS = dict(x_ptr="bf16", qw_ptr="i32", s_ptr="bf16", z_ptr="u8", bias_ptr="bf16", b_ptr="bf16", a_ptr="bf16",
                out_ptr="bf16", part_ptr="fp32", r_ptr="fp32", sync_ptr="i32")
INTEGERS = ("M", "N", "K", "RANK", "group_size", "split_k", "k_chunk", "shrink_chunk", "shrink_programs", "expand_first",
            "stride_xm", "stride_qk", "stride_sg", "stride_zg", "stride_bk", "stride_an", "stride_om")
# What Triton's launcher proves at run time on the Llama shapes: multiples of 16 (every pointer,
# and every integer but the token count and the grid's counts), which lets it vectorize loads.
NOT_MULTIPLES_OF_16 = ("M", "split_k", "shrink_programs", "expand_first")
DEFAULTS = [dict(block_m=1, block_n=64, warps=1, stages=2), dict(block_m=1, block_n=64, warps=2, stages=2),
            dict(block_m=16, block_n=64, warps=4, stages=2), dict(block_m=64, block_n=64, warps=4, stages=3)]  # choose_gemm_config's
TTGIR_OPS = ("ttg.convert_layout", "ttg.local_alloc", "ttg.local_load", "ttg.local_store",
             "ttg.async_copy_global_to_local", "ttng.warp_group_dot", "tt.dot")


def compile_gemm(block_m: int, block_n: int, warps: int, stages: int, correct: bool, prefetch: bool):
    constexprs = dict(HAS_ZEROS=False, HAS_BIAS=False, CORRECT=correct, BM=block_m, BN=block_n, BK=128, BR=16,
                      RANK_BLOCKS=4, SBM=1 if block_m == 1 else max(16, block_m),
                      SBK=w4a16.choose_gemm_config(block_m, 4096, 4096, 128, 132).shrink_block_k,
                      MAGIC=0x4300, MAGIC_VALUE=128.0, PREFETCH=prefetch,
                      SPLITS=w4a16.partial_rows_for(w4a16.GemmConfig(block_m, block_n, 128, 32, warps), 32))
    signature = {**{k: f"*{v}" for k, v in POINTERS.items()}, **{k: "i32" for k in INTEGERS},
                 **{k: "constexpr" for k in constexprs}}
    names = w4a16_triton.gemm_kernel.arg_names
    aligned = [*POINTERS, *(name for name in INTEGERS if name not in NOT_MULTIPLES_OF_16)]
    attrs = {(names.index(name),): [["tt.divisibility", 16]] for name in aligned}
    source = ASTSource(fn=w4a16_triton.gemm_kernel, signature=signature, constexprs=constexprs, attrs=attrs)
    return triton.compile(source, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=warps, num_stages=stages))


MMA_POINTERS = dict(x_ptr="bf16", w_ptr="i32", s_ptr="bf16", z_ptr="u8", bias_ptr="bf16", b_ptr="bf16", a_ptr="bf16",
                    out_ptr="bf16", part_ptr="fp32", r_ptr="fp32", sync_ptr="i32")
MMA_INTEGERS = ("M", "N", "K", "RANK", "split_k", "k_chunk", "shrink_chunk", "shrink_programs", "magic", "stride_xm",
                "stride_sg", "stride_zg", "stride_bk", "stride_an", "stride_om")


def compile_mma(block_t: int, block_n: int, correct: bool, prefetch_x: bool = True, warps: int = 4,
                wgmma: bool = False, zeros: bool = False,
                codes_in_smem: bool = False):
    """The tensor-core kernel (w4a16_mma.gemm_kernel) for sm_90, symmetric codes, rank 64, K block 128."""
    from triton.experimental.gluon._runtime import GluonASTSource

    from vllm_glowq.kernels import w4a16_mma

    constexprs = dict(HAS_ZEROS=zeros, HAS_BIAS=False, CORRECT=correct, EXPAND_ITEMS=False, EVEN_N=True,
                      GROUP_BLOCKS=1, BN=block_n, BT=block_t, BK=128, RP=64, SBT=min(64, block_t), SBK=64,
                      MAGIC_VALUE=128.0, PREFETCH_X=prefetch_x, WGMMA=wgmma, CODES_IN_SMEM=codes_in_smem, num_warps=warps)
    signature = {**{k: f"*{v}" for k, v in MMA_POINTERS.items()}, **{k: "i32" for k in MMA_INTEGERS},
                 **{k: "constexpr" for k in constexprs}}
    names = w4a16_mma.gemm_kernel.arg_names
    aligned = [*MMA_POINTERS, *(name for name in MMA_INTEGERS if name not in ("M", "RANK", "split_k", "shrink_programs"))]
    attrs = {(names.index(name),): [["tt.divisibility", 16]] for name in aligned}
    source = GluonASTSource(w4a16_mma.gemm_kernel, signature, constexprs, attrs)
    return triton.compile(source, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=warps))


def describe(kernel, block_n: int) -> str:
    tools = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as cubin:
        cubin.write(kernel.asm["cubin"])
        cubin.flush()
        usage = subprocess.run([f"{tools}/cuobjdump", "--dump-resource-usage", cubin.name], capture_output=True,
                               text=True, check=True).stdout
        sass = subprocess.run([f"{tools}/cuobjdump", "--dump-sass", cubin.name], capture_output=True, text=True,
                              check=True).stdout
    registers = re.search(r"REG:(\d+)", usage).group(1)
    stack = re.search(r"STACK:(\d+)", usage).group(1)
    ops = collections.Counter(re.findall("(" + "|".join(re.escape(o) for o in TTGIR_OPS) + ")", kernel.asm["ttgir"]))
    lines = re.findall(r"^\s+/\*([0-9a-f]+)\*/\s+(?:@!?U?P[T\d]+\s+)?([A-Z][A-Z0-9_]*)([^;]*);", sass, re.M)
    opcodes = [op for _, op, _ in lines]
    first, last = main_loop([(int(address, 16), op, rest) for address, op, rest in lines])
    weights = kernel.metadata.num_warps * 32  # threads; each handles block_k * block_n / threads weights
    return (f"registers {registers}, stack {stack} B, shared {kernel.metadata.shared} B; TTGIR {dict(ops)}\n"
            f"    SASS: {most_common(opcodes)}\n"
            f"    main loop: {last - first + 1} instructions, {(last - first + 1) * weights / (128 * block_n):.2f} per "
            f"weight per thread (K block 128): {most_common(opcodes[first:last + 1])}")


def main_loop(lines: list[tuple[int, str, str]]) -> tuple[int, int]:
    """Indices of the first and last instruction of the longest backward branch's body."""
    index = {address: i for i, (address, _, _) in enumerate(lines)}
    loops = [(index[target], i) for i, (address, op, rest) in enumerate(lines) if op == "BRA"
             for target in [int(m.group(1), 16) for m in [re.search(r"0x([0-9a-f]+)", rest)] if m]
             if target < address and target in index]
    return max(loops, key=lambda loop: loop[1] - loop[0], default=(0, len(lines) - 1))


def most_common(opcodes: list[str]) -> str:
    return ", ".join(f"{name} {count}" for name, count in collections.Counter(opcodes).most_common(12))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--block-m", type=int)
    parser.add_argument("--block-n", type=int, default=128)
    parser.add_argument("--warps", type=int, default=4)
    parser.add_argument("--stages", type=int, default=3)
    parser.add_argument("--correct", action="store_true", help="with the fused correction")
    parser.add_argument("--prefetch", action="store_true", help="one-token path: the hand prefetch")
    parser.add_argument("--no-prefetch-x", action="store_true", help="tensor-core kernel: x not copied a block ahead")
    parser.add_argument("--mma", action="store_true", help="the tensor-core kernel (w4a16_mma.py) instead")
    parser.add_argument("--wgmma", action="store_true", help="tensor-core kernel: Hopper's warpgroup MMA")
    parser.add_argument("--zeros", action="store_true", help="tensor-core kernel: asymmetric codes")
    parser.add_argument("--codes-in-smem", action="store_true", help="warpgroup MMA: codes through shared memory")
    args = parser.parse_args()
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    configs = DEFAULTS if args.block_m is None else [dict(block_m=args.block_m, block_n=args.block_n, warps=args.warps,
                                                          stages=args.stages)]
    print(f"Triton {triton.__version__}, target sm_90")
    if args.mma:
        kernel = compile_mma(args.block_m or 16, args.block_n, args.correct, not args.no_prefetch_x, args.warps,
                             args.wgmma, args.zeros, args.codes_in_smem)
        print(f"tensor-core kernel, {args.block_m or 16} tokens x {args.block_n} rows: {describe(kernel, args.block_n)}")
        return
    for config in configs:
        kernel = compile_gemm(**config, correct=args.correct, prefetch=args.prefetch)
        print(f"{config}: {describe(kernel, config['block_n'])}", flush=True)


if __name__ == "__main__":
    main()
