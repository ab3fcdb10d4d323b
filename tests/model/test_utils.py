"""Helpers: parameter count, FLOPs per token per kernel, MFU, optimizer groups."""

from __future__ import annotations

import pytest
import torch

from model import GPT, GPTConfig
from model.utils import (PEAK_FLOPS, Optimizers, attention_flops_per_token, count_params, flops_per_token,
                         make_optimizer, mfu, param_groups)


def config(kernel="dot", **att) -> GPTConfig:
    return GPTConfig(vocab_size=50, block_size=64, n_layer=3, n_head=4, n_kv_head=2, n_embd=32,
                     attention=dict(kernel=kernel, **att))


def test_count_params_by_hand():
    cfg = config()
    model = GPT(cfg)
    C, V, L, D = 32, 50, 3, 8
    attn = C * 4 * D + 2 * C * 2 * D + 4 * D * C      # q, k, v (GQA), proj
    mlp = 2 * C * 4 * C                                  # relu2: fc + proj
    block = attn + mlp + 2 * C                           # + two RMSNorm gains
    total = V * C + L * block + C + C * 128              # embedding, blocks, final norm, lm_head (rows padded to 128)
    assert count_params(model) == total
    assert count_params(model, exclude_embedding=True) == total - V * C == model.num_params()


def test_flops_per_token_palm_formula_and_kernels():
    cfg = config()
    n = count_params(GPT(cfg), exclude_embedding=True)
    L, H, Q, T = 3, 4, 8, 64
    assert flops_per_token(cfg) == 6 * n + 12 * L * H * Q * T            # PaLM appendix B
    assert attention_flops_per_token(config("gaussian")) == 6 * L * H * T * (Q + 1 + Q)
    assert attention_flops_per_token(config("student_t")) == 6 * L * H * T * (Q + 2 + Q)
    assert attention_flops_per_token(config("laplace")) == 6 * L * H * T * (Q + 2 + Q)
    assert attention_flops_per_token(config("mixture", n_components=3)) == 6 * L * H * 3 * T * (3 * (Q + 2) + Q)
    assert attention_flops_per_token(config("gaussian", settle_steps=2)) == 3 * 6 * L * H * T * (2 * Q + 1)
    assert attention_flops_per_token(cfg, seq_len=32) == 12 * L * H * Q * 32
    # token precision adds its projection and per-head log-precision to N
    tok = config("gaussian", precision="token")
    assert flops_per_token(tok) - attention_flops_per_token(tok) == 6 * (n + 3 * (32 * 4 + 4))


def test_mfu():
    assert PEAK_FLOPS["h100"] == PEAK_FLOPS["h200"] == 989e12
    assert mfu(1e5, 6e9, 989e12) == pytest.approx(1e5 * 6e9 / 989e12)
    with pytest.raises(ValueError, match="peak_flops"):
        mfu(1.0, 1.0, 0.0)


@pytest.mark.parametrize("kind", ["adamw", "muon"])
def test_optimizer_groups_cover_every_parameter_once(kind):
    model = GPT(config("student_t", precision="token"))
    opt = make_optimizer(model, kind, lr=1e-3, weight_decay=0.1)
    seen = [id(p) for g in opt.param_groups for p in g["params"]]
    assert sorted(seen) == sorted(id(p) for p in model.parameters())
    decay = {id(p) for g in opt.param_groups if g["weight_decay"] > 0 for p in g["params"]}
    attn = model.blocks[0].attn
    for p in (model.wte.weight, model.norm_f.weight, attn.log_precision, attn.precision_proj.weight, attn.nu_raw):
        assert id(p) not in decay
    assert id(attn.c_q.weight) in decay and id(model.lm_head.weight) in decay
    kinds = [type(o).__name__ for o in opt.optimizers]
    assert kinds == (["Muon", "AdamW"] if kind == "muon" else ["AdamW"])
    if kind == "muon":
        muon = {id(p) for p in opt.optimizers[0].param_groups[0]["params"]}
        assert muon == {id(p) for p in param_groups(model)["matrices"]}
        assert id(attn.precision_proj.weight) not in muon and id(model.lm_head.weight) not in muon
    assert all(g["lr_scale"] == 1.0 for g in opt.param_groups)


@pytest.mark.parametrize("kind", ["adamw", "muon"])
def test_optimizer_steps_and_state_round_trip(kind):
    torch.manual_seed(0)
    model = GPT(config())
    opt = make_optimizer(model, kind, lr=1e-2)
    idx = torch.randint(0, 50, (2, 9))
    losses = []
    for _ in range(5):
        _, loss = model(idx, idx)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    state = opt.state_dict()
    fresh = make_optimizer(model, kind, lr=1e-2)
    fresh.load_state_dict(state)
    a = [s for o in opt.optimizers for s in o.state.values()]
    b = [s for o in fresh.optimizers for s in o.state.values()]
    assert len(a) == len(b) > 0
    for sa, sb in zip(a, b):
        for key in sa:
            assert torch.equal(torch.as_tensor(sa[key]), torch.as_tensor(sb[key]))
    other = make_optimizer(model, "adamw" if kind == "muon" else "muon")
    with pytest.raises(ValueError, match="optimizer state"):
        other.load_state_dict(state)
    assert isinstance(opt, Optimizers)
    with pytest.raises(ValueError, match="kind="):
        make_optimizer(model, "sgd")
