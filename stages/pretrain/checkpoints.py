"""Resumable training checkpoints for the `pretrain` stage (a scratch folder, not a DVC out).

Layout of one run's folder (`<checkpoints_dir>/<run>/`):

    step_00000120.pt     torch.save of the full training state (see `save`)
    step_00000120.json   its manifest: step, sha256 and size of the .pt, val loss, config hash

Both files are written atomically (pipeline/io.py), the `.pt` first. A
checkpoint counts only when its manifest exists and the `.pt` matches the
recorded size and sha256, so a kill mid-write, a truncated copy or a flipped
bit is skipped with a warning instead of being loaded. `rotate` keeps the
newest `keep_last` checkpoints plus the one with the best val loss.

DVC deletes a stage's outs before running it (and `persist` disables the run
cache), which is why these live outside `models/` (DESIGN §1).
"""

from __future__ import annotations

import hashlib
import io
import json
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from pipeline.io import write_bytes, write_json

NAME_RE = re.compile(r"^step_(\d{8})\.json$")


@dataclass
class CheckpointInfo:
    """A manifest that passed validation."""

    step: int
    path: Path
    val_loss: float | None
    config_hash: str


def _name(step: int) -> str:
    return f"step_{step:08d}"


def save(folder: str | Path, step: int, state: dict[str, Any], *, val_loss: float | None,
         config_hash: str) -> Path:
    """Write `state` (anything torch.save takes) as checkpoint `step`; return the .pt path."""
    folder = Path(folder)
    buf = io.BytesIO()
    torch.save(state, buf)
    data = buf.getvalue()
    pt = folder / f"{_name(step)}.pt"
    write_bytes(pt, data)
    write_json(folder / f"{_name(step)}.json", {
        "step": step, "file": pt.name, "bytes": len(data),
        "sha256": hashlib.sha256(data).hexdigest(), "val_loss": val_loss,
        "config_hash": config_hash,
    })
    return pt


def _validate(manifest: Path) -> CheckpointInfo | None:
    """The manifest's checkpoint if it is intact, else None with a warning saying why."""
    try:
        m = json.loads(manifest.read_text(encoding="utf-8"))
        pt = manifest.with_name(m["file"])
        data = pt.read_bytes()
    except (OSError, ValueError, KeyError, TypeError) as e:
        warnings.warn(f"checkpoint {manifest}: unreadable ({e}); skipped", stacklevel=3)
        return None
    if len(data) != m["bytes"] or hashlib.sha256(data).hexdigest() != m["sha256"]:
        warnings.warn(f"checkpoint {pt}: size or sha256 differs from {manifest.name} "
                      f"(truncated or corrupt); skipped", stacklevel=3)
        return None
    return CheckpointInfo(int(m["step"]), pt, m.get("val_loss"), m.get("config_hash", ""))


def valid_checkpoints(folder: str | Path) -> list[CheckpointInfo]:
    """Every intact checkpoint in `folder`, oldest first."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = []
    for manifest in sorted(folder.iterdir()):
        if NAME_RE.match(manifest.name):
            info = _validate(manifest)
            if info is not None:
                found.append(info)
    return sorted(found, key=lambda c: c.step)


def latest(folder: str | Path, config_hash: str) -> CheckpointInfo | None:
    """The newest intact checkpoint written by the same training config, or None.

    Checkpoints of another config (params changed since) are left alone with a
    warning: resuming from them would silently mix two experiments.
    """
    found = valid_checkpoints(folder)
    same = [c for c in found if c.config_hash == config_hash]
    if len(same) < len(found):
        warnings.warn(f"{folder}: {len(found) - len(same)} checkpoint(s) from a different config "
                      "ignored (params changed since they were written)", stacklevel=2)
    return same[-1] if same else None


def load(info: CheckpointInfo) -> dict[str, Any]:
    """The state dict saved in a validated checkpoint (CPU tensors)."""
    return torch.load(info.path, map_location="cpu", weights_only=False)


def rotate(folder: str | Path, keep_last: int) -> None:
    """Delete all but the newest `keep_last` checkpoints and the best (lowest val loss)."""
    found = valid_checkpoints(folder)
    keep = {c.step for c in found[-keep_last:]} if keep_last > 0 else set()
    scored = [c for c in found if c.val_loss is not None]
    if scored:
        keep.add(min(scored, key=lambda c: (c.val_loss, -c.step)).step)
    for c in found:
        if c.step not in keep:
            c.path.with_suffix(".json").unlink(missing_ok=True)  # manifest first: never a
            c.path.unlink(missing_ok=True)                        # manifest without its .pt


def clear(folder: str | Path) -> None:
    """Remove every checkpoint (and stray temp file) of a run: `resume: never`."""
    folder = Path(folder)
    if folder.is_dir():
        for p in folder.iterdir():
            if p.is_file() and (p.name.startswith(("step_", ".tmp-step_"))):
                p.unlink()
