"""Evaluate a model directory on a tokenized validation split.

Report (`report.json`): perplexity (token-weighted mean next-token NLL, exponentiated), KL to the
teacher and top-1 agreement with it where a logit cache for the split is given (KL over the
cache's top-k + exact rest buckets at T=1, the same quantity the distillation loss optimises),
total and active parameters, forward-pass tokens/s at a fixed batch and sequence length, peak
memory, and optional lm-eval-harness tasks (each task's failure is recorded, never fatal).
"""

from __future__ import annotations

import math
import re
import resource
import time
from pathlib import Path
from typing import Literal, Optional

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from .storage import ensure_free_output, write_json_atomic

LM_EVAL_INSTALL_HINT = "pip install 'lm-eval>=0.4' (or the project's extra: pip install 'slimmoe[eval]')"


class EvaluateConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    max_rows: Optional[int] = Field(256, gt=0, description="validation rows scored (None = all)")
    batch_size: int = Field(8, gt=0)
    device: str = Field("auto", description="auto | cpu | cuda | cuda:N")
    load_dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="weights dtype; auto = bfloat16 on CUDA, float32 on CPU")
    autocast_bf16: bool = Field(True, description="bf16 autocast on CUDA (ignored on CPU, which runs float32)")
    experts_implementation: Optional[str] = Field(None, description="transformers experts kernel; None = library default")
    trust_remote_code: bool = False
    check_tokenizer: bool = Field(True, description="refuse a model whose tokenizer files differ from the data's tokenizer")
    # Throughput: a forward pass on random ids of this shape, after warm-up.
    throughput_batch_size: int = Field(8, gt=0)
    throughput_seq_len: int = Field(128, gt=0)
    throughput_warmup: int = Field(2, ge=0)
    throughput_repeats: int = Field(5, gt=0)
    seed: int = 0
    # lm-eval-harness tasks by name (run only when asked; lm_eval is an optional dependency).
    lm_eval_tasks: list[str] = Field(default_factory=list)
    lm_eval_limit: Optional[int] = Field(None, gt=0, description="examples per lm-eval task (None = all)")
    lm_eval_batch_size: int = Field(8, gt=0)
    lm_eval_num_fewshot: Optional[int] = Field(None, ge=0)
    # MC-MoE online dynamic pruning (ODP) during evaluation: a fixed beta, or a target fraction of
    # second experts to drop (beta calibrated). Both unset: the model runs unchanged.
    dynamic_pruning: Optional[float] = Field(None, ge=0, le=1, description="ODP beta")
    dynamic_pruning_target: Optional[float] = Field(None, ge=0, lt=1, description="ODP target share of expert calls dropped")
    dynamic_pruning_protect_top: float = Field(0.02, ge=0, lt=1, description="ODP: share of most important tokens kept whole")
    dynamic_pruning_calibration_rows: int = Field(32, gt=0, description="rows used to calibrate betas for a target")

    @field_validator("lm_eval_tasks", mode="before")
    @classmethod
    def _split_tasks(cls, v):
        if isinstance(v, str):
            v = [t for t in v.split(",")]
        return [t.strip() for t in v]

    @model_validator(mode="after")
    def _check(self):
        if any(not t for t in self.lm_eval_tasks):
            raise ValueError("lm_eval_tasks holds an empty task name; give names such as 'hellaswag,arc_easy'")
        if self.dynamic_pruning is not None and self.dynamic_pruning_target is not None:
            raise ValueError("set dynamic_pruning (a beta) or dynamic_pruning_target (a drop fraction), not both")
        return self


# ---------------------------------------------------------------------------------------------
# Shared helpers (the pretrain task scores its validation split with the same code)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} was asked for but CUDA is not available; set device to 'cpu' or 'auto'")
    return device


def forward_logits(model, input_ids: torch.Tensor, autocast_bf16: bool = True) -> torch.Tensor:
    device = input_ids.device
    with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=autocast_bf16 and device.type == "cuda"):
        return model(input_ids=input_ids, use_cache=False).logits.float()


def next_token_nll(logits: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    """Per-position NLL of the next token, [B, T-1], float32."""
    pred = logits[:, :-1].float()
    return F.cross_entropy(pred.reshape(-1, pred.shape[-1]), input_ids[:, 1:].reshape(-1), reduction="none").view(
        input_ids.shape[0], -1)


@torch.no_grad()
def sequence_nll(model, input_ids: torch.Tensor, autocast_bf16: bool = True) -> tuple[float, int]:
    """(sum of next-token NLLs, number of predicted tokens) for a batch of rows."""
    nll = next_token_nll(forward_logits(model, input_ids, autocast_bf16), input_ids)
    return float(nll.double().sum()), nll.numel()


# ---------------------------------------------------------------------------------------------
# Inputs


def _manifest(path: Path, what: str) -> dict:
    from .logit_cache import LogitCacheError, read_manifest

    try:
        return read_manifest(path)
    except LogitCacheError as err:
        raise LogitCacheError(f"{what}: {err}") from None


def resolve_token_split(tokens_dir: str | Path, split: str = "validation") -> Path:
    """A tokenize-node output (use its `split`/) or a token-shards directory itself."""
    path = Path(tokens_dir)
    kind = _manifest(path, "tokens_dir").get("kind")
    if kind == "tokenized_dataset":
        sub = path / split
        _manifest(sub, f"tokens_dir's {split} split")
        return sub
    if kind == "token_shards":
        return path
    raise ValueError(f"tokens_dir {path} holds {kind!r}, not token shards or a tokenized dataset; pass the tokenize node's output")


def resolve_cache_split(logits_dir: str | Path, split: str = "validation") -> tuple[Path | None, str | None]:
    """A teacher-logits node output (use its `split`/, if it has one) or a single logit cache.
    Returns (path, None) or (None, why there is no cache for the split)."""
    path = Path(logits_dir)
    manifest = _manifest(path, "logits_dir")
    kind = manifest.get("kind")
    if kind == "teacher_logits":
        sub = path / split
        if split not in manifest.get("splits", []) or not (sub / "manifest.json").exists():
            return None, f"the teacher-logits output {path} has no {split} split (splits: {manifest.get('splits')})"
        return sub, None
    if kind == "logit_cache":
        return path, None
    raise ValueError(f"logits_dir {path} holds {kind!r}, not a logit cache or a teacher-logits output")


def _open_token_shards(path: Path):
    from .logit_cache import open_token_shards

    return open_token_shards(path)


def _open_logit_cache(path: Path, tokenizer_fp: str | None):
    from .logit_cache import open_logit_cache

    return open_logit_cache(path, expect_tokenizer_fingerprint=tokenizer_fp)


# ---------------------------------------------------------------------------------------------
# Memory


class PeakMemory:
    """Peak memory over a phase. CUDA: torch.cuda.max_memory_allocated. CPU: the process RSS
    high-water mark (VmHWM), reset at the phase start through /proc/self/clear_refs where Linux
    allows it; otherwise getrusage's ru_maxrss, which covers the whole process lifetime."""

    def __init__(self, device: torch.device):
        self.device = device
        self.reset_ok = False

    @staticmethod
    def _status_kb(field: str) -> int | None:
        try:
            m = re.search(rf"^{field}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.MULTILINE)
        except OSError:
            return None
        return int(m.group(1)) if m else None

    def start(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.reset_ok = True
            return
        try:
            Path("/proc/self/clear_refs").write_text("5")  # "5" resets the peak-RSS counter only
            self.reset_ok = self._status_kb("VmHWM") is not None
        except OSError:
            self.reset_ok = False
        self.baseline_kb = self._status_kb("VmRSS")

    def read(self) -> dict:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            return {"kind": "cuda_max_memory_allocated", "peak_bytes": int(torch.cuda.max_memory_allocated(self.device)),
                    "label": "torch.cuda.max_memory_allocated during this phase"}
        if self.reset_ok:
            out = {"kind": "process_rss_hwm", "peak_bytes": self._status_kb("VmHWM") * 1024,
                   "label": "process RSS high-water mark during this phase (VmHWM reset via /proc/self/clear_refs)"}
        else:
            # ru_maxrss is in kB on Linux
            out = {"kind": "process_maxrss_lifetime", "peak_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
                   "label": "process RSS high-water mark since the process started (could not reset it)"}
        if getattr(self, "baseline_kb", None) is not None:
            out["rss_at_start_bytes"] = self.baseline_kb * 1024
            out["above_start_bytes"] = max(0, out["peak_bytes"] - out["rss_at_start_bytes"])
        return out


# ---------------------------------------------------------------------------------------------
# Measurements


@torch.no_grad()
def score_rows(model, tokens, cache, cfg: EvaluateConfig, device: torch.device) -> dict:
    """Perplexity, and KL / top-1 agreement against the cache when there is one."""
    vocab = model.get_output_embeddings().weight.shape[0]
    n = tokens.num_rows if cfg.max_rows is None else min(cfg.max_rows, tokens.num_rows)
    if cache is not None:
        n = min(n, cache.num_rows)
    nll_sum, nll_count = 0.0, 0
    kl_sum, agree, kl_count = 0.0, 0, 0
    for start in range(0, n, cfg.batch_size):
        idx = list(range(start, min(n, start + cfg.batch_size)))
        if cache is not None:
            teacher = cache.read_rows(idx)
            # Cache rows carry the token split's row ids; score exactly those rows.
            ids = tokens.read_rows(teacher["row_id"].tolist())["input_ids"]
            if not torch.equal(ids, teacher["input_ids"]):
                raise ValueError(
                    f"the logit cache's rows {teacher['row_id'].tolist()[:4]}... hold other tokens than the token split's; "
                    "the cache was made from another split or dataset: pass the teacher-logits output of this tokens_dir"
                )
        else:
            ids = tokens.read_rows(idx)["input_ids"]
        ids = ids.long()
        if int(ids.max()) >= vocab or int(ids.min()) < 0:
            raise ValueError(f"token ids up to {int(ids.max())} do not fit the model's vocabulary of {vocab}; "
                             "the data was tokenized with another tokenizer")
        ids = ids.to(device)
        logits = forward_logits(model, ids, cfg.autocast_bf16)
        nll = next_token_nll(logits, ids)
        nll_sum += float(nll.double().sum())
        nll_count += nll.numel()
        if cache is not None:
            from .kd_loss import per_token_kl

            topk_ids = teacher["topk_ids"].to(device)
            kl = per_token_kl(logits, topk_ids, teacher["topk_logprobs"].to(device), teacher["rest_logprob"].to(device), 1.0)
            kl_sum += float(kl.double().sum())
            kl_count += kl.numel()
            # The teacher's top-1 is its highest cached log-prob (not assuming the cache is sorted).
            t_top1 = topk_ids.gather(-1, teacher["topk_logprobs"].to(device).argmax(-1, keepdim=True)).squeeze(-1)
            agree += int((logits.argmax(-1) == t_top1).sum())
    if nll_count == 0:
        raise ValueError("the validation split has no rows to score; check tokens_dir")
    mean_nll = nll_sum / nll_count
    out = {"perplexity": math.exp(mean_nll), "nll": mean_nll, "rows": n, "tokens_scored": nll_count}
    if cache is not None:
        out.update({"kl_to_teacher": kl_sum / kl_count, "top1_agreement": agree / kl_count, "kl_tokens": kl_count})
    return out


@torch.no_grad()
def measure_throughput(model, cfg: EvaluateConfig, device: torch.device) -> dict:
    vocab = model.get_output_embeddings().weight.shape[0]
    gen = torch.Generator().manual_seed(cfg.seed)
    ids = torch.randint(0, vocab, (cfg.throughput_batch_size, cfg.throughput_seq_len), generator=gen).to(device)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    autocast = cfg.autocast_bf16 and device.type == "cuda"

    def forward():
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=autocast):
            model(input_ids=ids, use_cache=False)

    for _ in range(cfg.throughput_warmup):
        forward()
    sync()
    t0 = time.perf_counter()
    for _ in range(cfg.throughput_repeats):
        forward()
    sync()
    seconds = time.perf_counter() - t0
    tokens = ids.numel() * cfg.throughput_repeats
    return {"tokens_per_s": tokens / seconds, "batch_size": cfg.throughput_batch_size, "seq_len": cfg.throughput_seq_len,
            "warmup": cfg.throughput_warmup, "repeats": cfg.throughput_repeats, "seconds": seconds,
            "threads": torch.get_num_threads(), "device": str(device),
            "dtype": f"{next(model.parameters()).dtype}".replace("torch.", "") + ("+bf16-autocast" if autocast else "")}


def _calibration_rows(tokens_dir: Path, tokens, n: int) -> tuple[torch.Tensor, str]:
    """Rows for calibrating ODP thresholds: the train split when tokens_dir has one, else the first
    rows of the evaluated split (then the threshold has seen the evaluation data; the report says so)."""
    train = tokens_dir / "train"
    if _manifest(tokens_dir, "tokens_dir").get("kind") == "tokenized_dataset" and (train / "manifest.json").exists():
        shards = _open_token_shards(train)
        return shards.read_rows(range(min(n, shards.num_rows)))["input_ids"], "train split"
    return tokens.read_rows(range(min(n, tokens.num_rows)))["input_ids"], "evaluated split (no train split given)"


def _dynamic_pruning(model, cfg: EvaluateConfig, tokens_dir: Path, tokens, device):
    """MC-MoE online dynamic pruning (ODP) switched on for the evaluation: returns (handle, info),
    or (None, None) when neither field is set (the model runs unchanged)."""
    if cfg.dynamic_pruning is None and cfg.dynamic_pruning_target is None:
        return None, None
    from .mcmoe.odp import apply_dynamic_pruning, calibrate_betas

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


def run_lm_eval_tasks(model_dir: str | Path, cfg: EvaluateConfig, device: torch.device) -> dict:
    """Each task's metrics, or {"status": "unavailable"|"error", "message": ...}: never raises."""
    if not cfg.lm_eval_tasks:
        return {}
    try:
        import lm_eval
    except ImportError as err:
        msg = f"lm_eval is not installed ({err}); install it with {LM_EVAL_INSTALL_HINT} to run lm-eval-harness tasks"
        return {t: {"status": "unavailable", "message": msg} for t in cfg.lm_eval_tasks}
    results = {}
    dtype = cfg.load_dtype if cfg.load_dtype != "auto" else ("bfloat16" if device.type == "cuda" else "float32")
    model_args = {"pretrained": str(model_dir), "trust_remote_code": cfg.trust_remote_code, "dtype": dtype}
    for task in cfg.lm_eval_tasks:
        try:
            out = lm_eval.simple_evaluate(
                model="hf", model_args=model_args, tasks=[task], batch_size=cfg.lm_eval_batch_size,
                limit=cfg.lm_eval_limit, num_fewshot=cfg.lm_eval_num_fewshot, device=str(device),
            )
            res = (out or {}).get("results", {})
            results[task] = {"status": "ok", "metrics": res.get(task, res)}
        except Exception as err:  # noqa: BLE001 — one task's failure (missing data, unknown name) is reported, not fatal
            results[task] = {"status": "error",
                             "message": f"lm-eval task {task!r} could not be run: {type(err).__name__}: {err}"}
    return results


# ---------------------------------------------------------------------------------------------


def run_evaluate(cfg: EvaluateConfig, model_dir: str | Path, tokens_dir: str | Path, logits_dir: str | Path | None,
                 out_dir: str | Path) -> dict:
    """Evaluate `model_dir` on the validation split of `tokens_dir` (and against the teacher cache in
    `logits_dir`, if given); write `out_dir/report.json`. Returns the headline metrics."""
    from .checkpoint import load_config, load_model
    from .fingerprint import TOKENIZER_FILES, tokenizer_fingerprint
    from .params import count_parameters

    out_dir, model_dir = Path(out_dir), Path(model_dir)
    # Every input is checked before the model is loaded.
    ensure_free_output(out_dir)
    load_config(model_dir, cfg.trust_remote_code)
    device = resolve_device(cfg.device)
    tokens_path = resolve_token_split(tokens_dir)
    tokens = _open_token_shards(tokens_path)
    data_tok_fp = tokens.manifest.get("tokenizer_fingerprint")
    model_tok_fp = tokenizer_fingerprint(model_dir) if any((model_dir / f).exists() for f in TOKENIZER_FILES) else None
    if cfg.check_tokenizer and model_tok_fp and data_tok_fp and model_tok_fp != data_tok_fp:
        raise ValueError(
            f"the model's tokenizer ({model_tok_fp}) is not the one tokens_dir was made with ({data_tok_fp}); "
            "tokenize the data with this model's tokenizer, or set check_tokenizer=False if they are equivalent"
        )
    cache, cache_note, cache_path = None, None, None
    if logits_dir is not None:
        cache_path, cache_note = resolve_cache_split(logits_dir)
        if cache_path is not None:
            cache = _open_logit_cache(cache_path, data_tok_fp)
            if cache.num_rows > tokens.num_rows:
                raise ValueError(f"the logit cache holds {cache.num_rows} rows, the token split only {tokens.num_rows}; "
                                 "pass the teacher-logits output made from this tokens_dir")
            if cache.seq_len != tokens.seq_len:
                raise ValueError(f"the logit cache has seq_len {cache.seq_len} but the token split {tokens.seq_len}; "
                                 "pass the teacher-logits output made from this tokens_dir")

    memory = PeakMemory(device)
    memory.start()
    t0 = time.perf_counter()
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}.get(
        cfg.load_dtype, torch.bfloat16 if device.type == "cuda" else torch.float32)
    from .mcmoe.packed import is_quantized_checkpoint, load_quantized

    if is_quantized_checkpoint(model_dir):  # a `slimmoe quantize` output: rebuilt with its packed experts
        model = load_quantized(model_dir, dtype=dtype, device=device, trust_remote_code=cfg.trust_remote_code).eval()
    else:
        model = load_model(model_dir, dtype=dtype, device=device, trust_remote_code=cfg.trust_remote_code,
                           experts_implementation=cfg.experts_implementation).eval()
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
