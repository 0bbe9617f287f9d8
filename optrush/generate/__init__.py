"""Sampling text from a causal LM: `generate` (token ids) and `generate_text` (strings)."""
from optrush.generate.sample import generate, generate_text

__all__ = ["generate", "generate_text"]
