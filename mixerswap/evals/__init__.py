"""Evaluation: lm-eval harness, perplexity, long-context probes, speed and memory."""
