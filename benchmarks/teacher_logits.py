"""Teacher-logit caching: node throughput vs bare teacher forwards, before and after the overlap.

    python benchmarks/teacher_logits.py [--rows 1600] [--threads 1] [--variants committed,overlap]
                                        [--before-rev REV] [--hidden 256] [--compare-experts]

In one process and on the same >= 200k tokens it measures
  (a) a bare loop of teacher forward passes that discards the output, before the first node run
      and after each full one (the machine may be shared: each node run is compared with the mean
      of the two bare loops around it; the 1-minute load average is in the JSON),
  (b) where an actor's time goes per batch: forward, top-k + rest, encoding + Arrow columns, and
      the write stage's Parquet file per batch,
  (c) the teacher_logits node end to end (Ray Data, one CPU actor, top-k + rest, Parquet, manifest)
      in each of `--variants`:
        committed  the node as committed at `--before-rev` (default b26b149, the last one with the
                   top-k and encoding in series with the forwards), loaded from git: the "before"
        serial     the current node with pipeline_depth 1 (its stages in series; its CPU default
                   when cpus_per_actor == torch_threads, as here)
        overlap    the current node with cpus_per_actor = torch_threads + 1, where its default
                   pipeline_depth is 2 (the finish of a batch runs on that CPU while the next
                   batch's forward runs; also its GPU default)
then prints JSON: for each variant the end-to-end tokens/s (a whole node run, fixed cost included)
and the marginal tokens/s (the difference of a full and a one-batch run, so the fixed cost
cancels), each as a ratio to the bare forward (goal: >= 0.9 on CPU with one actor); bytes per
token on disk versus full float16 logits, and the mean KL(full teacher || top-k + rest), the rest
spread uniformly over the other ids (what the cache cannot tell a student).

A small warm-up node run comes first (its time is the cold Ray session's cost), so that every
timed run finds Ray started. The teacher is a random PhiMoE big enough that its forward dominates
(hidden 256, 4 layers, 8 experts, vocabulary 32000); token ids are random.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
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


def load_committed_node(rev: str, tmp: Path):
    """The teacher_logits node module as committed at `rev`, importable by the Ray workers (pickled
    by value), or None when git cannot give it."""
    import importlib.util
    import subprocess

    import ray.cloudpickle

    root = Path(__file__).resolve().parents[1]
    try:
        source = subprocess.run(["git", "show", f"{rev}:tasks/nodes/teacher_logits.py"], cwd=root, check=True,
                                capture_output=True, text=True).stdout
        commit = subprocess.run(["git", "rev-parse", rev], cwd=root, check=True, capture_output=True,
                                text=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None, None
    path = tmp / "committed_teacher_logits.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("committed_teacher_logits", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    ray.cloudpickle.register_pickle_by_value(module)
    return module, commit


def stage_profile(teacher_dir: Path, rows: np.ndarray, args, n_batches: int = 6) -> dict:
    """Milliseconds per batch of each stage of one actor, run in this process one after the other."""
    import pyarrow as pa

    from slimmoe.tasks.nodes import teacher_logits as node

    torch.set_num_threads(args.threads)
    actor = node._TeacherActor(str(teacher_dir), k=args.k, dtype="float32", device="cpu", gpus=0,
                               experts_implementation=args.experts_implementation, trust_remote_code=False,
                               torch_threads=args.threads, vocab_size=args.vocab, split_of_path={node._norm("x"): 0})
    b = args.batch_size
    n_batches = max(1, min(n_batches, len(rows) // b - 1))
    times = {"forward": 0.0, "topk_and_rest": 0.0, "encode_and_columns": 0.0}
    tables = []
    for i in range(n_batches + 1):  # the first batch warms up
        chunk = rows[i * b:(i + 1) * b]
        batch = pa.table({"row_id": pa.array(np.arange(i * b, i * b + len(chunk)), pa.int64()),
                          "input_ids": pa.array(chunk.astype(np.int32).tolist(), pa.list_(pa.int32())),
                          "path": pa.array(["x"] * len(chunk))})
        t0 = time.perf_counter()
        logits = actor.forward(batch)
        t1 = time.perf_counter()
        with torch.inference_mode():
            ids, logprobs, rest = actor._topk_by_rows(logits)
            staged = (ids.to(torch.int32), logprobs.to(torch.float16), rest)
        t2 = time.perf_counter()
        out = actor.finish(batch, staged)  # given the top-k (as on a GPU): the encoding, checks and columns
        t3 = time.perf_counter()
        if i:
            times["forward"] += t1 - t0
            times["topk_and_rest"] += t2 - t1
            times["encode_and_columns"] += t3 - t2
            tables.append(out)
    with tempfile.TemporaryDirectory() as out_dir:
        (Path(out_dir) / "train").mkdir()
        t0 = time.perf_counter()
        node.write_row_runs(pa.concat_tables(tables), out_dir, ["train"], "zstd")
        times["write_parquet"] = (time.perf_counter() - t0)
    ms = {k: round(1000 * v / n_batches, 1) for k, v in times.items()}
    ms["finish_share_of_forward"] = round((ms["topk_and_rest"] + ms["encode_and_columns"] + ms["write_parquet"])
                                          / ms["forward"], 3)
    return ms


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=1600, help="train sequences (validation gets rows/12)")
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
    ap.add_argument("--variants", default="committed,serial,overlap", help="comma-separated: committed, serial, overlap")
    # b26b149: the last commit whose actor ran the top-k and encoding in series with the forwards.
    ap.add_argument("--before-rev", default="b26b149", help="the git revision whose node is the 'committed' variant")
    ap.add_argument("--compare-experts", action="store_true", help="also time a bare forward with the other CPU kernel")
    args = ap.parse_args()
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = set(variants) - {"committed", "serial", "overlap"}
    if unknown:
        ap.error(f"unknown variant(s) {sorted(unknown)}; choose from committed, serial, overlap")

    import ray

    from slimmoe.tasks.data.config import TeacherLogitsConfig
    from slimmoe.tasks.data.shards import write_tokenized_dataset
    from slimmoe.tasks.nodes.teacher_logits import run_teacher_logits

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
        runs = {}
        if "committed" in variants:
            committed, commit = load_committed_node(args.before_rev, tmp)
            if committed is None:
                raise SystemExit(f"git cannot show tasks/nodes/teacher_logits.py at {args.before_rev}; "
                                 "leave 'committed' out of --variants")
            runs["committed"] = (committed.run_teacher_logits, {})
        if "serial" in variants:
            runs["serial"] = (run_teacher_logits, {"pipeline_depth": 1})
        if "overlap" in variants:
            # One CPU more for the actor, which its default then gives to the finish (depth 2).
            runs["overlap"] = (run_teacher_logits, {"cpus_per_actor": args.threads + 1})

        load = {"start": round(os.getloadavg()[0], 2)}
        profile = stage_profile(teacher, all_rows, args)
        bares = [bare_forward(teacher, all_rows, args.batch_size, args.experts_implementation, args.threads)]
        other = None
        if args.compare_experts:
            alt = "eager" if args.experts_implementation != "eager" else "grouped_mm"
            other = {alt: bare_forward(teacher, all_rows[: 4 * args.batch_size], args.batch_size, alt, args.threads)["tokens_per_s"],
                     args.experts_implementation: bare_forward(teacher, all_rows[: 4 * args.batch_size], args.batch_size,
                                                               args.experts_implementation, args.threads)["tokens_per_s"]}

        # One actor with the bare loop's threads (and, for `overlap`, one CPU for its finish), and one
        # more logical CPU for the read/write tasks.
        ray.init(num_cpus=args.threads + 2, include_dashboard=False, log_to_driver=False, configure_logging=False)
        base = dict(k=args.k, batch_size=args.batch_size, actor_pool_size=1, cpus_per_actor=args.threads,
                    torch_threads=args.threads, experts_implementation=args.experts_implementation,
                    rows_per_file=1024, device="cpu")
        t0 = time.perf_counter()
        run_teacher_logits(TeacherLogitsConfig(**base), teacher, tmp / "tokens_small", tmp / "logits_warmup")
        cold_s = time.perf_counter() - t0
        # The machine may be shared and its load drift: each full run sits between two bare loops,
        # and is compared with their mean.
        timings, node_metrics, around, depths = {}, None, {}, {}
        for name, (run, extra) in runs.items():
            t0 = time.perf_counter()
            metrics = run(TeacherLogitsConfig(**{**base, **extra}), teacher, tmp / "tokens", tmp / f"logits_{name}")
            timings[(name, "full")] = time.perf_counter() - t0
            depths[name] = metrics.get("pipeline_depth", 1)  # the committed node ran in series
            if node_metrics is None:
                node_metrics, cache_dir = metrics, tmp / f"logits_{name}"
            bares.append(bare_forward(teacher, all_rows, args.batch_size, args.experts_implementation, args.threads))
            around[name] = (bares[-2]["tokens_per_s"] + bares[-1]["tokens_per_s"]) / 2
        for name, (run, extra) in runs.items():
            t0 = time.perf_counter()
            run(TeacherLogitsConfig(**{**base, **extra}), teacher, tmp / "tokens_small", tmp / f"logits_{name}_small")
            timings[(name, "small")] = time.perf_counter() - t0
        ray.shutdown()
        load["end"] = round(os.getloadavg()[0], 2)
        bare_tps = sum(b["tokens_per_s"] for b in bares) / len(bares)
        tokens = all_rows.size
        small_tokens = args.batch_size * args.seq_len
        node = {}
        for name in runs:
            full_s, small_s = timings[(name, "full")], timings[(name, "small")]
            # Fixed cost (Ray worker, imports, model load, scheduling) cancels in the difference of two runs.
            # None when the one-batch run took as long as the full one (far too few --rows).
            marginal = (tokens - small_tokens) / (full_s - small_s) if full_s > small_s else None
            node[name] = {
                "end_to_end_tokens_per_s": round(tokens / full_s, 1),
                "end_to_end_vs_bare": round(tokens / full_s / around[name], 3),
                "marginal_tokens_per_s": marginal and round(marginal, 1),
                "marginal_vs_bare": marginal and round(marginal / around[name], 3),
                "bare_tokens_per_s_around_it": round(around[name], 1),
                "pipeline_depth": depths[name],
                "fixed_cost_s": marginal and round(max(0.0, small_s - small_tokens / marginal), 2),
                "seconds": {"full": round(full_s, 2), "one_batch": round(small_s, 2)},
            }
        if "committed" in runs:
            node["committed"]["revision"] = commit

        quality = topk_kl(teacher, cache_dir / "validation", min(val_rows, 16), args.experts_implementation)
        raw = 8 / args.seq_len + 4 + args.k * (2 + 2) + 4
        result = {
            "device": "cpu", "dtype": "float32", "experts_implementation": args.experts_implementation,
            "torch_threads": args.threads, "machine_cpus": os.cpu_count(), "actor_pool_size": 1,
            "teacher": {"hidden": args.hidden, "layers": args.layers, "experts": args.experts, "vocab": args.vocab,
                        "params": sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(teacher).parameters())},
            "tokens": tokens, "seq_len": args.seq_len, "batch_size": args.batch_size, "k": args.k,
            "load_average_1min": load,
            "bare_forward_tokens_per_s": round(bare_tps, 1),
            "bare_forward_tokens_per_s_each_run": [round(b["tokens_per_s"], 1) for b in bares],
            "bare_seconds": round(tokens / bare_tps, 2),
            "actor_ms_per_batch": profile,
            "node": node,
            "cold_ray_session_one_batch_s": round(cold_s, 2),
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
