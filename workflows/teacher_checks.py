"""What the teacher's config.json and tokenizer already decide about a workflow's data and logits
settings: checked at validation, where they would otherwise fail only after the tokenize node has
read the whole corpus (a sequence longer than the teacher's context, a tokenizer larger than its
embedding, a top-k not below its vocabulary)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Optional

if TYPE_CHECKING:
    from .config import LoadedWorkflow, Problem


def _positive_int(value) -> Optional[int]:
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None


def _context_length(cfg_json: dict) -> tuple[Optional[int], str]:
    """The longest sequence the teacher's positions cover, and the RoPE scaling that extends it past
    max_position_embeddings ("" when none does). Some families write the scaled length as
    max_position_embeddings (DeepSeek-V3, Phi-3.5-MoE), others the native one with a scaling factor."""
    native = _positive_int(cfg_json.get("max_position_embeddings"))
    if native is None:
        return None, ""
    rope = cfg_json.get("rope_scaling") or cfg_json.get("rope_parameters")
    factor = rope.get("factor") if isinstance(rope, dict) else None
    if not isinstance(factor, (int, float)) or isinstance(factor, bool) or factor <= 1:
        return native, ""
    base = (_positive_int(rope.get("original_max_position_embeddings"))
            or _positive_int(cfg_json.get("original_max_position_embeddings")) or native)
    scaled = int(base * factor)
    if scaled <= native:
        return native, ""
    kind = rope.get("rope_type") or rope.get("type") or "RoPE"
    return scaled, f"{kind} RoPE scaling with factor {factor:g}"


def _tokenizer_size(model_dir: Path) -> Optional[int]:
    """How many token ids the tokenizer in `model_dir` can produce, read off tokenizer.json (the model's
    vocabulary and the added tokens) without loading it; None when there is no such file to read."""
    try:
        tok = json.loads((model_dir / "tokenizer.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    vocab = tok.get("model", {}).get("vocab") if isinstance(tok, dict) and isinstance(tok.get("model"), dict) else None
    if isinstance(vocab, dict):  # BPE, WordPiece, WordLevel: token -> id
        tokens, ids = set(vocab), [i for i in vocab.values() if isinstance(i, int)]
    elif isinstance(vocab, list):  # Unigram: [token, score] at its id
        tokens, ids = {str(v[0]) if isinstance(v, list) and v else str(v) for v in vocab}, [len(vocab) - 1]
    else:
        return None
    for added in tok.get("added_tokens") or []:
        if isinstance(added, dict):
            tokens.add(added.get("content"))
            if isinstance(added.get("id"), int):
                ids.append(added["id"])
    # Distinct tokens is what len(tokenizer) counts; the largest id is what the embedding must hold.
    return max(len(tokens), max(ids, default=-1) + 1)


def teacher_fit_checks(loaded: LoadedWorkflow, path: Path, cfg_json: dict, problems: list[Problem]) -> None:
    """What the external teacher's config.json and tokenizer already decide about the data and logits
    settings, which would otherwise fail only after the tokenize node read the whole corpus."""
    cfg = loaded.config
    limit, scaling = _context_length(cfg_json)
    seq_len = cfg.data.seq_len
    if limit is not None and seq_len > limit:
        native = cfg_json["max_position_embeddings"]
        reach = f", and its {scaling} reaches {limit}" if scaling else ""
        problems.append(loaded.problem(("data", "seq_len"),
                                       f"{seq_len} tokens is longer than the teacher's context: its config.json has "
                                       f"max_position_embeddings={native}{reach}; lower data.seq_len to at most {limit}"))
    rows = _positive_int(cfg_json.get("vocab_size"))
    if rows is None:
        return
    tokens = _tokenizer_size(path)
    if tokens is not None and tokens > rows:
        problems.append(loaded.problem(("teacher", "path"),
                                       f"the tokenizer in {path} has {tokens} tokens, more than the {rows} embedding rows "
                                       f"of the teacher's config.json (vocab_size={rows}); point teacher.path at a "
                                       "directory whose tokenizer.json belongs to its model"))
    _k_check(loaded, rows, "the teacher's config.json", problems)


def demo_teacher_fit_checks(loaded: LoadedWorkflow, pt, problems: list[Problem]) -> None:
    """The same for the demo teacher, whose context and vocabulary its own section sets (its tokenizer
    is trained to at most pretrain_teacher.vocab_size tokens)."""
    seq_len = loaded.config.data.seq_len
    if seq_len > pt.max_position_embeddings:
        problems.append(loaded.problem(("data", "seq_len"),
                                       f"{seq_len} tokens is longer than the teacher's context "
                                       f"(pretrain_teacher.max_position_embeddings={pt.max_position_embeddings}); lower "
                                       f"data.seq_len to at most {pt.max_position_embeddings} or raise "
                                       "pretrain_teacher.max_position_embeddings"))
    _k_check(loaded, pt.vocab_size, "pretrain_teacher.vocab_size", problems)


def _k_check(loaded: LoadedWorkflow, vocab: int, source: str, problems: list[Problem]) -> None:
    k = loaded.config.logits.k
    if k >= vocab:  # the teacher_logits node refuses it too, but only after tokenizing
        problems.append(loaded.problem(("logits", "k"),
                                       f"k={k} must be smaller than the teacher's vocabulary of {vocab} tokens "
                                       f"({source}); lower logits.k below {vocab}"))
