"""The Triton flash kernels (model/triton_attention.py) equal the O(L²) reference.

Without a GPU they run in Triton's CPU interpreter (TRITON_INTERPRET=1, set here before the
kernels are first imported; blocks of 16), in fp32 and fp16: the interpreter's bf16 matmul
multiplies raw bit patterns (triton 3.6–3.9), so bf16 is checked by the gpu tests. With a
GPU the same tests run compiled. Every check draws fresh random inputs and compares the
output and every gradient (q, k, v, λ, ν, mixture weights) with the reference.
"""

from __future__ import annotations

import math
import os
import zlib

import pytest
import torch
import torch.nn.functional as F

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
pytest.importorskip("triton", reason="triton is not installed (pip install triton to run these)")

import model.attention  # noqa: E402,F401
from model.attention import KernelParams, attention, twice_differentiable  # noqa: E402

KERNELS = ["dot", "gaussian", "student_t", "laplace", "mixture"]
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
NAMES = ["q", "k", "v", "log_lam", "nu_raw", "mix"]


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def leaves(kernel: str, mode: str, *, B=2, H=4, Hkv=2, T=21, D=16, C=3, dtype=torch.float32, seed=0) -> dict:
    """Random q, k, v and precision parameters at working values (λ ≈ 1/√D, ν ≈ 4), as leaves
    (`fixed`: λ and the mixture weights constant, the weights uniform, as in the model)."""
    g = torch.Generator().manual_seed(seed)
    C = C if kernel == "mixture" else 1

    def rnd(*shape, scale=1.0, shift=0.0, dt=torch.float32):
        x = torch.randn(*shape, generator=g) * scale + shift
        return x.to(device=DEVICE, dtype=dt).requires_grad_(True)

    lam_shape = {"fixed": (1, 1, 1, C), "head": (1, H, 1, C), "token": (B, H, T, C)}[mode]
    return dict(q=rnd(B, H, T, D, dt=dtype), k=rnd(B, Hkv, T, D, dt=dtype), v=rnd(B, Hkv, T, D, dt=dtype),
                log_lam=rnd(*lam_shape, scale=0.3, shift=-0.5 * math.log(D)).requires_grad_(mode != "fixed"),
                nu_raw=rnd(H, scale=0.3, shift=math.log(math.expm1(3.5))),
                mix=rnd(H, C, scale=0.5).requires_grad_(mode != "fixed"))


def run(kernel: str, t: dict, impl: str, settle: bool = False):
    nu = F.softplus(t["nu_raw"]) + 0.5 if kernel == "student_t" else None
    log_mix = t["mix"].log_softmax(-1) if kernel == "mixture" and t["mix"].requires_grad else None  # None: uniform
    p = KernelParams(kernel, t["log_lam"].exp(), nu, log_mix, 1e-6)
    y = attention(t["q"], t["k"], t["v"], p, impl=impl, settle=settle)
    weight = torch.linspace(-1, 1, y.numel(), device=y.device).view_as(y)  # a generic upstream gradient
    wrt = [n for n in NAMES if t[n].requires_grad]
    grads = torch.autograd.grad((y.float() * weight).sum(), [t[n] for n in wrt], allow_unused=True)
    return y, dict(zip(wrt, grads))


def check(kernel: str, mode: str, settle: bool = False, dtype=torch.float32, **shape) -> None:
    """Triton on `dtype` inputs vs the reference in fp32 on the same (rounded) inputs.

    fp32: 2e-5 (the kernels reassociate sums; d² comes from the expansion ‖q‖² + ‖k‖² − 2q·k).
    fp16: 1e-2 for outputs and q/k/v gradients (P and dS meet V, K, Q in fp16), 1e-2 for the
    precision parameters (their row sums are fp32 with the exact W, triton_attention's docstring)."""
    seed = zlib.crc32(f"{kernel}-{mode}-{settle}-{dtype}-{shape}".encode())
    t = leaves(kernel, mode, dtype=dtype, seed=seed, **shape)
    t32 = {n: x.detach().float().requires_grad_(x.requires_grad) for n, x in t.items()}
    y, g = run(kernel, t, "triton", settle)
    y_ref, g_ref = run(kernel, t32, "reference", settle)
    tol = 2e-5 if dtype == torch.float32 else 1e-2
    assert y.dtype == dtype and torch.isfinite(y).all()
    assert rel(y, y_ref) < tol, rel(y, y_ref)
    for name, gr in g_ref.items():
        if gr is None:
            assert g[name] is None, name
            continue
        assert g[name] is not None and g[name].shape == gr.shape, name
        assert rel(g[name], gr) < tol, (name, rel(g[name], gr))


@pytest.mark.parametrize("kernel", KERNELS)
def test_triton_equals_reference(kernel):
    """Causal, GQA (4 query heads on 2 kv heads), per-token λ, length 21 (not a multiple of
    the block), fp32: output and every gradient to 2e-5."""
    check(kernel, "token", B=1, C=2)


@pytest.mark.slow
@pytest.mark.parametrize("settle", [False, True], ids=["attend", "settle-target"])
@pytest.mark.parametrize("mode", ["fixed", "head", "token"])
@pytest.mark.parametrize("kernel", KERNELS)
def test_triton_equals_reference_every_mode(kernel, mode, settle):
    """Every kernel × precision mode × settling target; lengths that fill the blocks (32) and
    that do not (45, MHA), fp32 and fp16."""
    if settle:
        check(kernel, mode, settle, T=32)
    else:
        check(kernel, mode, settle, dtype=torch.float16, T=45, H=2, Hkv=2, C=2)


@pytest.mark.slow
def test_triton_under_torch_compile():
    """The custom ops trace into one graph (fullgraph) and give the eager results, gradients too."""
    t = leaves("student_t", "head", B=1, H=2, Hkv=1)

    def f(q, k, v, log_lam, nu_raw):
        p = KernelParams("student_t", log_lam.exp(), F.softplus(nu_raw), None, 1e-6)
        return attention(q, k, v, p, impl="triton")

    args = [t[n] for n in NAMES[:5]]
    y = torch.compile(f, fullgraph=True)(*args)
    g = torch.autograd.grad(y.square().sum(), args)
    y0 = f(*args)
    g0 = torch.autograd.grad(y0.square().sum(), args)
    assert rel(y, y0) < 1e-6
    for a, b in zip(g, g0):
        assert rel(a, b) < 1e-6


def test_no_double_backward_through_triton_and_the_way_around_it():
    """The kernels have first derivatives only: a second backward through them fails loudly;
    inside twice_differentiable() the same call takes a twice-differentiable path."""
    t = leaves("laplace", "head", B=1, H=2, Hkv=1, T=9)
    p = KernelParams("laplace", t["log_lam"].exp(), None, None, 1e-6)
    y = attention(t["q"], t["k"], t["v"], p, impl="triton")
    dq, = torch.autograd.grad(y.square().sum(), t["q"], create_graph=True)
    with pytest.raises(RuntimeError, match="twice_differentiable"):
        torch.autograd.grad(dq.square().sum(), t["k"])
    with twice_differentiable():
        y = attention(t["q"], t["k"], t["v"], p)
        dq, = torch.autograd.grad(y.square().sum(), t["q"], create_graph=True)
        dk, = torch.autograd.grad(dq.square().sum(), t["k"])
    assert torch.isfinite(dk).all() and dk.abs().sum() > 0


def test_supports_only_what_the_kernels_take():
    from model import triton_attention as ta
    q = torch.randn(1, 4, 8, 16)
    k = torch.randn(1, 2, 8, 16)
    assert ta.supports(q, k, k)
    assert not ta.supports(q, k[..., :5, :], k[..., :5, :])          # T != S (cached decoding)
    assert not ta.supports(q[..., :8], k[..., :8], k[..., :8])       # head dim 8
    assert not ta.supports(q, k, k.double())                         # mixed dtypes
    assert not ta.supports(q.transpose(-1, -2), k, k)                # head dim not contiguous
    wide = torch.randn(1, 2, 8, 128)
    assert ta.supports(wide.half(), wide.half(), wide.half()) and not ta.supports(wide, wide, wide)  # fp32 ≤ 64


# -- GPU: bf16, CUDA graphs -----------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.parametrize("kernel", KERNELS)
def test_gpu_bf16_small_shapes(kernel):
    """bf16 at D=64 over lengths around the block sizes (63, 64, 65, 129), GQA and token λ,
    within test_attention's bf16 bounds (q/k/v 3e-2, student_t 5e-2; parameters 0.1)."""
    for T in (63, 64, 65, 129):
        t = leaves(kernel, "token", B=2, H=4, Hkv=2, T=T, D=64, C=2, dtype=torch.bfloat16, seed=T)
        t32 = {n: x.detach().float().requires_grad_(x.requires_grad) for n, x in t.items()}
        y, g = run(kernel, t, "triton")
        y_ref, g_ref = run(kernel, t32, "reference")
        assert rel(y, y_ref) < 2e-2, (T, rel(y, y_ref))
        for name, gr in g_ref.items():
            if gr is not None:
                bound = (5e-2 if kernel == "student_t" else 3e-2) if name in ("q", "k", "v") else 0.1
                assert rel(g[name], gr) < bound, (T, name, rel(g[name], gr))


@pytest.mark.gpu
@pytest.mark.parametrize("kernel", ["gaussian", "student_t", "laplace", "mixture"])
def test_gpu_cuda_graphs(kernel):
    """torch.compile(mode="reduce-overhead") (CUDA graphs) and a hand-captured torch.cuda.graph
    replay forward + backward with the eager results: no host syncs inside."""
    t = leaves(kernel, "token", B=2, H=4, Hkv=2, T=255, D=64, C=2, dtype=torch.bfloat16)
    args = [t[n] for n in NAMES]

    def forward(q, k, v, log_lam, nu_raw, mix):
        nu = F.softplus(nu_raw) if kernel == "student_t" else None
        log_mix = mix.log_softmax(-1) if kernel == "mixture" else None
        return attention(q, k, v, KernelParams(kernel, log_lam.exp(), nu, log_mix, 1e-6), impl="triton")

    def step(forward, args):
        y = forward(*args)
        return [y.detach().clone()] + list(torch.autograd.grad(y.float().square().sum(), args[:4]))

    eager = step(forward, args)
    compiled = torch.compile(forward, mode="reduce-overhead")
    for _ in range(3):  # warm-up runs (autotuning happens there), then graph replays
        out = step(compiled, args)
    for a, b in zip(out, eager):
        assert rel(a, b) < 1e-3
    # Fresh leaves for the hand capture: an autograd leaf's AccumulateGrad node remembers the
    # stream it was created on, and one from the default stream that something above still
    # keeps alive makes the captured backward wait on that stream, which capture forbids.
    args = [x.detach().clone().requires_grad_(x.requires_grad) for x in args]
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        step(forward, args)
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = step(forward, args)
    for x in args:  # fresh inputs in the same buffers: the replay must recompute
        with torch.no_grad():
            x.copy_(torch.randn_like(x) * 0.1 + x)
    graph.replay()
    expected = step(forward, args)
    torch.cuda.synchronize()
    for a, b in zip(captured, expected):
        assert rel(a, b) < 1e-3
