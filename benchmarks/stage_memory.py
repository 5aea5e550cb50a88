"""Peak memory of the stages that touch a whole checkpoint, each measured in a fresh process.

    python benchmarks/stage_memory.py [--sections slim,scoring,stage] [--workdir DIR] [--layers 5]

One function per section (`section_<name>(workdir, args)`, listed in SECTIONS; a section's options
go on main's parser); `main` runs the selected ones and prints one JSON object, {section: result}.
Peak RSS is the child's own `ru_maxrss` (from os.wait4: that process alone, file-backed pages
included, like VmHWM), so every arm starts from nothing.

slim: a PhiMoE checkpoint of >= 1 GB of float32 weights (saved sharded by save_pretrained, so in the
per-expert Hub layout transformers 5 writes) is cut to half its expert width three ways:
  streaming_scores     `slimmoe slim --scores FILE` (streaming surgery; the model is never loaded)
  streaming_magnitude  `slimmoe slim` without data (magnitudes and the cut both streamed)
  in_memory            load_model + slim_model + save_model_dir (the path `slim` took before)
against the baselines of processes that only import: torch; torch and the transformers PhiMoE model
code (what the in-memory arm runs); the slimmoe CLI and that model code (what the streaming arms run,
their meta-device model included). Target: streaming peak RSS < 0.3x the checkpoint's size.

loss (only when named in --sections): the distillation loss's forward and backward on one micro-batch
of float32 logits at Phi's and Qwen3's vocabularies, in one piece (chunk_tokens=None) and chunked (the
default), each arm in a fresh process: its peak RSS minus its RSS once the inputs exist, and the bytes
autograd kept for backward.

experts (only when named in --sections): a 2-expert PhiMoE sharded over 4 gloo ranks (more ranks than
experts, as 16 experts on 64 GPUs), with the fused expert tensors sharded on their expert axis (dim 0,
before) and along their rows (now): the expert bytes each rank allocates (FSDP2 pads every rank
to the first chunk) against an even quarter, and what `to_local()` reports.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _run_child(argv: list[str]) -> dict:
    """Run `argv`; its peak RSS in MB (this child only) and wall time. Fails loudly on a non-zero exit."""
    start = time.perf_counter()
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, cwd=REPO)
    out = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} exited {proc.returncode}:\n{out.decode(errors='replace')[-3000:]}")
    return {"peak_rss_mb": round(usage.ru_maxrss / 1024, 1), "seconds": round(time.perf_counter() - start, 1)}


def _python(code: str) -> list[str]:
    return [sys.executable, "-c", code]


def _dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.glob("*.safetensors"))


# -- slim -----------------------------------------------------------------------------------------------

def _build_teacher(out: Path, layers: int) -> dict:
    """A PhiMoE of `layers` layers (about 0.43 GB of float32 weights each), saved in 500 MB shards."""
    import torch
    import transformers
    from transformers import AutoModelForCausalLM

    cfg = transformers.PhimoeConfig(vocab_size=4096, hidden_size=1024, intermediate_size=2048, num_hidden_layers=layers,
                                    num_attention_heads=16, num_key_value_heads=4, num_local_experts=16,
                                    num_experts_per_tok=2, max_position_embeddings=512)
    torch.manual_seed(0)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg)
    model.to_empty(device="cpu")
    with torch.no_grad():  # any values will do for memory; normal_ is faster than the model's init
        for p in model.parameters():
            p.normal_(0, 0.02)
    model.save_pretrained(out, max_shard_size="500MB")
    n = sum(p.numel() for p in model.parameters())
    del model
    return {"parameters": n, "expert_intermediate_size": cfg.intermediate_size}


_IN_MEMORY = """
import sys
from slimmoe.tasks.core.checkpoint import load_model, save_model_dir
from slimmoe.tasks.slimming.config import SlimTargets
from slimmoe.tasks.slimming.scores import Scores
from slimmoe.tasks.slimming.surgery import slim_model
src, scores, out, size = sys.argv[1:5]
model = load_model(src)
slim = slim_model(model, Scores.load(scores), SlimTargets(int(size)))
save_model_dir(slim, out, tokenizer_from=src)
"""

_SCORES = """
import sys
from slimmoe.tasks.slimming.streaming import streaming_magnitude_scores
streaming_magnitude_scores(sys.argv[1], with_heads=False).save(sys.argv[2])
"""


def section_slim(workdir: Path, args: argparse.Namespace) -> dict:
    workdir.mkdir(parents=True, exist_ok=True)
    layers = args.layers
    src = _teacher(workdir, layers)
    size = _dir_bytes(src)
    size_mb = size / 2**20
    target = json.loads((src / "config.json").read_text())["intermediate_size"] // 2
    scores = workdir / "scores.safetensors"
    scores.unlink(missing_ok=True)
    _run_child(_python(_SCORES) + [str(src), str(scores)])
    slimmoe = str(Path(sys.executable).parent / "slimmoe")
    arms = {
        "import_torch": _python("import torch"),
        "import_transformers_phimoe": _python("import torch, transformers.models.phimoe.modeling_phimoe"),
        "import_cli_and_phimoe": _python("import slimmoe.workflows.cli, slimmoe.tasks.nodes.slim, "
                                         "transformers.models.phimoe.modeling_phimoe"),
        "streaming_scores": [slimmoe, "slim", str(src), str(workdir / "out_stream"), "--expert-intermediate-size",
                             str(target), "--scores", str(scores), "--json"],
        "streaming_magnitude": [slimmoe, "slim", str(src), str(workdir / "out_magnitude"),
                                "--expert-intermediate-size", str(target), "--json"],
        "in_memory": _python(_IN_MEMORY) + [str(src), str(scores), str(workdir / "out_memory"), str(target)],
    }
    result = {"checkpoint_mb": round(size_mb, 1), "checkpoint_files": len(list(src.glob("*.safetensors"))),
              "expert_intermediate_size": f"{target * 2} -> {target}", "arms": {}}
    for name, argv in arms.items():
        for out in workdir.glob("out_*"):
            shutil.rmtree(out)
        result["arms"][name] = _run_child(argv)
    peak = {k: v["peak_rss_mb"] for k, v in result["arms"].items()}
    # what each arm adds over a process that only imports what it runs
    baselines = {"streaming_scores": "import_cli_and_phimoe", "streaming_magnitude": "import_cli_and_phimoe",
                 "in_memory": "import_transformers_phimoe"}
    for name, base in baselines.items():
        arm = result["arms"][name]
        arm["peak_over_checkpoint"] = round(peak[name] / size_mb, 3)
        arm["baseline"] = base
        arm["peak_above_baseline_over_checkpoint"] = round((peak[name] - peak[base]) / size_mb, 3)
    result["streaming_over_in_memory"] = round(peak["streaming_scores"] / peak["in_memory"], 3)
    result["target_streaming_below_0.3x_checkpoint"] = peak["streaming_scores"] < 0.3 * size_mb
    return result


# -- scoring ---------------------------------------------------------------------------------------------

_SCORE_FULL = """
import sys, torch
from slimmoe.tasks.core.checkpoint import load_model
from slimmoe.tasks.slimming.scores import next_token_score_loss, taylor_scores
src, n, seq = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
g = torch.Generator().manual_seed(0)
batches = [torch.randint(3, 4000, (1, seq), generator=g) for _ in range(n)]
taylor_scores(load_model(src), batches, next_token_score_loss, with_heads=True).save(sys.argv[4])
"""

_SCORE_HOOKS = """
import sys, torch, torch.distributed as dist
from slimmoe.tasks.slimming import fsdp
from slimmoe.tasks.slimming.scores import next_token_score_loss
src, n, seq = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
dist.init_process_group("gloo", init_method="file://" + sys.argv[5], rank=0, world_size=1)
g = torch.Generator().manual_seed(0)
batches = [torch.randint(3, 4000, (1, seq), generator=g) for _ in range(n)]
model = fsdp.sharded_model_from(src, torch.device("cpu"))
fsdp.sharded_taylor_scores(model, batches, next_token_score_loss, with_heads=True).save(sys.argv[4])
"""


def section_scoring(workdir: Path, args: argparse.Namespace) -> dict:
    """Taylor scores of the whole teacher on one process: full gradients (what a ddp stage's workers
    hold) against the FSDP2 gradient hooks (each gradient folded and freed as it arrives). One rank,
    so the weights are whole in both arms and the difference is the gradients alone."""
    from safetensors.torch import load_file

    workdir.mkdir(parents=True, exist_ok=True)
    src = _teacher(workdir.parent / "slim", args.layers)
    size_mb = _dir_bytes(src) / 2**20
    n, seq = 2, 64
    arms = {"full_gradients": _python(_SCORE_FULL) + [str(src), str(n), str(seq), str(workdir / "full.safetensors")],
            "gradient_hooks": _python(_SCORE_HOOKS) + [str(src), str(n), str(seq), str(workdir / "hooks.safetensors"),
                                                       str(workdir / "store")]}
    result = {"checkpoint_mb": round(size_mb, 1), "calibration": f"{n} batches of 1 x {seq} tokens", "arms": {}}
    for name, argv in arms.items():
        (workdir / "store").unlink(missing_ok=True)
        result["arms"][name] = _run_child(argv)
        result["arms"][name]["peak_over_checkpoint"] = round(result["arms"][name]["peak_rss_mb"] / size_mb, 3)
    full, hooks = load_file(str(workdir / "full.safetensors")), load_file(str(workdir / "hooks.safetensors"))
    result["max_relative_score_difference"] = max(
        float((full[k] - hooks[k]).abs().max() / full[k].abs().max().clamp_min(1e-30)) for k in full)
    result["hooks_over_full_gradients"] = round(result["arms"]["gradient_hooks"]["peak_rss_mb"]
                                                / result["arms"]["full_gradients"]["peak_rss_mb"], 3)
    return result


# -- stage -----------------------------------------------------------------------------------------------

_STAGE = """
import json, os, sys
os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
import ray
from slimmoe.tasks.nodes.stage import run_stage
from slimmoe.tasks.slimming.config import StageConfig
teacher, logits, out, work, strategy, size, seq = sys.argv[1:8]
ray.init(num_cpus=4, include_dashboard=False, configure_logging=False, log_to_driver=False)
cfg = StageConfig(strategy=strategy, num_workers=2, expert_intermediate_size=int(size), micro_batch=1,
                  token_budget=4 * 2 * int(seq), calibration_batches=2, score_loss="next_token",
                  checkpoint_interval=1000, log_interval=1)
run_stage(cfg, teacher, logits, out, work)
print("MEMORY" + json.dumps(json.load(open(os.path.join(out, "metrics.json")))["memory_per_rank"]))
"""


def _stage_inputs(workdir: Path, layers: int, seq: int) -> tuple[Path, Path]:
    """The teacher, and a logit cache of random token rows from a small model with its vocabulary:
    what the cache holds does not change what the stage keeps in memory."""
    import torch
    import transformers
    from transformers import AutoModelForCausalLM

    from slimmoe.tasks.data.config import TeacherLogitsConfig
    from slimmoe.tasks.data.shards import write_tokenized_dataset
    from slimmoe.tasks.nodes.teacher_logits import run_teacher_logits

    teacher = _teacher(workdir, layers)
    logits = workdir / "logits"
    if not (logits / "manifest.json").exists():
        shutil.rmtree(logits, ignore_errors=True)
        g = torch.Generator().manual_seed(0)
        rows = {s: torch.randint(3, 4000, (n, seq), generator=g).numpy() for s, n in (("train", 64), ("validation", 8))}
        write_tokenized_dataset(workdir / "tokens", rows, tokenizer_fp="random-rows", eos_token_id=None)
        small = AutoModelForCausalLM.from_config(transformers.PhimoeConfig(
            vocab_size=4096, hidden_size=32, intermediate_size=32, num_hidden_layers=1, num_attention_heads=4,
            num_key_value_heads=2, num_local_experts=4, max_position_embeddings=512))
        small.save_pretrained(workdir / "cache_teacher")
        run_teacher_logits(TeacherLogitsConfig(k=8, batch_size=16), workdir / "cache_teacher", workdir / "tokens", logits)
    return teacher, logits


def section_stage(workdir: Path, args: argparse.Namespace) -> dict:
    """A whole stage (score, slim, distill 4 steps) on 2 CPU workers, ddp against fsdp: each worker's
    peak RSS (its own ru_maxrss, recorded by the train loop) and, for fsdp, the parameter bytes each
    rank held as its shard."""
    workdir.mkdir(parents=True, exist_ok=True)
    seq = 64
    teacher, logits = _stage_inputs(workdir, args.stage_layers, seq)
    size_mb = _dir_bytes(teacher) / 2**20
    target = json.loads((teacher / "config.json").read_text())["intermediate_size"] // 2
    result = {"checkpoint_mb": round(size_mb, 1), "workers": 2, "expert_intermediate_size": f"{target * 2} -> {target}",
              "arms": {}}
    for strategy in ("ddp", "fsdp"):
        out, work = workdir / f"out_{strategy}", workdir / f"work_{strategy}"
        for d in (out, work):
            shutil.rmtree(d, ignore_errors=True)
        argv = _python(_STAGE) + [str(teacher), str(logits), str(out), str(work), strategy, str(target), str(seq)]
        start = time.perf_counter()
        text = subprocess.run(argv, cwd=REPO, capture_output=True, text=True)
        if text.returncode != 0:
            raise RuntimeError(f"{strategy} stage failed:\n{(text.stdout + text.stderr)[-3000:]}")
        memory = json.loads(text.stdout.split("MEMORY", 1)[1].splitlines()[0])
        arm = {"seconds": round(time.perf_counter() - start, 1),
               "worker_peak_rss_mb": [round(m["peak_rss_bytes"] / 2**20, 1) for m in memory]}
        if strategy == "fsdp":
            arm["teacher_shard_over_teacher"] = [round(m["input_local_param_bytes"] / m["input_param_bytes"], 3)
                                                 for m in memory]
            arm["student_shard_over_student"] = [round(m["student_local_param_bytes"] / m["student_param_bytes"], 3)
                                                 for m in memory]
        result["arms"][strategy] = arm
    result["fsdp_over_ddp_max_worker_peak"] = round(max(result["arms"]["fsdp"]["worker_peak_rss_mb"])
                                                    / max(result["arms"]["ddp"]["worker_peak_rss_mb"]), 3)
    return result


# -- loss ------------------------------------------------------------------------------------------------

_LOSS = """
import json, resource, sys, time, torch
from slimmoe.tasks.slimming.losses import auto_chunk_tokens, distillation_loss
vocab, seq, k, arm = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
chunk = None if arm == "unchunked" else "auto"
def rss():
    return int(open("/proc/self/statm").read().split()[1]) * resource.getpagesize()
def loss_of(logits, ids, topk_ids, lp):
    return distillation_loss(logits, ids, topk_ids, lp[..., :-1].half(), lp[..., -1], 1.0, 0.5,
                             torch.ones(ids.shape), chunk_tokens=chunk)[0]
g = torch.Generator().manual_seed(0)
# made in place, so that no transient copy sets the peak before the loss runs
logits = torch.randn(1, seq, vocab, generator=g).requires_grad_(True)
ids = torch.randint(3, vocab, (1, seq), generator=g)
topk_ids = torch.randint(0, vocab, (1, seq, k), generator=g)
lp = torch.log_softmax(torch.randn(1, seq, k + 1, generator=g), -1)
small = torch.randn(1, 4, vocab).requires_grad_(True)  # every kernel and allocator path touched once
loss_of(small, ids[:, :4], topk_ids[:, :4], lp[:, :4]).backward()
del small
before = rss()
saved = {}
def pack(t):
    saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    return t
start = time.perf_counter()
with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
    loss = loss_of(logits, ids, topk_ids, lp)
loss.backward()
seconds = time.perf_counter() - start
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
logits_bytes = logits.numel() * logits.element_size()
print("RESULT" + json.dumps({
    "peak_over_inputs_mb": round((peak - before) / 2**20, 1),
    "saved_for_backward_mb": round(sum(saved.values()) / 2**20, 1),
    "saved_beyond_logits_mb": round((sum(saved.values()) - saved.get(logits.untyped_storage().data_ptr(), 0))
                                    / 2**20, 1),
    "seconds": round(seconds, 1), "loss": float(loss.detach()),
    "chunk_tokens": None if chunk is None else auto_chunk_tokens(vocab)}))
"""

# The one-piece loss at 32k x 4096 peaked at ~5 float32 copies of the logits over its inputs.
_UNCHUNKED_COPIES = 6


def _mem_available() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return 0


def section_loss(workdir: Path, args: argparse.Namespace) -> dict:
    """Peak memory of distillation_loss's forward + backward (with next-token CE and a mask), one piece
    against chunked, at micro_batch 1. A vocabulary whose one-piece arm would not fit in this machine's
    available memory (with 4 GB to spare for everything else running) is measured at half the sequence."""
    result = {"dtype": "float32", "micro_batch": 1, "k": 8, "next_token_weight": 0.5, "vocabularies": {}}
    for vocab in (32064, 151936):
        def need(seq: int) -> int:
            return (_UNCHUNKED_COPIES + 1) * seq * vocab * 4 + 4 * 2**30

        seq, available = args.loss_seq, _mem_available()
        while need(seq) > available and seq > 256:
            seq //= 2
        entry = {"seq": seq, "logits_mb": round(seq * vocab * 4 / 2**20, 1), "arms": {}}
        if seq != args.loss_seq:
            entry["note"] = (f"seq {seq} instead of {args.loss_seq}: the one-piece arm would need ~"
                             f"{need(args.loss_seq) / 2**30:.1f} GB there, {available / 2**30:.1f} GB available")
        for arm in ("unchunked", "chunked"):
            text = subprocess.run(_python(_LOSS) + [str(vocab), str(seq), "8", arm], cwd=REPO, capture_output=True,
                                  text=True)
            if text.returncode != 0:
                raise RuntimeError(f"loss {arm} at vocab {vocab} failed:\n{(text.stdout + text.stderr)[-3000:]}")
            entry["arms"][arm] = json.loads(text.stdout.split("RESULT", 1)[1].splitlines()[0])
            # the logits' gradient is the loss's output, the same size in both arms: the rest is its work
            entry["arms"][arm]["peak_beyond_gradient_mb"] = round(
                entry["arms"][arm]["peak_over_inputs_mb"] - entry["logits_mb"], 1)
        one, chunked = entry["arms"]["unchunked"], entry["arms"]["chunked"]
        entry["chunked_over_unchunked_peak"] = round(chunked["peak_over_inputs_mb"] / one["peak_over_inputs_mb"], 3)
        entry["loss_relative_difference"] = abs(chunked["loss"] - one["loss"]) / abs(one["loss"])
        result["vocabularies"][str(vocab)] = entry
    return result


def _teacher(workdir: Path, layers: int) -> Path:
    src = workdir / "teacher"
    if not (src / "config.json").exists():
        workdir.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(src, ignore_errors=True)
        _run_child(_python(f"import sys; sys.path.insert(0, {str(REPO / 'benchmarks')!r}); from stage_memory import "
                           f"_build_teacher; from pathlib import Path; _build_teacher(Path({str(src)!r}), {layers})"))
    return src


# -- experts: more ranks than experts -------------------------------------------------------------------

EXPERTS_WORLD = 4


def _experts_worker(rank: int, root: str) -> None:
    import torch
    import torch.distributed as dist

    from slimmoe.tasks.core.adapters import get_adapter
    from slimmoe.tasks.slimming import fsdp

    dist.init_process_group("gloo", init_method=f"file://{root}/store", rank=rank, world_size=EXPERTS_WORLD)
    try:
        out = {}
        for dim in (0, None):  # the expert axis (before); the rows, as build_sharded chooses (now)
            model = fsdp.sharded_model_from(Path(root) / "model", torch.device("cpu"), expert_shard_dim=dim)
            experts = [block.experts for _, block in get_adapter(model).moe_blocks(model)]
            out["dim0" if dim == 0 else "rows"] = {"allocated": sum(fsdp.allocated_param_bytes(e) for e in experts),
                                "local": sum(fsdp.local_param_bytes(e) for e in experts),
                                "whole": sum(p.numel() * p.element_size() for e in experts for p in e.parameters())}
            del model
        (Path(root) / f"rank{rank}.json").write_text(json.dumps(out))
    finally:
        dist.destroy_process_group()


def section_experts(workdir: Path, args: argparse.Namespace) -> dict:
    import torch.multiprocessing as mp
    import transformers

    workdir.mkdir(parents=True, exist_ok=True)
    hidden, inter = 512, 1024
    config = transformers.PhimoeConfig(vocab_size=1024, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=2,
                                       num_attention_heads=8, num_key_value_heads=4, num_local_experts=2,
                                       num_experts_per_tok=1)
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(workdir / "model")
    mp.spawn(_experts_worker, args=(str(workdir),), nprocs=EXPERTS_WORLD)
    ranks = [json.loads((workdir / f"rank{r}.json").read_text()) for r in range(EXPERTS_WORLD)]
    result = {"world": EXPERTS_WORLD, "experts": 2, "expert_mb_whole": round(ranks[0]["dim0"]["whole"] / 2**20, 2)}
    for arm, dim in (("before_dim0", "dim0"), ("after_rows", "rows")):
        allocated = [r[dim]["allocated"] for r in ranks]
        result[arm] = {"allocated_mb_per_rank": [round(a / 2**20, 2) for a in allocated],
                       "local_mb_per_rank": [round(r[dim]["local"] / 2**20, 2) for r in ranks],
                       "max_allocated_over_even_share": round(max(allocated) / (ranks[0][dim]["whole"] / EXPERTS_WORLD), 3)}
    return result


SECTIONS = {"slim": section_slim, "scoring": section_scoring, "stage": section_stage, "loss": section_loss,
            "experts": section_experts}
DEFAULT_SECTIONS = ("slim", "scoring", "stage")  # loss and experts are run only when named


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sections", default=",".join(DEFAULT_SECTIONS),
                        help=f"comma-separated, of: {', '.join(SECTIONS)} (default: {','.join(DEFAULT_SECTIONS)})")
    parser.add_argument("--workdir", type=Path, default=None, help="kept between runs (the teacher is reused)")
    parser.add_argument("--layers", type=int, default=5,
                        help="slim, scoring: decoder layers of the teacher (~0.43 GB each)")
    parser.add_argument("--stage-layers", type=int, default=3, help="stage: decoder layers of the teacher")
    parser.add_argument("--loss-seq", type=int, default=4096, help="loss: tokens of the one micro-batch")
    args = parser.parse_args(argv)
    chosen = [s.strip() for s in args.sections.split(",") if s.strip()]
    unknown = [s for s in chosen if s not in SECTIONS]
    if unknown:
        parser.error(f"unknown section(s) {', '.join(unknown)}; choose from {', '.join(SECTIONS)}")
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="slimmoe-stage-memory-"))
    workdir.mkdir(parents=True, exist_ok=True)
    try:
        report = {}
        for name in chosen:
            report[name] = SECTIONS[name](workdir / name, args)
    finally:
        if args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)
    print(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
