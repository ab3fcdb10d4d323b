"""The GPT: token embedding -> n_layer pre-norm blocks -> final norm -> untied head.

Read top to bottom: MLP, Block, GPT. The attention lives in attention.py, generation
in generate.py. This is the backprop baseline: the PC-GPT (`PCGPT` in pc.py) subclasses
it, and `model.build_model(config)` picks the class from `config.pc.algorithm`.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from .attention import CausalSelfAttention, reference_attention, rotary_tables
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
        if config.pc.algorithm != "bp" and type(self) is GPT:
            raise ValueError(f"pc.algorithm={config.pc.algorithm!r}: GPT is the backprop baseline; "
                             "build a PC model with model.build_model(config) (or model.pc.PCGPT)")
        self.config = config
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        self.norm_f = nn.RMSNorm(config.n_embd, eps=config.norm_eps)
        # Rows padded to a multiple of 128 (config.padded_vocab_size): tensor-core tiles of the
        # largest matmul stay whole; head() returns only the vocab_size real logits.
        self.lm_head = nn.Linear(config.n_embd, config.padded_vocab_size, bias=False)
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
        - lm_head: N(0, init_std) (untied from the embedding; padding rows too: they
          never reach a softmax, so they get no gradient);
        - RMSNorm gains: 1;
        - attention precision / ν parameters (and PCGPT's PC precisions): their
          modules' own `reset_parameters()` (documented there), which draw nothing
          from the RNG.
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
        """Logits (B, T, vocab_size) from the top of the residual stream x_L: final norm,
        lm_head, optional softcap."""
        logits = self.lm_head(self.norm_f(x))
        if logits.size(-1) != self.config.vocab_size:
            logits = logits[..., :self.config.vocab_size]  # drop the padding rows' logits
        cap = self.config.logit_softcap
        return cap * torch.tanh(logits / cap) if cap > 0 else logits

    def loss(self, logits: torch.Tensor, targets: torch.Tensor, label_smoothing: float = 0.0,
             reduction: str = "mean") -> torch.Tensor:
        """Cross-entropy over targets that are not `ignore_index`, accumulated in fp32 (or
        wider): the mean, or with reduction="none" one value per target (0 where ignored)."""
        logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
        loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)), targets.reshape(-1),
                               ignore_index=self.config.ignore_index, label_smoothing=label_smoothing,
                               reduction=reduction)
        return loss if reduction == "mean" else loss.view(targets.shape)

    def head_loss(self, x: torch.Tensor, targets: torch.Tensor, label_smoothing: float = 0.0,
                  reduction: str = "mean") -> torch.Tensor:
        """loss(head(x)): one function, so compile() fuses the logits into the loss."""
        return self.loss(self.head(x), targets, label_smoothing, reduction)

    # -- the model -------------------------------------------------------------
    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None, kv_cache=None, *,
                label_smoothing: float = 0.0, return_logits: bool = True
                ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """idx (B, T) -> (logits (B, T, V), loss or None). With a KV cache (generate.py),
        each row's positions continue from that row's own position in the cache.
        `return_logits=False` (training) returns (None, loss): the logits then never
        leave a compiled forward, so they need not be kept for the caller."""
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
        loss = None if targets is None else self.loss(logits, targets, label_smoothing)
        return (logits if return_logits else None), loss

    @torch.no_grad()
    def attention_probs(self, idx: torch.Tensor, layer: int = 0) -> torch.Tensor:
        """Attention probabilities (B, H, T, T) of block `layer` on idx (B, T), for any kernel.

        The blocks below run as in forward(); block `layer`'s own queries and keys are then
        scored by the exact O(T²) reference with the identity as values, so the output
        Σ_j p_ij v_j is the probability row p_i itself."""
        if not 0 <= layer < len(self.blocks):
            raise ValueError(f"layer={layer}: the model has {len(self.blocks)} blocks")
        cos, sin = self.rotary(idx.size(1))
        x = self.embed(idx)
        for block in self.blocks[:layer]:
            x = block(x, cos, sin)
        attn = self.blocks[layer].attn
        h = self.blocks[layer].norm_1(x)
        q, k, _ = attn.project(h, cos, sin)                                # (B, H, T, D), (B, Hkv, T, D)
        p = attn.kernel_params(h)
        T = idx.size(1)
        eye = torch.eye(T, dtype=q.dtype, device=q.device).expand(k.shape[0], k.shape[1], T, T)
        return reference_attention(attn.settle(q, k, p), k, eye.contiguous(), p).float()

    def training_step(self, idx: torch.Tensor, targets: torch.Tensor, *, grad_scale: float = 1.0,
                      label_smoothing: float = 0.0, optimizer=None
                      ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """One micro-step's gradients for whatever `config.pc.algorithm` says (PCGPT
        overrides this for the PC algorithms; here it is backprop).

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
          (empty for `bp`; model/pc.py lists the PC keys), all on the model's
          device, so that a step never waits for the host (CUDA graphs);
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
        _, loss = self(idx, targets, label_smoothing=label_smoothing, return_logits=False)
        (loss * grad_scale).backward()
        return loss.detach(), {}

    def num_params(self, exclude_embedding: bool = True) -> int:
        """Parameter count; the input embedding is a lookup, not a matmul, so FLOPs exclude it."""
        n = sum(p.numel() for p in self.parameters())
        return n - self.wte.weight.numel() if exclude_embedding else n
