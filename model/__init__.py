"""pcgpt's model package: a compact PC-GPT in pure PyTorch (no I/O, no tracking, no prints)."""

from .attention import CausalSelfAttention, KernelParams, attention, reference_attention
from .config import AttentionConfig, GPTConfig, PCConfig
from .generate import KVCache, decode_step, generate, prefill, sample
from .gpt import GPT
from .pc import PCGPT, build_model
from .utils import PEAK_FLOPS, count_params, flops_per_token, make_optimizer, mfu

__all__ = ["AttentionConfig", "GPTConfig", "PCConfig", "GPT", "PCGPT", "build_model", "CausalSelfAttention", "KernelParams",
           "attention", "reference_attention", "KVCache", "sample", "prefill", "decode_step", "generate",
           "PEAK_FLOPS", "count_params", "flops_per_token", "mfu", "make_optimizer"]
