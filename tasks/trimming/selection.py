"""What to remove, chosen from the trimming statistics, and the surgery that removes it."""

from __future__ import annotations

from slimmoe.tasks.trimming.config import TrimConfig
from slimmoe.tasks.trimming.scores import TrimStats
from slimmoe.tasks.trimming.surgery import block_drop, choose_experts, expert_drop, layer_drop


def choose(cfg: TrimConfig, config, stats: TrimStats) -> dict:
    """What to remove, from the statistics: {"experts": {layer: [ids]}} or {"layers": [ids]}."""
    if cfg.method == "expert-drop":
        return {"experts": choose_experts(config, stats.expert_scores(cfg.expert_score), cfg.n)}
    if cfg.method == "layer-drop":
        change = stats.moe_change()
        order = sorted(change, key=lambda l: (change[l], l))  # least change first
        return {"layers": sorted(order[: cfg.n])}
    cos = stats.layer_cosine()
    order = sorted(cos, key=lambda l: (-cos[l], l))  # most identity-like first
    return {"layers": sorted(order[: cfg.n])}


def trim_model(model, cfg: TrimConfig, stats: TrimStats, removal: dict | None = None):
    removal = removal or choose(cfg, model.config, stats)
    if cfg.method == "expert-drop":
        return expert_drop(model, removal["experts"]), removal
    if cfg.method == "layer-drop":
        return layer_drop(model, removal["layers"]), removal
    return block_drop(model, removal["layers"]), removal
