"""The GPT: forward/loss contract, the pieces the PC energy reuses, and that every kernel learns."""

from __future__ import annotations

import pytest
import torch

from model import GPT, GPTConfig
from model.utils import make_optimizer

KERNELS = ["dot", "gaussian", "student_t", "laplace", "mixture"]


def config(kernel="dot", **kw) -> GPTConfig:
    attention = kw.pop("attention", {})
    return GPTConfig(vocab_size=48, block_size=32, n_layer=2, n_head=4, n_kv_head=2, n_embd=32,
                     attention=dict(kernel=kernel, **attention), **kw)


def test_forward_shapes_and_ignore_index():
    torch.manual_seed(0)
    model = GPT(config(ignore_index=-1))
    idx = torch.randint(0, 48, (3, 17))
    targets = torch.randint(0, 48, (3, 17))
    logits, loss = model(idx, targets)
    assert logits.shape == (3, 17, 48) and loss.shape == ()
    assert model(idx)[1] is None
    # ignored targets leave the loss over the others
    masked = targets.clone()
    masked[:, 8:] = -1
    _, loss_masked = model(idx, masked)
    ref = torch.nn.functional.cross_entropy(logits[:, :8].reshape(-1, 48), targets[:, :8].reshape(-1))
    assert loss_masked.item() == pytest.approx(ref.item(), rel=1e-5)
    with pytest.raises(ValueError, match="block_size"):
        model(torch.zeros(1, 33, dtype=torch.long))


@pytest.mark.parametrize("kernel", KERNELS)
def test_pieces_compose_to_forward(kernel):
    """embed → blocks one by one → head, as the PC energy calls them, equals forward()."""
    torch.manual_seed(0)
    model = GPT(config(kernel, attention=dict(precision="head" if kernel == "dot" else "token", settle_steps=1)))
    idx = torch.randint(0, 48, (2, 11))
    cos, sin = model.rotary(11, 0)
    x = model.embed(idx)
    for i, block in enumerate(model.blocks):
        x = block(x, cos, sin, kv_cache=None, layer_idx=i)
    logits = model.head(x)
    assert torch.allclose(logits, model(idx)[0], atol=1e-6)


@pytest.mark.parametrize("kernel", KERNELS)
def test_every_kernel_overfits_one_batch(kernel):
    """A 2-layer model drives the loss on one small batch under 0.1 within 300 steps."""
    torch.manual_seed(0)
    precision = "head" if kernel == "dot" else "token"
    model = GPT(config(kernel, attention=dict(precision=precision)))
    idx = torch.randint(0, 48, (4, 16), generator=torch.Generator().manual_seed(1))
    x, y = idx[:, :-1].contiguous(), idx[:, 1:].contiguous()
    opt = make_optimizer(model, "adamw", lr=1e-2, weight_decay=0.0)
    for step in range(300):
        _, loss = model(x, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if loss.item() < 0.1:
            break
    assert loss.item() < 0.1, (kernel, step, loss.item())
    # the precision parameters took part in learning
    attn = model.blocks[0].attn
    assert attn.log_precision.grad is not None and attn.log_precision.grad.abs().sum() > 0


def test_init_weights_is_documented_and_deterministic():
    torch.manual_seed(3)
    a = GPT(config("student_t", attention=dict(precision="token")))
    torch.manual_seed(3)
    b = GPT(config("student_t", attention=dict(precision="token")))
    for (n, p), (_, q) in zip(a.named_parameters(), b.named_parameters()):
        assert torch.equal(p, q), n
    attn = a.blocks[0].attn
    assert torch.equal(attn.precision_proj.weight, torch.zeros_like(attn.precision_proj.weight))
    assert attn.nu() == pytest.approx(torch.full((4,), 4.0))
    std = a.blocks[1].attn.c_proj.weight.std().item()
    assert std == pytest.approx(0.02 / 2, rel=0.2)  # init_std / sqrt(2 * n_layer)


@pytest.mark.parametrize("kernel", KERNELS)
def test_attention_probs_are_the_rows_the_block_attends_with(kernel):
    """GPT.attention_probs: causal probability rows that, applied to the block's values,
    give exactly what the block's attention computes (any kernel, attention settling on)."""
    torch.manual_seed(0)
    model = GPT(config(kernel, attention=dict(precision="fixed" if kernel == "dot" else "token",
                                              settle_steps=1)))
    idx = torch.randint(0, 48, (2, 9))
    probs = model.attention_probs(idx, layer=1)                      # (B, H, T, T)
    assert probs.shape == (2, 4, 9, 9)
    assert torch.allclose(probs.sum(-1), torch.ones(2, 4, 9), atol=1e-5)
    assert (probs.triu(1) == 0).all()
    cos, sin = model.rotary(9)
    with torch.no_grad():
        h = model.blocks[0](model.embed(idx), cos, sin)
        attn = model.blocks[1].attn
        x = model.blocks[1].norm_1(h)
        _, _, v = attn.project(x, cos, sin)
        q, k, _ = attn.project(x, cos, sin)
        y = attn.attend(q, k, v, x)                                    # (B, H, T, D)
    v = v.repeat_interleave(attn.n_head // attn.n_kv_head, dim=1)
    assert torch.allclose(probs @ v, y, atol=1e-5)
    with pytest.raises(ValueError, match="blocks"):
        model.attention_probs(idx, layer=2)


def test_lm_head_is_padded_but_logits_are_the_vocabulary():
    model = GPT(config())                                              # vocab 48 -> 128 rows
    assert model.lm_head.weight.shape[0] == 128 and model.config.padded_vocab_size == 128
    idx = torch.randint(0, 48, (2, 5))
    logits, loss = model(idx, idx)
    assert logits.shape == (2, 5, 48) and torch.isfinite(loss)
    _, loss_only = model(idx, idx, return_logits=False)
    assert _ is None and torch.equal(loss_only, loss)
