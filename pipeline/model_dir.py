"""The model directory a training run leaves: `model.safetensors` + `meta.json`.

`meta.json` holds the model's config under "model" (a `GPTConfig` as a dict) and
whatever the writer adds about where the weights came from (run, step, tokens,
git commit, tokenizer sha256, ...). `save_model` writes both files atomically;
`load_model` builds the model back (the baseline or the PC model, as
`model.build_model` decides). The pretrain stage saves through it, and ablate's
test-time evaluation and the MLflow model (which ships this module) load through it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from model.config import GPTConfig
from model.gpt import GPT
from model.pc import build_model

WEIGHTS, META = "model.safetensors", "meta.json"


def save_model(model: GPT, meta: dict[str, Any], model_dir: str | Path) -> None:
    """`model`'s weights and `meta` (which must hold its config under "model"), each atomically."""
    from safetensors.torch import save_file

    from pipeline.io import atomic_path, write_json  # here: the MLflow model ships only the loader

    model_dir = Path(model_dir)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    with atomic_path(model_dir / WEIGHTS) as tmp:
        save_file(state, str(tmp), metadata={"format": "pt"})
    write_json(model_dir / META, meta)


def load_model(model_dir: str | Path, overrides: dict[str, Any] | None = None,
               device: str | torch.device = "cpu") -> tuple[GPT, dict[str, Any]]:
    """(model in eval mode, meta) of the directory. `overrides` replace config fields, one
    level deep for the nested ones (e.g. `{"attention": {"settle_steps": 4}}`: a test-time
    change; the weights must still fit)."""
    model_dir = Path(model_dir)
    meta = json.loads((model_dir / META).read_text(encoding="utf-8"))
    config = dict(meta["model"])
    for key, value in (overrides or {}).items():
        config[key] = {**config[key], **value} if isinstance(value, dict) else value
    model = build_model(GPTConfig(**config))
    model.load_state_dict(load_file(str(model_dir / WEIGHTS)))
    return model.to(device).eval(), meta


__all__ = ["save_model", "load_model", "WEIGHTS", "META"]
