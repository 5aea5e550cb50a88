"""Tiny MoE models and tokenizers built from configs for tests: no downloads."""

from __future__ import annotations

import sysconfig
from pathlib import Path

import torch
import transformers
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM

VOCAB = 96

# A demo teacher (`pretrain_teacher`) at test size; callers add max_steps / eval_every.
TINY_TEACHER = dict(max_text_bytes=300_000, validation_every=5, vocab_size=512, hidden_size=64, num_layers=2,
                    num_experts=4, expert_intermediate_size=64, seq_len=64, batch_size=8, warmup_steps=10,
                    log_every=10, eval_every=30, num_threads=1)


def tiny_config(family: str, vocab_size: int = VOCAB, **overrides):
    common = dict(vocab_size=vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, num_experts_per_tok=2, max_position_embeddings=256,
                  bos_token_id=1, eos_token_id=2, pad_token_id=0)
    if family == "phimoe":
        cfg = dict(common, intermediate_size=48, num_local_experts=4)
        cls = transformers.PhimoeConfig
    elif family == "mixtral":
        cfg = dict(common, intermediate_size=48, num_local_experts=4)
        cls = transformers.MixtralConfig
    elif family == "qwen2_moe":
        cfg = dict(common, intermediate_size=48, moe_intermediate_size=24, shared_expert_intermediate_size=40, num_experts=4)
        cls = transformers.Qwen2MoeConfig
    elif family == "qwen3_moe":
        cfg = dict(common, intermediate_size=48, moe_intermediate_size=24, num_experts=4, head_dim=8)
        cls = transformers.Qwen3MoeConfig
    elif family == "olmoe":
        cfg = dict(common, intermediate_size=48, num_experts=4)
        cls = transformers.OlmoeConfig
    elif family == "deepseek_v3":
        cfg = dict(common, intermediate_size=48, moe_intermediate_size=24, num_key_value_heads=4, n_routed_experts=4,
                   n_shared_experts=1, first_k_dense_replace=0, kv_lora_rank=8, q_lora_rank=None,
                   qk_rope_head_dim=4, qk_nope_head_dim=4, v_head_dim=8, n_group=1, topk_group=1)
        cls = transformers.DeepseekV3Config
    elif family == "gpt_oss":
        cfg = dict(common, intermediate_size=48, num_local_experts=4, head_dim=8)
        cls = transformers.GptOssConfig
    else:
        raise KeyError(family)
    cfg.update(overrides)
    return cls(**cfg)


FAMILIES = ["phimoe", "mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v3", "gpt_oss"]
HEAD_PRUNABLE = ["phimoe", "mixtral", "qwen2_moe", "qwen3_moe", "gpt_oss"]


def tiny_model(family: str = "phimoe", seed: int = 0, **overrides):
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(family, **overrides))
    with torch.no_grad():  # random weights so every structure matters (some families init biases to 0)
        for p in model.parameters():
            if p.dim() == 1 and p.abs().sum() == 0:
                p.normal_(0, 0.02)
    return model.eval()


def stdlib_texts(max_files: int = 40, max_chars: int = 4000) -> list[str]:
    """Python source from the standard library: text every Python installation carries."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in root.glob("*.py"))[:max_files]
    return [p.read_text(encoding="utf-8", errors="replace")[:max_chars] for p in files]


def train_tokenizer(out_dir: Path, texts: list[str], vocab_size: int = 320):
    """A byte-level BPE tokenizer saved as a `transformers` fast tokenizer directory."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<pad>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>")
    out_dir.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(out_dir)
    return fast


def save_tiny_model_dir(out_dir: Path, family: str = "phimoe", with_tokenizer: bool = True, seed: int = 0, **overrides) -> Path:
    if with_tokenizer:
        tok = train_tokenizer(out_dir, stdlib_texts())
        overrides.setdefault("vocab_size", len(tok))
    model = tiny_model(family, seed=seed, **overrides)
    model.save_pretrained(out_dir, safe_serialization=True)
    return out_dir


def checkpoint_tensors(model_dir: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a model directory's safetensors files, by stored name."""
    from safetensors import safe_open

    out = {}
    for f in sorted(model_dir.glob("*.safetensors")):
        with safe_open(str(f), "pt") as h:
            out.update({k: h.get_tensor(k) for k in h.keys()})
    return out


def save_fused(model, out: Path) -> Path:
    """The model's own state-dict names (fused experts), with its config."""
    model.save_pretrained(out)
    for f in out.glob("*.safetensors"):
        f.unlink()
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(out / "model.safetensors"),
              metadata={"format": "pt"})
    return out
