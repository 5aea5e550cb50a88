"""AdamW's state carried across a cut: saved by name beside a model, sliced with the same plan as the
weights, and put back into a fresh optimizer so the next stage continues where the last one ended.

On disk it is one safetensors file, `optimizer/moments.safetensors` beside the model (a folder of
its own, so nothing that globs a model directory's `*.safetensors` takes it for weights), holding `exp_avg/<param>`,
`exp_avg_sq/<param>` and `step/<param>` (a 0-d float64) for every parameter the optimizer has
stepped. Parameters are named as in `model.named_parameters()`, the names the moments are sliced by.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from slimmoe.tasks.slimming.surgery import KeepPlan, slice_state

MOMENTS_FILE = "optimizer/moments.safetensors"
FORMAT = "slimmoe-adamw-moments/1"
KINDS = ("exp_avg", "exp_avg_sq", "step")


class MomentsError(ValueError):
    """Saved moments that do not belong to the model they are put into."""


def optimizer_moments(optimizer: torch.optim.Optimizer, model: nn.Module) -> dict[str, dict[str, torch.Tensor]]:
    """{kind: {param name: tensor}} for every parameter of `model` the optimizer holds state for."""
    out: dict[str, dict[str, torch.Tensor]] = {k: {} for k in KINDS}
    for name, p in model.named_parameters():
        st = optimizer.state.get(p)
        if not st:
            continue  # never stepped (an expert no token reached yet): nothing to carry
        out["exp_avg"][name] = st["exp_avg"].detach().cpu()
        out["exp_avg_sq"][name] = st["exp_avg_sq"].detach().cpu()
        out["step"][name] = torch.as_tensor(st["step"], dtype=torch.float64).detach().cpu().reshape(())
    return out


def save_moments(optimizer: torch.optim.Optimizer, model: nn.Module, path: str | Path) -> int:
    """Write the moments atomically (a temp name, then rename); return how many parameters they cover."""
    from safetensors.torch import save_file

    moments = optimizer_moments(optimizer, model)
    tensors = {f"{kind}/{name}": t.contiguous() for kind, d in moments.items() for name, t in d.items()}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata={"format": FORMAT})
    os.replace(tmp, path)
    return len(moments["step"])


def load_moments(path: str | Path) -> dict[str, dict[str, torch.Tensor]]:
    from safetensors import safe_open

    out: dict[str, dict[str, torch.Tensor]] = {k: {} for k in KINDS}
    with safe_open(str(path), "pt") as f:
        if (f.metadata() or {}).get("format") != FORMAT:
            raise MomentsError(f"{path} is not a slimmoe optimizer-state file (format {FORMAT} expected)")
        for key in f.keys():
            kind, _, name = key.partition("/")
            if kind not in out:
                raise MomentsError(f"{path} holds {key!r}, which is none of {', '.join(KINDS)}")
            out[kind][name] = f.get_tensor(key)
    return out


def slice_moments(model: nn.Module, plan: KeepPlan, moments: dict) -> dict:
    """The moments of the model `plan` cuts, restricted to the rows its weights keep. `model` gives the
    structure only (a meta-device model of the same config is enough); steps are per parameter and
    pass through."""
    return {"exp_avg": slice_state(model, plan, moments["exp_avg"]),
            "exp_avg_sq": slice_state(model, plan, moments["exp_avg_sq"]),
            "step": dict(moments["step"])}


def install_moments(optimizer: torch.optim.Optimizer, model: nn.Module, moments: dict) -> dict:
    """Put saved moments into a fresh AdamW over `model`'s parameters; return what was installed.

    Every moment must match its parameter's shape (else they belong to another model). A parameter
    without saved moments starts fresh, as in any new optimizer."""
    params = dict(model.named_parameters())
    unknown = sorted(set(moments["exp_avg"]) - set(params))
    if unknown:
        raise MomentsError(f"the saved moments name parameters this model lacks: {', '.join(unknown[:4])}")
    steps = []
    for name, p in params.items():
        if name not in moments["exp_avg"]:
            continue
        m, v = moments["exp_avg"][name], moments["exp_avg_sq"][name]
        if m.shape != p.shape or v.shape != p.shape:
            raise MomentsError(f"the saved moments of {name} have shape {tuple(m.shape)}, the parameter "
                               f"{tuple(p.shape)}: they were not sliced with this model's cut")
        step = float(moments["step"][name])
        # AdamW keeps `step` as a float32 scalar tensor on the CPU (unless capturable / fused).
        optimizer.state[p] = {"step": torch.tensor(step, dtype=torch.float32),
                              "exp_avg": m.to(p.device, p.dtype).clone(),
                              "exp_avg_sq": v.to(p.device, p.dtype).clone()}
        steps.append(step)
    return {"params": len(steps), "params_fresh": len(params) - len(steps),
            "max_step": max(steps) if steps else 0.0}
