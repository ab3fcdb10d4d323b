"""Precision-weighted causal flash attention in Triton: forward and backward (DESIGN §3, issue 10).

Every score kernel is computed inline from x_ij = q_i·k_j (tensor cores, fp32 accumulation)
and the norms qn_i = ‖q_i‖², kn_j = ‖k_j‖² (fp32): d² = qn_i + kn_j − 2x, so nothing is
augmented or padded and every per-score quantity is fp32. Scores are kept in log2 units
(s2 = ℓ·log2 e) so the softmax runs on exp2.

    dot        ℓ = λ x
    gaussian   ℓ = λ (x − kn/2)                 (−(λ/2)d² less −(λ/2)qn, constant over keys)
    student_t  ℓ = −α log(1 + β d²)             β = λ/ν, α = (ν+D)/2 (+1 when settling)
    laplace    ℓ = −√u, u = λ d² + ε            (settling: −√u − ½ log u)
    mixture    ℓ = log Σ_c exp(b_c + λ_c (x − kn/2 − qn/2)),  b_c = log π_c + (D/2 [+1]) log λ_c

Parameters are read per query row from fp32 tensors p1, p2 of shape (B|1, H|1, T|1, C) (a
size-1 dim is read with stride 0, so `fixed`, `head` and `token` precision are one code path):
p1 = λ (student_t: β), p2 = α (student_t) or b (mixture), unused otherwise.

Forward (one program per BLOCK_M queries of one head): online softmax over key blocks,
off-diagonal blocks without a mask, then the diagonal block with the causal mask. It stores
o, the row log-sum-exp (log2 units) and qn. Mixture: C components inside one pass: x and
P·V are computed once, and p_ij = Σ_c exp2(s2_ijc − m_i) (C exp2 per score, no log).

Backward, with g_ij = ∂L/∂ℓ_ij = P_ij (dP_ij − Δ_i), dP = dO·Vᵀ, Δ_i = dO_i·O_i:
    dq_i = Σ_j ℓx_ij g_ij k_j − q_i Σ_j ℓx_ij g_ij,  dk_j = Σ_i ℓx_ij g_ij q_i − k_j Σ_i ℓx_ij g_ij
with ℓx = ∂ℓ/∂x (every kernel but dot depends on k through kn − 2x, and on q through qn − 2x
except gaussian, whose qn term is dropped; dot and gaussian drop the matching terms).
Two kernels: `_bwd_dq` (per query block: dq, Δ, and the per-row parameter gradients) runs
first and writes Δ; `_bwd_dkdv` (per key block, looping over the query heads of its kv head
for GQA, so no atomics) writes dk, dv.

Parameter gradients are row sums dθ_i = Σ_j g_ij f_ij (f = ∂ℓ/∂θ_i). Δ from the bf16 output
is off by ~2⁻⁹, and that error times Σ_j P_ij f_ij (~α for student_t) would swamp them.
`_bwd_dq` sees every key of its rows, so it accumulates G_i = Σ_j g_ij, A_i = Σ_j g_ij f_ij
and V_i = Σ_j P_ij f_ij and returns A_i − G_i V_i = Σ_j P_ij (dP_ij − W_i) f_ij with the
exact W_i = Σ_j P_ij dP_ij: the gradient with Δ replaced by its fp32 value, at the cost of
three row sums per tile.

The per-row gradients (B, H, T, C) are summed to p1/p2's shapes by autograd. The kernels are
wrapped as torch custom ops (`pcgpt::flash_attention_fwd` / `_bwd`) with a registered
autograd formula, so they run inside torch.compile; eager calls run the same launches through
an autograd.Function with less host work (`_EagerAttention`). CUDA graphs capture both (no
host syncs; autotuning happens on the first call per shape, which must come before any graph
capture). There is no double backward: model.attention.twice_differentiable() routes around
these kernels.
"""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice

KERNELS = {"dot": 0, "gaussian": 1, "student_t": 2, "laplace": 3, "mixture": 4}
DOT: tl.constexpr = tl.constexpr(0)
GAUSSIAN: tl.constexpr = tl.constexpr(1)
STUDENT_T: tl.constexpr = tl.constexpr(2)
LAPLACE: tl.constexpr = tl.constexpr(3)
MIXTURE: tl.constexpr = tl.constexpr(4)
LOG2E: tl.constexpr = tl.constexpr(1.4426950408889634)
LN2: tl.constexpr = tl.constexpr(0.6931471805599453)
HEAD_DIMS = (16, 32, 64, 128)
DTYPES = (torch.bfloat16, torch.float16, torch.float32)

# Triton's CPU interpreter (TRITON_INTERPRET=1, read by triton.jit at import) runs the same
# kernels on tiny blocks: the CPU tests use it. On a GPU: a few Hopper-sized configs.
_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
# (BLOCK_M, BLOCK_N, num_warps, num_stages); every block size divides 128 (EVEN in `_meta`).
# Inner blocks of 32 keep the backward kernels free of register spills on sm_90
# (tests/bench/triton_resources.py prints registers and spills per config without a GPU).
FWD_CONFIGS = [(128, 64, 4, 3), (128, 128, 8, 3), (64, 64, 4, 3)]
DQ_CONFIGS = [(64, 32, 4, 3), (128, 32, 8, 3), (128, 64, 8, 3)]
DKDV_CONFIGS = [(32, 128, 8, 3), (32, 64, 4, 3), (64, 64, 8, 3)]  # BLOCK_M queries, BLOCK_N keys
if _INTERPRET:
    FWD_CONFIGS = DQ_CONFIGS = DKDV_CONFIGS = [(16, 16, 1, 1)]
_ALIGN = max(max(m, n) for m, n, _, _ in FWD_CONFIGS + DQ_CONFIGS + DKDV_CONFIGS)


def _configs(table):
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s) for m, n, w, s in table]


_KEY = ["T", "D", "KERNEL", "SETTLE", "C", "G"]


def _fp32_smallest(configs, named_args, **kwargs):
    """fp32 (tests and fp32 runs, not the speed path): the smallest tiles only, the ones that
    fit shared memory, and a third of the compile time."""
    if named_args["Q"].dtype == torch.float32:
        return [min(configs, key=lambda c: c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"])]
    return configs


_PRUNE = {"early_config_prune": _fp32_smallest}


# -- helpers ---------------------------------------------------------------------------------

@triton.jit
def _load_rows(base, offs, offs_d, stride, T, EVEN: tl.constexpr):
    """(len(offs), D) rows of a (…, T, D) tensor whose last dim is contiguous; zeros past T."""
    ptrs = base + offs[:, None] * stride + offs_d[None, :]
    if EVEN:
        return tl.load(ptrs)
    return tl.load(ptrs, mask=offs[:, None] < T, other=0.0)


@triton.jit
def _load_vec(base, offs, stride, T, other, EVEN: tl.constexpr):
    if EVEN:
        return tl.load(base + offs * stride)
    return tl.load(base + offs * stride, mask=offs < T, other=other)


@triton.jit
def _column(tile, offs_c, c):
    """Component c of a (BLOCK, CP) tile of per-row mixture parameters, as a (BLOCK,) vector."""
    return tl.sum(tl.where(offs_c[None, :] == c, tile, 0.0), 1)


@triton.jit
def _log2(x, FAST: tl.constexpr):
    """log2 on the special-function unit (lg2.approx, ~2⁻²² relative): tl.log2 compiles to a
    ~20-instruction software routine. The CPU interpreter has no libdevice: tl.log2 there."""
    if FAST:
        return libdevice.fast_log2f(x)
    return tl.log2(x)


@triton.jit
def _score(x, qn, kn, r1, r2, eps, KERNEL: tl.constexpr, SETTLE: tl.constexpr, FAST: tl.constexpr):
    """One score tile of a single-component kernel from x = q·k and broadcastable qn, kn, r1, r2.

    Returns s2 (the score in log2 units), ℓx = ∂ℓ/∂x and the features f1, f2 whose row sums
    against g give the parameter gradients (module docstring). The forward uses s2 only; the
    compiler drops the rest."""
    if KERNEL == DOT:                                   # r1 = λ
        s2 = (r1 * LOG2E) * x
        lx = r1
        f1 = x                                          # ∂ℓ/∂λ
        f2 = x
    elif KERNEL == GAUSSIAN:                            # r1 = λ
        y = x - 0.5 * kn
        s2 = (r1 * LOG2E) * y
        lx = r1
        f1 = y                                          # ∂ℓ/∂λ (+ a row constant)
        f2 = y
    else:
        d2 = tl.maximum(qn + kn - 2.0 * x, 0.0)         # the expansion can round below 0
        if KERNEL == STUDENT_T:                         # r1 = β, r2 = α
            w = 1.0 + r1 * d2
            t = _log2(w, FAST)
            s2 = -r2 * t
            r = 1.0 / w
            lx = 2.0 * r2 * r1 * r                      # ∂ℓ/∂x = −2 ∂ℓ/∂d²
            f1 = d2 * r                                 # ∂ℓ/∂β = −α f1
            f2 = t                                      # ∂ℓ/∂α = −ln2 f2
        else:                                           # LAPLACE, r1 = λ
            u = r1 * d2 + eps
            iw = tl.math.rsqrt(u)
            s2 = (u * iw) * -LOG2E                      # √u = u/√u: one rsqrt serves fwd and bwd
            z = iw                                      # −2 ∂ℓ/∂u
            if SETTLE:
                s2 -= 0.5 * _log2(u, FAST)
                z = iw + iw * iw
            lx = r1 * z
            f1 = d2 * z                                 # ∂ℓ/∂λ = −½ f1
            f2 = z                                      # Σ_j ℓx g = λ Σ_j f2 g
    return s2, lx, f1, f2


# -- forward ---------------------------------------------------------------------------------

@triton.jit
def _fwd_blocks(acc, l_i, m_i, q, qn, r1, r2, a_t, b_t, offs_m, offs_c, Kb, Vb, KNb, skt, svt,
                lo, hi, T, eps, KERNEL: tl.constexpr, SETTLE: tl.constexpr, C: tl.constexpr,
                D: tl.constexpr, EVEN: tl.constexpr, MASKED: tl.constexpr, PRECISION: tl.constexpr,
                FAST: tl.constexpr, BLOCK_N: tl.constexpr):
    offs_d = tl.arange(0, D)
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        k = _load_rows(Kb, offs_n, offs_d, skt, T, EVEN)                     # (BN, D)
        v = _load_rows(Vb, offs_n, offs_d, svt, T, EVEN)                     # (BN, D)
        kn = _load_vec(KNb, offs_n, 1, T, 0.0, EVEN)                         # (BN,)
        x = tl.dot(q, tl.trans(k), input_precision=PRECISION)                # (BM, BN)
        visible = offs_m[:, None] >= offs_n[None, :]
        if KERNEL == MIXTURE:                     # a_t = λ_c log2e, b_t = (b_c − λ_c qn/2) log2e
            y = x - 0.5 * kn[None, :]
            m_new = m_i
            for c in tl.static_range(C):
                s2 = _column(a_t, offs_c, c)[:, None] * y + _column(b_t, offs_c, c)[:, None]
                if MASKED:
                    s2 = tl.where(visible, s2, float("-inf"))
                m_new = tl.maximum(m_new, tl.max(s2, 1))
            p = tl.zeros_like(x)
            for c in tl.static_range(C):
                s2 = _column(a_t, offs_c, c)[:, None] * y + _column(b_t, offs_c, c)[:, None]
                if MASKED:
                    s2 = tl.where(visible, s2, float("-inf"))
                p += tl.exp2(s2 - m_new[:, None])
        else:
            s2, _, _, _ = _score(x, qn[:, None], kn[None, :], r1[:, None], r2[:, None], eps, KERNEL, SETTLE, FAST)
            if MASKED:
                s2 = tl.where(visible, s2, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s2, 1))
            p = tl.exp2(s2 - m_new[:, None])
        rescale = tl.exp2(m_i - m_new)
        l_i = l_i * rescale + tl.sum(p, 1)
        acc = acc * rescale[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m_i = m_new
    return acc, l_i, m_i


@triton.autotune(configs=_configs(FWD_CONFIGS), key=_KEY, prune_configs_by=_PRUNE)
@triton.jit
def _fwd(Q, K, V, O, LSE, QN, KN, P1, P2,
         sqb, sqh, sqt, skb, skh, skt, svb, svh, svt, sob, soh, sot,
         s1b, s1h, s1t, s1c, s2b, s2h, s2t, s2c,
         H, G, T, eps,
         KERNEL: tl.constexpr, SETTLE: tl.constexpr, C: tl.constexpr, CP: tl.constexpr,
         D: tl.constexpr, EVEN: tl.constexpr, PRECISION: tl.constexpr, FAST: tl.constexpr,
         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    start_m = tl.num_programs(1) - 1 - tl.program_id(1)    # the longest rows first, in every head
    bh = tl.program_id(0)
    b = (bh // H).to(tl.int64)
    h = bh % H
    hk = h // G                                              # GQA: query head h reads kv head h // G
    offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, D)
    offs_c = tl.arange(0, CP)
    q = _load_rows(Q + b * sqb + h * sqh, offs_m, offs_d, sqt, T, EVEN)     # (BM, D)
    qf = q.to(tl.float32)
    qn = tl.sum(qf * qf, 1)                                                  # (BM,)
    r1 = _load_vec(P1 + b * s1b + h * s1h, offs_m, s1t, T, 1.0, EVEN)
    r2 = _load_vec(P2 + b * s2b + h * s2h, offs_m, s2t, T, 1.0, EVEN)
    a_t = r1[:, None]
    b_t = r2[:, None]
    if KERNEL == MIXTURE:
        cmask = (offs_m[:, None] < T) & (offs_c[None, :] < C)
        lam = tl.load(P1 + b * s1b + h * s1h + offs_m[:, None] * s1t + offs_c[None, :] * s1c, mask=cmask, other=1.0)
        bias = tl.load(P2 + b * s2b + h * s2h + offs_m[:, None] * s2t + offs_c[None, :] * s2c, mask=cmask, other=0.0)
        a_t = lam * LOG2E                                                    # (BM, CP)
        b_t = (bias - 0.5 * lam * qn[:, None]) * LOG2E
    Kb = K + b * skb + hk * skh
    Vb = V + b * svb + hk * svh
    KNb = KN + (b * (H // G) + hk) * T
    acc = tl.zeros([BLOCK_M, D], dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    diag = start_m * BLOCK_M
    acc, l_i, m_i = _fwd_blocks(acc, l_i, m_i, q, qn, r1, r2, a_t, b_t, offs_m, offs_c, Kb, Vb, KNb, skt, svt,
                                0, diag, T, eps, KERNEL, SETTLE, C, D, EVEN, False, PRECISION, FAST, BLOCK_N)
    acc, l_i, m_i = _fwd_blocks(acc, l_i, m_i, q, qn, r1, r2, a_t, b_t, offs_m, offs_c, Kb, Vb, KNb, skt, svt,
                                diag, tl.minimum(diag + BLOCK_M, T), T, eps, KERNEL, SETTLE, C, D, EVEN, True,
                                PRECISION, FAST, BLOCK_N)
    o = acc / l_i[:, None]
    row = (b * H + h) * T + offs_m
    o_ptrs = O + b * sob + h * soh + offs_m[:, None] * sot + offs_d[None, :]
    if EVEN:
        tl.store(o_ptrs, o.to(O.dtype.element_ty))
        tl.store(LSE + row, m_i + tl.log2(l_i))
        tl.store(QN + row, qn)
    else:
        tl.store(o_ptrs, o.to(O.dtype.element_ty), mask=offs_m[:, None] < T)
        tl.store(LSE + row, m_i + tl.log2(l_i), mask=offs_m < T)
        tl.store(QN + row, qn, mask=offs_m < T)


@triton.jit
def _sq_norm(X, OUT, sxb, sxh, sxt, H, T, D: tl.constexpr, BLOCK: tl.constexpr):
    """‖x_t‖² in fp32 for rows of a (B, H, T, D) tensor, into a contiguous (B, H, T)."""
    bh = tl.program_id(0)
    b = (bh // H).to(tl.int64)
    h = bh % H
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    x = _load_rows(X + b * sxb + h * sxh, offs, tl.arange(0, D), sxt, T, False).to(tl.float32)
    tl.store(OUT + (b * H + h) * T + offs, tl.sum(x * x, 1), mask=offs < T)


# -- backward: dq, Δ and the parameter gradients -------------------------------------------

@triton.jit
def _dq_blocks(acc, g_sum, a1, v1, a2, v2, q, do, qn, delta, lse, r1, r2, lam, a_t, b_t, offs_m, offs_c,
               Kb, Vb, KNb, skt, svt, lo, hi, T, eps, KERNEL: tl.constexpr, SETTLE: tl.constexpr,
               C: tl.constexpr, D: tl.constexpr, EVEN: tl.constexpr, MASKED: tl.constexpr,
               PRECISION: tl.constexpr, FAST: tl.constexpr, BLOCK_N: tl.constexpr):
    offs_d = tl.arange(0, D)
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        k = _load_rows(Kb, offs_n, offs_d, skt, T, EVEN)
        v = _load_rows(Vb, offs_n, offs_d, svt, T, EVEN)
        kn = _load_vec(KNb, offs_n, 1, T, 0.0, EVEN)
        x = tl.dot(q, tl.trans(k), input_precision=PRECISION)                # (BM, BN)
        dp = tl.dot(do, tl.trans(v), input_precision=PRECISION) - delta[:, None]   # dP − Δ
        visible = offs_m[:, None] >= offs_n[None, :]
        if KERNEL == MIXTURE:
            y = x - 0.5 * kn[None, :]
            p = tl.zeros_like(x)
            lp = tl.zeros_like(x)                                            # Σ_c λ_c P_c
            for c in tl.static_range(C):
                p_c = tl.exp2(_column(a_t, offs_c, c)[:, None] * y + _column(b_t, offs_c, c)[:, None]
                              - lse[:, None])
                if MASKED:
                    p_c = tl.where(visible, p_c, 0.0)
                g_c = p_c * dp
                here = offs_c[None, :] == c                                  # features 1 (→ b_c), y (→ λ_c)
                a1 += tl.where(here, tl.sum(g_c, 1)[:, None], 0.0)
                v1 += tl.where(here, tl.sum(p_c, 1)[:, None], 0.0)
                a2 += tl.where(here, tl.sum(g_c * y, 1)[:, None], 0.0)
                v2 += tl.where(here, tl.sum(p_c * y, 1)[:, None], 0.0)
                p += p_c
                lp += _column(lam, offs_c, c)[:, None] * p_c
            g_sum += tl.sum(p * dp, 1)
            ds = lp * dp
        else:
            s2, lx, f1, f2 = _score(x, qn[:, None], kn[None, :], r1[:, None], r2[:, None], eps, KERNEL, SETTLE, FAST)
            p = tl.exp2(s2 - lse[:, None])
            if MASKED:
                p = tl.where(visible, p, 0.0)
            g = p * dp
            g_sum += tl.sum(g, 1)
            a1 += tl.sum(g * f1, 1)
            v1 += tl.sum(p * f1, 1)
            if KERNEL == STUDENT_T or KERNEL == LAPLACE:
                a2 += tl.sum(g * f2, 1)
                v2 += tl.sum(p * f2, 1)
            if KERNEL == DOT or KERNEL == GAUSSIAN:
                ds = g                                                       # ℓx = λ_i: applied per row at the end
            else:
                ds = g * lx
        acc += tl.dot(ds.to(k.dtype), k, input_precision=PRECISION)
    return acc, g_sum, a1, v1, a2, v2


@triton.autotune(configs=_configs(DQ_CONFIGS), key=_KEY, prune_configs_by=_PRUNE)
@triton.jit
def _bwd_dq(Q, K, V, O, DO, DQ, LSE, KN, DELTA, P1, P2, D1, D2,
            sqb, sqh, sqt, skb, skh, skt, svb, svh, svt, sob, soh, sot, sdob, sdoh, sdot, sdqb, sdqh, sdqt,
            s1b, s1h, s1t, s1c, s2b, s2h, s2t, s2c,
            H, G, T, eps,
            KERNEL: tl.constexpr, SETTLE: tl.constexpr, C: tl.constexpr, CP: tl.constexpr,
            D: tl.constexpr, EVEN: tl.constexpr, PRECISION: tl.constexpr, FAST: tl.constexpr,
            BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    start_m = tl.num_programs(1) - 1 - tl.program_id(1)
    bh = tl.program_id(0)
    b = (bh // H).to(tl.int64)
    h = bh % H
    hk = h // G
    offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, D)
    offs_c = tl.arange(0, CP)
    row = (b * H + h) * T + offs_m
    q = _load_rows(Q + b * sqb + h * sqh, offs_m, offs_d, sqt, T, EVEN)
    do = _load_rows(DO + b * sdob + h * sdoh, offs_m, offs_d, sdot, T, EVEN)
    o = _load_rows(O + b * sob + h * soh, offs_m, offs_d, sot, T, EVEN)
    delta = tl.sum(do.to(tl.float32) * o.to(tl.float32), 1)                   # Δ_i = dO_i·O_i
    lse = _load_vec(LSE + (b * H + h) * T, offs_m, 1, T, float("inf"), EVEN)  # +inf: P = 0 past T
    qf = q.to(tl.float32)
    qn = tl.sum(qf * qf, 1)
    r1 = _load_vec(P1 + b * s1b + h * s1h, offs_m, s1t, T, 1.0, EVEN)
    r2 = _load_vec(P2 + b * s2b + h * s2h, offs_m, s2t, T, 1.0, EVEN)
    g_sum = tl.zeros([BLOCK_M], dtype=tl.float32)
    a1 = tl.zeros([BLOCK_M], dtype=tl.float32)
    lam = a1[:, None]
    a_t = lam
    b_t = lam
    if KERNEL == MIXTURE:
        cmask = (offs_m[:, None] < T) & (offs_c[None, :] < C)
        lam = tl.load(P1 + b * s1b + h * s1h + offs_m[:, None] * s1t + offs_c[None, :] * s1c, mask=cmask, other=1.0)
        bias = tl.load(P2 + b * s2b + h * s2h + offs_m[:, None] * s2t + offs_c[None, :] * s2c, mask=cmask, other=0.0)
        a_t = lam * LOG2E
        b_t = (bias - 0.5 * lam * qn[:, None]) * LOG2E
        a1 = tl.zeros([BLOCK_M, CP], dtype=tl.float32)
    v1 = tl.zeros_like(a1)
    a2 = tl.zeros_like(a1)
    v2 = tl.zeros_like(a1)
    acc = tl.zeros([BLOCK_M, D], dtype=tl.float32)
    Kb = K + b * skb + hk * skh
    Vb = V + b * svb + hk * svh
    KNb = KN + (b * (H // G) + hk) * T
    diag = start_m * BLOCK_M
    acc, g_sum, a1, v1, a2, v2 = _dq_blocks(
        acc, g_sum, a1, v1, a2, v2, q, do, qn, delta, lse, r1, r2, lam, a_t, b_t, offs_m, offs_c, Kb, Vb, KNb,
        skt, svt, 0, diag, T, eps, KERNEL, SETTLE, C, D, EVEN, False, PRECISION, FAST, BLOCK_N)
    acc, g_sum, a1, v1, a2, v2 = _dq_blocks(
        acc, g_sum, a1, v1, a2, v2, q, do, qn, delta, lse, r1, r2, lam, a_t, b_t, offs_m, offs_c, Kb, Vb, KNb,
        skt, svt, diag, tl.minimum(diag + BLOCK_M, T), T, eps, KERNEL, SETTLE, C, D, EVEN, True, PRECISION, FAST, BLOCK_N)
    # Row sums against g with Δ replaced by the exact W_i (module docstring): A − G·V.
    if KERNEL == MIXTURE:
        e1 = a1 - g_sum[:, None] * v1                                        # ∂/∂b_c
        e2 = a2 - g_sum[:, None] * v2
        d1 = e2 - 0.5 * qn[:, None] * e1                                     # ∂/∂λ_c: features y − qn/2 = −d²/2
        dq = acc - qf * tl.sum(lam * e1, 1)[:, None]
        cmask = (offs_m[:, None] < T) & (offs_c[None, :] < C)
        d_ptrs = offs_m[:, None] * C + offs_c[None, :] + (b * H + h) * T * C
        tl.store(D1 + d_ptrs, d1, mask=cmask)
        tl.store(D2 + d_ptrs, e1, mask=cmask)
    else:
        e1 = a1 - g_sum * v1
        e2 = a2 - g_sum * v2
        if KERNEL == DOT or KERNEL == GAUSSIAN:
            d1 = e1
            dq = acc * r1[:, None]
        elif KERNEL == STUDENT_T:
            d1 = -r2 * e1                                                    # ∂/∂β
            # Σ_j ℓx g = 2αβ Σ_j r g = −2αβ² Σ_j d² r g (as r = 1 − βd² r and Σ_j g = 0)
            dq = acc + qf * (2.0 * r2 * r1 * r1 * e1)[:, None]
            tl.store(D2 + row, e2 * -LN2, mask=offs_m < T)                   # ∂/∂α
        else:
            d1 = -0.5 * e1                                                   # ∂/∂λ
            dq = acc - qf * (r1 * e2)[:, None]
        tl.store(D1 + row, d1, mask=offs_m < T)
    dq_ptrs = DQ + b * sdqb + h * sdqh + offs_m[:, None] * sdqt + offs_d[None, :]
    tl.store(dq_ptrs, dq.to(DQ.dtype.element_ty), mask=offs_m[:, None] < T)
    tl.store(DELTA + row, delta, mask=offs_m < T)


# -- backward: dk, dv -----------------------------------------------------------------------

@triton.jit
def _dkdv_blocks(dk, dv, ds_sum, k, v, kn, offs_n, Qb, DOb, LSEb, QNb, DELTAb, P1b, P2b, sqt, sdot,
                 s1t, s1c, s2t, s2c, lo, hi, T, eps, KERNEL: tl.constexpr, SETTLE: tl.constexpr,
                 C: tl.constexpr, D: tl.constexpr, EVEN: tl.constexpr, MASKED: tl.constexpr,
                 PRECISION: tl.constexpr, FAST: tl.constexpr, BLOCK_M: tl.constexpr):
    """Transposed tiles: rows are the BN keys of this program, columns BM queries."""
    offs_d = tl.arange(0, D)
    for start_m in range(lo, hi, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        q = _load_rows(Qb, offs_m, offs_d, sqt, T, EVEN)                     # (BM, D)
        do = _load_rows(DOb, offs_m, offs_d, sdot, T, EVEN)
        lse = _load_vec(LSEb, offs_m, 1, T, float("inf"), EVEN)
        delta = _load_vec(DELTAb, offs_m, 1, T, 0.0, EVEN)
        qn = _load_vec(QNb, offs_m, 1, T, 0.0, EVEN)
        xt = tl.dot(k, tl.trans(q), input_precision=PRECISION)              # (BN, BM)
        dpt = tl.dot(v, tl.trans(do), input_precision=PRECISION) - delta[None, :]
        visible = offs_m[None, :] >= offs_n[:, None]
        if KERNEL == MIXTURE:
            y = xt - 0.5 * kn[:, None]
            pt = tl.zeros_like(xt)
            lpt = tl.zeros_like(xt)
            for c in tl.static_range(C):
                lam_c = _load_vec(P1b + c * s1c, offs_m, s1t, T, 1.0, EVEN)
                b_c = _load_vec(P2b + c * s2c, offs_m, s2t, T, 0.0, EVEN)
                p_c = tl.exp2((lam_c * LOG2E)[None, :] * y + ((b_c - 0.5 * lam_c * qn) * LOG2E - lse)[None, :])
                pt += p_c
                lpt += lam_c[None, :] * p_c
            if MASKED:
                pt = tl.where(visible, pt, 0.0)
                lpt = tl.where(visible, lpt, 0.0)
            ds = lpt * dpt
        else:
            r1 = _load_vec(P1b, offs_m, s1t, T, 1.0, EVEN)
            r2 = _load_vec(P2b, offs_m, s2t, T, 1.0, EVEN)
            s2, lx, _, _ = _score(xt, qn[None, :], kn[:, None], r1[None, :], r2[None, :], eps, KERNEL, SETTLE, FAST)
            pt = tl.exp2(s2 - lse[None, :])
            if MASKED:
                pt = tl.where(visible, pt, 0.0)
            ds = pt * dpt * lx
        dv += tl.dot(pt.to(do.dtype), do, input_precision=PRECISION)
        dk += tl.dot(ds.to(q.dtype), q, input_precision=PRECISION)
        ds_sum += tl.sum(ds, 1)
    return dk, dv, ds_sum


@triton.autotune(configs=_configs(DKDV_CONFIGS), key=_KEY, prune_configs_by=_PRUNE)
@triton.jit
def _bwd_dkdv(Q, K, V, DO, DK, DV, LSE, QN, DELTA, P1, P2,
              sqb, sqh, sqt, skb, skh, skt, svb, svh, svt, sdob, sdoh, sdot,
              sdkb, sdkh, sdkt, sdvb, sdvh, sdvt,
              s1b, s1h, s1t, s1c, s2b, s2h, s2t, s2c,
              H, G, T, eps,
              KERNEL: tl.constexpr, SETTLE: tl.constexpr, C: tl.constexpr, CP: tl.constexpr,
              D: tl.constexpr, EVEN: tl.constexpr, PRECISION: tl.constexpr, FAST: tl.constexpr,
              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    start_n = tl.program_id(1)                               # the first keys see the most queries: first
    bhk = tl.program_id(0)
    Hkv = H // G
    b = (bhk // Hkv).to(tl.int64)
    hk = bhk % Hkv
    offs_n = start_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, D)
    k = _load_rows(K + b * skb + hk * skh, offs_n, offs_d, skt, T, EVEN)     # (BN, D)
    v = _load_rows(V + b * svb + hk * svh, offs_n, offs_d, svt, T, EVEN)
    kf = k.to(tl.float32)
    kn = tl.sum(kf * kf, 1)
    dk = tl.zeros([BLOCK_N, D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, D], dtype=tl.float32)
    ds_sum = tl.zeros([BLOCK_N], dtype=tl.float32)
    diag = start_n * BLOCK_N
    for g in range(G):                                                       # the query heads of kv head hk
        h = hk * G + g
        rows = (b * H + h) * T
        Qb = Q + b * sqb + h * sqh
        DOb = DO + b * sdob + h * sdoh
        P1b = P1 + b * s1b + h * s1h
        P2b = P2 + b * s2b + h * s2h
        dk, dv, ds_sum = _dkdv_blocks(dk, dv, ds_sum, k, v, kn, offs_n, Qb, DOb, LSE + rows, QN + rows,
                                      DELTA + rows, P1b, P2b, sqt, sdot, s1t, s1c, s2t, s2c,
                                      diag, tl.minimum(diag + BLOCK_N, T), T, eps, KERNEL, SETTLE, C, D, EVEN,
                                      True, PRECISION, FAST, BLOCK_M)
        dk, dv, ds_sum = _dkdv_blocks(dk, dv, ds_sum, k, v, kn, offs_n, Qb, DOb, LSE + rows, QN + rows,
                                      DELTA + rows, P1b, P2b, sqt, sdot, s1t, s1c, s2t, s2c,
                                      diag + BLOCK_N, T, T, eps, KERNEL, SETTLE, C, D, EVEN, False, PRECISION,
                                      FAST, BLOCK_M)
    if KERNEL != DOT:
        dk -= kf * ds_sum[:, None]                                           # through kn: ∂ℓ/∂kn = −ℓx/2
    mask = offs_n[:, None] < T
    tl.store(DK + b * sdkb + hk * sdkh + offs_n[:, None] * sdkt + offs_d[None, :], dk.to(DK.dtype.element_ty),
             mask=mask)
    tl.store(DV + b * sdvb + hk * sdvh + offs_n[:, None] * sdvt + offs_d[None, :], dv.to(DV.dtype.element_ty),
             mask=mask)


# -- launchers ---------------------------------------------------------------------------------
# Outside CUDA graphs the GPU waits for the host at short lengths (at (8,12,1024,64) bf16 on an
# H200, eager fwd+bwd took several times the graph replay), so one call's Python is kept short:
# what depends only on shapes is computed once per shape, the autotuner is consulted once per
# autotune key, and eager calls skip the dispatcher's Python layers (`_EagerAttention`).
# tests/bench/attention_host.py times that Python on a CPU.

def _strides(*xs: torch.Tensor) -> list[int]:
    """The (B, H, T) strides of (B, H, T, D) tensors whose head dim is contiguous."""
    return [s for x in xs for s in x.stride()[:3]]


def _param_strides(*ps: torch.Tensor) -> list[int]:
    """(B|1, H|1, T|1, C) parameters: a size-1 dim is read with stride 0 (broadcast)."""
    return [0 if n == 1 else s for p in ps for n, s in zip(p.shape, p.stride())]


@functools.cache
def _meta(kernel: str, settle: bool, C: int, D: int, even: bool, dtype: torch.dtype) -> dict:
    """The kernels' constexprs for one call shape (one shared dict per shape: read only)."""
    # SETTLE changes laplace's score only (the others take it through p1, p2): one binary for both
    return dict(KERNEL=KERNELS[kernel], SETTLE=settle and kernel == "laplace", C=C, CP=max(2, triton.next_power_of_2(C)),
                D=D, EVEN=even,
                # fp32: three tf32 products per product (tensor cores, ~fp32 accuracy)
                PRECISION="tf32x3" if dtype == torch.float32 else "tf32", FAST=not _INTERPRET)


_TUNED: dict[tuple, dict] = {}
"""(autotuned kernel, T, G, _meta's arguments) -> the launch options of the config it chose."""


def _launch(kernel, grid, args: list, meta: dict, key: tuple) -> None:
    """kernel[grid](*args, **meta) for a triton.autotune'd kernel, asking the autotuner only on
    the first call per key (the autotune key _KEY: T, G and the shape/dtype constexprs; every
    tensor's dtype follows q's). On every call the autotuner builds its key from a dict of all
    ~40 arguments, checked by name against a list, and a dtype string per tensor: tens of µs of
    host time per launch. The launch itself is the one the autotuner makes."""
    config = _TUNED.get((kernel, key))
    if config is None:
        kernel[grid](*args, **meta)  # autotunes for this key, or finds its cached choice
        _TUNED[kernel, key] = kernel.best_config.all_kwargs()
    else:
        kernel.fn.run(*args, grid=grid, warmup=False, **meta, **config)


def _new_output(q: torch.Tensor) -> torch.Tensor:
    """(B, H, T, D) laid out as (B, T, H, D): the model's transpose back to (B, T, H·D) is then free."""
    B, H, T, D = q.shape
    return q.new_empty(B, T, H, D).transpose(1, 2)


def _forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, p1: torch.Tensor, p2: torch.Tensor,
             kernel: str, settle: bool, eps: float
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """o, the row log-sum-exp (log2 units), ‖q‖², ‖k‖² (fp32)."""
    assert q.stride(-1) == k.stride(-1) == v.stride(-1) == 1, "the head dim must be contiguous"
    B, H, T, D = q.shape
    Hkv = k.shape[1]
    spec = (kernel, settle, p1.shape[-1], D, T % _ALIGN == 0, q.dtype)  # _meta's arguments
    f32 = dict(device=q.device, dtype=torch.float32)
    o = _new_output(q)
    lse, qn, kn = torch.empty(B, H, T, **f32), torch.empty(B, H, T, **f32), torch.empty(B, Hkv, T, **f32)
    _sq_norm[(B * Hkv, triton.cdiv(T, 64))](k, kn, *_strides(k), Hkv, T, D=D, BLOCK=64)
    grid = lambda m: (B * H, triton.cdiv(T, m["BLOCK_M"]))  # noqa: E731 (axis 0 runs fastest)
    _launch(_fwd, grid, [q, k, v, o, lse, qn, kn, p1, p2, *_strides(q, k, v, o), *_param_strides(p1, p2),
                         H, H // Hkv, T, eps], _meta(*spec), (T, H // Hkv, *spec))
    return o, lse, qn, kn


def _backward(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor,
              lse: torch.Tensor, qn: torch.Tensor, kn: torch.Tensor, p1: torch.Tensor, p2: torch.Tensor,
              kernel: str, settle: bool, eps: float
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """dq, dk, dv and the per-row parameter gradients d1, d2 (B, H, T, C)."""
    B, H, T, D = q.shape
    Hkv, C = k.shape[1], p1.shape[-1]
    if do.stride(-1) != 1:
        do = do.contiguous()
    spec = (kernel, settle, C, D, T % _ALIGN == 0, q.dtype)
    meta, key = _meta(*spec), (T, H // Hkv, *spec)
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    f32 = dict(device=q.device, dtype=torch.float32)
    delta, d1, d2 = torch.empty(B, H, T, **f32), torch.empty(B, H, T, C, **f32), torch.empty(B, H, T, C, **f32)
    ps = _param_strides(p1, p2)
    grid = lambda m: (B * H, triton.cdiv(T, m["BLOCK_M"]))  # noqa: E731
    _launch(_bwd_dq, grid, [q, k, v, o, do, dq, lse, kn, delta, p1, p2, d1, d2, *_strides(q, k, v, o, do, dq), *ps,
                            H, H // Hkv, T, eps], meta, key)
    grid = lambda m: (B * Hkv, triton.cdiv(T, m["BLOCK_N"]))  # noqa: E731
    _launch(_bwd_dkdv, grid, [q, k, v, do, dk, dv, lse, qn, delta, p1, p2, *_strides(q, k, v, do, dk, dv), *ps,
                              H, H // Hkv, T, eps], meta, key)
    return dq, dk, dv, d1, d2


@torch.library.custom_op("pcgpt::flash_attention_fwd", mutates_args=())
def _forward_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, p1: torch.Tensor, p2: torch.Tensor,
                kernel: str, settle: bool, eps: float
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return _forward(q, k, v, p1, p2, kernel, settle, eps)


@_forward_op.register_fake
def _(q, k, v, p1, p2, kernel, settle, eps):
    B, H, T, D = q.shape
    f32 = dict(device=q.device, dtype=torch.float32)
    return _new_output(q), q.new_empty(B, H, T, **f32), q.new_empty(B, H, T, **f32), q.new_empty(B, k.shape[1], T, **f32)


@torch.library.custom_op("pcgpt::flash_attention_bwd", mutates_args=())
def _backward_op(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor,
                 lse: torch.Tensor, qn: torch.Tensor, kn: torch.Tensor, p1: torch.Tensor, p2: torch.Tensor,
                 kernel: str, settle: bool, eps: float
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return _backward(do, q, k, v, o, lse, qn, kn, p1, p2, kernel, settle, eps)


@_backward_op.register_fake
def _(do, q, k, v, o, lse, qn, kn, p1, p2, kernel, settle, eps):
    B, H, T, D = q.shape
    rows = q.new_empty(B, H, T, p1.shape[-1], dtype=torch.float32)
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v), rows, torch.empty_like(rows)


def _sum_to(grad: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Per-row gradients (B, H, T, C) summed over the dims `like` broadcasts (size 1)."""
    dims = [i for i, n in enumerate(like.shape) if n == 1 and grad.shape[i] != 1]
    return grad.sum(dims, keepdim=True) if dims else grad


def _setup_context(ctx, inputs, output):
    q, k, v, p1, p2, kernel, settle, eps = inputs
    o, lse, qn, kn = output
    ctx.save_for_backward(q, k, v, p1, p2, o, lse, qn, kn)
    ctx.kernel, ctx.settle, ctx.eps = kernel, settle, eps


def _gradients(ctx, do: torch.Tensor, backward) -> tuple:
    """The inputs' gradients from dO, with `backward` the op or its body (`_EagerAttention`)."""
    q, k, v, p1, p2, o, lse, qn, kn = ctx.saved_tensors
    dq, dk, dv, d1, d2 = backward(do, q, k, v, o, lse, qn, kn, p1, p2, ctx.kernel, ctx.settle, ctx.eps)
    two = ctx.kernel in ("student_t", "mixture")                   # kernels with a second parameter
    dp1 = _sum_to(d1, p1) if ctx.needs_input_grad[3] else None
    dp2 = _sum_to(d2, p2) if ctx.needs_input_grad[4] and two else None
    return dq, dk, dv, dp1, dp2, None, None, None


def _op_backward(ctx, do, _lse, _qn, _kn):
    return _gradients(ctx, do, _backward_op)


def _no_double_backward(ctx, *grads):
    raise RuntimeError("the Triton attention kernels have no double backward: run what differentiates "
                       "through attention twice inside model.attention.twice_differentiable()")


_forward_op.register_autograd(_op_backward, setup_context=_setup_context)
_backward_op.register_autograd(_no_double_backward)


class _EagerAttention(torch.autograd.Function):
    """pcgpt::flash_attention_fwd with its autograd, called directly: the same launches and
    gradients without the custom op's Python layers (dispatcher redispatch, argument default
    filling, the output-aliasing check; ~35 µs of host time per forward on a CPU), and without
    zero gradients materialised for the unused lse, qn, kn. torch.compile traces the op instead
    (`flash_attention`); CUDA graphs capture either."""

    @staticmethod
    def forward(ctx, q, k, v, p1, p2, kernel, settle, eps):
        output = _forward(q, k, v, p1, p2, kernel, settle, eps)
        _setup_context(ctx, (q, k, v, p1, p2, kernel, settle, eps), output)
        ctx.mark_non_differentiable(*output[1:])
        ctx.set_materialize_grads(False)
        return output

    @staticmethod
    def backward(ctx, do, _lse, _qn, _kn):
        # create_graph=True: through the op, whose own backward refuses a second derivative
        return _gradients(ctx, do, _backward_op if torch.is_grad_enabled() else _backward)


def supports(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    """Shapes and dtypes these kernels take: T == S, a power-of-two head dim 16…128 shared by
    q, k and v (fp32: up to 64, whose tiles fit shared memory), one floating dtype, contiguous
    head dims."""
    return (q.dtype in DTYPES and k.dtype == q.dtype and v.dtype == q.dtype and q.shape[-1] in HEAD_DIMS
            and (q.dtype != torch.float32 or q.shape[-1] <= 64)
            and k.shape[-1] == q.shape[-1] and v.shape[-1] == q.shape[-1] and q.shape[-2] == k.shape[-2]
            and q.shape[1] % k.shape[1] == 0 and all(x.stride(-1) == 1 for x in (q, k, v)))


def flash_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kernel: str, p1: torch.Tensor,
                    p2: torch.Tensor, settle: bool = False, eps: float = 0.0) -> torch.Tensor:
    """Causal attention of q (B, H, T, D) over k, v (B, Hkv, T, D) with score kernel `kernel`.

    p1, p2: fp32 (B|1, H|1, T|1, C) per-row parameters (module docstring); returns (B, H, T, D)."""
    args = (q, k, v, p1.float(), p2.float(), kernel, bool(settle), float(eps))
    if torch.compiler.is_compiling():
        return _forward_op(*args)[0]  # one opaque op in the graph
    if not torch.is_grad_enabled():
        return _forward(*args)[0]
    return _EagerAttention.apply(*args)[0]
