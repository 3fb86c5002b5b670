"""GlowQ linear method: int4 base GEMM through vLLM's kernels plus a shared low-rank correction.

    y = deq(Wq) x + A (B x)

For a fused layer (qkv_proj, gate_up_proj) with `share == "group"`, B is one [r, K] matrix
shared by the members and A stacks their [N_i, r] factors along the output, so R = B x is
computed once and one expand gives every member's correction. With `share == "module"` every
member has its own B; the layer stacks them into [U r, K] and places each A_i in its own column
block of a [N, U r] matrix (zeros elsewhere), so the same kernels compute every A_i (B_i x).
A layer with factors runs as the custom op in correction.py, which places the correction
around the base GEMM (on a second stream on CUDA).

Tensor parallelism (notes §5): column-parallel layers replicate B and shard A with the output
rows; row-parallel layers shard B along the input and replicate A, so the partial corrections
A (B_i x_i) are summed by the all-reduce the layer already does.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from vllm.model_executor.layers.linear import (
    LinearMethodBase,
    MergedColumnParallelLinear,
    QKVParallelLinear,
    RowParallelLinear,
    register_weight_loader_v2_supported_method,
)
from vllm.model_executor.parameter import (
    BasevLLMParameter,
    ChannelQuantScaleParameter,
    GroupQuantScaleParameter,
    PackedvLLMParameter,
    RowvLLMParameter,
)

from . import compat, correction, kernel_choice
from .format import (
    FACTOR_A,
    FACTOR_B,
    PACK_FACTOR,
    QWEIGHT,
    QZEROS,
    SCALES,
    GlowQConfig,
    GlowQFormatError,
    tensor_name,
)
from .loading import ExpectedTensor, ExpectedTensors, ShardKey
from .packing import dequantize, pack_cols, pack_rows, repack_fragments, repack_planes, unpack_cols

# The format stores scales and factors as float16; parameters keep that dtype while loading
# (vLLM warns on every dtype-changing load) and are cast to the model dtype afterwards.
CHECKPOINT_FLOAT = torch.float16
logger = logging.getLogger("vllm.glowq")  # a child of vLLM's logger: same handler and format
_logged_choices: set[tuple] = set()
GLOWQ_KERNEL_NAME = "GlowQW4A16"  # how the project's kernel is named in logs and kernel reports


@dataclass(frozen=True)
class LayerPlan:
    """Which checkpoint modules a vLLM linear layer holds and which of them carry factors.

    `members` are the HF module names in shard order (q, k, v / gate, up / just the layer);
    `factor_units` the restoration units with factors, in the order of B's row blocks;
    `member_unit[i]` indexes the unit whose R feeds member i's A, or None (no correction).
    """

    prefix: str
    members: tuple[str, ...]
    factor_units: tuple[str, ...]
    member_unit: tuple[int | None, ...]


@dataclass(frozen=True)
class LayerGeometry:
    """Full (checkpoint) and per-rank sizes of one layer."""

    k_full: int
    k_local: int
    n_full: tuple[int, ...]  # per member, as stored in the checkpoint
    n_local: int  # sum over members on this rank
    shard_keys: tuple[ShardKey, ...]
    row_parallel: bool

    @classmethod
    def of(cls, layer: torch.nn.Module, k_local: int, n_parts: list[int], k_full: int, n_total: int) -> LayerGeometry:
        if isinstance(layer, QKVParallelLinear):
            q = layer.total_num_heads * layer.head_size
            kv = layer.total_num_kv_heads * layer.head_size
            v = layer.total_num_kv_heads * layer.v_head_size
            n_full, keys = (q, kv, v), ("q", "k", "v")
        elif isinstance(layer, MergedColumnParallelLinear):
            n_full, keys = tuple(layer.output_sizes), tuple(range(len(layer.output_sizes)))
        else:
            n_full, keys = (n_total,), (None,)
        row = isinstance(layer, RowParallelLinear)
        return cls(k_full, k_local, n_full, sum(n_parts), keys, row)


@register_weight_loader_v2_supported_method
class GlowQLinearMethod(LinearMethodBase):
    """One instance per layer: it holds the layer's plan, tensor bookkeeping and kernel."""

    def __init__(self, glowq: GlowQConfig, plan: LayerPlan) -> None:
        self.glowq = glowq
        self.plan = plan
        self.expected = ExpectedTensors(plan.prefix)
        self.has_factors = bool(plan.factor_units)
        self.kernel = None  # vLLM MPLinearKernel when vLLM's kernel runs the layer
        self.kernel_name = "dense-fallback"  # vLLM's kernel class, GLOWQ_KERNEL_NAME or dense-fallback

    # ----- weights -------------------------------------------------------------------------

    def create_weights(
        self,
        layer: torch.nn.Module,
        input_size_per_partition: int,
        output_partition_sizes: list[int],
        input_size: int,
        output_size: int,
        params_dtype: torch.dtype,
        **extra_weight_attrs,
    ) -> None:
        geo = LayerGeometry.of(layer, input_size_per_partition, output_partition_sizes, input_size, output_size)
        if len(geo.shard_keys) != len(self.plan.members):
            raise GlowQFormatError(
                f"layer {self.plan.prefix!r} has {len(geo.shard_keys)} shards but the GlowQ plugin mapped it "
                f"to modules {list(self.plan.members)}; this architecture's packed_modules_mapping is unsupported."
            )
        self.geometry = geo
        self.params_dtype = params_dtype
        group = self._check_groups(geo)
        vllm_loader = extra_weight_attrs["weight_loader"]
        self._create_quantized(layer, geo, group, vllm_loader)
        if self.has_factors:
            self._create_factors(layer, geo, vllm_loader)

    def _check_groups(self, geo: LayerGeometry) -> int:
        """Group size for this layer's kernel config (-1: one group, replicated under TP)."""
        g = self.glowq.group_size_for(geo.k_full)
        where = f"layer {self.plan.prefix!r} (in_features={geo.k_full})"
        if geo.k_full % PACK_FACTOR or geo.k_full % g:
            raise GlowQFormatError(
                f"GlowQ group_size={self.glowq.group_size} cannot be used for {where}: in_features must be "
                f"a multiple of {PACK_FACTOR} and of the group size; such modules belong in "
                "modules_to_not_convert."
            )
        if geo.k_local % PACK_FACTOR or (g != geo.k_full and geo.k_local % g):
            raise GlowQFormatError(
                f"{where} is split across tensor-parallel ranks into {geo.k_local} input features each, "
                f"which is not a multiple of group_size={g} (and of {PACK_FACTOR}); use a smaller "
                "tensor_parallel_size or a checkpoint with a group size that divides the per-rank size."
            )
        return -1 if g == geo.k_full else g

    def _create_quantized(self, layer, geo: LayerGeometry, group: int, vllm_loader) -> None:
        groups_full = 1 if group == -1 else geo.k_full // group
        groups_local = 1 if group == -1 else geo.k_local // group
        self.kernel_group_size = group
        wrap = self.expected.wrap_loader
        qweight = PackedvLLMParameter(
            data=torch.empty(geo.k_local // PACK_FACTOR, geo.n_local, dtype=torch.int32),
            input_dim=0,
            output_dim=1,
            packed_dim=0,
            packed_factor=PACK_FACTOR,
            weight_loader=wrap(QWEIGHT, vllm_loader),
        )
        layer.register_parameter(QWEIGHT, qweight)
        scales = self._group_param(groups_local, geo, CHECKPOINT_FLOAT, wrap(SCALES, vllm_loader))
        layer.register_parameter(SCALES, scales)
        if not self.glowq.sym:
            # Zero points arrive packed along N (ceil(N_i / 8) words per member), which cannot be
            # concatenated per shard when N_i % 8 != 0; they are stored unpacked until loaded.
            unpack = wrap(QZEROS, vllm_loader, transform=self._unpack_zeros)
            layer.register_parameter(QZEROS, self._group_param(groups_local, geo, torch.uint8, unpack))
        for i, (member, key) in enumerate(zip(self.plan.members, geo.shard_keys)):
            n = geo.n_full[i]
            self.expected.expect(QWEIGHT, key, ExpectedTensor(tensor_name(member, QWEIGHT), (geo.k_full // 8, n), True))
            self.expected.expect(SCALES, key, ExpectedTensor(tensor_name(member, SCALES), (groups_full, n), False))
            if not self.glowq.sym:
                zeros_shape = (groups_full, -(-n // PACK_FACTOR))
                self.expected.expect(QZEROS, key, ExpectedTensor(tensor_name(member, QZEROS), zeros_shape, True))

    def _group_param(self, groups_local: int, geo: LayerGeometry, dtype: torch.dtype, loader):
        """Per-group tensor [G, N]: sharded along groups in row-parallel layers, unless one group."""
        data = torch.empty(groups_local, geo.n_local, dtype=dtype)
        if geo.row_parallel and self.kernel_group_size == -1:
            return ChannelQuantScaleParameter(data=data, output_dim=1, weight_loader=loader)
        return GroupQuantScaleParameter(data=data, input_dim=0, output_dim=1, weight_loader=loader)

    def _unpack_zeros(self, packed: torch.Tensor, shard: ShardKey) -> torch.Tensor:
        n = self.geometry.n_full[self.geometry.shard_keys.index(shard)]
        return unpack_cols(packed, n)

    def _create_factors(self, layer, geo: LayerGeometry, vllm_loader) -> None:
        rank, dtype = self.glowq.rank, CHECKPOINT_FLOAT
        units = len(self.plan.factor_units)
        wrap = self.expected.wrap_loader
        if geo.row_parallel:
            b = RowvLLMParameter(data=torch.zeros(rank, geo.k_local, dtype=dtype), input_dim=1,
                                 weight_loader=wrap(FACTOR_B, vllm_loader))
            a = BasevLLMParameter(data=torch.zeros(geo.n_local, rank, dtype=dtype),
                                  weight_loader=wrap(FACTOR_A, vllm_loader))
        else:
            b = BasevLLMParameter(data=torch.zeros(units * rank, geo.k_full, dtype=dtype),
                                  weight_loader=wrap(FACTOR_B, self._load_stacked_b))
            a_transform = self._place_a_in_unit_block if units > 1 else None
            a = ChannelQuantScaleParameter(data=torch.zeros(geo.n_local, units * rank, dtype=dtype), output_dim=0,
                                           weight_loader=wrap(FACTOR_A, vllm_loader, transform=a_transform))
        layer.register_parameter(FACTOR_B, b)
        layer.register_parameter(FACTOR_A, a)
        for unit in self.plan.factor_units:
            if unit != self.plan.prefix and unit not in self.plan.members:
                continue  # the experts' B (a shared expert's gate/up): the expert layer copies it in
            key = None if unit == self.plan.prefix else geo.shard_keys[self.plan.members.index(unit)]
            self.expected.expect(FACTOR_B, key, ExpectedTensor(tensor_name(unit, FACTOR_B), (rank, geo.k_full), False))
        for i, (member, key) in enumerate(zip(self.plan.members, geo.shard_keys)):
            if self.plan.member_unit[i] is not None:
                shape = (geo.n_full[i], rank)
                self.expected.expect(FACTOR_A, key, ExpectedTensor(tensor_name(member, FACTOR_A), shape, False))

    def _unit_index(self, shard: ShardKey) -> int:
        if shard is None:
            return 0
        unit = self.plan.member_unit[self.geometry.shard_keys.index(shard)]
        assert unit is not None  # ExpectedTensors already refused B for members without factors
        return unit

    def _load_stacked_b(self, param: torch.nn.Parameter, weight: torch.Tensor, shard: ShardKey = None) -> None:
        """Column-parallel B is replicated: copy the unit's [r, K] into its row block."""
        rank = self.glowq.rank
        start = self._unit_index(shard) * rank
        param.data[start : start + rank].copy_(weight)

    def _place_a_in_unit_block(self, weight: torch.Tensor, shard: ShardKey) -> torch.Tensor:
        """[N_i, r] -> [N_i, U r] with A_i in its unit's column block, for `share == "module"`."""
        rank = self.glowq.rank
        block = torch.zeros(weight.shape[0], len(self.plan.factor_units) * rank, dtype=weight.dtype)
        start = self._unit_index(shard) * rank
        block[:, start : start + rank] = weight
        return block

    # ----- after loading -------------------------------------------------------------------

    def process_weights_after_loading(self, layer: torch.nn.Module) -> None:
        self.expected.raise_if_incomplete()
        vllm_kernel, vllm_refusal = self._choose_vllm_kernel()
        geo = self.geometry
        glowq_refusal = self._glowq_kernel_refusal(layer)
        tensor_core_refusal = glowq_refusal or self._tensor_core_refusal(layer)
        glowq_faster = self.has_factors and tensor_core_refusal is None and self._on_warpgroup_mma(layer)
        choice = kernel_choice.choose(kernel_choice.kernel_mode(), vllm_kernel and vllm_kernel.__name__,
                                      vllm_refusal, glowq_refusal, glowq_faster)
        if self.has_factors:
            for name in (FACTOR_A, FACTOR_B):  # plain Parameters for torch.compile (notes §7.2)
                data = getattr(layer, name).data.to(self.params_dtype)
                layer.register_parameter(name, torch.nn.Parameter(data.contiguous(), requires_grad=False))
        why = choice.why
        if choice.kind == kernel_choice.GLOWQ:
            why += f"; {self._use_glowq_kernel(layer, tensor_core_refusal)}"
        elif choice.kind == kernel_choice.VLLM:
            self._use_kernel(layer, vllm_kernel)
        else:
            self._use_dense_fallback(layer)
        _log_choice_once((geo.k_local, geo.n_local, self.glowq.group_size, self.has_factors), self.kernel_name, why)
        if self.has_factors and choice.kind != kernel_choice.GLOWQ:
            correction.register_layer(self.plan.prefix, layer, self._base_forward)

    def _kernel_config(self):
        geo = self.geometry
        return compat.mp_linear_layer_config(
            full_weight_shape=(geo.k_full, sum(geo.n_full)),
            partition_weight_shape=(geo.k_local, geo.n_local),
            weight_type=compat.int4_weight_type(self.glowq.sym),
            act_type=self.params_dtype,
            group_size=self.kernel_group_size,
            zero_points=not self.glowq.sym,
        )

    def _choose_vllm_kernel(self) -> tuple[type | None, str]:
        if not self.glowq.sym and self.geometry.n_local % PACK_FACTOR:
            return None, f"asymmetric zero points need out_features % {PACK_FACTOR} == 0 per rank"
        kernel_cls, reason = compat.choose_int4_kernel(self._kernel_config())
        return kernel_cls, reason or ""

    def _glowq_kernel_refusal(self, layer: torch.nn.Module) -> str | None:
        """Why the project's kernel cannot run this layer here, or None (imports no Triton on CPUs)."""
        device = layer.qweight.device
        if device.type != "cuda":
            return "the GlowQ int4 kernel runs on CUDA GPUs only"
        from .kernels import w4a16

        return w4a16.unsupported_reason(self.geometry.k_local, self.geometry.n_local, self._glowq_group_size(),
                                        self.params_dtype, device)

    def _tensor_core_refusal(self, layer: torch.nn.Module) -> str | None:
        """Why the project's tensor-core kernel (w4a16_mma.py) cannot run this layer, which the
        project's kernel can run (_glowq_kernel_refusal is None), or None."""
        from .kernels import w4a16

        return w4a16.mma_unsupported_reason(self.geometry.k_local, self.geometry.n_local, self._glowq_group_size(),
                                            self.params_dtype, layer.qweight.device)

    @staticmethod
    def _on_warpgroup_mma(layer: torch.nn.Module) -> bool:
        """Whether the tensor-core kernel runs here on Hopper's warpgroup MMA (where it was
        measured faster than vLLM's kernel with the correction beside it)."""
        from .kernels import w4a16

        return w4a16.has_warpgroup_mma(layer.qweight.device)

    def _glowq_group_size(self) -> int:
        return self.geometry.k_local if self.kernel_group_size == -1 else self.kernel_group_size

    def _use_glowq_kernel(self, layer: torch.nn.Module, refusal: str | None) -> str:
        """qweight repacked in place into the tensor-core kernel's layout (w4a16_mma.py) where
        Gluon runs it (`refusal` None: _tensor_core_refusal), else the Triton kernel's (same
        shape); scales [G, N] in the activation dtype, zero points uint8 [G, N] (as loaded); the
        shared workspace grows. Returns which of the two kernels it is, for the log."""
        from .kernels import w4a16

        geo, group = self.geometry, self._glowq_group_size()
        if refusal is None:
            layer.qweight.data = repack_fragments(layer.qweight.data, w4a16.fragments_block_k(geo.k_local, group))
            which = "the tensor-core kernel (Gluon)"
        else:
            layer.qweight.data = repack_planes(layer.qweight.data, w4a16.block_k_for(geo.k_local, group))
            which = f"the Triton kernel: {refusal}"
        layer.scales.data = layer.scales.data.to(self.params_dtype)
        rank = layer.glowq_A.shape[1] if self.has_factors else 0
        w4a16.workspace(layer.qweight.device).reserve(self.geometry.n_local, self.geometry.k_local, rank,
                                                      self.params_dtype)
        self.kernel_name = GLOWQ_KERNEL_NAME
        return which

    def _use_kernel(self, layer: torch.nn.Module, kernel_cls: type) -> None:
        """The zero-point parameter is named for symmetric codes too, as vLLM's own GPTQ and
        compressed-tensors schemes do: a kernel may need the name without zero points (the CPU
        kernel's W4A8 path on AMX hosts stores an implicit zero point of 8 under it and fails
        an assertion when it is None)."""
        layer.scales.data = layer.scales.data.to(self.params_dtype)  # kernels take act-dtype scales
        if not self.glowq.sym:
            packed = kernel_zero_points(layer.qzeros.data)
            layer.register_parameter(
                QZEROS, PackedvLLMParameter(data=packed, weight_loader=_loaded_already, **KERNEL_ZERO_POINT_DIMS))
        self.kernel = kernel_cls(self._kernel_config(), w_q_param_name=QWEIGHT, w_s_param_name=SCALES,
                                 w_zp_param_name=QZEROS)
        self.kernel.process_weights_after_loading(layer)
        self.kernel_name = kernel_cls.__name__

    def _use_dense_fallback(self, layer: torch.nn.Module) -> None:
        packed_zeros = None if self.glowq.sym else pack_cols(layer.qzeros.data)
        dense = dequantize(layer.qweight.data, layer.scales.data, packed_zeros, dtype=self.params_dtype)
        for name in (QWEIGHT, SCALES, QZEROS):
            if hasattr(layer, name):
                delattr(layer, name)
        layer.register_parameter("dense_weight", torch.nn.Parameter(dense, requires_grad=False))

    # ----- forward -------------------------------------------------------------------------

    def apply(self, layer: torch.nn.Module, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        """Base GEMM plus A (B x). Branches only on attributes fixed at load time, never on
        tensor values or token counts, so one Dynamo trace serves every batch (notes §7.1);
        a corrected layer or the project's kernel is one custom op, which chooses its
        kernels per call (correction.py)."""
        flat = x.reshape(-1, x.shape[-1])
        if self.kernel_name == GLOWQ_KERNEL_NAME:
            out = torch.ops.glowq.int4_linear(
                flat, layer.qweight, layer.scales, getattr(layer, QZEROS, None), bias,
                layer.glowq_B if self.has_factors else None, layer.glowq_A if self.has_factors else None,
                self._glowq_group_size())
        elif self.has_factors:
            out = torch.ops.glowq.linear(flat, bias, self.plan.prefix, self.geometry.n_local)
        else:
            return self._base_forward(layer, x, bias)
        return out.reshape(*x.shape[:-1], out.shape[-1])

    def _base_forward(self, layer: torch.nn.Module, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        if self.kernel is None:
            return F.linear(x, layer.dense_weight, bias)
        return self.kernel.apply_weights(layer, x, bias)


# vLLM's compressed-tensors zero-point layout [N / 8, G]: Marlin reads it as is; the CPU kernel
# and Machete permute by these recorded dims, so one layout serves every MPLinear kernel (§4.3).
KERNEL_ZERO_POINT_DIMS = dict(output_dim=0, input_dim=1, packed_dim=0, packed_factor=PACK_FACTOR)


def kernel_zero_points(zeros: torch.Tensor) -> torch.Tensor:
    """Unpacked zero points [G, N] -> [N / 8, G], eight output channels per int32."""
    return pack_rows(zeros.t().contiguous()).contiguous()


def _loaded_already(*_args, **_kwargs) -> None:
    raise RuntimeError("GlowQ zero points were repacked after loading and cannot be reloaded.")


def _log_choice_once(shape: tuple, kernel: str, why: str) -> None:
    """One line per layer shape (K, N, group size, corrected) and kernel: which int4 GEMM runs it."""
    if (shape, kernel) in _logged_choices:
        return
    _logged_choices.add((shape, kernel))
    k, n, group, corrected = shape
    what = f"GlowQ: layers of {k} -> {n} (group {group}{', corrected' if corrected else ''}) run {kernel} ({why})"
    if kernel == "dense-fallback":
        logger.warning("%s; no int4 kernel: they use dense dequantized weights.", what)
    else:
        logger.info("%s.", what)
