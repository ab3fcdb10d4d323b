"""Predictive coding across layers: the energy, settling, and the PC training algorithms.

DESIGN §3, "Predictive-coding energy across layers".

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
- The output term is the categorical negative log-likelihood (cross-entropy),
  as PC beyond Gaussians prescribes for a softmax output.

Precision
---------
`fixed` is π = 1 (nothing to learn). `layer` / `channel` hold one π per layer
(and channel), set one of two ways (`pc.precision_update`):
- `gradient`: log π through a smooth clamp, log π = log π_min + (log π_max −
  log π_min)·σ(w), initialised at π = 1, learned by gradient descent on E at the
  settled states (a hard clamp would leave a bound with zero gradient for ever;
  without −½·log π the energy falls monotonically as π → 0, so `PCConfig`
  refuses that combination). With the target clamped the settled errors are
  gradient-sized, ∂E/∂log π = ½(π·e² − 1) < 0, and π only grows (to 8 in every
  layer after 600 steps of the CPU default, before stable settling existed).
- `variance`: π_l ∝ 1/v_l with v_l the running mean (decay pc.precision_decay)
  of the squared precision-weighted errors ε_l = ∂ρ/∂e at the settled states,
  normalised to a geometric mean of 1 over layers (and channels). ε, unlike e,
  does not shrink as π grows (at equilibrium π_l·e_l = ε_l is set by the layers
  above), so the estimate has no runaway; and the normalisation leaves the
  overall scale to β (scaling every π by s moves the equilibrium like β/s).
Which regime makes precision matter: under fixed predictions at equilibrium
ε_l = J_{l+1}ᵀ ε_{l+1} = −N·β·∂CE/∂x_l whatever π and ρ, so the weight updates
are backprop's and layer precision cancels. It changes learning only out of
equilibrium (T < n_layer, state_lr < 1), with free predictions (π sets how far
each layer's state moves, and so where the Jacobians are taken), or through
non-Gaussian errors out of equilibrium. Attention precision (model/attention.py)
changes the forward function itself and matters at any T.

Settling
--------
The states start at the forward pass (x_l = μ_l, every e_l = 0) and take T steps
on E, in fp32 (or the model's dtype if wider) even under bf16 autocast. Each
token's states descend that token's summed energy N·E: the 1/N of the token
mean must not shrink the step of every state as the batch grows.

The step (`pc.precondition`, on by default) is preconditioned per layer by the
curvature of the layer's own error term, the IRLS / half-quadratic weight
w_l = ρ'(e_l)/e_l (π for Gaussian, (ν+1)π/(ν+πe²) for Student-t, π/√(πe²+ε)
for Laplace; Holland & Welsch 1977, Geman & Reynolds 1992):

    x_l ← x_l − state_lr · v_l,   v_l ← state_momentum·v_l + w_l⁻¹ · ∂(N·E)/∂x_l

ρ is a function of e² concave in e², so the quadratic of curvature w_l(e) at e
majorises it (Lange, Hunter & Yang 2000, "optimization transfer"): with
state_lr ≤ 1 the own-error term never grows, and with state_lr = 1 a Gaussian
layer's own error is cancelled in one step, e_l ← w_l⁻¹·(J_{l+1}ᵀ ε_{l+1})
whatever π. A plain step (precondition off) contracts it by (1 − state_lr·π),
which diverges with alternating sign once state_lr·π > 2 — what a learned π of
8 did to the previous default. At π = 1 with Gaussian errors both steps are
the same, so every equivalence with backprop below is unchanged.

With free predictions (the true energy) descent is also guaranteed across
layers: a step is tried per sequence, and a sequence whose energy would rise (beyond rounding, 16 ulp) keeps its states
and halves its step, which grows back by 1.2× (up to state_lr) after each
success (backtracking, on the device: no host sync). Rejected tries are counted (`pc/settle_rejected`). Under fixed
predictions the dynamics are a linear transport, not the descent of one
energy, and preconditioning is what keeps them stable at any π.

The error wave: every state starts at the forward pass and information moves
one layer per step, so before step t only the top t states have moved and only
their errors are nonzero. Settling therefore recomputes (free predictions) or
differentiates (fixed predictions) only the blocks that can see a nonzero
error — exactly, not as an approximation — about half the work for T = n_layer.
The learning phase likewise runs only the blocks the wave reached: below it
every error, and so every weight gradient, is exactly zero (set, not computed).
And the block at the wave's front still reads its forward input when the wave
arrives, so its VJP reuses the forward pass's graph instead of a recomputation.

The residual reported and compared with `tol` is the RMS over positions of the
per-token gradient norm ‖∂(N·E)/∂x_{·,b,t}‖ across all layers.

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
- `bp`: backprop (GPT.training_step; the baseline class, never comes here).
- `pc`: inference learning. Settle with the output clamped to the targets,
  then every layer's weights get the gradient of its own error term with its
  input (a value node, or the data for layer 0) held constant, the head the
  gradient of CE at the settled x_{L-1}, and π, ν the gradient of E at the
  settled states. With `fixed_predictions`, the μ_l (and the output's softmax)
  stay at their forward values and Jacobians while the states settle, and the
  local gradients are taken through those forward predictions (Millidge et al.
  2020). Then, with state_lr = 1 and momentum 0, every step moves the error wave
  down one layer exactly (ε_l ← J_{l+1}ᵀ·ε_{l+1}): after T ≥ n_layer steps
  ∂ρ/∂e_l = −N·β·∂CE/∂x_l at every layer and the weight gradients equal
  backprop's exactly, for any β and (preconditioned, Gaussian) any π
  (Whittington & Bogacz 2017; Song et al. 2020, Z-IL) — backprop by
  construction. Without fixed predictions they approach backprop's as β → 0.
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

Compiling and CUDA graphs: `PCGPT.compile()` compiles each block and the
head + loss (what settling calls), not only forward(), weight-free views of the
blocks for the states' VJPs (input gradients only), and settling's per-layer
element-wise arithmetic (`_StepMath`: one fused kernel where eager runs ~20). A
step has static shapes and, with `tol` = 0, no host synchronisation, so
model/step.py can capture it whole in one CUDA graph. BENCHMARKS.md has what
each of these saves and where the step's time goes.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from .attention import twice_differentiable
from .config import GPTConfig
from .gpt import GPT


class PCEnergy(nn.Module):
    """The inter-layer error energy's precision / ν and its density ρ.

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
        learned = self.width and self.pc.precision_update == "gradient"
        if learned:
            self.precision_logit = nn.Parameter(torch.empty(self.n_layer * self.width))
        else:
            self.register_parameter("precision_logit", None)
        if self.width and not learned:
            # running mean of the settled ε², and how many updates it has seen
            self.register_buffer("error_var", torch.ones(self.n_layer * self.width))
            self.register_buffer("error_var_count", torch.zeros(()))
        if self.pc.error == "student_t":
            self.nu_raw = nn.Parameter(torch.empty(self.n_layer))
        else:
            self.register_parameter("nu_raw", None)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """π = 1 (σ(w) placed where log π = 0 inside the clamp; the variance estimate at 1);
        ν = pc.nu_init (ν = softplus(raw))."""
        if self.precision_logit is not None:
            s = -self.log_min / (self.log_max - self.log_min)  # in (0, 1): PCConfig keeps 1 inside the clamp
            self.precision_logit.fill_(math.log(s / (1 - s)))
        if hasattr(self, "error_var"):
            self.error_var.fill_(1.0)
            self.error_var_count.zero_()
        if self.nu_raw is not None:
            self.nu_raw.fill_(math.log(math.expm1(self.pc.nu_init)))

    def log_precision(self) -> torch.Tensor | None:
        """log π per layer, (L, 1) or (L, C); None for `fixed` (π = 1)."""
        if self.precision_logit is not None:
            s = torch.sigmoid(self.precision_logit).view(self.n_layer, self.width)
            return self.log_min + (self.log_max - self.log_min) * s
        if self.width:
            log_v = self.error_var.clamp_min(1e-30).log()
            return (log_v.mean() - log_v).clamp(self.log_min, self.log_max).view(self.n_layer, self.width)
        return None

    @torch.no_grad()
    def observe(self, eps: list[torch.Tensor]) -> None:
        """`variance` precision: fold the settled precision-weighted errors ε_l (B, T, C)
        into the running mean of ε² (the first observation replaces the initial 1s).
        Under DDP the per-layer means are averaged over ranks, so every replica keeps
        the same π."""
        if not hasattr(self, "error_var"):
            return
        dims = (0, 1) if self.width > 1 else (0, 1, 2)
        m = torch.cat([e.float().square().mean(dim=dims).reshape(-1) for e in eps])  # (L·width,)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(m)
            m /= torch.distributed.get_world_size()
        d = self.pc.precision_decay
        first = self.error_var_count == 0
        self.error_var.copy_(torch.where(first, m, d * self.error_var + (1 - d) * m))
        self.error_var_count.add_(1)

    def nu(self) -> torch.Tensor | None:
        """Student-t degrees of freedom per layer, (L,); None for other errors."""
        return None if self.nu_raw is None else F.softplus(self.nu_raw)

    def at(self, layer: int, detach: bool = False) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """(log π, ν) of one layer, what the per-layer functions below take: (1,) or (C,) and a
        0-d ν, or None where absent; `detach` for the settling arithmetic (no graph)."""
        lp, nu = self.log_precision(), self.nu()
        lp = None if lp is None else lp[layer]
        nu = None if nu is None else nu[layer]
        if detach:
            lp = None if lp is None else lp.detach()
            nu = None if nu is None else nu.detach()
        return lp, nu

    def error_energy(self, e: torch.Tensor, layer: int) -> torch.Tensor:
        """Σ_c [ρ(e_c; π_c) − ρ(0)] for each position: what the prediction errors cost, zero at
        e = 0 (the normalisers, −½·log π and Student-t's ν terms, left out): (..., C) -> (...)."""
        return _rho(e, *self.at(layer), self.pc.error, self.pc.laplace_eps)

    def normaliser(self, layer: int, channels: int) -> torch.Tensor | float:
        """Σ_c of the density's normaliser for one position: −½·log π, and for Student-t
        log Γ(ν/2) − log Γ((ν+1)/2) + ½·log ν (the ν terms that let ν learn)."""
        out = 0.0
        lp = self.log_precision()
        if lp is not None:
            out = -0.5 * lp[layer].sum() * (channels // lp[layer].numel())
        if self.pc.error == "student_t":
            nu = self.nu()[layer]
            out = out + channels * (torch.lgamma(nu / 2) - torch.lgamma((nu + 1) / 2) + 0.5 * torch.log(nu))
        return out

    def token_energy(self, e: torch.Tensor, layer: int) -> torch.Tensor:
        """Σ_c [ρ(e_c; π_c) − ½·log π_c] for each position: (..., C) -> (...)."""
        return self.error_energy(e, layer) + self.normaliser(layer, e.shape[-1])

    def error_grad(self, e: torch.Tensor, layer: int) -> torch.Tensor:
        """ε = ∂ token_energy / ∂e, in closed form (the precision-weighted error the states feel)."""
        w = self.curvature(e, layer)
        return e if w is None else w * e

    def curvature(self, e: torch.Tensor, layer: int) -> torch.Tensor | None:
        """The IRLS weight w = ρ'(e)/e, the curvature of the quadratic that majorises ρ at e
        (module docstring): π, (ν+1)π/(ν+πe²), π/√(πe²+ε). None where it is 1 (Gaussian, π = 1)."""
        return _curvature(e, *self.at(layer), self.pc.error, self.pc.laplace_eps)


def _rho(e: torch.Tensor, lp: torch.Tensor | None, nu: torch.Tensor | None, error: str, laplace_eps: float
         ) -> torch.Tensor:
    """Σ_c [ρ(e_c) − ρ(0)] of one layer with log-precision lp and ν (PCEnergy.error_energy)."""
    z2 = e.square() if lp is None else e.square() * lp.exp()  # π·e²
    if error == "gaussian":
        return 0.5 * z2.sum(-1)
    if error == "student_t":
        return 0.5 * (nu + 1) * torch.log1p(z2 / nu).sum(-1)
    return (torch.sqrt(z2 + laplace_eps) - math.sqrt(laplace_eps)).sum(-1)


def _curvature(e: torch.Tensor, lp: torch.Tensor | None, nu: torch.Tensor | None, error: str,
               laplace_eps: float) -> torch.Tensor | None:
    """The IRLS weight ρ'(e)/e of one layer (PCEnergy.curvature)."""
    pi = None if lp is None else lp.exp()
    if error == "gaussian":
        return pi
    z2 = e.square() if pi is None else pi * e.square()
    num = 1.0 if pi is None else pi
    if error == "student_t":
        return (nu + 1) * num / (nu + z2)
    return num / torch.sqrt(z2 + laplace_eps)


class _StepMath:
    """The element-wise arithmetic of a settling step (free and fixed predictions), one layer
    per call, and the step's diagnostics.

    Plain functions, which PCGPT.compile() compiles into one fused kernel each: eager,
    one step of one layer is ~20 kernels over (B, T, C) fp32 tensors, which cost a
    third of the PC step's GPU time at the char config (BENCHMARKS.md, the PC step)."""

    def __init__(self, pc, compiled: bool = False):
        self.pc = pc
        for name in ("propose", "measure", "accept", "judge", "error", "move", "gradient"):
            fn = getattr(self, "_" + name)
            setattr(self, name, torch.compile(fn, dynamic=False) if compiled else fn)
        # the per-step diagnostics: a few dozen reductions and scalar ops, fused too
        self.diagnostics = torch.compile(_diagnostics, dynamic=False) if compiled else _diagnostics

    def _direction(self, g, e, lp, nu):
        """The preconditioned direction w⁻¹·g (_Batch.direction); e None: at e = 0."""
        if e is None:
            e = g.new_zeros(())
        w = _curvature(e, lp, nu, self.pc.error, self.pc.laplace_eps) if self.pc.precondition else None
        return g if w is None else g / w.to(g.dtype)

    def _propose(self, best, g, e, velocity, eta, lp, nu):
        """The trial state and its step (the velocity to keep with momentum; None without)."""
        step = self._direction(g, e, lp, nu)
        if velocity is not None:
            step = step + self.pc.state_momentum * velocity
        return best - eta * step.to(best.dtype), (step if velocity is not None else None)

    def _eps(self, e, lp, nu):
        """ε = ∂ρ/∂e = w·e (PCEnergy.error_grad)."""
        w = _curvature(e, lp, nu, self.pc.error, self.pc.laplace_eps)
        return e if w is None else w * e

    def _error(self, x, mu, lp, nu):
        """The error at state x, ε, and −ε as the cotangent of μ."""
        e = x - mu.to(x.dtype)
        eps = self._eps(e, lp, nu)
        return e, eps, (-eps).to(mu.dtype)

    def _move(self, x, eps, down, top, e, velocity, lp, nu):
        """Fixed predictions: one state's step from its gradient ε + J_{l+1}ᵀ(−ε_{l+1}) (+ the
        output's at the top), any of them None where zero; the new state and velocity."""
        g = None
        for part in (eps, down, top):
            if part is not None:
                g = part.to(x.dtype) if g is None else g + part.to(x.dtype)
        d = self._direction(torch.zeros_like(x) if g is None else g, e, lp, nu)
        v = d if velocity is None else self.pc.state_momentum * velocity + d
        return x - self.pc.state_lr * v, (v if velocity is not None else None)

    def _gradient(self, e, down, top, lp, nu):
        """The states' gradient ε + (the top-down term) + (the output's), None where zero."""
        g = self._eps(e, lp, nu)
        for part in (down, top):
            if part is not None:
                g = g + part.to(g.dtype)
        return g

    def _measure(self, x, mu, lp, nu):
        """At a trial: the error, ε, each row's Σρ (B,), and −ε as the cotangent of μ."""
        e, eps, cotangent = self._error(x, mu, lp, nu)
        return e, eps, _rho(e, lp, nu, self.pc.error, self.pc.laplace_eps).sum(-1), cotangent

    @staticmethod
    def _accept(keep, grad, grad_old, eps=None, trial=None, best=None, err=None, err_old=None, step=None,
                velocity=None):
        """Keep the trial where `keep` (B, 1, 1), the old values elsewhere; the trial's gradient
        is its VJP part `grad` plus the own-error term `eps`."""
        out = [torch.where(keep, grad if eps is None else grad + eps, grad_old)]
        if trial is not None:
            out.append(torch.where(keep, trial, best))
            out.append(None if err is None else torch.where(keep, err, err_old))
            out.append(None if velocity is None else torch.where(keep, step, velocity))
        return out

    def _judge(self, e_try, energy, eta, rejected):
        """Per row: accept unless the energy rises beyond rounding (16 ulp: a strict test would
        reject converged steps at random); halve the step after a rejection, grow it back by
        1.2x (up to state_lr) after a success (doubling back re-tried the rejected step every
        other step: half the tries wasted in a test over π in 0.1..100; 1.2x: about one in four)."""
        ok = e_try <= energy + 16 * torch.finfo(e_try.dtype).eps * energy.abs()
        keep = ok.view(-1, 1, 1)
        eta = torch.where(keep, (1.2 * eta).clamp(max=self.pc.state_lr), 0.5 * eta)
        return ok, torch.where(ok, e_try, energy), eta, rejected + (~ok).sum()


# ---------------------------------------------------------------------------- one batch
class _Batch:
    """A batch and the pieces of the energy that depend on the model."""

    def __init__(self, model: PCGPT, idx: torch.Tensor, targets: torch.Tensor, label_smoothing: float):
        self.model, self.idx, self.targets, self.label_smoothing = model, idx, targets, label_smoothing
        self.pc = model.config.pc
        self.energy: PCEnergy = model.pc_energy
        self.L = model.config.n_layer
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

    def predict_for_states(self, layer: int, below: torch.Tensor) -> torch.Tensor:
        """μ_l for a gradient with respect to the states only: through the compiled weight-free
        view of the block when there is one (PCGPT.compile), whose backward skips the weight
        gradients that a compiled backward would otherwise always compute."""
        views = self.model._state_blocks
        return (views[layer] if views else self.model.blocks[layer])(below, self.cos, self.sin)

    @staticmethod
    def as_state(mu: torch.Tensor) -> torch.Tensor:
        """Value nodes live in fp32 (or wider), whatever the autocast dtype of the blocks."""
        return mu.to(torch.promote_types(mu.dtype, torch.float32))

    def forward_states(self, mu0: torch.Tensor) -> list[torch.Tensor]:
        """The forward pass as value nodes (with the graph, if grad mode is on)."""
        states = [self.as_state(mu0)]
        for layer in range(1, self.L):
            states.append(self.as_state(self.predict(layer, states[-1])))
        return states

    def ce(self, top: torch.Tensor) -> torch.Tensor:
        """Mean cross-entropy of the head at the top state."""
        return self.model.head_loss(top, self.targets, self.label_smoothing)

    def ce_rows(self, top: torch.Tensor) -> torch.Tensor:
        """β·(summed cross-entropy) of each sequence, (B,): the output term of each row's N·E."""
        return self.pc.output_weight * self.model.head_loss(top, self.targets, self.label_smoothing,
                                                            reduction="none").sum(-1)

    def evaluate(self, states: list[torch.Tensor], mu0: torch.Tensor, dynamics: bool) -> _Evaluation:
        """The energy at `states`. `dynamics` builds it for the states' gradient, where the
        `no_output_feedback` pathway keeps the output term away from the top state."""
        mus = [mu0] + [self.predict(l, states[l - 1]) for l in range(1, len(states))]
        errors = [x - mu.to(x.dtype) for x, mu in zip(states, mus)]
        layer_sums = [self.energy.token_energy(e, l).sum() for l, e in enumerate(errors)]
        top = states[-1]
        if dynamics and self.pc.error_pathway == "no_output_feedback":
            top = top.detach()
        return _Evaluation(mus, errors, layer_sums, self.ce(top))

    def targets_of(self, states: list[torch.Tensor], ev: _Evaluation) -> list[torch.Tensor]:
        """What to differentiate for the states' gradient: the states themselves, or for
        `bottom_up` the errors (∂S/∂e_l = ∂ρ/∂e_l, the own-error term alone) and the top state."""
        if self.pc.error_pathway == "bottom_up":
            return ev.errors[:-1] + [states[-1]]
        return states

    def residual(self, grads: list[torch.Tensor]) -> torch.Tensor:
        """RMS over positions of the per-token gradient norm across layers."""
        positions = self.idx.numel()
        return torch.sqrt(sum(g.detach().float().square().sum() for g in grads) / positions)

    def normalisers(self, like: torch.Tensor) -> torch.Tensor:
        """(L,) each layer's −½·log π term per scored token (what every layer's energy is at e = 0)."""
        zero = torch.zeros_like(like[:1, :1])
        per_pos = torch.stack([self.energy.token_energy(zero, l).sum() for l in range(self.L)])
        return (per_pos * (self.idx.numel() / self.n)).detach()

    def energies_at_forward(self, ce: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """Per-layer energies at the forward pass (every e_l = 0: only the normalisers), then β·CE."""
        return torch.cat([self.normalisers(like).float(), (self.pc.output_weight * ce.detach().float()).view(1)])

    def direction(self, grads: list[torch.Tensor], errors: list[torch.Tensor]) -> list[torch.Tensor]:
        """The preconditioned step direction w_l⁻¹·g_l of each layer (module docstring)."""
        if not self.pc.precondition:
            return grads
        out = []
        for l, (g, e) in enumerate(zip(grads, errors)):
            w = self.energy.curvature(e, l)
            out.append(g if w is None else g / w.to(g.dtype))
        return out


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
    """fixed_predictions: (forward predictions with their graph of input gradients only, the
    leaves they read, CE with its graph)."""
    rejected: torch.Tensor | None = None
    """Free predictions: tried steps that would have raised a sequence's energy (0-d)."""
    grads: list[torch.Tensor] | None = None
    """Free predictions: the states' gradient ∂(N·E)/∂x_l at the settled states (the pathway's
    dynamics), kept from the last accepted try of each sequence."""
    reached: int = 0
    """The lowest layer the error wave reached: below it every state is still the forward
    pass's and every error exactly zero, so those blocks' weights get no gradient."""


def _momentum_step(states, directions, velocity, pc, lo: int = 0) -> list[torch.Tensor]:
    """x ← x − lr·v, v ← m·v + d (torch SGD's convention) for the layers ≥ lo (those below
    have no gradient yet: the error wave), outside autograd. New tensors, never in place: a
    state can share storage with a prediction that the energy still reads."""
    with torch.no_grad():
        new = list(states[:lo])
        for i in range(lo, len(states)):
            x, d = states[i], directions[i].to(states[i].dtype)
            velocity[i] = d if velocity[i] is None or pc.state_momentum == 0 else pc.state_momentum * velocity[i] + d
            new.append(x - pc.state_lr * velocity[i])
        return new


def _stop_early(pc, batch: _Batch, grads: list[torch.Tensor]) -> bool:
    """Whether the residual is under `tol`: a host sync per step, only when asked for (tol > 0)."""
    return pc.tol > 0 and batch.residual(grads).item() < pc.tol


def _reached(L: int, t: int) -> int:
    """The lowest layer whose state may have moved after t settling steps (the error wave)."""
    return max(0, L - t)


# ---------------------------------------------------------------------------- settling
def settle(model: PCGPT, idx: torch.Tensor, targets: torch.Tensor, *, label_smoothing: float = 0.0,
           steps: int | None = None, trace: bool = False) -> Settled:
    """Settle the value nodes of one batch with the output clamped to `targets`.

    T = `steps` or `config.pc.settle_steps` state updates from the forward pass,
    no weight changes. The states are detached; the result keeps what `pc`'s local
    gradient pass needs. `trace=True` records the total energy before every update.
    """
    batch = _Batch(model, idx, targets, label_smoothing)
    T = model.config.pc.settle_steps if steps is None else steps
    return (_settle_fixed if model.config.pc.fixed_predictions else _settle_free)(batch, T, trace)


def _settle_free(batch: _Batch, T: int, trace: bool) -> Settled:
    """Settling on the true energy (predictions recomputed from the current states), with
    per-sequence backtracking so that no sequence's energy ever rises."""
    pc, L, fused = batch.pc, batch.L, batch.model._step_math
    mu0 = batch.first_prediction()  # graph kept: layer 0's local gradient needs it
    # The forward pass. The block at the error wave's front (block L−1−t at step t) still
    # reads its forward input when the wave reaches it, so its forward graph (input
    # gradients only) is kept for that step's VJP instead of being recomputed.
    wave = range(max(1, L - T), L)
    fwd, held = [batch.as_state(mu0.detach())], {}
    for layer in range(1, L):
        if layer in wave:
            leaf = fwd[-1].detach().requires_grad_()
            mu = batch.predict_for_states(layer, leaf)
            held[layer] = (leaf, mu)
        else:
            with torch.no_grad():
                mu = batch.predict(layer, fwd[-1])
        fwd.append(batch.as_state(mu.detach()))
    # At the forward pass every e_l is exactly 0 and ρ'(0) = 0, so the only gradient is the
    # output term's: one backward through the head instead of through every block.
    top = fwd[-1].detach().requires_grad_()
    ce_rows = batch.ce_rows(top)
    (g_top,) = torch.autograd.grad(ce_rows.sum(), top)
    ce = ce_rows.detach().sum() / batch.n_beta  # the forward pass's mean CE
    feedback = pc.error_pathway != "no_output_feedback"
    if not feedback:
        g_top = torch.zeros_like(g_top)
    before = batch.energies_at_forward(ce, fwd[0])
    B = batch.idx.size(0)
    best = list(fwd)
    grads = [torch.zeros_like(s) for s in fwd[:-1]] + [g_top]
    # the errors, for the step's curvature: a Gaussian's does not read them
    errors = [torch.zeros_like(s) if pc.error != "gaussian" else None for s in fwd]
    energy = ce_rows.detach() if feedback else torch.zeros_like(ce_rows.detach())  # (B,) N·E per row
    eta = torch.full((B, 1, 1), pc.state_lr, device=g_top.device, dtype=g_top.dtype)
    velocity = [torch.zeros_like(s) if pc.state_momentum else None for s in fwd]
    rejected = torch.zeros((), device=g_top.device)
    params = [batch.energy.at(l, detach=True) for l in range(L)]
    const, energy_trace, taken = batch.normalisers(fwd[0]).sum(), [], 0
    for t in range(T):
        if trace:
            energy_trace.append(energy.sum() / batch.n + const)
        if _stop_early(pc, batch, grads):
            break
        lo = _reached(L, t + 1)  # the layers this step can move
        with torch.no_grad():
            tried = {l: fused.propose(best[l], grads[l], errors[l], velocity[l], eta, *params[l])
                     for l in range(lo, L)}
        trial = best[:lo] + [tried[l][0] for l in range(lo, L)]
        e_try, g_try, err_try, eps_try = _free_energy(batch, trial, mu0.detach(), lo, held, params)
        with torch.no_grad():
            ok, energy, eta, rejected = fused.judge(e_try, energy, eta, rejected)
            keep = ok.view(B, 1, 1)
            for l in range(max(0, lo - 1), L):
                if l < lo:
                    (grads[l],) = fused.accept(keep, g_try[l], grads[l])
                else:
                    grads[l], best[l], errors[l], velocity[l] = fused.accept(
                        keep, g_try[l], grads[l], eps_try[l], trial[l], best[l],
                        None if errors[l] is None else err_try[l], errors[l], tried[l][1], velocity[l])
        taken = t + 1
    if trace:
        energy_trace.append(energy.sum() / batch.n + const)
    return Settled(best, taken, ce, before, energy_trace, mu0, rejected=rejected, grads=grads,
                   reached=_reached(L, taken))


def _free_energy(batch: _Batch, states: list[torch.Tensor], mu0: torch.Tensor, lo: int, held: dict, params: list
                 ) -> tuple[torch.Tensor, list, list, list]:
    """Each sequence's N·E (without the normalisers), and per layer the VJP part of the states'
    gradient, the error and ε = ∂ρ/∂e at `states`, where only layers ≥ lo have left the
    forward pass: below them every error is zero, so only blocks ≥ max(lo, 1) are recomputed
    (and differentiated into the state below). Block lo reads its forward input: its graph
    comes from `held` (the forward pass, used once) where there is one."""
    pc, L, fused = batch.pc, batch.L, batch.model._step_math
    first = max(0, lo - 1)  # the lowest state with a gradient: top-down from layer lo
    leaves = [s if l < first else s.detach().requires_grad_() for l, s in enumerate(states)]
    mus = {}
    if lo in held:
        leaves[lo - 1], mus[lo] = held.pop(lo)
    for l in range(max(1, lo), L):
        if l not in mus:
            mus[l] = batch.predict_for_states(l, leaves[l - 1])
    if lo == 0:
        mus[0] = mu0
    errors, eps, cotangents, rows = [None] * L, [None] * L, {}, 0
    for l in range(lo, L):
        errors[l], eps[l], r, cotangents[l] = fused.measure(leaves[l].detach(), mus[l].detach(), *params[l])
        rows = rows + r
    # The gradient: own error in closed form (ε, added by the caller), plus top-down VJPs
    # (`full`) and the output term.
    outputs, cots = [], []
    if pc.error_pathway == "full":
        outputs += [mus[l] for l in range(max(1, lo), L)]
        cots += [cotangents[l] for l in range(max(1, lo), L)]
    if pc.error_pathway != "no_output_feedback":
        ce_rows = batch.ce_rows(leaves[-1])
        rows = rows + ce_rows.detach()
        outputs.append(ce_rows.sum())
        cots.append(None)
    reached = torch.autograd.grad(outputs, leaves[first:], cots, allow_unused=True)
    grads: list = [None] * L
    for i, l in enumerate(range(first, L)):
        grads[l] = torch.zeros_like(leaves[l]) if reached[i] is None else reached[i]
    return rows, grads, errors, eps


def _settle_fixed(batch: _Batch, T: int, trace: bool) -> Settled:
    """Settling under the fixed-prediction assumption: μ_l, their Jacobians and the output's
    softmax stay at the forward pass, so each step is one vector-Jacobian product through
    the retained forward graph (only through the blocks the error wave has reached; a graph
    of input gradients only, the weights' come in the learning phase)."""
    pc, energy, L, energy_trace = batch.pc, batch.energy, batch.L, []
    mu0 = batch.first_prediction()
    leaves, mus = [], [mu0]
    for layer in range(L):
        if layer:
            mus.append(batch.predict_for_states(layer, leaves[-1]))
        leaves.append(batch.as_state(mus[-1]).detach().requires_grad_())
    ce = batch.ce(leaves[-1])
    (g_out,) = torch.autograd.grad(batch.n_beta * ce, leaves[-1], retain_graph=True)
    if pc.error_pathway == "no_output_feedback":
        g_out = torch.zeros_like(g_out)
    before = batch.energies_at_forward(ce, leaves[0])
    held = [mu.detach() for mu in mus]
    states = [x.detach() for x in leaves]
    velocity = [torch.zeros_like(x) if pc.state_momentum else None for x in states]
    params = [energy.at(l, detach=True) for l in range(L)]
    fused, const, taken = batch.model._step_math, batch.normalisers(leaves[0]).sum(), 0
    for t in range(T):
        moved = _reached(L, t)  # states that have left the forward pass: the only nonzero errors
        lo = max(1, moved)      # blocks whose output error can be nonzero
        with torch.no_grad():
            err = {l: fused.error(states[l], held[l], *params[l]) for l in range(moved, L)}  # e, ε, −ε
        down = {}
        if pc.error_pathway != "bottom_up" and lo < L:
            # top-down term −J_{l+1}ᵀ ε_{l+1}, all reached layers in one backward through the forward graph
            vjp = torch.autograd.grad(mus[lo:], leaves[lo - 1:-1], [err[l][2] for l in range(lo, L)],
                                      retain_graph=True)
            down = {lo - 1 + i: d for i, d in enumerate(vjp)}
        if trace:
            with torch.no_grad():
                layers = sum(energy.error_energy(err[l][0], l).sum() for l in err) / batch.n
            energy_trace.append(layers.float() + const + pc.output_weight * ce.detach().float())
        if pc.tol > 0:
            grads = [torch.zeros_like(x) for x in states]
            for l, g in [(l, e[1]) for l, e in err.items()] + list(down.items()) + [(L - 1, g_out)]:
                grads[l] = grads[l] + g.to(grads[l].dtype)
            if _stop_early(pc, batch, grads):
                break
        with torch.no_grad():
            for l in range(_reached(L, t + 1), L):
                e, eps = err[l][:2] if l in err else (None, None)
                states[l], velocity[l] = fused.move(states[l], eps, down.get(l), g_out if l == L - 1 else None,
                                                    e, velocity[l], *params[l])
        taken = t + 1
    if trace:
        with torch.no_grad():
            layers = sum(energy.error_energy(x - mu.to(x.dtype), l).sum()
                         for l, (x, mu) in enumerate(zip(states, held)))
            energy_trace.append(layers.float() / batch.n + const + pc.output_weight * ce.detach().float())
    return Settled(states, taken, ce.detach(), before, energy_trace, mu0, (mus, leaves, ce),
                   reached=_reached(L, taken))


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

    Only the layers the error wave reached (≥ settled.reached) are evaluated: below them
    every state is the forward pass's, every error exactly zero and every weight gradient
    zero (their energy is the normaliser alone). Returns the evaluation at the settled
    states and the states' gradient there."""
    if settled.forward is not None:
        return _local_gradients_fixed(batch, settled, params, grad_scale)
    states, lo = settled.states, settled.reached
    mus = {l: batch.predict(l, states[l - 1]) for l in range(max(1, lo), batch.L)}  # inputs: constants
    if lo == 0:
        mus[0] = settled.mu0
    ev = _settled_evaluation(batch, states, mus, batch.ce(states[-1]))
    # no_output_feedback: the head still learns from CE; the states' gradient (the dynamics',
    # from settling) leaves it out.
    _gradients(ev.objective(batch.n_beta), params, [], grad_scale, batch.n_beta)
    _zero_unreached(batch.model, lo)
    return _detached(ev), settled.grads


def _settled_evaluation(batch: _Batch, states: list, mus: dict, ce: torch.Tensor) -> _Evaluation:
    """The energy at settled `states` with predictions `mus` of the reached layers (the
    others: zero error, the normaliser alone, which keeps the precision's gradient)."""
    errors, sums = [], []
    for l, x in enumerate(states):
        if l in mus:
            errors.append(x - mus[l].to(x.dtype))
            sums.append(batch.energy.token_energy(errors[-1], l).sum())
        else:
            errors.append(torch.zeros_like(x))
            sums.append(x.new_zeros(()) + batch.energy.normaliser(l, x.shape[-1]) * x[..., 0].numel())
    return _Evaluation([mus.get(l) for l in range(len(states))], errors, sums, ce)


def _detached(ev: _Evaluation) -> _Evaluation:
    return _Evaluation(ev.mus, [e.detach() for e in ev.errors], ev.layer_sums, ev.ce)


def _zero_unreached(model: PCGPT, lo: int) -> None:
    """Zero gradients (exact: their errors are zero) for the blocks below the error wave and,
    when layer 0 was not reached, the embedding: what the optimizer would have got from the
    whole energy, without computing it."""
    unreached = list(model.blocks[:lo]) + ([model.wte] if lo > 0 else [])
    for module in unreached:
        for p in module.parameters():
            if p.requires_grad and p.grad is None:
                p.grad = torch.zeros_like(p)


def _local_gradients_fixed(batch: _Batch, settled: Settled, params, grad_scale: float):
    """Fixed predictions: the settled states (constants) against the forward predictions, taken
    again with the blocks' weights (settling's graph holds the states' VJPs only) and only for
    the reached layers; CE stays at the forward pass, so the head's gradient is backprop's."""
    _, leaves, ce = settled.forward
    L, lo = batch.L, settled.reached
    inputs = {l: leaves[l - 1].detach().requires_grad_() for l in range(max(1, lo), L)}
    mus = {l: batch.predict(l, inputs[l]) for l in inputs}
    if lo == 0:
        mus[0] = settled.mu0
    ev = _settled_evaluation(batch, settled.states, mus, ce)
    # the states' gradient at the settled point: own error + what reaches each state through
    # the block above it (the top-down term) and CE's gradient at the top
    targets = [inputs[l] for l in inputs] + [leaves[-1]]
    reached = _gradients(ev.objective(batch.n_beta), params, targets, grad_scale, batch.n_beta)
    _zero_unreached(batch.model, lo)
    down = {l - 1: g for l, g in zip(inputs, reached[:-1])} if batch.pc.error_pathway != "bottom_up" else {}
    top = reached[-1] if batch.pc.error_pathway != "no_output_feedback" else None
    ev = _detached(ev)
    grads = [batch.model._step_math.gradient(e, down.get(l), top if l == L - 1 else None,
                                             *batch.energy.at(l, detach=True)) for l, e in enumerate(ev.errors)]
    return ev, grads


# ---------------------------------------------------------------------------- algorithms
def training_step(model: PCGPT, idx: torch.Tensor, targets: torch.Tensor, *, grad_scale: float = 1.0,
                  label_smoothing: float = 0.0, optimizer: torch.optim.Optimizer | None = None
                  ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """`settle`, `pc` or `ipc` for one micro-batch (see GPT.training_step for the contract)."""
    pc = model.config.pc
    if not grad_scale > 0:
        raise ValueError(f"grad_scale={grad_scale!r}: must be > 0")
    if pc.algorithm in ("pc", "ipc") and pc.settle_steps == 0:
        _, loss = model(idx, targets, label_smoothing=label_smoothing, return_logits=False)
        (loss * grad_scale).backward()  # T = 0 is backprop (module docstring)
        return loss.detach(), {"pc/settle_steps": torch.zeros((), device=loss.device),
                               **_precision_diagnostics(model)}
    step = {"pc": _pc_step, "settle": _settle_step, "ipc": _ipc_step}[pc.algorithm]
    loss, diag, eps = step(model, idx, targets, grad_scale, label_smoothing, optimizer)
    model.pc_energy.observe(eps)  # `variance` precision; a no-op otherwise
    return loss, diag


def _settled_eps(batch: _Batch, ev: _Evaluation) -> list[torch.Tensor]:
    """The settled ε_l for PCEnergy.observe (`variance` precision only: none otherwise)."""
    if not hasattr(batch.energy, "error_var"):
        return []
    return [batch.energy.error_grad(e.detach(), l) for l, e in enumerate(ev.errors)]


def _pc_step(model, idx, targets, grad_scale, label_smoothing, optimizer):
    batch = _Batch(model, idx, targets, label_smoothing)
    T = model.config.pc.settle_steps
    settled = (_settle_fixed if model.config.pc.fixed_predictions else _settle_free)(batch, T, False)
    ev, state_grads = _local_gradients(batch, settled, _trainable(model), grad_scale)
    diag = model._step_math.diagnostics(model, batch, settled.energy_before, ev, state_grads, settled.steps,
                                        settled.rejected)
    return settled.loss, diag, _settled_eps(batch, ev)


def _settle_step(model, idx, targets, grad_scale, label_smoothing, optimizer):
    """E(x_T)/β through the unrolled settling; only the last `truncate` steps are differentiated.

    Differentiating a settling step differentiates a gradient: the fused attention kernels
    have first derivatives only, so the unrolled steps run attention through its twice-
    differentiable paths (T = 0 needs no double backward and keeps the fused one)."""
    if model.config.pc.settle_steps == 0:
        return _settle_unrolled(model, idx, targets, grad_scale, label_smoothing)
    with twice_differentiable():
        return _settle_unrolled(model, idx, targets, grad_scale, label_smoothing)


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
            errors = [torch.zeros_like(s) for s in states]
            g = [torch.zeros_like(s) for s in states[:-1]]
            g_top = torch.zeros_like(top) if pc.error_pathway == "no_output_feedback" else \
                torch.autograd.grad(batch.n_beta * ev0_ce, top, create_graph=True)[0]
            grads = g + [g_top]
        else:
            ev = batch.evaluate(states, mu0, dynamics=True)
            errors = ev.errors
            grads = torch.autograd.grad(ev.summed(batch.n_beta), batch.targets_of(states, ev), create_graph=True)
        if _stop_early(pc, batch, grads):
            break
        d = batch.direction(list(grads), errors)
        velocity = [g if v is None or pc.state_momentum == 0 else pc.state_momentum * v + g
                    for v, g in zip(velocity, d)]
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
    return loss, _diagnostics(model, batch, before, ev, state_grads, taken), _settled_eps(batch, ev)


def _settle_free_from(batch: _Batch, mu0: torch.Tensor, states: list[torch.Tensor], T: int):
    """Plain (non-differentiated) settling from given states; returns (states, momentum, steps)."""
    velocity: list = [None] * len(states)
    taken = 0
    for _ in range(T):
        leaves = [s.detach().requires_grad_() for s in states]
        ev = batch.evaluate(leaves, mu0, dynamics=True)
        grads = torch.autograd.grad(ev.summed(batch.n_beta), batch.targets_of(leaves, ev))
        states = [s.detach() for s in leaves]
        if _stop_early(batch.pc, batch, grads):
            break
        states = _momentum_step(states, batch.direction(list(grads), [e.detach() for e in ev.errors]),
                                velocity, batch.pc)
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
        if t == pc.settle_steps or _stop_early(pc, batch, state_grads):
            break
        optimizer.step()   # the inner weight step (not clipped: clipping is the caller's, at its step)
        for p in params:
            p.grad = None
        states = [s.detach() for s in leaves]
        states = _momentum_step(states, batch.direction(state_grads, [e.detach() for e in ev.errors]),
                                velocity, pc)
        taken = t + 1
    for p, g in zip(params, stash):  # earlier micro-batches' gradients + this one's last
        if g is not None:
            p.grad = g if p.grad is None else g.add_(p.grad)
    return loss.detach(), _diagnostics(model, batch, before, ev, state_grads, taken), _settled_eps(batch, ev)


# ---------------------------------------------------------------------------- diagnostics
@torch.no_grad()
def _precision_diagnostics(model: PCGPT) -> dict[str, torch.Tensor]:
    out = {}
    energy = model.pc_energy
    lp, nu = energy.log_precision(), energy.nu()
    one = torch.ones((), device=model.lm_head.weight.device)
    for l in range(energy.n_layer):
        out[f"pc/precision/{l}"] = one if lp is None else lp[l].exp().mean().detach().float()
        if nu is not None:
            out[f"pc/nu/{l}"] = nu[l].detach().float()
    for l, block in enumerate(model.blocks):
        lam = block.attn.precision()
        if lam is None:
            continue
        lam = lam.detach().float().flatten()
        if lam.numel() == model.config.n_head:
            out.update({f"attn/precision/{l}/{h}": lam[h] for h in range(lam.numel())})
        else:
            out[f"attn/precision/{l}"] = lam.mean()
    return out


@torch.no_grad()
def _diagnostics(model, batch: _Batch, before: torch.Tensor, ev: _Evaluation, state_grads: list[torch.Tensor],
                 steps: int, rejected: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """Detached tensors on the model's device keyed by metric name (DESIGN §5); layer `out`
    is the output term β·CE; `pc/error_energy/<l>` is layer l's Σρ per scored token
    without the −½·log π constant (what the prediction errors cost)."""
    after = ev.energies(batch.n, batch.pc.output_weight)
    L = len(ev.errors)
    out: dict[str, torch.Tensor] = {}
    for l in range(L):
        out[f"pc/energy_before/{l}"] = before[l]
        out[f"pc/energy_after/{l}"] = after[l]
        out[f"pc/error/{l}"] = ev.errors[l].detach().abs().mean().float()
        out[f"pc/error_energy/{l}"] = (batch.energy.error_energy(ev.errors[l].detach(), l).sum()
                                       / batch.n).float()
    out["pc/energy_before/out"], out["pc/energy_after/out"] = before[L], after[L]
    out["pc/energy_before"], out["pc/energy_after"] = before.sum(), after.sum()
    out["pc/settle_residual"] = batch.residual(state_grads)
    device = out["pc/settle_residual"].device
    out["pc/settle_steps"] = torch.full((), float(steps), device=device)
    out["pc/settle_rejected"] = (rejected if rejected is not None else torch.zeros((), device=device)).float()
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
        # compile(): weight-free views of the blocks for the states' gradients (not submodules),
        # and settling's element-wise arithmetic fused
        object.__setattr__(self, "_state_blocks", None)
        object.__setattr__(self, "_step_math", _StepMath(config.pc))

    def training_step(self, idx: torch.Tensor, targets: torch.Tensor, *, grad_scale: float = 1.0,
                      label_smoothing: float = 0.0, optimizer: torch.optim.Optimizer | None = None
                      ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The PC algorithm's gradients for one micro-batch (the contract: GPT.training_step)."""
        return training_step(self, idx, targets, grad_scale=grad_scale, label_smoothing=label_smoothing,
                             optimizer=optimizer)

    def compile(self, **kwargs) -> None:
        """Compile what settling runs, not only forward(): each block (its forward, and the
        backward autograd takes through it) and the head + loss. `settle` unrolls settling
        through a double backward, which compiled graphs do not have: it stays eager."""
        super().compile(**kwargs)
        if self.config.pc.algorithm == "settle":
            return
        if self.config.pc.fixed_predictions:
            # fixed-prediction settling takes T vector-Jacobian products through one forward
            # graph (retain_graph=True); AOTAutograd's donated buffers free the saved tensors at
            # the first backward, so keep them (torch._functorch.config; a process-wide switch)
            torch._functorch.config.donated_buffer = False
        for block in self.blocks:
            block.compile(**kwargs)
        self.head_loss = torch.compile(self.head_loss, **kwargs)
        # AOTAutograd compiles one backward per graph that returns every gradient the forward's
        # inputs may need, weights included: settling's vector-Jacobian products through the
        # blocks would pay for weight gradients nobody reads. The views below hold the same
        # weights (aliases: optimizer steps and loaded checkpoints show through) as buffers, so
        # their compiled backward computes the input gradient only.
        views = [_weight_free_view(block) for block in self.blocks]
        for view in views:
            view.compile(**kwargs)
        object.__setattr__(self, "_state_blocks", views)
        object.__setattr__(self, "_step_math", _StepMath(self.config.pc, compiled=True))


    def pc_diagnostics(self, idx: torch.Tensor, targets: torch.Tensor) -> dict[str, torch.Tensor]:
        """How PC is doing on one (fixed) batch, for evaluation steps; weights and .grad are
        left as they were. Device tensors keyed by metric name:
        - `pc/grad_cos/<l>` and `pc/grad_cos`: cosine between the PC weight update (what
          training_step puts in .grad; ipc with its inner steps frozen) and the backprop
          gradient, per block and over every weight the two share;
        - `pc/energy_drop`: (E(x_0) − E(x_T)) / |E(x_0)| of the true energy (predictions
          recomputed) at the settled states, without the normalisers; `pc/settle_diverged`
          1 when settling raised that energy or left it non-finite;
        - `pc/true_error_energy/<l>`: each layer's Σρ per scored token there;
        - the training step's own diagnostics (residual, precisions, ...)."""
        params = {n: p for n, p in self.named_parameters() if p.requires_grad}
        saved = {n: p.grad for n, p in params.items()}
        try:
            for p in params.values():
                p.grad = None
            frozen = torch.optim.SGD(list(params.values()), lr=0.0)  # ipc: inner steps change nothing
            _, diag = self.training_step(idx, targets, optimizer=frozen)
            pc_grads = {n: p.grad for n, p in params.items()}
            for p in params.values():
                p.grad = None
            GPT.training_step(self, idx, targets)
            bp_grads = {n: p.grad for n, p in params.items()}
        finally:
            for n, p in params.items():
                p.grad = saved[n]
        out = dict(diag)
        shared = [n for n in params if pc_grads[n] is not None and bp_grads[n] is not None]
        for l in range(self.config.n_layer):
            names = [n for n in shared if n.startswith(f"blocks.{l}.")]
            out[f"pc/grad_cos/{l}"] = _cosine([pc_grads[n] for n in names], [bp_grads[n] for n in names])
        out["pc/grad_cos"] = _cosine([pc_grads[n] for n in shared], [bp_grads[n] for n in shared])
        settled = settle(self, idx, targets)
        with torch.no_grad():
            batch = _Batch(self, idx, targets, 0.0)
            ev = batch.evaluate(settled.states, batch.first_prediction(), dynamics=False)
            layers = [batch.energy.error_energy(e, l).sum() / batch.n for l, e in enumerate(ev.errors)]
            e0 = settled.loss * self.config.pc.output_weight
            e1 = sum(layers) + self.config.pc.output_weight * ev.ce
            for l, v in enumerate(layers):
                out[f"pc/true_error_energy/{l}"] = v.float()
            out["pc/energy_drop"] = ((e0 - e1) / e0.abs().clamp_min(1e-30)).float()
            out["pc/settle_diverged"] = ((e1 > e0) | ~torch.isfinite(e1)).float()
        return {k: v.detach() for k, v in out.items()}


def _weight_free_view(module: nn.Module) -> nn.Module:
    """A copy of `module` whose parameters are buffers aliasing the originals' storage (no
    gradient, no copy of the data): the same function, differentiable in its inputs only."""
    memo = {id(t): t.detach() for t in (*module.parameters(), *module.buffers())}
    view = copy.deepcopy(module, memo)
    for m in view.modules():
        for name, t in list(m._parameters.items()):
            del m._parameters[name]
            m.register_buffer(name, t, persistent=False)  # None stays None (a Linear's bias)
    return view


def _cosine(a: list[torch.Tensor], b: list[torch.Tensor]) -> torch.Tensor:
    if not a:
        return torch.full((), float("nan"))
    x = torch.cat([g.double().flatten() for g in a])  # float64: a cosine of 1 - 1e-7 is not noise
    y = torch.cat([g.double().flatten() for g in b])
    return F.cosine_similarity(x, y, dim=0, eps=1e-30)


def build_model(config: GPTConfig) -> GPT:
    """The model `config` describes: the backprop baseline `GPT` for pc.algorithm='bp',
    the predictive-coding `PCGPT` otherwise."""
    return GPT(config) if config.pc.algorithm == "bp" else PCGPT(config)
