"""Quality, speed and memory of a model on token rows: perplexity, KL to cached teacher logits,
top-1 agreement, forward tokens/s and peak memory. The demo teacher scores its validation split with
the same functions, so every perplexity in a report means the same thing."""

from __future__ import annotations

import math
import re
import resource
import time
from pathlib import Path

import torch

from slimmoe.tasks.evaluation.config import EvaluateConfig
from slimmoe.tasks.slimming.losses import next_token_nll


def forward_logits(model, input_ids: torch.Tensor, autocast_bf16: bool = True) -> torch.Tensor:
    device = input_ids.device
    with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=autocast_bf16 and device.type == "cuda"):
        return model(input_ids=input_ids, use_cache=False).logits.float()


@torch.no_grad()
def sequence_nll(model, input_ids: torch.Tensor, autocast_bf16: bool = True) -> tuple[float, int]:
    """(sum of next-token NLLs, number of predicted tokens) for a batch of rows."""
    nll = next_token_nll(forward_logits(model, input_ids, autocast_bf16), input_ids)
    return float(nll.double().sum()), nll.numel()


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
            from slimmoe.tasks.slimming.losses import per_token_kl

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
