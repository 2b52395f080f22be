"""Backbones: loading a causal LM (hub or local, no remote code) and the offline tiny GPT-NeoX."""
