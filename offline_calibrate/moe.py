"""Mixture-of-Experts blocks in the calibration pipeline.

transformers 5 keeps a block's experts as fused 3-D parameters (`experts.gate_up_proj`
[E, 2I, H], `experts.down_proj` [E, H, I]) with no nn.Linear per expert, so nothing can be
hooked per expert. Instead one hook on the experts module sees its input x and the routing
(`experts(x, top_k_index, top_k_weights)`) and recomputes what each expert's down projection
reads, act(x W_gate^T) * (x W_up^T), from the tokens routed to that expert.

Units (vllm_glowq.format): every expert's gate and up read the block input x, so in group
mode they form one unit with one B, solved like any other unit over the second moment of x
taken over all calibration tokens (the QR reduction in factorize keeps it a K x K problem
however many experts there are); a shared expert's gate/up join it. Each expert's down
projection is its own unit with the second moment of its own routed inputs. An expert that
receives no calibration token has no statistics and gets no factors (plain int4, with a
warning); one that receives fewer tokens than its down projection has inputs is fitted on a
rank-deficient second moment that only the shrinkage keeps positive definite, so it is
warned about and listed in the report.
"""

from __future__ import annotations

import dataclasses
import logging
from types import SimpleNamespace

import torch
import torch.nn.functional as F

from vllm_glowq.moe_layout import ExpertsSpec, is_fused_experts

from .architectures import ArchitectureSpec
from .options import CalibrationOptions
from .statistics import SecondMoment

_LOG = logging.getLogger(__name__)
ROUTER_REASON = "router: routing stays in full precision"


class MoEError(ValueError):
    pass


def experts_module(layer: torch.nn.Module, spec: ExpertsSpec) -> torch.nn.Module:
    """The layer's fused experts module, after checking it is the transformers 5 layout."""
    experts = layer.get_submodule(f"{spec.block}.experts")
    if not is_fused_experts(experts):
        raise MoEError(
            f"the experts module {type(experts).__name__} has no fused 3-D gate_up_proj parameter; "
            "glowq-calibrate needs the transformers 5 expert layout (upgrade transformers to >= 5)."
        )
    return experts


@dataclasses.dataclass(frozen=True)
class ExpertNames:
    """Checkpoint names of one MoE block's modules (`prefix` is e.g. `model.layers.3.mlp`)."""

    prefix: str
    spec: ExpertsSpec
    num_experts: int

    def projection(self, expert: int, which: int) -> str:
        """which: 0 gate, 1 up, 2 down."""
        return f"{self.prefix}.experts.{expert}.{self.spec.projections[which]}"

    def gate_up_members(self) -> list[str]:
        names = [self.projection(e, w) for e in range(self.num_experts) for w in (0, 1)]
        if self.spec.shared_expert is not None:
            names += [f"{self.prefix}.{self.spec.shared_expert}.{leaf}" for leaf in ("gate_proj", "up_proj")]
        return names


def block_names(layer: torch.nn.Module, layer_prefix: str, spec: ArchitectureSpec) -> ExpertNames:
    experts = experts_module(layer, spec.experts)
    return ExpertNames(f"{layer_prefix}.{spec.experts.checkpoint_block}", spec.experts, experts.gate_up_proj.shape[0])


class ExpertStatistics:
    """Second moments of one MoE block: of its input (all tokens) and, per expert, of its down
    projection's input (the tokens routed to that expert), with each expert's token count."""

    def __init__(self, experts: torch.nn.Module) -> None:
        self.experts = experts
        num, _, hidden = experts.gate_up_proj.shape
        self.block_input = SecondMoment(hidden, experts.gate_up_proj.device)
        self.down_inputs: dict[int, SecondMoment] = {}
        self.tokens = [0] * num
        self._handle = experts.register_forward_pre_hook(self._observe)

    def _observe(self, _module, args) -> None:
        x, top_k_index = args[0], args[1]
        self.block_input.update(x)
        x = x.reshape(-1, x.shape[-1])
        routed = top_k_index.reshape(x.shape[0], -1)
        for expert in torch.unique(routed).tolist():
            rows = (routed == expert).any(dim=-1)
            gate, up = F.linear(x[rows], self.experts.gate_up_proj[expert]).chunk(2, dim=-1)
            hidden = self.experts.act_fn(gate) * up
            if expert not in self.down_inputs:
                self.down_inputs[expert] = SecondMoment(hidden.shape[-1], hidden.device)
            self.down_inputs[expert].update(hidden)
            self.tokens[expert] += int(rows.sum())

    def remove(self) -> None:
        self._handle.remove()


def check_block_rank(names: ExpertNames, experts: torch.nn.Module, options: CalibrationOptions) -> None:
    _, two_i, hidden = experts.gate_up_proj.shape
    limit = min(hidden, two_i // 2)  # a down unit; and a gate/up unit with --share module
    what = f"{names.prefix}.experts.*.{names.spec.projections[2]}"
    if options.rank > limit:
        raise MoEError(
            f"--rank {options.rank} is larger than the error matrix of {what} allows "
            f"(at most {limit} = min(out_features, in_features))"
        )


def expert_weights(experts: torch.nn.Module, names: ExpertNames) -> dict[str, torch.Tensor]:
    """Every expert projection's [out, in] weight, a view of the fused parameters, by name."""
    half = experts.gate_up_proj.shape[1] // 2
    out = {}
    for e in range(names.num_experts):
        out[names.projection(e, 0)] = experts.gate_up_proj.data[e, :half]
        out[names.projection(e, 1)] = experts.gate_up_proj.data[e, half:]
        out[names.projection(e, 2)] = experts.down_proj.data[e]
    return out


def _projection(weight: torch.Tensor) -> SimpleNamespace:
    """An expert's slice of a fused parameter, shaped like the nn.Linear the pipeline expects."""
    return SimpleNamespace(weight=weight, in_features=weight.shape[1])


def calibrate_block(layer, names: ExpertNames, stats: ExpertStatistics | None, options: CalibrationOptions,
                    result, output) -> None:
    """Quantize and factorize one MoE block: the experts' gate/up unit, then each down unit."""
    from .pipeline import calibrate_input_set

    spec = names.spec
    experts = experts_module(layer, spec)
    half = experts.gate_up_proj.shape[1] // 2
    weights = expert_weights(experts, names)
    modules = [_projection(weights[names.projection(e, w)]) for e in range(names.num_experts) for w in (0, 1)]
    if spec.shared_expert is not None:
        shared = layer.get_submodule(f"{spec.block}.{spec.shared_expert}")
        modules += [shared.gate_proj, shared.up_proj]
    sigma = None if stats is None else stats.block_input.finalize(options.shrinkage)
    calibrate_input_set(names.gate_up_members(), modules, sigma, options, result, output)
    starved = []
    for e in range(names.num_experts):
        down = [_projection(weights[names.projection(e, 2)])]
        moment = None if stats is None else stats.down_inputs.get(e)
        expert_options = options
        if stats is not None and moment is None:
            expert_options = dataclasses.replace(options, rank=0)  # no statistics: plain int4
        elif stats is not None and stats.tokens[e] < half:
            starved.append(e)
        sigma = None if moment is None else moment.finalize(options.shrinkage)
        calibrate_input_set([names.projection(e, 2)], down, sigma, expert_options, result, output)
    for router in spec.full_precision:
        result.skipped[f"{names.prefix}.{router}"] = ROUTER_REASON
    if stats is not None:
        _record_routing(names, stats, starved, half, result)


def _record_routing(names: ExpertNames, stats: ExpertStatistics, starved: list[int], features: int, result) -> None:
    unused = [e for e, n in enumerate(stats.tokens) if n == 0]
    if unused:
        _LOG.warning("%s: experts %s received no calibration tokens; their %s keep no correction "
                     "(plain int4). Calibrate on more or more varied text to cover them.",
                     names.prefix, unused, names.spec.projections[2])
    if starved:
        _LOG.warning("%s: experts %s received fewer calibration tokens than their %s has inputs (%d); "
                     "their correction rests on the covariance shrinkage.",
                     names.prefix, starved, names.spec.projections[2], features)
    result.experts[names.prefix] = {"tokens": list(stats.tokens), "without_tokens": unused, "few_tokens": starved}


def correction_parameters(hidden: int, intermediate: int, num_experts: int, rank: int,
                          shared_intermediate: int = 0) -> dict[str, int]:
    """Factor parameters of one MoE block's experts (and shared expert) at `rank`, by how the
    gate/up Bs are shared: `glowq` one B for the block, `per_expert` one per expert (its gate
    and up sharing it), `per_module` one per projection (`--share module`). Every down
    projection has its own (A, B) in all three."""
    gate_up_rows = 2 * (num_experts * intermediate + shared_intermediate)
    downs = num_experts * rank * (intermediate + hidden)
    if shared_intermediate:
        downs += rank * (shared_intermediate + hidden)
    b = rank * hidden
    experts_with_b = num_experts + (1 if shared_intermediate else 0)
    return {
        "A_gate_up": gate_up_rows * rank,
        "down": downs,
        "B_glowq": b,
        "B_per_expert": experts_with_b * b,
        "B_per_module": 2 * experts_with_b * b,
    }
