"""Model configuration: `GPTConfig` with nested `AttentionConfig` and `PCConfig`.

Every field says why it has its default. Validation happens in `__post_init__`
so a bad value fails at construction with a `ValueError` that names the field,
the value and what is allowed — before any tensor is allocated.
"""

from __future__ import annotations

from dataclasses import dataclass, field

KERNELS = ("dot", "gaussian", "student_t", "laplace", "mixture")
PRECISION_MODES = ("fixed", "head", "token")
MLPS = ("relu2", "gelu", "swiglu")
PC_ALGORITHMS = ("bp", "settle", "pc", "ipc")
PC_ERRORS = ("gaussian", "student_t", "laplace")
PC_PRECISIONS = ("fixed", "layer", "channel")
PC_PATHWAYS = ("full", "bottom_up", "no_output_feedback")
PC_PRECISION_UPDATES = ("gradient", "variance")


def _one_of(name: str, value, allowed) -> None:
    if value not in allowed:
        raise ValueError(f"{name}={value!r}: must be one of {', '.join(allowed)}")


def _positive(name: str, value, *, allow_zero: bool = False) -> None:
    ok = value >= 0 if allow_zero else value > 0
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not ok:
        bound = ">= 0" if allow_zero else "> 0"
        raise ValueError(f"{name}={value!r}: must be a number {bound}")


def _int_at_least(name: str, value, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name}={value!r}: must be an integer >= {low}")


@dataclass
class AttentionConfig:
    """Precision-weighted attention (DESIGN §3)."""

    kernel: str = "dot"
    """Score of key j for query i: `dot` q·k/√D; or the log-likelihood of q under a
    distribution centred on k: `gaussian`, `student_t`, `laplace`, `mixture`."""
    precision: str = "fixed"
    """`fixed` λ=1/√D (no learning: the "no precision weighting" ablation), `head`
    a learned log-precision per head, `token` λ_i from a projection of query token i."""
    precision_min: float = 1e-3
    """Lower clamp of λ: keeps the distance kernels from flattening to uniform attention."""
    precision_max: float = 1e2
    """Upper clamp of λ: λ·d² beyond ~1e4 saturates softmax to one-hot (vanishing grads)."""
    n_components: int = 2
    """`mixture`: number C of Gaussian components, each with its own precision."""
    nu_init: float = 4.0
    """`student_t`: initial degrees of freedom ν (learned per head, positive by softplus)."""
    laplace_eps: float = 1e-6
    """`laplace`: ε in −√(λd²+ε), so the gradient at d=0 is finite."""
    qk_norm: bool = False
    """RMS-normalise q and k per head before RoPE (stabilises large learning rates)."""
    settle_steps: int = 0
    """`attn_settle_steps`: fixed-point refinements of the newest queries toward the keys
    that explain them before the output is taken (0 = plain attention)."""
    settle_rate: float = 1.0
    """Step of each refinement: q ← q + rate·(Σ_j p_ij k_j − q); 1 is the EM / mean-shift step."""

    def __post_init__(self) -> None:
        _one_of("attention.kernel", self.kernel, KERNELS)
        _one_of("attention.precision", self.precision, PRECISION_MODES)
        _positive("attention.precision_min", self.precision_min)
        _positive("attention.precision_max", self.precision_max)
        if self.precision_min >= self.precision_max:
            raise ValueError(f"attention.precision_min={self.precision_min!r}: must be < "
                             f"attention.precision_max={self.precision_max!r}")
        _int_at_least("attention.n_components", self.n_components, 1)
        _positive("attention.nu_init", self.nu_init)
        _positive("attention.laplace_eps", self.laplace_eps)
        _int_at_least("attention.settle_steps", self.settle_steps, 0)
        if not 0 < self.settle_rate <= 1:
            raise ValueError(f"attention.settle_rate={self.settle_rate!r}: must be in (0, 1]")
        if self.kernel == "dot" and self.precision == "token":
            raise ValueError("attention.precision='token': not supported with kernel='dot' "
                             "(use a distance kernel, or precision fixed/head)")


@dataclass
class PCConfig:
    """Predictive coding across layers (DESIGN §3, "Predictive-coding energy across layers")."""

    algorithm: str = "bp"
    """`bp` backprop (the control), `settle` unrolled settling, `pc` inference learning,
    `ipc` incremental PC (a weight step at every settling step)."""
    settle_steps: int = 0
    """T: gradient steps on the value nodes x_l before learning. For `pc` and `ipc` the
    error starts at the output and moves down one layer per step, so with T < n_layer the
    bottom n_layer − T blocks and the embedding get no gradient at all: use T >= n_layer."""
    state_lr: float = 0.1
    """Step size of settling (SGD on the states)."""
    state_momentum: float = 0.0
    """Momentum of settling SGD."""
    precondition: bool = True
    """Divide each layer's state step by the curvature of its own error term, the IRLS
    weight w = ρ'(e)/e (π for Gaussian errors; model/pc.py): the own-error term then
    contracts by (1 − state_lr) at any precision, where a plain step diverges once
    state_lr·π > 2. At π = 1 with Gaussian errors the two are the same step."""
    error: str = "gaussian"
    """Distribution ρ of the inter-layer prediction error x_l − μ_l."""
    precision: str = "fixed"
    """`fixed` π=1, `layer` one π_l per layer, `channel` one per layer and channel."""
    precision_update: str = "gradient"
    """How a `layer`/`channel` precision is set: `gradient` learns log π by gradient descent
    on E at the settled states (with the target clamped, this only grows π: see model/pc.py);
    `variance` estimates it from the running variance of the settled precision-weighted
    errors, relative across layers (geometric mean 1), so the overall scale stays β's."""
    precision_decay: float = 0.99
    """`variance`: decay of the running mean of the squared errors (per training step)."""
    log_normalizer: bool = True
    """Include −½·log π in the energy. Without it a learned precision collapses to its
    lower clamp (the energy falls monotonically as π → 0), so learned precision requires it."""
    precision_min: float = 1e-2
    """Lower clamp of π (a floor on how much a layer's errors can be ignored)."""
    precision_max: float = 1e2
    """Upper clamp of π."""
    nu_init: float = 4.0
    """`student_t` errors: initial ν (learned per layer, positive by softplus)."""
    error_pathway: str = "full"
    """`full`; `bottom_up` detaches the top-down term; `no_output_feedback` keeps the
    output error out of the states."""
    fixed_predictions: bool = False
    """Hold μ_l at their forward values while the states settle (the fixed-prediction
    assumption under which PC's weight gradients equal backprop's)."""
    output_weight: float = 1.0
    """β: weight of the output energy (cross-entropy) in E."""
    truncate: int = 0
    """`settle`: backpropagate through only the last k settling steps (0 = all T)."""
    tol: float = 0.0
    """Stop settling early when the residual ‖∂E/∂x‖ falls below this (0 = never)."""
    laplace_eps: float = 1e-2
    """`laplace` errors: ε in ρ = √(π e² + ε) − √ε, a smooth |e| (in standardised units) so
    settling has a gradient and finite curvature (π/√ε) at e = 0; a smaller ε is closer to
    the sparse Laplace energy but needs state_lr < 2√ε/π to settle without oscillating."""

    def __post_init__(self) -> None:
        _one_of("pc.algorithm", self.algorithm, PC_ALGORITHMS)
        _int_at_least("pc.settle_steps", self.settle_steps, 0)
        _positive("pc.state_lr", self.state_lr)
        if not 0 <= self.state_momentum < 1:
            raise ValueError(f"pc.state_momentum={self.state_momentum!r}: must be in [0, 1)")
        _one_of("pc.error", self.error, PC_ERRORS)
        _one_of("pc.precision", self.precision, PC_PRECISIONS)
        if self.precision != "fixed" and self.precision_update == "gradient" and not self.log_normalizer:
            raise ValueError(
                f"pc.log_normalizer=False with pc.precision={self.precision!r}: a learned "
                "precision without its -1/2*log(pi) normaliser collapses to its lower clamp "
                "(the energy only falls as pi -> 0); set log_normalizer: true or precision: fixed")
        _one_of("pc.precision_update", self.precision_update, PC_PRECISION_UPDATES)
        if self.precision_update == "variance" and self.precision == "fixed":
            raise ValueError("pc.precision_update='variance' estimates a precision: it needs "
                             "pc.precision layer or channel (fixed means pi = 1)")
        if not 0 < self.precision_decay < 1:
            raise ValueError(f"pc.precision_decay={self.precision_decay!r}: must be in (0, 1)")
        _positive("pc.precision_min", self.precision_min)
        _positive("pc.precision_max", self.precision_max)
        if self.precision_min >= self.precision_max:
            raise ValueError(f"pc.precision_min={self.precision_min!r}: must be < "
                             f"pc.precision_max={self.precision_max!r}")
        if self.precision != "fixed" and not self.precision_min < 1 < self.precision_max:
            raise ValueError(f"pc.precision_min={self.precision_min!r}, pc.precision_max="
                             f"{self.precision_max!r}: a learned precision starts at pi = 1, "
                             "so the clamp range must contain 1")
        _positive("pc.nu_init", self.nu_init)
        _one_of("pc.error_pathway", self.error_pathway, PC_PATHWAYS)
        _positive("pc.output_weight", self.output_weight)
        _int_at_least("pc.truncate", self.truncate, 0)
        _positive("pc.tol", self.tol, allow_zero=True)
        _positive("pc.laplace_eps", self.laplace_eps)


@dataclass
class GPTConfig:
    """A GPT: the modern baseline plus the precision-weighted / PC options."""

    vocab_size: int = 50304
    """Tokens in the vocabulary: the ids the model reads and the logits it returns (the
    lm_head itself is padded to `padded_vocab_size` rows)."""
    block_size: int = 256
    """Context length: RoPE tables and the KV cache are sized for it."""
    n_layer: int = 6
    n_head: int = 6
    n_kv_head: int | None = None
    """Key/value heads for GQA (None = n_head, i.e. MHA); must divide n_head."""
    n_embd: int = 384
    mlp: str = "relu2"
    """`relu2` (ReLU², cheap and strong at small scale), `gelu`, `swiglu`."""
    mlp_ratio: float = 4.0
    """Hidden width / n_embd (swiglu uses 2/3 of it per branch to keep FLOPs equal)."""
    dropout: float = 0.0
    """Dropout on attention output and MLP output (0 for pretraining at this scale)."""
    rope_base: float = 10000.0
    logit_softcap: float = 0.0
    """Cap logits to ±c via c·tanh(z/c) (0 = off); curbs logit growth."""
    ignore_index: int = -100
    """Targets equal to this are left out of the loss (e.g. padding)."""
    norm_eps: float = 1e-6
    init_std: float = 0.02
    """Std of the normal init of embeddings and input projections (see GPT.init_weights)."""
    attention: AttentionConfig = field(default_factory=AttentionConfig)
    pc: PCConfig = field(default_factory=PCConfig)

    def __post_init__(self) -> None:
        if isinstance(self.attention, dict):
            self.attention = AttentionConfig(**self.attention)
        if isinstance(self.pc, dict):
            self.pc = PCConfig(**self.pc)
        for name in ("vocab_size", "block_size", "n_layer", "n_head", "n_embd"):
            _int_at_least(name, getattr(self, name), 1)
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd={self.n_embd}: must be divisible by n_head={self.n_head}")
        if (self.n_embd // self.n_head) % 2:
            raise ValueError(f"n_embd={self.n_embd}: head size n_embd/n_head="
                             f"{self.n_embd // self.n_head} must be even for RoPE")
        if self.n_kv_head is not None:
            _int_at_least("n_kv_head", self.n_kv_head, 1)
            if self.n_head % self.n_kv_head:
                raise ValueError(f"n_kv_head={self.n_kv_head}: must divide n_head={self.n_head}")
        _one_of("mlp", self.mlp, MLPS)
        _positive("mlp_ratio", self.mlp_ratio)
        if not 0 <= self.dropout < 1:
            raise ValueError(f"dropout={self.dropout!r}: must be in [0, 1)")
        _positive("rope_base", self.rope_base)
        _positive("logit_softcap", self.logit_softcap, allow_zero=True)
        _positive("norm_eps", self.norm_eps)
        _positive("init_std", self.init_std)

    @property
    def padded_vocab_size(self) -> int:
        """lm_head rows: vocab_size rounded up to a multiple of 128, so the largest matmul
        has whole tensor-core tiles (the padding logits are dropped in GPT.head)."""
        return -(-self.vocab_size // 128) * 128

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def kv_heads(self) -> int:
        return self.n_kv_head or self.n_head
