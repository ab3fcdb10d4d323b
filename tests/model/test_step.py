"""model/step.py: one optimizer step as one callable, eager, compiled, and captured in a CUDA graph."""

from __future__ import annotations

import copy

import pytest
import torch

from model import GPTConfig, build_model
from model.step import TrainStep
from model.utils import make_optimizer

PCS = {
    "bp": {},
    "pc_fixed": dict(algorithm="pc", settle_steps=3, state_lr=1.0, fixed_predictions=True, precision="layer"),
    "pc": dict(algorithm="pc", settle_steps=3, state_lr=0.5, precision="layer"),
    "ipc": dict(algorithm="ipc", settle_steps=2, state_lr=0.5),
    "settle": dict(algorithm="settle", settle_steps=2, state_lr=0.5),
}


def model_for(pc: dict, kernel: str = "gaussian", device: str = "cpu", seed: int = 0):
    torch.manual_seed(seed)
    cfg = GPTConfig(vocab_size=61, block_size=16, n_layer=3, n_head=2, n_embd=32,
                    attention=dict(kernel=kernel, precision="head" if kernel != "dot" else "fixed"), pc=pc)
    return build_model(cfg).to(device)


def data(accum: int = 2, B: int = 3, T: int = 16, seed: int = 1, device: str = "cpu"):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 61, (accum, B, T), generator=g)
    return x.to(device), torch.roll(x, -1, dims=-1).to(device)


def manual_step(model, opt, x, y, lr, clip):
    for group in opt.param_groups:
        group["lr"] = lr
    losses = []
    for i in range(x.shape[0]):
        loss, _ = model.training_step(x[i], y[i], grad_scale=1.0 / x.shape[0], optimizer=opt)
        losses.append(loss)
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return sum(l.float() for l in losses) / len(losses), norm


@pytest.mark.parametrize("name", PCS)
def test_eager_step_is_the_hand_written_loop(name):
    """accumulation, clipping, lr, the optimizer: bit for bit the loop a user would write."""
    a = model_for(PCS[name])
    b = copy.deepcopy(a)
    opt_a, opt_b = (make_optimizer(m, "adamw", lr=1e-3, weight_decay=0.1) for m in (a, b))
    step = TrainStep(b, opt_b, accum=2, grad_clip=0.5)
    for s in range(3):
        x, y = data(seed=s)
        want_loss, want_norm = manual_step(a, opt_a, x, y, lr=1e-3 * (s + 1), clip=0.5)
        loss, norm, diag = step(x, y, lr=1e-3 * (s + 1))
        assert torch.equal(loss, want_loss) and torch.equal(norm, want_norm)
    for (n, p), q in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(p, q), n
    assert all(p.grad is None for p in b.parameters())
    if name != "bp":
        assert "pc/settle_residual" in diag


def test_step_checks_its_inputs():
    model = model_for({})
    step = TrainStep(model, make_optimizer(model), accum=2)
    x, y = data(accum=1)
    with pytest.raises(ValueError, match=r"\(2, B, T\)"):
        step(x, y, 1e-3)
    with pytest.raises(ValueError, match="CUDA"):
        TrainStep(model, make_optimizer(model), capture=True)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["bp", "pc_fixed", "pc"])
def test_compiled_step_matches_eager_on_cpu(name):
    """PCGPT.compile() compiles each block and the head + loss (what settling runs): the
    compiled step's gradients match eager ones to float32 rounding."""
    a = model_for(PCS[name])
    b = copy.deepcopy(a)
    b.compile()
    x, y = data()
    for m in (a, b):
        m.training_step(x[0], y[0])
    for (n, p), q in zip(a.named_parameters(), b.parameters()):
        if p.grad is not None:
            assert torch.allclose(p.grad, q.grad, rtol=1e-4, atol=1e-6), n


@pytest.mark.gpu
@pytest.mark.parametrize("name", list(PCS))
@pytest.mark.parametrize("kernel", ["dot", "gaussian"])
def test_captured_step_matches_eager_on_cuda(name, kernel):
    """CUDA graph replay of the whole step (compiled model, bf16 autocast) follows the eager
    step: same losses to bf16 noise over 6 steps, weights close. `settle` runs eager blocks
    (no double backward through compiled graphs) and is captured all the same."""
    a = model_for(PCS[name], kernel, device="cuda")
    b = copy.deepcopy(a)
    a.compile()
    b.compile()
    opt_a, opt_b = (make_optimizer(m, "adamw", lr=1e-3, weight_decay=0.1) for m in (a, b))
    eager, graph = TrainStep(a, opt_a, accum=2, grad_clip=1.0), TrainStep(b, opt_b, accum=2, grad_clip=1.0,
                                                                          capture=True)
    for s in range(6):
        x, y = data(seed=s, device="cuda")
        with torch.autocast("cuda", dtype=torch.bfloat16):
            la, _, da = eager(x, y, 1e-3)
            lb, _, db = graph(x, y, 1e-3)
        assert torch.isfinite(lb) and abs(la.item() - lb.item()) < 2e-2, (s, la.item(), lb.item())
        assert set(da) == set(db) and all(v.device.type == "cuda" for v in db.values())
    assert graph.graph is not None  # replays happened
    for (n, p), q in zip(a.named_parameters(), b.parameters()):
        assert torch.allclose(p.float(), q.float(), rtol=5e-2, atol=5e-3), n


@pytest.mark.gpu
@pytest.mark.parametrize("fixed", [False, True], ids=["free", "fixed"])
@pytest.mark.parametrize("error", ["gaussian", "student_t", "laplace"])
def test_compiled_pc_matches_eager_on_cuda(error, fixed):
    """PCGPT.compile() fuses settling's per-layer arithmetic into compiled kernels (model/pc.py,
    _StepMath) and reuses the forward graph at the error wave's front: on CUDA in float32 the
    compiled step's gradients and diagnostics follow the eager step's, for every error family,
    with momentum and per-channel learned precision."""
    pc = dict(algorithm="pc", settle_steps=4, state_lr=1.0 if fixed else 0.7, fixed_predictions=fixed,
              error=error, precision="channel", state_momentum=0.3)
    a = model_for(pc, "gaussian", device="cuda")
    b = copy.deepcopy(a)
    b.compile()
    x, y = data(device="cuda")
    _, da = a.training_step(x[0], y[0])
    _, db = b.training_step(x[0], y[0])
    assert set(da) == set(db)
    for k in da:
        assert torch.allclose(da[k].float(), db[k].float(), rtol=1e-3, atol=1e-6), (k, da[k], db[k])
    for (n, p), q in zip(a.named_parameters(), b.parameters()):
        assert (p.grad is None) == (q.grad is None), n
        if p.grad is not None:
            assert torch.allclose(p.grad, q.grad, rtol=1e-3, atol=1e-6), n
