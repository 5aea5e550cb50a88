"""Teacher-logit caching: node throughput vs bare teacher forwards, storage, and what top-k loses.

    python benchmarks/teacher_logits.py [--rows 192] [--threads 1] [--hidden 256] [--compare-experts]

In one process and on the same sequences it measures
  (a) a bare loop of teacher forward passes that discards the output, and
  (b) the teacher_logits node end to end (Ray Data, one CPU actor, top-k + rest, Parquet, manifest),
then prints JSON: tokens/s of each and their ratio (goal: >= 0.9 on CPU with one actor), bytes per
token on disk versus full float16 logits (goal: < 1% at a 32k vocabulary and k=64), and the mean
KL(full teacher || top-k + rest), the rest spread uniformly over the other ids (what the cache
cannot tell a student). The node runs three times: cold (fresh Ray session), warm (same data
again), and on one batch; the warm and one-batch runs give its fixed cost (Ray worker start,
imports, model load, scheduling: ~20 s here) and its marginal tokens/s, which is what the node
reaches on a cache that takes hours to build.

The teacher is a random PhiMoE big enough that its forward dominates (hidden 256, 4 layers,
8 experts, vocabulary 32000); token ids are random, so the KL is that of a random teacher.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import transformers
from transformers import AutoModelForCausalLM


def build_teacher(out: Path, args) -> Path:
    torch.manual_seed(0)
    cfg = transformers.PhimoeConfig(
        vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=2 * args.hidden, num_hidden_layers=args.layers,
        num_attention_heads=4, num_key_value_heads=2, num_local_experts=args.experts, num_experts_per_tok=2,
        max_position_embeddings=max(512, args.seq_len), tie_word_embeddings=False, bos_token_id=1, eos_token_id=2,
        pad_token_id=0,
    )
    model = AutoModelForCausalLM.from_config(cfg)
    with torch.no_grad():  # a less flat output distribution than the default init, so top-k matters
        model.lm_head.weight.mul_(20.0)
    model.save_pretrained(out, safe_serialization=True)
    return out


def bare_forward(teacher_dir: Path, rows: np.ndarray, batch_size: int, impl: str, threads: int) -> dict:
    from slimmoe.tasks.core.checkpoint import load_model

    torch.set_num_threads(threads)
    model = load_model(teacher_dir, experts_implementation=impl).eval()
    x = torch.from_numpy(rows.astype(np.int64))
    with torch.inference_mode():
        model(input_ids=x[:batch_size], use_cache=False)  # warm-up
        t0 = time.perf_counter()
        for i in range(0, len(x), batch_size):
            model(input_ids=x[i : i + batch_size], use_cache=False).logits  # discarded
        dt = time.perf_counter() - t0
    return {"seconds": dt, "tokens_per_s": rows.size / dt}


def topk_kl(teacher_dir: Path, cache_dir: Path, n_rows: int, impl: str) -> dict:
    """Mean over tokens of KL(p || q): p the full teacher distribution, q the cached top-k probabilities
    with the cached rest mass spread uniformly over the other ids."""
    from slimmoe.tasks.core.checkpoint import load_model
    from slimmoe.tasks.data.readers import open_logit_cache

    cache = open_logit_cache(cache_dir)
    rows = cache.read_rows(np.arange(min(n_rows, cache.num_rows)))
    model = load_model(teacher_dir, experts_implementation=impl).eval()
    with torch.inference_mode():
        logp = torch.log_softmax(model(input_ids=rows["input_ids"], use_cache=False).logits.float(), dim=-1)
    V, K = logp.shape[-1], cache.k
    logq = (rows["rest_logprob"] - np.log(V - K)).unsqueeze(-1).expand_as(logp).clone()
    logq.scatter_(-1, rows["topk_ids"], rows["topk_logprobs"])
    logq = logq - torch.logsumexp(logq, -1, keepdim=True)  # float16 rounding leaves q off by ~1e-3
    kl = (logp.exp() * (logp - logq)).sum(-1)
    return {"mean_kl_full_vs_topk_rest": float(kl.mean()), "mean_tail_mass": float(rows["rest_logprob"].exp().mean()),
            "kl_tokens": int(kl.numel())}


def rows_seconds(rows: np.ndarray, tokens_per_s: float) -> float:
    return rows.size / tokens_per_s


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=192, help="train sequences (validation gets rows/12)")
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--k", type=int, default=64)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--experts", type=int, default=8)
    # One thread by default: on a small shared machine multi-threaded timings swing by 2x between runs.
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--experts-implementation", default="grouped_mm", choices=["eager", "grouped_mm", "batched_mm"])
    ap.add_argument("--compare-experts", action="store_true", help="also time a bare forward with the other CPU kernel")
    args = ap.parse_args()

    import ray

    from slimmoe.tasks.data.config import TeacherLogitsConfig
    from slimmoe.tasks.nodes.teacher_logits import run_teacher_logits
    from slimmoe.tasks.data.shards import write_tokenized_dataset

    rng = np.random.default_rng(0)
    val_rows = max(args.batch_size, args.rows // 12)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        teacher = build_teacher(tmp / "teacher", args)
        splits = {"train": rng.integers(3, args.vocab, (args.rows, args.seq_len)),
                  "validation": rng.integers(3, args.vocab, (val_rows, args.seq_len))}
        write_tokenized_dataset(tmp / "tokens", splits, "random-ids", eos_token_id=2, vocab_size=args.vocab)
        small = {name: rows[: args.batch_size] for name, rows in (("train", splits["train"]),)}
        write_tokenized_dataset(tmp / "tokens_small", small, "random-ids", eos_token_id=2, vocab_size=args.vocab)
        all_rows = np.concatenate([splits["train"], splits["validation"]])

        bare = bare_forward(teacher, all_rows, args.batch_size, args.experts_implementation, args.threads)
        other = None
        if args.compare_experts:
            alt = "eager" if args.experts_implementation != "eager" else "grouped_mm"
            other = {alt: bare_forward(teacher, all_rows[: 4 * args.batch_size], args.batch_size, alt, args.threads)["tokens_per_s"],
                     args.experts_implementation: bare_forward(teacher, all_rows[: 4 * args.batch_size], args.batch_size,
                                                               args.experts_implementation, args.threads)["tokens_per_s"]}

        # One actor with the bare loop's threads, and one more logical CPU for the read/write tasks.
        ray.init(num_cpus=args.threads + 1, include_dashboard=False, log_to_driver=False, configure_logging=False)
        cfg = TeacherLogitsConfig(k=args.k, batch_size=args.batch_size, actor_pool_size=1, cpus_per_actor=args.threads,
                                  torch_threads=args.threads, experts_implementation=args.experts_implementation,
                                  rows_per_file=1024, device="cpu")
        timings = {}
        for run, tokens_dir in (("cold", "tokens"), ("warm", "tokens"), ("small", "tokens_small")):
            t0 = time.perf_counter()
            metrics = run_teacher_logits(cfg, teacher, tmp / tokens_dir, tmp / f"logits_{run}")
            timings[run] = time.perf_counter() - t0
            if run == "cold":
                node_metrics = metrics
        ray.shutdown()
        # The machine may be shared: time the bare loop again after the node and use the mean of both.
        bare_after = bare_forward(teacher, all_rows, args.batch_size, args.experts_implementation, args.threads)
        bare_tps = (bare["tokens_per_s"] + bare_after["tokens_per_s"]) / 2
        small_tokens = args.batch_size * args.seq_len
        # Fixed cost (Ray worker, imports, model load, scheduling) cancels in the difference of two runs.
        marginal_tps = (all_rows.size - small_tokens) / max(1e-9, timings["warm"] - timings["small"])
        startup_s = max(0.0, timings["small"] - small_tokens / marginal_tps)

        quality = topk_kl(teacher, tmp / "logits_cold" / "validation", min(val_rows, 16), args.experts_implementation)
        tokens = all_rows.size
        raw = 8 / args.seq_len + 4 + args.k * (2 + 2) + 4
        result = {
            "device": "cpu", "torch_threads": args.threads, "experts_implementation": args.experts_implementation,
            "teacher": {"hidden": args.hidden, "layers": args.layers, "experts": args.experts, "vocab": args.vocab,
                        "params": sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(teacher).parameters())},
            "tokens": tokens, "seq_len": args.seq_len, "batch_size": args.batch_size, "k": args.k,
            "bare_forward_tokens_per_s": round(bare_tps, 1),
            "bare_forward_tokens_per_s_before_after": [round(bare["tokens_per_s"], 1), round(bare_after["tokens_per_s"], 1)],
            "node_end_to_end_tokens_per_s": {"cold_ray_session": round(tokens / timings["cold"], 1),
                                              "warm_ray_session": round(tokens / timings["warm"], 1)},
            "node_vs_bare_end_to_end": {"cold_ray_session": round(tokens / timings["cold"] / bare_tps, 3),
                                        "warm_ray_session": round(tokens / timings["warm"] / bare_tps, 3)},
            "node_fixed_cost_s": round(startup_s, 2),
            "node_marginal_tokens_per_s": round(marginal_tps, 1),
            "node_vs_bare_marginal": round(marginal_tps / bare_tps, 3),
            "node_seconds": {k: round(v, 2) for k, v in timings.items()},
            "bare_seconds": round(rows_seconds(all_rows, bare_tps), 2),
            "bytes_per_token_disk": round(node_metrics["bytes_per_token"], 2),
            "bytes_per_token_raw_encoding": round(raw, 2),
            "full_fp16_logits_bytes_per_token": 2 * args.vocab,
            "disk_vs_full_fp16": round(node_metrics["bytes_per_token"] / (2 * args.vocab), 5),
            **{k: round(v, 5) if isinstance(v, float) else v for k, v in quality.items()},
        }
        if other:
            result["bare_forward_tokens_per_s_by_experts_implementation"] = {k: round(v, 1) for k, v in other.items()}
        print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
