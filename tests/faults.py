"""Faults injected into a stage's Ray Train workers, to check that a stage fails whole and fast.

A process started with `tests/fault_site` on its PYTHONPATH (and every Ray worker of a cluster it
starts) patches three places of slimmoe as they are imported. Each patch does nothing unless the JSON
file named by `SLIMMOE_TEST_FAULT_FILE` asks for its fault, so one cluster serves several scenarios:

    {"kind": "nonfinite", "rank": R, "step": S}   rank R's loss is NaN at step S
    {"kind": "surgery"}                           rank 0's streaming surgery raises
    {"kind": "final_save"}                        rank 0 raises in the final gathered save, mid-way

When a fault fires it writes the time into `<fault file>.fired`, so the test can measure how long the
stage took to end after it.

Run as a script, it is the driver of those scenarios (see `run_scenarios`).
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import json
import os
import sys
import time
from pathlib import Path

FAULT_FILE = "SLIMMOE_TEST_FAULT_FILE"


def current() -> dict:
    path = os.environ.get(FAULT_FILE)
    try:
        return json.loads(Path(path).read_text()) if path else {}
    except (OSError, ValueError):
        return {}


def fired(detail: str) -> None:
    Path(os.environ[FAULT_FILE] + ".fired").write_text(json.dumps({"time": time.time(), "detail": detail}))


def _rank() -> int:
    import torch.distributed as dist

    return dist.get_rank() if dist.is_initialized() else 0


def _patch_train_loop(module) -> None:
    original = module._StageLoop._loss_step

    def _loss_step(self, batch):
        logits, loss, parts = original(self, batch)
        fault = current()
        if fault.get("kind") == "nonfinite" and self.rank == fault["rank"] and self.state["step"] + 1 == fault["step"]:
            fired(f"nonfinite on rank {self.rank} at step {fault['step']}")
            loss = loss * float("nan")
        return logits, loss, parts

    module._StageLoop._loss_step = _loss_step


def _patch_streaming(module) -> None:
    original = module.stream_slim

    def stream_slim(*args, **kwargs):
        if current().get("kind") == "surgery" and _rank() == 0:
            fired("surgery on rank 0")
            raise OSError("No space left on device (injected into the streaming surgery)")
        return original(*args, **kwargs)

    module.stream_slim = stream_slim


def _patch_fsdp(module) -> None:
    original = module.write_sharded

    def write_sharded(out_dir, specs, pieces, *args, **kwargs):
        if current().get("kind") != "final_save":
            return original(out_dir, specs, pieces, *args, **kwargs)
        count = [0]

        def failing(spec):
            count[0] += 1
            if count[0] == 3:
                fired("final save on rank 0")
                raise OSError("No space left on device (injected into the final save)")
            return pieces(spec)

        return original(out_dir, specs, failing, *args, **kwargs)

    module.write_sharded = write_sharded


PATCHES = {"slimmoe.tasks.slimming.train_loop": _patch_train_loop,
           "slimmoe.tasks.slimming.streaming": _patch_streaming,
           "slimmoe.tasks.slimming.fsdp": _patch_fsdp}


class _PatchAfterImport(importlib.abc.MetaPathFinder):
    """Finds the patched modules as the normal path finder does, and patches each once it has run."""

    def find_spec(self, name, path=None, target=None):
        if name not in PATCHES or path is None:
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is None or spec.loader is None:
            return None
        run_module = spec.loader.exec_module

        def exec_module(module):
            run_module(module)
            PATCHES[name](module)

        spec.loader.exec_module = exec_module
        return spec


def arm() -> None:
    if os.environ.get(FAULT_FILE) and not any(isinstance(f, _PatchAfterImport) for f in sys.meta_path):
        sys.meta_path.insert(0, _PatchAfterImport())


# -- the driver --------------------------------------------------------------------------------------

def run_scenarios(pipeline: dict, root: Path) -> dict:
    """Each scenario runs a 3-rank fsdp stage with one fault armed and records the error and how long
    the stage took to end after the fault fired; the last one runs the failed save's stage again with
    no fault, which must resume from its last checkpoint."""
    import ray

    from slimmoe.tasks.nodes.stage import run_stage
    from stage_helpers import SEQ, stage_cfg

    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False, configure_logging=False)
    cfg = stage_cfg(strategy="fsdp", num_workers=3, token_budget=12 * 8 * SEQ * 3, checkpoint_interval=4,
                    log_interval=4, max_failures=0)
    fault_file = Path(os.environ[FAULT_FILE])
    results = {}
    runs = [("nonfinite", {"kind": "nonfinite", "rank": 1, "step": 3}, "a"),
            ("surgery", {"kind": "surgery"}, "b"),
            ("final_save", {"kind": "final_save"}, "c"),
            ("resume", {}, "c")]
    for scenario, fault, work in runs:
        fault_file.write_text(json.dumps(fault))
        Path(str(fault_file) + ".fired").unlink(missing_ok=True)
        result = {}
        try:
            result["headline"] = run_stage(cfg, pipeline["teacher"], pipeline["logits"], root / f"out_{work}",
                                           root / f"work_{work}", teacher_fingerprint=pipeline["fp"],
                                           name=f"stage_{scenario}")
        except Exception as err:  # what the user would see
            result.update(error=type(err).__name__, message=str(err), ended=time.time())
        result["output_written"] = (root / f"out_{work}" / "config.json").exists()
        marker = Path(str(fault_file) + ".fired")
        if marker.exists():
            when = json.loads(marker.read_text())
            result["fired"] = when["detail"]
            if "ended" in result:
                result["seconds_after_fault"] = round(result["ended"] - when["time"], 1)
        results[scenario] = result
    return results


if __name__ == "__main__":
    pipeline = {k: Path(v) if k != "fp" else v for k, v in json.loads(sys.argv[1]).items()}
    out = Path(sys.argv[2])
    out.write_text(json.dumps(run_scenarios(pipeline, out.parent), indent=2))
