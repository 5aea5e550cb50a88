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

import json
import math
import time
from pathlib import Path

import torch

from slimmoe.tasks.core.checkpoint import use_hub_architecture
from slimmoe.tasks.core.params import count_parameters
from slimmoe.tasks.core.kernels import enable_gpu_numerics
from slimmoe.tasks.core.runtime import resolve_device
from slimmoe.tasks.core.storage import ensure_free_output, write_json_atomic
from slimmoe.tasks.pretraining.config import PretrainTeacherConfig
from slimmoe.tasks.pretraining.corpus import pack_rows, split_corpus, train_tokenizer, unigram_perplexity
from slimmoe.tasks.pretraining.trainer import build_model, fmt_seconds, mean_nll, train



def _log(msg: str) -> None:
    print(msg, flush=True)  # flushed: the line is the progress display, also when stdout is a file


def run_pretrain_teacher(cfg: PretrainTeacherConfig, out_dir: str | Path, log=_log) -> dict:
    """Train the demo teacher; write a Hugging Face model directory with tokenizer, `metrics.jsonl`
    and `report.json` (written last) into `out_dir`. Returns the report's headline metrics."""
    out_dir = Path(out_dir)
    ensure_free_output(out_dir)
    device = resolve_device(cfg.run_device(torch.cuda.is_available()))
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
    enable_gpu_numerics(device)
    model = build_model(cfg, vocab_size, device).to(device)
    params = count_parameters(model)
    log(f"[pretrain_teacher] PhiMoE {params['total'] / 1e6:.2f}M params ({params['active'] / 1e6:.2f}M active), "
        f"device {device}, threads {torch.get_num_threads()}, experts kernel {model.config._experts_implementation}")

    out_dir.mkdir(parents=True, exist_ok=True)
    with open(out_dir / "metrics.jsonl", "w") as metrics_file:
        train_info = train(model, cfg, train_rows, val_rows, device, metrics_file, log)
        eval_rows = val_rows if cfg.max_eval_rows is None else val_rows[: cfg.max_eval_rows]
        val_nll = mean_nll(model, eval_rows, cfg.eval_batch_size, device)
        final = {"final": True, "step": train_info["steps"], "val_loss": val_nll}
        metrics_file.write(json.dumps(final) + "\n")

    unigram = unigram_perplexity(train_rows, eval_rows, vocab_size)
    val_ppl = math.exp(val_nll)
    log(f"[pretrain_teacher] validation perplexity {val_ppl:.2f} vs unigram {unigram:.2f} "
        f"after {train_info['steps']} steps in {fmt_seconds(train_info['train_seconds'])}")

    model.eval()
    model.to("cpu").save_pretrained(out_dir, safe_serialization=True)
    use_hub_architecture(out_dir)
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
