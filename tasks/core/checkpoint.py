"""Loading and saving standard Hugging Face model directories (safetensors, config, tokenizer)."""

from __future__ import annotations

import copy
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

from slimmoe.tasks.core.fingerprint import TOKENIZER_FILES
from slimmoe.tasks.core.safetensors_files import SAFETENSORS_INDEX, check_safetensors
from slimmoe.tasks.core.storage import atomic_output_dir

# torch and transformers are imported where they are used, so importing this module stays cheap.
if TYPE_CHECKING:
    import torch
    from torch import nn


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
    if torch.device(device).type != "cpu":
        # Straight onto the device, tensor by tensor: through the host, eight teacher actors of a node
        # would each hold a whole copy of the teacher in host memory at once.
        return AutoModelForCausalLM.from_pretrained(Path(model_dir), device_map={"": torch.device(device)}, **kwargs)
    return AutoModelForCausalLM.from_pretrained(Path(model_dir), **kwargs)


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
