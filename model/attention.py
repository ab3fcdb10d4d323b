"""Precision-weighted causal self-attention (DESIGN §3), with RoPE, QK-norm and GQA.

Each head scores key j for query i by the log-likelihood of the query under a
distribution centred on the key, with precision λ (inverse variance) and
d² = ‖q_i − k_j‖²:

    dot        ℓ = λ q·k                      (λ = 1/√D fixed: ordinary attention)
    gaussian   ℓ = −(λ/2) d²
    student_t  ℓ = −((ν+D)/2) log(1 + λ d²/ν)  ν learned per head, ν = softplus(·) > 0
    laplace    ℓ = −√(λ d² + ε)
    mixture    ℓ = log Σ_c π_c N(q; k, λ_c⁻¹ I) = logsumexp_c [log π_c + (D/2) log λ_c − (λ_c/2) d²]

Precision modes: `fixed` λ = 1/√D (mixture: λ_c = 4^(c − (C−1)/2)/√D, uniform π;
no learnable parameter), `head` a learned log-precision per head (and per
component), `token` λ_i = exp(w·x_i + b_h) from a zero-initialised projection
of the query token (so it starts equal to `head`). Every λ is clamped to
[attention.precision_min, attention.precision_max]; ν to [NU_MIN, NU_MAX].
The clamps are hard (zero gradient outside): they bound the kernels, they are
not a prior.

How each kernel runs (`attention(..., impl="auto")`):
- CUDA, T == S, no extra mask, a bf16/fp16/fp32 head dim of 16…128: `gaussian`,
  `student_t`, `laplace` and `mixture` run in the Triton flash kernels of
  triton_attention.py, which compute each score inline from q·k and the fp32 norms
  ‖q‖², ‖k‖² (no augmented head dims), mixture with its C components inside one pass,
  forward and backward (q, k, v and every precision parameter), as torch custom ops
  that torch.compile and CUDA graphs take. `dot` stays on SDPA's flash kernel.
- Otherwise (CPU, cached decoding with T < S, a ragged-batch mask, other head dims):
  `dot`, `gaussian` and `mixture` run through SDPA on augmented inputs, `student_t`
  and `laplace` through the exact O(T·S) reference:
  - `gaussian`: SDPA on augmented q' = [λq, −λ/2], k' = [k, ‖k‖²], scale 1: the raw
    score is λq·k − (λ/2)‖k‖², which differs from −(λ/2)d² by −(λ/2)‖q‖², constant
    over keys, so the softmax is the same.
  - `mixture`: SDPA over C×keys: block-diagonal q' = ⊕_c [λ_c q, −λ_c/2, b_c],
    k'_(c,j) = e_c ⊗ [k_j, ‖k_j‖², 1], values repeated C times, with the per-query
    bias b_c = −(λ_c/2)‖q‖² + (D/2) log λ_c + log π_c (the ‖q‖² term does not cancel
    across components). Softmax over (j, c) summed over c is the mixture's softmax.
  Augmented head dims are zero-padded to a multiple of 8 so SDPA's fused kernels accept
  them; zero columns change nothing. In bf16 each norm / bias column is stored as two
  columns hi + lo (`_split`): a single bf16 ‖k‖² ≈ D would put an error of ~D·2⁻⁹
  into every score.
`impl=` forces one path (`triton`, `sdpa`, `reference`): the benchmark and the tests
compare them. Inside `twice_differentiable()` (pc's `settle`, which differentiates
through attention twice) `auto` takes paths with a double backward: SDPA's math
backend, and the reference for student_t/laplace.

Attention settling (`attention.settle_steps`): before the output is taken, the
queries move toward the keys that explain them, q ← q + rate·(Σ_j a_ij k_j − q),
with a_ij ∝ p_ij w_ij, w_ij = −∂ℓ_ij/∂q / (λ(q − k_j)) — the EM / mean-shift
(IRLS for student_t and laplace, Hopfield retrieval for dot: Ramsauer et al.
2020) fixed-point step of the energy E(q) = −log Σ_j exp ℓ_ij. The target is an
attention with values = keys and score ℓ + log w, so it runs on the same fast
paths. Each query only sees keys j ≤ i, which do not depend on the queries, so
with a KV cache (past keys and values frozen) only the new queries move and
cached generation equals uncached generation.
"""

from __future__ import annotations

import contextlib
import importlib.util
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from .config import GPTConfig

NU_MIN, NU_MAX = 0.1, 1e4
"""Clamp of Student-t's ν: below 0.1 the tails are so heavy every key looks alike;
above 1e4 the kernel equals the Gaussian to float precision."""
MIXTURE_SPREAD = 4.0
"""`mixture` components start at precisions 1/√D · 4^(c − (C−1)/2): one sharp and one
broad kernel for C=2, so the components differ from step 0."""


def rotary_tables(seq_len: int, head_dim: int, base: float, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin of shape (seq_len, head_dim/2) for RoPE (Su et al. 2021)."""
    inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float32, device=device) / head_dim))
    t = torch.arange(seq_len, dtype=torch.float32, device=device)
    freqs = torch.outer(t, inv_freq)  # (T, D/2)
    return freqs.cos(), freqs.sin()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (x1, x2) of the last dim. x: (B, H, T, D); cos/sin broadcast to (B|1, 1, T, D/2)."""
    d = x.shape[-1] // 2
    x1, x2 = x[..., :d], x[..., d:]
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    return torch.cat([x1 * cos + x2 * sin, x2 * cos - x1 * sin], dim=-1)


# -- the kernels as functions of (q, k, v, precision) ----------------------------------------

@dataclass
class KernelParams:
    """What a kernel needs besides q, k, v (all fp32, already clamped).

    lam: precision λ, shape (B|1, H|1, T|1, C) with C = 1 except for `mixture`
      (for `dot`, λ is the scale of q·k).
    nu: Student-t degrees of freedom, (H,).
    log_mix: mixture log-weights log π_c, (H, C) (None = uniform).
    eps: Laplace's ε.
    """

    kernel: str
    lam: torch.Tensor
    nu: torch.Tensor | None = None
    log_mix: torch.Tensor | None = None
    eps: float = 1e-6
    fixed_scale: float | None = None
    """`dot` with fixed precision: λ as a Python float, so SDPA takes it as its scale."""


def causal_mask(T: int, S: int, device=None) -> torch.Tensor:
    """(T, S) bool, True where query i (at position S−T+i) may attend to key j."""
    return torch.ones(T, S, dtype=torch.bool, device=device).tril(diagonal=S - T)


def _common_width(*xs: torch.Tensor) -> list[torch.Tensor]:
    """Zero-pad the last dims of augmented q', k' and v to one multiple of 8: equal head
    dims keep SDPA's flash kernel eligible, and zero columns change neither the scores
    nor the outputs (v may be wider than q', e.g. the identity used for attention maps)."""
    width = -(-max(x.shape[-1] for x in xs) // 8) * 8
    return [F.pad(x, (0, width - x.shape[-1])) for x in xs]


def _split(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """An fp32 column (…, 1) as two columns [hi, lo] in `dtype` with hi + lo ≈ x to ~2⁻¹⁶ relative.

    The augmented norms (‖k‖² ≈ D) are large next to the score differences: one bf16
    column would carry an absolute error of ~D·2⁻⁹ into every score. Each split column
    meets the same coefficient on the other side, so the product sums hi + lo in fp32.
    In fp32 lo is exactly 0. Gradients flow through hi (lo's derivative is 0)."""
    hi = x.to(dtype)
    return torch.cat([hi, (x - hi.float()).to(dtype)], dim=-1)


def _expand_kv(x: torch.Tensor, n_head: int) -> torch.Tensor:
    """(B, Hkv, S, D) -> (B, H, S, D): query head h uses kv head h // (H/Hkv), as SDPA's enable_gqa."""
    return x if x.shape[1] == n_head else x.repeat_interleave(n_head // x.shape[1], dim=1)


def _log_mix(p: KernelParams, H: int, C: int, device) -> torch.Tensor:
    """log π as (1, H, 1, C)."""
    if p.log_mix is None:
        return torch.full((1, 1, 1, C), -math.log(C), device=device)
    return p.log_mix.view(1, H, 1, C)


def _squared_distances(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """‖q_i − k_j‖², fp32. CPU: by differences (torch.cdist without the matmul trick).
    CUDA, and inside twice_differentiable() (cdist has no double backward): the expansion
    ‖q‖² + ‖k‖² − 2q·k in fp64, exact to fp32 precision (cdist's CUDA kernel is avoided:
    it faulted on the benchmark's 96×1024×1024 batch)."""
    if not q.is_cuda and not _twice_differentiable:
        return torch.cdist(q, k, compute_mode="donot_use_mm_for_euclid_dist").square()
    q, k = q.double(), k.double()
    d2 = q.square().sum(-1, keepdim=True) + k.square().sum(-1).unsqueeze(-2) - 2 * q @ k.transpose(-2, -1)
    return d2.clamp_min(0).float()


def reference_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, p: KernelParams,
                        mask: torch.Tensor | None = None, settle: bool = False) -> torch.Tensor:
    """The definition: explicit (T × S) scores from d² = ‖q − k‖² computed by differences.

    q (B, H, T, D), k/v (B, Hkv, S, D); the T queries are the last T positions.
    `mask` (B|1, 1, T, S) bool replaces the causal mask when given. `settle=True`
    returns the settling target (score ℓ + log w, values = whatever v is passed).
    O(T·S) memory: the CPU path of student_t/laplace and the tests' ground truth.
    """
    B, H, T, D = q.shape
    S = k.shape[-2]
    k, v = _expand_kv(k, H), _expand_kv(v, H)
    qf, kf, lam = q.float(), k.float(), p.lam
    if p.kernel == "dot":
        s = (qf @ kf.transpose(-2, -1)) * lam[..., :1]
    else:
        d2 = _squared_distances(qf, kf)                                  # (B, H, T, S)
        if p.kernel == "gaussian":
            s = -0.5 * lam[..., :1] * d2
        elif p.kernel == "student_t":
            nu = p.nu.view(1, H, 1, 1)
            alpha = (nu + D) / 2 + (1.0 if settle else 0.0)
            s = -alpha * torch.log1p(lam[..., :1] * d2 / nu)
        elif p.kernel == "laplace":
            u = lam[..., :1] * d2 + p.eps
            s = -u.sqrt() - (0.5 * u.log() if settle else 0.0)
        elif p.kernel == "mixture":
            C = lam.shape[-1]
            lam_c = lam.unsqueeze(-2)                                     # (B|1, H|1, T|1, 1, C)
            s_c = (_log_mix(p, H, C, q.device).unsqueeze(-2) + 0.5 * D * lam_c.log()
                   - 0.5 * lam_c * d2.unsqueeze(-1))                      # (B, H, T, S, C)
            if settle:
                s_c = s_c + lam_c.log()
            s = s_c.logsumexp(-1)
        else:
            raise ValueError(f"attention.kernel={p.kernel!r}: unknown")
    allowed = causal_mask(T, S, q.device) if mask is None else mask
    s = s.masked_fill(~allowed, float("-inf"))
    return (s.softmax(-1).to(v.dtype) @ v).to(q.dtype)


def _sdpa(qa: torch.Tensor, ka: torch.Tensor, va: torch.Tensor, mask: torch.Tensor | None,
          scale: float | None) -> torch.Tensor:
    T, S = qa.shape[-2], ka.shape[-2]
    gqa = qa.shape[1] != ka.shape[1]
    if mask is None and T == S:
        return F.scaled_dot_product_attention(qa, ka, va, is_causal=True, scale=scale, enable_gqa=gqa)
    if mask is None:
        mask = causal_mask(T, S, qa.device)
    return F.scaled_dot_product_attention(qa, ka, va, attn_mask=mask, scale=scale, enable_gqa=gqa)


def _dot(q, k, v, p: KernelParams, mask, settle: bool) -> torch.Tensor:
    # Plain dot (fixed λ = 1/√D) keeps SDPA's own scaling so the flash path is untouched.
    if p.fixed_scale is not None:
        return _sdpa(q, k, v, mask, scale=p.fixed_scale)
    return _sdpa(q * p.lam.to(q.dtype), k, v, mask, scale=1.0)


def _gaussian(q, k, v, p: KernelParams, mask, settle: bool) -> torch.Tensor:
    lam = p.lam.to(q.dtype)
    half = (-0.5 * lam).expand(*q.shape[:-1], 1)
    qa = torch.cat([q * lam, half, half], dim=-1)                                    # (B, H, T, D+2)
    ka = torch.cat([k, _split(k.float().square().sum(-1, keepdim=True), k.dtype)], dim=-1)  # [k, ‖k‖² hi, lo]
    return _sdpa(*_common_width(qa, ka, v), mask, scale=1.0)[..., :v.shape[-1]]


def _mixture(q, k, v, p: KernelParams, mask, settle: bool) -> torch.Tensor:
    B, H, T, D = q.shape
    S, C = k.shape[-2], p.lam.shape[-1]
    lam = p.lam                                                                  # (B|1, H|1, T|1, C)
    bias = (-0.5 * lam * q.float().square().sum(-1, keepdim=True) + 0.5 * D * lam.log()
            + _log_mix(p, H, C, q.device))
    if settle:
        bias = bias + lam.log()
    lam_q = lam.to(q.dtype)
    half = (-0.5 * lam_q).expand(B, H, T, C).unsqueeze(-1)
    qa = torch.cat([q.unsqueeze(-2) * lam_q.unsqueeze(-1),                        # (B, H, T, C, D)
                    half, half, _split(bias.unsqueeze(-1), q.dtype)], dim=-1).flatten(-2)  # (B, H, T, C(D+4))
    one = torch.ones_like(k[..., :1])
    base = torch.cat([k, _split(k.float().square().sum(-1, keepdim=True), k.dtype), one, one], dim=-1)
    eye = torch.eye(C, dtype=k.dtype, device=k.device)
    ka = torch.einsum("bhsd,ce->bhcsed", base, eye).flatten(-2).flatten(2, 3)    # (B, Hkv, C·S, C(D+4))
    va = v.repeat(1, 1, C, 1)                                                    # (B, Hkv, C·S, D)
    allowed = causal_mask(T, S, q.device) if mask is None else mask
    allowed = allowed.repeat(*([1] * (allowed.dim() - 1)), C)                    # (…, T, C·S)
    return _sdpa(*_common_width(qa, ka, va), allowed, scale=1.0)[..., :v.shape[-1]]


_FAST = {"dot": _dot, "gaussian": _gaussian, "mixture": _mixture}
IMPLS = ("auto", "triton", "sdpa", "reference")

_twice_differentiable = False


@contextlib.contextmanager
def twice_differentiable():
    """Attention with a double backward inside this block: `impl="auto"` runs `dot`, `gaussian`
    and `mixture` through SDPA's math backend and `student_t`, `laplace` through the reference
    (the Triton and flash kernels have first derivatives only). For pc's `settle`, which
    differentiates through the settling steps' gradients."""
    global _twice_differentiable
    outer = _twice_differentiable
    _twice_differentiable = True
    try:
        with sdpa_kernel([SDPBackend.MATH]):
            yield
    finally:
        _twice_differentiable = outer


_HAS_TRITON = importlib.util.find_spec("triton") is not None
_TRITON = None  # model.triton_attention once imported


def _triton_module():
    """model.triton_attention, or None without triton. Imported when this module is, where a
    GPU is present (so torch.compile never traces the import); without one on first use, as
    triton.jit reads TRITON_INTERPRET at import (the CPU tests set it)."""
    global _TRITON
    if _TRITON is None and _HAS_TRITON:
        from . import triton_attention
        _TRITON = triton_attention
    return _TRITON


if _HAS_TRITON and torch.cuda.is_available():
    _triton_module()


def _triton_params(q: torch.Tensor, p: KernelParams, settle: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The Triton kernels' per-row parameters p1, p2, fp32 (B|1, H|1, T|1, C): λ for dot,
    gaussian, laplace; β = λ/ν and α = (ν+D)/2 (+1 settling) for student_t; λ_c and
    b_c = log π_c + (D/2 (+1 settling)) log λ_c for mixture (triton_attention's docstring)."""
    H, D = q.shape[1], q.shape[-1]
    lam, extra = p.lam, 1.0 if settle else 0.0  # already fp32 (KernelParams)
    if p.kernel == "student_t":
        nu = p.nu.view(1, H, 1, 1)
        return lam / nu, 0.5 * nu + (D / 2 + extra)
    if p.kernel == "mixture":
        if p.log_mix is None:  # uniform π
            return lam, lam.log() * (D / 2 + extra) - math.log(lam.shape[-1])
        return lam, torch.add(p.log_mix.view(1, H, 1, -1), lam.log(), alpha=D / 2 + extra)
    return lam[..., :1], lam[..., :1]


def _autocast(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Under CUDA autocast the Triton path runs in the autocast dtype, as SDPA does (autocast
    does not cast a custom op's inputs; with qk_norm, q and k arrive in fp32, v in bf16)."""
    if q.is_cuda and torch.is_autocast_enabled("cuda"):
        dtype = torch.get_autocast_dtype("cuda")
        return q.to(dtype), k.to(dtype), v.to(dtype)
    return q, k, v


def _triton(q, k, v, p: KernelParams, mask, settle: bool) -> torch.Tensor:
    if mask is not None:
        raise ValueError("the triton path takes plain causal self-attention (T == S, no mask)")
    q, k, v = _autocast(q, k, v)
    p1, p2 = _triton_params(q, p, settle)
    return _triton_module().flash_attention(q, k, v, p.kernel, p1, p2, settle, p.eps)


def _auto(q, k, v, p: KernelParams, mask) -> str:
    """The path `impl="auto"` takes (module docstring)."""
    if _twice_differentiable:
        return "sdpa" if p.kernel in _FAST else "reference"
    ta = _triton_module() if q.is_cuda and mask is None and p.kernel != "dot" else None
    if ta is not None and ta.supports(*_autocast(q, k, v)):
        return "triton"
    # CPU, and on GPU cached decoding (T < S), a ragged-batch mask or a head dim Triton does not take
    return "sdpa" if p.kernel in _FAST else "reference"


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, p: KernelParams, *,
              mask: torch.Tensor | None = None, settle: bool = False, impl: str = "auto") -> torch.Tensor:
    """Causal attention of T queries (B, H, T, D) over S ≥ T keys/values (B, Hkv, S, D).

    impl: `auto` (the fast path for this kernel and device, module docstring), `triton`
    (T == S, no mask; on CPU only under TRITON_INTERPRET=1), `sdpa` (dot, gaussian and
    mixture) or `reference` (the definition, every kernel).
    """
    if impl not in IMPLS:
        raise ValueError(f"impl={impl!r}: must be one of {', '.join(IMPLS)}")
    if impl == "auto":
        impl = _auto(q, k, v, p, mask)
    if impl == "reference":
        return reference_attention(q, k, v, p, mask, settle)
    if impl == "triton":
        return _triton(q, k, v, p, mask, settle)
    if p.kernel not in _FAST:
        raise ValueError(f"impl={impl!r}: kernel {p.kernel} runs through triton or reference")
    return _FAST[p.kernel](q, k, v, p, mask, settle)


# -- the module ---------------------------------------------------------------------------

class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        a = config.attention
        self.n_head, self.n_kv_head, self.head_dim = config.n_head, config.kv_heads, config.head_dim
        C = config.n_embd
        self.c_q = nn.Linear(C, self.n_head * self.head_dim, bias=False)
        self.c_k = nn.Linear(C, self.n_kv_head * self.head_dim, bias=False)
        self.c_v = nn.Linear(C, self.n_kv_head * self.head_dim, bias=False)
        self.c_proj = nn.Linear(self.n_head * self.head_dim, C, bias=False)
        self.resid_dropout = nn.Dropout(config.dropout)
        # Kernel / precision parameters (shapes kept 1-D or in a Linear so no optimizer
        # mistakes them for weight matrices; initial values in reset_parameters).
        self.n_components = a.n_components if a.kernel == "mixture" else 1
        HC = self.n_head * self.n_components
        c = torch.arange(self.n_components, dtype=torch.float32) - (self.n_components - 1) / 2
        base = -0.5 * math.log(self.head_dim) + (c * math.log(MIXTURE_SPREAD) if a.kernel == "mixture" else 0 * c)
        self.register_buffer("base_log_precision", base, persistent=False)  # (C,) log of the fixed λ
        if a.precision in ("head", "token"):
            self.log_precision = nn.Parameter(torch.empty(HC))
        if a.precision == "token":
            self.precision_proj = nn.Linear(C, HC, bias=False)
        if a.kernel == "student_t":
            self.nu_raw = nn.Parameter(torch.empty(self.n_head))
        if a.kernel == "mixture" and a.precision != "fixed":
            self.mix_logits = nn.Parameter(torch.empty(HC))
        self._token_precision: torch.Tensor | None = None
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """λ starts at its fixed value 1/√D (mixture: the spread around it) in every head;
        the token projection at zero (so `token` starts equal to `head`); ν at nu_init
        (softplus⁻¹(ν) = log(expm1(ν))); mixture weights uniform. q/k/v/proj are GPT.init_weights'."""
        if hasattr(self, "log_precision"):
            self.log_precision.copy_(self.base_log_precision.repeat(self.n_head))
        if hasattr(self, "precision_proj"):
            nn.init.zeros_(self.precision_proj.weight)
        if hasattr(self, "nu_raw"):
            nu = self.config.attention.nu_init
            self.nu_raw.fill_(math.log(math.expm1(nu)) if nu < 20 else nu)
        if hasattr(self, "mix_logits"):
            self.mix_logits.zero_()

    def precision_parameters(self) -> list[nn.Parameter]:
        """Learned precision-like parameters (λ, its projection, ν, mixture logits): AdamW, no decay."""
        names = ("log_precision", "precision_proj", "nu_raw", "mix_logits")
        return [p for n, p in self.named_parameters() if n.split(".")[0] in names]

    # -- precision ------------------------------------------------------------------------
    def _lam(self, x: torch.Tensor | None) -> torch.Tensor:
        """Clamped λ, fp32, (B|1, H|1, T|1, C)."""
        a, H, C = self.config.attention, self.n_head, self.n_components
        if a.precision == "fixed":
            log_lam = self.base_log_precision.float().view(1, 1, 1, C)
        else:
            log_lam = self.log_precision.float().view(1, H, 1, C)
            if a.precision == "token" and x is not None:
                B, T, _ = x.shape
                log_lam = log_lam + self.precision_proj(x).float().view(B, T, H, C).transpose(1, 2)
        return log_lam.exp().clamp(a.precision_min, a.precision_max)

    def nu(self) -> torch.Tensor | None:
        """Student-t ν per head (H,), detached and clamped; None for other kernels."""
        if not hasattr(self, "nu_raw"):
            return None
        return F.softplus(self.nu_raw.detach().float()).clamp(NU_MIN, NU_MAX)

    def _log_mix(self) -> torch.Tensor | None:
        if not hasattr(self, "mix_logits"):
            return None
        return self.mix_logits.float().view(self.n_head, self.n_components).log_softmax(-1)

    def component_precisions(self) -> torch.Tensor | None:
        """Detached λ per head and component, (H, C); None for `dot` with fixed precision.
        `token` mode: the mean over the last forward's batch and positions (before any
        forward: the value for a zero projection, i.e. exp(bias))."""
        if self.config.attention.kernel == "dot" and self.config.attention.precision == "fixed":
            return None
        if self.config.attention.precision == "token" and self._token_precision is not None:
            return self._token_precision
        with torch.no_grad():
            return self._lam(None).view(-1, self.n_components).expand(self.n_head, -1).clone()

    def precision(self) -> torch.Tensor | None:
        """The current clamped precision λ per head, (H,), detached; None for `dot` with
        fixed precision (its scale 1/√D is no precision). `dot` + `head`: the learned
        scale of q·k. `token`: the mean over the last forward's batch and positions.
        `mixture`: Σ_c π_c λ_c (the per-component values: component_precisions())."""
        lam = self.component_precisions()
        if lam is None:
            return None
        log_mix = self._log_mix()
        if log_mix is None:
            return lam.mean(-1)
        return (log_mix.detach().exp() * lam).sum(-1)

    def kernel_params(self, x: torch.Tensor | None = None) -> KernelParams:
        """The kernel's KernelParams for attention input x (B, T, C) (x only matters for `token`)."""
        a = self.config.attention
        lam = self._lam(x)
        if a.precision == "token" and x is not None:
            self._token_precision = lam.detach().mean(dim=(0, 2))  # (H, C), for diagnostics
        nu = F.softplus(self.nu_raw.float()).clamp(NU_MIN, NU_MAX) if hasattr(self, "nu_raw") else None
        fixed_scale = None
        if a.kernel == "dot" and a.precision == "fixed":
            fixed_scale = min(max(self.head_dim ** -0.5, a.precision_min), a.precision_max)
        return KernelParams(a.kernel, lam, nu, self._log_mix(), a.laplace_eps, fixed_scale)

    # -- forward ----------------------------------------------------------------------------
    def project(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q (B, H, T, D), k and v (B, Hkv, T, D) of attention input x (B, T, C), RoPE applied."""
        B, T, C = x.shape
        q = self.c_q(x).view(B, T, self.n_head, self.head_dim).transpose(1, 2)     # (B, H, T, D)
        k = self.c_k(x).view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)  # (B, Hkv, T, D)
        v = self.c_v(x).view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)  # (B, Hkv, T, D)
        if self.config.attention.qk_norm:
            q, k = F.rms_norm(q, (self.head_dim,)), F.rms_norm(k, (self.head_dim,))
        return apply_rotary(q, cos, sin), apply_rotary(k, cos, sin), v

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                kv_cache=None, layer_idx: int = 0) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.project(x, cos, sin)
        mask = None
        if kv_cache is not None:
            k, v = kv_cache.update(layer_idx, k, v)  # all keys/values so far: (B, Hkv, S, D)
            mask = kv_cache.attn_mask(T)             # None unless the rows sit at different positions
        y = self.attend(q, k, v, x, mask)            # (B, H, T, D)
        y = y.transpose(1, 2).contiguous().view(B, T, -1)
        return self.resid_dropout(self.c_proj(y))

    def settle(self, q: torch.Tensor, k: torch.Tensor, p: KernelParams,
               mask: torch.Tensor | None = None) -> torch.Tensor:
        """`settle_steps` EM / mean-shift steps of the queries toward the keys that explain
        them: q ← q + rate·(Σ_j a_ij k_j − q) (module docstring). Keys stay fixed."""
        a = self.config.attention
        for _ in range(a.settle_steps):
            target = attention(q, k, k, p, mask=mask, settle=True)  # (B, H, T, D)
            q = q + a.settle_rate * (target - q)
        return q

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, x: torch.Tensor | None = None,
               mask: torch.Tensor | None = None) -> torch.Tensor:
        """Causal attention of the T newest queries over S >= T keys (the last T aligned),
        with this module's kernel and precision (x: the attention input, for `token`)."""
        p = self.kernel_params(x)
        return attention(self.settle(q, k, p, mask), k, v, p, mask=mask)
