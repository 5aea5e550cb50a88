"""MC-MoE on a teacher (and its compressed students): PMQ mixed precision vs uniform widths, then ODP.

Per model:
  original        the checkpoint itself (float32 here)
  uniform-2bit    every expert at 2 bits (GPTQ, group-wise)
  pmq-2.5bit      PMQ: widths from {1,2,3,4} per expert, 2.5 bits on average per layer (GPTQ)
  uniform-3bit    every expert at 3 bits
  uniform-8bit    every expert at 8 bits (should be near-lossless: KL < 1e-3)
  *-rtn           the same with round-to-nearest instead of GPTQ (quantizer ablation; --no-ablations skips)
  original+odp    ODP with betas calibrated to prune --odp-target of expert calls (default 15%)
  pmq-2.5bit+odp  both stacked
Each is scored on the validation split: perplexity, and the full-vocabulary KL(original || variant)
per token; sizes are the real bytes on disk (the packed checkpoint directory) and the bytes the
loaded model holds in memory (on-the-fly dequantization, float32 compute here). The paper's
pattern to check: PMQ at 2.5 bits close to uniform 3-bit and far better than uniform 2-bit.

    python benchmarks/mcmoe.py --model teacher=TEACHER_DIR --model student=STUDENT_DIR --data TOKENIZED_DIR
    python benchmarks/mcmoe.py                  # builds a small teacher and its data itself (a few minutes)

Prints JSON (and writes it with --json-out), then a Markdown table (also to --markdown-out).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from slimmoe.tasks.data.calibration import calibration_batches
from slimmoe.tasks.core.checkpoint import load_model
from slimmoe.tasks.mcmoe.odp import apply_dynamic_pruning, calibrate_betas
from slimmoe.tasks.mcmoe.packed import load_quantized, module_memory_bytes
from slimmoe.tasks.mcmoe.config import QuantizeConfig
from slimmoe.tasks.nodes.quantize import run_quantize
from slimmoe.tasks.data.sources import detect_source, read_token_rows

from demo_inputs import build_data, build_teacher  # benchmarks/, the script's own folder

def validation_rows(data: Path, limit: int) -> torch.Tensor:
    manifest = json.loads((data / "manifest.json").read_text())
    split = data / "validation" if manifest.get("kind") == "tokenized_dataset" else data
    return torch.tensor(read_token_rows(detect_source(split), limit=limit), dtype=torch.long)


# -- scoring --------------------------------------------------------------------------------------------


@torch.no_grad()
def score(model, reference, rows: torch.Tensor, batch_size: int) -> dict:
    """Perplexity of `model`, and KL(reference || model) per token over the full vocabulary."""
    nll = kl = 0.0
    n = 0
    for i in range(0, rows.shape[0], batch_size):
        ids = rows[i:i + batch_size]
        logp = F.log_softmax(model(input_ids=ids).logits.float(), -1)
        ref = logp if reference is None else F.log_softmax(reference(input_ids=ids).logits.float(), -1)
        nll += float(-logp[:, :-1].gather(-1, ids[:, 1:, None]).sum())
        kl += float((ref.exp() * (ref - logp)).sum())
        n += ids[:, 1:].numel()
    tokens = rows.numel()
    return {"perplexity": math.exp(nll / n), "kl": kl / tokens, "tokens": tokens}


def dir_bytes(path: Path, pattern: str = "*") -> int:
    return sum(p.stat().st_size for p in Path(path).glob(pattern) if p.is_file())


VARIANTS = {  # name: QuantizeConfig overrides
    "uniform-2bit": dict(avg_bits=2, candidate_bits=[2]),
    "pmq-2.5bit": dict(avg_bits=2.5, candidate_bits=[1, 2, 3, 4]),
    "uniform-3bit": dict(avg_bits=3, candidate_bits=[3]),
    "uniform-8bit": dict(avg_bits=8, candidate_bits=[8]),  # the near-lossless check (KL < 1e-3)
}
ABLATIONS = {
    "uniform-2bit-rtn": dict(avg_bits=2, candidate_bits=[2], method="rtn"),
    "pmq-2.5bit-rtn": dict(avg_bits=2.5, candidate_bits=[1, 2, 3, 4], method="rtn"),
}


def run_odp(model, reference, calib, rows, args) -> dict:
    t0 = time.time()
    betas = calibrate_betas(model, calib, args.odp_target, protect_top=args.protect_top)
    handle = apply_dynamic_pruning(model, per_layer_betas=betas, protect_top=args.protect_top)
    try:
        res = score(model, reference, rows, args.batch_size)
        stats = handle.stats()
    finally:
        handle.remove()
    res.update(pruned_share=stats["share"], betas=betas, odp_score=stats["score"],
               protected_tokens=stats["protected_tokens"], seconds=round(time.time() - t0, 1))
    return res


def bench_model(name: str, model_dir: Path, data: Path, work: Path, args, log) -> list[dict]:
    rows = validation_rows(data, args.eval_rows)
    base_cfg = dict(group_size=args.group_size, calibration_batches=args.calibration_batches,
                    batch_size=args.calib_batch_size, seq_len=args.seq_len)
    calib = calibration_batches(data, args.calibration_batches, args.calib_batch_size, args.seq_len,
                                tokenizer_dir=model_dir)
    reference = load_model(model_dir).eval()
    results = []
    t0 = time.time()
    orig = score(reference, None, rows, args.batch_size)
    orig.update(model=name, variant="original", avg_bits=None, disk_bytes=dir_bytes(model_dir, "*.safetensors"),
                memory_bytes=module_memory_bytes(reference), seconds=round(time.time() - t0, 1))
    results.append(orig)
    log(f"[{name}] original: ppl {orig['perplexity']:.2f}")
    variants = dict(VARIANTS, **({} if args.no_ablations else ABLATIONS))
    for variant, overrides in variants.items():
        out = work / f"{name}-{variant}"
        t0 = time.time()
        metrics = run_quantize(QuantizeConfig(**base_cfg, **overrides), model_dir, data, out, log=lambda _m: None)
        qseconds = time.time() - t0
        model = load_quantized(out)
        res = score(model, reference, rows, args.batch_size)
        res.update(model=name, variant=variant, avg_bits=metrics["avg_bits_experts"],
                   expert_bits_per_weight=metrics["expert_bits_per_weight"], bits_histogram=metrics["bits_histogram"],
                   disk_bytes=metrics["disk_bytes"], weights_file_bytes=metrics["weights_file_bytes"],
                   memory_bytes=module_memory_bytes(model),
                   memory_resident_bytes_16bit=metrics["memory_resident_bytes_16bit"],
                   quantize_seconds=round(qseconds, 1))
        results.append(res)
        log(f"[{name}] {variant}: ppl {res['perplexity']:.2f}, KL {res['kl']:.4f}, "
            f"{res['disk_bytes'] / 2**20:.2f} MiB on disk ({qseconds:.0f}s)")
        if variant == "pmq-2.5bit" and args.odp_target > 0:
            odp = run_odp(model, reference, calib, rows, args)
            odp.update(model=name, variant=f"{variant}+odp", avg_bits=res["avg_bits"], disk_bytes=res["disk_bytes"])
            results.append(odp)
            log(f"[{name}] {variant}+odp: ppl {odp['perplexity']:.2f}, KL {odp['kl']:.4f}, pruned {odp['pruned_share']:.3f}")
    if args.odp_target > 0:
        model = load_model(model_dir).eval()
        odp = run_odp(model, reference, calib, rows, args)
        odp.update(model=name, variant="original+odp", avg_bits=None, disk_bytes=orig["disk_bytes"])
        results.append(odp)
        log(f"[{name}] original+odp: ppl {odp['perplexity']:.2f}, KL {odp['kl']:.4f}, pruned {odp['pruned_share']:.3f}")
    return results


def markdown(results: list[dict]) -> str:
    lines = ["| model | variant | expert bits (avg) | bits/weight incl. scales | disk MiB | perplexity | KL to original | pruned calls |",
             "|---|---|---|---|---|---|---|---|"]
    for r in results:
        bits = "16/32" if r["avg_bits"] is None else f"{r['avg_bits']:.2f}"
        bpw = f"{r['expert_bits_per_weight']:.2f}" if "expert_bits_per_weight" in r else ""
        share = f"{r['pruned_share']:.3f}" if "pruned_share" in r else ""
        lines.append(f"| {r['model']} | {r['variant']} | {bits} | {bpw} | {r['disk_bytes'] / 2**20:.2f} | "
                     f"{r['perplexity']:.2f} | {r['kl']:.4f} | {share} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", action="append", default=[], metavar="NAME=DIR",
                    help="a model directory to benchmark (repeatable); none: build a small teacher here")
    ap.add_argument("--data", type=Path, help="tokenized dataset (train for calibration, validation for scoring)")
    ap.add_argument("--teacher-steps", type=int, default=300, help="training steps of the self-built teacher")
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--calibration-batches", type=int, default=16)
    ap.add_argument("--calib-batch-size", type=int, default=8)
    ap.add_argument("--eval-rows", type=int, default=96)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--group-size", type=int, default=128)
    ap.add_argument("--odp-target", type=float, default=0.15, help="share of expert calls ODP prunes (0 = skip)")
    ap.add_argument("--protect-top", type=float, default=0.02)
    ap.add_argument("--no-ablations", action="store_true", help="skip the round-to-nearest variants")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch CPU threads (the models are small: on a shared machine 1 thread is fastest)")
    ap.add_argument("--work-dir", type=Path, help="where checkpoints go (default: a temporary directory)")
    ap.add_argument("--json-out", type=Path)
    ap.add_argument("--markdown-out", type=Path)
    args = ap.parse_args(argv)

    def log(msg):
        print(msg, file=sys.stderr, flush=True)

    torch.set_num_threads(args.threads)
    work = args.work_dir or Path(tempfile.mkdtemp(prefix="slimmoe-mcmoe-"))
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    models = dict(m.split("=", 1) for m in args.model)
    if not models:
        models = {"teacher": build_teacher(work / "teacher", args.teacher_steps, log)}
    if args.data is None:
        first = Path(next(iter(models.values())))
        args.data = build_data(first, work / "data", args.seq_len, log)
    results = []
    for name, path in models.items():
        results += bench_model(name, Path(path), args.data, work, args, log)
    report = {"benchmark": "mcmoe", "device": "cpu", "torch_threads": torch.get_num_threads(),
              "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
              "seconds": round(time.time() - t0, 1), "results": results}
    print(json.dumps(report, indent=2))
    table = markdown(results)
    print(table)
    if args.json_out:
        args.json_out.write_text(json.dumps(report, indent=2))
    if args.markdown_out:
        args.markdown_out.write_text(table + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
