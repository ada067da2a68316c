"""Evaluation: held-out loss and per-client fairness."""
