"""Evaluate a model directory on a tokenized validation split.

Report (`report.json`): perplexity (token-weighted mean next-token NLL, exponentiated), KL to the
teacher and top-1 agreement with it where a logit cache for the split is given (KL over the
cache's top-k + exact rest buckets at T=1, the same quantity the distillation loss optimises),
total and active parameters, forward-pass tokens/s at a fixed batch and sequence length, peak
memory, and optional lm-eval-harness tasks (a requested task that cannot run fails the evaluation).
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from slimmoe.tasks.core.checkpoint import has_tokenizer, load_config, load_model
from slimmoe.tasks.core.kernels import enable_gpu_numerics
from slimmoe.tasks.core.fingerprint import tokenizer_fingerprint
from slimmoe.tasks.core.params import count_parameters
from slimmoe.tasks.core.runtime import DTYPES, resolve_device
from slimmoe.tasks.core.storage import ensure_free_output, write_json_atomic
from slimmoe.tasks.data.readers import open_logit_cache, open_token_shards, parent_manifest, split_dir
from slimmoe.tasks.evaluation.config import EvaluateConfig
from slimmoe.tasks.evaluation.lm_eval import check_lm_eval_tasks, run_lm_eval_tasks
from slimmoe.tasks.evaluation.metrics import PeakMemory, measure_throughput, score_rows


def _calibration_rows(tokens_dir: Path, tokens, n: int) -> tuple[torch.Tensor, str]:
    """Rows for calibrating ODP thresholds: the train split when tokens_dir has one, else the first
    rows of the evaluated split (then the threshold has seen the evaluation data; the report says so)."""
    train = split_dir(tokens_dir, "train", "token_shards", missing_ok=True)
    if train is not None and train != tokens_dir:
        shards = open_token_shards(train)
        return shards.read_rows(range(min(n, shards.num_rows)))["input_ids"], "train split"
    return tokens.read_rows(range(min(n, tokens.num_rows)))["input_ids"], "evaluated split (no train split given)"


def _dynamic_pruning(model, cfg: EvaluateConfig, tokens_dir: Path, tokens, device):
    """MC-MoE online dynamic pruning (ODP) switched on for the evaluation: returns (handle, info),
    or (None, None) when neither field is set (the model runs unchanged)."""
    if cfg.dynamic_pruning is None and cfg.dynamic_pruning_target is None:
        return None, None
    from slimmoe.tasks.mcmoe.odp import apply_dynamic_pruning, calibrate_betas

    info = {"protect_top": cfg.dynamic_pruning_protect_top}
    if cfg.dynamic_pruning is not None:
        handle = apply_dynamic_pruning(model, beta=cfg.dynamic_pruning, protect_top=cfg.dynamic_pruning_protect_top)
        info["beta"] = cfg.dynamic_pruning
    else:
        rows, source = _calibration_rows(tokens_dir, tokens, cfg.dynamic_pruning_calibration_rows)
        batches = [rows[i : i + cfg.batch_size].to(device) for i in range(0, rows.shape[0], cfg.batch_size)]
        betas = calibrate_betas(model, batches, target_share=cfg.dynamic_pruning_target,
                                protect_top=cfg.dynamic_pruning_protect_top)
        handle = apply_dynamic_pruning(model, per_layer_betas=betas, protect_top=cfg.dynamic_pruning_protect_top)
        info.update({"target_share": cfg.dynamic_pruning_target, "calibrated_on": source,
                     "calibration_rows": int(rows.shape[0]), "betas": betas})
    return handle, info


# ---------------------------------------------------------------------------------------------


def run_evaluate(cfg: EvaluateConfig, model_dir: str | Path, tokens_dir: str | Path, logits_dir: str | Path | None,
                 out_dir: str | Path, teacher_fingerprint: str | None = None) -> dict:
    """Evaluate `model_dir` on the validation split of `tokens_dir` (and against the teacher cache in
    `logits_dir`, if given); write `out_dir/report.json`. Returns the headline metrics.
    `teacher_fingerprint`: the teacher the cache must come from, when the caller has it; otherwise
    the one its teacher_logits output's manifest records (a split that disagrees is refused)."""
    out_dir, model_dir = Path(out_dir), Path(model_dir)
    # Every input is checked before the model is loaded.
    ensure_free_output(out_dir)
    load_config(model_dir, cfg.trust_remote_code)
    device = resolve_device(cfg.run_device(torch.cuda.is_available()))
    tokens_path = split_dir(tokens_dir, "validation", "token_shards")
    tokens = open_token_shards(tokens_path)
    data_tok_fp = tokens.manifest.get("tokenizer_fingerprint")
    model_tok_fp = tokenizer_fingerprint(model_dir) if has_tokenizer(model_dir) else None
    if cfg.check_tokenizer and model_tok_fp and data_tok_fp and model_tok_fp != data_tok_fp:
        raise ValueError(
            f"the model's tokenizer ({model_tok_fp}) is not the one tokens_dir was made with ({data_tok_fp}); "
            "tokenize the data with this model's tokenizer, or set check_tokenizer=False if they are equivalent"
        )
    cache, cache_note, cache_path = None, None, None
    if logits_dir is not None:
        cache_path = split_dir(logits_dir, "validation", "logit_cache", missing_ok=True)
        if cache_path is None:
            cache_note = f"the teacher-logits output {logits_dir} has no validation split"
        else:
            parent = parent_manifest(cache_path)
            expect_teacher = teacher_fingerprint or (parent or {}).get("teacher_fingerprint")
            cache = open_logit_cache(cache_path, expect_teacher_fingerprint=expect_teacher,
                                     expect_tokenizer_fingerprint=data_tok_fp)
            if cache.num_rows > tokens.num_rows:
                raise ValueError(f"the logit cache holds {cache.num_rows} rows, the token split only {tokens.num_rows}; "
                                 "pass the teacher-logits output made from this tokens_dir")
            if cache.seq_len != tokens.seq_len:
                raise ValueError(f"the logit cache has seq_len {cache.seq_len} but the token split {tokens.seq_len}; "
                                 "pass the teacher-logits output made from this tokens_dir")
    # A task named wrong, a broken task file or a missing include directory: refused before the model
    # is scored rather than after.
    check_lm_eval_tasks(cfg)

    enable_gpu_numerics(device)
    memory = PeakMemory(device)
    memory.start()
    t0 = time.perf_counter()
    dtype = DTYPES[cfg.weights_dtype(device.type)]
    from slimmoe.tasks.mcmoe.packed import is_quantized_checkpoint, load_quantized

    if is_quantized_checkpoint(model_dir):  # a `slimmoe quantize` output: rebuilt with its packed experts
        model = load_quantized(model_dir, dtype=dtype, device=device, trust_remote_code=cfg.trust_remote_code).eval()
    else:
        model = load_model(model_dir, dtype=dtype, device=device, trust_remote_code=cfg.trust_remote_code,
                           experts_implementation=cfg.experts_kernel_on(device)).eval()
    if cache is not None:
        vocab = model.get_output_embeddings().weight.shape[0]
        if cache.vocab_size != vocab:
            raise ValueError(f"the logit cache's teacher has a vocabulary of {cache.vocab_size}, the model {vocab}; "
                             "KL needs the same vocabulary: evaluate against a cache of the same tokenizer")
    params = count_parameters(model)
    odp, dyn = _dynamic_pruning(model, cfg, Path(tokens_dir), tokens, device)
    try:
        if odp is not None:
            odp.reset_stats()
        quality = score_rows(model, tokens, cache, cfg, device)
        if odp is not None:
            # Pruned share on the evaluated rows; throughput below also runs with ODP's hooks on.
            dyn["evaluation"] = odp.stats()
        quality_seconds = time.perf_counter() - t0
        eval_memory = memory.read()

        memory.start()
        speed = measure_throughput(model, cfg, device)
        speed_memory = memory.read()
    finally:
        if odp is not None:
            odp.remove()
    if dyn is not None and cfg.lm_eval_tasks:
        dyn["lm_eval_note"] = "lm-eval tasks load the checkpoint afresh and run without dynamic pruning"

    experts_impl = getattr(model.config, "_experts_implementation", None)
    del model, odp  # lm-eval loads its own copy: do not hold two on the device
    if device.type == "cuda":
        torch.cuda.empty_cache()
    lm_eval_results = run_lm_eval_tasks(model_dir, cfg, device)

    report = {
        "kind": "evaluate",
        "model_dir": str(model_dir),
        "tokens_dir": str(tokens_path),
        "logits_dir": str(cache_path) if cache_path else None,
        **quality,
        "kl_to_teacher": quality.get("kl_to_teacher"),
        "top1_agreement": quality.get("top1_agreement"),
        "teacher_cache": None if cache is None else {
            "path": str(cache_path), "k": cache.k, "teacher_fingerprint": cache.manifest.get("teacher_fingerprint"),
            "rows": cache.num_rows},
        "teacher_cache_note": cache_note,
        "parameters": params,
        "throughput": speed,
        "memory": {"evaluation": eval_memory, "throughput_forward": speed_memory},
        "dynamic_pruning": dyn,
        "lm_eval": lm_eval_results,
        "experts_implementation": experts_impl,
        "tokenizer_fingerprint": data_tok_fp,
        "evaluation_seconds": quality_seconds,
        "config": cfg.model_dump(),
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out_dir / "report.json", report)
    return {
        "perplexity": quality["perplexity"], "kl_to_teacher": quality.get("kl_to_teacher"),
        "top1_agreement": quality.get("top1_agreement"), "total_params": params["total"],
        "active_params": params["active"], "tokens_per_s": speed["tokens_per_s"],
        "peak_memory_bytes": eval_memory["peak_bytes"],
    }
