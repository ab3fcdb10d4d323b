"""GPTConfig validation: a bad value raises ValueError naming the key, the value and what is allowed."""

from __future__ import annotations

import pytest

from model import AttentionConfig, GPTConfig


def test_defaults_and_nested_dicts_build():
    cfg = GPTConfig(attention={"kernel": "mixture", "n_components": 3})
    assert isinstance(cfg.attention, AttentionConfig) and cfg.attention.n_components == 3
    assert cfg.head_dim == 64 and cfg.kv_heads == cfg.n_head
    assert GPTConfig(n_kv_head=2).kv_heads == 2


@pytest.mark.parametrize("kw, key", [
    (dict(attention=dict(kernel="gauss")), "attention.kernel='gauss': must be one of dot, gaussian, "
                                           "student_t, laplace, mixture"),
    (dict(attention=dict(precision="layer")), "attention.precision"),
    (dict(attention=dict(kernel="dot", precision="token")), "attention.precision"),
    (dict(attention=dict(precision_min=0.0)), "attention.precision_min"),
    (dict(attention=dict(precision_min=2.0, precision_max=1.0)), "attention.precision_min"),
    (dict(attention=dict(n_components=0)), "attention.n_components"),
    (dict(attention=dict(nu_init=-1.0)), "attention.nu_init"),
    (dict(attention=dict(laplace_eps=0)), "attention.laplace_eps"),
    (dict(attention=dict(settle_steps=-1)), "attention.settle_steps"),
    (dict(attention=dict(settle_rate=1.5)), "attention.settle_rate"),
    (dict(n_embd=100, n_head=6), "n_embd=100: must be divisible by n_head=6"),
    (dict(n_embd=96, n_head=32), "head size"),
    (dict(n_kv_head=4, n_head=6), "n_kv_head=4: must divide n_head=6"),
    (dict(mlp="tanh"), "mlp='tanh'"),
    (dict(dropout=1.0), "dropout"),
    (dict(vocab_size=0), "vocab_size"),
    (dict(block_size=2.5), "block_size"),
    (dict(logit_softcap=-1), "logit_softcap"),
])
def test_bad_values_name_the_key(kw, key):
    with pytest.raises(ValueError) as err:
        GPTConfig(**kw)
    assert key in str(err.value)


def test_unknown_attention_key_is_rejected():
    with pytest.raises(TypeError, match="kernal"):
        GPTConfig(attention={"kernal": "dot"})
