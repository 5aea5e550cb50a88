"""The demo teacher's model and its training loop: AdamW, warm-up then cosine, clipping, periodic
validation loss, one JSON line of metrics per logging step."""

from __future__ import annotations

import json
import time

import torch

from slimmoe.tasks.core.kernels import device_capability, experts_kernel
from slimmoe.tasks.core.runtime import step_progress, warmup_cosine
from slimmoe.tasks.evaluation.metrics import sequence_nll
from slimmoe.tasks.pretraining.config import PretrainTeacherConfig
from slimmoe.tasks.pretraining.corpus import BOS_ID, EOS_ID, PAD_ID
from slimmoe.tasks.slimming.losses import next_token_loss


def build_model(cfg: PretrainTeacherConfig, vocab_size: int, device):
    import transformers
    from transformers import AutoModelForCausalLM

    config = transformers.PhimoeConfig(
        vocab_size=vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.expert_intermediate_size,
        num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.num_key_value_heads, num_local_experts=cfg.num_experts,
        num_experts_per_tok=cfg.experts_per_token, max_position_embeddings=cfg.max_position_embeddings,
        tie_word_embeddings=False, pad_token_id=PAD_ID, bos_token_id=BOS_ID, eos_token_id=EOS_ID,
    )
    model = AutoModelForCausalLM.from_config(config)
    # The kernel choice lives in the runtime config only (transformers drops it from config.json),
    # so the saved checkpoint loads anywhere with the library default. On a GPU the weights stay float32
    # under bf16 autocast, where grouped_mm would compute the experts one at a time in float32.
    kernel = experts_kernel(cfg.experts_implementation, device.type == "cuda", device_capability(device),
                            weights_16bit=False)
    if hasattr(model, "set_experts_implementation"):
        model.set_experts_implementation(kernel)
    return model


def _optimizer(model, cfg: PretrainTeacherConfig):
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]  # norms and biases
    return torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg.lr, betas=(0.9, 0.95), eps=1e-8,
    )


def fmt_seconds(s: float) -> str:
    s = int(max(0, s))
    return f"{s // 60}m{s % 60:02d}s"


def train(model, cfg: PretrainTeacherConfig, train_rows, val_rows, device, metrics_file, log) -> dict:
    opt = _optimizer(model, cfg)
    gen = torch.Generator().manual_seed(cfg.seed)
    n = train_rows.shape[0]
    order, cursor, epoch = torch.randperm(n, generator=gen), 0, 0
    use_autocast = device.type == "cuda"
    tokens_per_step = cfg.batch_size * cfg.seq_len
    start, cpu_start = time.perf_counter(), time.process_time()
    window_start, window_loss, window_steps = start, 0.0, 0
    step = 0
    model.train()
    while step < cfg.max_steps:
        elapsed = time.perf_counter() - start
        if cfg.time_budget_s is not None and elapsed >= cfg.time_budget_s:
            log(f"[pretrain_teacher] time budget of {cfg.time_budget_s:.0f}s reached at step {step}")
            break
        if cursor + cfg.batch_size > n:  # a new epoch: fresh permutation, the remainder is dropped
            order, cursor, epoch = torch.randperm(n, generator=gen), 0, epoch + 1
        batch = train_rows[order[cursor : cursor + cfg.batch_size]].to(device)
        cursor += cfg.batch_size
        progress = step_progress(step, cfg.warmup_steps, cfg.max_steps)
        if cfg.time_budget_s is not None:
            progress = max(progress, elapsed / cfg.time_budget_s)
        lr = warmup_cosine(step, cfg.warmup_steps, progress, cfg.min_lr_ratio, base=cfg.lr)
        for group in opt.param_groups:
            group["lr"] = lr
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=use_autocast):
            logits = model(input_ids=batch).logits
        loss = next_token_loss(logits, batch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        step += 1
        window_loss += float(loss.detach())
        window_steps += 1
        do_eval = bool(cfg.eval_every) and step % cfg.eval_every == 0
        if do_eval or step % cfg.log_every == 0 or step == cfg.max_steps:
            now = time.perf_counter()
            tok_s = window_steps * tokens_per_step / max(now - window_start, 1e-9)
            rate = step / max(now - start, 1e-9)
            remaining = (cfg.max_steps - step) / max(rate, 1e-9)
            if cfg.time_budget_s is not None:
                remaining = min(remaining, cfg.time_budget_s - (now - start))
            rec = {"step": step, "epoch": epoch, "loss": window_loss / window_steps, "lr": lr,
                   "grad_norm": float(grad_norm), "tokens_per_s": tok_s, "elapsed_s": now - start}
            if do_eval:
                rec["val_loss"] = mean_nll(model, val_rows[: cfg.eval_rows_during_training], cfg.eval_batch_size, device)
                model.train()
            metrics_file.write(json.dumps(rec) + "\n")
            metrics_file.flush()
            extra = f" val_loss {rec['val_loss']:.3f}" if "val_loss" in rec else ""
            log(f"[pretrain_teacher] step {step}/{cfg.max_steps} loss {rec['loss']:.4f}{extra} lr {lr:.2e} "
                f"{tok_s:,.0f} tok/s elapsed {fmt_seconds(now - start)} ETA {fmt_seconds(remaining)}")
            # The window restarts after the evaluation, so tokens/s measures training only.
            now = time.perf_counter()
            window_start, window_loss, window_steps = now, 0.0, 0
    elapsed = time.perf_counter() - start
    return {"steps": step, "epochs": epoch + cursor / max(n, 1), "train_tokens": step * tokens_per_step,
            "train_seconds": elapsed, "steps_per_s": step / max(elapsed, 1e-9),
            # CPU seconds of this process (all threads): on a shared machine wall time says little.
            "train_cpu_seconds": time.process_time() - cpu_start,
            "tokens_per_s": step * tokens_per_step / max(elapsed, 1e-9)}


@torch.no_grad()
def mean_nll(model, rows: torch.Tensor, batch_size: int, device) -> float:
    model.eval()
    total, count = 0.0, 0
    for i in range(0, rows.shape[0], batch_size):
        s, c = sequence_nll(model, rows[i : i + batch_size].to(device))
        total, count = total + s, count + c
    return total / max(count, 1)
