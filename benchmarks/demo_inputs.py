"""Inputs the benchmarks make when none are given: a scaled-down demo teacher and the standard
library's source tokenized with its tokenizer, split as the teacher's training split it."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch


def build_teacher(out_dir: Path, steps: int, log) -> Path:
    """A scaled-down demo teacher (the `slimmoe demo` recipe: PhiMoE, 8 experts, top-2, stdlib text)."""
    from slimmoe.tasks.nodes.pretrain_teacher import run_pretrain_teacher
    from slimmoe.tasks.pretraining.config import PretrainTeacherConfig

    cfg = PretrainTeacherConfig(max_steps=steps, max_text_bytes=2_000_000, warmup_steps=min(50, steps // 5),
                                eval_every=0, max_eval_rows=64, num_threads=torch.get_num_threads())
    log(f"building a teacher in {out_dir} ({steps} steps)")
    run_pretrain_teacher(cfg, out_dir, log=log)
    return out_dir


def build_data(teacher_dir: Path, out_dir: Path, seq_len: int, log, max_train_rows: Optional[int] = None) -> Path:
    """A tokenize-node output (train/ and validation/ token shards); `max_train_rows` caps the train split."""
    from transformers import AutoTokenizer

    from slimmoe.tasks.core.fingerprint import tokenizer_fingerprint
    from slimmoe.tasks.data.shards import write_tokenized_dataset
    from slimmoe.tasks.pretraining.config import PretrainTeacherConfig
    from slimmoe.tasks.pretraining.corpus import pack_rows, split_corpus

    corpus = split_corpus(PretrainTeacherConfig(max_text_bytes=2_000_000))
    tok = AutoTokenizer.from_pretrained(teacher_dir)
    rows = {split: pack_rows(tok, corpus[split], seq_len).numpy() for split in ("train", "validation")}
    if max_train_rows is not None:  # only the calibration and distillation budget are read; caching more costs time
        rows["train"] = rows["train"][:max_train_rows]
    manifest = write_tokenized_dataset(out_dir, rows, tokenizer_fingerprint(teacher_dir), tok.eos_token_id,
                                       vocab_size=len(tok), tokenizer_path=str(Path(teacher_dir).resolve()))
    log(f"tokenized data in {out_dir}: {manifest['splits']}")
    return out_dir
