"""Progressive distillation: mixer alignment, hidden-state alignment, logit KD."""
