"""Parameter counts of Phi-3.5-MoE and its SlimMoE sizes, built on the meta device from configs.

    python benchmarks/phi_param_counts.py

Prints JSON: total / active / embedding counts for Phi-3.5-MoE and for it slimmed to the
Phi-mini-MoE (experts 960) and Phi-tiny-MoE (experts 448, 16 query / 4 KV heads) sizes, next to
the paper's reported numbers.
"""

import json

import transformers

from slimmoe.tasks.core.params import count_parameters_from_config
from slimmoe.tasks.slimming.config import SlimTargets
from slimmoe.tasks.slimming.surgery import slimmed_config

PHI_35_MOE = dict(
    vocab_size=32064, hidden_size=4096, intermediate_size=6400, num_hidden_layers=32, num_attention_heads=32,
    num_key_value_heads=8, num_local_experts=16, num_experts_per_tok=2, attention_bias=True, lm_head_bias=True,
    tie_word_embeddings=False, max_position_embeddings=131072,
)
PAPER = {"phi-3.5-moe": (41.9e9, 6.6e9), "phi-mini-moe": (7.6e9, 2.4e9), "phi-tiny-moe": (3.8e9, 1.1e9)}


def main() -> None:
    teacher = transformers.PhimoeConfig(**PHI_35_MOE)
    configs = {
        "phi-3.5-moe": teacher,
        "phi-mini-moe": slimmed_config(teacher, SlimTargets(expert_intermediate_size=960)),
        "phi-tiny-moe": slimmed_config(teacher, SlimTargets(expert_intermediate_size=448, num_key_value_heads=4)),
    }
    out = {}
    for name, cfg in configs.items():
        c = count_parameters_from_config(cfg)
        total_p, active_p = PAPER[name]
        out[name] = {
            "total": c["total"], "active": c["active"], "embedding": c["embedding"],
            "total_without_embeddings": c["total"] - c["embedding"],
            "paper_total": total_p, "paper_active": active_p,
            "total_vs_paper": round(c["total"] / total_p, 4), "active_vs_paper": round(c["active"] / active_p, 4),
            "num_attention_heads": cfg.num_attention_heads, "num_key_value_heads": cfg.num_key_value_heads,
            "expert_intermediate_size": cfg.intermediate_size,
        }
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
