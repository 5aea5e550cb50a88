"""Parameter counts as the MoE papers report them: total, and active per token."""

from __future__ import annotations

from torch import nn

from slimmoe.tasks.core.adapters import get_adapter


def _numel(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def count_parameters(model: nn.Module) -> dict[str, int]:
    """total: every distinct parameter (tied embeddings once); active: what one token touches —
    embeddings, attention, norms, routers, shared experts, the top-k routed experts, and the head.

    `embedding` is the input embedding plus the output head (once if tied), so users can compare
    with papers that leave embeddings out (total - embedding)."""
    adapter = get_adapter(model)
    cfg = model.config
    total = sum(p.numel() for p in model.parameters())  # parameters() yields a tied tensor once
    routed = 0
    inactive = 0
    n_experts, top_k = adapter.num_experts(cfg), adapter.top_k(cfg)
    for _, block in adapter.moe_blocks(model):
        expert_params = _numel(block.experts)
        routed += expert_params
        inactive += expert_params * (n_experts - top_k) // n_experts
    emb = {id(p): p.numel() for p in model.get_input_embeddings().parameters()}
    out_emb = model.get_output_embeddings()
    if out_emb is not None:
        emb.update({id(p): p.numel() for p in out_emb.parameters()})
    return {
        "total": total,
        "active": total - inactive,
        "routed_experts": routed,
        "embedding": sum(emb.values()),
        "num_experts": n_experts,
        "experts_per_token": top_k,
    }


def count_parameters_from_config(config) -> dict[str, int]:
    """Counts for a config without allocating weights (meta device): for 40B-class models."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return count_parameters(model)


def format_count(n: int) -> str:
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f}{unit}"
    return str(n)
