"""Calibration statistics for expert trimming: how much each expert, MoE block and decoder layer matters.

One no-grad pass over the calibration batches, with forward hooks, collects per layer:

- experts: how many tokens each expert received and the routing weight it received. The hook sits
  on the input of the block's fused experts module, so it sees exactly the top-k indices and
  weights the block feeds its experts, whatever the family's router does to get them (PhiMoE's
  sparsemixer, DeepSeek-V3's group-limited, bias-corrected and scaled choice, GPT-OSS's softmax
  over the top-k logits). Every family's router in transformers 5 also returns (logits, weights,
  indices); the experts' input is the same pair after the block's own reshaping.
- optionally, per expert, the squared norm of its weighted contribution to the MoE block output:
  removing the expert by zeroing its routing weight (no renormalisation of the others, no other
  expert routed in its place) changes the block output by exactly this contribution.
- MoE blocks: 1 - cos(h, h + moe(h)) per token, where h is the residual stream entering the MoE
  sublayer; h is recovered as (layer output - MoE output), which holds for every supported family
  (each adds the MoE output to the residual stream as the layer's last step).
- decoder layers: cos(layer input, layer output) per token.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Iterable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from slimmoe.tasks.core.adapters import get_adapter

EXPERT_SCORES = ("frequency", "reconstruction")


@dataclass
class TrimStats:
    tokens: int = 0
    batches: int = 0
    num_experts: int = 0
    expert_counts: dict[int, torch.Tensor] = field(default_factory=dict)  # [E] tokens routed to the expert
    expert_weight_sum: dict[int, torch.Tensor] = field(default_factory=dict)  # [E] sum of its routing weights
    expert_recon_sq: dict[int, torch.Tensor] = field(default_factory=dict)  # [E] sum ||w * expert(x)||^2
    moe_change_sum: dict[int, float] = field(default_factory=dict)  # sum over tokens of 1 - cos
    layer_cos_sum: dict[int, float] = field(default_factory=dict)  # sum over tokens of cos(in, out)

    # -- derived scores ---------------------------------------------------------------------------

    def frequency(self, layer: int) -> torch.Tensor:
        return self.expert_counts[layer] / max(self.tokens, 1)

    def mean_weight(self, layer: int) -> torch.Tensor:
        return self.expert_weight_sum[layer] / self.expert_counts[layer].clamp(min=1)

    def expert_scores(self, kind: str) -> dict[int, torch.Tensor]:
        """Higher = more important. 'frequency': frequency x mean routing weight when routed (the
        expected routing weight per token); 'reconstruction': Frobenius norm over the calibration
        tokens of the change of the MoE block output when the expert's weight is zeroed."""
        if kind == "frequency":
            return {l: self.frequency(l) * self.mean_weight(l) for l in self.expert_counts}
        if kind == "reconstruction":
            if not self.expert_recon_sq:
                raise ValueError("reconstruction scores were not collected; call collect_stats(..., reconstruction=True)")
            return {l: v.sqrt() for l, v in self.expert_recon_sq.items()}
        raise ValueError(f"expert score {kind!r} is unknown; choose one of {', '.join(EXPERT_SCORES)}")

    def moe_change(self) -> dict[int, float]:
        """Per MoE layer: mean over tokens of 1 - cos(h, h + moe(h)); small = the block barely turns the stream."""
        return {l: s / max(self.tokens, 1) for l, s in self.moe_change_sum.items()}

    def layer_cosine(self) -> dict[int, float]:
        """Per decoder layer: mean over tokens of cos(input, output); high = the layer is nearly the identity."""
        return {l: s / max(self.tokens, 1) for l, s in self.layer_cos_sum.items()}

    def to_json(self) -> dict:
        out = {
            "tokens": self.tokens,
            "batches": self.batches,
            "experts": {
                str(l): {
                    "frequency": self.frequency(l).tolist(),
                    "mean_routing_weight": self.mean_weight(l).tolist(),
                    "frequency_score": self.expert_scores("frequency")[l].tolist(),
                    **({"reconstruction_score": self.expert_scores("reconstruction")[l].tolist()}
                       if self.expert_recon_sq else {}),
                }
                for l in sorted(self.expert_counts)
            },
            "moe_block_change": {str(l): v for l, v in sorted(self.moe_change().items())},
            "layer_cosine": {str(l): v for l, v in sorted(self.layer_cosine().items())},
        }
        return out


def _first(output):
    # GPT-OSS's MoE block returns (hidden_states, router_scores); decoder layers return a tensor.
    return output[0] if isinstance(output, (tuple, list)) else output


def _hidden_arg(args, kwargs) -> torch.Tensor:
    return args[0] if args else kwargs["hidden_states"]


def _experts_args(args, kwargs):
    """(hidden [N, H], top-k indices [N, k], top-k weights [N, k]) as the block passes them."""
    names = (("hidden_states",), ("top_k_index", "router_indices"), ("top_k_weights", "routing_weights"))
    vals = list(args)
    for alternatives in names[len(vals):]:
        vals.append(next(kwargs[n] for n in alternatives if n in kwargs))
    return vals[0], vals[1], vals[2]


def _per_token_cos(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    h = a.shape[-1]
    return F.cosine_similarity(a.reshape(-1, h).float(), b.reshape(-1, h).float(), dim=-1)


@contextmanager
def watching_routing(model: nn.Module, stats: TrimStats, reconstruction: bool = False) -> Iterator[TrimStats]:
    """While inside, every forward of `model` adds to the per-expert statistics of `stats` (counts,
    routing weight sums and, with `reconstruction`, squared contributions): the expert hooks of
    `collect_stats`, for any pass over the model, with or without gradients (the SlimMoE calibration
    pass ranks experts with them)."""
    adapter = get_adapter(model)
    stats.num_experts = adapter.num_experts(model.config)
    moe = dict(adapter.moe_blocks(model))
    for idx in moe:
        stats.expert_counts[idx] = torch.zeros(stats.num_experts, dtype=torch.float64)
        stats.expert_weight_sum[idx] = torch.zeros(stats.num_experts, dtype=torch.float64)
        if reconstruction:
            stats.expert_recon_sq[idx] = torch.zeros(stats.num_experts, dtype=torch.float64)

    def experts_pre(idx):
        @torch.no_grad()  # statistics only: nothing here may join a backward graph
        def hook(mod, args, kwargs):
            hidden, index, weights = _experts_args(args, kwargs)
            flat_idx = index.reshape(-1).long().cpu()
            stats.expert_counts[idx].index_add_(0, flat_idx, torch.ones(flat_idx.numel(), dtype=torch.float64))
            stats.expert_weight_sum[idx].index_add_(0, flat_idx, weights.reshape(-1).double().cpu())
            if reconstruction:
                for e in torch.unique(flat_idx).tolist():
                    rows, pos = torch.where(index == e)
                    w = weights[rows, pos].unsqueeze(-1)
                    only_e = torch.full_like(index[rows, :1], e)
                    # `.forward` bypasses the hooks (no recursion); the module's own forward keeps
                    # each family's activation, biases and clamps.
                    contrib = mod.forward(hidden[rows], only_e, w)
                    stats.expert_recon_sq[idx][e] += float(contrib.float().pow(2).sum())
        return hook

    handles = [block.experts.register_forward_pre_hook(experts_pre(idx), with_kwargs=True) for idx, block in moe.items()]
    try:
        yield stats
    finally:
        for h in handles:
            h.remove()


@torch.no_grad()
def collect_stats(model: nn.Module, batches: Iterable[torch.Tensor], reconstruction: bool = False) -> TrimStats:
    """Run `batches` ([B, T] token ids) through `model` in eval mode and collect TrimStats."""
    adapter = get_adapter(model)
    stats = TrimStats(num_experts=adapter.num_experts(model.config))
    layers = adapter.decoder_layers(model)
    moe = dict(adapter.moe_blocks(model))
    device = next(model.parameters()).device
    for idx in moe:
        stats.moe_change_sum[idx] = 0.0
    for idx in range(len(layers)):
        stats.layer_cos_sum[idx] = 0.0

    layer_inputs: dict[int, torch.Tensor] = {}
    moe_outputs: dict[int, torch.Tensor] = {}

    def layer_pre(idx):
        def hook(_mod, args, kwargs):
            layer_inputs[idx] = _hidden_arg(args, kwargs)
        return hook

    def layer_post(idx):
        def hook(_mod, _args, _kwargs, output):
            out = _first(output)
            stats.layer_cos_sum[idx] += float(_per_token_cos(layer_inputs.pop(idx), out).sum())
            if idx in moe_outputs:
                mo = moe_outputs.pop(idx).float()
                h = out.float() - mo.reshape(out.shape)
                stats.moe_change_sum[idx] += float((1.0 - _per_token_cos(h, out)).sum())
        return hook

    def moe_post(idx):
        def hook(_mod, _args, output):
            moe_outputs[idx] = _first(output)
        return hook

    handles = []
    try:
        for idx, layer in enumerate(layers):
            handles.append(layer.register_forward_pre_hook(layer_pre(idx), with_kwargs=True))
            handles.append(layer.register_forward_hook(layer_post(idx), with_kwargs=True))
        for idx, block in moe.items():
            handles.append(block.register_forward_hook(moe_post(idx)))
        was_training = model.training
        model.eval()  # deterministic routing: PhiMoE's sparsemixer samples in train mode
        try:
            with watching_routing(model, stats, reconstruction):
                for batch in batches:
                    ids = batch["input_ids"] if isinstance(batch, dict) else batch
                    model(input_ids=ids.to(device), use_cache=False)
                    stats.tokens += ids.numel()
                    stats.batches += 1
        finally:
            model.train(was_training)
    finally:
        for h in handles:
            h.remove()
    if stats.batches == 0:
        raise ValueError("calibration data is empty: trimming scores need at least one batch")
    return stats
