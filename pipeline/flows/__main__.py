"""`python -m pipeline.flows {setup,run,local}`. `local` loads nothing of Prefect."""

from __future__ import annotations

import argparse
import sys

from pipeline.flows import local
from pipeline.flows.deploy import STAGE_DEPLOYMENT, ZOMBIE_AFTER_S


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m pipeline.flows",
                                 description="Run the pcgpt pipeline: Prefect orchestration, or "
                                             "a local run without Prefect.")
    sub = ap.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("setup", help="work pool, this host's GPU-slot limit, zombie automation")
    s.add_argument("--gpus", type=int, default=None,
                   help="slots of this host (default: the GPUs it sees, 1 on a CPU-only host)")
    s.add_argument("--zombie-after", type=int, default=ZOMBIE_AFTER_S, metavar="SECONDS",
                   help=f"mark runs Crashed after this long without a heartbeat (default {ZOMBIE_AFTER_S})")
    r = sub.add_parser("run", help="run the pipeline flow in this process (no worker)")
    r.add_argument("targets", nargs="*", help="stages or groups (default: all)")
    r.add_argument("-f", "--force", action="store_true")
    r.add_argument("-S", "--set-param", dest="overrides", action="append", default=[],
                   metavar="KEY=VALUE", help="a params.yaml override, as in `dvc exp run -S`")
    r.add_argument("--distribute", action="store_true",
                   help=f"run GPU stages through {STAGE_DEPLOYMENT} on any host")
    loc = sub.add_parser("local", help="run the pipeline on this host's GPUs without Prefect",
                         description="Each stage as `dvc --wait-for-lock repro --single-item` "
                                     "once its upstream stages finished, GPU stages on per-device "
                                     "slots; no Prefect server, Prefect or MLflow needed.")
    local.add_arguments(loc)
    args = ap.parse_args(argv)
    if args.cmd == "local":
        return local.main(args)
    try:
        if args.cmd == "setup":
            from pipeline.flows.deploy import setup

            done = setup(args.gpus, args.zombie_after)
            print(f"work pool {done['work_pool']!r} (process); GPU-slot limit {done['slot_limit']!r} "
                  f"= {done['slots']}; automation {done['automation']!r} ({done['zombie_after_s']} s)")
            return 0
        from pipeline.flows.flow import pcgpt

        state = pcgpt(targets=args.targets or None, force=args.force, overrides=args.overrides,
                      distribute=args.distribute, return_state=True)
    except ValueError as e:
        print(f"pipeline.flows: error: {e}", file=sys.stderr)
        return 2
    print(f"flow run {state.name}: {state.message or ''}")
    return 0 if state.is_completed() else 1


if __name__ == "__main__":
    sys.exit(main())
