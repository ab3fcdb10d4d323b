"""pcgpt's model package: a compact PC-GPT in pure PyTorch (no I/O, no tracking, no prints)."""

from .config import AttentionConfig, GPTConfig, PCConfig
from .gpt import GPT

__all__ = ["AttentionConfig", "GPTConfig", "PCConfig", "GPT"]
