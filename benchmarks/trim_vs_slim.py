"""Expert slimming vs expert trimming at the same total parameter count, on one teacher and one data set.

Every method removes (about) the same share of the teacher's routed-expert parameters
(`--expert-fraction`, default one half):

- slim: every expert keeps its routing and loses intermediate neurons (first-order Taylor scores);
- expert-drop (frequency / reconstruction scores): whole experts per layer;
- layer-drop: whole MoE blocks (refused, with the reason, for families whose config cannot say so);
- block-drop: whole decoder layers (the count whose total is nearest the target).

Each result is evaluated on the validation split: perplexity and the full-vocabulary
KL(teacher || student) per token, against the live teacher. With distillation (default when a
logit cache is given or can be made), every compressed model gets the same token budget through
`slimmoe.tasks.nodes.stage.run_stage`; slimming runs as one SlimMoE stage (score, slim, distill).

    python benchmarks/trim_vs_slim.py --teacher TEACHER_DIR --data TOKENIZED_DIR [--logits TEACHER_LOGITS_DIR]
    python benchmarks/trim_vs_slim.py --no-distill            # builds a small teacher and data itself

Prints JSON (and writes it with --json-out), then a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

from slimmoe.tasks.core.adapters import UnsupportedOperationError, get_adapter
from slimmoe.tasks.core.checkpoint import load_config, load_model
from slimmoe.tasks.core.params import count_parameters, count_parameters_from_config, format_count
from slimmoe.tasks.data.sources import detect_source, read_token_rows
from slimmoe.tasks.nodes.trim import REPORT_NAME, check_token_data, run_trim
from slimmoe.tasks.trimming.config import TrimConfig
from slimmoe.tasks.trimming.surgery import block_dropped_config, moe_layer_indices

from demo_inputs import build_data, build_teacher  # benchmarks/, the script's own folder


# -- matching the parameter budget ----------------------------------------------------------------------

def plan(teacher_dir: Path, fraction: float) -> dict:
    """Per method, the setting whose total parameter count is nearest the target
    (teacher total - fraction x routed-expert parameters)."""
    import copy

    config = load_config(teacher_dir)
    adapter = get_adapter(config)
    base = count_parameters_from_config(config)
    target = base["total"] - fraction * base["routed_experts"]
    E, k, inter = adapter.num_experts(config), adapter.top_k(config), adapter.expert_size(config)

    def total_with(**changes):
        c = copy.deepcopy(config)
        for key, v in changes.items():
            setattr(c, key, v)
        return count_parameters_from_config(c)["total"]

    def nearest(options):  # options: [(setting, total)]
        return min(options, key=lambda o: (abs(o[1] - target), o[0]))

    out = {"teacher_total": base["total"], "target_total": int(target), "routed_experts": base["routed_experts"]}
    out["slim"] = nearest([(s, total_with(**{adapter.expert_size_key: s})) for s in range(1, inter)])[0]
    out["expert-drop"] = nearest([(n, total_with(**{adapter.num_experts_key: E - n})) for n in range(1, E - k + 1)])[0]
    L = config.num_hidden_layers
    out["block-drop"] = nearest([(n, count_parameters_from_config(block_dropped_config(config, list(range(n))))["total"])
                                 for n in range(1, L)])[0]
    n_moe = len(moe_layer_indices(config))
    # A dropped MoE block removes its share of the routed experts (plus any shared expert).
    per_block = base["routed_experts"] / max(n_moe, 1)
    out["layer-drop"] = max(1, min(n_moe, round(fraction * base["routed_experts"] / per_block)))
    return out


# -- evaluation ---------------------------------------------------------------------------------------

class Evaluator:
    """Validation perplexity and full-vocabulary KL(teacher || student), teacher log-probs computed once."""

    def __init__(self, teacher_dir: Path, data_dir: Path, rows: int, batch_size: int):
        source = detect_source(Path(data_dir) / "validation")
        ids = torch.tensor(read_token_rows(source, limit=rows)[:rows], dtype=torch.long)
        if ids.numel() == 0:
            raise ValueError(f"{data_dir}/validation holds no rows")
        self.batches = list(ids.split(batch_size))
        teacher = load_model(teacher_dir).eval()
        with torch.no_grad():
            self.teacher_logp = [torch.log_softmax(teacher(input_ids=b).logits.float(), -1) for b in self.batches]
        self.teacher = self.evaluate_model(teacher)

    @torch.no_grad()
    def evaluate_model(self, model) -> dict:
        model.eval()
        nll = kl = 0.0
        n_nll = n_kl = 0
        for b, t_logp in zip(self.batches, getattr(self, "teacher_logp", [None] * len(self.batches))):
            logp = torch.log_softmax(model(input_ids=b).logits.float(), -1)
            nll += float(-logp[:, :-1].gather(-1, b[:, 1:, None]).sum())
            n_nll += b[:, 1:].numel()
            if t_logp is not None:
                kl += float((t_logp.exp() * (t_logp - logp)).sum())
                n_kl += b.numel()
        p = count_parameters(model)
        return {"total_params": p["total"], "active_params": p["active"], "perplexity": math.exp(nll / n_nll),
                "kl_to_teacher": kl / n_kl if n_kl else 0.0}

    def __call__(self, model_dir: Path) -> dict:
        return self.evaluate_model(load_model(model_dir))


# -- distillation (the same budget for every method) ------------------------------------------------------

def distill(model_dir: Path, logits_dir: Path, out_dir: Path, work_dir: Path, token_budget: int,
            teacher_fingerprint: str | None = None, expert_intermediate_size: int | None = None, **stage) -> dict:
    """Distill `model_dir` on the teacher's cached logits with `slimmoe.tasks.nodes.stage.run_stage`.

    With `expert_intermediate_size` the stage first slims to it (a SlimMoE stage); without, it keeps
    every size and only distills (what a trimmed model needs)."""
    from slimmoe.tasks.slimming.config import StageConfig
    from slimmoe.tasks.nodes.stage import run_stage

    cut = {"expert_intermediate_size": expert_intermediate_size} if expert_intermediate_size else {"distill_only": True}
    cfg = StageConfig(token_budget=token_budget, **cut, **stage)
    return run_stage(cfg, model_dir, logits_dir, out_dir, work_dir, teacher_fingerprint=teacher_fingerprint,
                     name=out_dir.name)


def make_logits(teacher_dir: Path, data_dir: Path, out_dir: Path, log) -> Path:
    try:
        from slimmoe.tasks.data.config import TeacherLogitsConfig
        from slimmoe.tasks.nodes.teacher_logits import run_teacher_logits
    except ImportError as err:
        raise RuntimeError(f"no --logits given and slimmoe.tasks.nodes.teacher_logits is not available ({err}); "
                           "pass --logits DIR (a teacher_logits output) or --no-distill") from err
    log(f"caching teacher logits in {out_dir}")
    out_dir.mkdir(parents=True)
    run_teacher_logits(TeacherLogitsConfig(), teacher_dir, data_dir, out_dir)
    return out_dir


# -- the comparison -----------------------------------------------------------------------------------

def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--teacher", type=Path, help="teacher model dir (default: build a small one)")
    ap.add_argument("--data", type=Path, help="tokenized dataset dir with train/ and validation/ (default: stdlib source)")
    ap.add_argument("--logits", type=Path, help="teacher_logits output (train/ cache) for distillation")
    ap.add_argument("--work", type=Path, help="scratch dir for the checkpoints (default: a new temp dir)")
    ap.add_argument("--expert-fraction", type=float, default=0.5, help="share of routed-expert parameters to remove")
    ap.add_argument("--calibration-batches", type=int, default=8)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--eval-rows", type=int, default=64)
    ap.add_argument("--no-distill", action="store_true", help="compare the one-shot results only")
    ap.add_argument("--distill-tokens", type=int, default=65536, help="distillation budget per method")
    ap.add_argument("--distill-lr", type=float, default=1e-3)
    ap.add_argument("--teacher-steps", type=int, default=300, help="training steps when building the teacher here")
    ap.add_argument("--max-train-rows", type=int, default=1024, help="train rows kept when building the data here")
    ap.add_argument("--json-out", type=Path)
    args = ap.parse_args(argv)
    log = lambda m: print(m, file=sys.stderr, flush=True)  # noqa: E731 — stdout is the JSON and the table
    t_start = time.time()

    work = args.work or Path(tempfile.mkdtemp(prefix="trim_vs_slim-"))
    work.mkdir(parents=True, exist_ok=True)
    teacher = args.teacher or build_teacher(work / "teacher", args.teacher_steps, log)
    data = args.data or build_data(teacher, work / "data", args.seq_len, log, max_train_rows=args.max_train_rows)
    check_token_data(detect_source(data), teacher)  # before any arm runs
    budget = plan(teacher, args.expert_fraction)
    log(f"plan: {budget}")
    evaluate = Evaluator(teacher, data, args.eval_rows, batch_size=8)
    rows = [{"method": "teacher", "setting": "", "distilled": False, **evaluate.teacher}]

    calib = dict(calibration_batches=args.calibration_batches, batch_size=args.batch_size, seq_len=args.seq_len)
    arms = [
        ("slim", f"expert size {budget['slim']}", None),
        ("expert-drop (frequency)", f"n={budget['expert-drop']} experts/layer",
         TrimConfig(method="expert-drop", n=budget["expert-drop"], expert_score="frequency", **calib)),
        ("expert-drop (reconstruction)", f"n={budget['expert-drop']} experts/layer",
         TrimConfig(method="expert-drop", n=budget["expert-drop"], expert_score="reconstruction", **calib)),
        ("layer-drop", f"n={budget['layer-drop']} MoE blocks",
         TrimConfig(method="layer-drop", n=budget["layer-drop"], **calib)),
        ("block-drop", f"n={budget['block-drop']} layers", TrimConfig(method="block-drop", n=budget["block-drop"], **calib)),
    ]
    one_shot: dict[str, Path] = {}
    for name, setting, cfg in arms:
        out = work / "one_shot" / name.replace(" ", "_").replace("(", "").replace(")", "")
        t0 = time.time()
        row = {"method": name, "setting": setting, "distilled": False}
        try:
            if cfg is None:
                from slimmoe.tasks.nodes.slim import run_slim
                from slimmoe.tasks.slimming.config import SlimConfig

                run_slim(SlimConfig(expert_intermediate_size=budget["slim"], data=str(data),
                                    calibration_batches=args.calibration_batches, batch_size=args.batch_size,
                                    seq_len=args.seq_len), teacher, out, log=log)
            else:
                run_trim(cfg, teacher, data, out, log=log)
            row.update(evaluate(out))
            one_shot[name] = out
        except UnsupportedOperationError as err:  # a refusal (layer drop on PhiMoE) is a result, not a crash
            row["refused"] = str(err)
            if cfg is not None and not out.exists():  # still report the ranking the method would have used
                run_trim(cfg.with_changes(scores_only=True), teacher, data, out, log=log)
                report = json.loads((out / REPORT_NAME).read_text())
                row["ranking"] = {"would_remove": report["removed"],
                                  "moe_block_change": report["scores"]["moe_block_change"],
                                  "layer_cosine": report["scores"]["layer_cosine"]}
        row["seconds"] = round(time.time() - t0, 1)
        rows.append(row)
        log(f"{name}: {row}")

    distill_note = "not requested (--no-distill)"
    if not args.no_distill:
        try:
            from slimmoe.tasks.core.fingerprint import model_fingerprint

            logits = args.logits or make_logits(teacher, data, work / "logits", log)
            teacher_fp = model_fingerprint(teacher)
            distill_note = f"{args.distill_tokens} tokens per method via run_stage, lr {args.distill_lr}"
            for name, setting, cfg in arms:
                t0 = time.time()
                out = work / "distilled" / name.replace(" ", "_").replace("(", "").replace(")", "")
                wd = work / "distill_work" / out.name
                row = {"method": name, "setting": setting, "distilled": True}
                try:
                    if cfg is None:  # one SlimMoE stage: score, slim, distill
                        distill(teacher, logits, out, wd, args.distill_tokens, teacher_fp,
                                expert_intermediate_size=budget["slim"], lr=args.distill_lr,
                                calibration_batches=args.calibration_batches)
                    elif name in one_shot:
                        distill(one_shot[name], logits, out, wd, args.distill_tokens, teacher_fp, lr=args.distill_lr)
                    else:
                        row["refused"] = next(r["refused"] for r in rows if r["method"] == name and "refused" in r)
                        rows.append(row)
                        continue
                    row.update(evaluate(out))
                except Exception as err:  # noqa: BLE001 — report the arm's failure and go on with the others
                    row["failed"] = f"{type(err).__name__}: {err}"
                    log(traceback.format_exc())
                row["seconds"] = round(time.time() - t0, 1)
                rows.append(row)
                log(f"{name} + distill: {row}")
        except Exception as err:  # noqa: BLE001
            distill_note = f"not run: {type(err).__name__}: {err}"
            log(distill_note)

    result = {"benchmark": "trim_vs_slim", "teacher": str(teacher), "data": str(data), "work": str(work),
              "plan": budget, "expert_fraction": args.expert_fraction, "distillation": distill_note,
              "calibration": calib, "eval_rows": args.eval_rows,
              "kl": "full-vocabulary KL(teacher || student) per token on the validation rows, live teacher",
              "torch_threads": torch.get_num_threads(), "wall_seconds": round(time.time() - t_start, 1), "rows": rows}
    print(json.dumps(result, indent=2))
    print()
    print(markdown(rows))
    if args.json_out:
        args.json_out.write_text(json.dumps(result, indent=2) + "\n")
    return result


def markdown(rows: list[dict]) -> str:
    lines = ["| method | setting | distilled | total params | active params | val ppl | KL to teacher |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        if "perplexity" in r:
            cells = [format_count(r["total_params"]), format_count(r["active_params"]), f"{r['perplexity']:.2f}",
                     f"{r['kl_to_teacher']:.4f}"]
        else:
            why = r.get("refused") or r.get("failed", "")
            cells = ["—", "—", "refused" if "refused" in r else "failed", why.split(";")[0][:90]]
        lines.append(f"| {r['method']} | {r['setting']} | {'yes' if r['distilled'] else 'no'} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
