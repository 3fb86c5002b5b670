"""GlowQ-S: which units keep their low-rank correction.

Units are ranked by an importance metric (computed per unit during calibration) and the top
ones are restored. How many: all, a fraction, a count, a byte budget, or `auto`, which
measures held-out perplexity while adding units in importance order (heldout.py, one layer at
a time) and takes the elbow of that curve (see `elbow`). `glowq-eval --sweep` draws the same
curves for a whole checkpoint in memory (`perplexity_curve`).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from .evaluate import mean_nll

METRICS = (
    "singular_sum",  # sum of the kept singular values of the whitened error (= ||A||_F^2)
    "gain",  # whitened error energy the correction removes (sum of kept squared singular values)
    "norm_error",  # ||E|| / ||W||
    "frobenius",  # ||E||
    "cosine",  # 1 - cos(W, deq(Wq))
    "whitened_norm_error",  # ||E S|| / ||W S||, S = Sigma^{1/2}
    "whitened_frobenius",  # ||E S||
    "whitened_cosine",  # 1 - cos(W S, deq(Wq) S)
)
FACTOR_BYTES = 2  # factors are stored as float16
AUTO_MAX_POINTS = 33  # perplexity evaluations at most for `auto` (k = 0 and all included)


class SelectionError(ValueError):
    pass


@dataclass
class Selection:
    restored: list[str]
    ranking: list[str] = field(default_factory=list)
    rule: str = "all"
    curve: list[dict] = field(default_factory=list)

    def summary(self) -> dict:
        return {"rule": self.rule, "restored": len(self.restored), "ranking": self.ranking, "curve": self.curve}


def parse_restore(value: str) -> tuple[str, float | int | None]:
    """'all' | 'auto' | FRACTION (has a '.', in (0, 1]) | COUNT (an integer >= 0)."""
    if value in ("all", "auto"):
        return value, None
    try:
        number = float(value) if "." in value else int(value)
    except ValueError:
        raise SelectionError(f"--restore {value!r} is not all, auto, a fraction like 0.5 or a count like 12") from None
    if isinstance(number, float):
        if not 0.0 < number <= 1.0:
            raise SelectionError(f"--restore fraction {value} is outside (0, 1]")
        return "fraction", number
    if number < 0:
        raise SelectionError(f"--restore count {number} is negative")
    return "count", number


def validate_selection_options(options) -> None:
    if options.metric not in METRICS:
        raise SelectionError(f"--metric {options.metric!r} is unknown; choose from {', '.join(METRICS)}")
    parse_restore(options.restore)
    if options.max_extra_bytes is not None and options.max_extra_bytes <= 0:
        raise SelectionError(f"--max-extra-bytes must be positive, got {options.max_extra_bytes}")


def rank_units(units, metric: str) -> list:
    """Units with factors, most important first (ties keep layer order)."""
    with_factors = [u for u in units if u.has_factors]
    return sorted(with_factors, key=lambda u: -u.metrics[metric])


def elbow(points: list[tuple[int, float]]) -> int:
    """The k at the elbow of a perplexity curve [(k, ppl)], k ascending from 0 to N.

    Rule (Kneedle): scale k to x in [0, 1] and the improvement ppl(0) - ppl(k) to y in [0, 1]
    (1 = the improvement of restoring everything); the elbow is the k maximising y - x, i.e. the
    point after which each further unit buys less than the average unit. Ties go to the smaller
    k. If no point lies above the chord (the gain is linear or comes late), there is no elbow
    and every unit is restored; if restoring does not improve perplexity at all, none is.
    """
    k_max = points[-1][0]
    first, last = points[0][1], points[-1][1]
    if k_max == 0 or not first > last:
        return 0
    best_k, best_score = k_max, 0.0
    for k, ppl in points:
        score = (first - ppl) / (first - last) - k / k_max
        if score > best_score + 1e-12:
            best_k, best_score = k, score
    return best_k


def set_restored(model, units, restored: set[str]) -> None:
    """Switch the reference model's correction on for the restored units only."""
    from .architectures import spec_for

    spec = spec_for(model.config)
    for unit in units:
        for member in unit.members:
            model.get_submodule(spec.module_path(member)).correct = unit.name in restored


def perplexity_curve(model, ranked, windows: torch.Tensor, ks: list[int], device, desc: str) -> list[dict]:
    curve = []
    for k in tqdm(ks, desc=desc, unit="point"):
        set_restored(model, ranked, {u.name for u in ranked[:k]})
        curve.append({"k": k, "perplexity": math.exp(mean_nll(model, windows, device))})
    return curve


def curve_points(n: int, max_points: int = AUTO_MAX_POINTS) -> list[int]:
    if n + 1 <= max_points:
        return list(range(n + 1))
    return sorted({round(i * n / (max_points - 1)) for i in range(max_points)})


def _budget_count(ranked, max_bytes: int) -> int:
    used, count = 0, 0
    for unit in ranked:
        if used + unit.extra_params * FACTOR_BYTES > max_bytes:
            break
        used += unit.extra_params * FACTOR_BYTES
        count += 1
    if count == 0 and ranked:
        smallest = min(u.extra_params for u in ranked) * FACTOR_BYTES
        raise SelectionError(
            f"--max-extra-bytes {max_bytes} is too small for any unit: the most important unit needs "
            f"{ranked[0].extra_params * FACTOR_BYTES} bytes (the smallest {smallest})"
        )
    return count


def select_units(result, options, measure_curve: Callable[[list, list[int]], list[dict]] | None) -> Selection:
    """Apply --restore / --max-extra-bytes / --metric to the calibrated units. For `auto`,
    `measure_curve(ranked units, ks)` gives the held-out perplexity with the top k restored."""
    ranked = rank_units(result.units, options.metric) if options.rank > 0 else []
    kind, value = parse_restore(options.restore)
    if kind == "count" and value > len(ranked):
        raise SelectionError(f"--restore {value} asks for more units than the model has ({len(ranked)})")
    names = [u.name for u in ranked]
    count = {
        "all": len(ranked),
        "fraction": max(1, round((value or 0) * len(ranked))) if ranked else 0,
        "count": value,
    }.get(kind)
    curve: list[dict] = []
    if kind == "auto":
        curve = measure_curve(ranked, curve_points(len(ranked))) if ranked else []
        count = elbow([(p["k"], p["perplexity"]) for p in curve]) if curve else 0
    if options.max_extra_bytes is not None:
        count = min(count, _budget_count(ranked, options.max_extra_bytes))
    rule = options.restore if options.max_extra_bytes is None else f"{options.restore}, <= {options.max_extra_bytes} B"
    chosen = set(names[:count])
    return Selection([u.name for u in result.units if u.name in chosen], names, rule, curve)
