"""Generation: a preallocated `KVCache`, `sample` → `prefill` → `decode_step`, and `generate`.

Split as in gpt-fast: `sample` turns logits into tokens, `prefill` runs the
prompts once and fills the cache, `decode_step` feeds one token per row. The
cache holds every layer's keys and values in (B, Hkv, max_len, D) buffers with
an explicit write position per row, so a decode step costs O(S) per new token
instead of re-running the prefix. Cached generation equals generation that
recomputes the whole prefix (tests/model/test_generate.py), attention settling
included: past keys and values are frozen, only the new queries settle.

Ragged batches: prompts of different lengths are prefilled row by row into the
shared cache (each row at positions 0..len−1, exactly as if it were alone), and
then decoded together, each row at its own position with a key mask hiding the
slots past its end. Chosen over left-padding because no pad token ever enters
attention: prefill stays plain causal attention on the fused kernels, RoPE
positions are the unbatched ones, and only the (B, 1, 1, S) decode mask is new.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch

from .gpt import GPT


class KVCache:
    """Keys/values of every layer, (n_layer, B, Hkv, max_len, D) each, written in place.

    `lengths[b]` is how many positions of row b are filled (= the position of its
    next token). Storage is allocated at the first `update`, with the dtype and
    device of the keys the model produces (bf16 under autocast, say), and zeroed
    so masked slots hold finite numbers.
    """

    def __init__(self, n_layer: int, batch_size: int, max_len: int):
        self.n_layer, self.batch_size, self.max_len = n_layer, batch_size, max_len
        self.k: torch.Tensor | None = None
        self.v: torch.Tensor | None = None
        self.lengths = [0] * batch_size

    @classmethod
    def for_model(cls, model: GPT, batch_size: int, max_len: int | None = None) -> KVCache:
        return cls(model.config.n_layer, batch_size, max_len or model.config.block_size)

    @property
    def pos(self) -> int:
        """Slots in use: the longest row's length (all rows' when they are equal)."""
        return max(self.lengths)

    def reset(self) -> None:
        self.lengths = [0] * self.batch_size

    def positions(self, T: int) -> torch.Tensor:
        """(B, T) positions of the next T tokens of each row."""
        return torch.tensor(self.lengths).view(-1, 1) + torch.arange(T)

    def _allocate(self, k: torch.Tensor) -> None:
        _, Hkv, _, D = k.shape
        shape = (self.n_layer, self.batch_size, Hkv, self.max_len, D)
        self.k = torch.zeros(shape, dtype=k.dtype, device=k.device)
        self.v = torch.zeros(shape, dtype=k.dtype, device=k.device)

    def update(self, layer_idx: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write the T new keys/values (B, Hkv, T, D) of layer `layer_idx` at each row's
        position; return all keys/values so far, (B, Hkv, pos + T, D)."""
        T = k.shape[-2]
        if self.pos + T > self.max_len:
            raise ValueError(f"KV cache full: {self.pos} + {T} tokens exceed max_len={self.max_len}")
        if self.k is None:
            self._allocate(k)
        ks, vs = self.k[layer_idx], self.v[layer_idx]
        if len(set(self.lengths)) == 1:
            p = self.lengths[0]
            ks[:, :, p:p + T], vs[:, :, p:p + T] = k, v
        else:
            for b, p in enumerate(self.lengths):
                ks[b, :, p:p + T], vs[b, :, p:p + T] = k[b], v[b]
        S = self.pos + T
        return ks[:, :, :S], vs[:, :, :S]

    def attn_mask(self, T: int) -> torch.Tensor | None:
        """None when all rows are at one position (plain causal attention over the last T);
        else (B, 1, T, S) bool, True where row b's query t may see key j: j ≤ lengths[b] + t."""
        if len(set(self.lengths)) == 1:
            return None
        S = self.pos + T
        last = self.positions(T).view(-1, 1, T, 1)                    # (B, 1, T, 1)
        return (torch.arange(S).view(1, 1, 1, S) <= last).to(self.k.device)

    def advance(self, n: int) -> None:
        """Every row moved n tokens on (GPT.forward calls this after the last layer)."""
        self.lengths = [p + n for p in self.lengths]

    def select(self, rows: Sequence[int]) -> None:
        """Keep only these rows, in this order (generate drops finished rows)."""
        if self.k is not None:
            index = torch.tensor(list(rows), dtype=torch.long, device=self.k.device)
            self.k, self.v = self.k.index_select(1, index), self.v.index_select(1, index)
        self.lengths = [self.lengths[i] for i in rows]
        self.batch_size = len(self.lengths)

    def row(self, b: int) -> _RowCache:
        """A one-row view sharing this cache's storage (prefill of ragged batches)."""
        return _RowCache(self, b)


class _RowCache:
    """Row b of a KVCache, seen as a batch of one: writes land in the shared buffers."""

    def __init__(self, cache: KVCache, b: int):
        self.cache, self.b = cache, b

    @property
    def pos(self) -> int:
        return self.cache.lengths[self.b]

    def positions(self, T: int) -> torch.Tensor:
        return (self.pos + torch.arange(T)).view(1, T)

    def update(self, layer_idx: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        c, b, p, T = self.cache, self.b, self.pos, k.shape[-2]
        if p + T > c.max_len:
            raise ValueError(f"KV cache full: {p} + {T} tokens exceed max_len={c.max_len}")
        if c.k is None:
            c._allocate(k)
        c.k[layer_idx, b:b + 1, :, p:p + T], c.v[layer_idx, b:b + 1, :, p:p + T] = k, v
        return c.k[layer_idx, b:b + 1, :, :p + T], c.v[layer_idx, b:b + 1, :, :p + T]

    def attn_mask(self, T: int) -> None:
        return None

    def advance(self, n: int) -> None:
        self.cache.lengths[self.b] += n


# -- sampling ------------------------------------------------------------------------------

def sample(logits: torch.Tensor, *, temperature: float = 1.0, top_k: int | None = None,
           top_p: float | None = None, repetition_penalty: float = 1.0,
           seen: torch.Tensor | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
    """Next tokens (B,) from last-position logits (B, V).

    temperature 0 = greedy (argmax). repetition_penalty > 1 (CTRL, Keskar et al. 2019)
    divides positive / multiplies negative logits of tokens already in `seen` (B, V)
    bool. top_k keeps the k largest logits, top_p the smallest set whose probability
    reaches p (Holtzman et al. 2019; the most likely token always stays).
    """
    logits = logits.float()
    if repetition_penalty != 1.0 and seen is not None:
        penalised = torch.where(logits > 0, logits / repetition_penalty, logits * repetition_penalty)
        logits = torch.where(seen, penalised, logits)
    if temperature == 0:
        return logits.argmax(-1)
    logits = logits / temperature
    if top_k is not None and top_k < logits.size(-1):
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop_sorted = cum - sorted_logits.softmax(-1) >= top_p   # mass before this token already ≥ p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    probs = logits.softmax(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


# -- prefill / decode ----------------------------------------------------------------------

def prefill(model: GPT, cache: KVCache, prompts: Sequence[Sequence[int]]) -> torch.Tensor:
    """Run each prompt into its row of the cache (row by row: see the module docstring);
    return the logits of each prompt's last position, (B, V)."""
    device = model.lm_head.weight.device
    last = []
    for b, prompt in enumerate(prompts):
        idx = torch.tensor([list(prompt)], dtype=torch.long, device=device)
        logits, _ = model(idx, kv_cache=cache.row(b))
        last.append(logits[:, -1])
    return torch.cat(last)


def decode_step(model: GPT, cache: KVCache, tokens: torch.Tensor) -> torch.Tensor:
    """Feed one token per row (B,) at each row's own position; return the next logits (B, V)."""
    logits, _ = model(tokens.view(-1, 1), kv_cache=cache)
    return logits[:, -1]


def generate(model: GPT, prompts: Sequence[Sequence[int]], max_new_tokens: int, *,
             temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
             repetition_penalty: float = 1.0, stop_tokens: Iterable[int] = (),
             generator: torch.Generator | None = None, use_cache: bool = True) -> list[list[int]]:
    """The new tokens of each prompt (prompts excluded), sampled in eval mode.

    A row ends at its first stop token (which is included in its output), after
    max_new_tokens, or when it fills the context (block_size). The model's
    train/eval mode is restored afterwards. `use_cache=False` recomputes each
    row's whole prefix every step: slow, the reference the cache is tested against.
    The same `generator` seed gives the same tokens.
    """
    block = model.config.block_size
    for i, p in enumerate(prompts):
        if not 0 < len(p) <= block:
            raise ValueError(f"prompts[{i}] has {len(p)} tokens: must be 1..block_size={block}")
    stop = set(stop_tokens)
    device = model.lm_head.weight.device
    out: list[list[int]] = [[] for _ in prompts]
    seen = torch.zeros(len(prompts), model.config.vocab_size, dtype=torch.bool, device=device)
    for b, p in enumerate(prompts):
        seen[b, list(p)] = True
    # Rows still generating; a finished row leaves the batch (and the cache) at once.
    active = [b for b, p in enumerate(prompts) if max_new_tokens > 0 and len(p) < block]
    if not active:
        return out
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            if use_cache:
                cache = KVCache.for_model(model, len(active),
                                          max_len=min(block, max(len(prompts[b]) for b in active) + max_new_tokens))
                logits = prefill(model, cache, [prompts[b] for b in active])
            else:
                logits = _full_logits(model, [prompts[b] for b in active], [out[b] for b in active])
            while True:
                rows = torch.tensor(active, device=device)
                tokens = sample(logits, temperature=temperature, top_k=top_k, top_p=top_p,
                                repetition_penalty=repetition_penalty, seen=seen[rows], generator=generator)
                seen[rows, tokens] = True
                keep = []
                for i, (b, t) in enumerate(zip(active, tokens.tolist())):
                    out[b].append(t)
                    if not (t in stop or len(out[b]) >= max_new_tokens or len(prompts[b]) + len(out[b]) >= block):
                        keep.append(i)
                if not keep:
                    break
                if len(keep) < len(active):
                    tokens = tokens[torch.tensor(keep, device=device)]
                    if use_cache:
                        cache.select(keep)
                    active = [active[i] for i in keep]
                logits = (decode_step(model, cache, tokens) if use_cache else
                          _full_logits(model, [prompts[b] for b in active], [out[b] for b in active]))
    finally:
        model.train(was_training)
    return out


def _full_logits(model: GPT, prompts: Sequence[Sequence[int]], out: list[list[int]]) -> torch.Tensor:
    """Last-position logits of each row's whole sequence, recomputed without a cache."""
    device = model.lm_head.weight.device
    block = model.config.block_size
    rows = []
    for p, new in zip(prompts, out):
        seq = (list(p) + new)[-block:]
        logits, _ = model(torch.tensor([seq], dtype=torch.long, device=device))
        rows.append(logits[:, -1])
    return torch.cat(rows)
