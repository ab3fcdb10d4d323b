"""The pretrain stage: exact resume after SIGKILL, NaN guard, corrupt checkpoints, bad params,
DDP with gloo, tracking down; plus the loop's pure pieces (lr schedule, sampler, bpb, attention map).

Everything runs a 2-layer, 32-wide model on a seeded char corpus written by
tests/stages/pretrain_helpers.py, on CPU with one thread per process.
"""

from __future__ import annotations

import io
import json
import math
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from safetensors.torch import load_file

from pipeline.metrics import HEADLINE, read_run_metrics
from pipeline.params import ParamsError, read_params
from stages.pretrain import checkpoints as ckpt
from stages.pretrain.config import PretrainConfig, RunPaths, TrainConfig, config_hash, load_config
from stages.pretrain.data import load_shards, train_batch, unigram_bpb, val_batches
from stages.pretrain.evaluation import attention_record
from stages.pretrain.trainer import Trainer, train
from tests.stages.pretrain_helpers import env, run_stage, workspace, write_params

SEED = 7  # the helper's params have `seed: 7` and no `seeds`: one seed, 7
OUTPUTS = ("models/baseline/model.safetensors", "models/baseline/meta.json",
           "metrics/pretrain/baseline.json", "metrics/pretrain/baseline/7.json",
           "metrics/pretrain/baseline/7_details.json", "metrics/pretrain/baseline/7_curve.tsv",
           "metrics/pretrain/baseline/7_diagnostics.tsv",
           "metrics/pretrain/baseline_samples.json", "metrics/pretrain/baseline_attention.json")
SEED_METRICS = "metrics/pretrain/baseline/7.json"
CHECKPOINTS = "checkpoints/baseline/seed7"


def weights(root: Path, run: str = "baseline") -> dict[str, torch.Tensor]:
    return load_file(str(root / "models" / run / "model.safetensors"))


def assert_ok(proc: subprocess.CompletedProcess) -> None:
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"


def in_process(root: Path, run: str = "baseline") -> tuple[PretrainConfig, RunPaths]:
    cfg = load_config(run, read_params(root / "params.yaml"))
    m = cfg.train
    for name in ("models_dir", "metrics_dir", "checkpoints_dir"):
        setattr(m, name, str(root / getattr(m, name)))
    return cfg, RunPaths.for_run(run, m, root / "data/tokens", root / "data/tokenizer", cfg.seed)


# ------------------------------------------------------------------------ the stage end to end

@pytest.mark.slow
def test_stage_writes_every_output_and_beats_unigram(tmp_path):
    root = workspace(tmp_path / "w", train={"steps": 60, "eval_every": 20})
    assert_ok(run_stage(root, "baseline"))
    for rel in OUTPUTS:
        assert (root / rel).is_file(), rel
    m = read_run_metrics(root / SEED_METRICS)
    for key in ("run", "step", "tokens", "wall_s", "train/loss", "val/loss", "val/ppl", "val/bpb",
                "val/acc", "val/unigram_bpb", "val/majority_acc", "perf/tok_per_s", "perf/mfu_pct",
                "perf/step_ms", "mem/peak_gib", "device", "n_params"):
        assert key in m, key
    # the seed's file holds the headline numbers only (a bp run has no PC summary); the run's
    # DVC metric is their mean over the seeds (one here)
    assert list(json.loads((root / SEED_METRICS).read_text())) == sorted(HEADLINE)
    mean = json.loads((root / "metrics/pretrain/baseline.json").read_text())
    assert mean == {"seeds": 1, **json.loads((root / SEED_METRICS).read_text())}
    assert m["step"] == 60 and m["tokens"] == 60 * 4 * 32
    assert m["val/bpb"] < m["val/unigram_bpb"], m
    assert m["val/acc"] > m["val/majority_acc"] > 0, m
    assert math.isclose(m["val/ppl"], math.exp(m["val/loss"]), rel_tol=1e-6)
    curve = (root / "metrics/pretrain/baseline/7_curve.tsv").read_text().splitlines()
    assert curve[0].split("\t") == ["step", "tokens", "wall_s", "train_loss", "val_loss", "val_bpb", "val_acc", "lr"]
    assert [int(r.split("\t")[0]) for r in curve[1:]] == [20, 40, 60]
    assert (root / "metrics/pretrain/baseline/7_diagnostics.tsv").read_text() == "step\twall_s\tmetric\tlayer\tvalue\n"
    meta = json.loads((root / "models/baseline/meta.json").read_text())
    assert meta["step"] == 60 and meta["model"]["vocab_size"] == meta["vocab_size_data"]
    assert meta["tokenizer_sha256"] == json.loads((root / "data/tokens/meta.json").read_text())["tokenizer_sha256"]
    att = json.loads((root / "metrics/pretrain/baseline_attention.json").read_text())
    assert len(att["weights"]) == len(att["tokens"]) == 32
    samples = json.loads((root / "metrics/pretrain/baseline_samples.json").read_text())
    assert samples[0]["prompt"] == "the king" and samples[0]["completion"]


@pytest.mark.slow
def test_untracked_char_run_imports_neither_mlflow_nor_rustbpe(tmp_path):
    """`tracking.enabled: false` never imports MLflow, a char tokenizer never imports rustbpe."""
    root = workspace(tmp_path / "w", train={"steps": 4, "eval_every": 4})
    code = ("import sys\nfrom stages.pretrain.__main__ import main\nmain(['baseline'])\n"
            "loaded = [m for m in ('mlflow', 'rustbpe') if m in sys.modules]\n"
            "assert not loaded, loaded\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=root, env=env(), capture_output=True,
                          text=True, timeout=300)
    assert_ok(proc)
    assert (root / "models/baseline/model.safetensors").is_file()


@pytest.mark.slow
def test_sigkill_then_resume_is_bit_identical(tmp_path):
    """A run SIGKILLed mid-training (possibly mid-checkpoint) and resumed with resume: auto
    ends with the same weights, metrics and samples as an uninterrupted run."""
    train_params = {"steps": 300, "save_every": 20, "eval_every": 50, "log_every": 10}
    ref = workspace(tmp_path / "ref", train=train_params)
    assert_ok(run_stage(ref, "baseline"))

    root = workspace(tmp_path / "killed", train=train_params)
    proc = subprocess.Popen([sys.executable, "-m", "stages.pretrain", "baseline"], cwd=root,
                            env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ck_dir = root / CHECKPOINTS
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not list(ck_dir.glob("step_*.json")):
        time.sleep(0.005)
    time.sleep(0.05)  # somewhere after the first checkpoint, not at it
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (root / "models/baseline/model.safetensors").exists(), "the run finished before the kill"
    killed_at = max(c.step for c in ckpt.valid_checkpoints(ck_dir))
    assert killed_at < 300

    resumed = run_stage(root, "baseline")
    assert_ok(resumed)
    assert "resumed from" in resumed.stderr
    a, b = weights(ref), weights(root)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    m_ref = read_run_metrics(ref / SEED_METRICS)
    m_res = read_run_metrics(root / SEED_METRICS)
    for k in ("val/loss", "val/acc", "train/loss", "tokens", "step"):
        assert m_ref[k] == m_res[k], k
    for name in ("baseline_samples.json", "baseline_attention.json"):
        assert (ref / "metrics/pretrain" / name).read_text() == (root / "metrics/pretrain" / name).read_text()
    curve = lambda r: [l.split("\t")[:2] + l.split("\t")[3:] for l in  # noqa: E731 (wall_s differs)
                       (r / "metrics/pretrain/baseline/7_curve.tsv").read_text().splitlines()]
    assert curve(ref) == curve(root)


@pytest.mark.slow
def test_nan_loss_stops_naming_step_and_checkpoint_and_writes_nothing(tmp_path):
    root = workspace(tmp_path / "w")
    assert_ok(run_stage(root, "baseline"))
    before = {rel: (root / rel).read_bytes() for rel in OUTPUTS}
    write_params(root, train={"resume": "never"})
    proc = run_stage(root, "baseline", PCGPT_DEBUG_NAN_AT_STEP="17")
    assert proc.returncode == 3, proc.stderr[-3000:]
    assert "at step 17" in proc.stderr and "step_00000015.pt" in proc.stderr, proc.stderr[-3000:]
    assert {rel: (root / rel).read_bytes() for rel in OUTPUTS} == before
    steps = [c.step for c in ckpt.valid_checkpoints(root / CHECKPOINTS)]
    assert max(steps) == 15, steps


def test_corrupt_checkpoint_is_skipped_with_a_warning(tmp_path):
    root = workspace(tmp_path / "w", train={"steps": 20, "save_every": 5, "keep_last": 3})
    cfg, paths = in_process(root)
    train(cfg, "baseline", paths, progress=False)
    ref = {k: v.clone() for k, v in weights(root).items()}
    # Truncate the newest checkpoint and flip a byte in the one before: both must be skipped.
    newest = paths.checkpoints / "step_00000020.pt"
    newest.write_bytes(newest.read_bytes()[:1000])
    older = paths.checkpoints / "step_00000015.pt"
    data = bytearray(older.read_bytes())
    data[len(data) // 2] ^= 0xFF
    older.write_bytes(bytes(data))
    with pytest.warns(UserWarning, match="truncated or corrupt") as rec:
        info = ckpt.latest(paths.checkpoints, config_hash(cfg))
    assert info.step == 10 and len(rec) == 2
    with pytest.warns(UserWarning, match="step_00000020.pt"):
        train(cfg, "baseline", paths, progress=False)  # resumes from step 10, redoes 11..20
    for k, v in weights(root).items():
        assert torch.equal(v, ref[k]), k


def test_a_finished_pc_run_resumed_at_its_end_reports_the_same_metrics(tmp_path):
    """Resuming from the checkpoint of the last step runs no step: the final metrics must still
    be the last training step's diagnostics (kept in the checkpoint), not the last probe's and
    not the attention precisions after the final update."""
    root = workspace(tmp_path / "w", model={"attention": {"kernel": "gaussian", "precision": "head"}},
                     train={"steps": 6, "save_every": 3, "eval_every": 3, "log_every": 2},
                     runs={"r": {"pc": {"algorithm": "pc", "settle_steps": 2, "state_lr": 1.0,
                                        "precision": "layer"}}})
    cfg, paths = in_process(root, "r")
    first = train(cfg, "r", paths, progress=False)
    again = train(cfg, "r", paths, progress=False)  # resumes at step 6: nothing left to run
    timing = ("wall_s", "perf/", "mem/")
    keys = {k for k in first if not k.startswith(timing)}
    assert any(k.startswith("pc/settle_residual") for k in keys) and any(k.startswith("attn/") for k in keys)
    assert {k: again.get(k) for k in keys} == {k: first[k] for k in keys}


def test_checkpoints_of_another_config_are_not_resumed(tmp_path):
    root = workspace(tmp_path / "w", train={"steps": 10, "save_every": 5})
    cfg, paths = in_process(root)
    train(cfg, "baseline", paths, progress=False)
    cfg.train.lr *= 2
    with pytest.warns(UserWarning, match="different config"):
        assert ckpt.latest(paths.checkpoints, config_hash(cfg)) is None


def test_rotation_keeps_last_k_and_best(tmp_path):
    for step, val in ((5, 1.0), (10, 0.5), (15, 0.7), (20, 0.9), (25, 0.8)):
        ckpt.save(tmp_path, step, {"x": torch.zeros(2)}, val_loss=val, config_hash="h")
        ckpt.rotate(tmp_path, keep_last=2)
    assert [c.step for c in ckpt.valid_checkpoints(tmp_path)] == [10, 20, 25]


@pytest.mark.parametrize("params, message", [
    ({"train": {"lrr": 1.0}}, "train.lrr: unknown key"),
    ({"train": {"steps": "many"}}, "train.steps: expected an integer"),
    ({"train": {"steps": 0}}, "steps: must be >= 1"),
    ({"model": {"n_embd": 30}}, "n_embd=30"),
    ({"model": {"vocab_size": 100}}, "model.vocab_size: not a model param"),
    ({"model": {"attention": {"kernel": "cosine"}}}, "attention.kernel='cosine'"),
    ({"pc": {"algorithm": "magic"}}, "pc.algorithm='magic'"),
    ({"runs": {"baseline": {"optim": {}}}}, "runs.baseline.optim: unknown section"),
    ({"runs": {"baseline": {"train": {"decay": "step"}}}}, "train.decay: 'step' is not allowed"),
    ({"runs": {"other": {}}}, "runs.baseline: no such run (known: other)"),
    ({"runs": {"baseline": {"train": {"models_dir": "elsewhere"}}}}, "runs.baseline.train.models_dir: paths"),
])
def test_bad_params_are_named(params, message):
    base = {"seed": 1, "model": {"n_layer": 2, "n_head": 2, "n_embd": 32}, "pc": {}, "train": {},
            "runs": {"baseline": {}}}
    for section, value in params.items():
        base[section] = {**base[section], **value} if section != "runs" else value
    with pytest.raises(ParamsError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_config("baseline", base)


@pytest.mark.slow
def test_bad_params_fail_before_work(tmp_path):
    root = workspace(tmp_path / "w", train={"micro_batch": -1})
    proc = run_stage(root, "baseline")
    assert proc.returncode != 0 and "micro_batch: must be >= 1" in proc.stderr
    assert not (root / "checkpoints").exists()


@pytest.mark.slow
def test_ddp_two_gloo_processes_complete_and_save_once(tmp_path):
    """torchrun with 2 CPU processes: one MLflow run, one set of checkpoints and outputs."""
    root = workspace(tmp_path / "w", train={"steps": 12, "save_every": 6, "eval_every": 6,
                                            "batch_tokens": 256}, tracking=True)
    launcher = subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
         "-m", "stages.pretrain", "baseline"],
        cwd=root, env=env(MLFLOW_TRACKING_URI=f"sqlite:///{root / 'mlflow.db'}", OMP_NUM_THREADS="1"),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        out, err = launcher.communicate(timeout=180)
    except subprocess.TimeoutExpired:
        os.killpg(launcher.pid, signal.SIGKILL)  # torchrun and both workers (their own group)
        raise
    proc = subprocess.CompletedProcess(launcher.args, launcher.returncode, out, err)
    assert_ok(proc)
    assert proc.stdout.count("pretrain@baseline seed 7: step 12") == 1, proc.stdout
    m = read_run_metrics(root / SEED_METRICS)
    assert m["step"] == 12 and m["tokens"] == 12 * 256  # 2 ranks x 4 seqs x 32 tokens x accum 1
    ck = sorted(p.name for p in (root / CHECKPOINTS).iterdir())
    assert ck == ["step_00000006.json", "step_00000006.pt", "step_00000012.json", "step_00000012.pt"]
    from mlflow.tracking import MlflowClient
    client = MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
    exp = client.get_experiment_by_name("pcgpt-test")
    runs = client.search_runs([exp.experiment_id], "tags.`pcgpt.kind` = 'stage'")
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"


@pytest.mark.slow
def test_tracking_down_still_completes(tmp_path):
    root = workspace(tmp_path / "w", train={"steps": 10}, tracking=True)
    proc = run_stage(root, "baseline", MLFLOW_TRACKING_URI="http://127.0.0.1:9")
    assert_ok(proc)
    assert "unavailable" in proc.stderr
    assert read_run_metrics(root / SEED_METRICS)["step"] == 10


@pytest.mark.slow
def test_sigterm_saves_a_checkpoint_and_exits_nonzero(tmp_path):
    root = workspace(tmp_path / "w", train={"steps": 100000, "save_every": 100000})
    proc = subprocess.Popen([sys.executable, "-m", "stages.pretrain", "baseline"], cwd=root,
                            env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    err: list[str] = []
    reader = threading.Thread(target=lambda: err.extend(iter(lambda: proc.stderr.read(1), "")))
    reader.start()
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and "pretrain@baseline:" not in "".join(err):
        time.sleep(0.05)  # the progress bar appears once the signal handlers are installed
    time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=120)
    reader.join()
    text = "".join(err)
    assert proc.returncode == 128 + signal.SIGTERM, text[-2000:]
    assert "stopped by SIGTERM" in text
    found = ckpt.valid_checkpoints(root / CHECKPOINTS)
    assert len(found) == 1 and 0 < found[0].step < 100000


# ------------------------------------------------------------------------ the pure pieces

def test_lr_schedule_warms_up_then_decays_to_the_floor():
    t = TrainConfig(steps=100, warmup_steps=10, lr=1.0, min_lr_frac=0.1)
    lrs = [t.lr_at(s) for s in range(100)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(lrs[9:], lrs[10:]))
    assert t.lr_at(100) == pytest.approx(0.1)
    t.decay = "linear"
    assert t.lr_at(55) == pytest.approx(0.1 + 0.9 * 0.5)


def test_sampler_is_a_pure_function_of_seed_step_rank(tmp_path):
    data = np.arange(10_000, dtype=np.uint16)
    kw = dict(batch_size=4, block_size=8)
    a = train_batch(data, seed=1, step=5, micro_step=0, rank=0, **kw)
    assert torch.equal(a[0], train_batch(data, seed=1, step=5, micro_step=0, rank=0, **kw)[0])
    assert torch.equal(a[1], a[0] + 1)  # targets are the inputs shifted by one
    for other in (dict(seed=2, step=5, micro_step=0, rank=0), dict(seed=1, step=6, micro_step=0, rank=0),
                  dict(seed=1, step=5, micro_step=1, rank=0), dict(seed=1, step=5, micro_step=0, rank=1)):
        assert not torch.equal(a[0], train_batch(data, **other, **kw)[0])
    v = val_batches(data, n_batches=4, batch_size=2, block_size=8)
    v0, v1 = (val_batches(data, n_batches=4, batch_size=2, block_size=8, rank=r, world_size=2) for r in (0, 1))
    assert [b[0].tolist() for b in v] == [b[0].tolist() for b in (v0[0], v1[0], v0[1], v1[1])]


def test_unigram_bpb_matches_the_entropy_of_a_known_distribution():
    rng = np.random.default_rng(0)
    p = np.array([0.5, 0.25, 0.125, 0.125])
    train_ids = rng.choice(4, size=200_000, p=p)
    val_ids = rng.choice(4, size=200_000, p=p)
    entropy_bits = -(p * np.log2(p)).sum()  # 1.75 bits/token
    assert unigram_bpb(train_ids, val_ids, 4, bytes_per_token=2.0) == pytest.approx(entropy_bits / 2, rel=1e-2)


def test_attention_map_rows_are_the_softmax_of_the_scores():
    from model.config import GPTConfig
    from model.gpt import GPT
    from pipeline.tokenizer import CharTokenizer

    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=64, block_size=16, n_layer=1, n_head=2, n_embd=16))
    x = torch.randint(0, 64, (1, 16))
    record = attention_record(model, x, CharTokenizer([]), layer=0, head=1)
    assert record["kernel"] == "dot" and len(record["tokens"]) == 16 and model.training
    w = torch.tensor(record["weights"])
    attn = model.blocks[0].attn
    h = model.blocks[0].norm_1(model.embed(x))
    cos, sin = model.rotary(16)
    from model.attention import apply_rotary
    q = apply_rotary(attn.c_q(h).view(1, 16, 2, 8).transpose(1, 2), cos, sin)[0, 1]
    k = apply_rotary(attn.c_k(h).view(1, 16, 2, 8).transpose(1, 2), cos, sin)[0, 1]
    scores = (q @ k.T / math.sqrt(8)).masked_fill(~torch.ones(16, 16, dtype=torch.bool).tril(), -math.inf)
    torch.testing.assert_close(w, scores.softmax(-1), atol=1e-5, rtol=1e-4)


def test_shards_and_val_batches_read_what_the_helper_wrote(tmp_path):
    root = workspace(tmp_path / "w")
    sh = load_shards(root / "data/tokens", 32)
    assert sh.train.dtype == np.uint16 and sh.vocab_size > int(sh.train.max())
    assert 0.99 < sh.bytes_per_token_val <= 1.01  # char tokenizer on ASCII text


def test_trainer_state_dict_round_trip_continues_identically(tmp_path):
    """What a checkpoint holds is enough: a fresh Trainer loaded from another's state_dict
    takes the same next step, to the bit."""
    from stages.pretrain.runtime import Runtime

    root = workspace(tmp_path / "w", model={"n_layer": 1}, train={"steps": 10})
    cfg, _ = in_process(root)
    sh = load_shards(root / "data/tokens", cfg.model.block_size)
    gcfg = cfg.gpt_config(sh.vocab_size)

    def batches(step):
        return [train_batch(sh.train, seed=cfg.seed, step=step, micro_step=0, rank=0,
                            batch_size=cfg.train.micro_batch, block_size=gcfg.block_size)]

    a = Trainer(cfg, gcfg, Runtime(), accum=1)
    for step in range(3):
        a.step(batches(step), cfg.train.lr_at(step))
    assert a.iter_num == 3 and a.tokens == 3 * a.step_tokens
    buf = io.BytesIO()
    torch.save(a.state_dict(), buf)  # as a checkpoint does: no tensor shared with `a`
    b = Trainer(cfg, gcfg, Runtime(), accum=1)
    b.load_state_dict(torch.load(io.BytesIO(buf.getvalue()), weights_only=False))
    assert (b.iter_num, b.tokens) == (a.iter_num, a.tokens)
    for t in (a, b):
        t.step(batches(3), cfg.train.lr_at(3))
    for (name, pa), pb in zip(a.model.state_dict().items(), b.model.state_dict().values()):
        assert torch.equal(pa, pb), name


def test_pc_diagnostics_at_every_evaluation_leave_training_unchanged(tmp_path):
    """The probe at each evaluation (PCGPT.pc_diagnostics on a fixed training batch) settles and
    would fold its errors into the `variance` precision's running mean: a run evaluated every 2
    steps ends with the weights and buffers of one evaluated once. Its numbers reach the curve
    (one row per evaluation) and the long per-layer table."""
    runs = {"pc": {"model": {"attention": {"kernel": "gaussian", "precision": "head"}},
                   "pc": {"algorithm": "pc", "settle_steps": 2, "state_lr": 1.0, "precision": "layer",
                          "precision_update": "variance"}}}
    out = {}
    for every in (2, 8):
        root = workspace(tmp_path / f"every{every}", runs=runs, train={"steps": 8, "eval_every": every})
        cfg, paths = in_process(root, "pc")
        out[every] = (train(cfg, "pc", paths, progress=False), paths)
    a, b = (load_file(str(out[e][1].model_dir / "model.safetensors")) for e in (2, 8))
    assert a.keys() == b.keys() and any("error_var" in k for k in a)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    final, paths = out[2]
    assert -1 <= final["pc/grad_cos"] <= 1 and final["pc/settle_diverged_count"] in (0, 1, 2, 3, 4)
    curve = pd.read_csv(paths.curve, sep="\t")
    assert list(curve["step"]) == [2, 4, 6, 8]
    for col in ("grad_cos", "settle_residual", "energy_drop", "settle_rejected", "precision_mean", "diverged_count"):
        assert curve[col].notna().all(), col
    assert curve["diverged_count"].is_monotonic_increasing
    diag = pd.read_csv(paths.diagnostics, sep="\t")
    per_eval = diag.groupby("step").size()
    assert list(per_eval.index) == [2, 4, 6, 8] and (per_eval == per_eval.iloc[0]).all()
    assert set(diag["metric"]) == {"pc/grad_cos", "pc/precision", "pc/error_energy", "pc/true_error_energy",
                                   "pc/error"}
    assert sorted(set(diag["layer"])) == [0, 1]  # the helper's 2-layer model
