"""The shapes a cut can reach under a parameter budget, and what each loses: the science of `slimmoe search`.

A shape is (expert width, experts kept, KV heads). Parameter counts are the plan's (`planning.memory.
model_shape`: the model built on the meta device), but a grid of a large model has 10^5 shapes and a
meta model of a 42B config takes a second: the counts are exactly bilinear in (experts, width) plus
linear in KV heads (a routed expert's tensors are width-linear, there are `experts` of them, and the
inactive share of a layer is (experts - top-k) of them), so five meta counts fix them and a sixth
checks the form. Every candidate is a cut of one set of Taylor scores (`score_once`), so no candidate
rescores; the cut's loss is the held-out KL the early stop measures (`adaptive.HeldOutKL`).
"""

from __future__ import annotations

from dataclasses import dataclass
from fractions import Fraction
from typing import Callable, Iterable, Literal, Optional, Sequence

from pydantic import Field, model_validator

from slimmoe.tasks.core.dtypes import DTYPE_BYTES
from slimmoe.tasks.core.settings import TaskConfig
from slimmoe.tasks.slimming.config import ROW_ALIGN_BYTES, ModelSizes, SlimTargetError, SlimTargets, check_targets


class SearchConfig(TaskConfig):
    """What `slimmoe search` looks for: the targets (either or both) and how hard it looks."""

    # Floats on the command line so 2.4e9 can be written; `budget` counts them in whole parameters.
    target_params: Optional[float] = Field(None, gt=0, description="the most total parameters, e.g. 2.4e9")
    target_active_params: Optional[float] = Field(None, gt=0, description="the most parameters one token "
                                                                          "touches, e.g. 6.6e8")
    stage: Optional[str] = Field(None, description="the stage whose input model is cut (default: the first)")
    candidates: int = Field(8, gt=0, description="the shapes closest to the targets that are cut and scored")
    top: int = Field(3, gt=0, description="the best shapes after the cut that get the short distillation")
    distill_steps: int = Field(0, ge=0, description="optimizer steps of the short distillation (0: one-shot only)")
    serve_tp: list[int] = Field(default_factory=list, description="only shapes vLLM/SGLang can split over these "
                                                                  "GPU counts, e.g. 1,2,4,8")
    gpu: Optional[Literal["a100", "h100", "h200"]] = Field(None, description="estimate the time on this GPU")

    @model_validator(mode="after")
    def _a_target(self):
        if self.target_params is None and self.target_active_params is None:
            raise ValueError("no target: give --target-params, --target-active-params, or both (e.g. 2.4e9)")
        if any(tp <= 0 for tp in self.serve_tp):
            raise ValueError(f"--serve-tp {','.join(map(str, self.serve_tp))}: GPU counts must be above 0")
        return self

    @property
    def budget(self) -> "Budget":
        return Budget(None if self.target_params is None else int(self.target_params),
                      None if self.target_active_params is None else int(self.target_active_params))


@dataclass(frozen=True)
class Shape:
    """One candidate: the sizes of its cut and its parameters (total, active per token)."""

    expert_intermediate_size: int
    num_experts: int
    num_key_value_heads: int
    total: int
    active: int

    def targets(self, sizes: ModelSizes) -> SlimTargets:
        """The cut to this shape from `sizes`: a size it keeps is left unset, so the stage's config stays
        what a user would write (and a family that cannot cut heads is not asked to)."""
        return SlimTargets(self.expert_intermediate_size,
                           None if self.num_key_value_heads == sizes.num_key_value_heads else self.num_key_value_heads,
                           None, None if self.num_experts == sizes.num_experts else self.num_experts)

    def label(self) -> str:
        return f"width {self.expert_intermediate_size}, {self.num_experts} experts, {self.num_key_value_heads} KV"


# -- parameter counts -----------------------------------------------------------------------------------

Counts = Callable[[int, int, int], tuple[int, int]]  # (width, experts, kv) -> (total, active)


def meta_counts(config, width: int, experts: int, kv: int) -> tuple[int, int]:
    """(total, active) of `config` cut to the shape, counted as the plan counts (meta device)."""
    from slimmoe.tasks.planning.memory import model_shape
    from slimmoe.tasks.slimming.surgery import slimmed_config

    shape = model_shape(slimmed_config(config, SlimTargets(width, kv, None, experts)))
    return shape.total, shape.active


def count_function(config, sizes: ModelSizes) -> Counts:
    """(total, active) of any shape of `config`, from six meta-device counts (see the module docstring).
    Raises if the sixth count disagrees with the form the other five fix: a family the form does not
    describe must not be searched on wrong counts."""
    width, experts, kv = sizes.expert_intermediate_size, sizes.num_experts, sizes.num_key_value_heads
    w2 = max(1, width // 2)
    e2 = max(1, experts - sizes.expert_groups)
    kv2 = max(1, kv - 1) if sizes.adapter is not None and sizes.adapter.head_pruning else kv

    def fit(index: int) -> Callable[[int, int, int], Fraction]:
        corner = {(w, e): meta_counts(config, w, e, kv)[index] for w in (width, w2) for e in (experts, e2)}
        kv_slope = Fraction(meta_counts(config, width, experts, kv2)[index] - corner[width, experts], kv2 - kv) \
            if kv2 != kv else Fraction(0)

        def value(w: int, e: int, k: int) -> Fraction:
            # Bilinear interpolation through the four corners is exact for a bilinear count.
            tw = Fraction(w - w2, width - w2) if width != w2 else Fraction(0)
            te = Fraction(e - e2, experts - e2) if experts != e2 else Fraction(0)
            g = (corner[w2, e2] * (1 - tw) * (1 - te) + corner[width, e2] * tw * (1 - te)
                 + corner[w2, experts] * (1 - tw) * te + corner[width, experts] * tw * te)
            return g + kv_slope * (k - kv)

        return value

    total, active = fit(0), fit(1)

    def counts(w: int, e: int, k: int) -> tuple[int, int]:
        return int(total(w, e, k)), int(active(w, e, k))

    check = (max(1, width // 3), max(1, experts - 2 * sizes.expert_groups), max(1, kv2 - 1) if kv2 != kv else kv)
    if counts(*check) != meta_counts(config, *check):
        raise ValueError(f"{sizes.adapter.model_type if sizes.adapter else 'this model'}'s parameter count is not "
                         "bilinear in expert width and count; the search cannot count its shapes")
    return counts


# -- the grid -------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Budget:
    """The targets, either or both: the most total and active parameters a shape may have."""

    total: Optional[int] = None
    active: Optional[int] = None

    def meets(self, total: int, active: int) -> bool:
        return (self.total is None or total <= self.total) and (self.active is None or active <= self.active)

    def shortfall(self, shape: Shape) -> float:
        """How far below the targets a shape stays (summed relative gaps; 0 = exactly on them): closest first."""
        return sum(1 - value / target for value, target in ((shape.total, self.total), (shape.active, self.active))
                   if target)

    def overshoot(self, shape: Shape) -> float:
        """The worst ratio of a shape's counts to the targets: the nearest infeasible shape has the smallest."""
        return max(value / target for value, target in ((shape.total, self.total), (shape.active, self.active))
                   if target)


@dataclass(frozen=True)
class Grid:
    """Every count of experts and KV heads a cut may keep, and the widths on the kernel's row alignment."""

    widths: list[int]  # descending
    experts: list[int]
    kv_heads: list[int]


def shape_grid(sizes: ModelSizes, dtype: str) -> Grid:
    align = ROW_ALIGN_BYTES // DTYPE_BYTES[dtype]
    widths = list(range((sizes.expert_intermediate_size - 1) // align * align, 0, -align))
    n, step = sizes.num_experts, sizes.expert_groups
    experts = [e for e in range(step, n + 1, step) if e >= (sizes.experts_per_token or 1)]
    kv = list(range(1, sizes.num_key_value_heads + 1)) if sizes.adapter is None or sizes.adapter.head_pruning \
        else [sizes.num_key_value_heads]
    return Grid(widths, experts, kv)


def _valid(sizes: ModelSizes, shape: Shape, dtype: str, tensor_parallel: Sequence[int], block_fp8: bool) -> bool:
    try:  # the one rule for a valid cut, serving included
        check_targets(sizes, shape.targets(sizes), dtype=dtype, tensor_parallel=tensor_parallel, block_fp8=block_fp8)
    except SlimTargetError:
        return False
    return True


def enumerate_shapes(sizes: ModelSizes, counts: Counts, dtype: str, budget: Budget,
                     tensor_parallel: Sequence[int] = (), block_fp8: bool = False) -> list[Shape]:
    """The shapes within `budget`, closest to it first: for every (experts, KV heads) the widest valid
    width that fits (a narrower one of the same counts has fewer parameters for nothing)."""
    grid = shape_grid(sizes, dtype)
    out = []
    for e in grid.experts:
        for kv in grid.kv_heads:
            for w in grid.widths:
                shape = Shape(w, e, kv, *counts(w, e, kv))
                if budget.meets(shape.total, shape.active) and _valid(sizes, shape, dtype, tensor_parallel, block_fp8):
                    out.append(shape)
                    break
    return sorted(out, key=lambda s: (budget.shortfall(s), -s.active, -s.total))


def nearest_feasible(sizes: ModelSizes, counts: Counts, dtype: str, budget: Budget,
                     tensor_parallel: Sequence[int] = (), block_fp8: bool = False) -> Optional[Shape]:
    """When no shape meets `budget`: the valid shape whose counts overshoot it least (each (experts, KV
    heads) at its narrowest valid width), whose counts are the nearest targets that can be met."""
    grid = shape_grid(sizes, dtype)
    smallest = []
    for e in grid.experts:
        for kv in grid.kv_heads:
            for w in reversed(grid.widths):
                shape = Shape(w, e, kv, *counts(w, e, kv))
                if _valid(sizes, shape, dtype, tensor_parallel, block_fp8):
                    smallest.append(shape)
                    break
    return min(smallest, key=budget.overshoot, default=None)


# -- scoring once, cutting each ---------------------------------------------------------------------------

def score_once(model, cfg, cache, cuts_the_teacher: bool):
    """The Taylor scores of every structure a candidate may cut (neurons, KV groups, whole experts),
    from the calibration batches and loss the stage itself scores with, so the chosen shape's one-shot
    cut is the stage's."""
    from slimmoe.tasks.core.adapters import get_adapter
    from slimmoe.tasks.slimming.scores import score_model
    from slimmoe.tasks.slimming.student import CALIBRATION_SEED_OFFSET, scoring_loss

    _, loss_fn = scoring_loss(cfg, cuts_the_teacher)
    batches = cache.iter_batches(cfg.micro_batch, rank=0, world_size=1, shuffle=True,
                                 seed=cfg.seed + CALIBRATION_SEED_OFFSET)
    calib = [b for _, b in zip(range(cfg.calibration_batches), batches)]
    return score_model(model, calib, loss_fn, with_heads=get_adapter(model).head_pruning,
                       expert_score=cfg.expert_score)


def cut(model, scores, targets: SlimTargets):
    """`model` cut to `targets` by `scores`: a new model; `model` is left as it was."""
    from slimmoe.tasks.slimming.surgery import apply_plan, keep_plan

    return apply_plan(model, keep_plan(model.config, scores, targets, model=model))


def heldout_kl(model, cache, rows: int, batch_size: int, device) -> float:
    """Mean per-token KL to the teacher on the last `rows` rows of a validation logit cache."""
    from slimmoe.tasks.slimming.adaptive import HeldOutKL

    return HeldOutKL(cache, rows, rank=0, world=1, batch_size=batch_size)(model, device)


def spread_targets(sizes: ModelSizes, final: SlimTargets, stages: int, dtype: str) -> list[SlimTargets]:
    """Targets for `stages` stages in a row from `sizes` to `final`, evenly spaced (the gradual cut's
    rule: widths on the row alignment, counts rounded up); raises ValueError when the widths cannot
    shrink at every stage."""
    from types import SimpleNamespace

    from slimmoe.tasks.slimming.config import gradual_cuts

    if stages == 1:
        return [final]
    spread = SimpleNamespace(cut_steps=stages, targets=final, **final.__dict__)  # what gradual_cuts reads
    cuts = gradual_cuts(spread, sizes, total_steps=stages, dtype=dtype)
    return [SlimTargets(c.targets.expert_intermediate_size,
                        None if c.targets.num_key_value_heads == sizes.num_key_value_heads else c.targets.num_key_value_heads,
                        c.targets.shared_expert_intermediate_size,
                        None if c.targets.num_experts == sizes.num_experts else c.targets.num_experts) for c in cuts]


def rank_correlation(a: Iterable[float], b: Iterable[float]) -> Optional[float]:
    """Spearman's rank correlation (None below 3 pairs)."""
    a, b = list(a), list(b)
    if len(a) < 3:
        return None

    def ranks(xs):
        order = sorted(range(len(xs)), key=lambda i: xs[i])
        out = [0.0] * len(xs)
        for r, i in enumerate(order):
            out[i] = float(r)
        return out

    ra, rb = ranks(a), ranks(b)
    n = len(a)
    ma, mb = sum(ra) / n, sum(rb) / n
    cov = sum((x - ma) * (y - mb) for x, y in zip(ra, rb))
    sa = sum((x - ma) ** 2 for x in ra) ** 0.5
    sb = sum((y - mb) ** 2 for y in rb) ** 0.5
    return cov / (sa * sb) if sa and sb else None
