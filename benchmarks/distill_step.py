"""Distillation step time from the logit cache versus with the teacher computed live each step.

    python benchmarks/distill_step.py [--steps 20] [--k 64] [--batch 8] [--seq 128]

Same student, same sequences, same loss (`distillation_loss`, top-k + exact rest bucket) in one
process. The cached arm reads the teacher's top-k from a real on-disk logit cache (written with the
cache's own encoder, read with `open_logit_cache`); the live arm runs the teacher forward and
`topk_with_rest` every step. Prints JSON: tokens/s of each, their ratio, peak RSS.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from slimmoe.tasks.slimming.losses import distillation_loss, topk_with_rest  # noqa: E402
from slimmoe.tasks.slimming.scores import magnitude_scores  # noqa: E402
from slimmoe.tasks.slimming.config import SlimTargets  # noqa: E402
from slimmoe.tasks.slimming.surgery import slim_model


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _write_cache(teacher, rows: torch.Tensor, k: int, out: Path, batch: int) -> None:
    """A single-split logit cache in the on-disk format, via the cache module's own encoder."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    from slimmoe.tasks.data.formats import LogitCacheManifest, ids_dtype, numpy_to_binary_column

    ids, lps, rests = [], [], []
    with torch.no_grad():
        for i in range(0, len(rows), batch):
            t_ids, t_lp, t_rest = topk_with_rest(teacher(input_ids=rows[i:i + batch]).logits, k)
            ids.append(t_ids)
            lps.append(t_lp)
            rests.append(t_rest)
    n, seq = rows.shape
    vocab = teacher.config.vocab_size
    table = pa.table({
        "row_id": pa.array(np.arange(n, dtype=np.int64)),
        "input_ids": pa.array(rows.to(torch.int32).numpy().tolist(), type=pa.list_(pa.int32())),
        "topk_ids": numpy_to_binary_column(torch.cat(ids).numpy().astype(ids_dtype(vocab)).reshape(n, -1)),
        "topk_logprobs": numpy_to_binary_column(torch.cat(lps).numpy().astype(np.float16).reshape(n, -1)),
        "rest_logprob": numpy_to_binary_column(torch.cat(rests).numpy().astype(np.float32)),
    })
    out.mkdir(parents=True)
    pq.write_table(table, out / "part-0.parquet")
    LogitCacheManifest(k=k, seq_len=seq, vocab_size=vocab, rows=n, tokens=n * seq, teacher_fingerprint=None,
                       tokenizer_fingerprint=None, files=[{"path": "part-0.parquet", "rows": n,
                                                           "bytes": (out / "part-0.parquet").stat().st_size}]).write(out)


def _run(student, batches, opt, teacher=None, k=64):
    student.train()
    start = time.perf_counter()
    for b in batches:
        if teacher is not None:
            with torch.no_grad():
                t_ids, t_lp, t_rest = topk_with_rest(teacher(input_ids=b["input_ids"]).logits, k)
        else:
            t_ids, t_lp, t_rest = b["topk_ids"], b["topk_logprobs"], b["rest_logprob"]
        logits = student(input_ids=b["input_ids"]).logits
        loss, _ = distillation_loss(logits, b["input_ids"], t_ids, t_lp, t_rest, 1.0, 0.5)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--k", type=int, default=64)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--vocab", type=int, default=2048)
    args = ap.parse_args()

    from slimmoe.tasks.data.readers import open_logit_cache
    from tiny import tiny_model

    # The demo teacher's shape (workflows/configs/demo.yaml): hidden 128, 4 layers, 8 experts of 256, 4q/2kv heads.
    teacher = tiny_model("phimoe", vocab_size=args.vocab, hidden_size=128, intermediate_size=256,
                         num_local_experts=8, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2)
    student = slim_model(teacher, magnitude_scores(teacher), SlimTargets(64, num_key_value_heads=1))
    g = torch.Generator().manual_seed(0)
    rows = torch.randint(3, args.vocab, (args.steps * args.batch, args.seq), generator=g)
    with tempfile.TemporaryDirectory() as tmp:
        _write_cache(teacher.eval(), rows, args.k, Path(tmp) / "cache", args.batch)
        cache = open_logit_cache(Path(tmp) / "cache")
        cached_batches = list(cache.iter_batches(args.batch, shuffle=False))
        live_batches = [{"input_ids": b["input_ids"]} for b in cached_batches]
        opt = torch.optim.AdamW(student.parameters(), lr=1e-4)
        _run(student, cached_batches[:2], opt)  # warm-up
        t_cached = _run(student, cached_batches, opt)
        t_live = _run(student, live_batches, opt, teacher=teacher.eval(), k=args.k)
    tokens = len(cached_batches) * args.batch * args.seq
    print(json.dumps({
        "device": "cpu", "threads": torch.get_num_threads(), "steps": len(cached_batches), "batch": args.batch,
        "seq_len": args.seq, "k": args.k, "vocab": args.vocab,
        "cached_tokens_per_s": round(tokens / t_cached, 1), "live_teacher_tokens_per_s": round(tokens / t_live, 1),
        "speedup_cached_over_live": round(t_live / t_cached, 3), "peak_rss_mb": round(_peak_rss_mb(), 1),
        "experts_implementation": getattr(student.config, "_experts_implementation", None),
    }, indent=2))


if __name__ == "__main__":
    main()
