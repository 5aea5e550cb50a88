"""Which expert ranking drops the right experts: `StageConfig.expert_score` measured one-shot.

A small trained teacher (the demo recipe scaled down: PhiMoE, 8 experts, top-2, the standard library's
source) is scored once per seed on calibration rows of its own training split: one pass gives the
Taylor neuron scores and the routing statistics (`scores.taylor_scores` inside
`trimming.scores.watching_routing`, what a stage's calibration pass collects). Each ranking
(`scores.expert_importance`: taylor, frequency, reconstruction; random as the floor) then cuts the
teacher to `--keep` experts per layer, alone and combined with half the expert width, through
`surgery.keep_plan` / `slim_model`, and the cut model's full-vocabulary KL(teacher || student) per token
on held-out rows is measured right after the cut, with no distillation.

    python benchmarks/expert_ranking.py [--teacher DIR] [--seeds 3] [--keep 4] [--json-out FILE]

Prints JSON: per ranking and cut, the KL per seed, its mean, and how often it was the best; `best` is the
ranking with the lowest mean KL over both cuts.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

from slimmoe.tasks.core.adapters import get_adapter
from slimmoe.tasks.core.checkpoint import load_model
from slimmoe.tasks.slimming.config import SlimTargets
from slimmoe.tasks.slimming.scores import EXPERT_SCORES, expert_importance, next_token_score_loss, taylor_scores
from slimmoe.tasks.slimming.surgery import slim_model
from slimmoe.tasks.trimming.scores import TrimStats, watching_routing

RANKINGS = (*EXPERT_SCORES, "random")


def build_teacher(out_dir: Path, steps: int, log) -> Path:
    """The demo teacher's recipe at a size two loaded CPU cores train in a minute or two."""
    from slimmoe.tasks.nodes.pretrain_teacher import run_pretrain_teacher
    from slimmoe.tasks.pretraining.config import PretrainTeacherConfig

    cfg = PretrainTeacherConfig(max_steps=steps, max_text_bytes=1_000_000, vocab_size=512, hidden_size=64,
                                num_layers=2, num_experts=8, experts_per_token=2, expert_intermediate_size=64,
                                seq_len=64, batch_size=16, warmup_steps=min(30, steps // 5), eval_every=0,
                                max_eval_rows=32, num_threads=torch.get_num_threads())
    log(f"building a teacher in {out_dir} ({steps} steps)")
    run_pretrain_teacher(cfg, out_dir, log=log)
    return out_dir


def token_rows(teacher_dir: Path, seq_len: int) -> dict[str, torch.Tensor]:
    """The demo corpus packed with the teacher's tokenizer, split as the teacher's training split it."""
    from transformers import AutoTokenizer

    from slimmoe.tasks.pretraining.config import PretrainTeacherConfig
    from slimmoe.tasks.pretraining.corpus import pack_rows, split_corpus

    corpus = split_corpus(PretrainTeacherConfig(max_text_bytes=1_000_000))
    tok = AutoTokenizer.from_pretrained(teacher_dir)
    return {split: pack_rows(tok, corpus[split], seq_len) for split in ("train", "validation")}


class HeldOutKL:
    """Full-vocabulary KL(teacher || model) per token on fixed held-out rows (teacher log-probs once)."""

    def __init__(self, teacher, rows: torch.Tensor, batch_size: int = 16):
        self.batches = list(rows.split(batch_size))
        with torch.no_grad():
            self.teacher = [torch.log_softmax(teacher(input_ids=b).logits.float(), -1) for b in self.batches]

    @torch.no_grad()
    def __call__(self, model) -> float:
        model.eval()
        kl = tokens = 0.0
        for b, t in zip(self.batches, self.teacher):
            s = torch.log_softmax(model(input_ids=b).logits.float(), -1)
            kl += float((t.exp() * (t - s)).sum())
            tokens += b.numel()
        return kl / tokens


def rankings(teacher, batches: list[torch.Tensor], seed: int):
    """One calibration pass: the Taylor scores and every expert ranking."""
    stats = TrimStats()
    with watching_routing(teacher, stats, reconstruction=True):
        scores = taylor_scores(teacher, batches, next_token_score_loss, with_heads=False)
    g = torch.Generator().manual_seed(seed)
    out = {kind: expert_importance(kind, scores, stats) for kind in EXPERT_SCORES}
    out["random"] = {layer: torch.rand(t.shape[0], generator=g) for layer, t in scores.experts.items()}
    return scores, out


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--teacher", type=Path, help="teacher model dir (default: build a small one)")
    ap.add_argument("--teacher-steps", type=int, default=400)
    ap.add_argument("--work", type=Path)
    ap.add_argument("--seeds", type=int, default=3, help="calibration draws (and random rankings)")
    ap.add_argument("--keep", type=int, default=None, help="experts kept per layer (default: half)")
    ap.add_argument("--calibration-batches", type=int, default=8)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--eval-rows", type=int, default=128)
    ap.add_argument("--seq-len", type=int, default=64, help="the teacher's training length when built here")
    ap.add_argument("--json-out", type=Path)
    args = ap.parse_args(argv)
    log = lambda m: print(m, file=sys.stderr, flush=True)  # noqa: E731 — stdout is the JSON
    t_start = time.time()
    work = args.work or Path(tempfile.mkdtemp(prefix="expert_ranking-"))
    teacher_dir = args.teacher or build_teacher(work / "teacher", args.teacher_steps, log)
    teacher = load_model(teacher_dir).eval()
    adapter = get_adapter(teacher)
    n_experts, width = adapter.num_experts(teacher.config), adapter.expert_size(teacher.config)
    keep = args.keep or n_experts // 2
    seq_len = args.seq_len
    rows = token_rows(teacher_dir, seq_len)
    kl = HeldOutKL(teacher, rows["validation"][: args.eval_rows])
    cuts = {"experts": SlimTargets(width, num_experts=keep),
            "experts+width": SlimTargets(width // 2, num_experts=keep)}
    results = {cut: {kind: [] for kind in RANKINGS} for cut in cuts}
    for seed in range(args.seeds):
        g = torch.Generator().manual_seed(seed)
        pick = torch.randperm(len(rows["train"]), generator=g)[: args.calibration_batches * args.batch_size]
        scores, ranked = rankings(teacher, list(rows["train"][pick].split(args.batch_size)), seed)
        for kind, importance in ranked.items():
            scores.expert_importance = importance
            for cut, targets in cuts.items():
                value = kl(slim_model(teacher, scores, targets, strict=False))
                results[cut][kind].append(value)
                log(f"seed {seed} {cut:14s} {kind:15s} KL {value:.4f}")
    summary = {}
    for cut, by_kind in results.items():
        wins = {kind: 0 for kind in RANKINGS}
        for s in range(args.seeds):
            wins[min(RANKINGS, key=lambda k: by_kind[k][s])] += 1
        summary[cut] = {kind: {"kl": [round(v, 5) for v in vals], "mean_kl": round(sum(vals) / len(vals), 5),
                               "best_in_seeds": wins[kind]} for kind, vals in by_kind.items()}
    mean = {kind: sum(summary[c][kind]["mean_kl"] for c in cuts) / len(cuts) for kind in EXPERT_SCORES}
    out = {"teacher": str(teacher_dir), "model_type": adapter.model_type, "num_experts": n_experts,
           "experts_per_token": adapter.top_k(teacher.config), "kept": keep, "expert_width": width,
           "seeds": args.seeds, "calibration_rows": args.calibration_batches * args.batch_size,
           "eval_rows": sum(b.shape[0] for b in kl.batches), "seq_len": seq_len,
           "cuts": {c: {"num_experts": t.num_experts, "expert_intermediate_size": t.expert_intermediate_size}
                    for c, t in cuts.items()},
           "results": summary, "best": min(mean, key=mean.get), "seconds": round(time.time() - t_start, 1)}
    text = json.dumps(out, indent=2)
    print(text)
    if args.json_out:
        args.json_out.write_text(text + "\n")
    return out


if __name__ == "__main__":
    main()
