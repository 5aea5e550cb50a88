"""Loading and saving standard Hugging Face model directories (safetensors, config, tokenizer)."""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

from slimmoe.tasks.core.fingerprint import TOKENIZER_FILES
from slimmoe.tasks.core.storage import atomic_output_dir

# torch and transformers are imported where they are used: the workflow's validation calls
# `check_safetensors` and must not spend seconds importing them.
if TYPE_CHECKING:
    import torch
    from torch import nn

SAFETENSORS_INDEX = "model.safetensors.index.json"


class BrokenCheckpointError(ValueError):
    """A model directory whose safetensors files cannot be loaded: truncated, not safetensors, or missing."""


def _check_safetensors_file(path: Path) -> None:
    """The file holds exactly what its header describes (safetensors refuses anything else)."""
    again = "; copy or download it again"
    size = path.stat().st_size
    if size < 8:
        raise BrokenCheckpointError(f"{path} is truncated: {size} bytes, not even the 8-byte header length{again}")
    with open(path, "rb") as f:
        header_len = int.from_bytes(f.read(8), "little")
        if 8 + header_len > size:
            raise BrokenCheckpointError(f"{path} is truncated: {size} bytes, but its header alone is {8 + header_len} "
                                        f"bytes (or it is not a safetensors file){again}")
        raw = f.read(header_len)
    try:
        header = json.loads(raw)
        ends = [int(t["data_offsets"][1]) for name, t in header.items() if name != "__metadata__"]
    except (ValueError, TypeError, KeyError, IndexError, AttributeError):
        raise BrokenCheckpointError(f"{path} is not a safetensors file (its header is not a safetensors "
                                    f"tensor table){again}") from None
    expected = 8 + header_len + max(ends, default=0)
    if size < expected:
        raise BrokenCheckpointError(f"{path} is truncated: {size} bytes, but its header describes {expected} bytes "
                                    f"({expected - size} missing){again}")
    if size > expected:
        raise BrokenCheckpointError(f"{path} is corrupt: {size} bytes, {size - expected} more than the {expected} "
                                    f"its header describes{again}")


def check_safetensors(model_dir: str | Path) -> list[Path]:
    """Check the weights `load_model` would read, from their headers only (no tensor is read): each
    file an index names exists, and each file has the size its header implies. Returns the files;
    raises BrokenCheckpointError naming the file."""
    model_dir = Path(model_dir)
    index = model_dir / SAFETENSORS_INDEX
    if index.is_file():
        try:
            names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (ValueError, TypeError, KeyError, AttributeError):
            raise BrokenCheckpointError(f"{index} is not a safetensors index (a JSON object with a weight_map); "
                                        "copy or download it again") from None
        files = [model_dir / n for n in names]
        missing = [n for n, f in zip(names, files) if not f.is_file()]
        if missing:
            raise BrokenCheckpointError(f"{index} names {len(missing)} file(s) that {model_dir} lacks: "
                                        f"{', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}; "
                                        "copy or download the missing shards")
    else:
        files = sorted(model_dir.glob("*.safetensors"))
        if not files:
            raise BrokenCheckpointError(f"{model_dir} holds no *.safetensors weights; save the model with "
                                        "safe_serialization=True (slimmoe loads safetensors only)")
    for f in files:
        _check_safetensors_file(f)
    return files


class CheckpointTensors:
    """A checkpoint's tensors under the model's own names, read a dim-0 row range at a time without
    loading whole files. Fused expert tensors the checkpoint stores one expert at a time (as
    transformers 5 saves them) are assembled from just the experts asked for."""

    def __init__(self, model_dir: str | Path, adapter):
        from safetensors import safe_open

        self.model_dir, self.adapter = Path(model_dir), adapter
        self.where: dict[str, Path] = {}
        for f in check_safetensors(self.model_dir):
            with safe_open(str(f), "pt") as h:
                self.where.update({name: f for name in h.keys()})

    def _read(self, name: str, start: int | None = None, end: int | None = None):
        """Rows of one tensor. The file is opened for this read only: safetensors maps it, and every
        page a read touches would otherwise stay resident until the whole load is done."""
        from safetensors import safe_open

        with safe_open(str(self.where[name]), "pt") as h:
            piece = h.get_slice(name)
            return piece[start:end] if start is not None else piece[:]

    def _shape(self, name: str) -> tuple[int, ...]:
        from safetensors import safe_open

        with safe_open(str(self.where[name]), "pt") as h:
            return tuple(h.get_slice(name).get_shape())

    def _per_expert(self, model_name: str) -> tuple[list[str], str] | None:
        """(on-disk names per expert for one fused tensor, which part) when the checkpoint splits it."""
        names = self.adapter.checkpoint_expert_names
        for fused, parts in (("gate_up_proj", names[:2] if names else None), ("down_proj", names[2:] if names else None)):
            if parts and model_name.endswith(".experts." + fused):
                prefix = self.adapter.checkpoint_name(model_name[: -len(fused)])
                return [prefix + "{e}." + p + ".weight" for p in parts], fused
        return None

    def has(self, model_name: str) -> bool:
        if model_name in self.where or self.adapter.checkpoint_name(model_name) in self.where:
            return True
        split = self._per_expert(model_name)
        return split is not None and split[0][0].format(e=0) in self.where

    def shape(self, model_name: str) -> tuple[int, ...]:
        for name in (model_name, self.adapter.checkpoint_name(model_name)):
            if name in self.where:
                return self._shape(name)
        patterns, _ = self._per_expert(model_name)
        n = 0
        while patterns[0].format(e=n) in self.where:
            n += 1
        first = [self._shape(p.format(e=0)) for p in patterns]
        return (n, sum(s[0] for s in first), *first[0][1:])

    def rows(self, model_name: str, start: int, end: int):
        """Rows [start, end) along dim 0 (for fused experts: experts start..end-1) in the model's layout."""
        import torch

        for name in (model_name, self.adapter.checkpoint_name(model_name)):
            if name in self.where:
                return self._read(name, start, end)
        split = self._per_expert(model_name)
        if split is None or not self.has(model_name):
            raise KeyError(f"{self.model_dir} stores no tensor for {model_name} (looked for "
                           f"{self.adapter.checkpoint_name(model_name)} and per-expert tensors)")
        patterns, _ = split
        # gate rows first, then up: the fused layout of gate_up_proj [E, 2I, H]
        experts = [torch.cat([self._read(p.format(e=e)) for p in patterns], dim=0) for e in range(start, end)]
        return torch.stack(experts) if experts else torch.empty((0, *self.shape(model_name)[1:]))

    def full(self, model_name: str):
        return self.rows(model_name, 0, self.shape(model_name)[0])


def load_config(model_dir: str | Path, trust_remote_code: bool = False):
    from transformers import AutoConfig

    from slimmoe.tasks.core.adapters import get_adapter

    model_dir = Path(model_dir)
    if not (model_dir / "config.json").exists():
        raise FileNotFoundError(f"{model_dir} is not a Hugging Face model directory (no config.json)")
    config = AutoConfig.from_pretrained(model_dir, trust_remote_code=trust_remote_code)
    get_adapter(config)  # unsupported architectures fail here, before any weights are read
    return config


def load_model(model_dir: str | Path, dtype: torch.dtype | None = None, device: str | torch.device = "cpu",
               trust_remote_code: bool = False, experts_implementation: str | None = None,
               device_map: dict | str | None = None) -> nn.Module:
    """The model of a Hugging Face directory on `device`, or split over several by `device_map`
    ({module: device}, e.g. `core.placement.balanced_device_map`; then `device` is not used)."""
    import torch
    from transformers import AutoModelForCausalLM

    load_config(model_dir, trust_remote_code)
    # A truncated file otherwise fails deep inside from_pretrained (in a Ray actor: as ActorDiedError)
    # with a message that does not name it.
    check_safetensors(model_dir)
    kwargs = {"dtype": dtype or torch.float32, "trust_remote_code": trust_remote_code, "use_safetensors": True}
    if experts_implementation:
        kwargs["experts_implementation"] = experts_implementation
    if device_map is not None:
        # Loaded straight to each module's device (never whole on one), with hooks that move the
        # activations between devices.
        return AutoModelForCausalLM.from_pretrained(Path(model_dir), device_map=device_map, **kwargs)
    model = AutoModelForCausalLM.from_pretrained(Path(model_dir), **kwargs)
    return model.to(device)


def has_tokenizer(model_dir: str | Path) -> bool:
    """Whether the directory holds any tokenizer file (a model saved without one has none)."""
    return any((Path(model_dir) / name).exists() for name in TOKENIZER_FILES)


def copy_tokenizer_files(src: str | Path | None, dst: str | Path) -> list[str]:
    if src is None:
        return []
    copied = []
    for name in TOKENIZER_FILES:
        p = Path(src) / name
        if p.exists():
            shutil.copy2(p, Path(dst) / name)
            copied.append(name)
    return copied


def copy_model_dir(src: str | Path, dst: str | Path, overwrite: bool = False) -> Path:
    """Copy a model directory's config, safetensors weights (and index) and tokenizer file by file;
    `dst` appears only once complete."""
    src, dst = Path(src), Path(dst)
    names = ["config.json", "generation_config.json", SAFETENSORS_INDEX] + [f.name for f in check_safetensors(src)]
    with atomic_output_dir(dst, overwrite=overwrite) as tmp:
        for name in names:
            if (src / name).is_file():
                shutil.copy2(src / name, tmp / name)
        copy_tokenizer_files(src, tmp)
    return dst


def save_model_dir(model: nn.Module, out_dir: str | Path, tokenizer_from: str | Path | None = None,
                   overwrite: bool = False) -> Path:
    """Write `model` as a Hugging Face directory that `AutoModelForCausalLM.from_pretrained` loads
    with no custom code. The directory appears only once complete."""
    out_dir = Path(out_dir)
    with atomic_output_dir(out_dir, overwrite=overwrite) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        copy_tokenizer_files(tokenizer_from, tmp)
    return out_dir


def build_from_state(config, state: dict[str, torch.Tensor], buffers_from: nn.Module) -> nn.Module:
    """A model of `config` holding `state`, built on the meta device so no memory is spent on an init
    that is overwritten at once. Non-persistent buffers (rotary tables) come from `buffers_from`."""
    import torch
    from transformers import AutoModelForCausalLM

    dtype = next(iter(state.values())).dtype
    with torch.device("meta"):
        new = AutoModelForCausalLM.from_config(config, dtype=dtype)
    missing, unexpected = new.load_state_dict(state, strict=False, assign=True)
    tied = set(getattr(new, "_tied_weights_keys", None) or {}) if getattr(config, "tie_word_embeddings", False) else set()
    missing = [k for k in missing if k not in tied]
    if missing or unexpected:
        raise RuntimeError(f"slimmed state does not match the slimmed config: missing {missing}, unexpected {unexpected}")
    if tied:
        new.tie_weights()
    old_buffers = dict(buffers_from.named_buffers())
    for name, buf in list(new.named_buffers()):
        if buf.is_meta:
            owner_name, _, attr = name.rpartition(".")
            owner = new.get_submodule(owner_name) if owner_name else new
            owner._buffers[attr] = old_buffers[name].clone()
    new.eval()
    new.train(buffers_from.training)
    if hasattr(buffers_from, "generation_config"):
        new.generation_config = copy.deepcopy(buffers_from.generation_config)
    return new
