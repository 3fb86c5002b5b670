"""Input second moments of the linears, accumulated by forward hooks during calibration."""

from __future__ import annotations

import torch


class SecondMoment:
    """Running X^T X / n of one input, with shrinkage toward a scaled identity.

    Products are formed in fp32 (fast on any device) and summed in fp64, so millions of
    tokens do not lose precision.
    """

    def __init__(self, features: int, device: torch.device) -> None:
        self.sum = torch.zeros(features, features, dtype=torch.float64, device=device)
        self.count = 0

    def update(self, x: torch.Tensor) -> None:
        rows = x.detach().reshape(-1, x.shape[-1]).to(torch.float32)
        self.sum += (rows.T @ rows).to(torch.float64)
        self.count += rows.shape[0]

    def finalize(self, shrinkage: float) -> torch.Tensor:
        """(1 - a) Sigma + a (tr(Sigma) / d) I; shrinkage keeps Sigma positive definite."""
        if self.count == 0:
            raise RuntimeError("no calibration tokens reached this module")
        sigma = self.sum / self.count
        scale = torch.trace(sigma) / sigma.shape[0]
        return (1 - shrinkage) * sigma + shrinkage * scale * torch.eye(
            sigma.shape[0], dtype=sigma.dtype, device=sigma.device
        )


class InputStatistics:
    """Hooks that feed one SecondMoment per input set; `remove()` detaches them all."""

    def __init__(self) -> None:
        self.moments: dict[str, SecondMoment] = {}
        self._handles: list[torch.utils.hooks.RemovableHandle] = []

    def watch(self, key: str, module: torch.nn.Linear) -> None:
        moment = SecondMoment(module.in_features, module.weight.device)
        self.moments[key] = moment
        self._handles.append(module.register_forward_pre_hook(lambda _m, args: moment.update(args[0])))

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
