"""The pipeline on this host without Prefect: `python -m pipeline.flows local`.

For a host with DVC but no Prefect server, or no Prefect and MLflow installed at all (a
multi-GPU machine that only carries the DVC wheels, running a study): the same DAG read
from DVC, the same command per stage (`dvc --wait-for-lock repro --single-item <stage>`)
and the same GPU slots as the flow `pcgpt`, driven by a thread pool. It imports nothing of
Prefect or MLflow (tests/pipeline/test_flows_local.py checks it).

    python -m pipeline.flows local                                  # everything, this host's GPUs
    python -m pipeline.flows local ablate --gpus 0,1,2,3 --per-gpu 2
    python -m pipeline.flows local pretrain@pcgpt -S train.steps=2000

- Each stage starts as soon as its upstream stages finished (DVC runs single items of one
  workspace in parallel: its repo lock is released while a stage's command runs).
- A GPU stage (one that depends on `model/`) takes a slot of `--gpus` (default: the GPUs
  the host shows, else one CPU slot, so training stages run one at a time), at most
  `--per-gpu` stages per device, and runs with `CUDA_VISIBLE_DEVICES` set to its device
  (left alone for a `cpu<i>` device). The slots are the per-device lock files of
  `dag.first_free_device`, shared with the Prefect flow's runs on the same host. CPU
  stages take no slot.
- Every output line is printed as `[<stage>] <line>`; at the end a table of the stages
  (status, seconds running and waiting for a slot, device).
- A stage that fails on a DVC lock is run again; any other failure stops the stages
  downstream of it (the others go on) and the exit code is 1, naming the failed stages.
- `-S key=value` applies for this run (params.yaml is restored afterwards) and a successful
  run is saved as the DVC experiment `local-<date>-<time>` (`dvc exp show`).
- Ctrl-C (or SIGTERM to the process group) reaches the stages, which checkpoint and exit;
  SIGTERM to the runner alone lets them finish. Either way nothing new starts, the runner
  waits for the running stages, prints the table and exits 130.
- Stage runs go to MLflow (if the stages have it) as under `dvc repro --single-item`: each
  is its own pipeline execution, since the runner opens no parent run.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import dataclasses
import os
import signal
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path
from typing import Any, Callable

from pipeline.flows.dag import (LOCK_RETRY_DELAYS_S, DvcResult, SlotWaitCancelled, Stage,
                                StageFailed, StageLockError, first_free_device, host,
                                params_applied, params_with, raise_for, read_dag, repro_args,
                                run_dag, run_dvc, save_experiment, select, slot_devices, stage_env,
                                workspace, workspace_lock)

_BAD = ("failed", "not run", "interrupted")  # statuses of stages that did not complete


@dataclasses.dataclass(frozen=True)
class Slots:
    devices: list[str]
    """Device names: GPU indices (or anything `CUDA_VISIBLE_DEVICES` takes), `cpu<i>`."""
    per_device: int = 1
    """Stages that may share one device at once."""

    def __post_init__(self) -> None:
        if not self.devices:
            raise ValueError("--gpus: no device named (e.g. --gpus 0,1)")
        if len(set(self.devices)) != len(self.devices):
            raise ValueError(f"--gpus {','.join(self.devices)}: name each device once")
        if self.per_device < 1:
            raise ValueError(f"--per-gpu {self.per_device}: must be >= 1")

    @classmethod
    def parse(cls, gpus: str | None, per_device: int = 1) -> Slots:
        """`--gpus 0,1` -> devices 0 and 1; without it the GPUs this host shows
        (`CUDA_VISIBLE_DEVICES`, else nvidia-smi), else one CPU slot `cpu0`."""
        devices = slot_devices(1) if gpus is None else [g.strip() for g in gpus.split(",") if g.strip()]
        return cls(devices, per_device)


class Console:
    """Whole lines from many threads: `[<stage>] <text>`, flushed at once."""

    def __init__(self, out=None):
        self._out = out or sys.stdout
        self._lock = threading.Lock()

    def __call__(self, text: str, stage: str | None = None) -> None:
        with self._lock:
            print(f"[{stage}] {text}" if stage else text, file=self._out, flush=True)


def run(root: Path, targets: list[str] | None, overrides: list[str], slots: Slots,
        force: bool = False, say: Callable[..., None] | None = None) -> dict[str, dict[str, Any]]:
    """Run the targets and their upstream stages in the workspace `root`; one row per stage,
    in DAG order. Bad targets or overrides, or a workspace that another run holds, raise
    ValueError before any work.

    The DAG is read with the overrides applied: `-S ablation.seeds=[0,1,2]` adds stages."""
    say = say or Console()
    text = params_with(root, overrides) if overrides else None
    with workspace_lock(root, f"local run (pid {os.getpid()} on {host()})") as busy:
        if busy:
            raise ValueError(f"already running: {busy} holds the workspace {root}")
        with params_applied(root, text):
            dag = read_dag(root)
            order = select(dag, targets)
            say(f"{len(order)} stages: {', '.join(order)}")
            if any(dag[n].gpu for n in order):
                say(f"GPU slots: {', '.join(slots.devices)} ({slots.per_device} per device)")
            rows = _execute(root, dag, order, slots, force, say)
            if overrides and not any(r["status"].startswith(_BAD) for r in rows.values()):
                save_experiment(root, dag, order, time.strftime("local-%Y%m%d-%H%M%S"), say)
    return rows


def _execute(root: Path, dag: dict[str, Stage], order: list[str], slots: Slots, force: bool,
             say: Callable[..., None]) -> dict[str, dict[str, Any]]:
    stop = threading.Event()
    rows: dict[str, dict[str, Any]] = {}  # written by the stage threads as they end

    def one(name: str) -> dict[str, Any]:
        try:
            row = _run_stage(root, dag[name], force, slots, stop, say)
        except SlotWaitCancelled:
            row = None
        except Exception as e:  # noqa: BLE001 - a bug of the runner: the stage's row says it
            row = {"stage": name, "status": "failed", "error": f"{type(e).__name__}: {e}"}
        rows[name] = row or {"stage": name, "status": "not run (interrupted)"}
        return rows[name]

    # every stage may wait for a slot at once (a 36-item grid after the tokenizer)
    pool = ThreadPoolExecutor(max_workers=max(1, len(order)), thread_name_prefix="stage")
    try:
        return run_dag(dag, order, lambda name, _ups: pool.submit(one, name),
                       lambda fs: next(as_completed(fs)), lambda msg: say(f"error: {msg}"))
    except KeyboardInterrupt:
        stop.set()
        say("interrupted: no new stages; waiting for the running ones to exit")
        _shutdown(pool)
        return {n: rows.get(n) or {"stage": n, "status": "not run (interrupted)"} for n in order}
    finally:
        _shutdown(pool)


def _shutdown(pool: ThreadPoolExecutor) -> None:
    """Wait for the stage threads to end, through further Ctrl-Cs (the stages got those too).
    A thread ends when its stage has: `run_dvc` reads the output pipe until every process
    holding it closed it, the stage command too when a SIGTERM killed `dvc` before it."""
    while True:
        try:
            pool.shutdown(wait=True, cancel_futures=True)
            return
        except KeyboardInterrupt:
            continue


def _run_stage(root: Path, st: Stage, force: bool, slots: Slots, stop: threading.Event,
               say: Callable[..., None]) -> dict[str, Any] | None:
    """One stage, in a GPU slot if it needs one. Its row says `failed` (with the error) if
    DVC failed: `run_dag` then runs nothing downstream of it. None: not started, since the
    run was interrupted."""
    t0 = time.monotonic()
    if st.gpu:
        say(f"waiting for a GPU slot: {', '.join(slots.devices)}", st.name)
        slot = first_free_device(slots.devices, slots.per_device, stop)
    else:
        slot = contextlib.nullcontext("-")
    error = ""
    with slot as dev:
        if stop.is_set():
            return None
        env = stage_env()
        if st.gpu:
            say(f"GPU slot taken: device {dev}", st.name)
            if not dev.startswith("cpu"):
                env["CUDA_VISIBLE_DEVICES"] = dev
        t1 = time.monotonic()
        try:
            res = _repro(root, st.name, force, env, stop, lambda line: say(line, st.name))
            status = res.status or "done"  # DVC exited 0 without a line run_dvc knows
        except StageFailed as e:
            status, error = ("interrupted" if stop.is_set() else "failed"), str(e)
        finally:
            t2 = time.monotonic()
            if st.gpu:
                say(f"GPU slot released: device {dev}", st.name)
    say(f"{status} in {t2 - t1:.1f} s{f': {error}' if error else ''}", st.name)
    return {"stage": st.name, "status": status, "wall_s": round(t2 - t1, 1),
            "waited_s": round(t1 - t0, 1), "gpu": dev, "error": error}


def _repro(root: Path, stage: str, force: bool, env: dict[str, str], stop: threading.Event,
           log: Callable[[str], None]) -> DvcResult:
    """`dvc repro --single-item`, run again after a DVC lock error (LOCK_RETRY_DELAYS_S)."""
    for delay in (*LOCK_RETRY_DELAYS_S, None):
        res = run_dvc(root, repro_args(stage, force), env, log)
        try:
            raise_for(stage, res)
            return res
        except StageLockError as e:
            if delay is None or stop.is_set():
                raise StageFailed(f"{str(e).removesuffix('; retrying')}; gave up after "
                                  f"{len(LOCK_RETRY_DELAYS_S)} retries (is a `dvc` command "
                                  f"running by hand in this workspace?)") from None
            log(f"{e} in {delay} s")
            stop.wait(delay)
    raise AssertionError("unreachable")


def table(rows: dict[str, dict[str, Any]]) -> str:
    """The stages as a fixed-width text table."""
    cols = ("stage", "status", "wall_s", "waited_s", "gpu")
    cells = [[str(r.get(c, "")) for c in cols] for r in rows.values()]
    widths = [max([len(c), *(len(row[i]) for row in cells)]) for i, c in enumerate(cols)]
    right = {"wall_s", "waited_s"}

    def line(values):
        return "  ".join(v.rjust(w) if c in right else v.ljust(w)
                         for c, v, w in zip(cols, values, widths)).rstrip()
    return "\n".join([line(cols), line(["-" * w for w in widths]), *map(line, cells)])


# --------------------------------------------------------------------------- CLI

def add_arguments(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("targets", nargs="*", help="stages or groups (default: all)")
    ap.add_argument("-S", "--set-param", dest="overrides", action="append", default=[],
                    metavar="KEY=VALUE", help="a params.yaml override, as in `dvc exp run -S`")
    ap.add_argument("--gpus", default=None, metavar="0,1,...",
                    help="devices for GPU stages (default: the GPUs this host shows; none: one "
                         "CPU slot, so training stages run one at a time)")
    ap.add_argument("--per-gpu", type=int, default=1, metavar="N",
                    help="GPU stages per device at once (default 1)")
    ap.add_argument("-f", "--force", action="store_true",
                    help="re-run the stages even where DVC finds them up to date")


def main(args: argparse.Namespace) -> int:
    """`python -m pipeline.flows local ...`: 0 if every stage ran or was up to date, 1 if
    one failed, 2 on a bad argument or a busy workspace, 130 if interrupted."""
    say = Console()
    t0 = time.monotonic()
    old = _sigterm_interrupts()
    try:
        rows = run(workspace(), args.targets or None, args.overrides,
                   Slots.parse(args.gpus, args.per_gpu), args.force, say)
    except ValueError as e:
        print(f"pipeline.flows local: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("pipeline.flows local: interrupted", file=sys.stderr)
        return 130
    finally:
        if old is not None:
            signal.signal(signal.SIGTERM, old)
    say(f"\n{table(rows)}\n")
    bad = [r for r in rows.values() if r["status"].startswith(_BAD)]
    counts = collections.Counter(r["status"] for r in rows.values())
    say(f"{len(rows)} stages in {time.monotonic() - t0:.1f} s: "
        + ", ".join(f"{n} {s}" for s, n in counts.items()))
    if not bad:
        return 0
    print(f"pipeline.flows local: {len(bad)} of {len(rows)} stages failed or were not run: "
          f"{', '.join(r['stage'] for r in bad)}", file=sys.stderr)
    for r in bad:
        if r.get("error"):
            print(f"  {r['error']}", file=sys.stderr)
    return 130 if any("interrupted" in r["status"] for r in bad) else 1


def _sigterm_interrupts():
    """SIGTERM to the runner stops it as Ctrl-C does; returns the handler it replaced."""
    def interrupt(signum, frame):
        raise KeyboardInterrupt
    try:
        return signal.signal(signal.SIGTERM, interrupt)
    except ValueError:  # not the main thread: leave signals alone
        return None
