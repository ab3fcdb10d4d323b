"""The pretrain loop on a CUDA GPU: every training algorithm x attention kernel x precision mode,
compiled, in bf16, for a few steps (the class of bug where a CPU tensor meets a CUDA one at a
log step: issue 10). Skipped without CUDA; run on a GPU host with `pytest -m gpu tests/stages`."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from model.config import KERNELS
from tests.stages.pretrain_helpers import workspace
from tests.stages.test_pretrain import in_process

pytestmark = pytest.mark.gpu

ALGORITHMS = {
    "bp": {"algorithm": "bp"},
    "pc": {"algorithm": "pc", "settle_steps": 2, "state_lr": 1.0},
    "pc_fixed": {"algorithm": "pc", "settle_steps": 2, "state_lr": 1.0, "fixed_predictions": True},
    "ipc": {"algorithm": "ipc", "settle_steps": 2, "state_lr": 0.5},
    "settle": {"algorithm": "settle", "settle_steps": 2, "state_lr": 0.5},
}
ATTN_PRECISION = ("fixed", "head", "token")
PC_PRECISION = ("fixed", "layer", "channel")


def cases():
    """Each algorithm with each kernel; the precision modes rotate so that every algorithm
    meets every attention and every layer precision mode."""
    for (i, alg), (j, kernel) in itertools.product(enumerate(ALGORITHMS), enumerate(KERNELS)):
        attn = ATTN_PRECISION[(i + j) % 3]
        if kernel == "dot" and attn == "token":
            attn = "head"
        yield pytest.param(alg, kernel, attn, PC_PRECISION[(i + 2 * j) % 3], id=f"{alg}-{kernel}-{attn}")


@pytest.mark.parametrize("alg,kernel,attn,pc_precision", list(cases()))
def test_train_runs_on_cuda_compiled(tmp_path, alg, kernel, attn, pc_precision):
    pc = dict(ALGORITHMS[alg])
    if alg != "bp":
        pc["precision"] = pc_precision
    root = workspace(tmp_path / "w", model={"attention": {"kernel": kernel, "precision": attn}},
                     train={"device": "cuda", "compile": True, "steps": 6, "eval_every": 3, "save_every": 3,
                            "log_every": 2, "micro_batch": 4},
                     runs={"r": {"pc": pc}})
    cfg, paths = in_process(root, "r")
    from stages.pretrain.trainer import train
    metrics = train(cfg, "r", paths, progress=False)
    assert metrics["step"] == 6 and math.isfinite(metrics["val/loss"]), metrics
    assert metrics["device"] != "cpu" and metrics["mem/peak_gib"] > 0
    if alg != "bp":
        assert math.isfinite(metrics["pc/settle_residual"])
    torch.cuda.synchronize()
