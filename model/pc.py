"""Predictive coding across layers: the energy, settling, and the PC training algorithms.

DESIGN §3, "Predictive-coding energy across layers"; issue 3.

Value nodes and predictions
---------------------------
One value node x_l per block, on the residual stream at the output of block l
(l = 0..L-1). Block l predicts its node from the node below:

    μ_0 = f_0(embed(idx)),   μ_l = f_l(x_{l-1}),   e_l = x_l − μ_l.

The token embedding is part of layer 0's prediction: its input is the data
(clamped, like the targets), so there are exactly n_layer value nodes and the
embedding learns from layer 0's error like every other weight.

Energy
------
    E = (1/N) Σ_l Σ_{b,t} Σ_c [ρ(e_{l,btc}; π_{l,c}) − ½·log π_{l,c}] + β·CE(softmax(head(x_{L-1})), y)

- Tokens: summed over channels (each node is a C-dimensional density with
  diagonal precision), summed over positions and divided by N, the number of
  scored targets — the same denominator as the mean cross-entropy — so E is the
  summed energy per scored token and β weighs the output term exactly as written.
- π is the inverse squared scale of the error distribution (the precision, for
  the Gaussian). With that one meaning the normaliser is −½·log π for all three
  families, and the constants (½·log 2π ...) are dropped:
    gaussian   ρ = ½·π·e²
    student_t  ρ = ((ν+1)/2)·log(1 + π·e²/ν) + log Γ(ν/2) − log Γ((ν+1)/2) + ½·log ν
               (the exact negative log-density; its ν terms are what lets ν learn)
    laplace    ρ = √(π·e² + ε) − √ε  (a smooth |e| in standardised units z = √π·e;
               its normaliser is still exactly −½·log π, and ε = pc.laplace_eps
               gives settling a finite curvature π/√ε at e = 0)
- Precision `fixed` is π = 1 (no parameters). `layer` and `channel` learn
  log π through a smooth clamp, log π = log π_min + (log π_max − log π_min)·σ(w),
  initialised at π = 1: a hard clamp would leave a precision that reached a
  bound with zero gradient for ever. Without −½·log π the energy falls
  monotonically as π → 0, so a learned precision collapses to its floor;
  `PCConfig` refuses that combination.
- The output term is the categorical negative log-likelihood (cross-entropy),
  as PC beyond Gaussians prescribes for a softmax output.

Settling
--------
The states start at the forward pass (x_l = μ_l, every e_l = 0) and take T steps
of SGD with momentum on E, in fp32 (or the model's dtype if wider) even under
bf16 autocast. Each token's states descend that token's summed energy N·E: the
1/N of the token mean must not shrink the step of every state as the batch
grows. The residual reported and compared with `tol` is the RMS over positions
of the per-token gradient norm ‖∂(N·E)/∂x_{·,b,t}‖ across all layers.

Error pathways (`pc.error_pathway`): `full` descends E; `bottom_up` drops the
top-down term −J_{l+1}ᵀ·∂ρ/∂e_{l+1} from every state's gradient (a state only
reduces its own error; the top state still feels the output); and
`no_output_feedback` keeps the output term out of the states' gradient (the
head still learns from it).

Why inference needs no latent settling
--------------------------------------
Without a target the output term is absent, and E = Σ_l ρ(x_l − f_l(x_{l−1}))
− ½·log π is minimised exactly by the forward pass: every ρ ≥ 0 with ρ = 0 only
at e = 0, and x_l = f_l(x_{l−1}) makes every e_l = 0 at once. The gradient there
is zero (ρ'(0) = 0 for all three families), so settling does not move. A
trained PC-GPT therefore predicts with the plain forward pass; the only
test-time settling that changes anything is attention settling, whose energy
has terms the forward pass does not minimise (model/attention.py).

Training algorithms (`pc.algorithm`; the caller only ever calls `training_step`)
--------------------------------------------------------------------------------
- `bp`: backprop (GPT.training_step; never comes here).
- `pc`: inference learning. Settle with the output clamped to the targets,
  then every layer's weights get the gradient of its own error term with its
  input (a value node, or the data for layer 0) held constant, the head the
  gradient of CE at the settled x_{L-1}, and π, ν the gradient of E at the
  settled states. With `fixed_predictions`, the μ_l (and the output's softmax)
  stay at their forward values and Jacobians while the states settle, and the
  local gradients are taken through those forward predictions (Millidge et al.
  2020). Then, with state_lr = 1, π = 1 and momentum 0, every step moves the
  error wave down one layer exactly (e_l ← J_{l+1}ᵀ·e_{l+1}): after T ≥ n_layer
  steps ∂ρ/∂e_l = −N·β·∂CE/∂x_l at every layer and the weight gradients equal
  backprop's exactly, for any β (Whittington & Bogacz 2017; Song et al. 2020,
  Z-IL). Without fixed predictions they approach backprop's as β → 0.
- `settle`: the settled energy E(x_T)/β, differentiated through the T unrolled
  steps (x_0 is the forward pass, so T = 0 is exactly backprop on CE, and as
  settling converges the total gradient tends to `pc`'s local one by the
  envelope theorem). `truncate` = k differentiates only the last k steps (the
  states before them are constants), so memory grows with k, not T.
- `ipc`: incremental PC (Salvatori et al. 2024). At every step t = 0..T the
  states and the weights both take a step from the gradient of E at (x_t, θ_t);
  the weight steps t < T go through the caller's optimizer inside the call, the
  gradient at t = T is left in `.grad` for the caller's own `optimizer.step()`.

T = 0 for `pc` and `ipc`: with no settling every e_l is zero and a local rule
would train only the head, so T = 0 is defined as backprop (for `settle` it is
backprop by construction); a sweep over T then starts at the baseline.

Every parameter gradient that training_step adds is grad_scale × ∂(E/β): the
division by β keeps the gradient's scale that of the loss, so one learning rate
serves every β and the theory tests compare with backprop without rescaling.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from .config import GPTConfig
from .gpt import GPT


class PCEnergy(nn.Module):
    """The inter-layer error energy's parameters (precision, ν) and its density.

    Parameters are 1-D with a deterministic `reset_parameters()` that draws nothing
    from the RNG: a PC model's blocks get exactly the weights a `bp` model of the
    same seed gets.
    """

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.pc = config.pc
        self.n_layer, self.n_embd = config.n_layer, config.n_embd
        self.log_min, self.log_max = math.log(self.pc.precision_min), math.log(self.pc.precision_max)
        self.width = {"fixed": 0, "layer": 1, "channel": config.n_embd}[self.pc.precision]
        if self.width:
            self.precision_logit = nn.Parameter(torch.empty(self.n_layer * self.width))
        else:
            self.register_parameter("precision_logit", None)
        if self.pc.error == "student_t":
            self.nu_raw = nn.Parameter(torch.empty(self.n_layer))
        else:
            self.register_parameter("nu_raw", None)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """π = 1 (σ(w) placed where log π = 0 inside the clamp); ν = pc.nu_init (ν = softplus(raw))."""
        if self.precision_logit is not None:
            s = -self.log_min / (self.log_max - self.log_min)  # in (0, 1): PCConfig keeps 1 inside the clamp
            self.precision_logit.fill_(math.log(s / (1 - s)))
        if self.nu_raw is not None:
            self.nu_raw.fill_(math.log(math.expm1(self.pc.nu_init)))

    def log_precision(self) -> torch.Tensor | None:
        """log π per layer, (L, 1) or (L, C); None for `fixed` (π = 1)."""
        if self.precision_logit is None:
            return None
        s = torch.sigmoid(self.precision_logit).view(self.n_layer, self.width)
        return self.log_min + (self.log_max - self.log_min) * s

    def nu(self) -> torch.Tensor | None:
        """Student-t degrees of freedom per layer, (L,); None for other errors."""
        return None if self.nu_raw is None else F.softplus(self.nu_raw)

    def token_energy(self, e: torch.Tensor, layer: int) -> torch.Tensor:
        """Σ_c [ρ(e_c; π_c) − ½·log π_c] for each position: (..., C) -> (...)."""
        lp = self.log_precision()
        lp = None if lp is None else lp[layer]
        z2 = e.square() if lp is None else e.square() * lp.exp()  # π·e²
        C = e.shape[-1]
        if self.pc.error == "gaussian":
            out = 0.5 * z2.sum(-1)
        elif self.pc.error == "student_t":
            nu = self.nu()[layer]
            out = 0.5 * (nu + 1) * torch.log1p(z2 / nu).sum(-1) + C * (
                torch.lgamma(nu / 2) - torch.lgamma((nu + 1) / 2) + 0.5 * torch.log(nu))
        else:
            eps = self.pc.laplace_eps
            out = (torch.sqrt(z2 + eps) - math.sqrt(eps)).sum(-1)
        if lp is not None:
            out = out - 0.5 * lp.sum() * (C // lp.numel())
        return out

    def error_grad(self, e: torch.Tensor, layer: int) -> torch.Tensor:
        """∂ token_energy / ∂e, in closed form (the precision-weighted error the states feel)."""
        lp = self.log_precision()
        pi = None if lp is None else lp[layer].exp()
        pe = e if pi is None else pi * e
        if self.pc.error == "gaussian":
            return pe
        z2 = pe * e
        if self.pc.error == "student_t":
            nu = self.nu()[layer]
            return (nu + 1) * pe / (nu + z2)
        return pe / torch.sqrt(z2 + self.pc.laplace_eps)


# ---------------------------------------------------------------------------- one batch
class _Batch:
    """A batch and the pieces of the energy that depend on the model."""

    def __init__(self, model: GPT, idx: torch.Tensor, targets: torch.Tensor, label_smoothing: float):
        self.model, self.idx, self.targets, self.label_smoothing = model, idx, targets, label_smoothing
        self.pc = model.config.pc
        self.energy: PCEnergy = model.pc_energy
        self.cos, self.sin = model.rotary(idx.size(1))
        # N: the scored targets (CE's denominator); N·β turns E's gradient into each token's own.
        wide = torch.promote_types(model.lm_head.weight.dtype, torch.float32)
        self.n = (targets != model.config.ignore_index).sum().clamp(min=1).to(wide)
        self.n_beta = self.n * self.pc.output_weight

    def first_prediction(self) -> torch.Tensor:
        """μ_0 = f_0(embed(idx)): the data is its input, so it never changes while settling."""
        return self.model.blocks[0](self.model.embed(self.idx), self.cos, self.sin)

    def predict(self, layer: int, below: torch.Tensor) -> torch.Tensor:
        return self.model.blocks[layer](below, self.cos, self.sin)

    @staticmethod
    def as_state(mu: torch.Tensor) -> torch.Tensor:
        """Value nodes live in fp32 (or wider), whatever the autocast dtype of the blocks."""
        return mu.to(torch.promote_types(mu.dtype, torch.float32))

    def forward_states(self, mu0: torch.Tensor) -> list[torch.Tensor]:
        """The forward pass as value nodes (with the graph, if grad mode is on)."""
        states = [self.as_state(mu0)]
        for layer in range(1, len(self.model.blocks)):
            states.append(self.as_state(self.predict(layer, states[-1])))
        return states

    def ce(self, top: torch.Tensor) -> torch.Tensor:
        return self.model.loss(self.model.head(top), self.targets, self.label_smoothing)

    def evaluate(self, states: list[torch.Tensor], mu0: torch.Tensor, dynamics: bool) -> "_Evaluation":
        """The energy at `states`. `dynamics` builds it for the states' gradient, where the
        `no_output_feedback` pathway keeps the output term away from the top state."""
        mus = [mu0] + [self.predict(l, states[l - 1]) for l in range(1, len(states))]
        errors = [x - mu.to(x.dtype) for x, mu in zip(states, mus)]
        layer_sums = [self.energy.token_energy(e, l).sum() for l, e in enumerate(errors)]
        top = states[-1]
        if dynamics and self.pc.error_pathway == "no_output_feedback":
            top = top.detach()
        return _Evaluation(mus, errors, layer_sums, self.ce(top))

    def targets_of(self, states: list[torch.Tensor], ev: "_Evaluation") -> list[torch.Tensor]:
        """What to differentiate for the states' gradient: the states themselves, or for
        `bottom_up` the errors (∂S/∂e_l = ∂ρ/∂e_l, the own-error term alone) and the top state."""
        if self.pc.error_pathway == "bottom_up":
            return ev.errors[:-1] + [states[-1]]
        return states

    def residual(self, grads: list[torch.Tensor]) -> torch.Tensor:
        """RMS over positions of the per-token gradient norm across layers."""
        positions = self.idx.numel()
        return torch.sqrt(sum(g.detach().float().square().sum() for g in grads) / positions)

    def energies_at_forward(self, ce: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """Per-layer energies at the forward pass (every e_l = 0: only the normalisers), then β·CE."""
        zero = torch.zeros_like(like[:1, :1])
        per_pos = torch.stack([self.energy.token_energy(zero, l).sum() for l in range(len(self.model.blocks))])
        out = (per_pos * (self.idx.numel() / self.n)).detach()
        return torch.cat([out.float(), (self.pc.output_weight * ce.detach().float()).view(1)])


@dataclass
class _Evaluation:
    mus: list[torch.Tensor]
    errors: list[torch.Tensor]
    layer_sums: list[torch.Tensor]  # Σ over positions of each layer's token energy
    ce: torch.Tensor                # mean cross-entropy at the top state

    def summed(self, n_beta: torch.Tensor) -> torch.Tensor:
        """N·E: what each token's states descend."""
        return sum(self.layer_sums) + n_beta * self.ce

    def objective(self, n_beta: torch.Tensor) -> torch.Tensor:
        """E/β, written CE + Σ layers/(N·β) so the CE part is bit-for-bit backprop's loss."""
        return self.ce + sum(self.layer_sums) / n_beta

    def energies(self, n: torch.Tensor, beta: float) -> torch.Tensor:
        """(L+1,) detached: each layer's energy, then the output's β·CE."""
        layers = torch.stack([s.detach().float() for s in self.layer_sums]) / n
        return torch.cat([layers, (beta * self.ce.detach().float()).view(1)])


@dataclass
class Settled:
    """Result of settling one batch (the inference phase of `pc`)."""

    states: list[torch.Tensor]
    """Settled value nodes x_l (detached, fp32 or wider)."""
    steps: int
    """State updates taken: T, or fewer when the residual fell under `tol`."""
    loss: torch.Tensor
    """CE of the forward pass (detached): what the model predicts without a target."""
    energy_before: torch.Tensor
    """(L+1,) per-layer energies at the forward pass, then β·CE."""
    trace: list[torch.Tensor] = field(default_factory=list)
    """Total energy E at x_0 .. x_steps (filled when asked for)."""
    mu0: torch.Tensor | None = None
    """Layer 0's prediction, with its parameter graph (for the local gradients)."""
    forward: tuple | None = None
    """fixed_predictions: (forward predictions with their graph, the leaves they read, CE)."""


def _momentum_step(states, grads, velocity, pc) -> list[torch.Tensor]:
    """x ← x − lr·v, v ← m·v + g (torch SGD's convention), outside autograd. New tensors, never
    in place: a state can share storage with a prediction that the energy still reads."""
    with torch.no_grad():
        new = []
        for i, (x, g) in enumerate(zip(states, grads)):
            g = g.to(x.dtype)
            velocity[i] = g if velocity[i] is None or pc.state_momentum == 0 else pc.state_momentum * velocity[i] + g
            new.append(x - pc.state_lr * velocity[i])
        return new


def _stop_early(pc, residual: torch.Tensor) -> bool:
    return pc.tol > 0 and residual.item() < pc.tol  # a host sync per step, only when asked for


# ---------------------------------------------------------------------------- settling
def settle(model: GPT, idx: torch.Tensor, targets: torch.Tensor, *, label_smoothing: float = 0.0,
           steps: int | None = None, trace: bool = False) -> Settled:
    """Settle the value nodes of one batch with the output clamped to `targets`.

    T = `steps` or `config.pc.settle_steps` state updates from the forward pass,
    no weight changes. The states are detached; the result keeps what `pc`'s local
    gradient pass needs. `trace=True` records the total energy before every update.
    """
    batch = _Batch(model, idx, targets, label_smoothing)
    T = model.config.pc.settle_steps if steps is None else steps
    settled = (_settle_fixed if model.config.pc.fixed_predictions else _settle_free)(batch, T, trace)
    if trace:
        settled.trace.append(_energy_at(batch, settled).sum())
    return settled


def _energy_at(batch: _Batch, settled: Settled) -> torch.Tensor:
    """(L+1,) energies at the settled states (the held predictions under fixed_predictions)."""
    with torch.no_grad():
        if settled.forward is not None:
            mus, _, ce = settled.forward
            errors = [x - mu.to(x.dtype) for x, mu in zip(settled.states, mus)]
            sums = [batch.energy.token_energy(e, l).sum() for l, e in enumerate(errors)]
            return _Evaluation(mus, errors, sums, ce).energies(batch.n, batch.pc.output_weight)
        ev = batch.evaluate(settled.states, settled.mu0, dynamics=False)
        return ev.energies(batch.n, batch.pc.output_weight)


def _settle_free(batch: _Batch, T: int, trace: bool) -> Settled:
    pc, energy_trace = batch.pc, []
    mu0 = batch.first_prediction()  # graph kept: layer 0's local gradient needs it
    with torch.no_grad():
        states = batch.forward_states(mu0.detach())
    # At the forward pass every e_l is exactly 0 and ρ'(0) = 0, so the only gradient is the
    # output term's: one backward through the head instead of through every block.
    top = states[-1].requires_grad_()
    ce = batch.ce(top)
    (g_top,) = torch.autograd.grad(batch.n_beta * ce, top)
    if pc.error_pathway == "no_output_feedback":
        g_top = torch.zeros_like(g_top)
    states[-1] = top.detach()
    before = batch.energies_at_forward(ce, states[0])
    grads = [torch.zeros_like(s) for s in states[:-1]] + [g_top]
    velocity: list = [None] * len(states)
    taken = 0
    for t in range(T):
        if t > 0:
            leaves = [s.requires_grad_() for s in states]
            ev = batch.evaluate(leaves, mu0.detach(), dynamics=True)
            grads = torch.autograd.grad(ev.summed(batch.n_beta), batch.targets_of(leaves, ev))
            states = [s.detach() for s in leaves]
            if trace:
                energy_trace.append(ev.energies(batch.n, pc.output_weight).sum())
        elif trace:
            energy_trace.append(before.sum())
        if _stop_early(pc, batch.residual(grads)):
            break
        states = _momentum_step(states, grads, velocity, pc)
        taken = t + 1
    return Settled(states, taken, ce.detach(), before, energy_trace, mu0)


def _settle_fixed(batch: _Batch, T: int, trace: bool) -> Settled:
    """Settling under the fixed-prediction assumption: μ_l, their Jacobians and the output's
    softmax stay at the forward pass, so each step is one vector-Jacobian product through
    the retained forward graph and no new forward."""
    pc, energy, energy_trace = batch.pc, batch.energy, []
    mu0 = batch.first_prediction()
    leaves, mus = [], [mu0]
    for layer in range(len(batch.model.blocks)):
        if layer:
            mus.append(batch.predict(layer, leaves[-1]))
        leaves.append(batch.as_state(mus[-1]).detach().requires_grad_())
    ce = batch.ce(leaves[-1])
    (g_out,) = torch.autograd.grad(batch.n_beta * ce, leaves[-1], retain_graph=True)
    if pc.error_pathway == "no_output_feedback":
        g_out = torch.zeros_like(g_out)
    before = batch.energies_at_forward(ce, leaves[0])
    held = [mu.detach() for mu in mus]
    states = [x.detach().clone() for x in leaves]
    velocity: list = [None] * len(states)
    taken = 0
    for t in range(T):
        errors = [x - mu.to(x.dtype) for x, mu in zip(states, held)]
        eps = [energy.error_grad(e, l) for l, e in enumerate(errors)]
        grads = list(eps)
        grads[-1] = grads[-1] + g_out
        if pc.error_pathway != "bottom_up" and len(states) > 1:
            # top-down term −J_{l+1}ᵀ ε_{l+1}, all layers in one backward through the forward graph
            down = torch.autograd.grad(mus[1:], leaves[:-1], [-e.to(m.dtype) for e, m in zip(eps[1:], mus[1:])],
                                       retain_graph=True)
            grads = [g + d.to(g.dtype) for g, d in zip(grads[:-1], down)] + [grads[-1]]
        if trace:
            layers = sum(energy.token_energy(e, l).sum() for l, e in enumerate(errors)) / batch.n
            energy_trace.append((layers.float() + pc.output_weight * ce.detach().float()))
        if _stop_early(pc, batch.residual(grads)):
            break
        states = _momentum_step(states, grads, velocity, pc)
        taken = t + 1
    return Settled(states, taken, ce.detach(), before, energy_trace, mu0, (mus, leaves, ce))


# ---------------------------------------------------------------------------- gradients
def _trainable(model: GPT) -> list[torch.nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def _gradients(objective: torch.Tensor, params, targets, grad_scale: float, n_beta: torch.Tensor):
    """grad_scale·∂objective into every p.grad (added, as `.backward()` would, so gradient
    accumulation keeps working) and the states' per-token gradient N·β·∂objective/∂target.

    The scale enters at the root, as in `(loss * grad_scale).backward()`, so the CE part of
    the gradient is bit-for-bit backprop's."""
    grads = torch.autograd.grad(objective, params + targets, torch.full_like(objective, grad_scale),
                                allow_unused=True)
    for p, g in zip(params, grads):
        if g is not None:
            if p.grad is None:
                p.grad = g
            else:
                p.grad.add_(g)
    return [torch.zeros_like(x) if g is None else g * (n_beta / grad_scale)
            for g, x in zip(grads[len(params):], targets)]


def _local_gradients(batch: _Batch, settled: Settled, params, grad_scale: float) -> tuple[_Evaluation, list]:
    """`pc`'s learning phase: ∂(E/β) at the settled states, each layer's input held constant.

    Returns the evaluation at the settled states and the states' gradient there."""
    if settled.forward is not None:
        return _local_gradients_fixed(batch, settled, params, grad_scale)
    leaves = [x.detach().requires_grad_() for x in settled.states]
    ev = batch.evaluate(leaves, settled.mu0, dynamics=True)
    targets = batch.targets_of(leaves, ev)
    # no_output_feedback: `dynamics` detached the top state from CE, so the head still
    # learns from CE while the states' gradient leaves it out.
    return ev, _gradients(ev.objective(batch.n_beta), params, targets, grad_scale, batch.n_beta)


def _local_gradients_fixed(batch: _Batch, settled: Settled, params, grad_scale: float):
    mus, leaves, ce = settled.forward
    errors = [x - mu.to(x.dtype) for x, mu in zip(settled.states, mus)]
    # the errors carry the settled states (constants) against the forward predictions (with
    # their parameter graph); CE stays at the forward pass: the head's gradient is backprop's
    layer_sums = [batch.energy.token_energy(e, l).sum() for l, e in enumerate(errors)]
    ev = _Evaluation(mus, [e.detach() for e in errors], layer_sums, ce)
    # states' gradient at the settled point: own error + what reached the leaves (the
    # top-down term, and CE's gradient at the top)
    reached = _gradients(ev.objective(batch.n_beta), params, leaves, grad_scale, batch.n_beta)
    eps = [batch.energy.error_grad(e.detach(), l) for l, e in enumerate(errors)]
    if batch.pc.error_pathway == "bottom_up":
        reached = [torch.zeros_like(r) for r in reached[:-1]] + [reached[-1]]
    if batch.pc.error_pathway == "no_output_feedback":
        reached[-1] = torch.zeros_like(reached[-1])
    return ev, [e + r.to(e.dtype) for e, r in zip(eps, reached)]


# ---------------------------------------------------------------------------- algorithms
def training_step(model: PCGPT, idx: torch.Tensor, targets: torch.Tensor, *, grad_scale: float = 1.0,
                  label_smoothing: float = 0.0, optimizer: torch.optim.Optimizer | None = None
                  ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """`settle`, `pc` or `ipc` for one micro-batch (see GPT.training_step for the contract)."""
    pc = model.config.pc
    if not grad_scale > 0:
        raise ValueError(f"grad_scale={grad_scale!r}: must be > 0")
    if pc.algorithm in ("pc", "ipc") and pc.settle_steps == 0:
        logits, _ = model(idx)  # T = 0 is backprop (module docstring)
        loss = model.loss(logits, targets, label_smoothing)
        (loss * grad_scale).backward()
        return loss.detach(), {"pc/settle_steps": torch.zeros((), device=loss.device),
                               **_precision_diagnostics(model)}
    step = {"pc": _pc_step, "settle": _settle_step, "ipc": _ipc_step}[pc.algorithm]
    return step(model, idx, targets, grad_scale, label_smoothing, optimizer)


def _pc_step(model, idx, targets, grad_scale, label_smoothing, optimizer):
    batch = _Batch(model, idx, targets, label_smoothing)
    T = model.config.pc.settle_steps
    settled = (_settle_fixed if model.config.pc.fixed_predictions else _settle_free)(batch, T, False)
    ev, state_grads = _local_gradients(batch, settled, _trainable(model), grad_scale)
    return settled.loss, _diagnostics(model, batch, settled.energy_before, ev, state_grads, settled.steps)


def _settle_step(model, idx, targets, grad_scale, label_smoothing, optimizer):
    """E(x_T)/β through the unrolled settling; only the last `truncate` steps are differentiated.

    Differentiating a settling step differentiates a gradient: the fused attention kernels
    (flash, memory-efficient) have no double backward, so the unrolled steps run attention
    through SDPA's math backend (T = 0 needs no double backward and keeps the fused one)."""
    if model.config.pc.settle_steps == 0:
        return _settle_unrolled(model, idx, targets, grad_scale, label_smoothing)
    try:
        with sdpa_kernel([SDPBackend.MATH]):
            return _settle_unrolled(model, idx, targets, grad_scale, label_smoothing)
    except (NotImplementedError, RuntimeError) as err:
        if "derivative" not in str(err) and "double backward" not in str(err):
            raise
        raise NotImplementedError(
            f"pc.algorithm='settle' differentiates through the settling steps (a double backward), "
            f"and attention.kernel={model.config.attention.kernel!r} runs through an op without one "
            f"({err}); use pc.algorithm pc or ipc, or a dot/gaussian/mixture kernel") from err


def _settle_unrolled(model, idx, targets, grad_scale, label_smoothing):
    pc = model.config.pc
    batch = _Batch(model, idx, targets, label_smoothing)
    T = pc.settle_steps
    k = T if pc.truncate == 0 else min(pc.truncate, T)
    mu0 = batch.first_prediction()
    states = batch.forward_states(mu0)        # the backprop forward, graph and all
    ev0_ce = batch.ce(states[-1])
    loss = ev0_ce.detach()
    before = batch.energies_at_forward(ev0_ce, states[0])
    taken, at_forward = 0, T == k
    velocity: list = [None] * len(states)
    if T > k:
        # the first T−k steps: plain settling of detached copies (constants for the gradient,
        # momentum included); the trajectory is the same as without truncation
        states, velocity, taken = _settle_free_from(batch, mu0.detach(), [s.detach() for s in states], T - k)
        states = [s.requires_grad_() for s in states]
    for t in range(k):
        if at_forward and t == 0:
            # forward-pass start: e_l ≡ 0 as functions of θ, so only the output term has a gradient
            top = states[-1]
            g = [torch.zeros_like(s) for s in states[:-1]]
            g_top = torch.zeros_like(top) if pc.error_pathway == "no_output_feedback" else \
                torch.autograd.grad(batch.n_beta * ev0_ce, top, create_graph=True)[0]
            grads = g + [g_top]
        else:
            ev = batch.evaluate(states, mu0, dynamics=True)
            grads = torch.autograd.grad(ev.summed(batch.n_beta), batch.targets_of(states, ev), create_graph=True)
        if _stop_early(pc, batch.residual(grads)):
            break
        velocity = [g if v is None or pc.state_momentum == 0 else pc.state_momentum * v + g
                    for v, g in zip(velocity, grads)]
        states = [x - pc.state_lr * v.to(x.dtype) for x, v in zip(states, velocity)]
        taken += 1
    ev = batch.evaluate(states, mu0, dynamics=False)
    params = _trainable(model)
    # residual at x_T: the pathway's dynamics gradient; the objective is the full E/β
    targets_ = batch.targets_of(states, ev)
    obj = ev.objective(batch.n_beta)
    if pc.error_pathway == "no_output_feedback":
        dyn = torch.autograd.grad(sum(ev.layer_sums), targets_, retain_graph=True, allow_unused=True)
        state_grads = [torch.zeros_like(x) if g is None else g for g, x in zip(dyn, states)]
        _gradients(obj, params, [], grad_scale, batch.n_beta)
    else:
        state_grads = _gradients(obj, params, targets_, grad_scale, batch.n_beta)
    return loss, _diagnostics(model, batch, before, ev, state_grads, taken)


def _settle_free_from(batch: _Batch, mu0: torch.Tensor, states: list[torch.Tensor], T: int):
    """Plain (non-differentiated) settling from given states; returns (states, momentum, steps)."""
    velocity: list = [None] * len(states)
    taken = 0
    for _ in range(T):
        leaves = [s.detach().requires_grad_() for s in states]
        ev = batch.evaluate(leaves, mu0, dynamics=True)
        grads = torch.autograd.grad(ev.summed(batch.n_beta), batch.targets_of(leaves, ev))
        states = [s.detach() for s in leaves]
        if _stop_early(batch.pc, batch.residual(grads)):
            break
        states = _momentum_step(states, grads, velocity, batch.pc)
        taken += 1
    return states, velocity, taken


def _ipc_step(model, idx, targets, grad_scale, label_smoothing, optimizer):
    """Incremental PC: a state step and a weight step from every evaluation of E."""
    if optimizer is None:
        raise ValueError("pc.algorithm='ipc' takes a weight step at every settling step: pass the "
                         "training optimizer as training_step(..., optimizer=opt)")
    pc = model.config.pc
    params = _trainable(model)
    stash = [p.grad for p in params]  # gradients accumulated from earlier micro-batches
    for p in params:
        p.grad = None
    batch = _Batch(model, idx, targets, label_smoothing)
    with torch.no_grad():
        states = batch.forward_states(batch.first_prediction())
        loss = batch.ce(states[-1])
    before = batch.energies_at_forward(loss, states[0])
    velocity: list = [None] * len(states)
    taken = 0
    for t in range(pc.settle_steps + 1):
        leaves = [s.detach().requires_grad_() for s in states]
        ev = batch.evaluate(leaves, batch.first_prediction(), dynamics=True)
        state_grads = _gradients(ev.objective(batch.n_beta), params, batch.targets_of(leaves, ev),
                                 grad_scale, batch.n_beta)
        if t == pc.settle_steps or _stop_early(pc, batch.residual(state_grads)):
            break
        optimizer.step()   # the inner weight step (not clipped: clipping is the caller's, at its step)
        for p in params:
            p.grad = None
        states = [s.detach() for s in leaves]
        states = _momentum_step(states, state_grads, velocity, pc)
        taken = t + 1
    for p, g in zip(params, stash):  # earlier micro-batches' gradients + this one's last
        if g is not None:
            p.grad = g if p.grad is None else g.add_(p.grad)
    return loss.detach(), _diagnostics(model, batch, before, ev, state_grads, taken)


# ---------------------------------------------------------------------------- diagnostics
@torch.no_grad()
def _precision_diagnostics(model: GPT) -> dict[str, torch.Tensor]:
    out = {}
    energy = getattr(model, "pc_energy", None)
    if energy is not None:
        lp = energy.log_precision()
        nu = energy.nu()
        for l in range(energy.n_layer):
            out[f"pc/precision/{l}"] = (torch.ones((), device=model.lm_head.weight.device) if lp is None
                                        else lp[l].exp().mean().detach().float())
            if nu is not None:
                out[f"pc/nu/{l}"] = nu[l].detach().float()
    for l, block in enumerate(model.blocks):
        fn = getattr(block.attn, "precision", None)
        lam = fn() if callable(fn) else None
        if lam is None:
            continue
        lam = lam.detach().float().flatten()
        if lam.numel() == model.config.n_head:
            out.update({f"attn/precision/{l}/{h}": lam[h] for h in range(lam.numel())})
        else:
            out[f"attn/precision/{l}"] = lam.mean()
    return out


def _diagnostics(model, batch: _Batch, before: torch.Tensor, ev: _Evaluation,
                 state_grads: list[torch.Tensor], steps: int) -> dict[str, torch.Tensor]:
    """Detached tensors keyed by metric name (DESIGN §5); layer `out` is the output term β·CE."""
    after = ev.energies(batch.n, batch.pc.output_weight)
    L = len(ev.errors)
    out: dict[str, torch.Tensor] = {}
    for l in range(L):
        out[f"pc/energy_before/{l}"] = before[l]
        out[f"pc/energy_after/{l}"] = after[l]
        out[f"pc/error/{l}"] = ev.errors[l].detach().abs().mean().float()
    out["pc/energy_before/out"], out["pc/energy_after/out"] = before[L], after[L]
    out["pc/energy_before"], out["pc/energy_after"] = before.sum(), after.sum()
    out["pc/settle_residual"] = batch.residual(state_grads)
    out["pc/settle_steps"] = torch.full((), float(steps), device=out["pc/settle_residual"].device)
    out.update(_precision_diagnostics(model))
    return out


# ---------------------------------------------------------------------------- the model
class PCGPT(GPT):
    """The GPT trained by predictive coding: the baseline's blocks, plus the inter-layer
    error energy's precision / ν (`pc_energy`), and `training_step` running the PC
    algorithm of `config.pc.algorithm` (`settle`, `pc` or `ipc`). Predicting is the
    baseline's forward pass (module docstring: inference needs no latent settling), so
    forward, generation and evaluation are inherited unchanged."""

    def __init__(self, config: GPTConfig):
        if config.pc.algorithm == "bp":
            raise ValueError("pc.algorithm='bp' is the baseline: build it with model.build_model(config) or GPT")
        super().__init__(config)
        # Created after GPT.init_weights and drawing nothing from the RNG (PCEnergy's
        # reset_parameters), so a PC model's weights equal the baseline's for the same seed.
        self.pc_energy = PCEnergy(config)

    def training_step(self, idx: torch.Tensor, targets: torch.Tensor, *, grad_scale: float = 1.0,
                      label_smoothing: float = 0.0, optimizer: torch.optim.Optimizer | None = None
                      ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The PC algorithm's gradients for one micro-batch (the contract: GPT.training_step)."""
        return training_step(self, idx, targets, grad_scale=grad_scale, label_smoothing=label_smoothing,
                             optimizer=optimizer)


def build_model(config: GPTConfig) -> GPT:
    """The model `config` describes: the backprop baseline `GPT` for pc.algorithm='bp',
    the predictive-coding `PCGPT` otherwise."""
    return GPT(config) if config.pc.algorithm == "bp" else PCGPT(config)

