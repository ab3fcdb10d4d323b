"""Wall time of the pcgpt pipeline through Prefect vs plain `dvc repro`, on this machine.

Two fresh copies of the repository's code, dvc.yaml, params.yaml and prefect.yaml in a
temp dir, each its own git + DVC repo with its own cache, so neither run can restore
anything: copy A runs `dvc repro`; copy B runs the same DAG as a `pcgpt/adhoc`
deployment run, through a Prefect server and a process worker started here (poll 1 s,
slot limit 1 on a CPU-only host: the training stages take turns in both runs). Run
back to back, on the same machine, under whatever else it is doing.

Prints per stage: seconds under `dvc repro` (from one "Running stage" line to the next)
and seconds of the flow's `dvc repro --single-item` process; then the totals, and the
Prefect overhead per stage = (flow - dvc repro) / stages.

    python tests/bench/bench_flows.py                    # the default pipeline (~15 min each
                                                         # way on an idle 2-core box)
    python tests/bench/bench_flows.py --tiny             # the tests' tiny profile (7 stages)
    python tests/bench/bench_flows.py --tiny --full-grid # the default DAG (41 stages: every
                                                         # variant x seed) with tiny models:
                                                         # the per-stage overhead at full width
    python tests/bench/bench_flows.py --grid 2           # default models, 2 ablation variants
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tests.conftest import ROOT  # noqa: E402
from tests.pipeline.prefect_helpers import (PrefectServer, Workspace, artifacts,  # noqa: E402
                                            quiet_nightly, run_deployment, table, wait_final)


def plain_repro(ws: Workspace) -> tuple[float, dict[str, float]]:
    """`dvc repro` with each stage's span from its "Running stage" line to the next."""
    t0 = time.monotonic()
    proc = subprocess.Popen([sys.executable, "-m", "dvc", "repro"], cwd=ws.path, env=ws.env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    marks = []
    for line in proc.stdout:
        if line.startswith("Running stage '"):
            marks.append((line.split("'")[1], time.monotonic()))
    if proc.wait() != 0:
        raise SystemExit(f"dvc repro failed in {ws.path}")
    total = time.monotonic() - t0
    ends = [t for _, t in marks[1:]] + [t0 + total]
    return total, {name: end - start for (name, start), end in zip(marks, ends)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tiny", action="store_true", help="the tests' tiny profile")
    ap.add_argument("--full-grid", action="store_true",
                    help="with --tiny: the default grid's variants and seeds at the tiny scale")
    ap.add_argument("--grid", type=int, default=0, help="keep only the first N ablation variants")
    args = ap.parse_args()
    default_grid = {k: yaml.safe_load((ROOT / "params.yaml").read_text())["ablation"][k]
                    for k in ("variants", "seeds")}
    root = Path(tempfile.mkdtemp(prefix="pcgpt-bench-flows-"))
    server = PrefectServer(root / "prefect-home")
    a = Workspace.create(root / "dvc", server, tiny=args.tiny)
    b = Workspace.create(root / "prefect", server, tiny=args.tiny)
    try:
        for ws in (a, b):
            p = ws.params
            if args.full_grid:
                p["ablation"].update(default_grid)
            if args.grid:
                p["ablation"]["variants"] = dict(list(p["ablation"]["variants"].items())[:args.grid])
            ws.set_params(p, replace=("ablation",))
            ws.commit("bench grid")
        dvc_total, dvc_stages = plain_repro(a)

        b.run(sys.executable, "-m", "pipeline.flows", "setup")
        b.deploy()
        quiet_nightly(server)
        b.start_worker()
        t0 = time.monotonic()
        run = run_deployment(server, "pcgpt/adhoc")
        run = wait_final(server, run.id, 7200, b.workers)
        trigger_total = time.monotonic() - t0
        if not run.state.is_completed():
            raise SystemExit(f"flow run {run.name}: {run.state.name} {run.state.message}")
        flow_total = (run.end_time - run.start_time).total_seconds()
        rows = {r["stage"]: r for r in table(artifacts(server, run.id)["pcgpt-stages"])}
    finally:
        b.stop_workers()
        server.stop()
        shutil.rmtree(root, ignore_errors=True)

    n = len(rows)
    print(f"\n{platform.node()}, {platform.processor() or platform.machine()}, "
          f"{'tiny profile' if args.tiny else 'default params'}"
          f"{', the default grid' if args.full_grid else ''}"
          f"{f', {args.grid} ablation variants' if args.grid else ''}: {n} stages\n")
    print(f"| {'stage':<28} | {'dvc repro s':>11} | {'flow: dvc process s':>19} |")
    print(f"|{'-' * 30}|{'-' * 13}|{'-' * 21}|")
    for name, r in rows.items():
        print(f"| {name:<28} | {dvc_stages.get(name, float('nan')):>11.1f} | {float(r['wall_s']):>19.1f} |")
    print()
    print(f"dvc repro                          {dvc_total:8.1f} s")
    print(f"Prefect flow run (start -> end)    {flow_total:8.1f} s   overhead "
          f"{(flow_total - dvc_total) / n:+.2f} s/stage")
    print(f"Prefect trigger -> Completed       {trigger_total:8.1f} s   overhead "
          f"{(trigger_total - dvc_total) / n:+.2f} s/stage (worker poll + process start included)")
    print(json.dumps({"stages": n, "dvc_s": round(dvc_total, 1), "flow_s": round(flow_total, 1),
                      "trigger_s": round(trigger_total, 1)}))


if __name__ == "__main__":
    main()
