"""benchmarks/gpu_check.py --smoke: every phase of the GPU check runs on CPU and its numbers make sense,
so the first run on a GPU fails only on what is GPU-specific."""

import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.py"


def test_gpu_check_smoke_runs_every_phase_and_its_numbers_hold(tmp_path):
    out = tmp_path / "lines.jsonl"
    proc = subprocess.run([sys.executable, str(SCRIPT), "--smoke", "--out", str(out)], capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    # stdout holds the JSON lines and nothing else (library output goes to stderr), the same as --out.
    lines = [json.loads(line) for line in proc.stdout.splitlines()]
    assert lines == [json.loads(line) for line in out.read_text().splitlines()]
    assert not [line for line in lines if "error" in line]

    def one(phase: str, name: str) -> dict:
        found = [line for line in lines if line["phase"] == phase and line.get("name") == name]
        assert len(found) == 1, (phase, name, found)
        return found[0]

    for phase in ("facts", "moe_layer", "teacher", "fsdp_stage", "engines", "ray"):
        assert one(phase, "done")["ok"], phase
    assert one("ray", "skipped")  # --smoke without --with-ray

    assert one("facts", "process_group")["backend"] == "gloo"
    assert one("facts", "versions")["torch"]

    for family in ("phimoe", "qwen3_moe"):
        same = one("moe_layer", f"{family}/bf16/eager_vs_grouped_mm")
        assert same["same_routing"] and same["output"]["rel_l2_err"] < 1e-2, same
        for kernel in ("eager", "grouped_mm"):
            arm = one("moe_layer", f"{family}/bf16/{kernel}")
            assert arm["rel_l2_err"] < 0.1 and arm["fwd_bwd_ms"] > 0, arm
    assert one("moe_layer", "phimoe/fp32_weights_autocast/grouped_mm")["rel_l2_err"] < 0.1

    agreement = one("teacher", "bf16_vs_float32")
    assert agreement["top1_agreement"] >= 0.9, agreement
    assert agreement["kl_float32_model_vs_float32_cache"]["max"] < 1e-3, agreement
    assert agreement["kl_bf16_model_vs_float32_cache"]["mean"] < 0.05, agreement
    for dtype in ("float32", "bfloat16"):
        assert one("teacher", dtype)["tokens_per_s"] > 0

    sharded = one("fsdp_stage", "sharded_model")
    assert sharded["buffers_ok"] and "model.rotary_emb.inv_freq" in sharded["float_buffers"], sharded
    scores = one("fsdp_stage", "taylor_scores")  # float32 on both sides on CPU: the same scores
    assert scores["max_rel_diff"] < 1e-4 and scores["kept_half_overlap_min"] == 1.0, scores
    train = one("fsdp_stage", "train")
    assert train["steps"] == 30 and train["loss_last"] < 0.8 * train["loss_first"], train
    resume = one("fsdp_stage", "resume")
    assert len(resume["replayed"]) == 5 and resume["max_abs_diff"] <= 1e-5, resume
    final = one("fsdp_stage", "final_save")
    assert final["stored_dtypes"] == ["BF16"] and final["max_abs_diff_to_trained_cast"] == 0.0, final
    assert not final["missing_keys"] and not final["unexpected_keys"] and final["top1_agreement"] >= 0.9, final

    side = one("engines", "losses_side_by_side")
    for engine in ("ddp", "deepspeed"):
        assert len(side[engine]) == 5, side
        # Same weights, batches and seed, float32 on CPU: the first step's loss is the fsdp engine's.
        assert abs(side[engine][0] - side["fsdp"][0]) < 1e-4, side
        assert one("engines", engine)["buffers_float32"]
