"""Calibration batches for sensitivity scoring, from any data source `sources` recognises."""

from __future__ import annotations

from pathlib import Path

import torch

from slimmoe.tasks.data.packing import pack_documents
from slimmoe.tasks.data.sources import DataSource, DataSourceError, detect_source, iter_documents, read_token_rows


def load_tokenizer(tokenizer_dir: str | Path, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(tokenizer_dir), trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as err:
        raise DataSourceError(
            f"no tokenizer could be loaded from {tokenizer_dir} ({err}); text data needs the model's tokenizer files"
        ) from err


def calibration_batches(
    data: str | Path | DataSource,
    num_batches: int,
    batch_size: int,
    seq_len: int,
    tokenizer_dir: str | Path | None = None,
    text_field: str = "text",
) -> list[torch.Tensor]:
    """`num_batches` LongTensors of shape [batch_size, seq_len] (fewer if the data runs out)."""
    source = data if isinstance(data, DataSource) else detect_source(data)
    wanted = num_batches * batch_size
    if source.kind == "token_shards":
        rows = [r[:seq_len] for r in read_token_rows(source, limit=wanted)]
    else:
        if tokenizer_dir is None:
            raise DataSourceError(f"{source.root} is {source.kind} data: scoring on text needs the model's tokenizer")
        tok = load_tokenizer(tokenizer_dir)
        docs = (tok(doc, add_special_tokens=False)["input_ids"] for doc in iter_documents(source, text_field))
        rows = pack_documents(docs, seq_len, tok.eos_token_id, max_rows=wanted).tolist()
    if not rows:
        raise DataSourceError(f"data at {source.root} yields no full sequence of {seq_len} tokens; give more text or a smaller seq_len")
    tensor = torch.tensor(rows, dtype=torch.long)
    return [tensor[i : i + batch_size] for i in range(0, len(rows), batch_size)]
