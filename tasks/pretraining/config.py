"""The demo teacher's settings: corpus, tokenizer, PhiMoE shape and training schedule."""

from __future__ import annotations

from typing import Optional

from pydantic import Field, model_validator

from slimmoe.tasks.core.settings import OnOneDevice, TaskConfig


class PretrainTeacherConfig(OnOneDevice, TaskConfig):

    seed: int = 0
    # Corpus
    source_dir: Optional[str] = Field(None, description="directory of *.py files; default: this Python's stdlib")
    exclude_dirs: list[str] = Field(
        default_factory=lambda: ["test", "tests", "encodings", "pydoc_data", "idle_test"],
        description="directory names skipped anywhere in the tree (test suites, codec tables, doc dumps)",
    )
    # The demo scores its compressed models on the top-level modules (`${PYTHON_STDLIB}/*.py`): a
    # teacher that never read them gives a held-out number, not one on its own training text.
    exclude_top_level: bool = Field(False, description="skip the *.py files directly in source_dir (train on packages only)")
    max_text_bytes: int = Field(6_000_000, gt=0, description="stop adding files (in sorted order) past this many bytes")
    validation_every: int = Field(20, ge=2, description="file index % validation_every == 0 is held out")
    # Tokenizer
    vocab_size: int = Field(2048, ge=300)
    # Model (PhiMoE)
    hidden_size: int = Field(128, gt=0)
    num_layers: int = Field(4, gt=0)
    num_experts: int = Field(8, ge=2)
    experts_per_token: int = Field(2, ge=1)
    expert_intermediate_size: int = Field(256, gt=0, description="intermediate size of each expert")
    num_attention_heads: int = Field(4, gt=0)
    num_key_value_heads: int = Field(2, gt=0)
    max_position_embeddings: int = Field(4096, gt=0)
    # Training
    seq_len: int = Field(128, ge=8)
    batch_size: int = Field(16, gt=0)
    lr: float = Field(3e-3, gt=0)
    min_lr_ratio: float = Field(0.1, ge=0, le=1)
    warmup_steps: int = Field(50, ge=0)
    weight_decay: float = Field(0.01, ge=0)
    grad_clip: float = Field(1.0, gt=0)
    max_steps: int = Field(840, gt=0)
    time_budget_s: Optional[float] = Field(None, gt=0, description="stop after this many seconds (not reproducible)")
    # Runtime
    device: str = Field("auto", description="auto | cpu | cuda | cuda:N")
    num_threads: Optional[int] = Field(None, gt=0, description="torch CPU threads; fix it for bit-reproducible runs")
    experts_implementation: Optional[str] = Field(
        None, description="transformers experts kernel (eager | grouped_mm | batched_mm); None = library default"
    )
    log_every: int = Field(20, gt=0)
    eval_every: int = Field(200, ge=0, description="validation loss on eval_rows_during_training rows; 0 = off")
    eval_rows_during_training: int = Field(64, gt=0)
    eval_batch_size: int = Field(32, gt=0)
    max_eval_rows: Optional[int] = Field(None, gt=0, description="cap on validation rows for the final perplexity")

    @model_validator(mode="after")
    def _check(self):
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"hidden_size ({self.hidden_size}) must be divisible by num_attention_heads ({self.num_attention_heads})")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"num_attention_heads ({self.num_attention_heads}) must be a multiple of num_key_value_heads ({self.num_key_value_heads})")
        if self.experts_per_token > self.num_experts:
            raise ValueError(f"experts_per_token ({self.experts_per_token}) exceeds num_experts ({self.num_experts})")
        if self.seq_len > self.max_position_embeddings:
            raise ValueError(f"seq_len ({self.seq_len}) exceeds max_position_embeddings ({self.max_position_embeddings})")
        return self
