"""PMQ settings, and the checks a model's shape alone can decide before any weight is read.

Imports no torch: the workflow schema and the command line load this module to parse settings."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from slimmoe.tasks.core.settings import OnOneDevice, TaskConfig
from slimmoe.tasks.mcmoe.allocation import check_budget, check_candidates


class QuantizeConfig(OnOneDevice, TaskConfig):
    """PMQ settings. `avg_bits` is a per-MoE-layer budget over its routed experts: the average
    width never exceeds it and, with `exact_budget`, equals it whenever an allocation with exactly
    that average exists (see mcmoe/allocation.py). Uniform baselines: `candidate_bits=[b]`,
    `avg_bits=b`."""

    avg_bits: float = Field(2.5, gt=0, description="average expert width per MoE layer (budget)")
    candidate_bits: list[int] = Field(default_factory=lambda: [1, 2, 3, 4], description="widths an expert may get")
    paper_constraints: bool = Field(True, description="at least one expert at the highest and one at the second-highest width")
    exact_budget: bool = Field(True, description="use the whole budget (largest reachable total <= budget)")
    freq_exponent: float = Field(1.0, ge=0, description="a in freq^a * weight^b * loss")
    weight_exponent: float = Field(1.0, ge=0, description="b in freq^a * weight^b * loss")
    method: Literal["gptq", "rtn"] = "gptq"
    group_size: int = Field(128, ge=4, description="input columns per scale/zero group (min(group, in_features) used)")
    damp: float = Field(0.01, gt=0, description="GPTQ dampening, relative to the mean Hessian diagonal")
    clip_search: bool = Field(True, description="search a per-group range shrink that minimises |w - w_q|^2.4")
    attention_bits: int = Field(16, description="attention projections: 16 keeps them in keep_dtype, else 2..8 bits")
    shared_expert_bits: int = Field(16, description="shared experts: 16 keeps them in keep_dtype, else 2..8 bits")
    keep_dtype: Literal["auto", "float16", "bfloat16", "float32"] = Field(
        "auto", description="dtype of everything not quantized; auto = the checkpoint's 16-bit dtype, float16 for float32 checkpoints")
    device: str = Field("auto", description="auto | cpu | cuda | cuda:N: where calibration and GPTQ run")
    compute_dtype: Literal["float32", "bfloat16", "float16"] = Field(
        "float32", description="dtype the model is loaded in for the calibration pass (GPTQ itself runs in float32)")
    calibration_batches: int = Field(8, ge=1)
    batch_size: int = Field(4, ge=1)
    seq_len: int = Field(256, ge=2)
    text_field: str = "text"
    trust_remote_code: bool = False

    @field_validator("candidate_bits")
    @classmethod
    def _widths(cls, v: list[int]) -> list[int]:
        if not v or len(set(v)) != len(v) or any(b < 1 or b > 8 for b in v):
            raise ValueError(f"candidate_bits={v}: give distinct widths between 1 and 8")
        return sorted(v)

    @field_validator("attention_bits", "shared_expert_bits")
    @classmethod
    def _fixed_width(cls, v: int) -> int:
        if v != 16 and not 2 <= v <= 8:
            raise ValueError(f"fixed width {v}: use 16 (keep) or 2..8 bits")
        return v

    @model_validator(mode="after")
    def _budget_range(self) -> "QuantizeConfig":
        # Every expert gets one of the candidate widths, so no allocation averages outside their range; a
        # target above it would be capped silently at what the widest width (and the paper constraints) give.
        low, high = min(self.candidate_bits), max(self.candidate_bits)
        if self.avg_bits < low:
            raise ValueError(f"avg_bits={self.avg_bits:g} is below the smallest candidate width {low}: candidate_bits "
                             f"{self.candidate_bits} reach averages from {low} to {high} bits; raise avg_bits or add a "
                             "lower width to candidate_bits")
        if self.avg_bits > high:
            raise ValueError(f"avg_bits={self.avg_bits:g} is above the widest candidate width {high}: candidate_bits "
                             f"{self.candidate_bits} reach averages from {low} to {high} bits; lower avg_bits to at most "
                             f"{high} or add a wider width (up to 8) to candidate_bits")
        return self


def check_config_for_model(cfg: QuantizeConfig, config) -> None:
    """Every error the model's shape alone can reveal, before any weight is read."""
    from slimmoe.tasks.core.adapters import get_adapter  # torch: kept out of the config's import

    adapter = get_adapter(config)
    check_candidates(cfg.candidate_bits)
    check_budget(cfg.avg_bits, adapter.num_experts(config), cfg.candidate_bits, cfg.paper_constraints,
                 where="every MoE layer; set avg_bits / candidate_bits / paper_constraints")
