"""ODP (MC-MoE's online dynamic pruning): drop a token's weak extra experts at inference.

Rule, per MoE layer with threshold `beta`: a routed slot other than the token's strongest one is
dropped when

    p_slot < beta * p_top

unless the token is protected, where p is the router's own confidence in each selected expert:
  * for Mixtral / Qwen2 / Qwen3 / OLMoE / GPT-OSS / DeepSeek-V3 (`score="weights"`): the router's
    output weights, i.e. what the experts are multiplied by (softmax top-k, renormalised or not;
    GPT-OSS's softmax over the top-k logits; DeepSeek-V3's scaled sigmoid). For softmax routers the
    ratio is exp(l_slot - l_top) whether or not the top-k is renormalised, so the rule means the
    same with and without renormalisation.
  * for PhiMoE (`score="probs"`): sparsemixer's output multipliers are each a softmax over the
    logits within 2 * router_jitter_noise (relative) of that slot's own maximum, so in eval both
    top-2 multipliers are almost always exactly 1.0 (w2 / w1 == 1 for 94% of tokens on a tiny random
    PhiMoE with 8 experts). A rule on them cannot rank tokens, nor reach a target share. The
    rule therefore uses the same quantity the softmax routers' weights give, p = softmax(router
    logits) over all experts, gathered at the selected experts: p2 / p1 = exp(l2 - l1).
`score="auto"` picks per family as above; "weights" or "probs" force one. For top-2 routers this is
the paper's rule (drop the second expert when w2 < beta * w1); for top-k > 2 every non-top slot is
tested on its own.

A dropped slot's *output weight* is set to 0: the expert's contribution is removed and the other
weights are NOT renormalised by default (`renormalize=False`), so the block's output is exactly
the original output minus the dropped expert's term. That is the only choice well defined for every
router: PhiMoE's multipliers never summed to 1, DeepSeek's carry a scaling factor, and rescaling the
top expert would change a token's output by more than the pruned term. Zero weights work with every
experts implementation (eager, grouped_mm, batched_mm); the dropped pairs are still computed and
multiplied by 0 there, so a compute saving needs a kernel that skips them (the quality effect and
the share of pruned calls are exact).

Protected tokens: importance = attention received x L1 norm of the token's hidden state at the MoE
block's input; per sequence the top `protect_top` share (floor(protect_top * T) tokens, 2% by
default as in the paper) keeps all its experts. Attention received by token j = sum over query
positions i of A[h, i, j], averaged over heads, from the same layer's self-attention. This needs the
attention probabilities, so while protection is on the model runs with `attn_implementation="eager"`
(whose attention modules return them; the previous implementation is restored by `remove()`).
In a cached decode step (one token per sequence) floor(0.02 * 1) = 0 tokens are protected.

`beta` is per MoE layer and is calibrated from data (`calibrate_betas`) to reach a target share of
pruned expert calls, where share = dropped (token, expert) pairs / all routed pairs (tokens x top_k).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Iterable, Sequence

import torch
from torch import nn

from slimmoe.tasks.core.adapters import get_adapter

# Routers whose output multipliers carry no confidence (see above): the rule uses softmax(logits).
SCORE_FROM_PROBS = {"phimoe"}


@dataclass
class _LayerState:
    beta: float
    received: torch.Tensor | None = None  # [B, T] attention received
    protected: torch.Tensor | None = None  # [B*T] bool
    pruned: int = 0
    calls: int = 0
    tokens: int = 0
    protected_tokens: int = 0
    ratios: list[torch.Tensor] = field(default_factory=list)  # calibration: w_slot / w_top of prunable slots


class DynamicPruning:
    """Hooks that apply ODP to a model; `.stats()` reports the share of expert calls pruned,
    `.remove()` restores the model. Use `apply_dynamic_pruning` to create one."""

    def __init__(self, model: nn.Module, betas: Sequence[float], protect_top: float = 0.02,
                 renormalize: bool = False, record_layers: Iterable[int] = (), score: str = "auto"):
        self.model = model
        self.adapter = get_adapter(model)
        if score not in ("auto", "weights", "probs"):
            raise ValueError(f"score={score!r}; use 'auto', 'weights' or 'probs'")
        if score == "auto":
            score = "probs" if self.adapter.model_type in SCORE_FROM_PROBS else "weights"
        self.score = score
        self.blocks = list(self.adapter.moe_blocks(model))
        if len(betas) != len(self.blocks):
            raise ValueError(f"per_layer_betas has {len(betas)} values; the model has {len(self.blocks)} MoE layers")
        if not 0.0 <= protect_top < 1.0:
            raise ValueError(f"protect_top={protect_top} must be in [0, 1)")
        if any((not math.isfinite(b)) or b < 0 for b in betas):
            raise ValueError(f"betas must be finite and >= 0, got {list(betas)}")
        self.protect_top = protect_top
        self.renormalize = renormalize
        self.record_layers = set(record_layers)
        self.layers = [_LayerState(float(b)) for b in betas]
        self._handles = []
        self._previous_attn = None
        if protect_top > 0:
            self._previous_attn = model.config._attn_implementation
            if self._previous_attn != "eager":
                model.set_attn_implementation("eager")
        decoder = self.adapter.decoder_layers(model)
        for pos, (idx, block) in enumerate(self.blocks):
            state = self.layers[pos]
            if protect_top > 0:
                self._handles.append(self.adapter.attention(decoder[idx]).register_forward_hook(self._attn_hook(state)))
                self._handles.append(block.register_forward_pre_hook(self._block_hook(state), with_kwargs=True))
            self._handles.append(self.adapter.router(block).register_forward_hook(self._router_hook(pos, state)))

    # -- hooks ----------------------------------------------------------------------------------

    @staticmethod
    def _attn_hook(state: _LayerState):
        def hook(module, args, output):
            probs = output[1] if isinstance(output, tuple) and len(output) > 1 else None
            if probs is None:
                raise RuntimeError("ODP token protection needs the attention probabilities, but the attention module "
                                   "returned none; run with attn_implementation='eager' or protect_top=0")
            tq = probs.shape[-2]
            state.received = probs.detach().float().sum(dim=-2).mean(dim=1)[:, -tq:]  # [B, Tq]
        return hook

    def _block_hook(self, state: _LayerState):
        def hook(module, args, kwargs):
            x = args[0] if args else kwargs["hidden_states"]
            if state.received is None or x.dim() != 3:
                raise RuntimeError("ODP: the MoE block ran without its layer's attention probabilities")
            importance = state.received.to(x.device) * x.detach().float().abs().sum(dim=-1)  # [B, T]
            n_keep = int(self.protect_top * importance.shape[1])
            mask = torch.zeros_like(importance, dtype=torch.bool)
            if n_keep > 0:
                top = importance.topk(n_keep, dim=1).indices
                mask.scatter_(1, top, True)
            state.protected = mask.reshape(-1)
            state.received = None
        return hook

    def _router_hook(self, pos: int, state: _LayerState):
        record = pos in self.record_layers

        def hook(module, args, output):
            weights, index = output[1], output[2]
            n, k = weights.shape
            protected = state.protected
            state.protected = None
            if protected is None:
                protected = torch.zeros(n, dtype=torch.bool, device=weights.device)
            elif protected.numel() != n:
                raise RuntimeError(f"ODP: router saw {n} tokens but the block had {protected.numel()}")
            protected = protected.to(weights.device)
            state.tokens += n
            state.calls += n * k
            state.protected_tokens += int(protected.sum())
            if k < 2:
                return None
            if self.score == "probs":
                p = torch.softmax(output[0].detach().float(), dim=-1).gather(1, index)
            else:
                p = weights.detach().float()
            top_p, top_slot = p.max(dim=-1, keepdim=True)
            is_top = torch.zeros_like(p, dtype=torch.bool).scatter_(1, top_slot, True)
            eligible = ~is_top & ~protected.unsqueeze(-1)
            if record:
                ratio = p / top_p.clamp_min(torch.finfo(torch.float32).tiny)
                state.ratios.append(ratio[eligible].cpu())
            drop = eligible & (p < state.beta * top_p)
            n_drop = int(drop.sum())
            if n_drop == 0:
                return None  # bit-for-bit the original routing
            state.pruned += n_drop
            new_w = weights.masked_fill(drop, 0.0)
            if self.renormalize:
                new_w = new_w * (weights.sum(-1, keepdim=True) / new_w.sum(-1, keepdim=True))
            return (output[0], new_w, index) + tuple(output[3:])
        return hook

    # -- public -----------------------------------------------------------------------------------

    @property
    def betas(self) -> list[float]:
        return [s.beta for s in self.layers]

    def stats(self) -> dict:
        """{"share": pruned expert calls / routed expert calls, "pruned_calls", "expert_calls",
        "tokens", "protected_tokens", "betas", "per_layer": [...]} since creation or `reset_stats()`."""
        pruned = sum(s.pruned for s in self.layers)
        calls = sum(s.calls for s in self.layers)
        return {
            "share": pruned / calls if calls else 0.0,
            "pruned_calls": pruned, "expert_calls": calls,
            "tokens": sum(s.tokens for s in self.layers),
            "protected_tokens": sum(s.protected_tokens for s in self.layers),
            "betas": self.betas, "score": self.score,
            "per_layer": [{"layer": idx, "beta": s.beta, "share": s.pruned / s.calls if s.calls else 0.0,
                           "pruned_calls": s.pruned, "expert_calls": s.calls, "protected_tokens": s.protected_tokens}
                          for (idx, _), s in zip(self.blocks, self.layers)],
        }

    def reset_stats(self) -> None:
        for s in self.layers:
            s.pruned = s.calls = s.tokens = s.protected_tokens = 0
            s.ratios.clear()

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        if self._previous_attn is not None and self._previous_attn != "eager":
            self.model.set_attn_implementation(self._previous_attn)
        self._previous_attn = None

    def __enter__(self) -> "DynamicPruning":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


def num_moe_layers(model: nn.Module) -> int:
    adapter = get_adapter(model)
    return sum(1 for _ in adapter.moe_blocks(model))


def apply_dynamic_pruning(model: nn.Module, beta: float | None = None, per_layer_betas: Sequence[float] | None = None,
                          protect_top: float = 0.02, renormalize: bool = False, score: str = "auto") -> DynamicPruning:
    """Turn ODP on: give one `beta` for every MoE layer or `per_layer_betas` (one per MoE layer, in
    layer order, as `calibrate_betas` returns them). beta=0 changes nothing."""
    if (beta is None) == (per_layer_betas is None):
        raise ValueError("give exactly one of beta= or per_layer_betas=")
    betas = list(per_layer_betas) if per_layer_betas is not None else [float(beta)] * num_moe_layers(model)
    return DynamicPruning(model, betas, protect_top=protect_top, renormalize=renormalize, score=score)


def _run(model: nn.Module, batches) -> None:
    device = next(model.parameters()).device
    with torch.no_grad():
        for batch in batches:
            ids = batch["input_ids"] if isinstance(batch, dict) else batch
            model(input_ids=ids.to(device), use_cache=False)


def beta_for_share(ratios: torch.Tensor, calls: int, target_share: float) -> float:
    """Smallest-error threshold: exactly round(target * calls) prunable slots have ratio < beta."""
    m = int(round(target_share * calls))
    if m == 0:
        return 0.0
    r = torch.sort(ratios.double()).values
    if m > r.numel():
        raise ValueError(f"target share {target_share} of pruned expert calls is unreachable: at most "
                         f"{r.numel() / calls:.4f} of this layer's calls are prunable (the top expert of every token "
                         "and every expert of protected tokens are kept); lower the target or protect_top")
    lo = float(r[m - 1])
    hi = float(r[m]) if m < r.numel() else lo + 1.0
    return (lo + hi) / 2 if hi > lo else math.nextafter(lo, math.inf)


def calibrate_betas(model: nn.Module, batches, target_share: float, protect_top: float = 0.02,
                    sequential: bool = True, renormalize: bool = False, score: str = "auto") -> list[float]:
    """Per-MoE-layer betas that prune `target_share` of each layer's expert calls on `batches`.

    With `sequential` (default) layer l is calibrated with layers < l already pruned at their betas,
    so the share is hit on the calibration data as the pruned model actually runs (one pass over
    the batches per MoE layer); otherwise all layers are calibrated in one pass on the unpruned model.
    """
    if not 0.0 <= target_share < 1.0:
        raise ValueError(f"target share {target_share} must be in [0, 1)")
    batches = list(batches)
    if not batches:
        raise ValueError("calibrate_betas needs at least one batch of token ids")
    adapter = get_adapter(model)
    if adapter.top_k(model.config) < 2:
        raise ValueError("ODP drops a token's extra experts; this model routes each token to one expert")
    n_layers = num_moe_layers(model)
    betas = [0.0] * n_layers
    groups = [[layer] for layer in range(n_layers)] if sequential else [list(range(n_layers))]
    for group in groups:
        handle = DynamicPruning(model, betas, protect_top=protect_top, renormalize=renormalize, record_layers=group,
                                score=score)
        try:
            _run(model, batches)
            for layer in group:
                state = handle.layers[layer]
                ratios = torch.cat(state.ratios) if state.ratios else torch.zeros(0)
                try:
                    betas[layer] = beta_for_share(ratios, state.calls, target_share)
                except ValueError as err:
                    raise ValueError(f"MoE layer {handle.blocks[layer][0]}: {err}") from None
        finally:
            handle.remove()
    return betas
