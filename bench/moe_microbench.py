"""One Mixture-of-Experts layer on the GPU: plain int4 Marlin MoE against GlowQ's two correction paths.

Qwen3-30B-A3B's experts (hidden 2048, 128 experts, top-8, moe_intermediate 768), random int4
codes (GPTQ layout, group 128, symmetric) repacked as the plugin repacks them
(moe_marlin.repack), random factors of rank 64 with one B13 per layer as GlowQ shares it. Per
token count it times:

* `plain`: vLLM's `fused_marlin_moe` without callbacks (the plugin's rank-0 layers; vLLM's own
  GPTQ-Marlin MoE runs the same kernels);
* `folded`: GlowQ with the correction folded into Marlin's codes (vllm_glowq/moe_fold.py; A in
  int4, so its error against the float64 reference is larger than the other paths');
* `grouped`: GlowQ with the correction on pairs sorted by expert (moe_marlin.forward, fused=False),
  on the second stream beside Marlin's GEMMs; `grouped_in_callbacks` with the correction inside
  Marlin's callbacks (moe_marlin.CORRECTION_BESIDE off), `grouped_serial_r` that with R = B13 x in
  series too (R_ON_SIDE_STREAM off), `grouped_two_sorts` the shipped path with the
  correction's own sort besides Marlin's (ONE_SORT off), and `grouped_shrink_in_activation` with
  the w2 shrink inside the activation's launch (W2_SHRINK_BESIDE off): what each switch saves;
  `grouped_int8` the shipped grouped path with A13, B2 and A2 as int8 codes (ExpertFactors.to_int8,
  VLLM_GLOWQ_MOE_FACTORS=int8): half the factor bytes beside Marlin's GEMMs (its error against
  the float64 reference of the full-precision factors includes the codes' rounding);
  `grouped_r_after_sort` with R = B13 x forked after the sort, not before it (R_BEFORE_SORT off);
* `fused`: GlowQ with the small-batch fused correction (fused=True), where
  moe_marlin.takes_fused_path would take it; `--threshold-sweep` times it at every count, and
  prints the pair count up to which it beats the grouped path (what FUSED_MAX_PAIRS should be);
* `gemv`: GlowQ on the project's decode GEMVs over the same Marlin codes (moe_triton's pairs
  path, what moe_marlin.forward takes up to GEMV_MAX_PAIRS pairs), `gemv_plain` without
  factors (the plugin's plain int4 at decode); up to GEMV_TIMED_MAX_PAIRS pairs, at every count
  with `--threshold-sweep`;
* `own`: GlowQ on the project's own int4 MoE kernels, the correction inside the expert GEMMs
  (moe_triton.forward on the same codes repacked for them), on the path the pair count picks;
  `own_plain` the same kernels without factors (plain int4 through them); `--threshold-sweep`
  also times `own_pairs`, `own_rows` and `own_blocks` (each path forced) at every count (what
  moe_triton.PAIRS_MAX_PAIRS and ROWS_MAX_PAIRS should be).

and the ratios plain / path (the issue's target for GlowQ: >= 0.90 at decode). Each case is one
CUDA graph that runs the layer once on each of COPIES copies of its weights, with its own
routing, so that the experts a step touches come from HBM as in a 48-layer model, not from L2;
the median replay over COPIES is the time per layer. Accuracy: on the first CHECK_TOKENS tokens
of each case, the largest error of each path against a float64 reference of the block (the
dequantized codes and the factors), relative to the reference's largest entry; plain's error
beside it is what the correction adds.

`--breakdown` adds each path's device time per kernel (torch.profiler over the same graph) and the
gaps between kernels, the launch latency that a chain of small dependent kernels costs.

`--launch-sweep 1,4` times the decode GEMVs (`gemv`) with each launch constant of the own pairs
path varied in turn. `--grouped-sweep 16,64,256` times the grouped path's two correction launches
alone (kernels/moe_lowrank_triton.activate and the w2 expand on inputs as Marlin's GEMMs leave
them; no vLLM needed) as shipped and with each of their launch constants varied in turn.
`--beside-sweep 1,64` varies the same constants on the whole default `grouped` path, whose
correction runs beside Marlin's GEMMs and shares the GPU with them (the H100 run of 2026-12-07
slowed Marlin from 128.9 to 151.7 us at 64 tokens), so the launches are judged where they run.

`--own-only` needs no vLLM (a machine where it is not installed yet): it times the own pairs path
with the correction (`own_pairs`) against the same path without it (`own_plain_pairs`, the
baseline of its ratios), and both on Marlin's layout (`gemv`, `gemv_plain`; the layout computed
in torch, `marlin_layout`), with `--breakdown` and `--launch-sweep` as above.

Every run also times the grouped path's w2 expand alone (kernels/moe_lowrank_triton.launch on
`activate`'s partials, the pairs sorted in torch: no vLLM needed) with its programs' column tiles
as shipped against one tile per program, and checks that both write the same output
(`expand_tiles` in the JSON).

    python bench/moe_microbench.py --out moe_micro.json [--tokens 1,4,16,64,256] [--threshold-sweep] [--breakdown]
                                   [--launch-sweep 1,4] [--grouped-sweep 16,64,256] [--beside-sweep 1,64]
                                   [--own-only]
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib.metadata
import importlib.util
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from gpu_timing import kernel_breakdown, seconds_per_call
from vllm_glowq import compat, moe_fold, moe_marlin, moe_triton
from vllm_glowq.kernels import moe_lowrank_triton as grouped
from vllm_glowq.packing import dequantize

DEVICE = "cuda"  # where inputs are made (the tests run the parts without vLLM on a CPU, in Triton's interpreter)
SHAPE = dict(hidden=2048, experts=128, top_k=8, inter=768, rank=64, group=128)  # Qwen3-30B-A3B
COPIES = 8  # x 24 MB of experts and factors touched per copy at one token: past the H200's L2
CHECK_TOKENS = 4
PATHS = ("plain", "folded", "grouped", "grouped_int8", "grouped_in_callbacks", "grouped_serial_r", "grouped_two_sorts",
         "grouped_shrink_in_activation", "grouped_r_after_sort", "fused", "gemv", "gemv_plain", "own", "own_plain", "own_pairs", "own_rows",
         "own_blocks")
# the grouped path with some of moe_marlin's switches turned off (set while the call is built and
# captured: the hooks read them then)
SWITCHED_OFF = {"grouped_in_callbacks": ("CORRECTION_BESIDE",),
                "grouped_serial_r": ("CORRECTION_BESIDE", "R_ON_SIDE_STREAM"), "grouped_two_sorts": ("ONE_SORT",),
                "grouped_shrink_in_activation": ("W2_SHRINK_BESIDE",), "grouped_r_after_sort": ("R_BEFORE_SORT",)}
SWEEP_ONLY = ("own_pairs", "own_rows", "own_blocks")  # timed with --threshold-sweep only
# --own-only: the pairs path without and with the correction, on its own layout and on Marlin's
OWN_ONLY_PATHS = ("own_plain_pairs", "own_pairs", "gemv_plain", "gemv")
FORCED = {"own_pairs": "pairs", "own_rows": "rows", "own_blocks": "blocks", "own_plain_pairs": "pairs"}
PLAIN = ("plain", "gemv_plain", "own_plain", "own_plain_pairs")  # the paths that run without factors
GEMV_TIMED_MAX_PAIRS = 32  # the decode GEMVs are timed up to this many pairs (at every count with the sweep)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="the JSON results file")
    parser.add_argument("--tokens", default="1,4,16,64,256", type=_counts, help="token counts, comma-separated")
    parser.add_argument("--threshold-sweep", action="store_true",
                        help="time both GlowQ paths at every token count (to set FUSED_MAX_PAIRS)")
    parser.add_argument("--breakdown", action="store_true",
                        help="also each path's device time per kernel and the gaps between them (torch.profiler)")
    parser.add_argument("--launch-sweep", default="", type=lambda t: _counts(t) if t else [],
                        help="token counts at which to time the own pairs path's launch constants (e.g. 1,4)")
    parser.add_argument("--grouped-sweep", default="", type=lambda t: _counts(t) if t else [],
                        help="token counts at which to time the grouped path's correction launches alone with "
                             "each of their launch constants varied (e.g. 16,64,256; needs no vLLM)")
    parser.add_argument("--beside-sweep", default="", type=lambda t: _counts(t) if t else [],
                        help="token counts at which to time the whole default grouped path (its correction "
                             "beside Marlin's GEMMs, where it competes with them) with each of the grouped "
                             "kernels' launch constants varied (e.g. 1,64)")
    parser.add_argument("--paths", default="", type=_paths,
                        help="only these paths (comma-separated, the baseline first; e.g. plain,grouped,"
                             "grouped_in_callbacks): a shorter run")
    parser.add_argument("--own-only", action="store_true",
                        help="only the own pairs path, without and with the correction (needs no vLLM)")
    return parser.parse_args(argv)


def _counts(text: str) -> list[int]:
    try:
        counts = [int(t) for t in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--tokens takes positive integers separated by commas, not {text!r}")
    if not counts or min(counts) < 1:
        raise argparse.ArgumentTypeError(f"--tokens takes positive integers separated by commas, not {text!r}")
    return counts


def _paths(text: str) -> list[str]:
    paths = [p for p in text.split(",") if p]
    unknown = sorted(set(paths) - set(PATHS))
    if unknown:
        raise argparse.ArgumentTypeError(f"--paths takes some of {', '.join(PATHS)}, not {', '.join(unknown)}")
    return paths


def why_not_runnable(own_only: bool = False) -> str | None:
    """Why this machine cannot run the benchmark (None when it can)."""
    if not torch.cuda.is_available():
        return "bench/moe_microbench.py needs a CUDA GPU; none is visible"
    if not own_only and importlib.util.find_spec("vllm") is None:
        return ("bench/moe_microbench.py needs vLLM with its CUDA kernels (see ../shared/gpu/README.md); "
                "--own-only times the project's own kernels without it")
    return None


def marlin_layout(qweight: torch.Tensor, scales: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric GPTQ codes [E, K/8, N] and scales [E, G, N] (G > 1) in vLLM's Marlin MoE layout,
    computed in torch (what `gptq_marlin_moe_repack` and `marlin_moe_permute_scales` write), for
    --own-only runs on a machine without vLLM; tests/test_bench_moe.py checks it against vLLM.
    Word (c * 4 + a) * 4 + j of each 64 columns of a 16-row K tile holds, in nibble m, row
    2a + (m >= 4) + 8 (m odd) of column 16 j + c + 8 ((m // 2) odd)."""
    experts, k, n = qweight.shape[0], qweight.shape[1] * 8, qweight.shape[2]
    shifts = 4 * torch.arange(8, device=qweight.device)
    codes = ((qweight.unsqueeze(2) >> shifts[None, None, :, None]) & 0xF).reshape(experts, k, n)  # GPTQ: row 8w + m
    word = torch.arange(128).view(8, 4, 4)  # (c, a, j)
    c, a, j = (t.reshape(-1, 1) for t in torch.meshgrid(torch.arange(8), torch.arange(4), torch.arange(4),
                                                       indexing="ij"))
    m = torch.arange(8).view(1, 8)
    rows = (2 * a + (m >= 4).long() + 8 * (m % 2)).to(qweight.device)  # [128, 8]
    cols = (16 * j + c + 8 * ((m // 2) % 2)).to(qweight.device)
    assert word.flatten().tolist() == list(range(128))
    tiles = codes.view(experts, k // 16, 16, n // 64, 64).permute(0, 1, 3, 2, 4)  # [E, K/16, N/64, 16, 64]
    nibbles = tiles[..., rows, cols]  # [E, K/16, N/64, 128, 8]
    packed = (nibbles.to(torch.int64) << shifts.to(torch.int64)).sum(-1)
    packed = torch.where(packed >= 2**31, packed - 2**32, packed).to(torch.int32)
    perm = torch.tensor(moe_marlin.MARLIN_SCALE_PERM, device=scales.device)
    permuted = scales.reshape(experts, scales.shape[1], n // 64, 64)[..., perm].reshape(scales.shape)
    return packed.reshape(experts, k // 16, 2 * n), permuted.contiguous()


def make_layer(seed: int, own_only: bool = False, folded: bool = False) -> dict:
    """One copy of the layer: GPTQ codes (kept for the reference), Marlin's layout (with
    `own_only` computed in torch, no vLLM kernels: only the decode GEMVs read it), the own
    kernels' layout, factors, and with `folded` the codes with the correction folded in."""
    gen = torch.Generator(device=DEVICE).manual_seed(seed)
    e, h, i, r, g = (SHAPE[k] for k in ("experts", "hidden", "inter", "rank", "group"))

    def codes(k: int, n: int):
        qweight = torch.randint(-2**31, 2**31 - 1, (e, k // 8, n), dtype=torch.int32, device=DEVICE, generator=gen)
        return qweight, (torch.rand(e, k // g, n, device=DEVICE, generator=gen) * 0.004 + 0.002).to(torch.bfloat16)

    def randn(*shape: int, scale: float):
        return (torch.randn(*shape, device=DEVICE, generator=gen) * scale).to(torch.bfloat16)

    (q13, s13), (q2, s2) = codes(h, 2 * i), codes(i, h)
    factors = moe_marlin.ExpertFactors(b13=randn(r, h, scale=h**-0.5), a13=randn(e, 2 * i, r, scale=0.5 * r**-0.5),
                                       b2=randn(e, r, i, scale=i**-0.5), a2=randn(e, h, r, scale=0.5 * r**-0.5))
    if own_only:
        (c13, p13), (c2, p2) = marlin_layout(q13, s13), marlin_layout(q2, s2)
        int4 = moe_marlin.Int4Experts(c13, c2, p13, p2, None, None, torch.zeros(1, device=DEVICE))
        int4.gemv = moe_marlin.decode_views(int4, s13.shape[1], s2.shape[1])
    else:
        int4 = moe_marlin.repack(q13, s13, None, q2, s2, None, torch.bfloat16)
    with_fold = None  # (the folded codes in Marlin's layout, the factors left outside them)
    if folded:
        folded13, folded2, outside = moe_fold.fold((q13, s13, None), (q2, s2, None), factors.b13, factors.a13,
                                                   factors.b2, factors.a2, torch.bfloat16)
        with_fold = (moe_marlin.repack(*folded13, *folded2, torch.bfloat16), outside)
    own = (moe_triton.repack(q13, s13, None, torch.bfloat16), moe_triton.repack(q2, s2, None, torch.bfloat16))
    moe_triton.reserve(q13.device, h, i, *own)
    moe_triton.reserve(q13.device, h, i, *int4.gemv)  # the decode GEMVs on Marlin's codes
    return dict(int4=int4, own=own, factors=factors, factors_int8=factors.to_int8(), gptq=(q13, s13, q2, s2),
                folded=with_fold)


def routing(tokens: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator(device=DEVICE).manual_seed(seed)
    logits = torch.randn(tokens, SHAPE["experts"], device=DEVICE, generator=gen)
    weights, ids = torch.softmax(logits, dim=-1).topk(SHAPE["top_k"], dim=-1)
    return weights / weights.sum(-1, keepdim=True), ids.to(torch.int32)


@contextlib.contextmanager
def shipped_after(module, constant: str, value):
    """`module.constant` set to `value` inside the block, and back to what it was after it."""
    shipped = getattr(module, constant)
    setattr(module, constant, value)
    try:
        yield
    finally:
        setattr(module, constant, shipped)


def step(layer: dict, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor, path: str):
    """One call of the layer on `path` (a closure for the CUDA graph)."""
    factors = (moe_marlin.ExpertFactors() if path in PLAIN else layer["factors_int8"] if path == "grouped_int8"
               else layer["factors"])
    if path.startswith("own"):
        return lambda: moe_triton.forward(*layer["own"], factors, x, weights, ids, path=FORCED.get(path))
    if path.startswith("gemv"):
        return lambda: moe_triton.forward(*layer["int4"].gemv, factors, x, weights, ids, path="pairs")
    from vllm.model_executor.layers.fused_moe.activation import MoEActivation

    if path == "folded":  # the correction folded into Marlin's codes (moe_fold.py)
        return lambda: moe_marlin.forward(layer["folded"][0], layer["folded"][1], x, weights, ids,
                                          MoEActivation.SILU)
    fused = path == "fused"  # plain: Marlin MoE alone (no factors, no decode GEMVs)
    def call():
        with contextlib.ExitStack() as switched:
            for switch in SWITCHED_OFF.get(path, ()):
                switched.enter_context(shipped_after(moe_marlin, switch, False))
            return moe_marlin.forward(layer["int4"], factors, x, weights, ids, MoEActivation.SILU, fused=fused)

    return call


def reference(layer: dict, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """The corrected block in float64: sum_k w_k [W2_e h + A2_e B2_e h], h = SiLU(gate) * up of
    W13_e x + A13_e B13 x, W the dequantized codes of the experts these tokens use."""
    q13, s13, q2, s2 = layer["gptq"]
    f = {k: getattr(layer["factors"], k).double() for k in ("b13", "a13", "b2", "a2")}
    x = x.double()
    out = torch.zeros_like(x)
    for t in range(x.shape[0]):
        for k in range(ids.shape[1]):
            e = int(ids[t, k])
            g = dequantize(q13[e], s13[e].float(), None, torch.float64) @ x[t] + f["a13"][e] @ (f["b13"] @ x[t])
            gate, up = g.chunk(2)
            hidden = F.silu(gate) * up
            y = dequantize(q2[e], s2[e].float(), None, torch.float64) @ hidden + f["a2"][e] @ (f["b2"][e] @ hidden)
            out[t] += weights[t, k].double() * y
    return out


def max_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.double() - ref).abs().max() / ref.abs().max()).item()


def bench_tokens(layers: list[dict], tokens: int, sweep: bool, breakdown: bool = False,
                 own_only: bool = False, only: list[str] | None = None) -> dict:
    """Times and errors of every path that runs at this token count (and with `breakdown`, the
    time per kernel: where a path's microseconds go); ratios against the first path timed."""
    pairs = tokens * SHAPE["top_k"]
    gemv = pairs <= GEMV_TIMED_MAX_PAIRS
    paths = list(OWN_ONLY_PATHS) if own_only else [
        p for p in PATHS if (p != "fused" or sweep or moe_marlin.takes_fused_path(pairs))
        and (not p.startswith("gemv") or sweep or gemv) and (p not in SWEEP_ONLY or sweep)]
    if only:
        paths = [p for p in only if p in paths or p in SWEEP_ONLY or p == "fused"]
    inputs = []
    for c, _ in enumerate(layers):
        x = torch.randn(tokens, SHAPE["hidden"], device=DEVICE, generator=torch.Generator(device=DEVICE).manual_seed(c))
        inputs.append((x.to(torch.bfloat16), *routing(tokens, seed=1000 * tokens + c)))
    default = ("gemv" if pairs <= moe_marlin.GEMV_MAX_PAIRS else "fused" if moe_marlin.takes_fused_path(pairs)
               else "grouped")
    row = dict(tokens=tokens, pairs=pairs, default_path=default,
               baseline=paths[0], us={}, ratio={}, max_error={}, **({"kernels": {}} if breakdown else {}))
    check = [t[:CHECK_TOKENS] for t in inputs[0]]
    ref = reference(layers[0], *check)
    for path in paths:
        try:
            calls = [step(layer, *args, path) for layer, args in zip(layers, inputs)]
            row["us"][path] = 1e6 * seconds_per_call(calls)
            if breakdown:
                row["kernels"][path] = kernel_breakdown(calls)
            row["max_error"][path] = max_error(step(layers[0], *inputs[0], path)()[:CHECK_TOKENS], ref)
        except Exception as exc:  # one broken path is reported; the others are still timed
            row.setdefault("failed", {})[path] = f"{type(exc).__name__}: {exc}"
            row["us"].pop(path, None)
            print(f"T={tokens}: path {path} failed: {row['failed'][path]}", flush=True)
    for path in [p for p in paths[1:] if p in row["us"]]:
        row["ratio"][path] = row["us"][paths[0]] / row["us"][path]
    return row


# the decode GEMVs' launch constants (kernels/moe_w4a16_triton.py) that `--launch-sweep` tries,
# one at a time around the shipped values (warps and columns change the compiled kernel)
LAUNCH_SWEEP = {"PAIRS_WARPS": (2, 4, 8), "PAIRS_BLOCK_N": (64, 128, 256), "PAIRS_PER_SM": (4, 8, 16)}


def launch_sweep(layers: list[dict], tokens: int) -> list[dict]:
    """GlowQ through the own pairs path on Marlin's codes (the default decode path, `gemv`) at
    this token count with each constant of LAUNCH_SWEEP set in turn (the others as shipped)."""
    from vllm_glowq.kernels import moe_w4a16_triton as kernels

    return constant_sweep(layers, tokens, kernels, LAUNCH_SWEEP, "gemv")


def constant_sweep(layers: list[dict], tokens: int, module, constants: dict, path: str) -> list[dict]:
    """The whole layer on `path` at this token count with each of `constants` (names in `module`
    and the values to try) set in turn, the others as shipped: [{tokens, path, constant, value,
    us, max_error}]."""
    inputs = [(torch.randn(tokens, SHAPE["hidden"], device=DEVICE, generator=torch.Generator(device=DEVICE)
                           .manual_seed(c)).to(torch.bfloat16), *routing(tokens, seed=1000 * tokens + c))
              for c, _ in enumerate(layers)]
    ref = reference(layers[0], *[t[:CHECK_TOKENS] for t in inputs[0]])
    results = []
    for constant, values in constants.items():
        for value in values:
            with shipped_after(module, constant, value):
                calls = [step(layer, *args, path) for layer, args in zip(layers, inputs)]
                results.append(dict(tokens=tokens, path=path, constant=constant, value=value,
                                    us=1e6 * seconds_per_call(calls),
                                    max_error=max_error(calls[0]()[:CHECK_TOKENS], ref)))
            print(f"  {path} T={tokens} {constant}={value}: {results[-1]['us']:.1f} us "
                  f"(max error {results[-1]['max_error']:.1e})", flush=True)
    return results


def grouped_cases(layers: list[dict], tokens: int) -> list[dict]:
    """Inputs of the grouped path's two correction launches for each weight copy, as Marlin MoE's
    GEMMs would leave them (random w13 output rows, R = B13 x, the pairs sorted on the host at
    Marlin's block size; no vLLM needed)."""
    e, h, i, r = (SHAPE[k] for k in ("experts", "hidden", "inter", "rank"))
    pairs = tokens * SHAPE["top_k"]
    cases = []
    for c, layer in enumerate(layers):
        weights, ids = routing(tokens, seed=1000 * tokens + c)
        gen = torch.Generator(device=DEVICE).manual_seed(c)
        dtype = layer["factors"].b13.dtype  # bfloat16 (the tests: float16, which Triton's interpreter takes)
        x = torch.randn(tokens, h, device=DEVICE, generator=gen).to(dtype)
        on_host = grouped.align_reference(ids.cpu(), compat.marlin_moe_block_size(tokens, SHAPE["top_k"], e), e)
        cases.append(dict(
            w13_out=torch.randn(pairs, 2 * i, device=DEVICE, generator=gen).to(dtype),
            reduced=F.linear(x, layer["factors"].b13), factors=layer["factors"], hidden=x.new_empty((pairs, i)),
            out=x.new_zeros((pairs, h)), weights=weights.reshape(-1).float(),
            partials=torch.randn(i // 64, pairs, r, device=DEVICE, generator=gen) * r**-0.5,
            alignment=dataclasses.replace(on_host, sorted_ids=on_host.sorted_ids.to(DEVICE),
                                          expert_ids=on_host.expert_ids.to(DEVICE), padded=on_host.padded.to(DEVICE))))
    return cases


def expand(case: dict, partials: torch.Tensor) -> None:
    grouped.launch(partials, case["factors"].a2, case["out"], case["alignment"], scale=case["weights"],
                   accumulate=True)


def correction(case: dict) -> torch.Tensor:
    """The grouped path's two launches: `activate` (w13 expand, SiLU-and-mul, w2 shrink) and the
    w2 expand into the w2 output rows."""
    f = case["factors"]
    expand(case, grouped.activate(case["w13_out"], case["reduced"], f.a13, f.b2, case["alignment"], case["hidden"],
                                  SHAPE["top_k"]))
    return case["out"]


def first_output(cases: list[dict], call) -> torch.Tensor:
    """What `call` writes into the first copy's (zeroed) w2 output rows."""
    cases[0]["out"].zero_()
    call(cases[0])
    return cases[0]["out"].clone()


def expand_tiles(layers: list[dict], tokens: int) -> dict:
    """The grouped path's w2 expand at this token count, `out[p] += w_p A2_e S_p` with S_p the sum
    of `activate`'s float32 partials (one per 64 rows of I), with the column tiles per program
    that `launch` picks and with one: {tokens, tiles, us, us_one_tile, identical}."""
    cases = grouped_cases(layers, tokens)
    calls = [lambda case=case: expand(case, case["partials"]) for case in cases]
    alignment, out = cases[0]["alignment"], cases[0]["out"]
    row = dict(tokens=tokens, pairs=alignment.num_pairs,
               tiles=grouped.tiles_for(alignment, -(-SHAPE["hidden"] // grouped.PRODUCT_BLOCK_N), SHAPE["experts"],
                                       out.device))
    row["us"], shipped = 1e6 * seconds_per_call(calls), first_output(cases, lambda c: expand(c, c["partials"]))
    with shipped_after(grouped, "PROGRAMS_PER_SM", 1 << 30):  # one tile per program
        row["us_one_tile"] = 1e6 * seconds_per_call(calls)
        one_tile = first_output(cases, lambda c: expand(c, c["partials"]))
    row["identical"] = bool(torch.equal(shipped, one_tile))
    print(f"  w2 expand T={tokens}: {row['tiles']} tiles per program {row['us']:.1f} us, one tile "
          f"{row['us_one_tile']:.1f} us, outputs identical: {row['identical']}", flush=True)
    return row


# the grouped path's launch constants (kernels/moe_lowrank_triton.py) that `--grouped-sweep`
# tries, one at a time around the shipped values
GROUPED_SWEEP = {"PRODUCT_BLOCK_N": (32, 64, 128), "PROGRAMS_PER_SM": (1, 2, 4, 8, 16),
                 "ACTIVATE_BLOCK_I": (32, 64, 128), "ACTIVATE_CHUNKS": (1, 2, 3, 4, 6, 12), "GROUPED_WARPS": (2, 4, 8)}


def grouped_sweep(layers: list[dict], tokens: int) -> list[dict]:
    """The grouped path's two correction launches alone at this token count (no vLLM needed),
    as shipped and with each constant of GROUPED_SWEEP set in turn: [{tokens, constant, value,
    us, max_change}], max_change the largest difference from the shipped output relative to its
    largest entry (only the summation order of the partials may change it)."""
    cases = grouped_cases(layers, tokens)
    calls = [lambda case=case: correction(case) for case in cases]
    shipped = first_output(cases, correction)
    results = [dict(tokens=tokens, constant="shipped", value=None, us=1e6 * seconds_per_call(calls), max_change=0.0)]
    for constant, values in GROUPED_SWEEP.items():
        for value in values:
            with shipped_after(grouped, constant, value):
                us = 1e6 * seconds_per_call(calls)
                change = (first_output(cases, correction).float() - shipped.float()).abs().max().item()
            results.append(dict(tokens=tokens, constant=constant, value=value, us=us,
                                max_change=change / shipped.float().abs().max().item()))
            print(f"  grouped T={tokens} {constant}={value}: {us:.1f} us (shipped {results[0]['us']:.1f}; "
                  f"output change {results[-1]['max_change']:.1e})", flush=True)
    return results


def suggested_threshold(rows: list[dict], small: str = "fused", large: str = "grouped") -> int | None:
    """The largest timed pair count up to which path `small` was never slower than `large`."""
    best = None
    for row in sorted(rows, key=lambda r: r["pairs"]):
        if small not in row["us"] or row["us"][small] > row["us"][large]:
            break
        best = row["pairs"]
    return best


def line(row: dict) -> str:
    baseline = row.get("baseline", "plain")
    parts = [f"T={row['tokens']:4d} pairs={row['pairs']:5d}", f"{baseline} {row['us'][baseline]:7.1f}us"]
    for path in [p for p in dict.fromkeys(PATHS + OWN_ONLY_PATHS) if p != baseline and p in row["us"]]:
        mark = "*" if path == row["default_path"] else " "
        parts.append(f"{path}{mark} {row['us'][path]:7.1f}us ({row['ratio'][path]:.2f}x)")
    errors = ", ".join(f"{p} {e:.1e}" for p, e in row["max_error"].items())
    kernels = [f"\n    {path}: " + ", ".join(f"{name} {us:.1f}" for name, us in times.items())
               for path, times in row.get("kernels", {}).items()]
    return " | ".join(parts) + f" | max error {errors}" + "".join(kernels)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    why = why_not_runnable(args.own_only)
    if why is not None:
        raise SystemExit(why)
    start = time.perf_counter()
    vllm_version = None if args.own_only else importlib.metadata.version("vllm")
    folded = not args.own_only and (not args.paths or "folded" in args.paths)  # built only where it is timed
    layers = [make_layer(seed, args.own_only, folded) for seed in range(COPIES)]
    command = "python bench/moe_microbench.py " + " ".join(sys.argv[1:] if argv is None else argv)
    result = dict(command=command.strip(), device=torch.cuda.get_device_name(), torch=torch.__version__,
                  vllm=vllm_version, shape=SHAPE,
                  copies=COPIES, fused_max_pairs=moe_marlin.FUSED_MAX_PAIRS, gemv_max_pairs=moe_marlin.GEMV_MAX_PAIRS,
                  one_sort=moe_marlin.ONE_SORT, r_on_side_stream=moe_marlin.R_ON_SIDE_STREAM,
                  correction_beside=moe_marlin.CORRECTION_BESIDE, w2_shrink_beside=moe_marlin.W2_SHRINK_BESIDE,
                  r_before_sort=moe_marlin.R_BEFORE_SORT, factors_int8=moe_marlin.factors_in_int8(),
                  grouped_constants={name: getattr(grouped, name) for name in GROUPED_SWEEP},
                  pairs_max_pairs=moe_triton.PAIRS_MAX_PAIRS, rows_max_pairs=moe_triton.ROWS_MAX_PAIRS, rows=[])
    print(f"{result['device']}, vLLM {result['vllm']}; shapes {SHAPE}; plain/GlowQ ratios, * = the default path",
          flush=True)
    for tokens in args.tokens:
        result["rows"].append(bench_tokens(layers, tokens, args.threshold_sweep, args.breakdown, args.own_only,
                                           args.paths))
        print(line(result["rows"][-1]), flush=True)
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    for tokens in args.tokens:
        result.setdefault("expand_tiles", []).append(expand_tiles(layers, tokens))
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    for tokens in args.launch_sweep:
        result.setdefault("launch_sweep", []).extend(launch_sweep(layers, tokens))
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    for tokens in args.grouped_sweep:
        result.setdefault("grouped_sweep", []).extend(grouped_sweep(layers, tokens))
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    for tokens in args.beside_sweep:
        result.setdefault("beside_sweep", []).extend(constant_sweep(layers, tokens, grouped, GROUPED_SWEEP, "grouped"))
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    if args.threshold_sweep and not args.own_only:
        result["suggested_fused_max_pairs"] = suggested_threshold(result["rows"])
        print(f"fused path never slower up to {result['suggested_fused_max_pairs']} pairs "
              f"(FUSED_MAX_PAIRS is {moe_marlin.FUSED_MAX_PAIRS})")
        result["suggested_gemv_max_pairs"] = suggested_threshold(result["rows"], "gemv", "fused")
        print(f"decode GEMVs never slower than Marlin with the fused correction up to "
              f"{result['suggested_gemv_max_pairs']} pairs (GEMV_MAX_PAIRS is {moe_marlin.GEMV_MAX_PAIRS})")
        result["suggested_pairs_max_pairs"] = suggested_threshold(result["rows"], "own_pairs", "own_rows")
        result["suggested_rows_max_pairs"] = suggested_threshold(result["rows"], "own_rows", "own_blocks")
        print(f"own pairs path never slower than rows up to {result['suggested_pairs_max_pairs']} pairs "
              f"(PAIRS_MAX_PAIRS is {moe_triton.PAIRS_MAX_PAIRS}), rows than blocks up to "
              f"{result['suggested_rows_max_pairs']} (ROWS_MAX_PAIRS is {moe_triton.ROWS_MAX_PAIRS})")
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(f"done in {time.perf_counter() - start:.0f} s", flush=True)


if __name__ == "__main__":
    main()
