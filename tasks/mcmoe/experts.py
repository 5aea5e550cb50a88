"""Expert weights in one canonical layout, one expert's forward, and routing capture.

Canonical layout, for every family: gate_up [E, 2I, H] and down [E, H, I] with rows = output
features, i.e. what `F.linear` takes. GPT-OSS stores the transpose ([E, H, 2I] / [E, I, H], gate
and up interleaved, with biases); the interleaving is kept (only `_apply_gate` needs to know) and
the biases stay in full precision.

Every router in `transformers` 5 returns `(router_logits, top_k_weights, top_k_index)` and the
MoE block feeds the router's input and those two tensors to `experts(...)`. So a forward hook on the
router sees exactly the tokens, weights and expert ids the experts get: PhiMoE's sparsemixer
(top-2 weights not renormalised), Mixtral/Qwen/OLMoE softmax top-k (renormalised or not),
DeepSeek-V3's sigmoid group routing with the correction bias and scaling factor (top-k unsorted),
GPT-OSS's softmax over the top-k logits.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from slimmoe.tasks.core.adapters import MoEAdapter


def canonical_experts(adapter: MoEAdapter, experts: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    gu, down = experts.gate_up_proj.detach(), experts.down_proj.detach()
    if adapter.transposed_experts:
        gu, down = gu.transpose(1, 2), down.transpose(1, 2)
    return gu, down


def expert_hidden(experts: nn.Module, e: int, x: torch.Tensor, gate_up: torch.Tensor) -> torch.Tensor:
    """The input of expert e's down projection, for tokens x [n, H], with canonical gate_up [2I, H]."""
    h = torch.nn.functional.linear(x, gate_up.to(x.dtype))
    bias = getattr(experts, "gate_up_proj_bias", None)
    if bias is not None:
        h = h + bias[e].to(x.dtype)
    return experts._apply_gate(h)


def expert_output(experts: nn.Module, e: int, x: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    """Expert e on tokens x [n, H] with canonical weights (unweighted by the router)."""
    y = torch.nn.functional.linear(expert_hidden(experts, e, x, gate_up), down.to(x.dtype))
    bias = getattr(experts, "down_proj_bias", None)
    if bias is not None:
        y = y + bias[e].to(x.dtype)
    return y


@dataclass
class RoutingCapture:
    """What one MoE layer's router saw and chose on the calibration tokens."""

    x: list[torch.Tensor] = field(default_factory=list)  # [n, H] per batch
    weights: list[torch.Tensor] = field(default_factory=list)  # [n, k]
    index: list[torch.Tensor] = field(default_factory=list)  # [n, k]

    def cat(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return torch.cat(self.x), torch.cat(self.weights), torch.cat(self.index)


def routed_tokens(weights: torch.Tensor, index: torch.Tensor, e: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(token positions routed to expert e, their routing weights)."""
    hit = index == e
    tokens = hit.any(dim=-1).nonzero(as_tuple=True)[0]
    w = (weights * hit).sum(dim=-1)[tokens]
    return tokens, w


class HessianAccumulator:
    """sum x x^T over the inputs of a linear layer (float32), fed by a forward pre-hook."""

    def __init__(self, module: nn.Linear):
        self.h = torch.zeros(module.in_features, module.in_features, dtype=torch.float32)
        self.tokens = 0
        self.handle = module.register_forward_pre_hook(self._hook)

    def _hook(self, module, args):
        x = args[0].detach().reshape(-1, args[0].shape[-1]).to(torch.float32).cpu()
        self.h += x.T @ x
        self.tokens += x.shape[0]


@torch.no_grad()
def capture_routing(model: nn.Module, adapter: MoEAdapter, batches, linears: dict[str, nn.Linear] | None = None,
                    store_dtype: torch.dtype = torch.float32) -> tuple[dict[int, RoutingCapture], dict[str, HessianAccumulator]]:
    """Run `batches` through the model once; per MoE layer keep router inputs and decisions, and
    accumulate input Hessians of the given extra linears (attention, shared experts)."""
    captures: dict[int, RoutingCapture] = {}
    handles = []

    def make_hook(layer: int):
        cap = captures.setdefault(layer, RoutingCapture())

        def hook(module, args, output):
            x = args[0]
            cap.x.append(x.detach().reshape(-1, x.shape[-1]).to(store_dtype).cpu())
            cap.weights.append(output[1].detach().to(torch.float32).cpu())
            cap.index.append(output[2].detach().cpu())

        return hook

    for idx, block in adapter.moe_blocks(model):
        handles.append(adapter.router(block).register_forward_hook(make_hook(idx)))
    accs = {name: HessianAccumulator(lin) for name, lin in (linears or {}).items()}
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        for batch in batches:
            ids = batch["input_ids"] if isinstance(batch, dict) else batch
            model(input_ids=ids.to(device), use_cache=False)
    finally:
        for h in handles:
            h.remove()
        for acc in accs.values():
            acc.handle.remove()
        model.train(was_training)
    return captures, accs
