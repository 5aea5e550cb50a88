"""Every rank of a stage issues the same collectives in the same order: a fault on one rank ends the
stage on all of them within a minute with one error, and decisions that could differ between ranks
(a non-finite loss, the held-out batches of an early stop) are agreed first. Three fsdp ranks on a
4-expert model: more padding than experts per rank, uneven held-out rows."""

import json
import os
import subprocess
import sys
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

import faults
from slimmoe.tasks.data.readers import open_logit_cache
from slimmoe.tasks.slimming.adaptive import HeldOutKL
from slimmoe.tasks.slimming.losses import per_token_kl
from stage_helpers import SEQ, stage_cfg

TESTS = Path(__file__).resolve().parent


def test_a_fault_on_one_rank_ends_the_fsdp_stage_on_every_rank_with_one_error(pipeline, tmp_path):
    env = {**os.environ, "PYTHONPATH": f"{TESTS / 'fault_site'}{os.pathsep}{TESTS}",
           faults.FAULT_FILE: str(tmp_path / "fault.json")}
    env.pop("RAY_ADDRESS", None)
    paths = {k: str(v) for k, v in pipeline.items()}
    out = tmp_path / "results.json"
    proc = subprocess.run([sys.executable, faults.__file__, json.dumps(paths), str(out)], env=env, timeout=900,
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-4000:]
    results = json.loads(out.read_text())

    nonfinite = results["nonfinite"]
    assert nonfinite["fired"] == "nonfinite on rank 1 at step 3", nonfinite
    assert nonfinite["error"] == "FloatingPointError", nonfinite
    assert "stage_nonfinite: the distillation loss became NaN or inf at step 3 on rank 1 of 3" in nonfinite["message"]
    assert nonfinite["seconds_after_fault"] < 60, nonfinite

    surgery = results["surgery"]
    assert surgery["error"] == "StageFailedError", surgery
    assert surgery["message"].startswith("stage_surgery: rank 0 of 3 failed at step 0 (cutting the student): "
                                         "OSError: No space left on device"), surgery
    assert surgery["seconds_after_fault"] < 60, surgery

    save = results["final_save"]
    assert save["error"] == "StageFailedError", save
    assert save["message"].startswith("stage_final_save: rank 0 of 3 failed at step 12 (saving the final model): "
                                      "OSError"), save
    assert save["seconds_after_fault"] < 60, save
    assert not save["output_written"]  # nothing taken for complete

    resumed = results["resume"]
    assert "error" not in resumed, resumed
    assert resumed["headline"]["resumed_from_step"] == 8 and resumed["headline"]["steps"] == 12, resumed
    assert resumed["output_written"]


def test_early_stop_under_fsdp_with_held_out_rows_that_do_not_divide_by_three_ranks(pipeline, tmp_path):
    from slimmoe.tasks.nodes.stage import run_stage

    step_tokens = 8 * SEQ * 3
    cfg = stage_cfg(strategy="fsdp", num_workers=3, token_budget=12 * step_tokens, checkpoint_interval=100,
                    early_stop_min_improvement=0.5, early_stop_window_tokens=4 * step_tokens, early_stop_rows=7,
                    max_failures=0)
    run_stage(cfg, pipeline["teacher"], pipeline["logits"], tmp_path / "out", tmp_path / "work",
              teacher_fingerprint=pipeline["fp"], name="early")
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    checks = metrics["early_stop"]["checks"]
    assert [c["step"] for c in checks][:2] == [0, 4] and all(c["heldout_kl"] > 0 for c in checks), checks
    assert (tmp_path / "out" / "config.json").exists()


def test_every_rank_gets_the_same_held_out_batches_and_the_rows_count_once(pipeline):
    cache = open_logit_cache(pipeline["logits"] / "validation")
    rows, world, batch = 7, 3, 2
    parts = [HeldOutKL(cache, rows, r, world, batch) for r in range(world)]
    shapes = [[tuple(b["input_ids"].shape) for b, _ in p.batches] for p in parts]
    assert shapes[0] == shapes[1] == shapes[2] == [(2, SEQ), (1, SEQ)], shapes
    weights = torch.cat([w for p in parts for _, w in p.batches])
    assert float(weights.sum()) == rows

    # The weighted sums of the three ranks make the mean over the 7 rows that one rank alone measures.
    model = AutoModelForCausalLM.from_pretrained(pipeline["teacher"]).eval()
    whole = HeldOutKL(cache, rows, 0, 1, 8)(model, torch.device("cpu"))
    totals = torch.zeros(2, dtype=torch.float64)
    with torch.no_grad():
        for p in parts:
            for b, w in p.batches:
                kl = per_token_kl(model(input_ids=b["input_ids"]).logits, b["topk_ids"], b["topk_logprobs"],
                                  b["rest_logprob"]).double()
                totals += torch.stack([(kl.sum(-1) * w).sum(), w.sum() * kl.shape[-1]])
    assert abs(float(totals[0] / totals[1]) - whole) < 1e-6
