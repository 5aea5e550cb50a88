"""How close `slimmoe plan`'s memory estimates are to what a CPU process really peaks at.

    python benchmarks/plan_accuracy.py [--threads 1]

Each case runs in a fresh subprocess and reports its peak resident set (ru_maxrss):
  baseline  the imports a stage worker / teacher actor has (torch, transformers, slimmoe's loss,
            scoring, surgery and checkpoint modules) and nothing else: the runtime's own RSS, which
            the plan's `overhead` term stands for (the plan is given this measured value);
  stage     a ddp stage with one CPU worker, the memory-relevant steps of the train loop: load the
            float32 model, Taylor-score it on calibration batches of micro_batch x seq_len (full
            gradients), slim it, then distill with AdamW and the real distillation loss on cached
            top-k tensors for a few steps (again with grad_accum 2: stage_grad_accum);
  teacher   one teacher pass batch as the teacher actor runs it on CPU: load the float32 teacher,
            forward under inference_mode, float32 logits, one scratch buffer, fast_topk_with_rest.
Prints JSON: per case the measured peak, the plan's estimate (with its breakdown) and their ratio;
`ok` is true when every estimate is within 30% of the measurement.

A time case checks the plan's communication term the same way:
  comm      two gloo ranks (one thread each): the bus bandwidth of an all-gather and a reduce-scatter
            measured in this run; then the stage model sharded over both (fsdp) and, on the same
            ranks at the same time, unsharded (no collectives), each running forward + backward on
            the same micro-batch. What the sharded step takes beyond the unsharded one is compared
            with the plan's communication seconds for one fsdp micro-batch
            (`planning.comm.fsdp_micro_batch` over the measured bandwidth). The models are random PhiMoE
configs sized so that weights, gradients, activations and logits are each hundreds of MB, well
above the runtime baseline.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

TOLERANCE = 0.30

# A PhiMoE of ~60M parameters: 16 B/param is ~1 GB, activations and logits some hundreds of MB.
STAGE_MODEL = dict(vocab_size=8192, hidden_size=512, intermediate_size=1024, num_hidden_layers=4,
                   num_attention_heads=8, num_key_value_heads=4, num_local_experts=8, num_experts_per_tok=2)
STAGE = dict(micro_batch=8, seq_len=256, calibration_batches=2, steps=3, grad_accum=1, k=16,
             expert_intermediate_size=512)
# Gradient accumulation: the gradients of one micro-batch are still held through the next backward.
STAGE_ACCUM = dict(STAGE, micro_batch=4, grad_accum=2)
TEACHER_MODEL = dict(vocab_size=32000, hidden_size=512, intermediate_size=1024, num_hidden_layers=4,
                     num_attention_heads=8, num_key_value_heads=4, num_local_experts=8, num_experts_per_tok=2)
TEACHER = dict(batch_size=8, seq_len=256, k=16)


def _config(values: dict):
    import transformers

    return transformers.PhimoeConfig(**values, max_position_embeddings=1024, tie_word_embeddings=False,
                                     bos_token_id=1, eos_token_id=2, pad_token_id=0)


def _peak_rss() -> int:
    """This process's peak RSS: VmHWM, the high-water mark of its own address space. (ru_maxrss would
    do on a fresh interpreter, but Linux carries it over from the parent through fork and exec, so a
    child of a parent that holds models reports at least the parent's size.)"""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def _imports():
    import torch  # noqa: F401
    import transformers  # noqa: F401

    from slimmoe.tasks.core.checkpoint import load_model  # noqa: F401
    from slimmoe.tasks.slimming.losses import distillation_loss, fast_topk_with_rest  # noqa: F401
    from slimmoe.tasks.slimming.scores import next_token_score_loss, score_model  # noqa: F401
    from slimmoe.tasks.slimming.surgery import slim_model  # noqa: F401


def child_baseline(_: dict) -> dict:
    _imports()
    import torch

    torch.ones(1) + 1  # the allocator and the op dispatcher touched once
    return {"peak_rss": _peak_rss()}


def child_stage(args: dict) -> dict:
    _imports()
    import torch

    from slimmoe.tasks.core.checkpoint import load_model
    from slimmoe.tasks.slimming.config import SlimTargets
    from slimmoe.tasks.slimming.losses import distillation_loss
    from slimmoe.tasks.slimming.scores import next_token_score_loss, score_model
    from slimmoe.tasks.slimming.surgery import slim_model

    s = args["stage"]
    torch.manual_seed(0)
    model = load_model(args["model_dir"], device="cpu")  # float32, as the stage loads it
    vocab = model.config.vocab_size
    calib = [{"input_ids": torch.randint(3, vocab, (s["micro_batch"], s["seq_len"]))}
             for _ in range(s["calibration_batches"])]
    scores = score_model(model, calib, next_token_score_loss, with_heads=False)
    student = slim_model(model, scores, SlimTargets(s["expert_intermediate_size"]))
    del model, scores
    student.train()
    optimizer = torch.optim.AdamW(student.parameters(), lr=1e-4)
    for _ in range(s["steps"]):
        for _ in range(s["grad_accum"]):
            ids = torch.randint(3, vocab, (s["micro_batch"], s["seq_len"]))
            topk_ids = torch.randint(0, vocab, (s["micro_batch"], s["seq_len"], s["k"]), dtype=torch.int32)
            topk_lp = torch.log_softmax(torch.randn(s["micro_batch"], s["seq_len"], s["k"] + 1), -1)
            logits = student(input_ids=ids).logits
            loss, _ = distillation_loss(logits, ids, topk_ids.long(), topk_lp[..., :-1].half(), topk_lp[..., -1],
                                        1.0, 0.5, None)
            (loss / s["grad_accum"]).backward()
            del logits, loss
        torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return {"peak_rss": _peak_rss()}


def child_teacher(args: dict) -> dict:
    _imports()
    import torch

    from slimmoe.tasks.core.checkpoint import load_model
    from slimmoe.tasks.slimming.losses import fast_topk_with_rest

    t = args["teacher"]
    model = load_model(args["model_dir"], dtype=torch.float32, device="cpu").eval()
    ids = torch.randint(3, model.config.vocab_size, (t["batch_size"], t["seq_len"]))
    with torch.inference_mode():
        logits = model(input_ids=ids, use_cache=False).logits.float()
        work = torch.empty_like(logits)
        topk_ids, topk_lp, rest = fast_topk_with_rest(logits, t["k"], work)
        topk_ids.to(torch.int32).numpy(), topk_lp.to(torch.float16).numpy(), rest.numpy()
    return {"peak_rss": _peak_rss()}




COMM = dict(world=2, micro_batch=1, seq_len=64, reps=6, probe_mb=64)


def _comm_rank(rank: int, args: dict, out: str) -> None:
    import time

    import torch
    import torch.distributed as dist
    from transformers import AutoModelForCausalLM

    from slimmoe.tasks.slimming import fsdp
    from slimmoe.tasks.slimming.scores import next_token_score_loss

    torch.set_num_threads(1)
    world, reps = args["world"], args["reps"]
    dist.init_process_group("gloo", init_method=f"file://{out}.store", rank=rank, world_size=world)

    def timed(fn) -> float:
        fn()  # warm-up
        dist.barrier()
        start = time.perf_counter()
        for _ in range(reps):
            fn()
        dist.barrier()
        return (time.perf_counter() - start) / reps

    n = args["probe_mb"] * 2**20 // 4
    shard, whole = torch.ones(n), torch.empty(n * world)
    gather_s = timed(lambda: dist.all_gather_into_tensor(whole, shard))
    scatter_s = timed(lambda: dist.reduce_scatter_tensor(shard, whole))
    bus = n * 4 * (world - 1)  # what each rank sends in a ring all-gather of `whole`
    batch = torch.randint(3, 8000, (args["micro_batch"], args["seq_len"]), generator=torch.Generator().manual_seed(rank))

    def step(model):
        next_token_score_loss(model, batch).backward()
        model.zero_grad(set_to_none=True)

    sharded = fsdp.sharded_model_from(args["model_dir"], torch.device("cpu"))
    sharded_s = timed(lambda: step(sharded))
    del sharded
    alone = AutoModelForCausalLM.from_pretrained(args["model_dir"])
    alone_s = timed(lambda: step(alone))
    if rank == 0:
        Path(out).write_text(json.dumps({"bus_bytes": bus, "all_gather_s": gather_s, "reduce_scatter_s": scatter_s,
                                         "sharded_step_s": sharded_s, "unsharded_step_s": alone_s}))
    dist.destroy_process_group()


def child_comm(args: dict) -> dict:
    import torch.multiprocessing as mp

    out = tempfile.mktemp(prefix="slimmoe-comm-")
    mp.spawn(_comm_rank, args=(args, out), nprocs=args["world"])
    return json.loads(Path(out).read_text())


CHILDREN = {"comm": child_comm, "baseline": child_baseline, "stage": child_stage, "teacher": child_teacher}


def run_child(kind: str, args: dict, threads: int) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    out = subprocess.run([sys.executable, __file__, "--child", kind, "--args", json.dumps(args)], env=env,
                         capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"{kind} child failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def _save(values: dict, path: Path) -> Path:
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(_config(values)).save_pretrained(path, safe_serialization=True)
    return path


def _case(measured: int, memory) -> dict:
    estimate = memory.total
    return {"measured_peak_rss_bytes": measured, "estimate_bytes": estimate,
            "estimate_over_measured": round(estimate / measured, 3),
            "within_tolerance": abs(estimate - measured) <= TOLERANCE * measured,
            "estimate_breakdown": memory.as_dict()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--child", choices=sorted(CHILDREN))
    parser.add_argument("--args", default="{}")
    a = parser.parse_args()
    if a.child:
        print(json.dumps(CHILDREN[a.child](json.loads(a.args))))
        return

    import contextlib

    with contextlib.redirect_stdout(sys.stderr):  # a library's import-time banner must not break the JSON
        from slimmoe.tasks.planning.memory import (model_shape, stage_score_memory, stage_train_memory,
                                                   teacher_pass_memory)
        from slimmoe.tasks.slimming.config import SlimTargets
        from slimmoe.tasks.slimming.surgery import slimmed_config

    with tempfile.TemporaryDirectory(prefix="slimmoe-plan-accuracy-") as tmp, contextlib.redirect_stdout(sys.stderr):
        stage_dir = _save(STAGE_MODEL, Path(tmp) / "stage_model")
        teacher_dir = _save(TEACHER_MODEL, Path(tmp) / "teacher_model")
        base = run_child("baseline", {}, a.threads)["peak_rss"]
        stages = {name: run_child("stage", {"model_dir": str(stage_dir), "stage": s}, a.threads)["peak_rss"]
                  for name, s in (("stage", STAGE), ("stage_grad_accum", STAGE_ACCUM))}
        teacher = run_child("teacher", {"model_dir": str(teacher_dir), "teacher": TEACHER}, a.threads)["peak_rss"]
        comm = run_child("comm", {"model_dir": str(stage_dir), **COMM}, 1)

    shape_in = model_shape(_config(STAGE_MODEL))
    shape_out = model_shape(slimmed_config(_config(STAGE_MODEL), SlimTargets(STAGE["expert_intermediate_size"])))
    mapped = shape_in.checkpoint_bytes  # the stage's checkpoint, loaded with load_model, stays mapped
    cases = {}
    for name, s in (("stage", STAGE), ("stage_grad_accum", STAGE_ACCUM)):
        phases = {"score": stage_score_memory(shape_in, "ddp", 1, s["micro_batch"], s["seq_len"], False, shape_out,
                                              overhead=base, mapped_bytes=mapped),
                  "train": stage_train_memory(shape_out, "ddp", 1, s["micro_batch"], s["seq_len"], False, k=s["k"],
                                              overhead=base, grad_accum=s["grad_accum"], mapped_bytes=mapped)}
        cases[name] = {**_case(stages[name], max(phases.values(), key=lambda m: m.total)), "settings": s,
                       "model": STAGE_MODEL, "params": {"before": shape_in.total, "after": shape_out.total},
                       "phases_estimate_bytes": {k: v.total for k, v in phases.items()}}
    t = TEACHER
    teacher_shape = model_shape(_config(TEACHER_MODEL))
    teacher_plan = teacher_pass_memory(teacher_shape, t["batch_size"], t["seq_len"], t["k"], on_gpu=False,
                                       overhead=base)
    cases["teacher_pass"] = {**_case(teacher, teacher_plan), "settings": t, "model": TEACHER_MODEL,
                             "params": teacher_shape.total}
    # The plan's communication for one fsdp micro-batch over the bandwidth gloo reached here.
    from slimmoe.tasks.planning.comm import fsdp_micro_batch

    bandwidth = comm["bus_bytes"] / ((comm["all_gather_s"] + comm["reduce_scatter_s"]) / 2)
    traffic = fsdp_micro_batch(shape_in.total, COMM["world"], COMM["world"], param_bytes=4)
    predicted = traffic.intra / bandwidth
    beyond = comm["sharded_step_s"] - comm["unsharded_step_s"]
    time_case = {"settings": COMM, "model": STAGE_MODEL, "params": shape_in.total,
                 "measured_bus_gb_per_s": round(bandwidth / 1e9, 3), "plan_bytes_per_rank": traffic.intra,
                 "plan_comm_seconds": round(predicted, 4), "measured_beyond_compute_seconds": round(beyond, 4),
                 "sharded_step_seconds": round(comm["sharded_step_s"], 4),
                 "unsharded_step_seconds": round(comm["unsharded_step_s"], 4),
                 "plan_over_measured": round(predicted / beyond, 3) if beyond > 0 else None,
                 "within_tolerance": beyond > 0 and abs(predicted - beyond) <= TOLERANCE * beyond}
    print(json.dumps({
        "baseline_peak_rss_bytes": base,
        "overhead_note": ("the runtime (python + torch + transformers + slimmoe's modules) measured in a fresh "
                          "process in this run; the estimates use it as their runtime term, plus the plan's "
                          "allocator slack (15% of gradients, activations and logits on CPU) and, on CPU, the "
                          "checkpoint file that stays mapped while the loaded model lives"),
        "tolerance": TOLERANCE, "threads": a.threads,
        "cases": cases,
        "time_cases": {"comm": time_case},
        "ok": all(c["within_tolerance"] for c in cases.values()) and time_case["within_tolerance"],
    }, indent=2))


if __name__ == "__main__":
    main()
