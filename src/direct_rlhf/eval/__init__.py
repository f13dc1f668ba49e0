"""Evaluation: general capabilities (lm-eval-harness) and the project's own measurements."""
