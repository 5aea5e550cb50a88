"""The demo's teacher: a small PhiMoE model trained from scratch on the Python standard library.

No weights can be downloaded on the project's machines, so the demo makes its own teacher: a
byte-level BPE tokenizer and a PhiMoE-architecture model (8 experts, top-2) trained for a few
minutes on the standard library's own source files, which every Python installation carries.

Held-out rule: the corpus is the sorted list of source files (capped at `max_text_bytes`); every
file whose index is a multiple of `validation_every` is validation, the rest is training. The
tokenizer sees training files only. The report states the teacher's validation perplexity next to
that of a unigram-frequency model (add-one smoothing, fit on the training tokens), which a model
that learned real structure must beat by far.

Determinism: with a step budget (no `time_budget_s`) the same config, seed, Python installation
and torch thread count give the same weights. The thread count matters on CPU: matmul reductions
are split differently across threads, so 1 and 2 threads give slightly different floats that
grow over training. A time budget makes the run stop (and the cosine schedule end) by wall
clock, so it is not reproducible; it is a safety cap for slow machines.
"""

from __future__ import annotations

import hashlib
import json
import math
import sysconfig
import time
from pathlib import Path
from typing import Optional

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator

from .evaluate import resolve_device, sequence_nll
from .params import count_parameters
from .storage import ensure_free_output, write_json_atomic

SPECIAL_TOKENS = ("<pad>", "<s>", "</s>")  # ids 0, 1, 2
PAD_ID, BOS_ID, EOS_ID = 0, 1, 2
# Directories under the stdlib path that are not the standard library's own source (third-party
# packages in a non-venv install) — always skipped.
_NOT_STDLIB = ("site-packages", "dist-packages", "__pycache__")


class PretrainTeacherConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    seed: int = 0
    # Corpus
    source_dir: Optional[str] = Field(None, description="directory of *.py files; default: this Python's stdlib")
    exclude_dirs: list[str] = Field(
        default_factory=lambda: ["test", "tests", "encodings", "pydoc_data", "idle_test"],
        description="directory names skipped anywhere in the tree (test suites, codec tables, doc dumps)",
    )
    max_text_bytes: int = Field(6_000_000, gt=0, description="stop adding files (in sorted order) past this many bytes")
    validation_every: int = Field(20, ge=2, description="file index % validation_every == 0 is held out")
    # Tokenizer
    vocab_size: int = Field(2048, ge=300)
    # Model (PhiMoE)
    hidden_size: int = Field(128, gt=0)
    num_layers: int = Field(4, gt=0)
    num_experts: int = Field(8, ge=2)
    experts_per_token: int = Field(2, ge=1)
    expert_size: int = Field(256, gt=0, description="intermediate size of each expert")
    num_attention_heads: int = Field(4, gt=0)
    num_kv_heads: int = Field(2, gt=0)
    max_position_embeddings: int = Field(4096, gt=0)
    # Training
    seq_len: int = Field(128, ge=8)
    batch_size: int = Field(16, gt=0)
    lr: float = Field(3e-3, gt=0)
    min_lr_ratio: float = Field(0.1, ge=0, le=1)
    warmup_steps: int = Field(50, ge=0)
    weight_decay: float = Field(0.01, ge=0)
    grad_clip: float = Field(1.0, gt=0)
    max_steps: int = Field(840, gt=0)
    time_budget_s: Optional[float] = Field(None, gt=0, description="stop after this many seconds (not reproducible)")
    # Runtime
    device: str = Field("auto", description="auto | cpu | cuda | cuda:N")
    num_threads: Optional[int] = Field(None, gt=0, description="torch CPU threads; fix it for bit-reproducible runs")
    experts_implementation: Optional[str] = Field(
        None, description="transformers experts kernel (eager | grouped_mm | batched_mm); None = library default"
    )
    log_every: int = Field(20, gt=0)
    eval_every: int = Field(200, ge=0, description="validation loss on eval_rows_during_training rows; 0 = off")
    eval_rows_during_training: int = Field(64, gt=0)
    eval_batch_size: int = Field(32, gt=0)
    max_eval_rows: Optional[int] = Field(None, gt=0, description="cap on validation rows for the final perplexity")

    @model_validator(mode="after")
    def _check(self):
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"hidden_size ({self.hidden_size}) must be divisible by num_attention_heads ({self.num_attention_heads})")
        if self.num_attention_heads % self.num_kv_heads:
            raise ValueError(f"num_attention_heads ({self.num_attention_heads}) must be a multiple of num_kv_heads ({self.num_kv_heads})")
        if self.experts_per_token > self.num_experts:
            raise ValueError(f"experts_per_token ({self.experts_per_token}) exceeds num_experts ({self.num_experts})")
        if self.seq_len > self.max_position_embeddings:
            raise ValueError(f"seq_len ({self.seq_len}) exceeds max_position_embeddings ({self.max_position_embeddings})")
        return self


# ---------------------------------------------------------------------------------------------
# Corpus


def source_files(cfg: PretrainTeacherConfig) -> tuple[Path, list[Path]]:
    """The corpus files in their fixed order: sorted relative paths, capped at max_text_bytes."""
    root = Path(cfg.source_dir) if cfg.source_dir else Path(sysconfig.get_paths()["stdlib"])
    if not root.is_dir():
        raise ValueError(f"source_dir {str(root)!r} is not a directory; point source_dir at a tree of *.py files")
    skip = set(cfg.exclude_dirs) | set(_NOT_STDLIB)
    files = sorted(
        (p for p in root.rglob("*.py") if p.is_file() and not skip.intersection(p.relative_to(root).parts[:-1])),
        key=lambda p: p.relative_to(root).as_posix(),
    )
    chosen, total = [], 0
    for p in files:
        if total >= cfg.max_text_bytes:
            break
        chosen.append(p)
        total += p.stat().st_size
    return root, chosen


def split_corpus(cfg: PretrainTeacherConfig) -> dict:
    root, files = source_files(cfg)
    train, val = [], []
    h = hashlib.sha256()
    for i, p in enumerate(files):
        text = p.read_text(encoding="utf-8", errors="replace")
        h.update(p.relative_to(root).as_posix().encode() + b"\0" + text.encode("utf-8") + b"\0")
        (val if i % cfg.validation_every == 0 else train).append(text)
    if len(train) < 1 or len(val) < 1:
        raise ValueError(
            f"the corpus at {root} gives {len(train)} training and {len(val)} validation files; "
            "raise max_text_bytes or lower validation_every"
        )
    return {
        "root": str(root), "train": train, "validation": val,
        "info": {"root": str(root), "files": len(files), "train_files": len(train), "validation_files": len(val),
                 "bytes": sum(len(t.encode("utf-8")) for t in train + val), "sha256": h.hexdigest()[:16]},
    }


def train_tokenizer(texts: list[str], vocab_size: int, model_max_length: int):
    """A byte-level BPE wrapped as a `transformers` fast tokenizer with bos/eos/pad set."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                   model_max_length=model_max_length)
    assert (fast.pad_token_id, fast.bos_token_id, fast.eos_token_id) == (PAD_ID, BOS_ID, EOS_ID)
    return fast


def pack_rows(tokenizer, texts: list[str], seq_len: int) -> torch.Tensor:
    """Documents joined with EOS after each and cut into full rows of seq_len: LongTensor [N, T]."""
    stream: list[int] = []
    # The raw `tokenizers` backend: batched in Rust, and no max-length warning for whole files.
    for enc in tokenizer.backend_tokenizer.encode_batch(texts, add_special_tokens=False):
        stream.extend(enc.ids)
        stream.append(EOS_ID)
    n = len(stream) // seq_len
    return torch.tensor(stream[: n * seq_len], dtype=torch.long).view(n, seq_len)


def unigram_perplexity(train_rows: torch.Tensor, val_rows: torch.Tensor, vocab_size: int) -> float:
    """Perplexity of unigram frequencies (add-one smoothing, fit on the training tokens) on the same
    validation targets the model is scored on (every position but the first of each row)."""
    counts = torch.bincount(train_rows.flatten(), minlength=vocab_size).double() + 1.0
    logp = counts.log() - counts.sum().log()
    targets = val_rows[:, 1:].flatten()
    return math.exp(float(-logp[targets].mean()))


# ---------------------------------------------------------------------------------------------
# Model and training


def build_model(cfg: PretrainTeacherConfig, vocab_size: int):
    import transformers
    from transformers import AutoModelForCausalLM

    config = transformers.PhimoeConfig(
        vocab_size=vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.expert_size,
        num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.num_kv_heads, num_local_experts=cfg.num_experts,
        num_experts_per_tok=cfg.experts_per_token, max_position_embeddings=cfg.max_position_embeddings,
        tie_word_embeddings=False, pad_token_id=PAD_ID, bos_token_id=BOS_ID, eos_token_id=EOS_ID,
    )
    model = AutoModelForCausalLM.from_config(config)
    # The kernel choice lives in the runtime config only (transformers drops it from config.json),
    # so the saved checkpoint loads anywhere with the library default.
    if cfg.experts_implementation and hasattr(model, "set_experts_implementation"):
        model.set_experts_implementation(cfg.experts_implementation)
    return model


def lr_at(cfg: PretrainTeacherConfig, step: int, progress: float) -> float:
    """Linear warm-up over warmup_steps, then cosine from lr to lr*min_lr_ratio over `progress` in [0, 1]."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    cos = 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    return cfg.lr * (cfg.min_lr_ratio + (1.0 - cfg.min_lr_ratio) * cos)


def _optimizer(model, cfg: PretrainTeacherConfig):
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]  # norms and biases
    return torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg.lr, betas=(0.9, 0.95), eps=1e-8,
    )


def _log(msg: str) -> None:
    print(msg, flush=True)  # flushed: the line is the progress display, also when stdout is a file


def _fmt_s(s: float) -> str:
    s = int(max(0, s))
    return f"{s // 60}m{s % 60:02d}s"


def _train(model, cfg: PretrainTeacherConfig, train_rows, val_rows, device, metrics_file, log) -> dict:
    from .kd_loss import next_token_loss

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
        progress = (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps)
        if cfg.time_budget_s is not None:
            progress = max(progress, elapsed / cfg.time_budget_s)
        lr = lr_at(cfg, step, progress)
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
                rec["val_loss"] = _mean_nll(model, val_rows[: cfg.eval_rows_during_training], cfg.eval_batch_size, device)
                model.train()
            metrics_file.write(json.dumps(rec) + "\n")
            metrics_file.flush()
            extra = f" val_loss {rec['val_loss']:.3f}" if "val_loss" in rec else ""
            log(f"[pretrain_teacher] step {step}/{cfg.max_steps} loss {rec['loss']:.4f}{extra} lr {lr:.2e} "
                f"{tok_s:,.0f} tok/s elapsed {_fmt_s(now - start)} ETA {_fmt_s(remaining)}")
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
def _mean_nll(model, rows: torch.Tensor, batch_size: int, device) -> float:
    model.eval()
    total, count = 0.0, 0
    for i in range(0, rows.shape[0], batch_size):
        s, c = sequence_nll(model, rows[i : i + batch_size].to(device))
        total, count = total + s, count + c
    return total / max(count, 1)


def run_pretrain_teacher(cfg: PretrainTeacherConfig, out_dir: str | Path, log=_log) -> dict:
    """Train the demo teacher; write a Hugging Face model directory with tokenizer, `metrics.jsonl`
    and `report.json` (written last) into `out_dir`. Returns the report's headline metrics."""
    out_dir = Path(out_dir)
    ensure_free_output(out_dir)
    device = resolve_device(cfg.device)
    corpus = split_corpus(cfg)  # bad source paths fail here, before any training
    threads = torch.get_num_threads()
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    try:
        return _run(cfg, out_dir, corpus, device, log)
    finally:
        torch.set_num_threads(threads)  # the thread count is process-wide: leave it as found


def _run(cfg: PretrainTeacherConfig, out_dir: Path, corpus: dict, device: torch.device, log) -> dict:
    torch.manual_seed(cfg.seed)
    t0 = time.perf_counter()

    tokenizer = train_tokenizer(corpus["train"], cfg.vocab_size, cfg.max_position_embeddings)
    vocab_size = len(tokenizer)
    train_rows = pack_rows(tokenizer, corpus["train"], cfg.seq_len)
    val_rows = pack_rows(tokenizer, corpus["validation"], cfg.seq_len)
    if train_rows.shape[0] < cfg.batch_size or val_rows.shape[0] < 1:
        raise ValueError(
            f"the corpus gives {train_rows.shape[0]} training and {val_rows.shape[0]} validation rows of "
            f"{cfg.seq_len} tokens; raise max_text_bytes or lower seq_len/batch_size"
        )
    log(f"[pretrain_teacher] corpus {corpus['info']['files']} files, {corpus['info']['bytes'] / 1e6:.2f} MB; "
        f"vocab {vocab_size}; {train_rows.numel():,} train / {val_rows.numel():,} validation tokens "
        f"({time.perf_counter() - t0:.1f}s)")

    torch.manual_seed(cfg.seed)  # model init does not depend on how much randomness tokenization used
    model = build_model(cfg, vocab_size).to(device)
    params = count_parameters(model)
    log(f"[pretrain_teacher] PhiMoE {params['total'] / 1e6:.2f}M params ({params['active'] / 1e6:.2f}M active), "
        f"device {device}, threads {torch.get_num_threads()}, experts kernel {model.config._experts_implementation}")

    out_dir.mkdir(parents=True, exist_ok=True)
    with open(out_dir / "metrics.jsonl", "w") as metrics_file:
        train_info = _train(model, cfg, train_rows, val_rows, device, metrics_file, log)
        eval_rows = val_rows if cfg.max_eval_rows is None else val_rows[: cfg.max_eval_rows]
        val_nll = _mean_nll(model, eval_rows, cfg.eval_batch_size, device)
        final = {"final": True, "step": train_info["steps"], "val_loss": val_nll}
        metrics_file.write(json.dumps(final) + "\n")

    unigram = unigram_perplexity(train_rows, eval_rows, vocab_size)
    val_ppl = math.exp(val_nll)
    log(f"[pretrain_teacher] validation perplexity {val_ppl:.2f} vs unigram {unigram:.2f} "
        f"after {train_info['steps']} steps in {_fmt_s(train_info['train_seconds'])}")

    model.eval()
    model.to("cpu").save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    report = {
        "kind": "pretrain_teacher",
        "validation_perplexity": val_ppl,
        "validation_nll": val_nll,
        "unigram_perplexity": unigram,
        "validation_tokens_scored": int(eval_rows.shape[0] * (cfg.seq_len - 1)),
        "validation_rows": int(eval_rows.shape[0]),
        "train_rows": int(train_rows.shape[0]),
        "vocab_size": vocab_size,
        "parameters": params,
        "corpus": corpus["info"],
        "device": str(device),
        "torch_threads": torch.get_num_threads(),
        "experts_implementation": model.config._experts_implementation,
        "total_seconds": time.perf_counter() - t0,
        **train_info,
        "config": cfg.model_dump(),
    }
    write_json_atomic(out_dir / "report.json", report)
    return {k: report[k] for k in ("validation_perplexity", "unigram_perplexity", "steps", "train_seconds",
                                   "steps_per_s", "tokens_per_s", "vocab_size")} | {
        "total_params": params["total"], "active_params": params["active"]}
