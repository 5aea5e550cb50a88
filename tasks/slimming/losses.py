"""Distillation losses over a cached top-k teacher distribution plus one exact "rest" bucket.

The teacher cache holds, per token, the top-k token ids, their log-probabilities over the full
vocabulary, and the exact log-mass of everything else (`rest_logprob`, a float32 logsumexp over
the complement computed at caching time). Rebuilding the rest as `1 - sum(exp(topk))` from
float16 values kills its gradient when the top-k holds almost all the mass (measured on the demo
teacher: top-8 then ends at perplexity 85 instead of ~66),
so both sides compute it as a logsumexp over the complement.

Memory: a [B, T, V] float32 copy of the logits is 2.5 GB at Qwen3's 152k vocabulary and 4096 tokens,
and the loss computed in one piece peaks at about five of them (keeping two or three for backward).
`distillation_loss` therefore works on chunks of positions and recomputes each chunk in backward
(`_ChunkedDistillation`): its peak is the logits' gradient plus one chunk's work.

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
    chunk_tokens: int | str | None = None,
) -> torch.Tensor:
    """KL(teacher || student) per position over the k+1 buckets, [...], float32, not T^2-scaled.

    `chunk_tokens` (an int, or "auto" for `auto_chunk_tokens`) computes it that many positions at a
    time: under no_grad only one chunk's float32 copies of the logits exist at once. With a graph
    recorded every chunk's copies are kept for backward, so it saves nothing there."""
    if chunk_tokens is not None:
        return _chunked_per_token_kl(student_logits, topk_ids, topk_logprobs, rest_logprob, temperature, chunk_tokens)
    t = _tempered(teacher_buckets(topk_logprobs, rest_logprob), temperature)
    s = _tempered(bucket_logprobs(student_logits, topk_ids.long()), temperature)
    return _bucket_kl(t, s)


def _bucket_kl(t: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
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
    chunk_tokens: int | str | None = "auto",
) -> tuple[torch.Tensor, dict[str, float]]:
    """The stage's training objective: T^2 * KL over top-k + rest, plus `next_token_weight` * CE.

    Returns the loss and its parts (KL at T=1 is the number users compare across runs).

    `chunk_tokens` positions (over the flattened [B*T]) are computed at a time, and the backward
    recomputes each chunk instead of keeping its float32 work: what stays alive for backward is the
    logits themselves and [B, T, k]-sized teacher tensors. "auto" picks `auto_chunk_tokens(vocab)`;
    None computes it in one piece, keeping every float32 [B, T, V] intermediate for backward."""
    if chunk_tokens is None:
        kd = kd_loss(student_logits, topk_ids, topk_logprobs, rest_logprob, temperature, mask)
        loss = kd
        parts = {"kd": float(kd.detach())}
        if next_token_weight:
            ce = next_token_loss(student_logits, input_ids, mask)
            loss = loss + next_token_weight * ce
            parts["ce"] = float(ce.detach())
        return loss, parts

    b, t, vocab = student_logits.shape
    n = b * t
    chunk = _chunk_size(chunk_tokens, vocab)
    with torch.no_grad():
        teacher = _tempered(teacher_buckets(topk_logprobs, rest_logprob), temperature).reshape(n, -1)
        # Each mean (masked or not) becomes per-position weights: a chunk's share of the loss, and of
        # its gradient, then needs nothing from the other chunks.
        if mask is None:
            kd_weight = torch.full((n,), temperature**2 / n, dtype=torch.float32, device=student_logits.device)
        else:
            m = mask.to(torch.float32)
            kd_weight = (m * (temperature**2 / m.sum().clamp_min(1.0))).reshape(n)
        targets = ce_weight = None
        if next_token_weight:
            # Position t of a row predicts token t+1; a row's last position predicts nothing.
            targets = torch.full((b, t), _NO_TARGET, dtype=torch.long, device=input_ids.device)
            targets[:, :-1] = input_ids[:, 1:]
            ce_weight = torch.zeros((b, t), dtype=torch.float32, device=student_logits.device)
            if mask is None:
                ce_weight[:, :-1] = 1.0 / max(b * (t - 1), 1)
            else:
                m = mask[:, :-1].to(torch.float32)
                ce_weight[:, :-1] = m / m.sum().clamp_min(1.0)
            targets, ce_weight = targets.reshape(n), ce_weight.reshape(n)
    kd, ce = _ChunkedDistillation.apply(student_logits, topk_ids.reshape(n, -1).long(), teacher, kd_weight, targets,
                                        ce_weight, float(temperature), chunk)
    loss = kd
    parts = {"kd": float(kd.detach())}
    if next_token_weight:
        loss = loss + next_token_weight * ce
        parts["ce"] = float(ce.detach())
    return loss, parts


# Elements of one chunk's [tokens, vocab] float32 copy: 128 MiB, so the few copies a chunk's forward
# or backward holds at once stay within ~0.5 GiB at any vocabulary (1046 tokens at Phi's 32064,
# 220 at Qwen3's 151936).
CHUNK_ELEMENTS = 2**25
_NO_TARGET = -100  # F.cross_entropy's ignore_index


def auto_chunk_tokens(vocab: int) -> int:
    return max(1, CHUNK_ELEMENTS // vocab)


def _chunk_size(chunk_tokens: int | str, vocab: int) -> int:
    if chunk_tokens == "auto":
        return auto_chunk_tokens(vocab)
    if not isinstance(chunk_tokens, int) or isinstance(chunk_tokens, bool) or chunk_tokens < 1:
        raise ValueError(f"chunk_tokens must be a positive int, 'auto' or None, not {chunk_tokens!r}")
    return chunk_tokens


def _chunked_per_token_kl(student_logits, topk_ids, topk_logprobs, rest_logprob, temperature, chunk_tokens):
    vocab = student_logits.shape[-1]
    lead = student_logits.shape[:-1]
    chunk = _chunk_size(chunk_tokens, vocab)
    logits = student_logits.reshape(-1, vocab)
    ids = topk_ids.reshape(-1, topk_ids.shape[-1])
    lp = topk_logprobs.reshape(-1, topk_logprobs.shape[-1])
    rest = rest_logprob.reshape(-1)
    kl = [per_token_kl(logits[s:s + chunk], ids[s:s + chunk], lp[s:s + chunk], rest[s:s + chunk], temperature)
          for s in range(0, logits.shape[0], chunk)]
    return torch.cat(kl).reshape(lead)


class _ChunkedDistillation(torch.autograd.Function):
    """(T^2-weighted KD, next-token CE) over the flattened positions, chunk by chunk.

    Only the inputs are saved: backward recomputes a chunk's student buckets and writes that chunk's
    closed-form gradient straight into one tensor of the logits' dtype. torch.utils.checkpoint per
    chunk saves as little, but autograd then builds a zero-filled full-size gradient for every chunk's
    slice and sums them: measured on CPU at 32k x 4096 (float32, with CE), the loss's peak over its
    inputs (the 501 MB gradient included) was 1226 MB and 8.9 s that way against 628 MB and 3.7 s
    here (2516 MB, 4.4 s in one piece).

    topk_ids [N, k] int64; teacher [N, k+1] tempered teacher log-buckets; kd_weight [N] (mask / count * T^2);
    targets [N] next-token ids (_NO_TARGET where none) and ce_weight [N], or both None for no CE."""

    @staticmethod
    def forward(ctx, logits, topk_ids, teacher, kd_weight, targets, ce_weight, temperature, chunk):
        vocab = logits.shape[-1]
        flat = logits.reshape(-1, vocab)
        kd = torch.zeros((), dtype=torch.float32, device=logits.device)
        ce = torch.zeros((), dtype=torch.float32, device=logits.device)
        for s in range(0, flat.shape[0], chunk):
            e = s + chunk
            x = flat[s:e].float()
            kl = _bucket_kl(teacher[s:e], _tempered(bucket_logprobs(x, topk_ids[s:e]), temperature))
            kd += (kl * kd_weight[s:e]).sum()
            if targets is not None:
                nll = F.cross_entropy(x, targets[s:e], ignore_index=_NO_TARGET, reduction="none")
                ce += (nll * ce_weight[s:e]).sum()
            del x
        ctx.save_for_backward(logits, topk_ids, teacher, kd_weight, targets, ce_weight)
        ctx.temperature, ctx.chunk = temperature, chunk
        if targets is None:
            ctx.mark_non_differentiable(ce)
        return kd, ce

    @staticmethod
    def backward(ctx, grad_kd, grad_ce):
        logits, topk_ids, teacher, kd_weight, targets, ce_weight = ctx.saved_tensors
        temperature, chunk = ctx.temperature, ctx.chunk
        vocab = logits.shape[-1]
        flat = logits.reshape(-1, vocab)
        grad = torch.empty_like(flat, memory_format=torch.contiguous_format)
        with_ce = targets is not None and grad_ce is not None
        for s in range(0, flat.shape[0], chunk):
            e = s + chunk
            grad[s:e].copy_(_chunk_grad(flat[s:e].float(), topk_ids[s:e], teacher[s:e], kd_weight[s:e] * grad_kd,
                                        targets[s:e] if with_ce else None,
                                        ce_weight[s:e] * grad_ce if with_ce else None, temperature))
        return grad.view(logits.shape), None, None, None, None, None, None, None


def _chunk_grad(x, ids, teacher, kd_scale, targets, ce_scale, temperature):
    """d(sum kd_scale * KL + sum ce_scale * NLL) / dx for one chunk, float32 [C, V].

    The same operations' derivatives as autograd takes through `bucket_logprobs`, `_tempered`,
    `_bucket_kl` and cross-entropy, with the [C, V] terms built in place in one buffer:
      s_i = x[id_i] - log Z, s_rest = logsumexp(x off the top-k) - log Z, s' = log_softmax(s / T)
      dKL/ds' = -p_teacher, dKL/ds = (dKL/ds' - softmax(s / T) * sum(dKL/ds')) / T
      dx = scatter(dKL/ds_i) + dKL/ds_rest * softmax(x off the top-k) - softmax(x) * sum(dKL/ds)
    and NLL's softmax(x) - onehot(target). The rest bucket's softmax is taken over the complement
    itself, not as softmax(x) / p_rest, so its gradient survives when p_rest underflows."""
    log_z = torch.logsumexp(x, dim=-1, keepdim=True)
    off_topk = x.scatter(-1, ids, float("-inf"))
    log_rest = torch.logsumexp(off_topk, dim=-1, keepdim=True)
    s = torch.cat([x.gather(-1, ids) - log_z, log_rest - log_z], dim=-1)
    scaled = s if temperature == 1.0 else s / temperature
    q = torch.softmax(scaled, dim=-1)
    g = -teacher.exp()
    g = (g - q * g.sum(-1, keepdim=True)) * kd_scale.unsqueeze(-1)
    if temperature != 1.0:
        g = g / temperature
    coef = -g.sum(-1, keepdim=True)
    if ce_scale is not None:
        coef = coef + ce_scale.unsqueeze(-1)
    buf = off_topk.sub_(log_rest).exp_().mul_(g[:, -1:])  # the rest bucket's term, 0 on the top-k
    buf.addcmul_(torch.sub(x, log_z).exp_(), coef)
    buf.scatter_add_(-1, ids, g[:, :-1])
    if targets is not None:
        has = targets != _NO_TARGET
        buf.scatter_add_(-1, torch.where(has, targets, 0).unsqueeze(-1),
                         torch.where(has, -ce_scale, 0.0).unsqueeze(-1))
    return buf
