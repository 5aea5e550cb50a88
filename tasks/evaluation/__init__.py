"""Evaluation components: the evaluate config, perplexity / KL / throughput metrics, lm-eval-harness tasks."""
