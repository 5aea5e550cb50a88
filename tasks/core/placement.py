"""Splitting a model over the devices of one machine: an explicit, balanced `device_map`.

`load_model(..., device_map=balanced_device_map(config, devices))` puts each decoder layer whole on
one device, in contiguous runs, so that every device holds about the same bytes: the embeddings
(and anything else outside the layers) on the first device, the final norm and the output head on
the last one with `reserve_bytes` more for what the forward leaves there (the logits and their
top-k buffers, which for a 32k vocabulary are gigabytes per batch). A tied head stays beside the
embedding it shares its weight with, and the reserve goes with it.

Why an explicit map and not `device_map="auto"`: "auto" fills the first GPU before the next and
knows nothing of the logits, so the first GPU runs out while the last sits half empty; and a map
that names its modules can be checked on a machine without GPUs (a map of "cpu" groups loads
through the same `from_pretrained(device_map=...)` path).
"""

from __future__ import annotations

from typing import Any, Sequence

from torch import nn

from slimmoe.tasks.core.adapters import get_adapter


def _meta_model(config):
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


def _numel(module) -> int:
    return sum(p.numel() for p in module.parameters())


def split_layers(layer_sizes: Sequence[int], n_devices: int, first_load: int = 0, last_load: int = 0) -> list[int]:
    """The device index of each layer: contiguous runs over `n_devices`, minimising the largest load,
    where device 0 already carries `first_load` and the last device `last_load` (same units)."""
    if n_devices < 1:
        raise ValueError(f"need at least one device, got {n_devices}")
    sizes = [int(s) for s in layer_sizes]

    def fill(cap: int) -> list[int] | None:
        loads = [0] * n_devices
        loads[0] += first_load
        loads[-1] += last_load
        if max(loads) > cap:
            return None
        out, d = [], 0
        for size in sizes:
            while loads[d] + size > cap:
                d += 1
                if d == n_devices:
                    return None
            loads[d] += size
            out.append(d)
        return out

    lo, hi = 0, first_load + last_load + sum(sizes)
    while lo < hi:  # the smallest cap a greedy contiguous fill meets is the optimal one
        mid = (lo + hi) // 2
        if fill(mid) is None:
            lo = mid + 1
        else:
            hi = mid
    return fill(lo)


def balanced_device_map(config, devices: Sequence[Any], reserve_bytes: int = 0, dtype_bytes: int = 2) -> dict[str, Any]:
    """A `device_map` ({module name: device}) for `from_pretrained` that splits the model of `config`
    over `devices` (GPU indices, or "cpu" entries to exercise the same path on CPU)."""
    devices = list(devices)
    if not devices:
        raise ValueError("balanced_device_map needs at least one device")
    model = _meta_model(config)
    layers = get_adapter(config).decoder_layers(model)
    names = {id(m): n for n, m in model.named_modules()}
    layers_name = names[id(layers)]
    inner_name = layers_name.rpartition(".")[0]  # the base model holding the layers ("model")
    inner = model.get_submodule(inner_name)
    last_names = [names[id(model.get_output_embeddings())]]
    if isinstance(getattr(inner, "norm", None), nn.Module):
        last_names.append(names[id(inner.norm)])
    tied = bool(getattr(config, "tie_word_embeddings", False))
    reserve = -(-int(reserve_bytes) // max(1, dtype_bytes))  # in parameters, the unit of the loads
    layer_sizes = [_numel(layer) for layer in layers]
    head_load = sum(_numel(model.get_submodule(n)) for n in last_names)
    rest_load = _numel(model) - sum(layer_sizes) - head_load  # embeddings and the like (a tied head counts here)
    if tied:  # the head's weight is the embedding's: both on device 0, with the reserve
        owner = split_layers(layer_sizes, len(devices), rest_load + head_load + reserve, 0)
    else:
        owner = split_layers(layer_sizes, len(devices), rest_load, head_load + reserve)
    # Every module outside the layers, the final norm and the head goes to the first device.
    device_map: dict[str, Any] = {}
    for prefix, parent in (("", model), (f"{inner_name}.", inner)):
        for name, _ in parent.named_children():
            full = prefix + name
            if full not in (inner_name, layers_name, *last_names):
                device_map[full] = devices[0]
    device_map.update({f"{layers_name}.{i}": devices[d] for i, d in enumerate(owner)})
    device_map.update({name: devices[0] if tied else devices[-1] for name in last_names})
    return device_map


def input_device(model):
    """Where a (possibly split) model wants its input ids: the device of its input embeddings."""
    return model.get_input_embeddings().weight.device
