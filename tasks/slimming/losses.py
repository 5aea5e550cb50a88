"""Distillation losses over a cached top-k teacher distribution plus one exact "rest" bucket.

The teacher cache holds, per token, the top-k token ids, their log-probabilities over the full
vocabulary, and the exact log-mass of everything else (`rest_logprob`, a float32 logsumexp over
the complement computed at caching time). Rebuilding the rest as `1 - sum(exp(topk))` from
float16 values kills its gradient when the top-k holds almost all the mass (measured on the demo
teacher: top-8 then ends at perplexity 85 instead of ~66),
so both sides compute it as a logsumexp over the complement.

Temperature: both distributions are collapsed to the same k+1 buckets and the buckets' log-masses
are divided by T before renormalising. At T=1 this is the exact KL over the bucketed
distributions; at T>1 it softens the bucketed distributions the same way on both sides.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def bucket_logprobs(logits: torch.Tensor, topk_ids: torch.Tensor) -> torch.Tensor:
    """Student log-probs on the teacher's top-k ids plus its exact rest bucket: [..., k+1], float32."""
    logits = logits.float()
    log_z = torch.logsumexp(logits, dim=-1, keepdim=True)
    topk = logits.gather(-1, topk_ids) - log_z
    rest = torch.logsumexp(logits.scatter(-1, topk_ids, float("-inf")), dim=-1, keepdim=True) - log_z
    return torch.cat([topk, rest], dim=-1)


@torch.no_grad()
def topk_with_rest(logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """What the teacher cache stores per position, from full logits [..., V]:
    top-k ids, their log-probs over the full vocabulary, and the exact float32 log-mass of the rest."""
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    topk_logprobs, topk_ids = logprobs.topk(k, dim=-1)
    rest = torch.logsumexp(logprobs.scatter(-1, topk_ids, float("-inf")), dim=-1)
    return topk_ids, topk_logprobs, rest


def fast_topk_with_rest(logits, k: int, work=None):
    """Same result as `topk_with_rest` (ids identical, log-probs within float32 rounding) at
    about a third of its cost on CPU. `logits` must be float32; it is not modified.

    `topk_with_rest` materialises log_softmax, scatters into a copy and runs a second logsumexp: two
    exp passes and three full-size temporaries over [tokens, vocab], which cost ~40% of the teacher's
    forward at a 32k vocabulary on CPU. Here there is one exp pass: e = exp(x - max), Z = sum(e),
    rest = log(sum of e outside the top-k) - log Z. The complement is summed directly (top-k entries
    zeroed), never as Z - sum(top-k), so the rest stays exact when the top-k holds almost all the mass
    (rebuilding it from float16 top-k values kills its gradient). Rows whose whole complement underflows float32 (< 1e-38 of the top
    token) are recomputed with the exact logsumexp. `work`, a float32 tensor shaped like `logits`, is
    used as scratch space: a fresh [tokens, vocab] allocation page-faults in ~as long as the exp takes."""
    import torch

    vals, ids = logits.topk(k, dim=-1)
    m = vals[..., :1]
    if work is not None and work.shape == logits.shape and work.dtype == logits.dtype and work.device == logits.device:
        e = torch.sub(logits, m, out=work).exp_()
    else:
        e = torch.sub(logits, m).exp_()
    log_z = e.sum(-1).log()
    e.scatter_(-1, ids, 0.0)
    rest = e.sum(-1).log() - log_z
    del e
    log_norm = m.squeeze(-1) + log_z
    bad = torch.isneginf(rest)
    if bool(bad.any()):
        complement = logits[bad].scatter(-1, ids[bad], float("-inf"))
        rest[bad] = torch.logsumexp(complement, dim=-1) - log_norm[bad]
    return ids, vals - log_norm.unsqueeze(-1), rest


def teacher_buckets(topk_logprobs: torch.Tensor, rest_logprob: torch.Tensor) -> torch.Tensor:
    return torch.cat([topk_logprobs.float(), rest_logprob.float().unsqueeze(-1)], dim=-1)


def _tempered(log_buckets: torch.Tensor, temperature: float) -> torch.Tensor:
    if temperature == 1.0:
        # Re-normalise anyway: float16 storage leaves the teacher's buckets off by ~1e-3.
        return log_buckets - torch.logsumexp(log_buckets, dim=-1, keepdim=True)
    return F.log_softmax(log_buckets / temperature, dim=-1)


def per_token_kl(
    student_logits: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_logprobs: torch.Tensor,
    rest_logprob: torch.Tensor,
    temperature: float = 1.0,
) -> torch.Tensor:
    """KL(teacher || student) per position over the k+1 buckets, [...], float32, not T^2-scaled."""
    t = _tempered(teacher_buckets(topk_logprobs, rest_logprob), temperature)
    s = _tempered(bucket_logprobs(student_logits, topk_ids.long()), temperature)
    # exp(t) * (t - s) with 0 * log 0 := 0 for buckets the teacher gives no mass (-inf).
    p = t.exp()
    return torch.where(p > 0, p * (t - s), torch.zeros_like(p)).sum(-1)


def masked_mean(values: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    if mask is None:
        return values.mean()
    mask = mask.to(values.dtype)
    return (values * mask).sum() / mask.sum().clamp_min(1.0)


def kd_loss(
    student_logits: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_logprobs: torch.Tensor,
    rest_logprob: torch.Tensor,
    temperature: float = 1.0,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Mean over (masked) positions of T^2 * KL(teacher_T || student_T)."""
    kl = per_token_kl(student_logits, topk_ids, topk_logprobs, rest_logprob, temperature)
    return masked_mean(kl, mask) * (temperature**2)


def next_token_nll(logits: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    """Per-position NLL of the next token, [B, T-1], float32."""
    pred = logits[:, :-1].float()
    target = input_ids[:, 1:]
    return F.cross_entropy(pred.reshape(-1, pred.shape[-1]), target.reshape(-1), reduction="none").view_as(target)


def next_token_loss(logits: torch.Tensor, input_ids: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Causal LM cross-entropy; `mask` ([B, T], for the *predicting* positions) drops positions."""
    return masked_mean(next_token_nll(logits, input_ids), None if mask is None else mask[:, :-1])


def document_mask(input_ids: torch.Tensor, eos_token_id: int | None) -> torch.Tensor | None:
    """1 where a position's prediction stays inside its document: the position after EOS starts a new
    document, so predicting it from the EOS token would teach a cross-document transition."""
    if eos_token_id is None:
        return None
    return (input_ids != eos_token_id).to(torch.float32)


def distillation_loss(
    student_logits: torch.Tensor,
    input_ids: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_logprobs: torch.Tensor,
    rest_logprob: torch.Tensor,
    temperature: float = 1.0,
    next_token_weight: float = 0.0,
    mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """The stage's training objective: T^2 * KL over top-k + rest, plus `next_token_weight` * CE.

    Returns the loss and its parts (KL at T=1 is the number users compare across runs)."""
    kd = kd_loss(student_logits, topk_ids, topk_logprobs, rest_logprob, temperature, mask)
    loss = kd
    parts = {"kd": float(kd.detach())}
    if next_token_weight:
        ce = next_token_loss(student_logits, input_ids, mask)
        loss = loss + next_token_weight * ce
        parts["ce"] = float(ce.detach())
    return loss, parts
