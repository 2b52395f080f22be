"""Evaluation of exit policies: token level, lm-evaluation-harness, offline tasks."""
