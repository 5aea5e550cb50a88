"""Peak memory of the stages that touch a whole checkpoint, each measured in a fresh process.

    python benchmarks/stage_memory.py [--sections slim] [--workdir DIR] [--layers 5]

One function per section (`section_<name>(workdir, args)`, listed in SECTIONS; a section's options
go on main's parser); `main` runs the selected ones and prints one JSON object, {section: result}. Peak RSS is the child's own `ru_maxrss` (from os.wait4:
that process alone, file-backed pages included, like VmHWM), so every arm starts from nothing.

slim: a PhiMoE checkpoint of >= 1 GB of float32 weights (saved sharded by save_pretrained, so in the
per-expert Hub layout transformers 5 writes) is cut to half its expert width three ways:
  streaming_scores     `slimmoe slim --scores FILE` (streaming surgery; the model is never loaded)
  streaming_magnitude  `slimmoe slim` without data (magnitudes and the cut both streamed)
  in_memory            load_model + slim_model + save_model_dir (the path `slim` took before)
against the baselines of a process that only imports torch, and one that also imports the
transformers PhiMoE model code (which every arm needs). Target: streaming peak RSS < 0.3x the
checkpoint's size.
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
    src = workdir / "teacher"
    if not (src / "config.json").exists():
        shutil.rmtree(src, ignore_errors=True)
        _run_child(_python(f"import sys; sys.path.insert(0, {str(REPO / 'benchmarks')!r}); from stage_memory import "
                           f"_build_teacher; from pathlib import Path; _build_teacher(Path({str(src)!r}), {layers})"))
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
    base = peak["import_transformers_phimoe"]
    for name in ("streaming_scores", "streaming_magnitude", "in_memory"):
        arm = result["arms"][name]
        arm["peak_over_checkpoint"] = round(peak[name] / size_mb, 3)
        arm["peak_above_import_baseline_over_checkpoint"] = round((peak[name] - base) / size_mb, 3)
    result["streaming_over_in_memory"] = round(peak["streaming_scores"] / peak["in_memory"], 3)
    result["target_streaming_below_0.3x_checkpoint"] = peak["streaming_scores"] < 0.3 * size_mb
    return result


SECTIONS = {"slim": section_slim}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sections", default="slim", help=f"comma-separated, of: {', '.join(SECTIONS)}")
    parser.add_argument("--workdir", type=Path, default=None, help="kept between runs (the teacher is reused)")
    parser.add_argument("--layers", type=int, default=5, help="slim: decoder layers of the teacher (~0.43 GB each)")
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
