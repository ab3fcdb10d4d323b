"""What a finished run leaves behind: the model directory, the curve, samples, the
attention map, the final metrics (headline + details, pipeline/metrics.py), their
MLflow copies, and the registered MLflow model."""

from __future__ import annotations

import contextlib
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator

import torch

from model.gpt import GPT
from pipeline.io import write_json, write_text
from pipeline.metrics import (CURVE_COLUMNS, DIAGNOSTIC_SERIES, DIAGNOSTICS_COLUMNS, PC_CURVE_COLUMNS, details_path,
                              numeric, write_run_metrics)
from pipeline.model_dir import save_model
from stages.pretrain.config import PretrainConfig, RunPaths

ROOT = Path(__file__).resolve().parents[2]
PYFUNC_CODE = Path(__file__).with_name("pyfunc.py")  # the registered model's own code (models from code)
# What the registered model ships besides pyfunc.py: the model package and, of pipeline/,
# the tokenizer library and the model-directory loader (nothing of the stages or tracking).
SHIPPED = ("model", "pipeline/__init__.py", "pipeline/tokenizer.py", "pipeline/model_dir.py")
LOGGED_IN_LOOP = ("step", "tokens", "train/loss", "val/loss", "val/ppl", "val/bpb", "val/acc")
FROM_LOOP = ("train/loss", "val/loss", "val/ppl", "val/bpb", "val/acc", "perf/tok_per_s",
             "perf/mfu_pct", "perf/step_ms")


def attention_precisions(model: GPT) -> dict[str, float]:
    """`attn/precision/<layer>/<head>`: each head's learned attention precision λ (none for
    `dot`/`fixed`). PC algorithms report them in their diagnostics too; bp runs get them here."""
    out = {}
    for l, block in enumerate(model.blocks):
        fn = getattr(block.attn, "precision", None)
        lam = fn() if callable(fn) else None
        if lam is not None:
            out.update({f"attn/precision/{l}/{h}": float(v) for h, v in enumerate(lam.flatten().tolist())})
    return out


def diagnostics_metrics(diag: dict[str, torch.Tensor]) -> dict[str, float]:
    """training_step diagnostics as flat floats: 0-d tensors as-is, 1-d as `<key>/<i>`,
    2-d as `<key>/<i>/<j>` (e.g. attn/precision/<layer>/<head>)."""
    out: dict[str, float] = {}
    for k, v in diag.items():
        v = torch.as_tensor(v).detach().float().cpu()
        if v.dim() == 0:
            out[k] = v.item()
        elif v.dim() == 1:
            out.update({f"{k}/{i}": x for i, x in enumerate(v.tolist())})
        elif v.dim() == 2:
            out.update({f"{k}/{i}/{j}": x for i, row in enumerate(v.tolist()) for j, x in enumerate(row)})
    return out


def final_metrics(run: str, step: int, tokens: int, wall_s: float, last: dict[str, float],
                  unigram_bpb: float, peak_gib: float, device: str, n_params: int,
                  diagnostics: dict[str, float], majority_acc: float | None = None) -> dict[str, Any]:
    """A run's final metrics as one flat dict (names of DESIGN.md §5): `last` holds the loop's
    latest train/val/perf numbers, `diagnostics` the model's (attention_precisions,
    diagnostics_metrics, the last PC probe); the unigram bpb and the majority-token accuracy
    are the reference lines a model must beat."""
    refs = {"val/majority_acc": majority_acc} if majority_acc is not None else {}
    return {"run": run, "step": step, "tokens": tokens, "wall_s": round(wall_s, 3),
            **{k: last[k] for k in FROM_LOOP if k in last},
            "val/unigram_bpb": unigram_bpb, **refs, "mem/peak_gib": peak_gib, "device": device,
            "n_params": n_params, **diagnostics}


def _cell(v: Any) -> str:
    """A TSV cell: floats to 6 significant digits, a missing value (or NaN) empty."""
    if v is None or (isinstance(v, float) and v != v):
        return ""
    return f"{v:.6g}" if isinstance(v, float) else str(v)


def write_curve(path: Path, rows: list[dict[str, Any]]) -> None:
    """`<run>_curve.tsv`: one row per evaluation, columns pipeline.metrics.CURVE_COLUMNS and,
    when the rows hold PC diagnostics, PC_CURVE_COLUMNS."""
    pc = any(PC_CURVE_COLUMNS["grad_cos"] in r for r in rows)
    columns = [*((c, c) for c in CURVE_COLUMNS), *(PC_CURVE_COLUMNS.items() if pc else ())]
    lines = ["\t".join(c for c, _ in columns)]
    lines += ["\t".join(_cell(r.get(key)) for _, key in columns) for r in rows]
    write_text(path, "\n".join(lines) + "\n")


def write_diagnostics(path: Path, rows: list[dict[str, Any]]) -> None:
    """`<run>_diagnostics.tsv`: the per-layer series (pipeline.metrics.DIAGNOSTIC_SERIES) of
    every curve row in long format (DIAGNOSTICS_COLUMNS); only the header for a backprop run."""
    lines = ["\t".join(DIAGNOSTICS_COLUMNS)]
    for r in rows:
        for series in DIAGNOSTIC_SERIES:
            layer = 0
            while (v := r.get(f"{series}/{layer}")) is not None:
                lines.append("\t".join((str(r["step"]), _cell(r["wall_s"]), series, str(layer), _cell(v))))
                layer += 1
    write_text(path, "\n".join(lines) + "\n")


def write_outputs(paths: RunPaths, model: GPT, meta: dict[str, Any], curve: list[dict[str, Any]],
                  samples: list[dict[str, str]] | None, attention: dict[str, Any] | None,
                  final: dict[str, Any], tracker: Any) -> None:
    """Every file of a finished run, each atomically (samples and the attention map where the
    paths ask for them); the numbers not logged by the loop and every file to MLflow."""
    save_model(model, meta, paths.model_dir)
    write_curve(paths.curve, curve)
    write_diagnostics(paths.diagnostics, curve)
    written = [paths.model_dir / "meta.json", paths.metrics, details_path(paths.metrics), paths.curve,
               paths.diagnostics]
    for path, obj in ((paths.samples, samples), (paths.attention, attention)):
        if path is not None and obj is not None:
            write_json(path, obj)
            written.append(path)
    write_run_metrics(paths.metrics, final)
    logged = set(LOGGED_IN_LOOP)
    if curve and curve[-1].get("step") == final["step"]:  # the last evaluation's PC probe
        logged.update(k for k in curve[-1] if k.startswith("pc/"))
    tracker.log_metrics({k: v for k, v in numeric(final).items() if k not in logged},
                        step=final["step"])
    for p in written:
        tracker.log_artifact(p)


def register_model(tracker: Any, paths: RunPaths, name: str, alias: str) -> None:
    """Log the model as an MLflow pyfunc generator (pyfunc.py) under `name`@`alias`."""
    from pipeline.tracking import default_pip_requirements

    with shipped_code() as code_paths:
        tracker.log_pyfunc_model(
            str(PYFUNC_CODE), artifacts={"model_dir": str(paths.model_dir),
                                         "tokenizer_dir": str(paths.tokenizer_dir)},
            name="model", registered_name=name, alias=alias, code_paths=code_paths,
            pip_requirements=default_pip_requirements(), signature=_pyfunc_signature)


@contextlib.contextmanager
def shipped_code() -> Iterator[list[str]]:
    """SHIPPED, copied into a temp folder with the repository's layout (so `pipeline.tokenizer`
    imports the same in the loaded model); MLflow copies it from there."""
    with tempfile.TemporaryDirectory(prefix="pcgpt-code-") as tmp:
        for rel in SHIPPED:
            src, dest = ROOT / rel, Path(tmp) / rel
            dest.parent.mkdir(parents=True, exist_ok=True)
            if src.is_dir():
                shutil.copytree(src, dest, ignore=shutil.ignore_patterns("__pycache__"))
            else:
                shutil.copy2(src, dest)
        yield [str(Path(tmp) / top) for top in dict.fromkeys(rel.split("/")[0] for rel in SHIPPED)]


def _pyfunc_signature():
    """Built only when a model is really logged (it imports MLflow)."""
    from stages.pretrain.pyfunc import signature

    return signature()


def model_meta(run: str, cfg: PretrainConfig, model: GPT, step: int, tokens: int,
               tokens_meta: dict[str, Any], git: dict[str, Any]) -> dict[str, Any]:
    """meta.json beside the weights: the model config, the stage config, what it was trained on."""
    from pipeline.params import to_dict

    return {"run": run, "model": to_dict(model.config), "stage": cfg.to_params(), "step": step,
            "tokens": tokens, "git_commit": git["commit"], "git_dirty": git["dirty"],
            "tokenizer_sha256": tokens_meta.get("tokenizer_sha256"),
            "vocab_size_data": int(tokens_meta["vocab_size"]), "n_params": model.num_params()}
