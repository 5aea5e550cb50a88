"""Loading and saving standard Hugging Face model directories (safetensors, config, tokenizer)."""

from __future__ import annotations

import copy
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

from slimmoe.tasks.core.fingerprint import TOKENIZER_FILES
from slimmoe.tasks.core.safetensors_files import SAFETENSORS_INDEX, check_safetensors
from slimmoe.tasks.core.storage import atomic_output_dir, write_json_atomic

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
    with no custom code (and serving engines by its architecture name). The directory appears only
    once complete."""
    out_dir = Path(out_dir)
    with atomic_output_dir(out_dir, overwrite=overwrite) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        use_hub_architecture(tmp)
        copy_tokenizer_files(tokenizer_from, tmp)
    return out_dir


def save_config(config, out_dir: str | Path) -> None:
    """`config.save_pretrained` with the family's Hub architecture name (`use_hub_architecture`)."""
    config.save_pretrained(out_dir)
    use_hub_architecture(out_dir)


def use_hub_architecture(model_dir: str | Path) -> None:
    """Put the family's Hub `architectures` name (`MoEAdapter.hub_architecture`) into the directory's
    config.json, where transformers wrote its own class name: PhiMoE checkpoints on the Hub, vLLM's
    model registry and llama.cpp's converter say `PhiMoEForCausalLM`, transformers writes
    `PhimoeForCausalLM`. Called on a directory still being written (before it is renamed into place)."""
    import json

    from slimmoe.tasks.core.adapters import ADAPTERS

    path = Path(model_dir) / "config.json"
    config = json.loads(path.read_text())
    adapter = ADAPTERS.get(config.get("model_type"))
    if adapter is None or adapter.hub_architecture is None or config.get("architectures") == [adapter.hub_architecture]:
        return
    config["architectures"] = [adapter.hub_architecture]
    write_json_atomic(path, config)


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
