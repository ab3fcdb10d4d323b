"""The GPT: token embedding -> n_layer pre-norm blocks -> final norm -> untied head.

Read top to bottom: MLP, Block, GPT. The attention lives in attention.py, the
predictive-coding energy and algorithms in pc.py, generation in generate.py.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import pc
from .attention import CausalSelfAttention, rotary_tables
from .config import GPTConfig


class MLP(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.kind = config.mlp
        hidden = int(config.mlp_ratio * config.n_embd)
        if self.kind == "swiglu":
            hidden = int(2 * hidden / 3)  # two input matrices: keep params/FLOPs equal to the others
            self.c_gate = nn.Linear(config.n_embd, hidden, bias=False)
        self.c_fc = nn.Linear(config.n_embd, hidden, bias=False)
        self.c_proj = nn.Linear(hidden, config.n_embd, bias=False)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.c_fc(x)
        if self.kind == "relu2":
            h = F.relu(h).square()
        elif self.kind == "gelu":
            h = F.gelu(h)
        else:
            h = F.silu(self.c_gate(x)) * h
        return self.dropout(self.c_proj(h))


class Block(nn.Module):
    """x -> x + attn(norm(x)) -> x + mlp(norm(x)). In PC terms: the prediction μ_l = f_l(x_{l-1})."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.norm_1 = nn.RMSNorm(config.n_embd, eps=config.norm_eps)
        self.attn = CausalSelfAttention(config)
        self.norm_2 = nn.RMSNorm(config.n_embd, eps=config.norm_eps)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                kv_cache=None, layer_idx: int = 0) -> torch.Tensor:
        x = x + self.attn(self.norm_1(x), cos, sin, kv_cache, layer_idx)
        return x + self.mlp(self.norm_2(x))


class GPT(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        self.norm_f = nn.RMSNorm(config.n_embd, eps=config.norm_eps)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        # The PC energy's precision / ν exist only for the PC algorithms, so `bp` has exactly the
        # baseline's parameters; they are 1-D with a deterministic init, so they draw nothing from
        # the RNG and a PC model's weights equal the baseline's for the same seed.
        self.pc_energy = pc.PCEnergy(config) if config.pc.algorithm != "bp" else None
        cos, sin = rotary_tables(config.block_size, config.head_dim, config.rope_base)
        self.register_buffer("rope_cos", cos, persistent=False)  # (block_size, D/2)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        """The one place every parameter gets its initial value.

        - token embedding, q/k/v, MLP input (and gate) matrices: N(0, init_std)
          (GPT-2's 0.02);
        - the two residual-branch output projections (attn.c_proj, mlp.c_proj):
          N(0, init_std/√(2·n_layer)), so the residual stream's variance does not
          grow with depth (GPT-2 §2.3); not zero, so every weight has a gradient
          at step 0 (the PC-vs-backprop gradient tests need that);
        - lm_head: N(0, init_std) (untied from the embedding);
        - RMSNorm gains: 1;
        - attention precision / ν and PC precision parameters: their modules'
          own `reset_parameters()` (documented there).
        """
        std = self.config.init_std
        proj_std = std / math.sqrt(2 * self.config.n_layer)
        for name, p in self.named_parameters():
            if name.endswith(("attn.c_proj.weight", "mlp.c_proj.weight")):
                nn.init.normal_(p, 0.0, proj_std)
            elif p.dim() == 2:
                nn.init.normal_(p, 0.0, std)
        for m in self.modules():
            if isinstance(m, nn.RMSNorm):
                nn.init.ones_(m.weight)
            elif m is not self and hasattr(m, "reset_parameters") and not isinstance(
                    m, (nn.Linear, nn.Embedding, nn.RMSNorm)):
                m.reset_parameters()

    # -- pieces the PC energy and the generator reuse -------------------------
    def rotary(self, T: int, offset: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """RoPE tables for positions offset..offset+T-1, shaped to broadcast over (B, H, T, D/2)."""
        if offset + T > self.config.block_size:
            raise ValueError(f"sequence of {offset + T} tokens exceeds block_size={self.config.block_size}")
        return self.rope_cos[None, None, offset:offset + T], self.rope_sin[None, None, offset:offset + T]

    def rotary_at(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """RoPE tables at per-row positions (B, T) (ragged cached batches), shaped (B, 1, T, D/2)."""
        if int(positions.max()) >= self.config.block_size:
            raise ValueError(f"position {int(positions.max())} exceeds block_size={self.config.block_size}")
        positions = positions.to(self.rope_cos.device)
        return self.rope_cos[positions].unsqueeze(1), self.rope_sin[positions].unsqueeze(1)

    def embed(self, idx: torch.Tensor) -> torch.Tensor:
        """x_0: token embeddings, (B, T) -> (B, T, C)."""
        return self.wte(idx)

    def head(self, x: torch.Tensor) -> torch.Tensor:
        """Logits from the top of the residual stream x_L: final norm, lm_head, optional softcap."""
        logits = self.lm_head(self.norm_f(x))
        cap = self.config.logit_softcap
        return cap * torch.tanh(logits / cap) if cap > 0 else logits

    def loss(self, logits: torch.Tensor, targets: torch.Tensor, label_smoothing: float = 0.0) -> torch.Tensor:
        """Mean cross-entropy over targets that are not `ignore_index` (computed in fp32, or wider)."""
        logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
        return F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1),
                               ignore_index=self.config.ignore_index, label_smoothing=label_smoothing)

    # -- the model -------------------------------------------------------------
    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None,
                kv_cache=None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """idx (B, T) -> (logits (B, T, V), loss or None). With a KV cache (generate.py),
        each row's positions continue from that row's own position in the cache."""
        if kv_cache is None:
            cos, sin = self.rotary(idx.size(1))
        else:
            cos, sin = self.rotary_at(kv_cache.positions(idx.size(1)))
        x = self.embed(idx)
        for i, block in enumerate(self.blocks):
            x = block(x, cos, sin, kv_cache, i)
        if kv_cache is not None:
            kv_cache.advance(idx.size(1))
        logits = self.head(x)
        return logits, (None if targets is None else self.loss(logits, targets))

    def training_step(self, idx: torch.Tensor, targets: torch.Tensor, *, grad_scale: float = 1.0,
                      label_smoothing: float = 0.0, optimizer=None
                      ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """One micro-step's gradients for whatever `config.pc.algorithm` says.

        What the caller can rely on, for every algorithm:
        - grad_scale × ∂(objective) is *added* to `.grad` of every trainable
          parameter that the objective reaches (grad_scale > 0; 1/accum_steps
          for gradient accumulation); nothing else in `.grad` is touched. The
          objective is CE for `bp`, E/β for the PC algorithms (model/pc.py),
          whose gradient has the scale of CE's.
        - the returned loss is the detached mean cross-entropy of the forward
          pass on this batch (the model's prediction without a target, the same
          quantity for every algorithm), measured before any weight change;
        - diagnostics is a dict of detached tensors keyed by metric name
          (empty for `bp`; model/pc.py lists the PC keys);
        - `optimizer` is used by `ipc` only (required there when
          pc.settle_steps > 0): it takes T inner `optimizer.step()`s on this
          batch's own gradients (grad_scale × ..., not clipped, learning-rate
          schedule not advanced), restores the gradients accumulated before
          the call and adds the last step's gradient on top, so the caller's
          usual clip + `optimizer.step()` + `zero_grad()` is the (T+1)-th step.
          The inner steps see this rank's gradients only (no all-reduce): under
          data parallelism the replicas drift apart, so run ipc on one device.
        The training loop calls only this, then clips and steps its optimizer,
        never branching on the algorithm.
        """
        if self.config.pc.algorithm != "bp":
            return pc.training_step(self, idx, targets, grad_scale=grad_scale,
                                    label_smoothing=label_smoothing, optimizer=optimizer)
        logits, _ = self(idx)
        loss = self.loss(logits, targets, label_smoothing)
        (loss * grad_scale).backward()
        return loss.detach(), {}

    def num_params(self, exclude_embedding: bool = True) -> int:
        """Parameter count; the input embedding is a lookup, not a matmul, so FLOPs exclude it."""
        n = sum(p.numel() for p in self.parameters())
        return n - self.wte.weight.numel() if exclude_embedding else n
