"""Predictive coding (model/pc.py): equivalences with backprop, settling, the algorithms.

The backbone is equivalence with backprop where theory says it must hold: T = 0
is backprop bit for bit, and under the fixed-prediction assumption PC's weight
gradients are backprop's (Whittington & Bogacz 2017; Millidge et al. 2020;
Song et al. 2020). Tiny models, CPU, float64 where a tolerance matters.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from model import GPT, GPTConfig, PCConfig, build_model
from model import pc as pcmod
from model.config import KERNELS, PC_ERRORS



@pytest.fixture(autouse=True)
def one_thread():
    """Tiny tensors: extra threads only add overhead on a shared 2-core box."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def make(algorithm: str = "bp", *, n_layer: int = 2, n_embd: int = 16, vocab: int = 11, block: int = 6,
         kernel: str = "dot", attn_precision: str = "fixed", init_std: float = 0.02, dtype=torch.float32,
         seed: int = 0, **pc) -> GPT:
    torch.manual_seed(seed)
    cfg = GPTConfig(vocab_size=vocab, block_size=block, n_layer=n_layer, n_head=2, n_embd=n_embd,
                    init_std=init_std, attention=dict(kernel=kernel, precision=attn_precision),
                    pc=dict(algorithm=algorithm, **pc))
    return build_model(cfg).to(dtype)


def batch(vocab: int = 11, B: int = 2, T: int = 6, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (B, T), generator=g), torch.randint(0, vocab, (B, T), generator=g)


def small_head(algorithm: str, **pc) -> GPT:
    """float64, the head scaled 20x down: settled errors small next to the residual stream."""
    model = make(algorithm, dtype=torch.float64, **pc)
    with torch.no_grad():
        model.lm_head.weight.mul_(0.05)
    return model


def grads(model: GPT) -> dict[str, torch.Tensor]:
    return {n: p.grad for n, p in model.named_parameters() if not n.startswith("pc_energy.")}


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


# ------------------------------------------------------------------ bp stays the baseline
def test_pc_parameters_do_not_touch_the_baseline():
    bp = make("bp")
    assert type(bp) is GPT and not hasattr(bp, "pc_energy")
    with pytest.raises(ValueError, match="build_model"):
        GPT(GPTConfig(vocab_size=11, block_size=6, n_layer=2, n_head=2, n_embd=16, pc=dict(algorithm="pc")))
    pc = make("pc", error="student_t", precision="channel")
    theirs = dict(pc.named_parameters())
    for n, p in bp.named_parameters():
        assert torch.equal(p, theirs[n]), n  # same RNG stream: the PC params draw nothing
    assert {n for n in theirs if n.startswith("pc_energy")} == {"pc_energy.precision_logit", "pc_energy.nu_raw"}
    idx, _ = batch()
    assert torch.equal(bp(idx)[0], pc(idx)[0])


@pytest.mark.parametrize("algorithm", ["settle", "pc", "ipc"])
@pytest.mark.parametrize("error,precision", [("gaussian", "fixed"), ("student_t", "channel"), ("laplace", "layer")])
def test_zero_settling_steps_is_backprop_exactly(algorithm, error, precision):
    """T = 0: loss and every gradient bit-identical to bp, with grad_scale and accumulation."""
    ref, model = make("bp"), make(algorithm, settle_steps=0, error=error, precision=precision)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for seed in (1, 2):  # two accumulated micro-batches
        idx, tgt = batch(seed=seed)
        tgt[0, 0] = -100  # an ignored target: N counts scored targets only
        ref_loss, _ = ref.training_step(idx, tgt, grad_scale=0.5, label_smoothing=0.1)
        loss, diag = model.training_step(idx, tgt, grad_scale=0.5, label_smoothing=0.1, optimizer=opt)
        assert torch.equal(loss, ref_loss)
    theirs = grads(model)
    for n, g in grads(ref).items():
        assert torch.equal(theirs[n], g), n
    assert int(diag["pc/settle_steps"]) == 0


# ------------------------------------------------------------------ theory
def _zil_errors(kernel: str, T: int, beta: float) -> dict[str, float]:
    idx, tgt = batch()
    ref = make("bp", n_layer=3, kernel=kernel, init_std=0.2, dtype=torch.float64)
    ref.training_step(idx, tgt)
    model = make("pc", n_layer=3, kernel=kernel, init_std=0.2, dtype=torch.float64, settle_steps=T,
                 fixed_predictions=True, state_lr=1.0, state_momentum=0.0, output_weight=beta)
    model.training_step(idx, tgt)
    theirs = grads(model)
    return {n: rel_err(theirs[n], g) for n, g in grads(ref).items()}


@pytest.mark.parametrize("kernel", KERNELS)
def test_fixed_prediction_pc_gradients_equal_backprop(kernel):
    """Fixed predictions, state_lr 1, π = 1: after T >= n_layer steps every weight gradient is
    backprop's (for any β: the division by β is exact); one step fewer and the error wave has
    not reached layer 0 (the embedding gets no gradient)."""
    for T, beta in ((3, 1.0), (3, 0.1), (5, 0.01)):
        errs = _zil_errors(kernel, T, beta)
        assert max(errs.values()) < 1e-5, (T, beta, max(errs.items(), key=lambda kv: kv[1]))
    short = _zil_errors(kernel, 2, 1.0)
    assert short["wte.weight"] == pytest.approx(1.0) and short["lm_head.weight"] < 1e-5


def test_pc_gradients_approach_backprop_as_output_weight_falls():
    """Without fixed predictions PC's weight gradient tends to backprop's as β -> 0.

    How far PC departs from backprop is set by the settled errors relative to the residual
    stream, about β·‖W_head‖/rms(x)² at init; a head 20x smaller than init_std puts
    β ∈ {1, 0.1, 0.01} across the range from nonlinear to linear."""
    idx, tgt = batch()
    ref = small_head("bp")
    ref.training_step(idx, tgt)
    g_bp = torch.cat([g.flatten() for g in grads(ref).values()])
    cos = []
    for beta in (1.0, 0.1, 0.01):
        pc = small_head("pc", settle_steps=120, state_lr=0.5, output_weight=beta, tol=1e-9)
        pc.training_step(idx, tgt)
        g_pc = torch.cat([g.flatten() for g in grads(pc).values()])
        cos.append(F.cosine_similarity(g_pc, g_bp, dim=0).item())
    assert cos[0] < cos[1] < cos[2], cos
    assert cos[2] > 0.99, cos


# ------------------------------------------------------------------ settling
@pytest.mark.parametrize("error", PC_ERRORS)
@pytest.mark.parametrize("precision", ["fixed", "channel"])
def test_energy_decreases_monotonically(error, precision):
    model = make("pc", dtype=torch.float64, settle_steps=15, state_lr=0.01, error=error, precision=precision)
    idx, tgt = batch()
    settled = pcmod.settle(model, idx, tgt, trace=True)
    energy = torch.stack(settled.trace)
    assert len(energy) == 16 and settled.steps == 15
    steps = energy[1:] - energy[:-1]
    assert (steps <= 1e-12 * energy.abs().max()).all(), steps
    assert energy[-1] < energy[0] - 1e-6  # and it does move


def test_early_stop_on_residual_and_inference_settling_is_a_no_op():
    idx, tgt = batch()
    model = small_head("pc", settle_steps=200, state_lr=0.5, output_weight=0.01, tol=1e-6)
    _, diag = model.training_step(idx, tgt)
    assert 0 < int(diag["pc/settle_steps"]) < 200 and diag["pc/settle_residual"] < 1e-6
    # no output term (no target's pull): the forward pass is the energy's minimum, nothing moves
    quiet = make("pc", dtype=torch.float64, settle_steps=20, state_lr=0.3, error_pathway="no_output_feedback")
    settled = pcmod.settle(quiet, idx, tgt)
    with torch.no_grad():
        x = quiet.embed(idx)
        cos, sin = quiet.rotary(idx.size(1))
        for block, state in zip(quiet.blocks, settled.states):
            x = block(x, cos, sin)
            assert torch.equal(state, x)


@pytest.mark.parametrize("algorithm", ["pc", "ipc"])
def test_errors_reach_one_layer_per_step(algorithm):
    """The output error moves down one layer per settling step: with T < n_layer the bottom
    blocks and the embedding learn nothing (PCConfig.settle_steps says so); T = n_layer reaches all."""
    idx, tgt = batch()
    for T, frozen in ((2, ("wte", "blocks.0.")), (3, ())):
        # state_lr 0.1: no step is rejected by the backtracking (a rejected step holds the wave back)
        model = make(algorithm, n_layer=3, settle_steps=T, state_lr=0.1)
        opt = torch.optim.SGD(model.parameters(), lr=0.0)  # ipc's inner steps leave the weights alone
        _, diag = model.training_step(idx, tgt, optimizer=opt)
        assert diag["pc/settle_rejected"] == 0
        for n, g in grads(model).items():
            no_gradient = g is None or not g.any()
            assert no_gradient == n.startswith(frozen), (T, n)


def test_error_pathways_cut_what_they_say():
    idx, tgt = batch()
    model = make("pc", n_layer=3, settle_steps=6, state_lr=0.3, error_pathway="bottom_up")
    model.training_step(idx, tgt)
    g = grads(model)
    # no top-down term: only the top state moves, so only the top block and the head learn
    assert all(g[n] is None or not g[n].any() for n in g if n.startswith(("wte", "blocks.0.", "blocks.1.")))
    assert g["blocks.2.mlp.c_fc.weight"].any() and g["lm_head.weight"].any()
    model = make("pc", n_layer=3, settle_steps=6, state_lr=0.3, error_pathway="no_output_feedback")
    model.training_step(idx, tgt)
    g = grads(model)
    assert all(g[n] is None or not g[n].any() for n in g if not n.startswith(("lm_head", "norm_f")))
    assert g["lm_head.weight"].any()


def test_settling_runs_in_fp32_under_bf16_autocast():
    model = make("pc", settle_steps=3)
    idx, tgt = batch()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        settled = pcmod.settle(model, idx, tgt)
        loss, diag = model.training_step(idx, tgt)
    assert all(x.dtype == torch.float32 for x in settled.states)
    assert torch.isfinite(loss) and all(torch.isfinite(v).all() for v in diag.values())
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


# ------------------------------------------------------------------ the algorithms
def test_settle_truncation():
    idx, tgt = batch()
    kw = dict(dtype=torch.float64, settle_steps=4, state_momentum=0.5)
    full, same, last2 = (make("settle", truncate=k, **kw) for k in (0, 4, 2))
    _, d_full = full.training_step(idx, tgt)
    same.training_step(idx, tgt)
    _, d_last2 = last2.training_step(idx, tgt)
    for n, g in grads(full).items():
        assert torch.equal(grads(same)[n], g), n
    # truncation changes the gradient, not the trajectory (momentum carried over)
    assert torch.allclose(d_last2["pc/energy_after"], d_full["pc/energy_after"], rtol=1e-12)
    assert rel_err(grads(last2)["wte.weight"], grads(full)["wte.weight"]) > 1e-6
    # long settling, only the last step differentiated: the envelope theorem leaves pc's local gradient
    kw = dict(settle_steps=120, state_lr=0.5, output_weight=0.01)
    short, local = small_head("settle", truncate=1, **kw), small_head("pc", **kw)
    short.training_step(idx, tgt)
    _, diag = local.training_step(idx, tgt)
    assert diag["pc/settle_residual"] < 1e-8  # settled
    for n, g in grads(local).items():
        assert rel_err(grads(short)[n], g) < 1e-6, n


@pytest.mark.parametrize("kernel", KERNELS)
def test_settle_runs_for_every_kernel(kernel):
    """Unrolled settling needs a double backward through attention: inside
    attention.twice_differentiable() every kernel has one (SDPA's math backend or the reference)."""
    model = make("settle", kernel=kernel, settle_steps=2)
    loss, _ = model.training_step(*batch())
    assert torch.isfinite(loss) and model.lm_head.weight.grad is not None


def test_ipc_steps_inside_and_keeps_accumulated_gradients():
    model = make("ipc", settle_steps=3, state_lr=0.1)
    idx, tgt = batch()
    with pytest.raises(ValueError, match="optimizer"):
        model.training_step(idx, tgt)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    earlier = {n: torch.full_like(p, 0.25) for n, p in model.named_parameters()}
    for n, p in model.named_parameters():
        p.grad = earlier[n].clone()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    _, diag = model.training_step(idx, tgt, optimizer=opt)
    assert int(diag["pc/settle_steps"]) == 3
    assert not torch.equal(before["lm_head.weight"], model.lm_head.weight)  # inner steps taken
    # .grad = what was there + this call's last gradient (not the inner steps')
    last = {n: p.grad - earlier[n] for n, p in model.named_parameters()}
    assert last["lm_head.weight"].abs().max() > 0
    assert all(torch.isfinite(v).all() for v in last.values())


@pytest.mark.parametrize("algorithm,pc", [
    ("bp", {}),
    ("settle", dict(settle_steps=4, state_lr=0.1)),
    ("pc", dict(settle_steps=8, state_lr=0.3, output_weight=0.1)),
    ("ipc", dict(settle_steps=4, state_lr=0.1)),
])
def test_each_algorithm_overfits_one_batch(algorithm, pc):
    model = make(algorithm, n_embd=32, vocab=16, block=8, **pc)
    idx, tgt = batch(vocab=16, B=4, T=8)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.0)
    losses = []
    for _ in range(150):
        loss, _ = model.training_step(idx, tgt, optimizer=opt)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if loss < 0.2:
            break
    assert losses[-1] < 0.2, (algorithm, losses[::10])


# ------------------------------------------------------------------ precision and ν
def test_learned_precision_without_normaliser_is_rejected():
    for precision in ("layer", "channel"):
        with pytest.raises(ValueError, match="collapses"):
            PCConfig(algorithm="pc", precision=precision, log_normalizer=False)
    PCConfig(algorithm="pc", precision="fixed", log_normalizer=False)  # nothing to collapse
    with pytest.raises(ValueError, match="contain 1"):
        PCConfig(algorithm="pc", precision="layer", precision_min=2.0)


@pytest.mark.parametrize("error", PC_ERRORS)
@pytest.mark.parametrize("precision", ["layer", "channel"])
def test_precision_and_nu_gradients_match_finite_differences(error, precision):
    model = make("pc", dtype=torch.float64, settle_steps=5, state_lr=0.1, error=error, precision=precision)
    energy = model.pc_energy
    params = [p for p in (energy.precision_logit, energy.nu_raw) if p is not None]
    e = torch.randn(2, 3, model.config.n_embd, dtype=torch.float64)

    class AllLayers(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.energy = energy

        def forward(self, e):
            return torch.stack([self.energy.token_energy(e, l) for l in range(self.energy.n_layer)])

    names = [n for n, _ in AllLayers().named_parameters()]

    def token_energies(*values):
        return torch.func.functional_call(AllLayers(), dict(zip(names, values)), (e,))

    inputs = [(p.detach().clone() + 0.3 * torch.randn_like(p)).requires_grad_() for p in params]
    assert torch.autograd.gradcheck(token_energies, inputs)
    # the closed-form error gradient the fixed-prediction settling uses
    e.requires_grad_()
    for layer in range(energy.n_layer):
        (auto,) = torch.autograd.grad(energy.token_energy(e, layer).sum(), e)
        assert torch.allclose(energy.error_grad(e.detach(), layer), auto, rtol=1e-10, atol=1e-12)

    # what training_step puts in .grad = ∂(E/β)/∂(π, ν) at the settled states, by central differences
    idx, tgt = batch()
    settled = pcmod.settle(model, idx, tgt)
    model.training_step(idx, tgt)
    b = pcmod._Batch(model, idx, tgt, 0.0)

    def objective() -> float:
        with torch.no_grad():
            ev = b.evaluate(settled.states, settled.mu0, dynamics=False)
            return ev.objective(b.n_beta).item()

    for p in params:
        fd = torch.zeros_like(p)
        for i in range(p.numel()):
            p.data.view(-1)[i] += 1e-6
            up = objective()
            p.data.view(-1)[i] -= 2e-6
            down = objective()
            p.data.view(-1)[i] += 1e-6
            fd.view(-1)[i] = (up - down) / 2e-6
        assert torch.allclose(p.grad, fd, rtol=1e-5, atol=1e-8), (p.grad, fd)


# ------------------------------------------------------------------ diagnostics
def test_diagnostics_are_detached_tensors_with_metric_names():
    model = make("pc", n_layer=2, settle_steps=3, error="student_t", precision="layer")
    idx, tgt = batch()
    _, diag = model.training_step(idx, tgt)
    for l in range(2):
        for key in ("energy_before", "energy_after", "error", "precision", "nu"):
            assert f"pc/{key}/{l}" in diag
    for key in ("pc/settle_residual", "pc/settle_steps", "pc/energy_before/out", "pc/energy_after/out"):
        assert key in diag
    assert all(isinstance(v, torch.Tensor) and not v.requires_grad for v in diag.values())
    assert diag["pc/energy_after"] < diag["pc/energy_before"]
    assert diag["pc/error/1"] > 0 and int(diag["pc/settle_steps"]) == 3


def test_diagnostics_carry_attention_precision_per_head():
    model = make("pc", settle_steps=1, kernel="gaussian", attn_precision="head")
    _, diag = model.training_step(*batch())
    lam = model.blocks[1].attn.precision().detach().flatten()
    assert [diag[f"attn/precision/1/{h}"].item() for h in range(2)] == pytest.approx(lam.tolist())


# ------------------------------------------------------------------ stable settling at any precision
def set_precision(model: GPT, pi: float) -> None:
    """π = pi in every layer, through the learned parameter's smooth clamp."""
    energy = model.pc_energy
    s = (torch.tensor(pi, dtype=torch.float64).log() - energy.log_min) / (energy.log_max - energy.log_min)
    with torch.no_grad():
        energy.precision_logit.fill_(torch.logit(s).item())
    assert torch.allclose(energy.log_precision().exp().double(), torch.tensor(pi, dtype=torch.float64))


PRECISIONS = (0.1, 1.0, 8.0, 100.0)


@pytest.mark.parametrize("error", PC_ERRORS)
@pytest.mark.parametrize("pi", PRECISIONS)
def test_free_settling_never_raises_the_energy_at_any_precision(error, pi):
    """True energy (free predictions), state_lr 1: per-sequence backtracking keeps every step
    a descent, and the preconditioned step settles for π from 0.1 to 100 (the residual
    falls from its value at the forward pass; measured worst case over this grid: to 0.27x)."""
    model = make("pc", n_layer=3, dtype=torch.float64, settle_steps=40, state_lr=1.0, error=error,
                 precision="layer", precision_max=1e3)
    set_precision(model, pi)
    idx, tgt = batch(seed=int(pi * 10) + 3)
    settled = pcmod.settle(model, idx, tgt, trace=True)
    energy = torch.stack(settled.trace)
    assert torch.isfinite(energy).all()
    assert (energy[1:] - energy[:-1] <= 1e-9 * energy.abs().max()).all(), energy
    assert energy[-1] < energy[0]
    b = pcmod._Batch(model, idx, tgt, 0.0)
    start = b.residual([torch.zeros_like(s) for s in settled.states[:-1]] + [_output_gradient(model, idx, tgt)])
    loss, diag = model.training_step(idx, tgt)
    assert diag["pc/settle_residual"] < 0.5 * start, (diag["pc/settle_residual"], start)


def _output_gradient(model, idx, tgt):
    b = pcmod._Batch(model, idx, tgt, 0.0)
    with torch.no_grad():
        top = b.forward_states(b.first_prediction())[-1]
    top.requires_grad_()
    return torch.autograd.grad(b.ce_rows(top).sum(), top)[0]


@pytest.mark.parametrize("pi", PRECISIONS)
def test_fixed_prediction_settling_converges_at_any_precision(pi):
    """Fixed predictions, preconditioned, state_lr 1, Gaussian errors: the residual vanishes for
    every π and the weight gradients are backprop's whatever π is (at equilibrium
    π_l·e_l = J_{l+1}ᵀ π_{l+1}·e_{l+1}: π cancels)."""
    idx, tgt = batch()
    model = make("pc", n_layer=3, dtype=torch.float64, init_std=0.2, settle_steps=3, state_lr=1.0,
                 precision="layer", precision_max=1e3, fixed_predictions=True)
    set_precision(model, pi)
    _, diag = model.training_step(idx, tgt)
    assert diag["pc/settle_residual"] < 1e-9, diag["pc/settle_residual"]
    ref = make("bp", n_layer=3, dtype=torch.float64, init_std=0.2)
    ref.training_step(idx, tgt)
    theirs = grads(model)
    for n, g in grads(ref).items():
        assert rel_err(theirs[n], g) < 1e-5, n


@pytest.mark.parametrize("error", ["student_t", "laplace"])
def test_fixed_prediction_robust_errors_settle_where_an_equilibrium_exists(error):
    """Student-t and Laplace errors have a bounded restoring force ρ'(e) (at most
    (ν+1)√π/(2√ν), resp. √π); under fixed predictions the top-down drive is the backprop
    gradient, a constant, so an equilibrium exists only where the drive is below that bound.
    With precision high enough for this batch the IRLS-preconditioned settling converges."""
    idx, tgt = batch()
    model = make("pc", n_layer=3, dtype=torch.float64, init_std=0.2, settle_steps=40, state_lr=1.0, error=error,
                 precision="layer", precision_max=1e3, fixed_predictions=True)
    set_precision(model, 100.0)
    _, diag = model.training_step(idx, tgt)
    assert diag["pc/settle_residual"] < 1e-6, diag["pc/settle_residual"]


def test_plain_settling_step_diverges_where_the_preconditioned_one_converges():
    """Why precondition: with a plain unit step the top error follows e ← (1 − π)e − g, which
    grows with alternating sign once π > 2 (π = 8 here)."""
    idx, tgt = batch()
    out = {}
    for precondition in (False, True):
        model = make("pc", n_layer=3, dtype=torch.float64, init_std=0.2, settle_steps=8, state_lr=1.0,
                     precision="layer", fixed_predictions=True, precondition=precondition)
        set_precision(model, 8.0)
        _, diag = model.training_step(idx, tgt)
        out[precondition] = diag["pc/settle_residual"].item()
    assert out[True] < 1e-8 and out[False] > 1e3, out


def test_variance_precision_tracks_the_settled_errors_without_running_away():
    """`variance`: π_l = exp(mean_k log v_k − log v_l) with v_l the running mean of the settled
    ε_l² (the first observation replaces the initial 1s), a buffer saved with the model; over
    repeated steps on one batch it settles instead of growing."""
    model = make("pc", n_layer=3, settle_steps=3, state_lr=1.0, fixed_predictions=True, precision="layer",
                 precision_update="variance", precision_decay=0.5)
    energy = model.pc_energy
    assert energy.precision_logit is None and "pc_energy.error_var" in model.state_dict()
    idx, tgt = batch()
    settled = pcmod.settle(model, idx, tgt)
    mus = [mu.detach() for mu in settled.forward[0]]
    eps = [energy.error_grad(x - mu, l) for l, (x, mu) in enumerate(zip(settled.states, mus))]
    _, diag = model.training_step(idx, tgt)
    v = torch.stack([e.square().mean() for e in eps])
    assert torch.allclose(energy.error_var, v, rtol=1e-5)
    pis = torch.stack([diag[f"pc/precision/{l}"] for l in range(3)])
    assert torch.allclose(pis, torch.ones(3))  # the step's own precision: before the update
    assert torch.allclose(energy.log_precision().flatten(), v.log().mean() - v.log(), atol=1e-6)
    history = []
    for _ in range(12):
        model.training_step(idx, tgt)
        history.append(energy.log_precision().exp().flatten())
    assert torch.allclose(history[-1], history[-2], rtol=1e-3)
    assert torch.allclose(history[-1].log().mean(), torch.zeros(()), atol=1e-5)  # geometric mean 1
    with pytest.raises(ValueError, match="variance"):
        PCConfig(algorithm="pc", precision="fixed", precision_update="variance")


@pytest.mark.parametrize("fixed", [True, False])
def test_pc_diagnostics_cosine_and_energy_drop(fixed):
    """The evaluation-time diagnostics: fixed predictions at T = n_layer are backprop (cosine 1 in
    every block); the true energy falls when predictions are free; .grad is left alone."""
    model = make("pc", n_layer=3, dtype=torch.float64, init_std=0.2, settle_steps=3, state_lr=1.0 if fixed else 0.5,
                 fixed_predictions=fixed)
    idx, tgt = batch()
    for p in model.parameters():
        p.grad = torch.full_like(p, 7.0)
    diag = model.pc_diagnostics(idx, tgt)
    assert all(torch.equal(p.grad, torch.full_like(p, 7.0)) for p in model.parameters())
    cos = [diag[f"pc/grad_cos/{l}"].item() for l in range(3)]
    if fixed:
        assert min(cos) > 1 - 1e-9 and diag["pc/grad_cos"] > 1 - 1e-9
    else:
        assert -1 <= diag["pc/grad_cos"] <= 1 and diag["pc/energy_drop"] > 0
        assert diag["pc/settle_diverged"] == 0
    assert all(f"pc/true_error_energy/{l}" in diag for l in range(3))
