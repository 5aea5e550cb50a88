"""The demo teacher's corpus and tokenizer: the standard library's source, split by a fixed rule,
and a byte-level BPE trained on its training files."""

from __future__ import annotations

import hashlib
import math
import sysconfig
from pathlib import Path

import torch

from slimmoe.tasks.data.packing import pack_documents
from slimmoe.tasks.pretraining.config import PretrainTeacherConfig

SPECIAL_TOKENS = ("<pad>", "<s>", "</s>")  # ids 0, 1, 2
PAD_ID, BOS_ID, EOS_ID = 0, 1, 2
# Directories under the stdlib path that are not the standard library's own source (third-party
# packages in a non-venv install) — always skipped.
_NOT_STDLIB = ("site-packages", "dist-packages", "__pycache__")


def source_files(cfg: PretrainTeacherConfig) -> tuple[Path, list[Path]]:
    """The corpus files in their fixed order: sorted relative paths, capped at max_text_bytes."""
    root = Path(cfg.source_dir) if cfg.source_dir else Path(sysconfig.get_paths()["stdlib"])
    if not root.is_dir():
        raise ValueError(f"source_dir {str(root)!r} is not a directory; point source_dir at a tree of *.py files")
    skip = set(cfg.exclude_dirs) | set(_NOT_STDLIB)
    files = sorted(
        (p for p in root.rglob("*.py") if p.is_file() and not skip.intersection(p.relative_to(root).parts[:-1])
         and not (cfg.exclude_top_level and p.parent == root)),
        key=lambda p: p.relative_to(root).as_posix(),
    )
    chosen, total = [], 0
    for p in files:
        if total >= cfg.max_text_bytes:
            break
        chosen.append(p)
        total += p.stat().st_size
    return root, chosen


def split_corpus(cfg: PretrainTeacherConfig) -> dict:
    root, files = source_files(cfg)
    train, val = [], []
    h = hashlib.sha256()
    for i, p in enumerate(files):
        text = p.read_text(encoding="utf-8", errors="replace")
        h.update(p.relative_to(root).as_posix().encode() + b"\0" + text.encode("utf-8") + b"\0")
        (val if i % cfg.validation_every == 0 else train).append(text)
    if len(train) < 1 or len(val) < 1:
        raise ValueError(
            f"the corpus at {root} gives {len(train)} training and {len(val)} validation files; "
            "raise max_text_bytes or lower validation_every"
        )
    return {
        "root": str(root), "train": train, "validation": val,
        "info": {"root": str(root), "files": len(files), "train_files": len(train), "validation_files": len(val),
                 "bytes": sum(len(t.encode("utf-8")) for t in train + val), "sha256": h.hexdigest()[:16]},
    }


def train_tokenizer(texts: list[str], vocab_size: int, model_max_length: int):
    """A byte-level BPE wrapped as a `transformers` fast tokenizer with bos/eos/pad set."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                   model_max_length=model_max_length)
    assert (fast.pad_token_id, fast.bos_token_id, fast.eos_token_id) == (PAD_ID, BOS_ID, EOS_ID)
    return fast


def pack_rows(tokenizer, texts: list[str], seq_len: int) -> torch.Tensor:
    """Documents joined with EOS after each and cut into full rows of seq_len: LongTensor [N, T]."""
    # The raw `tokenizers` backend: batched in Rust, and no max-length warning for whole files.
    docs = (enc.ids for enc in tokenizer.backend_tokenizer.encode_batch(texts, add_special_tokens=False))
    return torch.from_numpy(pack_documents(docs, seq_len, EOS_ID)).long()


def unigram_perplexity(train_rows: torch.Tensor, val_rows: torch.Tensor, vocab_size: int) -> float:
    """Perplexity of unigram frequencies (add-one smoothing, fit on the training tokens) on the same
    validation targets the model is scored on (every position but the first of each row)."""
    counts = torch.bincount(train_rows.flatten(), minlength=vocab_size).double() + 1.0
    logp = counts.log() - counts.sum().log()
    targets = val_rows[:, 1:].flatten()
    return math.exp(float(-logp[targets].mean()))
