"""pipeline.model_dir: a saved model loads back as the same model, baseline or PC."""

from __future__ import annotations

import json

import pytest
import torch

from model.config import GPTConfig
from model.pc import PCGPT, build_model
from pipeline.model_dir import load_model, save_model
from pipeline.params import to_dict


@pytest.mark.parametrize("pc", [{"algorithm": "bp"}, {"algorithm": "pc", "settle_steps": 2, "precision": "layer"}])
def test_saved_model_loads_back_identical(tmp_path, pc):
    torch.manual_seed(0)
    config = GPTConfig(vocab_size=70, block_size=16, n_layer=2, n_head=2, n_embd=16,
                       attention={"kernel": "gaussian", "precision": "head"}, pc=pc)
    model = build_model(config)
    save_model(model, {"model": to_dict(config), "run": "x"}, tmp_path / "m")
    loaded, meta = load_model(tmp_path / "m")
    assert meta["run"] == "x" and type(loaded) is type(model) and not loaded.training
    assert isinstance(loaded, PCGPT) == (pc["algorithm"] != "bp")
    for (k, a), b in zip(model.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(a, b), k
    idx = torch.randint(0, 70, (2, 16))
    model.eval()
    torch.testing.assert_close(loaded(idx)[0], model(idx)[0], rtol=0, atol=0)
    assert json.loads((tmp_path / "m" / "meta.json").read_text())["model"]["vocab_size"] == 70


def test_overrides_change_the_config_not_the_weights(tmp_path):
    config = GPTConfig(vocab_size=64, block_size=16, n_layer=1, n_head=2, n_embd=16,
                       attention={"kernel": "gaussian", "precision": "head"})
    save_model(build_model(config), {"model": to_dict(config)}, tmp_path)
    loaded, _ = load_model(tmp_path, {"attention": {"settle_steps": 3}})
    assert loaded.config.attention.settle_steps == 3 and loaded.config.attention.kernel == "gaussian"
