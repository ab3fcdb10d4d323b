"""Generation: cached == uncached, sampling knobs, stop tokens, ragged batches, reproducibility."""

from __future__ import annotations

import pytest
import torch

from model import GPT, GPTConfig
from model.generate import KVCache, decode_step, generate, prefill, sample

KERNELS = ["dot", "gaussian", "student_t", "laplace", "mixture"]
PROMPTS = [[1, 2, 3], [5, 6, 7, 8, 9, 10, 11], [4]]


def tiny(kernel="gaussian", settle_steps=0, **kw) -> GPT:
    torch.manual_seed(0)
    # init_std 0.2: large enough that attention, not just the embedding→head path, decides the tokens
    cfg = GPTConfig(vocab_size=64, block_size=32, n_layer=2, n_head=4, n_kv_head=2, n_embd=32, init_std=0.2,
                    attention=dict(kernel=kernel, precision="token" if kernel != "dot" else "head",
                                   settle_steps=settle_steps), **kw)
    return GPT(cfg)


@pytest.mark.parametrize("settle_steps", [0, 2], ids=["plain", "settling"])
@pytest.mark.parametrize("kernel", KERNELS)
def test_cached_logits_equal_full_recompute(kernel, settle_steps):
    """Prefill + decode steps over a ragged batch give the logits a full forward of each row gives
    (float64: the two sum in different orders, so float32 would compare rounding noise)."""
    model = tiny(kernel, settle_steps).double().eval()
    cache = KVCache.for_model(model, len(PROMPTS))
    extra = torch.randint(0, 64, (len(PROMPTS), 4), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        steps = [prefill(model, cache, PROMPTS)]
        for i in range(extra.shape[1]):
            steps.append(decode_step(model, cache, extra[:, i]))
        for b, p in enumerate(PROMPTS):
            full, _ = model(torch.tensor([p + extra[b].tolist()]))
            want = full[0, len(p) - 1:]                                   # (1 + 4, V)
            got = torch.stack([s[b] for s in steps])
            assert torch.allclose(got, want, rtol=1e-10, atol=1e-10), (b, (got - want).abs().max())
    assert cache.lengths == [len(p) + 4 for p in PROMPTS]


@pytest.mark.parametrize("settle_steps", [0, 2], ids=["plain", "settling"])
@pytest.mark.parametrize("kernel", KERNELS)
def test_greedy_cached_equals_uncached(kernel, settle_steps):
    model = tiny(kernel, settle_steps)
    cached = generate(model, PROMPTS, 10, temperature=0)
    uncached = generate(model, PROMPTS, 10, temperature=0, use_cache=False)
    assert cached == uncached
    assert all(len(row) == 10 for row in cached)
    # A batch gives each row what it gets alone.
    assert cached == [generate(model, [p], 10, temperature=0)[0] for p in PROMPTS]


def test_sampling_is_reproducible_with_a_seeded_generator():
    model = tiny()
    kw = dict(temperature=1.0, top_k=20, top_p=0.9)
    a = generate(model, PROMPTS, 12, generator=torch.Generator().manual_seed(7), **kw)
    b = generate(model, PROMPTS, 12, generator=torch.Generator().manual_seed(7), **kw)
    c = generate(model, PROMPTS, 12, generator=torch.Generator().manual_seed(8), **kw)
    assert a == b and a != c


def test_sample_knobs():
    g = torch.Generator().manual_seed(0)
    logits = torch.tensor([[1.0, 3.0, 2.0, 0.5, -1.0]]).repeat(200, 1)
    assert (sample(logits, temperature=0) == 1).all()
    assert (sample(logits, top_k=1, generator=g) == 1).all()
    top2 = sample(logits, top_k=2, generator=g)
    assert set(top2.tolist()) == {1, 2}
    # softmax of [3, 2, 1, .5, -1]: 0.61, 0.22, 0.08, ...: p=0.7 keeps {1, 2}, p=0.5 keeps {1}
    assert set(sample(logits, top_p=0.7, generator=g).tolist()) == {1, 2}
    assert (sample(logits, top_p=0.5, generator=g) == 1).all()
    seen = torch.zeros(200, 5, dtype=torch.bool)
    seen[:, 1] = True
    assert (sample(logits, temperature=0, repetition_penalty=2.0, seen=seen) == 2).all()  # 3/2 < 2
    low_t = sample(logits, temperature=0.05, generator=g)
    assert (low_t == 1).float().mean() > 0.99


def test_repetition_penalty_stops_greedy_loops():
    model = tiny()
    plain = generate(model, [PROMPTS[1]], 20, temperature=0)[0]
    assert len(set(plain)) < len(plain)  # the tiny random model loops
    penalised = generate(model, [PROMPTS[1]], 20, temperature=0, repetition_penalty=1e9)[0]
    assert len(set(penalised)) == len(penalised) and not set(penalised) & set(PROMPTS[1])


def test_stop_tokens_end_each_row():
    model = tiny()
    free = generate(model, PROMPTS, 10, temperature=0)
    stop = free[0][3]
    first = free[0].index(stop)
    out = generate(model, PROMPTS, 10, temperature=0, stop_tokens=[stop])
    assert out[0] == free[0][:first + 1]  # ends with (and includes) the stop token
    for row, ref in zip(out[1:], free[1:]):
        cut = ref.index(stop) + 1 if stop in ref else len(ref)
        assert row == ref[:cut]


def test_generation_stops_at_block_size_and_validates_prompts():
    model = tiny()
    out = generate(model, [list(range(1, 30)), [1]], 10, temperature=0)
    assert len(out[0]) == 32 - 29 and len(out[1]) == 10
    assert generate(model, [list(range(32))], 5) == [[]]  # a full context has no room
    with pytest.raises(ValueError, match=r"prompts\[1\]"):
        generate(model, [[1], []], 5)
    with pytest.raises(ValueError, match="block_size"):
        generate(model, [list(range(33))], 5)


def test_generate_uses_eval_mode_and_restores_it():
    model = tiny(dropout=0.5)
    model.train()
    a = generate(model, PROMPTS, 8, temperature=0)
    b = generate(model, PROMPTS, 8, temperature=0)
    assert a == b                 # dropout off while generating
    assert model.training         # and the mode is given back
    model.eval()
    generate(model, PROMPTS, 2, temperature=0)
    assert not model.training


def test_kv_cache_positions_and_overflow():
    model = tiny()
    cache = KVCache.for_model(model, 2, max_len=8)
    with torch.no_grad():
        model(torch.tensor([[1, 2, 3], [4, 5, 6]]), kv_cache=cache)
    assert cache.pos == 3 and cache.lengths == [3, 3]
    assert cache.k.shape == (2, 2, 2, 8, 8)  # (n_layer, B, Hkv, max_len, D)
    assert torch.equal(cache.positions(2), torch.tensor([[3, 4], [3, 4]]))
    with pytest.raises(ValueError, match="KV cache full"), torch.no_grad():
        model(torch.zeros(2, 6, dtype=torch.long), kv_cache=cache)


@pytest.mark.gpu
@pytest.mark.parametrize("kernel", ["student_t", "mixture"])
def test_gpu_train_step_and_generation(kernel):
    """On CUDA under bf16 autocast: a training step is finite (fused prefill paths), and
    cached generation runs (bf16 cache, per-row positions, ragged decode masks)."""
    model = tiny(kernel, settle_steps=1).cuda()
    idx = torch.randint(0, 64, (4, 32), device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        _, loss = model(idx[:, :-1].contiguous(), idx[:, 1:].contiguous())
    loss.backward()
    assert torch.isfinite(loss) and all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = generate(model, PROMPTS, 6, temperature=0.8, top_k=10,
                       generator=torch.Generator(device="cuda").manual_seed(0))
    assert [len(r) for r in out] == [6, 6, 6] and all(0 <= t < 64 for r in out for t in r)
