"""Cheap, stable fingerprints of model and tokenizer directories.

Hashing a 80 GB checkpoint on every run is what users of DAG tools complain about, so a weight
file is fingerprinted by its name, size, its safetensors header (names, shapes, dtypes, offsets)
and sampled chunks of its data; configs and tokenizer files are hashed whole.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "merges.txt",
    "tokenizer.model", "added_tokens.json",
)
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")
_SAMPLES = 16
_CHUNK = 1 << 16


def _file_sample_digest(path: Path, h) -> None:
    size = path.stat().st_size
    h.update(f"{path.name}:{size}".encode())
    with open(path, "rb") as f:
        if path.suffix == ".safetensors" and size >= 8:
            header_len = int.from_bytes(f.read(8), "little")
            h.update(f.read(min(header_len, size - 8)))
        for i in range(_SAMPLES):
            f.seek(max(0, (size - _CHUNK) * i // max(1, _SAMPLES - 1)))
            h.update(f.read(_CHUNK))


def _config_digest(model_dir: Path, h) -> None:
    cfg_path = model_dir / "config.json"
    if not cfg_path.exists():
        raise FileNotFoundError(f"{model_dir} has no config.json: not a Hugging Face model directory")
    cfg = json.loads(cfg_path.read_text())
    # Fields that do not change what the weights compute.
    for volatile in ("transformers_version", "_name_or_path", "dtype", "torch_dtype"):
        cfg.pop(volatile, None)
    h.update(json.dumps(cfg, sort_keys=True).encode())


def model_fingerprint(model_dir: str | Path) -> str:
    model_dir = Path(model_dir)
    h = hashlib.sha256()
    _config_digest(model_dir, h)
    weights = sorted(p for p in model_dir.iterdir() if p.suffix in WEIGHT_SUFFIXES)
    if not weights:
        raise FileNotFoundError(f"{model_dir} holds no weight files (*.safetensors)")
    for p in weights:
        _file_sample_digest(p, h)
    return h.hexdigest()[:16]


def tokenizer_fingerprint(tokenizer_dir: str | Path) -> str:
    tokenizer_dir = Path(tokenizer_dir)
    h = hashlib.sha256()
    found = False
    for name in TOKENIZER_FILES:
        p = tokenizer_dir / name
        if p.exists():
            found = True
            h.update(name.encode())
            h.update(p.read_bytes())
    if not found:
        raise FileNotFoundError(f"{tokenizer_dir} has no tokenizer files ({', '.join(TOKENIZER_FILES[:2])}, ...)")
    return h.hexdigest()[:16]
