"""Precision-weighted attention: every fast path equals its explicit O(L²) definition."""

from __future__ import annotations

import math
import sys
import zlib

import pytest
import torch
import torch.nn.functional as F

from model import GPTConfig
import model.attention  # noqa: F401
from model.attention import (CausalSelfAttention, KernelParams, attention, causal_mask, reference_attention,
                             twice_differentiable)

ATTENTION = sys.modules["model.attention"]  # the module (the package exports a function of that name)

KERNELS = ["dot", "gaussian", "student_t", "laplace", "mixture"]
SDPA_KERNELS = ["dot", "gaussian", "mixture"]  # SDPA on augmented inputs (student_t/laplace off Triton: the reference)
TOL = 1e-5  # relative (‖a − b‖ / ‖b‖), fp32


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def leaves(kernel: str, mode: str, B=2, H=4, Hkv=2, T=13, S=13, D=8, C=3, seed=0, device="cpu",
           dtype=torch.float32):
    """Fresh random q, k, v and precision parameters (leaf tensors that require grad)."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    C = C if kernel == "mixture" else 1

    def rnd(*shape, scale=1.0, shift=0.0):
        t = torch.randn(*shape, generator=g) * scale + shift
        return t.to(device=device, dtype=dtype).requires_grad_(True)

    lam_shape = (B, H, T, C) if mode == "token" else (1, H, 1, C)
    return dict(q=rnd(B, H, T, D), k=rnd(B, Hkv, S, D), v=rnd(B, Hkv, S, D),
                log_lam=rnd(*lam_shape, scale=0.3, shift=-1.0).float(),
                nu_raw=rnd(H, shift=1.0).float(), mix=rnd(H, C).float())


def params_of(kernel: str, t: dict) -> KernelParams:
    nu = F.softplus(t["nu_raw"]) + 0.5 if kernel == "student_t" else None
    log_mix = t["mix"].log_softmax(-1) if kernel == "mixture" else None
    return KernelParams(kernel, t["log_lam"].exp(), nu, log_mix, 1e-6)


def run(kernel: str, t: dict, impl: str, **kw):
    y = attention(t["q"], t["k"], t["v"], params_of(kernel, t), impl=impl, **kw)
    weight = torch.linspace(-1, 1, y.numel(), device=y.device).view_as(y)  # a generic upstream gradient
    names = ["q", "k", "v", "log_lam", "nu_raw", "mix"]
    grads = torch.autograd.grad((y.float() * weight).sum(), [t[n] for n in names], allow_unused=True)
    return y, dict(zip(names, grads))


@pytest.mark.parametrize("settle", [False, True], ids=["attend", "settle-target"])
@pytest.mark.parametrize("mode", ["head", "token"])
@pytest.mark.parametrize("kernel", SDPA_KERNELS)
def test_sdpa_path_equals_reference_outputs_and_gradients(kernel, mode, settle):
    """Causal, GQA (4 query heads on 2 kv heads), odd length 13, fp32, to 1e-5 relative."""
    t = leaves(kernel, mode, seed=zlib.crc32(f"{kernel}-{mode}-{settle}".encode()))
    y_fast, g_fast = run(kernel, t, "sdpa", settle=settle)
    y_ref, g_ref = run(kernel, t, "reference", settle=settle)
    assert rel(y_fast, y_ref) < TOL
    for name, g in g_ref.items():
        if g is None:
            assert g_fast[name] is None, name
            continue
        assert rel(g_fast[name], g) < TOL, (name, rel(g_fast[name], g))
    assert g_ref["log_lam"] is not None and g_ref["log_lam"].abs().sum() > 0
    if kernel == "mixture":
        assert g_ref["mix"].abs().sum() > 0


def ragged_mask() -> torch.Tensor:
    """(2, 1, 3, 10): row b's query t sees keys j <= lengths[b] + t, lengths = (4, 7)."""
    lengths = torch.tensor([4, 7])
    return torch.arange(10).view(1, 1, 1, 10) <= (lengths.view(2, 1, 1, 1) + torch.arange(3).view(1, 1, 3, 1))


@pytest.mark.parametrize("kernel", SDPA_KERNELS)
def test_sdpa_path_with_cache_offset_and_ragged_mask(kernel):
    """Fewer queries than keys (decoding over a cache) and a per-row key mask (ragged batch)."""
    t = leaves(kernel, "head", T=3, S=10, seed=7)
    y_fast, g_fast = run(kernel, t, "sdpa")
    y_ref, g_ref = run(kernel, t, "reference")
    assert rel(y_fast, y_ref) < TOL and rel(g_fast["q"], g_ref["q"]) < TOL and rel(g_fast["k"], g_ref["k"]) < TOL
    y_fast, g_fast = run(kernel, t, "sdpa", mask=ragged_mask())
    y_ref, g_ref = run(kernel, t, "reference", mask=ragged_mask())
    assert rel(y_fast, y_ref) < TOL and rel(g_fast["v"], g_ref["v"]) < TOL


@pytest.mark.parametrize("kernel", KERNELS)
def test_ragged_mask_is_honoured(kernel):
    """Key 9 is masked for row 0 (it sees j <= 6) and visible to row 1 (j <= 9): changing it
    changes row 1 only."""
    t = leaves(kernel, "head", T=3, S=10, seed=7)
    mask = ragged_mask()
    k2 = t["k"].detach().clone()
    k2[:, :, 9] += 5.0
    p = params_of(kernel, t)
    with torch.no_grad():
        a = attention(t["q"], t["k"], t["v"], p, mask=mask)
        b = attention(t["q"], k2, t["v"], p, mask=mask)
    assert torch.equal(a[0], b[0]) and not torch.allclose(a[1], b[1])


def test_gaussian_fixed_equals_closed_form():
    """−(λ/2)‖q−k‖² softmax = dot attention with scale λ and key bias −(λ/2)‖k‖²."""
    cfg = GPTConfig(n_layer=1, n_head=4, n_kv_head=2, n_embd=64, block_size=32,
                    attention=dict(kernel="gaussian", precision="fixed"))
    attn = CausalSelfAttention(cfg)
    g = torch.Generator().manual_seed(1)
    q, k, v = torch.randn(2, 4, 11, 16, generator=g), torch.randn(2, 2, 11, 16, generator=g), torch.randn(2, 2, 11, 16, generator=g)
    lam = 1 / math.sqrt(16)
    k4, v4 = k.repeat_interleave(2, 1), v.repeat_interleave(2, 1)
    bias = (-0.5 * lam * k4.square().sum(-1)).unsqueeze(-2)                      # (B, H, 1, S)
    bias = bias.masked_fill(~causal_mask(11, 11), float("-inf"))
    closed = F.scaled_dot_product_attention(q, k4, v4, attn_mask=bias, scale=lam)
    assert rel(attn.attend(q, k, v), closed) < TOL
    assert attn.precision() == pytest.approx(torch.full((4,), lam))


def test_mixture_with_one_component_equals_gaussian():
    torch.manual_seed(0)
    mods = {}
    for kernel in ("gaussian", "mixture"):
        cfg = GPTConfig(n_layer=1, n_head=4, n_embd=32, block_size=16,
                        attention=dict(kernel=kernel, precision="head", n_components=1))
        mods[kernel] = CausalSelfAttention(cfg)
    mods["mixture"].load_state_dict(mods["gaussian"].state_dict(), strict=False)
    with torch.no_grad():
        mods["gaussian"].log_precision.copy_(torch.randn(4))
        mods["mixture"].log_precision.copy_(mods["gaussian"].log_precision)
        mods["mixture"].mix_logits.fill_(0.3)  # one component: its weight is 1 whatever the logit
    x = torch.randn(2, 9, 32)
    cos, sin = torch.ones(1, 1, 9, 4), torch.zeros(1, 1, 9, 4)
    assert rel(mods["mixture"](x, cos, sin), mods["gaussian"](x, cos, sin)) < TOL


@pytest.mark.parametrize("kernel", KERNELS)
def test_precision_parameters_per_mode(kernel):
    base = dict(n_layer=1, n_head=4, n_embd=32, block_size=16)
    fixed = CausalSelfAttention(GPTConfig(**base, attention=dict(kernel=kernel, precision="fixed")))
    names = {n for n, _ in fixed.named_parameters()}
    assert not any("precision" in n or "mix" in n for n in names), names  # nothing learnable
    assert ("nu_raw" in names) == (kernel == "student_t")                 # ν is always learned
    lam = fixed.precision()
    if kernel == "dot":
        assert lam is None
    else:
        assert lam.shape == (4,)
    head = CausalSelfAttention(GPTConfig(**base, attention=dict(kernel=kernel, precision="head",
                                                                precision_min=0.01, precision_max=10.0)))
    assert head.log_precision.requires_grad
    with torch.no_grad():
        head.log_precision.copy_(torch.tensor([-50.0, 50.0, 0.0, 0.0]).repeat_interleave(head.n_components))
    lam = head.component_precisions()
    assert lam[0].max() == pytest.approx(0.01) and lam[1].min() == pytest.approx(10.0)  # clamped
    assert head.precision().shape == (4,)
    if kernel == "student_t":
        assert head.nu().shape == (4,) and (head.nu() > 0).all()
        assert head.nu() == pytest.approx(torch.full((4,), 4.0))  # nu_init
    else:
        assert head.nu() is None


def test_token_precision_reports_last_batch_mean():
    cfg = GPTConfig(n_layer=1, n_head=2, n_embd=16, block_size=16,
                    attention=dict(kernel="gaussian", precision="token"))
    attn = CausalSelfAttention(cfg)
    assert attn.precision() == pytest.approx(torch.full((2,), 8 ** -0.5))  # zero projection at init
    with torch.no_grad():
        attn.precision_proj.weight.normal_()
    x = torch.randn(3, 5, 16)
    attn(x, torch.ones(1, 1, 5, 4), torch.zeros(1, 1, 5, 4))
    lam = attn._lam(x).detach()  # (B, H, T, 1)
    assert attn.precision() == pytest.approx(lam.mean(dim=(0, 2)).squeeze(-1))


@pytest.mark.parametrize("kernel", ["gaussian", "student_t", "laplace", "mixture"])
def test_settling_descends_the_attention_energy(kernel):
    """The EM / mean-shift (IRLS) step never raises E(q) = −log Σ_j exp ℓ_ij, and its fixed
    point has q = Σ_j a_ij k_j (the settling residual shrinks)."""
    t = {n: x.detach() for n, x in leaves(kernel, "head", T=9, S=9, seed=5).items()}
    p = params_of(kernel, t)
    B, H, T, D = t["q"].shape

    def energy(q):
        # the reference's scores: attention weights are softmax(ℓ), so E = −logsumexp(ℓ)
        return -_scores(q, t["k"], p).logsumexp(-1)

    q = t["q"]
    energies, residuals = [energy(q)], []
    for _ in range(8):
        target = reference_attention(q, t["k"], t["k"], p, settle=True)
        residuals.append((target - q).norm())
        q = target  # rate 1: the EM step
        energies.append(energy(q))
    for before, after in zip(energies, energies[1:]):
        assert (after <= before + 1e-4).all()
    assert residuals[-1] < 0.1 * residuals[0]


def _scores(q, k, p: KernelParams) -> torch.Tensor:
    """ℓ_ij from the definition (DESIGN §3), causal."""
    H, D = q.shape[1], q.shape[-1]
    kk = k.repeat_interleave(H // k.shape[1], 1)
    d2 = (q.unsqueeze(-2) - kk.unsqueeze(-3)).square().sum(-1)
    lam = p.lam[..., :1]
    if p.kernel == "dot":
        s = lam * (q @ kk.transpose(-2, -1))
    elif p.kernel == "gaussian":
        s = -0.5 * lam * d2
    elif p.kernel == "student_t":
        nu = p.nu.view(1, H, 1, 1)
        s = -(nu + D) / 2 * torch.log1p(lam * d2 / nu)
    elif p.kernel == "laplace":
        s = -(lam * d2 + p.eps).sqrt()
    else:
        lc = p.lam.unsqueeze(-2)
        s = (p.log_mix.view(1, H, 1, 1, -1) + 0.5 * D * lc.log() - 0.5 * lc * d2.unsqueeze(-1)).logsumexp(-1)
    return s.masked_fill(~causal_mask(q.shape[-2], k.shape[-2]), float("-inf"))


def test_settling_in_the_module_moves_queries_and_keeps_causality():
    torch.manual_seed(0)
    cfg = GPTConfig(n_layer=1, n_head=2, n_embd=16, block_size=16,
                    attention=dict(kernel="gaussian", precision="head", settle_steps=3, settle_rate=0.5))
    attn = CausalSelfAttention(cfg)
    x = torch.randn(1, 7, 16)
    cos, sin = torch.ones(1, 1, 7, 4), torch.zeros(1, 1, 7, 4)
    y = attn(x, cos, sin)
    cfg0 = GPTConfig(n_layer=1, n_head=2, n_embd=16, block_size=16,
                     attention=dict(kernel="gaussian", precision="head"))
    plain = CausalSelfAttention(cfg0)
    plain.load_state_dict(attn.state_dict())
    assert not torch.allclose(y, plain(x, cos, sin))
    # Position 3's output depends only on tokens 0..3, settling included.
    x2 = x.clone()
    x2[:, 4:] += 1.0
    assert torch.allclose(attn(x2, cos, sin)[:, :4], y[:, :4], atol=1e-6)


@pytest.mark.parametrize("kernel", KERNELS)
def test_twice_differentiable_gives_second_derivatives(kernel):
    """Inside twice_differentiable() every kernel has a double backward (pc's `settle`
    differentiates through attention twice), equal to that of the definition (`_scores`,
    d² by differences); outside it the CPU path of student_t/laplace (cdist) has none."""
    t = leaves(kernel, "token", T=9, S=9, seed=4)

    def second(attend):
        y = attend(t["q"], t["k"], t["v"], params_of(kernel, t))
        dq, = torch.autograd.grad(y.square().sum(), t["q"], create_graph=True)
        return torch.autograd.grad(dq.square().sum(), [t["k"], t["log_lam"]])

    def definition(q, k, v, p):
        return _scores(q, k, p).softmax(-1) @ v.repeat_interleave(q.shape[1] // v.shape[1], 1)

    with twice_differentiable():
        path = ATTENTION._auto(t["q"], t["k"], t["v"], params_of(kernel, t), None)
        assert path == ("sdpa" if kernel in ("dot", "gaussian", "mixture") else "reference")
        got = second(attention)
    for a, b in zip(got, second(definition)):
        assert rel(a, b) < 1e-4
    if kernel in ("student_t", "laplace"):
        with pytest.raises(NotImplementedError, match="derivative"):
            second(attention)


def test_impl_is_checked():
    t = leaves("gaussian", "head", T=5, S=5)
    p = params_of("gaussian", t)
    for impl, kernel in (("flex", "student_t"), ("sdpa", "laplace"), ("fast", "gaussian")):
        with pytest.raises(ValueError, match="impl="):
            attention(t["q"], t["k"], t["v"], params_of(kernel, t), impl=impl)
    assert ATTENTION._auto(t["q"], t["k"], t["v"], p, None) == "sdpa"  # CPU never takes triton


# -- GPU: the fused paths (Triton, flash SDPA, augmented SDPA) -------------------------------

@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("kernel,impl", [(k, "auto") for k in KERNELS] + [("gaussian", "sdpa"), ("mixture", "sdpa")])
def test_gpu_fused_path_equals_reference(kernel, impl, dtype):
    """The fused paths vs the fp32 reference on the same inputs, at working values (D=64,
    λ ≈ 1/√D, ν ≈ 4), causal, GQA, odd length 333: `auto` (the Triton kernels, flash SDPA for
    dot) and `sdpa` for gaussian/mixture (augmented SDPA: their GPU path for cached decoding
    and masks, here on the self-attention Triton takes).

    fp32: outputs and q/k/v gradients to 1e-4 (the kernels reassociate sums), precision-
    parameter gradients to 2e-3 (sums over every score). bf16: 3e-2 resp. 5e-2 for outputs
    and q/k/v gradients (student_t is the sharpest kernel: its scores move
    ~(ν+D)/(2(ν/β + d²)) per unit of d²); precision-parameter gradients (λ, ν, π) to 0.1 on
    the Triton kernels (fp32 row sums with the exact W, triton_attention's docstring; the bound
    of test_triton_attention's bf16 test), and to 0.3 on SDPA (dot's λ·q, gaussian/mixture's
    augmented query: λ sits in a bf16 input, its gradient a reduction of bf16 dq' with
    cancellation). A wrong formula gives errors of order 1.
    """
    sharp = kernel == "student_t"
    if dtype == torch.float32:
        tol, tol_param = 1e-4, 2e-3
    else:
        tol, tol_param = 5e-2 if sharp else 3e-2, 0.1 if impl == "auto" and kernel != "dot" else 0.3
    for mode in ("head", "token"):
        t = leaves(kernel, mode, B=2, H=4, Hkv=2, T=333, S=333, D=64, C=2, seed=11, device="cuda", dtype=dtype)
        with torch.no_grad():  # working values: λ ≈ 1/√D, ν ≈ 4 (nu_raw = softplus⁻¹(3.5); +0.5 in params_of)
            t["log_lam"].mul_(0.3).add_(-0.5 * math.log(64) + 0.3)
            t["nu_raw"].mul_(0.1).add_(math.log(math.expm1(3.5)))
        t32 = {n: x.detach().float().requires_grad_(True) for n, x in t.items()}
        y, g = run(kernel, t, impl)
        y_ref, g_ref = run(kernel, t32, "reference")
        assert torch.isfinite(y).all()
        assert rel(y, y_ref) < tol, (mode, rel(y, y_ref))
        for name, gr in g_ref.items():
            if gr is None:
                continue
            bound = tol if name in ("q", "k", "v") else tol_param
            assert rel(g[name], gr) < bound, (mode, name, rel(g[name], gr))


@pytest.mark.parametrize("kernel", KERNELS)
def test_values_wider_than_the_head_dim(kernel):
    """v of any width (e.g. the identity, whose output is the attention matrix itself)."""
    torch.manual_seed(0)
    B, H, T, D = 1, 2, 19, 8
    q, k = torch.randn(B, H, T, D), torch.randn(B, H, T, D)
    eye = torch.eye(T).expand(B, H, T, T).contiguous()
    cfg = GPTConfig(n_layer=1, n_head=H, n_embd=H * D, block_size=32,
                    attention=dict(kernel=kernel, precision="fixed" if kernel == "dot" else "head"))
    p = CausalSelfAttention(cfg).kernel_params()
    fast, ref = attention(q, k, eye, p), reference_attention(q, k, eye, p)
    assert fast.shape == (B, H, T, T)
    torch.testing.assert_close(fast, ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(fast.sum(-1), torch.ones(B, H, T))  # rows are probabilities
    assert fast.triu(1).abs().max() == 0                             # causal
